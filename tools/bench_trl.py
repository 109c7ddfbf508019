"""Side-by-side GRPO benchmark on CPU: this project's trainer vs TRL's ``GRPOTrainer``.

Both runs train the same tiny random Qwen2-VL (``build_preset_hf_model("qwen2_vl", "tiny", ...)``
with the same seed, so the same initial weights) on the same synthetic colour task (56 x 56 images,
``min_pixels = max_pixels = 3136``: 4 image tokens, the same prompt text and chat template), with
the same group size, prompts per step, generation length, temperature, KL coefficient, optimiser
and rewards (``megatron_vrft.rewards.compute_rewards`` format + accuracy, wrapped as TRL reward
functions). Each run is its own subprocess with one torch thread (``OMP_NUM_THREADS=1``,
``torch.set_num_threads(1)``):

- ``ours``: ``tools/train.py --config examples/configs/tiny_cpu.yaml`` in one process (TP = 1, no
  SFT warm-up, the transformers rollout engine) with overrides; step times are the trainer's own
  ``time/step`` from ``metrics.jsonl`` (data, weight sync, rollout, rewards, reference log-probs,
  update).
- ``trl``: ``trl.GRPOTrainer`` on the same model saved to a temporary folder (with ``beta > 0`` TRL
  loads its reference model from ``config._name_or_path``); a step is the wall time between two
  ``on_step_end`` callbacks (the first from ``on_train_begin``): data, generation, rewards,
  reference log-probs, update and TRL's logging.

Per run: the median step time over the steps after the first ``--skip`` (default 2), the mean, and
the peak RSS of the process (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, reported by the child
at its end; it includes imports, data and, for ``ours``, the final checkpoint, HF export and
held-out evaluation), plus the largest RSS seen at the end of a step. TRL's defaults that differ
from this project's are aligned to ours and listed in the output.

TRL is not a dependency of this project. Install it for the benchmark only, keeping the CPU torch
build and the project's transformers::

    pip install "trl==1.16.0" -c constraints/cpu.txt

Usage::

    python3 tools/bench_trl.py                                   # 8 steps, 32 prompts x 8 completions
    python3 tools/bench_trl.py --steps 2 --prompts-per-step 8 --num-synthetic 64   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
REWARD_TERMS = [("format", 1.0), ("accuracy", 1.0)]

# TRL 1.16 GRPOConfig defaults that differ from this project's, set to ours (name: (TRL default, ours)).
ALIGNED = {
    "loss_type": ("'dapo' (token mean over the batch)", "'dapo' = algorithm.loss_agg_mode token-mean"),
    "scale_rewards": ("'group'", "'group' = algorithm.advantage_estimator grpo: (r - mean) / (std + eps)"),
    "beta": ("0.0", "0.04 = algorithm.kl_coef (k3 estimator in both)"),
    "use_bias_correction_kl": ("True", "False = algorithm.kl_importance_weighted false"),
    "epsilon": ("0.2", "0.2 = algorithm.clip_eps_low/high"),
    "num_iterations": ("1", "1 = algorithm.ppo_epochs"),
    "gradient_checkpointing": ("True", "False (our trainer does not recompute activations)"),
    "learning_rate": ("1e-6", "optimizer.lr"),
    "adam_beta2": ("0.999", "0.99 = optimizer.betas[1]"),
    "max_grad_norm": ("1.0", "1.0 = optimizer.grad_clip"),
    "lr_scheduler_type": ("'linear' (decay to 0)", "'constant_with_warmup' = our constant schedule after warm-up"),
    "warmup_steps": ("0", "20 = optimizer.warmup_steps"),
    "max_completion_length": ("512", "rollout.max_new_tokens"),
    "temperature/top_p/top_k": ("1.0/1.0/0", "1.0/1.0/off = rollout.temperature/top_p/top_k"),
    "generation_kwargs": (
        "None",
        "suppress_tokens = the vision special tokens our engine blocks; "
        "eos_token_id = our stop ids (<|im_end|>, <|endoftext|>)",
    ),
    "per_device_train_batch_size": ("8", "prompts_per_step x num_generations (one optimiser step per rollout)"),
    "use_cpu/bf16": ("False/None", "True/False (float32 like model.dtype)"),
}
NOT_ALIGNED = [
    "Ours set to TRL's layout: rollout.prompts_per_call = prompts_per_step (tiny_cpu.yaml uses 8), so "
    "each step makes one generate call over all prompts, as TRL does.",
    "KL clamp: ours clamps the per-token log-ratio at algorithm.kl_clamp = 10 in the k3 estimate; "
    "TRL has no clamp (no effect on time or memory).",
    "Micro-batching: ours packs trainer.micro_batch_tokens = 8192 tokens per micro-batch; TRL runs "
    "the whole batch of completions in one forward/backward.",
    "Prompt order: ours draws prompts with its seeded PromptBatcher, TRL with its shuffled sampler "
    "(same data, different order).",
]


# -- shared set-up ---------------------------------------------------------------------------------


def _pin_threads() -> None:
    import torch

    torch.set_num_threads(1)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


class RssSampler:
    """Samples this process's RSS every ``interval`` s in a thread; the maximum per phase label."""

    def __init__(self, interval: float = 0.01):
        import threading

        import psutil

        self._proc, self.phase, self.peaks = psutil.Process(), "setup", {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            rss = self._proc.memory_info().rss / 2**20
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss)
            self._stop.wait(interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {k: round(v, 1) for k, v in self.peaks.items()}


def _summary(times: list[float], skip: int) -> dict:
    kept = times[skip:] if len(times) > skip else times
    return {
        "step_times_s": times,
        "median_step_s": statistics.median(kept) if kept else float("nan"),
        "mean_step_s": statistics.fmean(kept) if kept else float("nan"),
        "steps_timed": len(kept),
    }


# -- children --------------------------------------------------------------------------------------


def child_ours(args, out_json: Path, work: Path) -> None:
    import importlib.util

    import torch

    _pin_threads()
    sampler = RssSampler()
    from megatron_vrft.trainer import loop

    grpo_step = loop.grpo_step

    def timed_grpo_step(*a, **k):
        sampler.phase = "steps"
        try:
            return grpo_step(*a, **k)
        finally:
            sampler.phase = "after_steps"  # checkpoint, HF export, evaluation (or the next step)

    loop.grpo_step = timed_grpo_step
    # tools/train.py sets cpu_count // LOCAL_WORLD_SIZE threads; keep this benchmark at one.
    torch.set_num_threads = lambda n: None  # noqa: E731
    spec = importlib.util.spec_from_file_location("_vrft_train", ROOT / "tools" / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out_dir = work / "ours"
    overrides = [
        "parallel.tensor_parallel_size=1", "trainer.sft_warmup_steps=0", f"trainer.num_steps={args.steps}",
        f"trainer.seed={args.seed}", f"trainer.output_dir={out_dir}", "trainer.save_interval=0", "trainer.resume=false",
        f"data.prompts_per_step={args.prompts_per_step}", f"data.num_synthetic={args.num_synthetic}",
        f"data.seed={args.data_seed}", "data.min_pixels=3136", "data.max_pixels=3136",
        "rollout.engine=hf", f"rollout.num_generations={args.num_generations}",
        f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.temperature={args.temperature}",
        f"rollout.prompts_per_call={args.prompts_per_step}",
        f"algorithm.kl_coef={args.beta}", f"optimizer.lr={args.lr}", "model.dtype=float32",
        "logging.tensorboard=false", "logging.plots=false", "logging.progress_bar=false",
    ]  # fmt: skip
    rc = train.main(["--config", str(CONFIG), *overrides])
    phase_peaks = sampler.stop()
    if rc:
        raise SystemExit(f"tools/train.py exited with {rc}")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows if r.get("phase") == "grpo" and "time/step" in r]
    times = [float(r["time/step"]) for r in steps]
    result = {
        "name": "ours",
        "command": "tools/train.py --config examples/configs/tiny_cpu.yaml " + " ".join(overrides),
        **_summary(times, args.skip),
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_by_phase_mb": phase_peaks,
        "max_step_rss_mb": max((float(r.get("memory/rss_mb", 0.0)) for r in steps), default=float("nan")),
        "phase_median_s": {
            k.split("/", 1)[1]: statistics.median(float(r[k]) for r in steps[args.skip :] or steps)
            for k in steps[0]
            if k.startswith("time/") and k != "time/step" and all(k in r for r in steps)
        }
        if steps
        else {},
        "reward_total_mean": statistics.fmean(float(r.get("reward/total", 0.0)) for r in steps) if steps else None,
        "torch_threads": torch.get_num_threads(),
    }
    out_json.write_text(json.dumps(result, indent=2))


def _save_model(folder: Path, seed: int):
    from megatron_vrft.data import build_tiny_tokenizer
    from megatron_vrft.models.qwen2_vl.presets import build_preset_hf_model

    tokenizer = build_tiny_tokenizer()
    model = build_preset_hf_model("qwen2_vl", "tiny", tokenizer, seed=seed)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return tokenizer, model.config


def child_trl(args, out_json: Path, work: Path) -> None:
    import torch

    _pin_threads()
    sampler = RssSampler()
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_vrft.data import build_qwen2vl_processor, load_records, preprocess_records, stop_token_ids
    from megatron_vrft.rewards import compute_rewards
    from megatron_vrft.rollout.engine import vision_token_ids

    model_dir = work / "trl_model"
    tokenizer, config = _save_model(model_dir, args.seed)
    processor = build_qwen2vl_processor(tokenizer, min_pixels=3136, max_pixels=3136)
    records = list(
        load_records(
            "synthetic", "classification", num_synthetic=args.num_synthetic, synthetic_kind="color", seed=args.data_seed
        )
    )
    examples, _ = preprocess_records(records, processor)
    by_id = {e.source_id: e for e in examples}
    records = [r for r in records if r.source_id in by_id]
    ground_truths = [by_id[r.source_id].ground_truth for r in records]
    dataset = Dataset.from_dict(
        {
            "prompt": [
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r.problem}]}] for r in records
            ],
            "image": [by_id[r.source_id].images[0] for r in records],
            "gt_index": list(range(len(records))),
        }
    )

    def _text(c) -> str:
        return c if isinstance(c, str) else "".join(m["content"] for m in c if m.get("role") == "assistant")

    def make_reward(name: str):
        def reward(prompts, completions, gt_index, **kwargs):
            out = compute_rewards([_text(c) for c in completions], [ground_truths[i] for i in gt_index], [(name, 1.0)])
            return [float(v) for v in out.total]

        reward.__name__ = name
        return reward

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.rss, self.t = [], [], None

        def on_train_begin(self, *a, **k):
            sampler.phase = "steps"
            self.t = time.perf_counter()

        def on_train_end(self, *a, **k):
            sampler.phase = "after_steps"

        def on_step_end(self, *a, **k):
            now = time.perf_counter()
            self.times.append(now - self.t)
            self.rss.append(_rss_mb())
            self.t = now

    stop_ids = list(stop_token_ids(tokenizer))
    blocked = vision_token_ids(
        tokenizer, config.text_config.vocab_size if hasattr(config, "text_config") else config.vocab_size
    )
    cfg = GRPOConfig(
        output_dir=str(work / "trl_out"), max_steps=args.steps, seed=args.seed, data_seed=args.data_seed,
        per_device_train_batch_size=args.prompts_per_step * args.num_generations, gradient_accumulation_steps=1,
        num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
        temperature=args.temperature, top_p=1.0, top_k=0,
        generation_kwargs={"suppress_tokens": blocked, "eos_token_id": stop_ids},
        beta=args.beta, epsilon=0.2, num_iterations=1, loss_type="dapo", scale_rewards="group",
        use_bias_correction_kl=False, gradient_checkpointing=False,
        learning_rate=args.lr, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant_with_warmup", warmup_steps=20,
        use_cpu=True, bf16=False, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
        dataloader_num_workers=0,
    )  # fmt: skip
    timer = StepTimer()
    trainer = GRPOTrainer(
        model=str(model_dir),
        reward_funcs=[make_reward(n) for n, _ in REWARD_TERMS],
        args=cfg,
        train_dataset=dataset,
        processing_class=processor,
        callbacks=[timer],
    )
    trainer.train()
    phase_peaks = sampler.stop()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    import trl

    result = {
        "name": "trl",
        "trl_version": trl.__version__,
        **_summary(timer.times, args.skip),
        "peak_rss_mb": _peak_rss_mb(),
        "peak_rss_by_phase_mb": phase_peaks,
        "max_step_rss_mb": max(timer.rss, default=float("nan")),
        "reward_total_mean": statistics.fmean(rewards) if rewards else None,
        "torch_threads": torch.get_num_threads(),
    }
    out_json.write_text(json.dumps(result, indent=2))


# -- parent ----------------------------------------------------------------------------------------


def run_child(which: str, args, work: Path) -> dict:
    out_json = work / f"{which}.json"
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_child",
        which,
        "--_work",
        str(work),
        "--steps",
        str(args.steps),
        "--skip",
        str(args.skip),
        "--prompts-per-step",
        str(args.prompts_per_step),
        "--num-generations",
        str(args.num_generations),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--num-synthetic",
        str(args.num_synthetic),
        "--temperature",
        str(args.temperature),
        "--beta",
        str(args.beta),
        "--lr",
        str(args.lr),
        "--seed",
        str(args.seed),
        "--data-seed",
        str(args.data_seed),
    ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
    }
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=str(ROOT), capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode or not out_json.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the {which} run failed (exit {proc.returncode})")
    result = json.loads(out_json.read_text())
    result["process_wall_s"] = wall
    return result


def format_table(results: list[dict]) -> str:
    head = (
        "| run | steps timed | median step s | mean step s | peak RSS MiB (ru_maxrss) | "
        "peak RSS MiB: set-up / steps / after | process wall s |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]
    for r in results:
        ph = r.get("peak_rss_by_phase_mb", {})
        by_phase = " / ".join(f"{ph[k]:.0f}" if k in ph else "-" for k in ("setup", "steps", "after_steps"))
        lines.append(
            f"| {r['name']} | {r['steps_timed']} | {r['median_step_s']:.3f} | {r['mean_step_s']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {by_phase} | {r['process_wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8, help="GRPO steps per run")
    p.add_argument("--skip", type=int, default=2, help="first steps left out of the step-time statistics")
    p.add_argument("--prompts-per-step", type=int, default=32, help="tiny_cpu.yaml: 32")
    p.add_argument("--num-generations", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--num-synthetic", type=int, default=256, help="synthetic records (ours also evaluates as many)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=1234, help="model init and sampling seed")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--runs", default="ours,trl", help="comma-separated: ours, trl")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--_child", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--_work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.num_generations < 2 or args.prompts_per_step < 1 or args.steps < 1:
        p.error("need --num-generations >= 2, --prompts-per-step >= 1, --steps >= 1")
    if args._child:
        work = Path(args._work)
        out = work / f"{args._child}.json"
        (child_ours if args._child == "ours" else child_trl)(args, out, work)
        return 0

    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if "trl" in runs:
        import importlib.util

        if importlib.util.find_spec("trl") is None:
            print(
                "error: trl is not installed; for this benchmark only: "
                'pip install "trl==1.16.0" -c constraints/cpu.txt',
                file=sys.stderr,
            )
            return 2
    settings = {
        k: getattr(args, k)
        for k in (
            "steps",
            "skip",
            "prompts_per_step",
            "num_generations",
            "max_new_tokens",
            "num_synthetic",
            "temperature",
            "beta",
            "lr",
            "seed",
            "data_seed",
        )
    }
    print(
        "settings (both runs): "
        + ", ".join(f"{k}={v}" for k, v in settings.items())
        + "; model qwen2_vl 'tiny' float32; synthetic colour task, 56x56, min_pixels=max_pixels=3136; "
        "rewards format + accuracy (weights 1, 1); 1 torch thread per run"
    )
    if "trl" in runs:
        print("TRL settings aligned to ours (TRL default -> value used):")
        for k, (default, ours) in ALIGNED.items():
            print(f"  {k}: {default} -> {ours}")
        print("not aligned:")
        for line in NOT_ALIGNED:
            print(f"  - {line}")
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        for which in runs:
            print(f"running {which} ...", flush=True)
            results.append(run_child(which, args, Path(tmp)))
    load = os.getloadavg()
    print()
    print(format_table(results))
    print(
        f"load average (1/5/15 min) at the end: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} on {os.cpu_count()} cores"
    )
    by = {r["name"]: r for r in results}
    verdict = None
    if {"ours", "trl"} <= set(by):
        o, t = by["ours"], by["trl"]
        speed = t["median_step_s"] / o["median_step_s"]
        mem = o["peak_rss_mb"] / t["peak_rss_mb"]
        met = speed > 1.0 and mem <= 1.0
        verdict = {"trl_over_ours_step_time": speed, "ours_over_trl_peak_rss": mem, "target_met": met}
        print(
            f"ours vs TRL: step time {speed:.2f}x {'faster' if speed > 1 else 'slower'} (TRL median / ours), "
            f"peak RSS {mem:.2f}x of TRL's; target (faster at no more memory): {'met' if met else 'NOT met'}"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "settings": settings,
                    "aligned": ALIGNED,
                    "not_aligned": NOT_ALIGNED,
                    "results": results,
                    "comparison": verdict,
                    "load_average": load,
                },
                indent=2,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
