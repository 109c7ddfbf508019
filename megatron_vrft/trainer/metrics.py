"""Run metrics: one JSON line per (step, phase), TensorBoard scalars, Weights & Biases when configured,
and the reward-curve PNG (rank 0 only).

On resume the JSONL is cut back to the checkpoint's step, so steps that ran after the checkpoint
and before a crash are not counted twice.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path
from typing import Any

from megatron_vrft.storage import atomic_write_bytes

logger = logging.getLogger(__name__)

CURVES = (
    ("reward/total", "total reward"),
    ("reward/accuracy", "accuracy reward"),
    ("reward/format", "format reward"),
)


class MetricsLogger:
    """Writes metrics of rank 0; other ranks hold an inactive instance."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        active: bool,
        jsonl: bool,
        tensorboard: bool,
        resume_step: int | None,
        wandb_project: str | None = None,
        config: dict | None = None,
    ) -> None:
        self.dir = Path(output_dir)
        self.active = active
        self.path = self.dir / "metrics.jsonl"
        self.records: list[dict[str, Any]] = []
        self._jsonl = jsonl and active
        self._tb = None
        self._wandb = None
        if not active:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line a crash cut short
                if resume_step is not None and rec.get("step", 0) <= resume_step:
                    kept.append(rec)
            self.records = kept
            if self._jsonl:
                atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in kept).encode())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.warning("logging.tensorboard is on but tensorboard is not installed; skipping it")
            else:
                self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=(resume_step or 0) + 1)
        if wandb_project is not None:
            self._wandb = _start_wandb(self.dir, wandb_project, config, resumed=bool(resume_step))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.active:
            return
        record = {"step": step, **metrics}
        key = (step, metrics.get("phase"))
        if any((r.get("step"), r.get("phase")) == key for r in self.records):
            # The same row again (a finished run re-run, or one killed after its final evaluation,
            # evaluates the last step once more): it replaces the earlier one, rows stay unique.
            self.records = [record if (r.get("step"), r.get("phase")) == key else r for r in self.records]
            if self._jsonl:
                atomic_write_bytes(self.path, "".join(json.dumps(r) + "\n" for r in self.records).encode())
        else:
            self.records.append(record)
            if self._jsonl:
                with open(self.path, "a") as f:
                    f.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def plot(self, filename: str = "reward_curve.png") -> Path | None:
        """Reward and accuracy against step (GRPO steps; SFT warm-up steps shaded; the held-out
        evaluations as points)."""
        if not self.active or not self.records:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(2, 2, figsize=(11, 7))
        ax = axes[0, 0]
        grpo = [r for r in self.records if r.get("phase") == "grpo"]
        for key, label in CURVES:
            pts = [(r["step"], r[key]) for r in grpo if key in r]
            if pts:
                ax.plot(*zip(*pts), label=label)
        held_out = [
            (r["step"], r["eval/task/accuracy"])
            for r in self.records
            if r.get("phase") == "eval" and "eval/task/accuracy" in r
        ]
        if held_out:
            ax.plot(*zip(*held_out), "o", color="black", markersize=4, label="held-out greedy accuracy")
        sft = [r["step"] for r in self.records if r.get("phase") == "sft"]
        if sft:
            ax.axvspan(min(sft), max(sft), color="0.9", label="SFT warm-up")
        ax.set_xlabel("step")
        ax.set_ylabel("mean over sampled responses")
        ax.set_title("Visual-RFT rewards")
        ax.set_ylim(-0.05, max(2.05, max((r.get("reward/total", 0) for r in grpo), default=0) + 0.05))
        ax.legend(loc="upper left", fontsize=8)
        # one quantity per panel, each on its own scale (a KL spike no longer flattens the loss)
        for panel, (key, title, ylabel) in zip(
            (axes[0, 1], axes[1, 0], axes[1, 1]),
            (
                ("loss", "GRPO loss", "loss"),
                ("kl_loss", "KL to the reference", "KL estimate (aggregated as the loss)"),
                ("rollout/logprob_abs_diff_mean", "rollout vs trainer log-probs", "mean |difference|"),
            ),
        ):
            pts = [(r["step"], r[key]) for r in self.records if key in r]
            if pts:
                panel.plot(*zip(*pts), linewidth=1)
            else:
                panel.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=panel.transAxes)
            panel.set_xlabel("step")
            panel.set_ylabel(ylabel)
            panel.set_title(title)
        fig.tight_layout()
        path = self.dir / filename
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


WANDB_ID_FILE = "wandb_run_id"


def _start_wandb(run_dir: Path, project: str, config: dict | None, *, resumed: bool):
    """A W&B run for ``run_dir``: its id is kept in ``run_dir/wandb_run_id`` so that a resumed
    training run appends to the same W&B run. W&B keeps the first value it got for a step: steps
    a crashed run logged after its last checkpoint keep those values there (metrics.jsonl and
    TensorBoard are cut back to the checkpoint and hold the resumed run's)."""
    import wandb

    id_file = run_dir / WANDB_ID_FILE
    run_id = id_file.read_text().strip() if resumed and id_file.exists() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(
        project=project, name=run_dir.name, id=run_id, resume="allow", dir=str(run_dir), config=config or {}
    )
