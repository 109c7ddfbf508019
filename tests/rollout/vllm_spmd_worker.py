"""One rank of the SPMD vLLM engine check, launched by ``test_rollout_vllm_engine.py`` as
``torchrun --standalone --nproc_per_node 2 vllm_spmd_worker.py OUT_DIR`` under the vLLM venv.

In one launch, inside the trainer's own gloo world (created first, used before and after):

1. vLLM TP=2 over both ranks: both pass the same prompts and seeds; they must get identical rows,
   whose log-probs equal a transformers forward; then a perturbed update is followed.
2. The engine is closed (the trainer's world survives it); vLLM TP=1 with 2 replicas: each rank
   generates its own (uneven) share of the prompts, rows are exchanged (``RolloutRows``) and
   checked against transformers.

Writes ``OUT_DIR/rank{R}.json`` with the measured figures; the test asserts on them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# -- shared with test_rollout_vllm_engine.py (which imports this module) ---------------------------
PIXELS = 56 * 56


@dataclass
class Fixture:
    tokenizer: Any
    source: Any
    """``preset_source("qwen2_vl", "tiny", ...)``: arch + weights (transformers in-memory names)."""
    prompts: list
    """4 synthetic colour-classification prompts, 56x56 images (4 image tokens each)."""
    blocked: list[int]
    stop_token_ids: tuple[int, ...]
    pixels: int = PIXELS


def build_fixture() -> Fixture:
    """The tiny random Qwen2-VL, its tokenizer and 4 preprocessed prompts (identical on every rank)."""
    from megatron_vrft.data import build_qwen2vl_processor, build_tiny_tokenizer, load_records, preprocess_records
    from megatron_vrft.models.qwen2_vl.build import preset_source
    from megatron_vrft.rollout.engine import vision_token_ids

    tok = build_tiny_tokenizer()
    source = preset_source("qwen2_vl", "tiny", tok, seed=0)
    records = load_records("synthetic", "classification", num_synthetic=4, synthetic_kind="color")
    prompts, _ = preprocess_records(records, build_qwen2vl_processor(tok, min_pixels=PIXELS, max_pixels=PIXELS))
    return Fixture(
        tokenizer=tok,
        source=source,
        prompts=prompts,
        blocked=vision_token_ids(tok, source.arch.vocab_size),
        stop_token_ids=(tok.convert_tokens_to_ids("<|im_end|>"),),
    )


def hf_model(fx: Fixture, weights: Mapping[str, Any]):
    """A transformers Qwen2-VL with ``weights``, through the HF engine's own update path."""
    from megatron_vrft.rollout.hf_engine import HFEngine

    engine = HFEngine(fx.source.arch, tokenizer=fx.tokenizer, blocked_token_ids=fx.blocked)
    engine.update_weights(weights.items())
    return engine.model


def teacher_forced_logprobs(model, batch, blocked: Sequence[int], temperature: float) -> list:
    """Per row: log-softmax((logits / T) with blocked tokens at -inf) of the row's tokens, from one
    transformers forward over prompt + response (the distribution the engine samples from)."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(len(batch)):
            p, r = batch.prompt_of(i), batch.response_ids[i]
            ids = torch.cat([p.input_ids, r])[None]
            mm = torch.cat([p.mm_token_type_ids, torch.zeros(len(r), dtype=p.mm_token_type_ids.dtype)])[None]
            logits = model(
                input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm,
                pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
            ).logits[0, len(p.input_ids) - 1 : -1].float() / temperature  # fmt: skip
            logits[:, list(blocked)] = float("-inf")
            out.append(torch.log_softmax(logits, -1).gather(-1, r[:, None])[:, 0])
    return out


def max_logprob_diff(model, batch, blocked: Sequence[int], temperature: float) -> float:
    ref = teacher_forced_logprobs(model, batch, blocked, temperature)
    return max(float((a - b).abs().max()) for a, b in zip(ref, batch.sampling_logprobs))


def perturbed_weights(weights: Mapping[str, Any], *, seed: int, scale: float = 0.05) -> dict:
    """``weights`` + N(0, scale^2) noise, under HF hub names (the first update used in-memory ones)."""
    import torch

    from megatron_vrft.models.qwen2_vl.state_dict_adapter import hf_hub_name

    g = torch.Generator().manual_seed(seed)
    return {hf_hub_name(k): v + scale * torch.randn(v.shape, generator=g) for k, v in weights.items()}


def main(out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer_group = dist.new_group(list(range(world)), backend="gloo")

    from megatron_vrft.rollout.types import RolloutBatch, SamplingParams
    from megatron_vrft.rollout.vllm_engine import VLLMEngine

    fx = build_fixture()
    sampling = SamplingParams(n=3, temperature=0.7, max_new_tokens=8, stop_token_ids=fx.stop_token_ids)
    seed = 100
    new = perturbed_weights(fx.source.weights, seed=1)
    ref_old, ref_new = hf_model(fx, fx.source.weights), hf_model(fx, new)
    result: dict = {"rank": rank}

    def trainer_allreduce() -> float:
        t = torch.ones(1)
        dist.all_reduce(t, group=trainer_group)
        return float(t)

    result["allreduce_before"] = trainer_allreduce()

    # -- 1. TP = 2 -------------------------------------------------------------------------------
    t0 = time.time()
    engine = VLLMEngine(
        fx.source.arch,
        tokenizer=fx.tokenizer,
        blocked_token_ids=fx.blocked,
        tensor_parallel_size=2,
        min_pixels=fx.pixels,
        max_pixels=fx.pixels,
    )
    result["tp2_layout"] = [engine.num_replicas, engine.replica_index, engine.tp_rank]
    engine.update_weights(fx.source.weights.items())
    batch = engine.generate(fx.prompts, sampling, seed=seed)
    result["tp2_diff"] = max_logprob_diff(ref_old, batch, fx.blocked, sampling.temperature)
    rows = [None] * world
    dist.all_gather_object(rows, [r.tolist() for r in batch.response_ids], group=trainer_group)
    result["tp2_ranks_identical"] = rows[0] == rows[1]
    result["tp2_rows"] = len(batch)
    engine.update_weights(new.items())
    batch = engine.generate(fx.prompts, sampling, seed=seed)
    result["tp2_diff_after_update"] = max_logprob_diff(ref_new, batch, fx.blocked, sampling.temperature)
    result["tp2_diff_to_old_weights"] = max_logprob_diff(ref_old, batch, fx.blocked, sampling.temperature)
    engine.close()
    result["tp2_seconds"] = time.time() - t0
    result["allreduce_between"] = trainer_allreduce()

    # -- 2. TP = 1, two replicas ------------------------------------------------------------------
    t0 = time.time()
    engine = VLLMEngine(
        fx.source.arch,
        tokenizer=fx.tokenizer,
        blocked_token_ids=fx.blocked,
        tensor_parallel_size=1,
        min_pixels=fx.pixels,
        max_pixels=fx.pixels,
    )
    result["dp_layout"] = [engine.num_replicas, engine.replica_index, engine.tp_rank]
    engine.update_weights(fx.source.weights.items())
    # uneven split (3 + 1 prompts): replicas run independently, neither waits for the other
    mine = [0, 1, 2] if engine.replica_index == 0 else [3]
    local = engine.generate([fx.prompts[g] for g in mine], sampling, seed=seed + 1 + engine.replica_index)
    result["dp_local_diff"] = max_logprob_diff(ref_old, local, fx.blocked, sampling.temperature)
    # exchange rows; group ids re-indexed into the global prompt list
    local_rows = local.rows()
    local_rows.group_ids = torch.tensor([mine[int(g)] for g in local_rows.group_ids], dtype=torch.long)
    parts = [None] * world
    dist.all_gather_object(parts, local_rows, group=trainer_group)
    full = RolloutBatch.from_rows(list(fx.prompts), parts)
    result["dp_rows"] = len(full)
    result["dp_groups_covered"] = sorted(set(full.group_ids.tolist()))
    result["dp_full_diff"] = max_logprob_diff(ref_old, full, fx.blocked, sampling.temperature)
    engine.close()
    result["dp_seconds"] = time.time() - t0
    result["allreduce_after"] = trainer_allreduce()

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier(group=trainer_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
