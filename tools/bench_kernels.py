"""Benchmark the fused kernels against their torch references (and Liger-Kernel when installed).

Kernels: ``logprob`` (per-token log-probs from logits), ``fused_linear_logprob`` (LM head + log-probs),
``box_iou`` (pairwise IoU with padding masks), ``grpo_loss``. For each kernel, implementation and
shape: median forward and forward+backward time, achieved GB/s (minimal bytes moved: each input read
once, each output written once; fwd+bwd adds the backward's reads and writes) and TFLOP/s (useful
GEMM FLOPs: 2NVH forward, 6NVH forward+backward, whatever an implementation recomputes), as
fractions of the device's copy bandwidth and bf16 matmul rate measured in the same run, and the peak
extra memory of one call.

Timing: ``torch.cuda.Event`` on GPU, ``time.perf_counter`` on CPU; median of ``--repeats`` after
``--warmup`` calls. Peak extra memory: on GPU ``torch.cuda.max_memory_allocated()`` minus the
allocation before the call; on CPU the peak of torch's CPU allocator counter ("Total Allocated")
that ``torch.profiler`` records with ``profile_memory=True``, relative to the start of the call (so
numpy buffers, e.g. the Triton interpreter's or pycocotools', are not counted).

Shapes come only from the command line (``--preset`` fills in defaults: ``gpu`` for real scale,
``cpu-small`` for a CPU run of the references). A kernel whose module is missing is skipped with a
printed notice, as is an implementation that cannot run here (Triton on CPU without ``--interpret``).

    python tools/bench_kernels.py --json bench.json                       # GPU, real scale
    python tools/bench_kernels.py --preset cpu-small --json bench.json    # CPU references
    python tools/bench_kernels.py --preset cpu-small --interpret          # + Triton interpreter
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

PRESETS = {
    "gpu": dict(
        tokens="1024,4096,16384",
        vocab=151936,
        tp=1,
        hidden=3584,
        boxes="8x100x100,64x300x300,1x1000x1000",
        grpo="64x1024,256x2048",
        repeats=20,
        warmup=5,
        dtype="bf16",
    ),
    "cpu-small": dict(
        tokens="64,256",
        vocab=8192,
        tp=1,
        hidden=256,
        boxes="4x50x60,1x1000x1000",
        grpo="16x128",
        repeats=5,
        warmup=1,
        dtype="fp32",
    ),
}
KERNELS = ("logprob", "fused_linear_logprob", "box_iou", "grpo_loss")


@dataclass
class Case:
    """One kernel at one shape: implementations and the work they do."""

    kernel: str
    shape: dict
    impls: dict[str, tuple[Callable, Callable | None]] = field(default_factory=dict)
    """name -> (forward, forward+backward or None when the op has no backward)."""
    bytes_fwd: float = 0.0
    bytes_fwd_bwd: float = 0.0
    flops_fwd: float = 0.0
    flops_fwd_bwd: float = 0.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default=None,
        help="default shapes: 'gpu' (real scale) on CUDA, 'cpu-small' otherwise",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of " + ",".join(KERNELS))
    p.add_argument("--tokens", help="comma-separated token counts N (log-prob kernels)")
    p.add_argument("--vocab", type=int, help="full vocabulary size; each rank holds ceil(vocab / tp)")
    p.add_argument("--tp", type=int, help="tensor-parallel size (sets the vocabulary shard)")
    p.add_argument("--hidden", type=int, help="hidden size H (fused linear log-prob)")
    p.add_argument("--boxes", help="comma-separated BxNxM pairwise box IoU shapes")
    p.add_argument("--grpo", help="comma-separated BxT GRPO loss shapes")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), help="logits / hidden / log-prob dtype")
    p.add_argument("--repeats", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--interpret", action="store_true", help="on CPU, also run Triton under TRITON_INTERPRET=1")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass")
    p.add_argument("--json", type=Path, help="write results here")
    args = p.parse_args(argv)
    if args.interpret:
        # Must precede every @triton.jit decoration, i.e. every megatron_vrft.ops import below.
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    preset = PRESETS[args.preset or ("gpu" if args.device == "cuda" else "cpu-small")]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _shapes(spec: str, names: tuple[str, ...]) -> list[dict]:
    out = []
    for item in spec.split(","):
        dims = [int(v) for v in item.lower().split("x")]
        if len(dims) != len(names):
            raise ValueError(f"shape {item!r} must have {len(names)} dims ({'x'.join(names)})")
        out.append(dict(zip(names, dims)))
    return out


def _import(module: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        print(f"NOTICE: {module} not importable ({err}); its kernel is skipped")
        return None


def _liger(attr: str):
    """Liger-Kernel's functional op ``attr``, or None (optional peer, imported lazily)."""
    try:
        return getattr(importlib.import_module("liger_kernel.transformers.functional"), attr)
    except (ImportError, AttributeError):
        return None


def _triton_ok(args) -> bool:
    return args.device == "cuda" or args.interpret


# ---------------------------------------------------------------------------------------------
# Cases: inputs, implementations and work per kernel and shape
# ---------------------------------------------------------------------------------------------


def _backward(fn: Callable, leaves: list) -> Callable:
    def run():
        for t in leaves:
            t.grad = None
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        (out.loss if hasattr(out, "loss") else out.sum()).backward()

    return run


def build_logprob_case(args, torch, dtype, mods, shape) -> Case:
    ops = mods["megatron_vrft.ops.logprob"]
    n, v = shape["N"], -(-args.vocab // args.tp)
    gen = torch.Generator(device=args.device).manual_seed(0)
    logits = torch.randn(n, v, device=args.device, dtype=dtype, generator=gen).requires_grad_()
    targets = torch.randint(0, v, (n,), device=args.device, generator=gen)
    fns = {
        "torch_naive": lambda: torch.log_softmax(logits.float(), -1).gather(-1, targets[:, None]).squeeze(-1),
        "reference": lambda: ops.token_logprobs_reference(logits, targets),
    }
    if _triton_ok(args):
        fns["triton"] = lambda: ops.token_logprobs(logits, targets, impl="triton")
    ce = _liger("liger_cross_entropy")
    if ce is not None and _triton_ok(args):
        # Liger's CE takes its gradient in the forward (scalar grad_output only): reduction="sum"
        # does the same per-token work as log-probs (CE = -log p(target)), summed.
        fns["liger"] = lambda: ce(logits, targets, reduction="sum")
    elt = logits.element_size()
    case = Case(
        kernel="logprob", shape={"N": n, "V": v}, bytes_fwd=n * v * elt + n * 12, bytes_fwd_bwd=3 * n * v * elt + n * 16
    )
    case.impls = {k: (f, _backward(f, [logits])) for k, f in fns.items()}
    return case


def build_fused_linear_case(args, torch, dtype, mods, shape) -> Case:
    ops = mods["megatron_vrft.ops.fused_linear_logprob"]
    n, v, h = shape["N"], -(-args.vocab // args.tp), args.hidden
    gen = torch.Generator(device=args.device).manual_seed(0)
    hidden = (torch.randn(n, h, device=args.device, generator=gen) / h**0.25).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=args.device, generator=gen) / h**0.25).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), device=args.device, generator=gen)
    fns = {
        "reference": lambda: ops.linear_token_logprobs_reference(hidden, weight, targets),
        "chunked_torch": lambda: ops.fused_linear_token_logprobs(hidden, weight, targets, impl="torch"),
    }
    if _triton_ok(args):
        fns["chunked_triton"] = lambda: ops.fused_linear_token_logprobs(hidden, weight, targets, impl="triton")
    flce = _liger("liger_fused_linear_cross_entropy")
    if flce is not None and _triton_ok(args):
        fns["liger"] = lambda: flce(hidden, weight, targets, reduction="sum")  # see logprob's note
    elt = hidden.element_size()
    case = Case(
        kernel="fused_linear_logprob",
        shape={"N": n, "V": v, "H": h},
        bytes_fwd=(n * h + v * h) * elt + n * 12,
        bytes_fwd_bwd=3 * (n * h + v * h) * elt + n * 16,
        flops_fwd=2.0 * n * v * h,
        flops_fwd_bwd=6.0 * n * v * h,
    )
    case.impls = {k: (f, _backward(f, [hidden, weight])) for k, f in fns.items()}
    return case


def build_box_iou_case(args, torch, dtype, mods, shape) -> Case:
    ops = mods["megatron_vrft.ops.box_iou"]
    b, n, m = shape["B"], shape["N"], shape["M"]
    gen = torch.Generator(device=args.device).manual_seed(0)

    def boxes(count):
        xy = torch.rand(b, count, 2, device=args.device, generator=gen) * 500
        return torch.cat([xy, xy + torch.rand(b, count, 2, device=args.device, generator=gen) * 100], -1)

    boxes1, boxes2 = boxes(n), boxes(m)
    valid2 = torch.rand(b, m, device=args.device, generator=gen) > 0.1
    fns = {"reference": lambda: ops.box_iou(boxes1, boxes2, "iou", None, valid2, impl="torch")}
    if _triton_ok(args):
        fns["triton"] = lambda: ops.box_iou(boxes1, boxes2, "iou", None, valid2, impl="triton")
    if args.device == "cuda" and "cuda" in ops.available_box_iou_impls():
        fns["cuda"] = lambda: ops.box_iou(boxes1, boxes2, "iou", None, valid2, impl="cuda")
    if args.device == "cpu":
        coco = _import("pycocotools.mask")
        if coco is not None:
            fns["pycocotools"] = _coco_fn(coco, torch, boxes1, boxes2, valid2)
    case = Case(kernel="box_iou", shape=shape, bytes_fwd=b * n * m * 4 + (b * n + b * m) * 16 + b * m)
    case.impls = {k: (f, None) for k, f in fns.items()}
    return case


def _coco_fn(coco, torch, boxes1, boxes2, valid2) -> Callable:
    """pycocotools bbox IoU (``[x, y, w, h]``, float64, one image at a time), masked like the others."""
    import numpy as np

    def xywh(t):
        t = t.double().numpy()
        return np.ascontiguousarray(np.concatenate([t[..., :2], t[..., 2:] - t[..., :2]], -1))

    def run():
        a, b = xywh(boxes1), xywh(boxes2)
        crowd = np.zeros(b.shape[1], dtype=np.uint8)
        out = np.stack([coco.iou(a[i], b[i], crowd) for i in range(a.shape[0])])
        return torch.from_numpy(out).float().masked_fill_(~valid2[:, None, :], 0.0)

    return run


def build_grpo_case(args, torch, dtype, mods, shape) -> Case:
    ops, rl = mods["megatron_vrft.ops.grpo_loss"], mods["megatron_vrft.rl.loss"]
    b, t = shape["B"], shape["T"]
    gen = torch.Generator(device=args.device).manual_seed(0)
    logp = (-torch.rand(b, t, device=args.device, generator=gen) * 3).to(dtype).requires_grad_()
    old = (logp.detach().float() + torch.randn(b, t, device=args.device, generator=gen) * 0.1).to(dtype)
    ref = (logp.detach().float() + torch.randn(b, t, device=args.device, generator=gen) * 0.1).to(dtype)
    adv = torch.randn(b, device=args.device, generator=gen)
    mask = torch.rand(b, t, device=args.device, generator=gen) > 0.2
    kw = dict(kl_coef=0.04, loss_agg_mode="token-mean")
    fns = {"reference": lambda: rl.compute_grpo_loss(logp, old, ref, adv, mask, impl="torch", **kw)}
    if _triton_ok(args):
        fns["triton"] = lambda: ops.fused_grpo_loss(logp, old, ref, adv, mask, **kw)
    elt = logp.element_size()
    fwd_bytes = b * t * (3 * elt + 1 + 4) + b * 4
    case = Case(kernel="grpo_loss", shape=shape, bytes_fwd=fwd_bytes, bytes_fwd_bwd=fwd_bytes + b * t * (4 + elt))
    case.impls = {k: (f, _backward(f, [logp])) for k, f in fns.items()}
    return case


# kernel -> (modules it needs, CLI attribute holding its shapes, dimension names, per-shape builder).
# Cases are built one shape at a time (and freed after running): real-scale inputs are GBs each.
KERNEL_TABLE = {
    "logprob": (("megatron_vrft.ops.logprob",), "tokens", ("N",), build_logprob_case),
    "fused_linear_logprob": (("megatron_vrft.ops.fused_linear_logprob",), "tokens", ("N",), build_fused_linear_case),
    "box_iou": (("megatron_vrft.ops.box_iou",), "boxes", ("B", "N", "M"), build_box_iou_case),
    "grpo_loss": (("megatron_vrft.ops.grpo_loss", "megatron_vrft.rl.loss"), "grpo", ("B", "T"), build_grpo_case),
}


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def time_fn(fn: Callable, torch, device: str, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def peak_extra_bytes(fn: Callable, torch, device: str) -> int:
    """Peak bytes allocated by one ``fn()`` call beyond what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(torch.cuda.max_memory_allocated() - base, 0)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        events = json.load(open(path))["traceEvents"]
    mem = [e["args"] for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0]
    if not mem:
        return 0
    # The counter is process-wide: the baseline is its value just before this call's first event.
    base = mem[0]["Total Allocated"] - mem[0]["Bytes"]
    return max(0, max(m["Total Allocated"] for m in mem) - base)


def measure_peaks(torch, device: str) -> dict:
    """Device copy bandwidth (read + write bytes of a large copy) and matmul rate, this run."""
    if device == "cuda":
        numel, mm, mm_dtype = 1 << 28, 8192, torch.bfloat16
    else:
        numel, mm, mm_dtype = 1 << 23, 512, torch.float32  # bf16 matmul on CPU is not representative
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = time_fn(lambda: dst.copy_(src), torch, device, 2, 10)
    a = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    b = torch.randn(mm, mm, device=device, dtype=mm_dtype)
    mm_s = time_fn(lambda: a @ b, torch, device, 2, 10)
    return {
        "copy_GBps": 2 * numel * 4 / copy_s / 1e9,
        "matmul_TFLOPs": 2 * mm**3 / mm_s / 1e12,
        "matmul_dtype": str(mm_dtype).replace("torch.", ""),
        "copy_bytes": 2 * numel * 4,
        "matmul_n": mm,
    }


def run_case(case: Case, args, torch, peaks: dict) -> list[dict]:
    rows = []
    for impl, (fwd, fwd_bwd) in case.impls.items():
        row = {"kernel": case.kernel, "shape": case.shape, "impl": impl}
        try:
            for tag, fn, nbytes, flops in (
                ("fwd", fwd, case.bytes_fwd, case.flops_fwd),
                ("fwd_bwd", fwd_bwd, case.bytes_fwd_bwd, case.flops_fwd_bwd),
            ):
                if fn is None:
                    continue
                sec = time_fn(fn, torch, args.device, args.warmup, args.repeats)
                row[f"{tag}_ms"] = sec * 1e3
                row[f"{tag}_GBps"] = nbytes / sec / 1e9
                row[f"{tag}_frac_copy_bw"] = row[f"{tag}_GBps"] / peaks["copy_GBps"]
                if flops:
                    row[f"{tag}_TFLOPs"] = flops / sec / 1e12
                    row[f"{tag}_frac_matmul"] = row[f"{tag}_TFLOPs"] / peaks["matmul_TFLOPs"]
                if not args.no_memory:
                    row[f"{tag}_peak_extra_MB"] = peak_extra_bytes(fn, torch, args.device) / 2**20
        except Exception as err:  # one implementation failing must not hide the others
            print(f"NOTICE: {case.kernel} {case.shape} impl={impl} failed: {type(err).__name__}: {err}")
            row["error"] = f"{type(err).__name__}: {err}"
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    cols = [
        "kernel",
        "shape",
        "impl",
        "fwd_ms",
        "fwd_GBps",
        "fwd_TFLOPs",
        "fwd_peak_extra_MB",
        "fwd_bwd_ms",
        "fwd_bwd_GBps",
        "fwd_bwd_TFLOPs",
        "fwd_bwd_peak_extra_MB",
    ]

    def cell(row, col):
        v = row.get(col, "")
        if col == "shape":
            return "x".join(f"{k}{d}" for k, d in v.items())
        return f"{v:.4g}" if isinstance(v, float) else str(v if "error" not in row or col == "impl" else "ERR")

    table = [cols] + [[cell(r, c) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)) for line in table)


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    peaks = measure_peaks(torch, args.device)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu ({os.cpu_count()} cores)"
    print(
        f"device: {device_name}; copy {peaks['copy_GBps']:.1f} GB/s; "
        f"{peaks['matmul_dtype']} matmul {peaks['matmul_TFLOPs']:.3f} TFLOP/s"
    )
    if args.device == "cpu" and not args.interpret:
        print("NOTICE: Triton implementations skipped on CPU (pass --interpret to run the interpreter)")
    rows, skipped = [], []
    for kernel in [k for k in args.kernels.split(",") if k]:
        if kernel not in KERNEL_TABLE:
            raise SystemExit(f"unknown kernel {kernel!r}; choose from {', '.join(KERNELS)}")
        module_names, shape_attr, dims, build = KERNEL_TABLE[kernel]
        mods = {name: _import(name) for name in module_names}
        if any(m is None for m in mods.values()):
            skipped.append(kernel)
            continue
        for shape in _shapes(getattr(args, shape_attr), dims):
            rows += run_case(build(args, torch, dtype, mods, shape), args, torch, peaks)
            if args.device == "cuda":
                torch.cuda.empty_cache()
    print(format_table(rows))
    report = {
        "device": device_name,
        "device_type": args.device,
        "peaks": peaks,
        "triton_interpret": args.interpret,
        "skipped_kernels": skipped,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "torch": torch.__version__,
        "results": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
