"""Test-wide setup.

Triton kernels run under the interpreter on machines without a GPU. TRITON_INTERPRET must be set
before any ``@triton.jit`` decorator runs, i.e. before megatron_vrft.ops modules are imported, which
is why it lives here rather than in the tests that need it.
"""

import json
import os

import pytest
import torch
from filelock import FileLock

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def run_once_per_session(tmp_path_factory):
    """``run(name, compute)``: ``compute(dir) -> dict`` once per test run, shared by pytest-xdist
    workers through a file lock (without xdist, once per session). For expensive steps several
    tests check: the CMake build, the Triton AOT compiles, the benchmark tool's run."""

    def run(name: str, compute):
        run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID")
        if run_id is None:
            return compute(tmp_path_factory.mktemp(name))
        root = tmp_path_factory.getbasetemp().parent / f"{name}-{run_id}"
        with FileLock(f"{root}.lock"):
            done = root / "result.json"
            if not done.exists():
                root.mkdir(exist_ok=True)
                done.write_text(json.dumps(compute(root)))
            return json.loads(done.read_text())

    return run


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm`` belong to the vLLM leg (its own environment: ``bash tools/install.sh
    vllm``, then ``.venv-vllm/bin/python -m pytest -m vllm``); a run whose ``-m`` does not name
    ``vllm`` deselects them (reported as deselected, not skipped), and in the vLLM leg they fail
    where vLLM cannot be imported. Tests marked ``gpu`` check kernels on hardware; they run only
    where CUDA is present."""
    if "vllm" not in (config.getoption("markexpr") or ""):
        kept = [item for item in items if "vllm" not in item.keywords]
        deselected = [item for item in items if "vllm" in item.keywords]
        if deselected:
            config.hook.pytest_deselected(items=deselected)
            items[:] = kept
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs a CUDA GPU (run on a GPU host: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
