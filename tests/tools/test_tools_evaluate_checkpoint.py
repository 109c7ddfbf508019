"""``tools/evaluate.py --checkpoint``: generates with the transformers engine from an HF checkpoint,
writes predictions / metrics / report / PNG, resumes without re-generating, and names bad inputs in
one line; a Megatron checkpoint of the same weights (TP-chunked on disk) answers identically."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from megatron_vrft.data import build_tiny_tokenizer
    from megatron_vrft.models.qwen2_vl.presets import build_preset_hf_model

    out = tmp_path_factory.mktemp("ckpt")
    tok = build_tiny_tokenizer()
    build_preset_hf_model("qwen2_vl", "tiny", tok, seed=0).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, str(ROOT / "tools" / "evaluate.py"), *map(str, args)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("config,task", [("tiny_cpu.yaml", "classification"),
                                         ("synthetic_detection.yaml", "detection")])
def test_evaluate_checkpoint_writes_report_and_resumes(checkpoint, tmp_path, config, task):
    cfg = ROOT / "examples" / "configs" / config
    args = ["--config", cfg, "--checkpoint", checkpoint, "--output-dir", tmp_path, "--batch-size", "3",
            "data.num_synthetic=5", "rollout.max_new_tokens=6"]
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    preds = (tmp_path / "predictions.jsonl").read_text().splitlines()
    assert len(preds) == 5 and len({json.loads(p)["source_id"] for p in preds}) == 5
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["num_evaluated"] == 5 and metrics["missing_predictions"] == 0
    assert ("accuracy" in metrics) if task == "classification" else ("mAP" in metrics or "map" in str(metrics).lower())
    assert (tmp_path / "report.md").read_text().startswith(f"# {task}")
    assert (tmp_path / "examples.png").stat().st_size > 1000
    again = run(*args)  # everything answered already: nothing regenerated, same file
    assert again.returncode == 0, again.stderr[-3000:]
    assert (tmp_path / "predictions.jsonl").read_text().splitlines() == preds


def test_missing_checkpoint_is_one_line(tmp_path):
    proc = run("--config", ROOT / "examples" / "configs" / "tiny_cpu.yaml", "--checkpoint", tmp_path / "nope",
               "--output-dir", tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nope" in proc.stderr and "config.json" in proc.stderr


@pytest.mark.slow
def test_megatron_checkpoint_answers_like_the_hf_one(checkpoint, tmp_path):
    from megatron_vrft.models.conversion import convert_hf_to_megatron

    megatron = convert_hf_to_megatron(checkpoint, tmp_path / "mg", tp_size=2, progress=False)
    common = ["--config", ROOT / "examples" / "configs" / "tiny_cpu.yaml", "--batch-size", "4",
              "data.num_synthetic=6", "rollout.max_new_tokens=8"]
    answers = {}
    for name, ckpt in (("hf", checkpoint), ("megatron", megatron)):
        proc = run(*common, "--checkpoint", ckpt, "--output-dir", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers[name] = sorted((tmp_path / name / "predictions.jsonl").read_text().splitlines())
    assert len(answers["hf"]) == 6
    assert answers["megatron"] == answers["hf"]
