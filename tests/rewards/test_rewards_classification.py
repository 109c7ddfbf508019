"""Classification accuracy reward: published (compat) rule, robust default, fuzz."""

from __future__ import annotations

import math
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rewards_fuzz_strategies import classification_near_miss, garbage_text, wrap

from megatron_vrft.rewards import GroundTruth, classification_accuracy_reward, normalize_label

FUZZ = settings(
    max_examples=10000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

CAT = {"label": "cat"}
ALBATROSS = {"label": "Black_footed_Albatross", "synonyms": ["Diomedea nigripes"]}


def _score(completion, gt, **kw) -> float:
    return classification_accuracy_reward([completion], [gt], **kw).scores.item()


# (completion, ground truth, default score, compat score)
TABLE = [
    (wrap("cat"), CAT, 1.0, 1.0),
    (wrap(" Cat "), CAT, 1.0, 1.0),
    (wrap("It is a cat."), CAT, 1.0, 1.0),
    (wrap("category"), CAT, 0.0, 1.0),  # whole-word: 'cat' is not the word 'category'
    (wrap("concatenate"), CAT, 0.0, 1.0),
    (wrap("dog"), CAT, 0.0, 0.0),
    (wrap(""), CAT, 0.0, 1.0),  # the published rule's hole: '' is in every label
    (wrap("c"), CAT, 0.0, 1.0),  # ... and so is any single letter of it
    (wrap("a"), CAT, 0.0, 1.0),
    (wrap("black footed albatross"), ALBATROSS, 1.0, 1.0),
    (wrap("Black-Footed Albatross"), ALBATROSS, 1.0, 0.0),  # compat keeps '-'
    (wrap("blackfootedalbatross"), ALBATROSS, 1.0, 1.0),  # equal with spaces removed
    (wrap("diomedea nigripes"), ALBATROSS, 1.0, 0.0),  # synonym (compat has none)
    (wrap("The bird is a Diomedea nigripes, clearly."), ALBATROSS, 1.0, 0.0),
    (wrap("albatross"), ALBATROSS, 0.0, 1.0),  # a fragment is not the class
    (wrap("laysan albatross"), ALBATROSS, 0.0, 0.0),
    ("<think>x</think> cat", CAT, 0.0, 1.0),  # no tag: compat scores the whole completion
    ("<think>x</think><answer>ca", CAT, 0.0, 0.0),  # truncated
    ("<think>x</think><answer>\ncat\n</answer>", CAT, 1.0, 1.0),
    (wrap("cat") + "<answer>dog</answer>", CAT, 0.0, 1.0),  # two answers: ambiguous
    (wrap("cat dog bird fish horse sheep cow zebra giraffe bear"), CAT, 0.0, 1.0),  # class listing
    (wrap("猫"), {"label": "cat", "synonyms": ["猫"]}, 1.0, 0.0),
    (wrap("ＣＡＴ"), CAT, 1.0, 0.0),  # NFKC full-width (compat only lower-cases)
]


@pytest.mark.parametrize("completion, gt, default, compat", TABLE)
def test_classification_table(completion, gt, default, compat) -> None:
    assert _score(completion, gt) == default
    assert _score(completion, gt, mode="visual_rft_compat") == compat


def test_truncated_compat_case_is_what_the_published_rule_does() -> None:
    # Published: no '</answer>' -> whole completion "<think>x</think><answer>ca" normalised is
    # "<think>x</think><answer>ca"; 'cat' is not in it and it is not in 'cat' -> 0 ... unless the
    # completion is a substring of the label. Check both directions explicitly.
    assert _score("<think>x</think><answer>ca", CAT, mode="visual_rft_compat") == 0.0
    assert _score("ca", CAT, mode="visual_rft_compat") == 1.0  # 'ca' is inside 'cat'


def test_compat_hack_empty_answer() -> None:
    """The reason the default is not the published rule."""
    gts = [{"label": name} for name in ["cat", "boeing 737", "black footed albatross"]]
    hack = [wrap("")] * 3
    assert classification_accuracy_reward(hack, gts, mode="visual_rft_compat").scores.tolist() == [1.0] * 3
    out = classification_accuracy_reward(hack, gts)
    assert out.scores.tolist() == [0.0] * 3
    assert dict(out.failures) == {"empty_answer": 3}


def test_failure_reasons_and_counts() -> None:
    completions = [wrap("cat"), "no tags", "<answer>cat", wrap("cat") + "<answer>x</answer>", wrap(" ,. "), None]
    out = classification_accuracy_reward(completions, [CAT] * 6)
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert out.reasons == [
        None,
        "no_answer_tag",
        "unclosed_answer_tag",
        "multiple_answer_tags",
        "empty_answer",
        "not_a_string",
    ]
    assert out.failed.tolist() == [False, True, True, True, True, True]


def test_compat_rule_is_linear_time() -> None:
    text = "<answer>" * 8000  # the published regex search is quadratic here
    t0 = time.process_time()
    out = classification_accuracy_reward(
        [text, "<answer>x\n<answer>cat</answer>"], [CAT, CAT], mode="visual_rft_compat"
    )
    assert time.process_time() - t0 < 0.5
    assert out.scores.tolist() == [0.0, 1.0]


def test_max_extra_words() -> None:
    text = wrap("I think this picture most likely shows a cat")
    assert _score(text, CAT) == 1.0
    assert _score(text, CAT, max_extra_words=3) == 0.0
    assert _score(wrap("cat " + "x " * 50), CAT, max_extra_words=None) == 1.0


def test_bad_ground_truth_raises_naming_the_record() -> None:
    with pytest.raises(ValueError, match=r"ground_truths\[1\]\.label"):
        classification_accuracy_reward([wrap("a"), wrap("b")], [CAT, {"label": "  _ "}])
    with pytest.raises(ValueError, match=r"ground_truths\[0\]: unknown keys \['lable'\]"):
        classification_accuracy_reward([wrap("a")], [{"lable": "cat"}])
    with pytest.raises(ValueError, match=r"ground_truths\[0\]\.synonyms"):
        classification_accuracy_reward([wrap("a")], [{"label": "cat", "synonyms": "kitty"}])
    assert _score(wrap("cat"), {"label": "cat", "synonyms": None}) == 1.0
    with pytest.raises(ValueError, match="mode"):
        classification_accuracy_reward([wrap("a")], [CAT], mode="lenient")
    with pytest.raises(ValueError, match="2 completions but 1 ground truths"):
        classification_accuracy_reward([wrap("a"), wrap("b")], [CAT])


LABELS = ["cat", "black footed albatross", "boeing 737-800", "Great_White_Shark", "crested auklet"]
GTS = [GroundTruth(label=lab) for lab in LABELS]


def _published_rule(completion: str, label: str) -> float:
    """The published Visual-RFT classification rule, written with its regex."""
    m = re.search(r"<answer>(.*?)</answer>", completion)
    student = (m.group(1).strip() if m else completion.strip()).replace(" ", "").replace("_", "").lower()
    truth = label.strip().replace(" ", "").replace("_", "").lower()
    return 1.0 if (truth in student or student in truth) else 0.0


def _contains_label(text, label: str) -> bool:
    """Independent necessary condition for a default-mode score of 1."""
    if not isinstance(text, str):
        return False
    t, lab = normalize_label(text), normalize_label(label)
    return f" {lab} " in f" {t} " or lab.replace(" ", "") in t.replace(" ", "")


@pytest.mark.slow
@FUZZ
@given(
    idx=st.integers(0, len(LABELS) - 1),
    garbage=garbage_text,
    near=classification_near_miss(LABELS),
)
def test_classification_fuzz(idx, garbage, near) -> None:
    near_idx, completion, must_fail = near
    completions = [garbage, completion]
    gts = [GTS[idx], GTS[near_idx]]
    for mode in ("default", "visual_rft_compat"):
        out = classification_accuracy_reward(completions, gts, mode=mode)
        scores = out.scores.tolist()
        assert all(math.isfinite(s) and s in (0.0, 1.0) for s in scores)
        assert out.failures.num_failed() == sum(r is not None for r in out.reasons)
        if mode == "visual_rft_compat":
            for text, gt, s in zip(completions, gts, scores):
                assert s == (_published_rule(text, gt.label) if isinstance(text, str) else 0.0)
        if mode == "default":
            for text, gt, s, r in zip(completions, gts, scores, out.reasons):
                assert r is None or s == 0.0  # a failure never pays
                assert s == 0.0 or _contains_label(text, gt.label)
            if must_fail:
                assert out.reasons[1] is not None and scores[1] == 0.0
