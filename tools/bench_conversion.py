"""Peak memory of checkpoint conversion vs the size of the state dict it converts.

Builds a random Qwen2-VL checkpoint of a moderate size (shape from the command line), then runs
HF -> Megatron and Megatron -> HF, each in a fresh process, sampling that process's memory every few
milliseconds (psutil RSS, and anonymous RSS from /proc on Linux: RSS also counts file pages of
memory-mapped checkpoints, which the kernel can drop at will; anonymous memory cannot be dropped).
Reported per direction: peak RSS and peak anonymous RSS above the process's level just before the
conversion, next to the full state dict and the largest decoder layer.

    python tools/bench_conversion.py                            # ~1 GB float32 model
    python tools/bench_conversion.py --layers 24 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def _anon_rss() -> int:
    """Anonymous resident memory of this process in bytes (0 where /proc is unavailable)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Sampler:
    """Samples RSS and anonymous RSS in a background thread; keeps the peaks."""

    def __init__(self, interval_s: float = 0.002) -> None:
        import psutil

        self._proc = psutil.Process()
        self.interval_s = interval_s
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        self.peak_anon = max(self.peak_anon, _anon_rss())

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval_s)

    def __enter__(self) -> _Sampler:
        self.start_rss, self.start_anon = self._proc.memory_info().rss, _anon_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def _config(args):
    from transformers import Qwen2VLConfig

    head_dim = args.hidden // args.heads
    q = head_dim // 4
    text = dict(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[q, q, head_dim // 2 - 2 * q]),
    )
    vision = dict(depth=args.vision_depth, embed_dim=args.vision_dim, hidden_size=args.hidden, num_heads=4)
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False)


def _phase_make(args) -> dict:
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(_config(args)).to(getattr(torch, args.dtype))
    model.save_pretrained(args.hf_dir, max_shard_size="500MB")
    sd = model.state_dict()
    layer0 = [v for k, v in sd.items() if ".layers.0." in k]
    return {
        "state_dict_bytes": sum(v.numel() * v.element_size() for v in sd.values()),
        "num_params": sum(v.numel() for v in sd.values()),
        "layer_bytes": sum(v.numel() * v.element_size() for v in layer0),
        "largest_tensor_bytes": max(v.numel() * v.element_size() for v in sd.values()),
    }


def _phase_convert(args) -> dict:
    import megatron.core.dist_checkpointing  # noqa: F401  (imports are not conversion memory)
    import torch.distributed.checkpoint  # noqa: F401
    from transformers import Qwen2VLConfig

    from megatron_vrft.models import conversion
    from megatron_vrft.models.qwen2_vl.state_dict_adapter import hf_param_shapes

    hf_param_shapes(Qwen2VLConfig())  # first use of the HF vision tower classes

    with _Sampler() as s:
        t0 = time.perf_counter()
        if args.phase == "import":
            conversion.convert_hf_to_megatron(args.hf_dir, args.mg_dir, tp_size=args.tp, progress=False)
        else:
            conversion.convert_megatron_to_hf(args.mg_dir, args.out_dir, progress=False)
        seconds = time.perf_counter() - t0
    return {
        "seconds": seconds,
        "peak_rss_above_start": s.peak_rss - s.start_rss,
        "peak_anon_above_start": s.peak_anon - s.start_anon,
        "start_rss": s.start_rss,
    }


def _run_phase(args, phase: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--workdir", args.workdir]
    cmd += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in SHAPE_ARGS]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(out.stdout.strip().splitlines()[-1])


SHAPE_ARGS = (
    "hidden",
    "intermediate",
    "layers",
    "heads",
    "kv_heads",
    "vocab",
    "vision_depth",
    "vision_dim",
    "dtype",
    "tp",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=4096)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--vision-depth", type=int, default=4)
    p.add_argument("--vision-dim", type=int, default=256)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--tp", type=int, default=2, help="TP chunking of the Megatron checkpoint")
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--phase", default=None, help=argparse.SUPPRESS)
    p.add_argument("--workdir", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase is not None:
        args.hf_dir = os.path.join(args.workdir, "hf")
        args.mg_dir = os.path.join(args.workdir, "mg")
        args.out_dir = os.path.join(args.workdir, "hf-out")
        result = _phase_make(args) if args.phase == "make" else _phase_convert(args)
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory() as workdir:
        args.workdir = workdir
        made = _run_phase(args, "make")
        rows = {"HF -> Megatron": _run_phase(args, "import"), "Megatron -> HF": _run_phase(args, "export")}
    gib = 2**30
    print(
        f"model: {made['num_params'] / 1e6:.1f}M params, {args.dtype}; "
        f"state dict {made['state_dict_bytes'] / gib:.3f} GiB; one decoder layer {made['layer_bytes'] / gib:.3f} GiB; "
        f"largest tensor {made['largest_tensor_bytes'] / gib:.3f} GiB"
    )
    print(f"{'direction':<16}{'time s':>8}{'peak RSS +GiB':>15}{'peak anon +GiB':>16}{'anon / state dict':>19}")
    for name, r in rows.items():
        print(
            f"{name:<16}{r['seconds']:>8.1f}{r['peak_rss_above_start'] / gib:>15.3f}"
            f"{r['peak_anon_above_start'] / gib:>16.3f}"
            f"{r['peak_anon_above_start'] / made['state_dict_bytes']:>19.2f}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"model": made, "shape": {k: getattr(args, k) for k in SHAPE_ARGS}, **rows}, indent=2)
        )
    return 0


if __name__ == "__main__":  # the guard dist_checkpointing's writer processes need
    sys.exit(main())
