"""Check that a rollout engine samples from the trainer's policy: export, generate, compare.

    python tools/verify_rollout.py --engine {hf,vllm} [--checkpoint HF_DIR] [--tp N --pp N] [--json OUT]

Launches its own ranks (TP x PP, torchrun) unless started under torchrun. On every rank: build the
trainer's sharded policy (the tiny preset, or ``--checkpoint``), stream its weights into the engine
through the weight export (buckets of ``--bucket-mb``), sample ``--samples`` responses per prompt at
``--temperature``, recompute the sampled tokens' log-probs with the trainer
(megatron-core forward, vocab-parallel log-softmax at the same temperature over the same allowed
vocabulary: image/vision tokens and padded rows blocked, as in training) and compare; then
perturb the trainer's weights, update the engine again, and compare again (the engine must follow).

Prints the maximum |engine - trainer| log-prob difference of both rounds, the export's bytes/s next
to a plain copy of the same bytes on the same device, and the export's peak extra memory; exits 1
when a difference exceeds ``--tolerance``. Run it on GPU hosts after upgrading vLLM or the model.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("hf", "vllm"), default="hf")
    p.add_argument("--checkpoint", help="HF checkpoint directory (default: the tiny random preset)")
    p.add_argument("--tp", type=int, default=2, help="trainer tensor-parallel size")
    p.add_argument("--pp", type=int, default=2, help="trainer pipeline-parallel size")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--samples", type=int, default=4, help="responses per prompt")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--bucket-mb", type=float, default=0.25, help="weight-export bucket size (MiB)")
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--json", help="write the figures to this file (rank 0)")
    return p.parse_args(argv)


def launch(args) -> int:
    """Re-run this script under torchrun with TP x PP ranks."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(args.tp * args.pp),
        "--master_port",
        os.environ.get("MASTER_PORT", "29517"),
        os.path.abspath(__file__),
        *sys.argv[1:],
    ]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    return subprocess.call(cmd, env=env)


def peak_memory_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run(args) -> int:
    import torch
    import torch.distributed as dist

    from megatron_vrft import builders
    from megatron_vrft.config import load_config
    from megatron_vrft.distributed.parallel_state import ParallelLayout, init_distributed, initialize_model_parallel
    from megatron_vrft.models.qwen2_vl.build import build_policy, load_hf_source, preset_source
    from megatron_vrft.models.qwen2_vl.state_dict_adapter import hf_in_memory_name
    from megatron_vrft.rollout.engine import vision_token_ids
    from megatron_vrft.rollout.weight_export import export_hf_weights
    from megatron_vrft.trainer.actor import forward_logprobs
    from megatron_vrft.trainer.batching import build_micro_batches

    init_distributed("auto")
    device = builders.default_device()
    layout = ParallelLayout(tensor_parallel_size=args.tp, pipeline_parallel_size=args.pp)
    groups = initialize_model_parallel(layout, seed=0)
    # the run this check stands for: the colour task's prompts, the engine and sampling as a run builds them
    cfg = load_config(
        None,
        [
            "model.family=qwen2_vl",
            f"model.hf_path={args.checkpoint or 'null'}",
            "data.source=synthetic",
            "data.task=classification",
            "data.synthetic_kind=color",
            f"data.num_synthetic={args.prompts}",
            f"data.min_pixels={56 * 56}",
            f"data.max_pixels={112 * 112}",
            f"rollout.engine={args.engine}",
            f"rollout.num_generations={args.samples}",
            f"rollout.temperature={args.temperature}",
            f"rollout.max_new_tokens={args.max_new_tokens}",
        ],
    )
    tokenizer = builders.build_tokenizer(cfg.model)
    prompts = builders.build_examples(
        cfg.data, builders.build_processor(tokenizer, cfg.data), builders.build_records(cfg.data)
    )
    source = (
        preset_source("qwen2_vl", "tiny", tokenizer, seed=0)
        if args.checkpoint is None
        else load_hf_source(args.checkpoint)
    )
    chunks = build_policy(source, layout, groups, params_dtype=torch.float32)
    arch = chunks[0].arch
    engine = builders.build_engine(
        builders.resolve_engine(cfg.rollout),
        cfg.rollout,
        cfg.data,
        arch,
        tokenizer,
        device=device,
        dtype=torch.float32,
        seed=0,
    )
    sampling = builders.build_sampling(cfg.rollout, tokenizer)
    bucket_bytes = int(args.bucket_mb * 2**20)
    figures = {"engine": args.engine, "tp": args.tp, "pp": args.pp, "temperature": args.temperature}

    def sync(tag: str) -> None:
        dist.barrier()
        before = peak_memory_bytes(device)
        start = time.perf_counter()
        nbytes, largest = 0, 0

        mismatched: list[str] = []

        def stream():
            nonlocal nbytes, largest
            for bucket in export_hf_weights(chunks, arch, groups, bucket_bytes=bucket_bytes):
                size = sum(t.numel() * t.element_size() for _, t in bucket)
                nbytes, largest = nbytes + size, max(largest, size)
                if tag == "first" and args.checkpoint is None:
                    # The preset's HF tensors went in through the adapter: they must come back bit-exact.
                    mismatched.extend(n for n, t in bucket if not torch.equal(t, source.weights[hf_in_memory_name(n)]))
                yield from bucket

        engine.update_weights(stream())
        seconds = time.perf_counter() - start
        if tag == "first" and args.checkpoint is None:
            figures["export_bit_exact"] = not mismatched
            figures["export_mismatched"] = mismatched[:8]
        figures[f"{tag}_export_bytes"] = nbytes
        figures[f"{tag}_export_bytes_per_s"] = nbytes / seconds
        figures[f"{tag}_export_largest_bucket_bytes"] = largest
        figures[f"{tag}_export_peak_growth_bytes"] = peak_memory_bytes(device) - before
        # Baseline: a plain copy of the same number of bytes on the same device.
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        start = time.perf_counter()
        dst.copy_(src)
        if device.type == "cuda":
            torch.cuda.synchronize()
        figures[f"{tag}_plain_copy_bytes_per_s"] = nbytes / max(time.perf_counter() - start, 1e-9)

    def compare(tag: str) -> float:
        batch = engine.generate(prompts, sampling, seed=1234)
        mbs = build_micro_batches(
            arch,
            [batch.prompt_of(i) for i in range(len(batch))],
            batch.response_ids,
            micro_batch_tokens=4096,
            pad_token_id=sampling.stop_token_ids[0],
            sampling_logprobs=batch.sampling_logprobs,
        )
        trainer = forward_logprobs(
            chunks,
            mbs,
            groups=groups,
            temperature=args.temperature,
            blocked_token_ids=vision_token_ids(tokenizer, arch.vocab_size),
        )  # as in training
        worst = torch.zeros((), dtype=torch.float64)
        if trainer is not None:
            for mb, lp in zip(mbs, trainer):
                diff = ((lp.double() - mb.sampling_logprobs.double()) * mb.response_mask).abs().max()
                worst = torch.maximum(worst, diff)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        figures[f"{tag}_max_abs_logprob_diff"] = float(worst)
        figures[f"{tag}_sampled_tokens"] = int(sum(len(r) for r in batch.response_ids))
        figures[f"{tag}_first_response"] = batch.texts[0]
        return float(worst)

    sync("first")
    first = compare("first")
    # Different weights: the engine must follow them. The generator is seeded by the parameter's
    # name, so TP-replicated tensors (vision tower, norms) get the same perturbation on every rank.
    with torch.no_grad():
        for chunk in chunks:
            for name, p in chunk.named_parameters():
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                p.add_(0.05 * torch.randn(p.shape, generator=g).to(p.device))
    sync("second")
    second = compare("second")
    ok = max(first, second) <= args.tolerance and figures.get("export_bit_exact", True)
    figures["ok"] = ok
    if dist.get_rank() == 0:
        print(json.dumps(figures, indent=1))
        print(
            f"max |engine - trainer| log-prob: first update {first:.3g}, second update {second:.3g} "
            f"(tolerance {args.tolerance:g}): {'OK' if ok else 'FAILED'}"
        )
        print(
            f"export: {figures['first_export_bytes_per_s'] / 1e6:.1f} MB/s vs plain copy "
            f"{figures['first_plain_copy_bytes_per_s'] / 1e6:.1f} MB/s; largest bucket "
            f"{figures['first_export_largest_bucket_bytes'] / 2**20:.2f} MiB"
        )
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0 if ok else 1


def main(argv=None) -> int:
    args = parse_args(argv)
    if "RANK" not in os.environ:
        return launch(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
