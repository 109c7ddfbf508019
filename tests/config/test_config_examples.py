"""Every example config loads, and the run preflight checks it against a world before any work."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_vrft.config import ConfigError, load_config
from megatron_vrft.trainer.setup import preflight

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "configs"
CONFIGS = sorted(EXAMPLES.rglob("*.yaml"))


def test_there_are_paper_scale_examples():
    names = {p.name for p in CONFIGS}
    assert {
        "tiny_cpu.yaml",
        "qwen2vl_2b_fewshot_classification.yaml",
        "qwen2vl_2b_coco_fewshot_detection.yaml",
        "qwen2vl_2b_lvis_fewshot_detection.yaml",
        "qwen2vl_2b_ov_detection.yaml",
        "qwen2vl_7b_lisa_grounding.yaml",
    } <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_config_loads_and_preflight_names_a_field(path):
    cfg = load_config(path)
    if cfg.model.hf_path is None:
        preflight(cfg, 2)  # the built-in examples run here as they are
        return
    # Paper-scale examples point at checkpoints and datasets this machine does not have (and at
    # vLLM): preflight stops before any work with a message naming the field.
    with pytest.raises(ConfigError) as err:
        preflight(cfg, 8)
    assert any(f in str(err.value) for f in ("rollout.engine", "model.hf_path", "data.path", "data.image_root"))


def test_preflight_rejects_a_world_that_tp_pp_do_not_divide():
    cfg = load_config(
        EXAMPLES / "tiny_cpu.yaml", ["parallel.tensor_parallel_size=2", "parallel.pipeline_parallel_size=2"]
    )
    with pytest.raises(ConfigError, match="parallel.tensor_parallel_size"):
        preflight(cfg, 2)
    with pytest.raises(ConfigError, match="reward.terms"):
        preflight(load_config(EXAMPLES / "tiny_cpu.yaml", ["reward.terms=[{name: ioux}]"]), 2)
