"""``tools/verify_rollout.py`` at trainer (TP, PP) = (2, 2) over gloo, with the transformers engine and
(in the vLLM leg, ``-m vllm``) with vLLM's CPU build:
the export is bit-exact against the preset's HF tensors, the engine's sampled-token log-probs equal
the megatron-core trainer's to <= 1e-4 (measured: ~1e-6), and after a second update with perturbed
weights the engine follows them."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=pytest.mark.vllm)])
def test_verify_rollout_tp2_pp2(tmp_path, engine):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["MASTER_PORT"] = str(port)
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # vLLM in process, as under the trainer
    out = tmp_path / "figures.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "verify_rollout.py"), "--engine", engine, "--tp", "2", "--pp", "2",
         "--json", str(out)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    fig = json.loads(out.read_text())
    assert fig["export_bit_exact"] and fig["ok"]
    assert fig["first_max_abs_logprob_diff"] <= 1e-4
    assert fig["second_max_abs_logprob_diff"] <= 1e-4
    assert fig["first_sampled_tokens"] > 0
    # Same seed, different weights: the samples change, so the engine used the new weights.
    assert fig["first_first_response"] != fig["second_first_response"]
    # Several buckets: the largest is one pipeline stage's head or a layer, not the model.
    assert fig["first_export_largest_bucket_bytes"] < fig["first_export_bytes"]
