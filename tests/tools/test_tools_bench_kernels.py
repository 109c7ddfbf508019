"""tools/bench_kernels.py end to end on tiny CPU shapes: every kernel, the torch references, the
Triton interpreter and pycocotools, with sane timings, bandwidths and peak-memory figures."""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_kernels.py"

# Implementations each kernel must report on CPU with --interpret (all four modules exist).
EXPECTED = {
    "logprob": {"torch_naive", "reference", "triton"},
    "fused_linear_logprob": {"reference", "chunked_torch", "chunked_triton"},
    "box_iou": {"reference", "triton", "pycocotools"},
    "grpo_loss": {"reference", "triton"},
}
N, V, H = 24, 1000, 32


def load_tool():
    spec = importlib.util.spec_from_file_location("bench_kernels", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _run_tool(tmp: Path) -> dict:
    out = tmp / "bench.json"
    cmd = [
        sys.executable,
        str(TOOL),
        "--preset",
        "cpu-small",
        "--device",
        "cpu",
        "--interpret",
        "--tokens",
        str(N),
        "--vocab",
        str(2 * V),
        "--tp",
        "2",
        "--hidden",
        str(H),
        "--boxes",
        "1x300x200,2x9x13",
        "--grpo",
        "3x40",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--json",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"data": json.loads(out.read_text()), "stdout": proc.stdout}


@pytest.fixture(scope="module")
def report(run_once_per_session) -> tuple[dict, str]:
    result = run_once_per_session("bench_kernels", _run_tool)
    return result["data"], result["stdout"]


def test_every_kernel_and_implementation_reported(report):
    data, stdout = report
    got = {}
    for row in data["results"]:
        assert "error" not in row, row
        got.setdefault(row["kernel"], set()).add(row["impl"])
    assert set(got) == set(EXPECTED)
    for kernel, impls in EXPECTED.items():
        # Liger-Kernel adds a column when it is installed (it is optional).
        assert impls <= got[kernel] and got[kernel] - impls <= {"liger"}, (kernel, got[kernel])
    for kernel in EXPECTED:
        assert kernel in stdout  # the table
    assert data["triton_interpret"] is True and data["device_type"] == "cpu"
    assert data["config"]["vocab"] == 2 * V and data["config"]["tp"] == 2


def test_numbers_are_sane(report):
    data, _ = report
    peaks = data["peaks"]
    assert 0.1 < peaks["copy_GBps"] < 1000 and 1e-4 < peaks["matmul_TFLOPs"] < 100
    for row in data["results"]:
        tags = ("fwd",) if row["kernel"] == "box_iou" else ("fwd", "fwd_bwd")
        for tag in tags:
            ms, gbps = row[f"{tag}_ms"], row[f"{tag}_GBps"]
            assert math.isfinite(ms) and 0 < ms < 60_000, row
            assert gbps > 0 and math.isclose(row[f"{tag}_frac_copy_bw"], gbps / peaks["copy_GBps"], rel_tol=1e-9)
            assert row[f"{tag}_peak_extra_MB"] >= 0
        if row["kernel"] == "fused_linear_logprob":
            assert row["shape"] == {"N": N, "V": V, "H": H}
            assert row["fwd_TFLOPs"] > 0 and row["fwd_bwd_TFLOPs"] > 0
    # Each shape's case ran on its own tensors (a closure over the last, small shape would fail
    # here: the big shape comes first). The pairwise
    # output alone is B * N * M fp32, so peak memory grows with the shape.
    box_rows = [r for r in data["results"] if r["kernel"] == "box_iou"]
    assert [r["shape"] for r in box_rows[:: len(EXPECTED["box_iou"])]] == [
        {"B": 1, "N": 300, "M": 200},
        {"B": 2, "N": 9, "M": 13},
    ]
    for r in box_rows:
        if r["impl"] != "triton":  # the interpreter's buffers are numpy, not counted
            shape = r["shape"]
            assert r["fwd_peak_extra_MB"] >= shape["B"] * shape["N"] * shape["M"] * 4 / 2**20, r
    rows = {(r["kernel"], r["impl"]): r for r in data["results"]}
    # log_softmax materialises the fp32 (N, V) log-probs; backward adds the fp32 grad of the logits.
    logits_mb = N * V * 4 / 2**20
    assert rows["logprob", "torch_naive"]["fwd_peak_extra_MB"] >= logits_mb
    assert rows["logprob", "torch_naive"]["fwd_bwd_peak_extra_MB"] >= 2 * logits_mb
    assert rows["fused_linear_logprob", "reference"]["fwd_peak_extra_MB"] >= logits_mb


def test_missing_module_is_skipped_with_notice(capsys):
    tool = load_tool()
    assert tool._import("megatron_vrft.ops.no_such_kernel") is None
    assert "NOTICE" in capsys.readouterr().out
    with pytest.raises(ValueError, match="3 dims"):
        tool._shapes("2x3", ("B", "N", "M"))
