"""The transformers rollout engine against transformers itself: sampled-token log-probs, weight
updates checked by name, blocked tokens."""

from __future__ import annotations

import pytest
import torch

from megatron_vrft.data import build_qwen2vl_processor, build_tiny_tokenizer, load_records, preprocess_records
from megatron_vrft.models.qwen2_vl.build import preset_source
from megatron_vrft.models.qwen2_vl.presets import build_preset_hf_model
from megatron_vrft.models.qwen2_vl.state_dict_adapter import hf_hub_name
from megatron_vrft.rollout.engine import vision_token_ids
from megatron_vrft.rollout.hf_engine import HFEngine, WeightUpdateError
from megatron_vrft.rollout.types import FINISH_LENGTH, FINISH_STOP, RolloutBatch, SamplingParams


@pytest.fixture(scope="module")
def setup():
    tok = build_tiny_tokenizer()
    proc = build_qwen2vl_processor(tok, min_pixels=56 * 56, max_pixels=112 * 112)
    prompts, _ = preprocess_records(
        load_records("synthetic", "classification", num_synthetic=3, synthetic_kind="color"), proc
    )
    source = preset_source("qwen2_vl", "tiny", tok, seed=3)
    stop = tuple(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    return tok, prompts, source, stop


def engine_with(source, tok, blocked=()):
    eng = HFEngine(source.arch, tokenizer=tok, blocked_token_ids=blocked)
    eng.update_weights((hf_hub_name(n), t) for n, t in source.weights.items())
    return eng


def teacher_forced(model, prompt, response, temperature):
    ids = torch.cat([prompt.input_ids, response])[None]
    mm = torch.cat([prompt.mm_token_type_ids, torch.zeros(len(response), dtype=torch.long)])[None]
    logits = model(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        mm_token_type_ids=mm,
        pixel_values=prompt.pixel_values,
        image_grid_thw=prompt.image_grid_thw,
    ).logits[0]
    p = prompt.input_ids.numel()
    lp = torch.log_softmax(logits[p - 1 : -1].double() / temperature, -1)
    return lp.gather(-1, response[:, None])[:, 0]


def test_sampled_logprobs_equal_transformers_forward(setup):
    tok, prompts, source, stop = setup
    eng = engine_with(source, tok)
    batch = eng.generate(prompts, SamplingParams(n=3, temperature=0.7, max_new_tokens=10, stop_token_ids=stop), seed=5)
    assert len(batch) == 9 and batch.group_ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # An independent model built by the preset code with the same seed: the reference.
    ref = build_preset_hf_model("qwen2_vl", "tiny", tok, seed=3)
    worst = 0.0
    for i in range(len(batch)):
        want = teacher_forced(ref, batch.prompt_of(i), batch.response_ids[i], 0.7)
        worst = max(worst, (want - batch.sampling_logprobs[i].double()).abs().max().item())
        assert batch.finish_reasons[i] in (FINISH_STOP, FINISH_LENGTH)
        if batch.finish_reasons[i] == FINISH_STOP:
            assert int(batch.response_ids[i][-1]) in stop
    assert worst < 1e-5, worst
    again = eng.generate(prompts, SamplingParams(n=3, temperature=0.7, max_new_tokens=10, stop_token_ids=stop), seed=5)
    assert all(torch.equal(a, b) for a, b in zip(batch.response_ids, again.response_ids))  # seeded


def test_weight_update_reports_names(setup):
    tok, _, source, _ = setup
    eng = HFEngine(source.arch, tokenizer=tok)
    full = {hf_hub_name(n): t for n, t in source.weights.items()}
    missing = dict(full)
    missing.pop("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(WeightUpdateError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        eng.update_weights(missing.items())
    with pytest.raises(WeightUpdateError, match="model.layers.9.mlp.up_proj.weight"):
        eng.update_weights([*full.items(), ("model.layers.9.mlp.up_proj.weight", torch.zeros(1))])
    bad = dict(full)
    bad["model.norm.weight"] = torch.zeros(3)
    with pytest.raises(WeightUpdateError, match=r"model.norm.weight.*\(3,\)"):
        eng.update_weights(bad.items())


def test_engine_follows_a_second_update(setup):
    tok, prompts, source, stop = setup
    eng = engine_with(source, tok)
    sampling = SamplingParams(n=2, temperature=1.0, max_new_tokens=6, stop_token_ids=stop)
    first = eng.generate(prompts[:1], sampling, seed=1)
    shifted = {hf_hub_name(n): t + 0.05 * torch.randn_like(t) for n, t in source.weights.items()}
    eng.update_weights(shifted.items())
    ref = build_preset_hf_model("qwen2_vl", "tiny", tok, seed=3)
    ref.load_state_dict({n: shifted[hf_hub_name(n)] for n in ref.state_dict()}, strict=True)
    second = eng.generate(prompts[:1], sampling, seed=1)
    want = teacher_forced(ref, second.prompt_of(0), second.response_ids[0], 1.0)
    assert (want - second.sampling_logprobs[0].double()).abs().max() < 1e-5
    old = teacher_forced(
        build_preset_hf_model("qwen2_vl", "tiny", tok, seed=3), second.prompt_of(0), second.response_ids[0], 1.0
    )
    assert (old - second.sampling_logprobs[0].double()).abs().max() > 1e-3  # not the old weights
    assert first.sampling_logprobs[0].shape[0] >= 1


def test_blocked_tokens_are_never_sampled(setup):
    tok, prompts, source, stop = setup
    blocked = vision_token_ids(tok, source.arch.vocab_size)
    image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
    assert image_pad in blocked and source.arch.vocab_size - 1 in blocked
    weights = {hf_hub_name(n): t.clone() for n, t in source.weights.items()}
    weights["lm_head.weight"][image_pad] *= 0
    weights["lm_head.weight"][image_pad] += 50.0 * weights["model.norm.weight"].sign()  # image_pad dominates
    free = HFEngine(source.arch, tokenizer=tok)
    free.update_weights(weights.items())
    sampling = SamplingParams(n=4, temperature=1.0, max_new_tokens=6, stop_token_ids=stop)
    unblocked = free.generate(prompts, sampling, seed=2)
    assert any(image_pad in r.tolist() for r in unblocked.response_ids)  # the bias works
    eng = HFEngine(source.arch, tokenizer=tok, blocked_token_ids=blocked)
    eng.update_weights(weights.items())
    batch = eng.generate(prompts, sampling, seed=2)
    assert not any(set(r.tolist()) & set(blocked) for r in batch.response_ids)


def test_rollout_batch_checks_rows(setup):
    _, prompts, _, _ = setup
    with pytest.raises(ValueError, match="disagree"):
        RolloutBatch(
            prompts=prompts,
            group_ids=torch.tensor([0, 1]),
            response_ids=[torch.tensor([1])],
            sampling_logprobs=[torch.tensor([0.0])],
            finish_reasons=["stop"],
            texts=["a"],
        )
    with pytest.raises(ValueError, match="group ids outside"):
        RolloutBatch(
            prompts=prompts,
            group_ids=torch.tensor([7]),
            response_ids=[torch.tensor([1])],
            sampling_logprobs=[torch.tensor([0.0])],
            finish_reasons=["stop"],
            texts=["a"],
        )
    with pytest.raises(ValueError, match="n must be 1"):
        SamplingParams(n=2, greedy=True)
