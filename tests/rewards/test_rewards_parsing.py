"""Answer extraction and the tolerant box-list parser."""

from __future__ import annotations

import time

import pytest

from megatron_vrft.rewards import MAX_BOXES, extract_answer, parse_boxes, parse_single_box
from megatron_vrft.rewards.parsing import parse_confidence, parse_number

BOX = (10.0, 20.0, 50.0, 60.0)


@pytest.mark.parametrize(
    "completion, answer, reason",
    [
        ("<think>x</think><answer> cat </answer>", "cat", None),
        ("<answer>\nmulti\nline\n</answer>", "multi\nline", None),
        ("<answer></answer>", "", None),
        ("no tags", None, "no_answer_tag"),
        ("<answer>cat", None, "unclosed_answer_tag"),
        ("</answer>cat<answer>", None, "unclosed_answer_tag"),
        ("<answer>a</answer><answer>b</answer>", None, "multiple_answer_tags"),
        ("<answer>a<answer>b</answer>", None, "multiple_answer_tags"),
        (None, None, "not_a_string"),
        (b"<answer>a</answer>", None, "not_a_string"),
        ("<answer>" + "a" * 70000 + "</answer>", None, "too_long"),
        ("<answer>" + "a" * 20000 + "</answer>", None, "too_long"),  # answer cap
    ],
)
def test_extract_answer(completion, answer, reason) -> None:
    got, err = extract_answer(completion)
    assert got == answer
    assert (err.value if err is not None else None) == reason


@pytest.mark.parametrize(
    "text, confidences",
    [
        ("[{'Position': [10, 20, 50, 60], 'Confidence': 0.9}]", [0.9]),  # Visual-RFT prompt format
        ('[{"Position": [10, 20, 50, 60], "Confidence": 0.9}]', [0.9]),  # strict JSON
        ("[{'position': [10, 20, 50, 60], 'confidence': '0.9'}]", [0.9]),  # lower case, string conf
        ("[{'bbox': [10, 20, 50, 60], 'score': '90%'}]", [0.9]),  # percent
        ("[{'box': [10, 20, 50, 60], 'conf': 0.9,},]", [0.9]),  # trailing commas
        ('[{"bbox_2d": [10, 20, 50, 60], "confidence": 0.9}]', [0.9]),  # Qwen2.5-VL key
        ("[{Position: [10, 20, 50, 60], Confidence: 90%}]", [0.9]),  # bare keys, bare percent
        ("{'Position': [10, 20, 50, 60], 'Confidence': 0.9}", [0.9]),  # missing outer brackets
        (
            "{'Position': [10, 20, 50, 60], 'Confidence': 0.9}, {'Position': [10, 20, 50, 60], 'Confidence': 0.1}",
            [0.9, 0.1],
        ),
        ("[{'Position': [10, 20, 50, 60], 'Confidence': 0.9}", [0.9]),  # missing closing bracket
        (
            "{'Position': [10, 20, 50, 60], 'Confidence': 0.9}, {'Position': [10, 20, 50, 60], 'Confidence': 0.2}]",
            [0.9, 0.2],
        ),
        ("Sure! Here you go: [{'Position': [10, 20, 50, 60], 'Confidence': 0.9}] Hope it helps.", [0.9]),
        ('```json\n[{"Position": [10, 20, 50, 60], "Confidence": 0.9}]\n```', [0.9]),  # fence
        ("[{'Position': ['10', '20', '50', '60'], 'Confidence': 0.9}]", [0.9]),  # numeric strings
        ("[{'Position': (10, 20, 50, 60), 'Confidence': 0.9}]", [0.9]),  # tuple (python literal)
        ("[{'Position': [10, 20, 50, 60], 'Confidence': 0.9, 'extra': {'a': 1}}]", [0.9]),  # unknown keys
        ("[{'Bounding Box': [10, 20, 50, 60], 'Confidence': 1}]", [1.0]),
        ("[[10, 20, 50, 60]]", [None]),
        ("[10, 20, 50, 60]", [None]),
    ],
)
def test_parse_boxes_loose_variants(text, confidences) -> None:
    boxes, err = parse_boxes(text)
    assert err is None, err
    assert [b.box for b in boxes] == [BOX] * len(confidences)
    assert [b.confidence for b in boxes] == pytest.approx(confidences)


@pytest.mark.parametrize("text", ["No Objects", "no objects.", "'No Objects'", "[]", "None", "```\n[]\n```"])
def test_empty_predictions(text) -> None:
    assert parse_boxes(text) == ([], None)


@pytest.mark.parametrize(
    "text, reason",
    [
        ("", "empty_answer"),
        ("cat", "not_a_list"),
        ("[{'Position': [10, 20, 50, 60], 'bbox': [1, 2, 3, 4], 'Confidence': 0.9}]", "bad_entry"),
        ("[{'Position': [10, 20, 50, 60], 'Confidence': 0.9}, 'x']", "bad_entry"),
        ("[{'Position': [10, 20, 50, 60], 'Confidence': 0.9}, [1, 2, 3]]", "bad_entry"),
        ("[{'Position': '10, 20, 50, 60', 'Confidence': 0.9}]", "bad_number"),
        ("[{'Position': [10, 20, 50, True], 'Confidence': 0.9}]", "bad_number"),
        ("[{'Position': [10, 20, 50, 60], 'Confidence': True}]", "bad_number"),
        ("[{'Position': [10, 20, 50, 60], 'Confidence': '120%'}]", "bad_confidence"),
        ("[{'Position': [10, 20, 50, 60], 'Confidence': -0.5}]", "bad_confidence"),
        ('[{"Position": [10, 20, 50, 60], "Confidence": Infinity}]', "nonfinite"),
        ("[{'Position': [10, 20, 50, 1" + "0" * 400 + "], 'Confidence': 0.9}]", "nonfinite"),
        ("[{'Position': [10, 20, 50, 1e6], 'Confidence': 0.9}]", "out_of_range"),
        ("[{'Position': [50, 20, 10, 60], 'Confidence': 0.9}]", "inverted_box"),
        ("[{'Position': [10, 60, 50, 20], 'Confidence': 0.9}]", "inverted_box"),
        ("[{'Position': [10, 20, 10, 60], 'Confidence': 0.9}]", "degenerate_box"),
        ("[" + "{'Position': [10, 20, 50, 60], 'Confidence': 0.9}, " * (MAX_BOXES + 1) + "]", "too_many_boxes"),
        ("[" * 7 + "]" * 7, "too_deep"),
        ("{" * 5000, "too_deep"),
        ("[" + "1, " * 9000 + "]", "too_long"),
        (
            "[{'Position': [10, 20, 50, 60], 'Confidence': 0.9}, {'Position': [10, 20, 5",
            "not_a_list",
        ),  # truncated entry: never silently dropped
        ("[{'Position': [10, 20, 50, 60], 'Confidence': 0.9}] and [{'Position': [1, 2, 3, 4]", "not_a_list"),
    ],
)
def test_parse_boxes_rejects(text, reason) -> None:
    boxes, err = parse_boxes(text)
    assert boxes is None and err.value == reason


def test_numbers() -> None:
    assert parse_number(3) == (3.0, None)
    assert parse_number(" 2.5 ") == (2.5, None)
    assert parse_number(10**400)[1].value == "nonfinite"
    assert parse_number("1" * 100)[1].value == "bad_number"  # over MAX_NUMBER_CHARS
    assert parse_number(float("nan"))[1].value == "nonfinite"
    assert parse_number(False)[1].value == "bad_number"
    assert parse_number([1])[1].value == "bad_number"
    assert parse_confidence("87.5%") == (0.875, None)
    assert parse_confidence("1.01")[1].value == "bad_confidence"


N = 16000  # just under MAX_ANSWER_CHARS
ADVERSARIAL = {
    "bare_key_spaces": "[{a" + " " * N + "}",  # was quadratic in the bare-key repair regex
    "comma_spaces": "[" + ", a " * (N // 4) + "]",
    "digits": "[" + "1" * N + "]",
    "point_pairs": "(1,2)" * (N // 5),
    "open_pairs": "(1, " * (N // 4),
    "quotes": "['" + "a'" * (N // 2) + "]",
    "brackets": "[]" * (N // 2),
    "braces_colon": "{a:" * (N // 3),
    "long_box_list": "[" + "[1,2,3,4]," * (N // 10) + "]",
    "long_dict": "[{" + "'a': 1, " * (N // 8) + "}]",
}


@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_parsers_stay_fast_on_adversarial_answers(name) -> None:
    text = ADVERSARIAL[name]
    t0 = time.process_time()
    boxes, err = parse_boxes(text)
    box, err2 = parse_single_box(text)
    assert time.process_time() - t0 < 1.0  # CPU seconds; a quadratic regex takes several
    assert err is not None and err2 is not None
