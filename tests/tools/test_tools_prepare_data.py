"""tools/prepare_data.py as a user runs it (subprocess): output, printed summary, error lines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "prepare_data.py"


def run_tool(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, str(TOOL), *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def write_coco(root: Path) -> Path:
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i in range(1, 21):
        w, h = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
        images.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        for cat in rng.choice(4, size=2, replace=False) + 1:
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i,
                    "category_id": int(cat),
                    "bbox": [1, 1, 8, 8],
                    "area": 64.0,
                    "iscrowd": int(rng.random() < 0.2),
                }
            )
    path = root / "instances.json"
    path.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": anns,
                "categories": [{"id": c, "name": n} for c, n in enumerate(["cat", "dog", "bus", "stop sign"], 1)],
            }
        )
    )
    return path


def test_coco_subcommand_writes_subset_and_summary(tmp_path):
    ann = write_coco(tmp_path)
    out = tmp_path / "sub" / "fewshot.json"
    res = run_tool(
        "coco", "--annotations", ann, "--out", out, "--k", 2, "--seed", 4, "--categories", "cat", "stop sign"
    )
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    shots = {}
    for a in data["annotations"]:
        if not a["iscrowd"]:
            shots.setdefault(a["category_id"], set()).add(a["image_id"])
    assert {c["name"] for c in data["categories"]} == {"cat", "stop sign"}
    assert all(len(v) <= 2 for v in shots.values())
    for cat_id, name in ((1, "cat"), (4, "stop sign")):
        assert f"    {name}: {len(shots.get(cat_id, ()))}" in res.stdout
    again = run_tool("coco", "--annotations", ann, "--out", out, "--k", 2)
    assert again.returncode == 2 and "output exists" in again.stderr


def test_missing_input_is_one_line_without_traceback(tmp_path):
    for args in (
        ("coco", "--annotations", tmp_path / "nope.json", "--out", tmp_path / "o.json", "--k", 1),
        ("image-folder", "--dataset", "pets", "--root", tmp_path / "nope", "--out", tmp_path / "o", "--k", 1),
        ("lisa", "--root", tmp_path / "nope", "--out", tmp_path / "o"),
        ("visual-rft", "--source", tmp_path / "nope.parquet", "--out", tmp_path / "o"),
    ):
        res = run_tool(*args)
        assert res.returncode == 2
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in res.stderr and "nope" in lines[0], res.stderr
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.json").exists()


def test_ov_split_subcommand(tmp_path):
    res = run_tool("ov-split", "--split", "coco-48-17", "--out", tmp_path / "ov")
    assert res.returncode == 0, res.stderr
    assert "base: 48" in res.stdout and "novel: 17" in res.stdout
    assert sorted(p.name for p in (tmp_path / "ov").iterdir()) == ["base.yaml", "novel.yaml", "split.json"]
