"""Qwen2VLPolicy on megatron-core at (TP, PP) in {(1,1), (2,1), (1,2), (2,2)} equals transformers.

One ``torchrun`` launch with 4 gloo ranks runs every layout for both families (see
``qwen2_vl_model_parallel_worker.py``): logits and vocab-parallel log-probs with images, padded
(right and left), packed and text-only micro-batches of different lengths through the 1F1B
schedule, and every parameter gradient (language and vision, tied embeddings across PP for
Qwen2.5-VL). Also (TP=2, PP=2) with 2 interleaved virtual stages per rank on fixed-shape
micro-batches.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "qwen2_vl_model_parallel_worker.py")
# (TP, PP, virtual stages per PP rank)
LAYOUTS = {(2, 2, None), (2, 1, None), (1, 2, None), (1, 1, None), (2, 2, 2)}
FAMILIES = {"qwen2_vl", "qwen2_5_vl"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp") / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
        "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), WORKER, str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
    return json.loads(out.read_text())


@pytest.mark.distributed
@pytest.mark.slow
def test_every_layout_and_rank_reported(records):
    seen = {(r["family"], r["tp"], r["pp"], r["vpp"], r["rank"]) for r in records}
    expected = {(f, *layout, rank) for f in FAMILIES for layout in LAYOUTS for rank in range(4)}
    assert seen == expected


@pytest.mark.distributed
@pytest.mark.slow
def test_logits_and_logprobs_match_hf(records):
    last_stage = [r for r in records if "logits_max_abs" in r]
    # Every (family, layout) has its last-stage ranks report: 4 ranks at PP=1, 2 at PP=2.
    for f in FAMILIES:
        for tp, pp, vpp in LAYOUTS:
            n = sum(1 for r in last_stage if (r["family"], r["tp"], r["pp"], r["vpp"]) == (f, tp, pp, vpp))
            assert n == 4 // pp, (f, tp, pp, vpp, n)
    for r in last_stage:
        assert r["logits_max_abs"] <= 1e-5, r
        assert r["logprobs_max_abs"] <= 1e-5, r
        assert r["entropy_max_abs"] <= 1e-5, r


@pytest.mark.distributed
@pytest.mark.slow
def test_gradients_match_hf(records):
    for r in records:
        assert r["grads_checked"] > 0, r
        assert r["grad_max_rel"] <= 1e-5, r
    # The vision tower lives on stage 0 only, with the same parameter count on every replica.
    for r in records:
        assert (r["vision_params"] > 0) == (r["pp_rank"] == 0), r


@pytest.mark.distributed
@pytest.mark.slow
def test_vision_replicas_identical_across_tp(records):
    with_tp = [r for r in records if r["tp"] == 2 and r["pp_rank"] == 0]
    assert with_tp
    for r in with_tp:
        assert r["vision_grad_replica_diff"] == 0.0, r
