"""tools/bench_trl.py end to end on a tiny setting: the side-by-side table and JSON have a row per
run with positive step times and peak RSS. TRL is not a project dependency: the TRL run is tested
only where trl is importable (skipped otherwise); this project's run is tested everywhere."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_trl.py"
TINY = ["--steps", "2", "--skip", "0", "--prompts-per-step", "2", "--num-synthetic", "8"]


def _run(tmp_path: Path, runs: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(TOOL), *TINY, "--runs", runs, "--json", str(out)],
                          cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def _check_rows(stdout: str, data: dict, names: list[str]) -> None:
    rows = {r["name"]: r for r in data["results"]}
    assert sorted(rows) == sorted(names)
    for name in names:
        r = rows[name]
        assert len(r["step_times_s"]) == 2 and r["steps_timed"] == 2
        assert r["median_step_s"] > 0 and r["mean_step_s"] > 0
        assert r["peak_rss_mb"] > 0 and r["peak_rss_by_phase_mb"]["steps"] > 0
        assert r["torch_threads"] == 1
        table_row = next(line for line in stdout.splitlines() if line.startswith(f"| {name} |"))
        median = float(table_row.split("|")[3])
        assert median > 0


def test_ours_row(tmp_path):
    stdout, data = _run(tmp_path, "ours")
    _check_rows(stdout, data, ["ours"])
    assert data["comparison"] is None


@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (not a project dependency)")
def test_side_by_side_with_trl(tmp_path):
    stdout, data = _run(tmp_path, "ours,trl")
    _check_rows(stdout, data, ["ours", "trl"])
    assert "TRL settings aligned to ours" in stdout and "use_bias_correction_kl" in stdout
    c = data["comparison"]
    assert c["trl_over_ours_step_time"] > 0 and c["ours_over_trl_peak_rss"] > 0
    assert isinstance(c["target_met"], bool)
