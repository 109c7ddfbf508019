"""Dataset builders (``megatron_vrft.data.prepare``): synthetic inputs in each release layout,
built twice and read back with the project's readers and pycocotools; caps checked against counts
computed here from the inputs and outputs."""

from __future__ import annotations

import base64
import io
import json
import random
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import yaml
from data_test_helpers import random_image, write_image

from megatron_vrft.config.loader import apply_overrides
from megatron_vrft.data.errors import DataError
from megatron_vrft.data.prepare import (
    COCO_OV_BASE_48,
    COCO_OV_NOVEL_17,
    FLOWERS102_CLASSES,
    build_aircraft,
    build_cars,
    build_coco_fewshot,
    build_flowers102,
    build_lisa,
    build_ov_split,
    build_pets,
    build_visual_rft,
)
from megatron_vrft.data.prepare.common import safe_folder_name
from megatron_vrft.data.readers import read_coco_detection, read_image_folder, read_lisa_grounding, read_visual_rft

CATS = ["cat", "dog", "bus", "stop sign", "train", "bed", "toilet", "kite", "fork", "horse"]


# ---------------------------------------------------------------- COCO / LVIS inputs


def make_coco(root: Path, *, seed: int = 0, num_images: int = 40, lvis: bool = False) -> Path:
    """Images of random sizes and an instance JSON with random boxes over 10 categories; about one
    annotation in eight is a crowd region; LVIS adds frequencies and per-image id lists."""
    rng = np.random.default_rng(seed)
    images, anns = [], []
    for img_id in range(1, num_images + 1):
        w, h = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        write_image(root / "images" / f"{img_id:04d}.png", w, h, seed=img_id)
        img = {"id": img_id, "file_name": f"{img_id:04d}.png", "width": w, "height": h}
        present = rng.choice(len(CATS), size=int(rng.integers(1, 4)), replace=False) + 1
        for cat in present:
            for _ in range(int(rng.integers(1, 3))):
                x, y = rng.uniform(0, w - 8), rng.uniform(0, h - 8)
                bw, bh = rng.uniform(4, w - x), rng.uniform(4, h - y)
                anns.append(
                    {
                        "id": len(anns) + 1,
                        "image_id": img_id,
                        "category_id": int(cat),
                        "bbox": [x, y, bw, bh],
                        "area": bw * bh,
                        "iscrowd": int(rng.random() < 0.125) if not lvis else 0,
                    }
                )
        if lvis:
            absent = [c for c in range(1, len(CATS) + 1) if c not in present]
            img["neg_category_ids"] = [int(c) for c in rng.choice(absent, size=2, replace=False)]
            img["not_exhaustive_category_ids"] = [int(present[0])] if rng.random() < 0.3 else []
        images.append(img)
    cats = [{"id": i + 1, "name": n, "supercategory": "thing"} for i, n in enumerate(CATS)]
    if lvis:
        for c in cats:
            c["frequency"] = "rcf"[c["id"] % 3]
    path = root / ("lvis.json" if lvis else "instances.json")
    path.write_text(
        json.dumps({"info": {"description": "synthetic"}, "images": images, "annotations": anns, "categories": cats})
    )
    return path


def images_per_category(data: dict) -> dict[int, set[int]]:
    """Category id -> images with a non-crowd annotation of it (what counts as a shot)."""
    out: dict[int, set[int]] = defaultdict(set)
    for a in data["annotations"]:
        if not a.get("iscrowd", 0):
            out[a["category_id"]].add(a["image_id"])
    return out


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory) -> Path:
    return make_coco(tmp_path_factory.mktemp("coco"), num_images=60)


def test_coco_fewshot_is_deterministic_and_seed_dependent(coco_file, tmp_path):
    a = build_coco_fewshot(coco_file, tmp_path / "a.json", k=3, seed=5)
    build_coco_fewshot(coco_file, tmp_path / "b.json", k=3, seed=5)
    build_coco_fewshot(coco_file, tmp_path / "c.json", k=3, seed=6)
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert (tmp_path / "a.json").read_bytes() != (tmp_path / "c.json").read_bytes()
    assert a.total > 0 and not list(tmp_path.glob(".*tmp*"))  # no temporary left behind


@pytest.mark.parametrize("mode", ["per-category", "greedy"])
def test_coco_fewshot_never_exceeds_k(coco_file, tmp_path, mode):
    source = json.loads(coco_file.read_text())
    available = images_per_category(source)
    by_id = {a["id"]: a for a in source["annotations"]}
    for trial in range(6):
        rnd = random.Random(trial)
        k, seed = rnd.randint(1, 5), rnd.randint(0, 10**6)
        chosen = sorted(rnd.sample(CATS, rnd.randint(2, len(CATS))))
        out = tmp_path / f"{mode}-{trial}.json"
        summary = build_coco_fewshot(coco_file, out, k=k, seed=seed, categories=chosen, mode=mode)
        data = json.loads(out.read_text())
        counts = images_per_category(data)
        ids = {c["name"]: c["id"] for c in source["categories"]}
        assert {c["name"] for c in data["categories"]} == set(chosen)
        for name in chosen:
            n = len(counts.get(ids[name], ()))
            assert n <= k
            assert summary.written[name] == n
            if mode == "per-category":
                assert n == min(k, len(available[ids[name]]))
        # annotations are verbatim copies of input annotations of chosen categories on kept images
        kept_images = {img["id"] for img in data["images"]}
        for a in data["annotations"]:
            assert by_id[a["id"]] == a and a["image_id"] in kept_images
            assert a["category_id"] in {ids[n] for n in chosen}
        # every (image, category) kept keeps all its annotations, crowd ones included
        pairs = {(a["image_id"], a["category_id"]) for a in data["annotations"]}
        want = {a["id"] for a in source["annotations"] if (a["image_id"], a["category_id"]) in pairs}
        assert want == {a["id"] for a in data["annotations"]}
        if mode == "greedy":  # images are kept whole (all chosen categories)
            whole = {
                a["id"]
                for a in source["annotations"]
                if a["image_id"] in kept_images and a["category_id"] in {ids[n] for n in chosen}
            }
            assert whole == {a["id"] for a in data["annotations"]}


def test_coco_fewshot_loads_with_pycocotools_and_the_reader(coco_file, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "sub.json"
    summary = build_coco_fewshot(coco_file, out, k=2, seed=3)
    coco = COCO(str(out))
    assert len(coco.getAnnIds(iscrowd=True)) == summary.extra["num_crowd_annotations"]
    assert len(coco.imgs) == summary.extra["num_images"]
    records = read_coco_detection(out, coco_file.parent / "images", box_space="norm_1000")
    assert len(records) == summary.total  # one record per (image, category) shot
    per_cat = defaultdict(int)
    for r in records:
        per_cat[r.query] += 1
    assert dict(per_cat) == {k: v for k, v in summary.written.items() if v}
    # the subset holds the reader's own k-shot pick for the same seed
    direct = read_coco_detection(coco_file, coco_file.parent / "images", box_space="norm_1000", k_shot=2, seed=3)
    key = lambda rs: sorted((r.metadata["image_id"], r.query) for r in rs)  # noqa: E731
    assert key(records) == key(direct)


def test_coco_fewshot_crowd_regions_reach_the_reader(tmp_path):
    path = make_coco(tmp_path, seed=11, num_images=30)
    source = json.loads(path.read_text())
    crowd = {(a["image_id"], a["category_id"]) for a in source["annotations"] if a["iscrowd"]}
    assert crowd, "the synthetic set should have crowd regions"
    out = tmp_path / "sub.json"
    build_coco_fewshot(path, out, k=30, seed=0)  # k above every count: every pair is kept
    data = json.loads(out.read_text())
    assert sum(a["iscrowd"] for a in data["annotations"]) == sum(
        a["iscrowd"]
        for a in source["annotations"]
        if (a["image_id"], a["category_id"])
        in {(b["image_id"], b["category_id"]) for b in source["annotations"] if not b["iscrowd"]}
    )
    records = read_coco_detection(out, tmp_path / "images", box_space="norm_1000")
    assert sum(len(r.ground_truth.crowd_boxes) for r in records) > 0


def test_lvis_fewshot_keeps_federated_fields_for_selected_categories(tmp_path):
    path = make_coco(tmp_path, seed=2, lvis=True)
    chosen = ["cat", "dog", "bus", "kite"]
    summary = build_coco_fewshot(path, tmp_path / "lvis_sub.json", k=2, seed=1, categories=chosen)
    assert summary.builder == "lvis-fewshot"
    data = json.loads((tmp_path / "lvis_sub.json").read_text())
    ids = {c["id"] for c in data["categories"]}
    assert all("frequency" in c for c in data["categories"]) and len(ids) == 4
    for img in data["images"]:
        assert set(img["neg_category_ids"]) <= ids and set(img["not_exhaustive_category_ids"]) <= ids
    assert max(len(v) for v in images_per_category(data).values()) <= 2


def test_coco_fewshot_errors(coco_file, tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_coco_fewshot(tmp_path / "missing.json", tmp_path / "o.json", k=1)
    with pytest.raises(DataError, match="unknown categories"):
        build_coco_fewshot(coco_file, tmp_path / "o.json", k=1, categories=["unicorn"])
    build_coco_fewshot(coco_file, tmp_path / "o.json", k=1)
    with pytest.raises(DataError, match="output exists"):
        build_coco_fewshot(coco_file, tmp_path / "o.json", k=1)
    build_coco_fewshot(coco_file, tmp_path / "o.json", k=2, overwrite=True)


# ---------------------------------------------------------------- open-vocabulary splits


def test_coco_ov_split_fragments_load_as_config(tmp_path):
    assert len(COCO_OV_BASE_48) == 48 and len(COCO_OV_NOVEL_17) == 17
    assert not set(COCO_OV_BASE_48) & set(COCO_OV_NOVEL_17)
    summary = build_ov_split(tmp_path / "ov", split="coco-48-17")
    assert summary.written == {"base": 48, "novel": 17}
    for name, want in (("base", COCO_OV_BASE_48), ("novel", COCO_OV_NOVEL_17)):
        fragment = yaml.safe_load((tmp_path / "ov" / f"{name}.yaml").read_text())
        assert fragment == {"data": {"categories": list(want)}}
        override = "data.categories=" + json.dumps(list(want))
        assert apply_overrides({}, [override])["data"]["categories"] == list(want)
    with pytest.raises(DataError, match="not in the file"):  # synthetic file lacks most names
        build_ov_split(tmp_path / "ov2", split="coco-48-17", annotation_file=make_coco(tmp_path / "c", num_images=3))


def test_lvis_rare_split(tmp_path):
    path = make_coco(tmp_path, lvis=True, num_images=3)
    build_ov_split(tmp_path / "ov", split="lvis-rare", annotation_file=path)
    split = json.loads((tmp_path / "ov" / "split.json").read_text())
    cats = json.loads(path.read_text())["categories"]
    assert split["novel"] == [c["name"] for c in cats if c["frequency"] == "r"]
    assert sorted(split["base"] + split["novel"]) == sorted(CATS)
    with pytest.raises(DataError, match="needs the LVIS annotation file"):
        build_ov_split(tmp_path / "ov3", split="lvis-rare")


# ---------------------------------------------------------------- image-folder builders


def _assert_class_folders(out: Path, summary, k: int, expected_labels: dict[str, list[str]]):
    """Reader loads the output; every class <= k; each image in the class it was listed under."""
    records = read_image_folder(out)
    per_label: dict[str, list[str]] = defaultdict(list)
    for r in records:
        per_label[r.ground_truth.label].append(Path(r.images[0]).name)
    for label, files in per_label.items():
        assert len(files) <= k
        assert set(files) <= set(expected_labels[label])
    assert {k_: len(v) for k_, v in per_label.items()} == {
        safe_folder_name(name).replace("_", " "): n for name, n in summary.written.items()
    }
    for label, files in expected_labels.items():
        assert len(per_label.get(label, [])) == min(k, len(files))


def test_flowers102(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "flowers"
    rng = np.random.default_rng(0)
    labels = rng.integers(1, 6, size=40)  # 5 classes used
    for i in range(1, 41):
        write_image(root / "jpg" / f"image_{i:05d}.jpg", 20, 16, seed=i)
    savemat(root / "imagelabels.mat", {"labels": labels[None, :].astype(np.uint8)})
    perm = rng.permutation(np.arange(1, 41))
    savemat(
        root / "setid.mat", {"trnid": perm[:25][None, :], "valid": perm[25:32][None, :], "tstid": perm[32:][None, :]}
    )
    expected: dict[str, list[str]] = defaultdict(list)
    for num in perm[:25]:
        expected[FLOWERS102_CLASSES[labels[num - 1] - 1]].append(f"image_{num:05d}.jpg")
    for k in (1, 3):
        s = build_flowers102(root, tmp_path / f"out{k}", k=k, seed=7)
        _assert_class_folders(tmp_path / f"out{k}", s, k, expected)
    build_flowers102(root, tmp_path / "again", k=3, seed=7)
    build_flowers102(root, tmp_path / "other", k=3, seed=8)
    listing = lambda p: sorted(str(f.relative_to(p)) for f in p.rglob("*"))  # noqa: E731
    assert listing(tmp_path / "out3") == listing(tmp_path / "again")
    assert listing(tmp_path / "out3") != listing(tmp_path / "other")
    with pytest.raises(DataError, match="setid.mat"):
        (root / "setid.mat").unlink()
        build_flowers102(root, tmp_path / "x", k=1)


def test_pets(tmp_path):
    root = tmp_path / "pets"
    breeds = ["Abyssinian", "american_bulldog", "Bengal", "great_pyrenees"]
    rng = np.random.default_rng(1)
    lines, expected = [], defaultdict(list)
    for b, breed in enumerate(breeds):
        for n in range(1, int(rng.integers(2, 7)) + 1):
            write_image(root / "images" / f"{breed}_{n}.jpg", 12, 12, seed=b * 10 + n)
            lines.append(f"{breed}_{n} {b + 1} 1 {b + 1}")
            expected[breed.replace("_", " ")].append(f"{breed}_{n}.jpg")
    (root / "annotations").mkdir()
    (root / "annotations" / "trainval.txt").write_text("\n".join(lines) + "\n")
    s = build_pets(root, tmp_path / "out", k=3, seed=0)
    _assert_class_folders(tmp_path / "out", s, 3, expected)


def test_aircraft_with_slash_in_variant(tmp_path):
    root = tmp_path / "fgvc"
    variants = ["707-320", "F-16A/B", "Cessna 172", "A330-200"]
    lines, expected = [], defaultdict(list)
    for v, variant in enumerate(variants):
        for n in range(v + 2):
            image_id = f"{1000000 + v * 100 + n}"
            write_image(root / "data" / "images" / f"{image_id}.jpg", 14, 10, seed=v * 100 + n)
            lines.append(f"{image_id} {variant}")
            expected[variant.replace("/", "-")].append(f"{image_id}.jpg")
    lines.append("1999999 Cessna 172")  # listed, file missing: skipped and counted
    (root / "data" / "images_variant_train.txt").write_text("\n".join(lines) + "\n")
    s = build_aircraft(root, tmp_path / "out", k=3, seed=2)
    _assert_class_folders(tmp_path / "out", s, 3, expected)
    names = json.loads((tmp_path / "out" / "class_names.json").read_text())
    assert names["F-16A-B"] == "F-16A/B"
    assert s.skipped["missing_image"] <= 1


def test_stanford_cars_devkit(tmp_path):
    from scipy.io import savemat

    root = tmp_path / "cars"
    names = ["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "BMW M3 Coupe 2012"]
    dt = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    rng = np.random.default_rng(4)
    classes = rng.integers(1, 4, size=12)
    anns = np.zeros((1, 12), dtype=dt)
    expected = defaultdict(list)
    for i, c in enumerate(classes):
        fname = f"{i + 1:05d}.jpg"
        write_image(root / "cars_train" / fname, 16, 12, seed=i)
        anns[0, i] = (1, 1, 10, 10, np.uint8(c), fname)
        expected[names[c - 1]].append(fname)
    (root / "devkit").mkdir()
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": np.array(names, dtype=object)[None, :]})
    savemat(root / "devkit" / "cars_train_annos.mat", {"annotations": anns})
    s = build_cars(root, tmp_path / "out", k=2, seed=0)
    _assert_class_folders(tmp_path / "out", s, 2, expected)


# ---------------------------------------------------------------- LISA


def _labelme(points_list, labels, texts, is_sentence, w, h):
    return {
        "text": texts,
        "is_sentence": is_sentence,
        "imageWidth": w,
        "imageHeight": h,
        "shapes": [{"label": lab, "points": pts, "shape_type": "polygon"} for pts, lab in zip(points_list, labels)],
    }


def test_lisa_conversion_boxes_and_reader(tmp_path):
    src = tmp_path / "ReasonSeg" / "train"
    rng = np.random.default_rng(3)
    expected = {}
    for i in range(8):
        w, h = int(rng.integers(30, 80)), int(rng.integers(30, 80))
        write_image(src / f"img{i}.jpg", w, h, seed=i)
        polys = [rng.uniform([-5, -5], [w + 5, h + 5], size=(int(rng.integers(3, 7)), 2)).tolist() for _ in range(2)]
        labels = ["target", "target" if i % 2 else "ignore"]
        if i % 4 == 3:
            polys.append([[0, 0], [w, 0], [w, h]])
            labels.append("flag")
        texts = [f"query {i} {j}" for j in range(1 + i % 3)]
        (src / f"img{i}.json").write_text(json.dumps(_labelme(polys, labels, texts, i % 2 == 0, w, h)))
        pts = np.concatenate([np.asarray(p) for p, lab in zip(polys, labels) if lab == "target"])
        expected[f"img{i}"] = (np.clip(pts.min(0), 0, [w, h]).tolist() + np.clip(pts.max(0), 0, [w, h]).tolist(), texts)
    (src / "img8.json").write_text(json.dumps(_labelme([], [], ["q"], True, 5, 5)))  # no image
    write_image(src / "img9.jpg", 10, 10, seed=9)
    (src / "img9.json").write_text(json.dumps(_labelme([[[1, 1], [3, 1], [3, 3]]], ["ignore"], ["q"], True, 10, 10)))
    s = build_lisa(src, tmp_path / "out")
    assert s.skipped == {"missing_image": 1, "no_target_polygon": 1}
    data = json.loads((tmp_path / "out" / "lisa.json").read_text())
    assert [e["id"] for e in data["entries"]] == sorted(expected)
    for e in data["entries"]:
        np.testing.assert_allclose(e["box"], expected[e["id"]][0], rtol=0, atol=1e-12)
    records = read_lisa_grounding(tmp_path / "out" / "lisa.json", box_space="norm_1000")
    assert len(records) == sum(len(t) for _, t in expected.values()) == s.extra["num_queries"]
    build_lisa(src, tmp_path / "again")
    assert (tmp_path / "out" / "lisa.json").read_bytes() == (tmp_path / "again" / "lisa.json").read_bytes()
    phrase = build_lisa(src, tmp_path / "phrase", kind="phrase")
    assert phrase.extra["num_entries"] == 4
    with pytest.raises(DataError, match="not found"):
        build_lisa(tmp_path / "nope", tmp_path / "o")


# ---------------------------------------------------------------- Visual-RFT tables


def _png_bytes(seed: int, w: int = 12, h: int = 10) -> bytes:
    buf = io.BytesIO()
    random_image(w, h, seed).save(buf, format="PNG")
    return buf.getvalue()


def _vrft_rows(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    labels = ["wallflower", "daffodil", "lotus", "rose"]
    rows = []
    for i in range(n):
        kind = i % 5
        image = {"bytes": _png_bytes(int(rng.integers(0, 6))), "path": None}  # repeated images
        if kind == 4:
            rows.append(
                {
                    "image": image,
                    "problem": "Locate the thing.",
                    "solution": f"<answer>[{i % 5}, 1, {i % 5 + 5}, 8]</answer>",
                }
            )
        else:
            rows.append(
                {
                    "image": image,
                    "problem": "What flower is this?",
                    "solution": f"<answer>{labels[int(rng.integers(0, 4))]}</answer>",
                }
            )
    return rows


def test_visual_rft_import_parquet_with_k(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _vrft_rows(40, seed=0)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
    full = build_visual_rft(tmp_path / "train.parquet", tmp_path / "all")
    assert full.extra["num_rows"] == 40 and full.extra["num_images"] <= 6
    for k in (1, 2, 3):
        s = build_visual_rft(tmp_path / "train.parquet", tmp_path / f"k{k}", k=k, seed=k)
        records = read_visual_rft(tmp_path / f"k{k}", coord_space="pixels_original")
        per_class = defaultdict(int)
        for r in records:
            per_class[r.ground_truth.label if r.task == "classification" else "(no class)"] += 1
        assert per_class["(no class)"] == 8  # grounding rows are not capped
        assert all(v <= k for c, v in per_class.items() if c != "(no class)")
        assert dict(per_class) == s.written
        original = {(r["solution"], r["image"]["bytes"]) for r in rows}
        table = pq.read_table(tmp_path / f"k{k}" / "train.parquet").to_pylist()
        for row in table:
            assert (row["solution"], (tmp_path / f"k{k}" / row["image"]).read_bytes()) in original
    build_visual_rft(tmp_path / "train.parquet", tmp_path / "k2b", k=2, seed=2)
    build_visual_rft(tmp_path / "train.parquet", tmp_path / "k2c", k=2, seed=99)
    assert (tmp_path / "k2" / "train.parquet").read_bytes() == (tmp_path / "k2b" / "train.parquet").read_bytes()
    assert (tmp_path / "k2" / "train.parquet").read_bytes() != (tmp_path / "k2c" / "train.parquet").read_bytes()


def test_visual_rft_import_json_rows(tmp_path):
    rows = _vrft_rows(10, seed=1)
    write_image(tmp_path / "pic.png", 9, 9, seed=0)
    for r in rows:
        r["image"] = {"bytes": base64.b64encode(r["image"]["bytes"]).decode(), "path": None}
    rows.append({"image": "pic.png", "problem": "What flower is this?", "solution": "<answer>rose</answer>"})
    rows.append({"image": "missing.png", "problem": "What flower is this?", "solution": "<answer>rose</answer>"})
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    s = build_visual_rft(tmp_path / "rows.json", tmp_path / "out")
    assert s.skipped == {"missing_image": 1} and s.extra["num_rows"] == 11
    assert len(read_visual_rft(tmp_path / "out", coord_space="pixels_original")) == 11
