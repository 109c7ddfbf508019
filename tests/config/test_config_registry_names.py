"""Config names select registry entries; config never imports the registries, so this test keeps
the ``Literal`` choices and the registries in step."""

import typing

from megatron_vrft.config import AlgorithmConfig, DataConfig, RewardConfig, load_config
from megatron_vrft.data import MODEL_COORD_SPACES
from megatron_vrft.rewards import available_rewards
from megatron_vrft.rl import ADVANTAGE_ESTIMATORS, KL_ESTIMATORS, LOSS_AGGREGATORS, POLICY_LOSSES


def literal_choices(cls, name):
    return set(typing.get_args(typing.get_type_hints(cls)[name]))


def registry_names(registry):
    return set(registry.names())


def test_algorithm_literals_match_rl_registries():
    assert literal_choices(AlgorithmConfig, "advantage_estimator") == registry_names(ADVANTAGE_ESTIMATORS)
    assert literal_choices(AlgorithmConfig, "policy_loss") == registry_names(POLICY_LOSSES)
    assert literal_choices(AlgorithmConfig, "kl_estimator") == registry_names(KL_ESTIMATORS)
    assert literal_choices(AlgorithmConfig, "loss_agg_mode") == registry_names(LOSS_AGGREGATORS)


def test_coord_space_literal_matches_model_spaces():
    assert literal_choices(DataConfig, "coord_space") == set(MODEL_COORD_SPACES)


def test_default_reward_terms_are_registered():
    cfg = load_config(None, ["model.family=qwen2_vl", "data.source=synthetic", "data.task=classification"])
    assert {t.name for t in cfg.reward.terms} <= set(available_rewards())
    assert literal_choices(RewardConfig, "classification_mode") == {"default", "visual_rft_compat"}
