"""MetricsLogger: JSONL cut back on resume, TensorBoard scalars read back, and Weights & Biases (the
real package, offline) continuing the same run after a resume."""

from __future__ import annotations

import json
import random

from megatron_vrft.trainer.metrics import WANDB_ID_FILE, MetricsLogger


def _steps(rng: random.Random, steps) -> dict[int, dict]:
    return {
        s: {"phase": "grpo", "reward/total": rng.uniform(0, 2), "loss": rng.uniform(-1, 1), "note": "text"}
        for s in steps
    }


def _tensorboard_scalars(run_dir) -> dict[tuple[str, int], float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {(tag, e.step): e.value for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag)}


def test_resume_cuts_jsonl_and_tensorboard_back(tmp_path):
    rng = random.Random(3)
    first, second = _steps(rng, range(1, 6)), _steps(rng, range(4, 8))
    log = MetricsLogger(tmp_path, active=True, jsonl=True, tensorboard=True, resume_step=None)
    for s, m in first.items():
        log.log(s, m)
    log.close()
    log = MetricsLogger(tmp_path, active=True, jsonl=True, tensorboard=True, resume_step=3)  # crashed after 5, ckpt 3
    for s, m in second.items():
        log.log(s, m)
    log.close()
    want = {**{s: first[s] for s in (1, 2, 3)}, **second}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == sorted(want)
    assert all(r == {"step": r["step"], **want[r["step"]]} for r in rows)
    scalars = _tensorboard_scalars(tmp_path)
    for s, m in want.items():
        for key in ("reward/total", "loss"):
            assert abs(scalars[(key, s)] - m[key]) < 1e-6, (key, s)
    assert not any(tag == "note" for tag, _ in scalars)


def test_rerun_of_a_finished_run_writes_each_step_and_phase_once(tmp_path):
    # a run of 3 steps ends with an evaluation of step 3; re-running it (resume at its last
    # checkpoint, step 3) evaluates step 3 again: the row is replaced, not repeated
    rng = random.Random(5)
    log = MetricsLogger(tmp_path, active=True, jsonl=True, tensorboard=False, resume_step=None)
    for s, m in _steps(rng, range(1, 4)).items():
        log.log(s, {"phase": "grpo", **m})
    log.log(3, {"phase": "eval", "eval/accuracy": 0.5})
    log.close()
    for accuracy in (0.75, 1.0):  # killed after the final evaluation, then re-run twice
        log = MetricsLogger(tmp_path, active=True, jsonl=True, tensorboard=False, resume_step=3)
        log.log(3, {"phase": "eval", "eval/accuracy": accuracy})
        log.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["phase"]) for r in rows] == [(1, "grpo"), (2, "grpo"), (3, "grpo"), (3, "eval")]
    assert rows[-1]["eval/accuracy"] == 1.0
    assert [(r["step"], r["phase"]) for r in log.records] == [(r["step"], r["phase"]) for r in rows]


def test_wandb_offline_run_continues_after_resume(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    calls = []
    real_log = wandb.sdk.wandb_run.Run.log

    def spy(self, data, *args, **kwargs):
        calls.append((self.id, kwargs.get("step"), dict(data)))
        return real_log(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", spy)
    rng = random.Random(5)
    log = MetricsLogger(
        tmp_path,
        active=True,
        jsonl=False,
        tensorboard=False,
        resume_step=None,
        wandb_project="megatron-vrft-test",
        config={"trainer": {"seed": 1}},
    )
    for s, m in _steps(rng, range(1, 4)).items():
        log.log(s, m)
    log.close()
    run_id = (tmp_path / WANDB_ID_FILE).read_text()
    log = MetricsLogger(
        tmp_path, active=True, jsonl=False, tensorboard=False, resume_step=3, wandb_project="megatron-vrft-test"
    )
    later = _steps(rng, range(4, 6))
    for s, m in later.items():
        log.log(s, m)
    log.close()
    assert {c[0] for c in calls} == {run_id}  # one W&B run across the resume
    assert [c[1] for c in calls] == [1, 2, 3, 4, 5]
    assert calls[-1][2] == {"reward/total": later[5]["reward/total"], "loss": later[5]["loss"]}  # scalars only
    # W&B's offline folders are named by start time (to the second) and run id: both sessions of
    # the run write under this id, in one folder or two
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}*"))  # a second folder in the same second gets "-1"
    assert runs and all((r / f"run-{run_id}.wandb").stat().st_size > 0 for r in runs)
    assert sorted((tmp_path / "wandb").glob("offline-run-*")) == sorted(runs)  # no run under another id
