import dataclasses
import typing

import pytest
import yaml

from megatron_vrft.config import (
    ConfigError,
    RewardTerm,
    VisualRFTConfig,
    apply_overrides,
    config_to_dict,
    describe_config,
    dump_config,
    load_config,
)

MINIMAL = {"model": {"family": "qwen2_vl"}, "data": {"source": "synthetic", "task": "detection"}}


def write_yaml(tmp_path, values):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_minimal_yaml_fills_defaults(tmp_path):
    cfg = load_config(write_yaml(tmp_path, MINIMAL))
    assert isinstance(cfg, VisualRFTConfig)
    assert cfg.model.family == "qwen2_vl"
    assert cfg.data.task == "detection"
    assert cfg.algorithm.kl_estimator == "k3"
    assert [t.name for t in cfg.reward.terms] == ["format", "accuracy"]


def test_overrides_take_precedence_and_parse_yaml_scalars(tmp_path):
    cfg = load_config(
        write_yaml(tmp_path, MINIMAL),
        [
            "algorithm.kl_coef=0.1",
            "parallel.tensor_parallel_size=2",
            "model.hf_path=null",
            "data.categories=[cat, dog]",
            "reward.terms=[{name: format, weight: 0.5}, {name: iou}]",
            "optimizer.betas=[0.9, 0.95]",
        ],
    )
    assert cfg.algorithm.kl_coef == 0.1
    assert cfg.parallel.tensor_parallel_size == 2
    assert cfg.model.hf_path is None
    assert cfg.data.categories == ["cat", "dog"]
    assert cfg.reward.terms == [RewardTerm(name="format", weight=0.5), RewardTerm(name="iou", weight=1.0)]
    assert cfg.optimizer.betas == (0.9, 0.95)


def test_int_is_accepted_for_float_but_not_reverse():
    cfg = load_config(
        None, ["model.family=qwen2_vl", "data.source=synthetic", "data.task=grounding", "algorithm.kl_coef=1"]
    )
    assert isinstance(cfg.algorithm.kl_coef, float)
    with pytest.raises(ConfigError, match="parallel.tensor_parallel_size"):
        load_config(
            None,
            [
                "model.family=qwen2_vl",
                "data.source=synthetic",
                "data.task=grounding",
                "parallel.tensor_parallel_size=1.5",
            ],
        )


@pytest.mark.parametrize(
    "override, field, allowed",
    [
        ("algorithm.kl_estimator=k4", "algorithm.kl_estimator", "'k1', 'k2', 'k3'"),
        ("model.dtype=fp8", "model.dtype", "'float32', 'bfloat16', 'float16'"),
        ("rollout.vllm.sleep_level=3", "rollout.vllm.sleep_level", "1, 2"),
        ("algorithm.loss_agg_mode=mean", "algorithm.loss_agg_mode", "'token-mean'"),
        ("reward.matching=optimal", "reward.matching", "'greedy', 'hungarian'"),
    ],
)
def test_literal_errors_name_field_and_allowed_values(override, field, allowed):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.family=qwen2_vl", "data.source=synthetic", "data.task=detection", override])
    message = str(info.value)
    assert f"'{field}'" in message
    assert allowed in message


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError) as info:
        load_config(
            None, ["model.family=qwen2_vl", "data.source=synthetic", "data.task=detection", "algorithm.kl_coeff=0.1"]
        )
    assert "algorithm.kl_coeff" in str(info.value)
    assert "did you mean 'kl_coef'" in str(info.value)


@pytest.mark.parametrize(
    "old, new, value",
    [
        ("algorithm.clip_ratio_low", "algorithm.clip_eps_low", 0.1),
        ("algorithm.clip_ratio_high", "algorithm.clip_eps_high", 0.28),
        ("algorithm.dual_clip_c", "algorithm.clip_ratio_c", 2.5),
        ("rollout.tensor_parallel_size", "rollout.vllm.tensor_parallel_size", 2),
        ("rollout.gpu_memory_utilization", "rollout.vllm.gpu_memory_utilization", 0.3),
        ("rollout.sleep_level", "rollout.vllm.sleep_level", 2),
    ],
)
def test_retired_key_names_its_replacement(old, new, value):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.family=qwen2_vl", "data.source=synthetic", "data.task=detection", f"{old}={value}"])
    assert f"'{old}'" in str(info.value) and f"'{new}'" in str(info.value)
    # the new name takes the value
    cfg = load_config(None, ["model.family=qwen2_vl", "data.source=synthetic", "data.task=detection", f"{new}={value}"])
    node = cfg
    for part in new.split("."):
        node = getattr(node, part)
    assert node == value


def test_removed_key_says_why():
    with pytest.raises(ConfigError, match="not wired into the trainer"):
        load_config(
            None,
            [
                "model.family=qwen2_vl",
                "data.source=synthetic",
                "data.task=detection",
                "parallel.virtual_pipeline_parallel_size=2",
            ],
        )


def test_unknown_section_is_rejected():
    with pytest.raises(ConfigError, match="'rollouts'"):
        load_config(
            None, ["model.family=qwen2_vl", "data.source=synthetic", "data.task=detection", "rollouts.temperature=1"]
        )


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError, match="'data.task'"):
        load_config(None, ["model.family=qwen2_vl", "data.source=synthetic"])
    with pytest.raises(ConfigError, match="'model'"):
        load_config(None, ["data.source=synthetic", "data.task=detection"])


@pytest.mark.parametrize(
    "override, field",
    [
        ("parallel.tensor_parallel_size=0", "parallel.tensor_parallel_size"),
        ("rollout.vllm.gpu_memory_utilization=1.0", "rollout.vllm.gpu_memory_utilization"),
        ("rollout.top_p=0", "rollout.top_p"),
        ("rollout.top_k=0", "rollout.top_k"),
        ("rollout.temperature=-1", "rollout.temperature"),
        ("algorithm.clip_ratio_c=1.0", "algorithm.clip_ratio_c"),
        ("algorithm.kl_coef=-0.1", "algorithm.kl_coef"),
        ("data.k_shot=0", "data.k_shot"),
        ("data.source=coco", "data.path"),
        ("reward.iou_threshold=1.5", "reward.iou_threshold"),
        ("reward.terms=[{name: iou}, {name: iou}]", "reward.terms[1].name"),
        ("optimizer.lr=0", "optimizer.lr"),
        ("trainer.num_steps=0", "trainer.num_steps"),
    ],
)
def test_cross_field_validation_names_field(override, field):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model.family=qwen2_vl", "data.source=synthetic", "data.task=detection", override])
    assert f"'{field}'" in str(info.value)


def test_bool_fields_reject_strings():
    with pytest.raises(ConfigError, match="'logging.plots'.*true or false"):
        load_config(
            None, ["model.family=qwen2_vl", "data.source=synthetic", "data.task=detection", "logging.plots=maybe"]
        )


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(
        None,
        [
            "model.family=qwen2_5_vl",
            "data.source=synthetic",
            "data.task=grounding",
            "reward.terms=[{name: grounding_iou, weight: 2.0}]",
        ],
    )
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_to_dict(again) == config_to_dict(cfg)


def test_override_into_scalar_is_rejected():
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"model": "x"}, ["model.family=qwen2_vl"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides({}, ["model.family"])


def test_top_level_must_be_mapping(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_every_leaf_field_is_documented():
    lines = describe_config()
    assert len(lines) > 40
    undocumented = [line for line in lines if line.rstrip().endswith(":")]
    assert undocumented == []

    def walk(cls):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help"), f"{cls.__name__}.{f.name} has no help text"
            if dataclasses.is_dataclass(hints[f.name]):
                walk(hints[f.name])

    walk(VisualRFTConfig)
    walk(RewardTerm)
