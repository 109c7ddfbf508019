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
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "evaluate.py"), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


# detection: the synthetic scenes at 224 x 224 in Qwen2-VL's native box space, with its rewards
DETECTION = [
    "data.task=detection",
    "data.coord_space=norm_1000",
    "data.max_pixels=50176",
    "reward.terms=[{name: format}, {name: iou}, {name: confidence}]",
]


@pytest.mark.slow
@pytest.mark.parametrize("task,overrides", [("classification", []), ("detection", DETECTION)])
def test_evaluate_checkpoint_writes_report_and_resumes(checkpoint, tmp_path, task, overrides):
    cfg = ROOT / "examples" / "configs" / "tiny_cpu.yaml"
    args = [
        "--config",
        cfg,
        "--checkpoint",
        checkpoint,
        "--output-dir",
        tmp_path,
        "--batch-size",
        "3",
        "data.num_synthetic=5",
        "rollout.max_new_tokens=6",
        *overrides,
    ]
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
    proc = run(
        "--config",
        ROOT / "examples" / "configs" / "tiny_cpu.yaml",
        "--checkpoint",
        tmp_path / "nope",
        "--output-dir",
        tmp_path,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "nope" in proc.stderr and "config.json" in proc.stderr


@pytest.mark.slow
def test_megatron_checkpoint_answers_like_the_hf_one(checkpoint, tmp_path):
    from megatron_vrft.models.conversion import convert_hf_to_megatron

    megatron = convert_hf_to_megatron(checkpoint, tmp_path / "mg", tp_size=2, progress=False)
    common = [
        "--config",
        ROOT / "examples" / "configs" / "tiny_cpu.yaml",
        "--batch-size",
        "4",
        "data.num_synthetic=6",
        "rollout.max_new_tokens=8",
    ]
    answers = {}
    for name, ckpt in (("hf", checkpoint), ("megatron", megatron)):
        proc = run(*common, "--checkpoint", ckpt, "--output-dir", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-3000:]
        answers[name] = sorted((tmp_path / name / "predictions.jsonl").read_text().splitlines())
    assert len(answers["hf"]) == 6
    assert answers["megatron"] == answers["hf"]


def write_coco(root: Path, sizes, *, bad_box_image: int | None = None) -> Path:
    """A COCO detection file over ``len(sizes)`` images (``(W, H)`` each, random pixels), one
    ``cat`` box per image; image ``bad_box_image`` (1-based) gets a box of negative width."""
    import numpy as np
    from PIL import Image

    (root / "images").mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i, (w, h) in enumerate(sizes, 1):
        pixels = np.random.default_rng(i).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        box = [0, 0, min(w, 40), min(h, 30)] if i != bad_box_image else [10, 10, -5, 8]
        annotations.append({"id": i, "image_id": i, "category_id": 1, "bbox": box, "area": 1.0, "iscrowd": 0})
    path = root / "instances.json"
    path.write_text(
        json.dumps({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "cat"}]})
    )
    return path


def coco_overrides(path: Path):
    return [
        *DETECTION,
        "data.source=coco",
        f"data.path={path}",
        f"data.image_root={path.parent / 'images'}",
        "rollout.max_new_tokens=6",
    ]


def test_bad_annotation_stops_before_anything_is_generated(tmp_path):
    # the checkpoint is a stub that cannot even be opened: the data error has to come first
    stub = tmp_path / "stub_ckpt"
    stub.mkdir()
    (stub / "config.json").write_text("{}")
    data = write_coco(tmp_path / "coco", [(64, 48)] * 3, bad_box_image=2)
    out = tmp_path / "out"
    proc = run(
        "--config",
        ROOT / "examples" / "configs" / "tiny_cpu.yaml",
        "--checkpoint",
        stub,
        "--output-dir",
        out,
        *coco_overrides(data),
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    error = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(error) == 1 and "image id 2" in error[0] and "degenerate" in error[0], proc.stderr[-3000:]
    assert not (out / "predictions.jsonl").exists()


def test_unusable_image_counts_as_a_missing_prediction(checkpoint, tmp_path):
    # image 2 is 500 x 2: it reads fine, but the Qwen2-VL processor refuses its aspect ratio, so
    # it is skipped at generation, listed, and scored as an empty answer
    data = write_coco(tmp_path / "coco", [(64, 48), (500, 2), (56, 56)])
    out = tmp_path / "out"
    proc = run(
        "--config",
        ROOT / "examples" / "configs" / "tiny_cpu.yaml",
        "--checkpoint",
        checkpoint,
        "--output-dir",
        out,
        "--batch-size",
        "2",
        *coco_overrides(data),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 records could not be used" in proc.stderr and "image id 2" in proc.stderr
    preds = [json.loads(line)["source_id"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 2 and not any("image id 2" in p for p in preds)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["missing_predictions"] == 1 and metrics["num_evaluated"] == 2 and metrics["num_samples"] == 3


def test_undecodable_image_is_skipped_at_generation_and_scored_missing(tmp_path):
    """The library steps of ``tools/evaluate.py --checkpoint``: records read once, ground truths
    from headers, examples with on_error="skip", generation, scoring. An image that breaks after
    the records were read (truncated) is never shown to the engine and counts as missing."""
    from megatron_vrft import builders
    from megatron_vrft.config import load_config
    from megatron_vrft.data import build_tiny_tokenizer
    from megatron_vrft.eval.evaluate import score_predictions
    from megatron_vrft.eval.predictions import generate_predictions, read_predictions

    data = write_coco(tmp_path / "coco", [(64, 48), (72, 40), (56, 56)])
    cfg = load_config(ROOT / "examples" / "configs" / "tiny_cpu.yaml", coco_overrides(data))
    records = builders.build_records(cfg.data)
    ground_truths = builders.build_eval_ground_truths(cfg.data, records)
    broken = data.parent / "images" / "2.png"
    broken.write_bytes(broken.read_bytes()[:60])  # header kept, pixels cut off
    processor = builders.build_processor(build_tiny_tokenizer(), cfg.data)
    examples = builders.build_examples(cfg.data, processor, records, on_error="skip", report=False)
    assert [e.source_id for e in examples] == [records[0].source_id, records[2].source_id]

    class Engine:  # answers every prompt with its ground-truth box; refuses the broken record
        def generate(self, batch, sampling, *, seed):
            assert all(e.source_id != records[1].source_id for e in batch)
            texts = [
                f'<think>.</think><answer>[{{"bbox_2d": {[round(v) for v in e.ground_truth.boxes[0]]}, '
                f'"label": "cat"}}]</answer>'
                for e in batch
            ]
            return type(
                "Batch", (), {"texts": texts, "__len__": lambda s: len(texts), "prompt_of": lambda s, i: batch[i]}
            )()

    part = generate_predictions(Engine(), examples, None, tmp_path / "out", batch_size=2)
    metrics = score_predictions(
        cfg.data.task,
        [r.source_id for r in records],
        ground_truths,
        read_predictions(part),
        **builders.eval_score_options(cfg.data, cfg.reward, records),
    )
    assert metrics["missing_predictions"] == 1 and metrics["num_samples"] == 3
    assert 0.0 < metrics["AP50"] < 1.0  # two of three images found, the third's box missed


def test_checkpoint_resolution_and_opening(checkpoint, tmp_path):
    from megatron_vrft.models.checkpoints import open_checkpoint, resolve_checkpoint
    from megatron_vrft.models.conversion import CHECKPOINT_META_FILE

    assert resolve_checkpoint(checkpoint) == checkpoint
    run_dir = tmp_path / "checkpoints"  # a run's folder: `latest` names the newest complete one
    (run_dir / "step_3").mkdir(parents=True)
    (run_dir / "step_3" / CHECKPOINT_META_FILE).write_text("{}")
    (run_dir / "latest").write_text("step_3\n")
    assert resolve_checkpoint(run_dir) == run_dir / "step_3"
    with pytest.raises(FileNotFoundError, match="nope.*config.json.*megatron_vrft_checkpoint.json"):
        resolve_checkpoint(tmp_path / "nope")
    opened = open_checkpoint(checkpoint)
    assert opened.kind == "hf" and opened.tokenizer_dir == checkpoint and opened.arch.vocab_size > 0
    name, tensor = next(iter(opened.weights))
    assert isinstance(name, str) and tensor.numel() > 0
