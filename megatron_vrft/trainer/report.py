"""Human-readable outputs of the reward/eval pipeline: a markdown report and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

HEADLINE_METRIC = {"classification": "accuracy", "detection": "mAP", "grounding": "mIoU"}


def format_sweep_table(result: Any) -> str:
    """Markdown table: one row per policy quality."""
    metric = HEADLINE_METRIC[result.task]
    columns = list(result.sweep[0]["reward_columns"]) if result.sweep else []
    header = ["quality", "reward", *columns, f"eval {metric}", "parse fail", "|adv|", "zero-adv groups"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result.sweep:
        fails = sum(sum(f.values()) for f in row["parse_failures"].values())
        cells = [f"{row['quality']:.2f}", f"{row['reward_mean']:.3f}",
                 *[f"{row['reward_columns'][c]:.3f}" for c in columns],
                 f"{row['evaluation'][metric]:.3f}", str(fails), f"{row['advantage_abs_mean']:.3f}",
                 str(row["zero_advantage_groups"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(result: Any, out_dir: Path, *, plots: bool = True) -> dict[str, str]:
    files = {}
    report = [
        f"# Reward/eval pipeline: {result.task}",
        "",
        f"{result.num_examples} examples; data skips: {result.data_skips or 'none'}.",
        "",
        "## Scripted policies by quality",
        "",
        format_sweep_table(result),
        "",
        "## Model rollout (Qwen2-VL generating on the images)",
        "",
        f"{result.model_rollout['num_prompts']} prompts, mean reward {result.model_rollout['reward_mean']:.3f}.",
        f"First completion: `{result.model_rollout['example_completion']!r}`",
        "",
        "## GRPO loss on the model (one group per prompt, quality 0.5)",
        "",
        *[f"- {k}: {v:.6g}" for k, v in result.loss.items()],
        "",
        "## Phase timings (s)",
        "",
        *[f"- {k}: {v:.2f}" for k, v in result.timings.items()],
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(report) + "\n")
    files["report"] = str(path)
    if plots and result.sweep:
        files["plot"] = str(_plot_sweep(result, out_dir / "reward_vs_quality.png"))
    return files


def _plot_sweep(result: Any, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = [row["quality"] for row in result.sweep]
    metric = HEADLINE_METRIC[result.task]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(q, [row["reward_mean"] for row in result.sweep], "o-", label="total reward", linewidth=2)
    for name in result.sweep[0]["reward_columns"]:
        left.plot(q, [row["reward_columns"][name] for row in result.sweep], ".--", label=name)
    left.plot(q, [row["evaluation"][metric] for row in result.sweep], "s-", label=f"eval {metric}")
    left.set_xlabel("policy quality")
    left.set_ylabel("score")
    left.set_title(f"{result.task}: rewards and {metric}")
    left.legend(fontsize=8)
    left.grid(alpha=0.3)
    reasons = sorted({r for row in result.sweep for f in row["parse_failures"].values() for r in f})
    bottom = [0] * len(q)
    width = 0.8 * (q[1] - q[0]) if len(q) > 1 else 0.2
    for reason in reasons:
        counts = [max((f.get(reason, 0) for f in row["parse_failures"].values()), default=0) for row in result.sweep]
        right.bar(q, counts, width=width, bottom=bottom, label=reason)
        bottom = [b + c for b, c in zip(bottom, counts)]
    right.set_xlabel("policy quality")
    right.set_ylabel("completions")
    right.set_title("parse failures by reason")
    if reasons:
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
