"""The command-line front shared by tools/train.py and tools/evaluate.py: one-line user errors with
exit code 2, and the run config found beside a checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_vrft import cli
from megatron_vrft.config import config_to_dict, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "configs" / "tiny_cpu.yaml"


def run_tool(tool: str, *args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "TRITON_INTERPRET")}
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / tool), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def bad_yaml(tmp_path: Path) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  family: qwen2_vl\ndata: [source: synthetic\n")
    return path


@pytest.mark.parametrize(
    "args, says",
    [
        (["--config", "/nonexistent/run.yaml"], "--config /nonexistent/run.yaml: no such file"),
        (["--config", "BAD_YAML"], "not valid YAML (line 4"),
        (["--config", TINY, "algorithm.dual_clip_c=2"], "renamed to 'algorithm.clip_ratio_c'"),
        (["--config", TINY, "rollout.num_generations=zero"], "'rollout.num_generations'"),
        ([], "--config RUN.yaml is required"),
    ],
)
def test_train_user_errors_are_one_line_and_exit_2(tmp_path, args, says):
    args = [bad_yaml(tmp_path) if a == "BAD_YAML" else a for a in args]
    proc = run_tool("train.py", *args)
    assert proc.returncode == cli.EXIT_USER_ERROR, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_help_config_lists_the_vllm_section():
    proc = run_tool("train.py", "--help-config")
    assert proc.returncode == 0
    assert "rollout.vllm.gpu_memory_utilization" in proc.stdout and "algorithm.clip_eps_high" in proc.stdout


def test_evaluate_needs_a_source_and_a_config(tmp_path):
    proc = run_tool("evaluate.py", "--config", TINY)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: one of --predictions or --checkpoint is required"
    hf_like = tmp_path / "model"
    hf_like.mkdir()
    (hf_like / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    proc = run_tool("evaluate.py", "--checkpoint", hf_like)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --config RUN.yaml is required (no run config.json beside")


def test_find_run_config_beside_a_checkpoint(tmp_path):
    cfg = load_config(TINY, ["trainer.num_steps=7"])
    run = tmp_path / "run"
    (run / "checkpoints" / "step_3").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_3")
    (run / "hf_checkpoint").mkdir()
    # the HF export's config.json is the model's: never taken for the run config
    (run / "hf_checkpoint" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "data": 1}))
    assert cli.find_run_config(run / "checkpoints") is None
    (run / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    for checkpoint in (run / "checkpoints", run / "checkpoints" / "step_3", run / "hf_checkpoint"):
        assert cli.find_run_config(checkpoint) == (run / "config.json").resolve()
    # the JSON the trainer writes loads back as the same config
    assert config_to_dict(load_config(cli.find_run_config(run / "checkpoints"))) == config_to_dict(cfg)
    (run / "config.json").write_text("{not json")
    assert cli.find_run_config(run / "checkpoints") is None
