import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from helpers.scripted_policy import ScriptedPolicy

from megatron_vrft.config import load_config

TOOL = Path(__file__).resolve().parents[2] / "tools" / "evaluate.py"
spec = importlib.util.spec_from_file_location("evaluate_tool", TOOL)
evaluate_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate_tool)


def write_config(tmp_path, task):
    path = tmp_path / f"{task}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"family": "qwen2_vl"},
        "data": {"source": "synthetic", "task": task, "num_synthetic": 5, "max_pixels": 12544},
    }))
    return path


def perfect_predictions(cfg, tmp_path, drop_last=False):
    # ground truth as the evaluator sees it, turned into perfect answers by the scripted policy
    import megatron_vrft.data as data

    records = data.load_records("synthetic", cfg.data.task, num_synthetic=cfg.data.num_synthetic,
                                box_space=cfg.data.coord_space)
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
    assert evaluate_tool.main(["--config", str(config), "--predictions", str(preds), "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics[metric] == pytest.approx(1.0)
    assert metrics["missing_predictions"] == 0
    preds = perfect_predictions(cfg, tmp_path, drop_last=True)
    metrics = evaluate_tool.evaluate_run(cfg, evaluate_tool.read_predictions(preds))
    assert metrics["missing_predictions"] == 1
    assert metrics[metric] < 1.0


def test_bad_prediction_files_are_reported(tmp_path):
    config = write_config(tmp_path, "grounding")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"source_id": "x"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        evaluate_tool.read_predictions(bad)
    bad.write_text('{"source_id": "x", "completion": "a"}\n{"source_id": "x", "completion": "b"}\n')
    with pytest.raises(ValueError, match="duplicate prediction for 'x'"):
        evaluate_tool.read_predictions(bad)
    unknown = tmp_path / "unknown.jsonl"
    unknown.write_text('{"source_id": "not-a-record", "completion": "a"}\n')
    with pytest.raises(ValueError, match="not-a-record"):
        evaluate_tool.evaluate_run(load_config(config), evaluate_tool.read_predictions(unknown))
