"""Run set-up in a one-rank world (no torchrun): the seeds a run starts from."""

import random

import numpy as np

from megatron_vrft.config import load_config
from megatron_vrft.distributed.parallel_state import destroy_model_parallel, single_rank_world
from megatron_vrft.trainer.setup import build_run


def test_build_run_seeds_python_random_and_numpy(tmp_path):
    overrides = [
        "parallel.tensor_parallel_size=1", "data.num_synthetic=8", "data.prompts_per_step=4",
        "rollout.engine=hf", "trainer.seed=4321", f"trainer.output_dir={tmp_path}",
    ]  # fmt: skip
    cfg = load_config("examples/configs/tiny_cpu.yaml", overrides)
    draws = []
    with single_rank_world():
        for state_before in (1, 2):  # whatever the global generators held before, the run starts the same
            destroy_model_parallel()
            random.seed(state_before)
            np.random.seed(state_before)
            build_run(cfg)
            draws.append((random.random(), float(np.random.rand())))
    assert draws[0] == draws[1]
    np.random.seed(4321)
    assert draws[0] == (random.Random(4321).random(), float(np.random.rand()))
