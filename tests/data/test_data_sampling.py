"""Seeded k-shot samplers: the generic one and the readers that use it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from data_test_helpers import truncate_file, write_image

from megatron_vrft.data import read_coco_detection, read_image_folder, sample_k_shot


def _groups():
    return {f"class_{c}": [f"c{c}_item{i}" for i in range(3 + 4 * c)] for c in range(5)}


def test_sample_k_shot_seeded_exact_k_and_independent_per_class():
    groups = _groups()
    a = sample_k_shot(groups, 3, seed=7)
    b = sample_k_shot(groups, 3, seed=7)
    assert a == b
    for key, items in groups.items():
        assert len(a[key]) == min(3, len(items))
        assert len(set(a[key])) == len(a[key]) and set(a[key]) <= set(items)
    picks = {tuple(sorted(v)) for seed in range(6) for v in [sample_k_shot(groups, 3, seed=seed)["class_4"]]}
    assert len(picks) > 1  # different seeds, different picks
    assert sample_k_shot(groups, 3, seed=1) != sample_k_shot(groups, 3, seed=2)
    # Removing a class does not change the pick of the others.
    fewer = {k: v for k, v in groups.items() if k != "class_2"}
    c = sample_k_shot(fewer, 3, seed=7)
    assert all(c[k] == a[k] for k in fewer)
    # Small classes give all they have.
    assert sorted(sample_k_shot(groups, 100, seed=0)["class_0"]) == sorted(groups["class_0"])
    with pytest.raises(ValueError):
        sample_k_shot(groups, 0, seed=0)


def test_sample_k_shot_passes_over_rejected_items():
    groups = {"a": list(range(10))}
    bad = {3, 4, 5, 6, 7}
    got = sample_k_shot(groups, 4, seed=3, accept=lambda x: x not in bad)["a"]
    assert len(got) == 4 and not set(got) & bad
    assert len(sample_k_shot(groups, 9, seed=3, accept=lambda x: x not in bad)["a"]) == 5


def _coco(tmp_path, n_images=12):
    rng = np.random.default_rng(1)
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(["cat", "dog", "bus"])]
    images, anns = [], []
    for i in range(n_images):
        write_image(tmp_path / "img" / f"{i}.png", 40, 30, seed=i)
        images.append({"id": i, "file_name": f"{i}.png", "width": 40, "height": 30})
        for cat in rng.choice([1, 2, 3], size=2, replace=False):
            anns.append(
                {
                    "id": len(anns),
                    "image_id": i,
                    "category_id": int(cat),
                    "bbox": [2.0, 3.0, 10.0, 8.0],
                    "iscrowd": 0,
                    "area": 80.0,
                }
            )
    path = tmp_path / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
    per_cat = {c["name"]: {a["image_id"] for a in anns if a["category_id"] == c["id"]} for c in cats}
    return path, per_cat


def test_coco_k_shot_exactly_k_images_per_category_seeded(tmp_path):
    path, per_cat = _coco(tmp_path)

    def pick(seed, **kw):
        rs = read_coco_detection(path, tmp_path / "img", box_space="norm_1000", k_shot=3, seed=seed, **kw)
        out = {}
        for r in rs:
            out.setdefault(r.query, set()).add(r.metadata["image_id"])
        return out

    a = pick(0)
    assert a == pick(0)
    assert set(a) == set(per_cat)
    for name, imgs in a.items():
        assert len(imgs) == 3 and imgs <= per_cat[name]
    assert any(pick(s) != a for s in range(1, 5))
    # Skip mode: a corrupt image is replaced by the next one in the seeded order.
    victim = sorted(a["cat"])[0]
    truncate_file(tmp_path / "img" / f"{victim}.png")
    rs = read_coco_detection(path, tmp_path / "img", box_space="norm_1000", k_shot=3, seed=0, on_error="skip")
    cats_imgs = {r.metadata["image_id"] for r in rs if r.query == "cat"}
    assert len(cats_imgs) == 3 and victim not in cats_imgs
    assert rs.skips.counts["corrupt_image"] >= 1
    assert any(f"image id {victim}" in n for n in rs.skips.examples["corrupt_image"])


def test_image_folder_k_shot_seeded_and_skip_replaces_corrupt(tmp_path):
    for ci, c in enumerate(["a_b", "cc", "dd"]):
        for i in range(6):
            write_image(tmp_path / c / f"{i}.png", 20, 20, seed=10 * ci + i)

    def pick(seed, **kw):
        rs = read_image_folder(tmp_path, k_shot=2, seed=seed, **kw)
        return {(r.ground_truth.label, r.images[0].name) for r in rs}

    a = pick(5)
    assert a == pick(5) and len(a) == 6
    assert {lab for lab, _ in a} == {"a b", "cc", "dd"}
    assert any(pick(s) != a for s in range(6))
    victim = sorted(n for lab, n in a if lab == "cc")[0]
    truncate_file(tmp_path / "cc" / victim)
    with pytest.raises(Exception, match=victim):
        read_image_folder(tmp_path, k_shot=2, seed=5)
    rs = read_image_folder(tmp_path, k_shot=2, seed=5, on_error="skip")
    cc = [r.images[0].name for r in rs if r.ground_truth.label == "cc"]
    assert len(cc) == 2 and victim not in cc
    assert rs.skips.counts["corrupt_image"] == 1
