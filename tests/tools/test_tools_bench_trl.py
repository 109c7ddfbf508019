"""tools/bench_trl.py end to end on a tiny setting: the table and JSON have a row with positive step
times and peak RSS. TRL is not a project dependency, so CI runs this project's side of the benchmark;
the side-by-side run (``--runs ours,trl``) needs ``pip install trl==1.16.0`` and is recorded in
docs/benchmarks.md."""

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "bench_trl.py"
TINY = ["--steps", "2", "--skip", "0", "--prompts-per-step", "2", "--num-synthetic", "8"]


def _run(tmp_path: Path, runs: str) -> tuple[str, dict]:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(TOOL), *TINY, "--runs", runs, "--json", str(out)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
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
