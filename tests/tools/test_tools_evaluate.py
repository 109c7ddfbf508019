"""``tools/evaluate.py --predictions``: the CLI (a subprocess) and the library it is a front for
(``builders.build_eval_ground_truths`` + ``eval.evaluate.score_predictions``)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.scripted_policy import ScriptedPolicy

from megatron_vrft import builders
from megatron_vrft.config import load_config
from megatron_vrft.eval.evaluate import score_predictions
from megatron_vrft.eval.predictions import read_predictions

ROOT = Path(__file__).resolve().parents[2]


def run_tool(*args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), *map(str, args)],
        check=False,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def evaluate_run(cfg, predictions, protocol="coco"):
    """What ``tools/evaluate.py --predictions`` computes, through the library."""
    records = builders.build_records(cfg.data)
    ground_truths = builders.build_eval_ground_truths(cfg.data, records)
    options = builders.eval_score_options(cfg.data, cfg.reward, records, protocol=protocol)
    return score_predictions(cfg.data.task, [r.source_id for r in records], ground_truths, predictions, **options)


def write_config(tmp_path, task):
    path = tmp_path / f"{task}.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"family": "qwen2_vl"},
                "data": {"source": "synthetic", "task": task, "num_synthetic": 5, "max_pixels": 12544},
            }
        )
    )
    return path


def perfect_predictions(cfg, tmp_path, drop_last=False):
    # ground truth as the evaluator sees it, turned into perfect answers by the scripted policy
    import megatron_vrft.data as data

    records = data.load_records(
        "synthetic", cfg.data.task, num_synthetic=cfg.data.num_synthetic, box_space=cfg.data.coord_space
    )
    processor = data.build_image_processor(min_pixels=cfg.data.min_pixels, max_pixels=cfg.data.max_pixels)
    policy = ScriptedPolicy(quality=1.0, seed=0)
    rows = []
    for record in records:
        size = data.read_image_size(record.images[0])
        resized = data.compute_resized_size(*size, processor)
        gt = data.ground_truth_in_model_space(record, cfg.data.coord_space, resized_size=resized)
        rows.append({"source_id": record.source_id, "completion": policy.sample(cfg.data.task, gt, 1)[0]})
    if drop_last:
        rows = rows[:-1]
    path = tmp_path / "preds.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("task, metric", [("detection", "AP50"), ("grounding", "Acc@0.5")])
def test_perfect_predictions_and_missing_ones(tmp_path, task, metric):
    config = write_config(tmp_path, task)
    cfg = load_config(config)
    preds = perfect_predictions(cfg, tmp_path)
    out = tmp_path / "metrics.json"
    proc = run_tool("--config", config, "--predictions", preds, "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "missing_predictions: 0" in proc.stdout
    metrics = json.loads(out.read_text())
    assert metrics[metric] == pytest.approx(1.0)
    assert metrics["missing_predictions"] == 0
    preds = perfect_predictions(cfg, tmp_path, drop_last=True)
    metrics = evaluate_run(cfg, read_predictions(preds))
    assert metrics["missing_predictions"] == 1
    assert metrics[metric] < 1.0


def test_bad_prediction_files_are_reported(tmp_path):
    config = write_config(tmp_path, "grounding")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source_id": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        read_predictions(bad)
    bad.write_text('{"source_id": "x", "completion": "a"}\n{"source_id": "x", "completion": "b"}\n')
    with pytest.raises(ValueError, match="duplicate prediction for 'x'"):
        read_predictions(bad)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"source_id": "not-a-record", "completion": "a"}\n')
    with pytest.raises(ValueError, match="not-a-record"):
        evaluate_run(load_config(config), read_predictions(unknown))
    proc = run_tool("--config", config, "--predictions", unknown)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error: " in proc.stderr and "not-a-record" in proc.stderr
