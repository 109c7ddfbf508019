"""End to end: the reward/eval pipeline on tiny synthetic data with the built-in random model."""

import json

import pytest

from megatron_vrft.config import load_config
from megatron_vrft.trainer.reward_eval import run_reward_eval
from megatron_vrft.trainer.timing import PhaseTimer

# the scripted policy rounds boxes to integers as models do, so box metrics are exact only up to
# that rounding: AP50 is exactly 1 for a perfect detector, mIoU and IoU rewards within a few %.
EXACT = {"classification": "accuracy", "detection": "AP50", "grounding": "Acc@0.5"}
REWARD = {"classification": "accuracy", "detection": "iou", "grounding": "grounding_iou"}


@pytest.mark.parametrize("task, family", [("detection", "qwen2_vl"), ("grounding", "qwen2_5_vl"),
                                          ("classification", "qwen2_vl")])
def test_pipeline_end_to_end(tmp_path, task, family):
    cfg = load_config(None, [
        f"model.family={family}", "data.source=synthetic", f"data.task={task}", "data.num_synthetic=3",
        "data.max_pixels=12544", "rollout.num_generations=4", "rollout.max_new_tokens=8",
        f"reward.terms=[{{name: format}}, {{name: {REWARD[task]}}}]", f"trainer.output_dir={tmp_path}",
        "logging.progress_bar=false",
    ])
    result = run_reward_eval(cfg, qualities=(0.0, 1.0), num_model_prompts=2, num_loss_prompts=1)
    low, high = result.sweep
    assert high["evaluation"][EXACT[task]] == pytest.approx(1.0, abs=1e-9)
    assert 1.95 <= high["reward_mean"] <= 2.0 + 1e-6
    assert low["reward_mean"] < high["reward_mean"]
    assert sum(sum(f.values()) for f in high["parse_failures"].values()) == 0
    # the untrained model's completions are scored, never crash, and every failure is counted
    assert result.model_rollout["num_prompts"] == 2
    assert 0.0 <= result.model_rollout["reward_mean"] <= 2.0
    # GRPO loss on the model: finite, with gradients reaching the vision tower
    assert result.loss["grad_norm"] > 0 and result.loss["vision_grad_norm"] > 0
    assert result.loss["kl_loss"] == pytest.approx(0.0, abs=1e-6)  # policy == reference
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["task"] == task and len(saved["sweep"]) == 2
    assert (tmp_path / "report.md").read_text().startswith(f"# Reward/eval pipeline: {task}")
    assert (tmp_path / "reward_vs_quality.png").stat().st_size > 10_000
    assert set(result.timings) >= {"data", "preprocess", "model_rollout", "rewards", "grpo_loss"}


def test_phase_timer_accumulates():
    timer = PhaseTimer()
    for _ in range(3):
        with timer.phase("a"):
            sum(range(1000))
    with timer.phase("b"):
        pass
    assert timer.calls == {"a": 3, "b": 1}
    assert timer.total() == pytest.approx(sum(timer.seconds.values()))
    assert "a" in timer.table() and "total" in timer.table()
