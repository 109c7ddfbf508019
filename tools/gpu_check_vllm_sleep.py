"""Check the vLLM engine's sleep mode on a GPU host: memory is freed, and log-probs after waking
equal those before sleeping (level 1: weights kept in CPU memory; level 2: weights dropped and
sent again).

CANNOT RUN on the CPU development/CI machines: vLLM's CPU backend rejects sleep mode
(``enable_sleep_mode`` "not supported on current platform"), so there the engine's ``sleep`` /
``wake_up`` are no-ops (tested by ``tests/rollout/test_rollout_vllm_engine.py``). Needs a CUDA GPU
with vLLM >= 0.32 (the official wheel) and this package installed::

    python3 tools/gpu_check_vllm_sleep.py                    # tiny preset, float32
    python3 tools/gpu_check_vllm_sleep.py --preset small --dtype bfloat16 --tol 2e-2

The sequence is the colocated trainer's: generate -> sleep(1) -> wake_up(["weights"]) ->
update_weights -> wake_up(["kv_cache"]) -> generate, then the same with sleep(2), where skipping
the update must be refused. Device memory in use is read with ``torch.cuda.mem_get_info`` (vLLM's
sleep allocator is outside torch's caching allocator). Exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import time


def used_gib() -> float:
    import torch

    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="tiny", choices=["tiny", "small"])
    parser.add_argument("--family", default="qwen2_vl", choices=["qwen2_vl", "qwen2_5_vl"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--kv-cache-gib", type=float, default=2.0)
    parser.add_argument("--tol", type=float, default=1e-4, help="max |log-prob difference| after waking")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("needs a CUDA GPU: vLLM's sleep mode is GPU only (on a CPU the engine's sleep is a no-op)")
        return 2

    from megatron_vrft.data import (
        build_qwen2vl_processor,
        build_tiny_tokenizer,
        load_records,
        preprocess_records,
        stop_token_ids,
    )
    from megatron_vrft.models.qwen2_vl.build import preset_source
    from megatron_vrft.rollout.engine import vision_token_ids
    from megatron_vrft.rollout.types import SamplingParams
    from megatron_vrft.rollout.vllm_engine import VLLMEngine

    pixels = 56 * 56
    tok = build_tiny_tokenizer()
    source = preset_source(args.family, args.preset, tok, seed=0)
    records = load_records("synthetic", "classification", num_synthetic=8, synthetic_kind="color")
    prompts, _ = preprocess_records(records, build_qwen2vl_processor(tok, min_pixels=pixels, max_pixels=pixels))
    sampling = SamplingParams(n=4, temperature=0.7, max_new_tokens=16, stop_token_ids=stop_token_ids(tok))
    seed = 0

    baseline = used_gib()
    engine = VLLMEngine(
        source.arch,
        tokenizer=tok,
        blocked_token_ids=vision_token_ids(tok, source.arch.vocab_size),
        dtype=getattr(torch, args.dtype),
        enable_sleep=True,
        kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        min_pixels=pixels,
        max_pixels=pixels,
    )
    engine.update_weights(source.weights.items())
    before = engine.generate(prompts, sampling, seed=seed)
    print(f"engine up: {used_gib() - baseline:.2f} GiB in use beyond the {baseline:.2f} GiB before it")

    def compare(batch, label: str) -> bool:
        same_tokens = all(torch.equal(a, b) for a, b in zip(before.response_ids, batch.response_ids))
        pairs = zip(before.sampling_logprobs, batch.sampling_logprobs)
        diff = max(float((a - b).abs().max()) for a, b in pairs) if same_tokens else float("inf")
        ok = same_tokens and diff <= args.tol
        print(f"{label}: same tokens {same_tokens}, max |log-prob diff| {diff:.3g} -> {'OK' if ok else 'MISMATCH'}")
        return ok

    ok = True
    for level in (1, 2):
        awake = used_gib()
        t0 = time.perf_counter()
        engine.sleep(level)
        asleep = used_gib()
        seconds = time.perf_counter() - t0
        print(f"sleep({level}): freed {awake - asleep:.2f} GiB ({awake:.2f} -> {asleep:.2f}) in {seconds:.2f} s")
        engine.wake_up(["weights"])
        if level == 2:
            try:
                engine.wake_up(["kv_cache"])
                engine.generate(prompts[:1], sampling, seed=0)
                print("sleep(2): generate without re-sending the weights was NOT refused -> FAIL")
                ok = False
            except RuntimeError as exc:
                print(f"sleep(2): generate without re-sending the weights refused: {exc}")
        t0 = time.perf_counter()
        engine.update_weights(source.weights.items())  # level 1: same weights again (the trainer's step)
        engine.wake_up(["kv_cache"])
        print(f"wake_up + update_weights: {time.perf_counter() - t0:.2f} s, {used_gib():.2f} GiB in use")
        ok &= compare(engine.generate(prompts, sampling, seed=seed), f"after sleep({level})")
    engine.close()
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
