"""The trainer end to end over gloo (torchrun, 2 ranks): layouts agree, crashes resume exactly.

Every run uses the built-in tiny default shrunk to a few steps (SFT warm-up 2 steps, GRPO 3 steps,
several micro-batches per step). The uninterrupted run at (TP, PP) = (2, 1) is the reference:

- (1, 1) with DP = 2 and (1, 2) give the same per-step losses and rewards within 1e-4;
- kill -9 (SIGKILL) in the middle of step 4, or while checkpoint 4 is being written, then resume:
  steps 3-5 equal the reference and no incomplete checkpoint is left;
- a checkpoint written at (2, 1) resumes at (1, 2) (model and optimizer resharded by megatron-core)
  and the run goes on as the reference does;
- a training checkpoint is also a model checkpoint: converted to HF it equals the HF export;
- a NaN loss at step 4 skips that update on every rank (counted, logged) and the run goes on.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vrft import cli

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "data.num_synthetic=16", "data.prompts_per_step=8", "rollout.num_generations=4", "rollout.max_new_tokens=8",
    "rollout.prompts_per_call=2", "trainer.sft_warmup_steps=2", "trainer.num_steps=3", "trainer.save_interval=2",
    "trainer.eval_interval=2", "trainer.micro_batch_tokens=1200", "logging.progress_bar=false", "logging.plots=false",
    "logging.tensorboard=false", "optimizer.warmup_steps=0",
]  # fmt: skip
COMPARED = (
    "sft_loss",
    "loss",
    "pg_loss",
    "kl_loss",
    "reward/total",
    "reward/accuracy",
    "reward/format",
    "entropy",
    "grad_norm",
)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(out: Path, tp: int, pp: int, *, fault: str | None = None, dp: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # torch reference ops: fast
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["MEGATRON_VRFT_FAULT"] = fault
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(2 * dp),
           "--master_port", str(_port()), str(ROOT / "tools" / "train.py"),
           "--config", str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"),
           *SMALL, f"parallel.tensor_parallel_size={tp}", f"parallel.pipeline_parallel_size={pp}",
           f"trainer.output_dir={out}"]  # fmt: skip
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def records(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if r.get("phase") in ("sft", "grpo")}


def assert_same(a: dict[int, dict], b: dict[int, dict], steps, tol: float) -> None:
    for step in steps:
        for key in COMPARED:
            if key in a[step] or key in b[step]:
                assert key in a[step] and key in b[step], (step, key)
                assert abs(a[step][key] - b[step][key]) <= tol * max(1.0, abs(a[step][key])), (
                    step,
                    key,
                    a[step][key],
                    b[step][key],
                )


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[int, dict]:
    out = tmp_path_factory.mktemp("ref")
    proc = train(out, 2, 1)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recs = records(out)
    assert sorted(recs) == [1, 2, 3, 4, 5]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if r.get("phase") == "eval"}
    assert sorted(evals) == [2, 4, 5]  # trainer.eval_interval=2, and at the end
    for r in evals.values():  # the task metric of tools/evaluate.py, on the 16 held-out prompts
        assert r["eval/num_prompts"] == 16 and 0.0 <= r["eval/task/accuracy"] <= 1.0
        assert r["eval/task/num_samples"] == 16
    assert (out / "hf_checkpoint" / "config.json").exists()
    assert (out / "checkpoints" / "latest").read_text() == "step_000005"
    return recs


@pytest.mark.parametrize("tp,pp", [(1, 1), (1, 2)])
def test_layouts_give_the_same_run(reference, tmp_path, tp, pp):
    proc = train(tmp_path, tp, pp)
    assert proc.returncode == 0, proc.stderr[-4000:]
    got = records(tmp_path)
    # The GRPO steps really trained (a non-zero loss and gradient), so equality is not vacuous.
    assert any(abs(r.get("grad_norm", 0)) > 0 for r in got.values())
    assert_same(reference, got, range(1, 6), 1e-4)


@pytest.mark.parametrize("fault", ["step@4", "checkpoint_write@4"])
def test_kill_9_then_resume_is_exact(reference, tmp_path, fault):
    crashed = train(tmp_path, 2, 1, fault=fault)
    assert crashed.returncode != 0
    ckpts = tmp_path / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_000002"
    # the run's config is written when the run starts: evaluating a killed run's checkpoint finds it
    assert cli.find_run_config(ckpts / "step_000002") == (tmp_path / "config.json").resolve()
    if fault.startswith("checkpoint_write"):
        assert (ckpts / "step_000004.incomplete").is_dir()  # the interrupted write, not published
    resumed = train(tmp_path, 2, 1)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from" in resumed.stderr + resumed.stdout
    got = records(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len({(r["step"], r.get("phase")) for r in rows}) == len(rows)  # each (step, phase) once
    assert sorted(got) == [1, 2, 3, 4, 5]  # steps after the checkpoint are not counted twice
    assert_same(reference, got, range(1, 6), 1e-6)
    assert not list(ckpts.glob("*.incomplete"))
    assert (ckpts / "latest").read_text() == "step_000005"


def test_resume_at_another_layout(reference, tmp_path):
    crashed = train(tmp_path, 2, 1, fault="step@4")
    assert crashed.returncode != 0
    resumed = train(tmp_path, 1, 2)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    log = resumed.stderr + resumed.stdout
    assert "resharding checkpoint" in log and "'tp': 2" in log
    assert_same(reference, records(tmp_path), range(1, 6), 1e-4)


def test_training_checkpoint_converts_to_the_hf_export(reference, tmp_path_factory):
    from safetensors.torch import load_file

    from megatron_vrft.models.conversion import convert_megatron_to_hf

    out = next(tmp_path_factory.getbasetemp().glob("ref*"))
    hf = convert_megatron_to_hf(
        out / "checkpoints" / "step_000005", tmp_path_factory.mktemp("conv") / "hf", progress=False
    )
    got = {k: v for f in sorted(hf.glob("*.safetensors")) for k, v in load_file(f).items()}
    want = {k: v for f in sorted((out / "hf_checkpoint").glob("*.safetensors")) for k, v in load_file(f).items()}
    assert sorted(got) == sorted(want) and len(want) > 20
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and bool((got[name] == tensor).all()), name


def test_non_finite_gradients_skip_the_step(reference, tmp_path):
    """NaN loss at SFT step 2 (a step with a real gradient): the update is skipped on every rank."""
    from safetensors.torch import load_file

    proc = train(tmp_path, 2, 1, fault="nan_loss@2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "1 step(s) skipped for non-finite gradients" in proc.stderr + proc.stdout
    got = records(tmp_path)
    assert got[2]["skipped"] == 1.0 and math.isnan(got[2]["grad_norm"])
    assert reference[2]["grad_norm"] > 0  # the reference really updated at step 2
    assert all(got[s]["skipped"] == 0.0 for s in (1, 3, 4, 5))
    assert_same(reference, got, [1], 1e-6)
    assert abs(got[2]["sft_loss"] - reference[2]["sft_loss"]) <= 1e-6  # same forward, update skipped
    # step 3 runs on the weights of step 1: finite (no NaN reached the weights), not the reference's
    assert all(math.isfinite(got[s][k]) for s in (3, 4, 5) for k in ("loss", "entropy", "grad_norm"))
    assert got[3]["entropy"] != reference[3]["entropy"]
    weights = load_file(next((tmp_path / "hf_checkpoint").glob("*.safetensors")))
    assert all(bool(t.isfinite().all()) for t in weights.values())
