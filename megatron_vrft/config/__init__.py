"""Typed run configuration: dataclasses per component, YAML + CLI overrides, validation."""

from megatron_vrft.config.errors import ConfigError
from megatron_vrft.config.loader import (
    RUN_CONFIG_FILE,
    apply_overrides,
    build_dataclass,
    config_to_dict,
    describe_config,
    dump_config,
    load_config,
)
from megatron_vrft.config.schema import (
    AlgorithmConfig,
    DataConfig,
    LoggingConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    RewardConfig,
    RewardTerm,
    RolloutConfig,
    TrainerConfig,
    VisualRFTConfig,
)

__all__ = [
    "RUN_CONFIG_FILE",
    "AlgorithmConfig",
    "ConfigError",
    "DataConfig",
    "LoggingConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RewardConfig",
    "RewardTerm",
    "RolloutConfig",
    "TrainerConfig",
    "VisualRFTConfig",
    "apply_overrides",
    "build_dataclass",
    "config_to_dict",
    "describe_config",
    "dump_config",
    "load_config",
]
