"""Synthetic tasks: boxes match the drawn pixels, labels are exact, everything is seeded."""

from __future__ import annotations

import numpy as np
from data_test_helpers import tiny_processor

from megatron_vrft.data import (
    build_synthetic_classification,
    build_synthetic_detection,
    build_synthetic_grounding,
    load_image,
    preprocess_record,
)
from megatron_vrft.data.synthetic import COLORS, compose_scene


def _changed_bbox(scene: np.ndarray, bg: np.ndarray, region) -> tuple[int, int, int, int] | None:
    x1, y1, x2, y2 = region
    diff = np.any(scene[y1:y2, x1:x2] != bg[y1:y2, x1:x2], axis=-1)
    ys, xs = np.nonzero(diff)
    if len(xs) == 0:
        return None
    return x1 + xs.min(), y1 + ys.min(), x1 + xs.max() + 1, y1 + ys.max() + 1


def test_scene_boxes_are_exactly_the_changed_pixels():
    rng = np.random.default_rng(0)
    specs = [
        ("circle", "red"),
        ("star", "blue"),
        ("triangle", "yellow"),
        ("diamond", "white"),
        ("square", "cyan"),
    ]
    for trial in range(4):
        scene, bg, objects = compose_scene(rng, specs[: 2 + trial], size=(200, 150), background="photo")
        s, b = np.asarray(scene), np.asarray(bg)
        h, w = s.shape[:2]
        for o in objects:
            x1, y1, x2, y2 = (int(v) for v in o.box)
            # A window 3 px larger (objects are >= 4 px apart) sees only this object's pixels.
            win = (max(0, x1 - 3), max(0, y1 - 3), min(w, x2 + 3), min(h, y2 + 3))
            assert _changed_bbox(s, b, win) == (x1, y1, x2, y2), o
            inside = s[y1:y2, x1:x2].reshape(-1, 3)
            frac = np.mean(np.all(inside == np.array(COLORS[o.color]), axis=-1))
            assert frac > 0.3, (o, frac)  # the shape fills a good part of its box
        # Nothing changed outside the boxes.
        mask = np.zeros((h, w), dtype=bool)
        for o in objects:
            x1, y1, x2, y2 = (int(v) for v in o.box)
            mask[y1:y2, x1:x2] = True
        assert not np.any(np.any(s != b, axis=-1) & ~mask)


def test_detection_ground_truth_and_determinism(tmp_path):
    a = build_synthetic_detection(6, seed=3, empty_fraction=0.3, out_dir=tmp_path / "a")
    b = build_synthetic_detection(6, seed=3, empty_fraction=0.3, out_dir=tmp_path / "b")
    c = build_synthetic_detection(6, seed=4)
    n_empty = 0
    for ra, rb in zip(a, b):
        assert ra.problem == rb.problem
        np.testing.assert_array_equal(ra.ground_truth.boxes, rb.ground_truth.boxes)
        assert np.array_equal(np.asarray(load_image(ra.images[0])), np.asarray(load_image(rb.images[0])))
        objs = ra.metadata["objects"]
        exp = [o.box for o in objs if o.shape == ra.query]
        np.testing.assert_array_equal(ra.ground_truth.boxes, np.asarray(exp).reshape(-1, 4))
        assert set(ra.ground_truth.categories) <= {ra.query}
        assert f"category '{ra.query}'" in ra.problem
        n_empty += len(exp) == 0
    assert 0 < n_empty < 6  # the negatives ("No Objects") exist but are not everything
    assert any(
        not np.array_equal(np.asarray(load_image(x.images[0])), np.asarray(load_image(y.images[0])))
        for x, y in zip(a, c)
    )
    allc = build_synthetic_detection(3, seed=0, prompt_categories="all", max_objects=3)
    for r in allc:
        assert len(r.ground_truth.boxes) == len(r.metadata["objects"]) and "'Label'" in r.problem


def test_grounding_expression_is_true_and_unique():
    rs = build_synthetic_grounding(8, seed=5, background="plain")
    for r in rs:
        objs, t = r.metadata["objects"], r.metadata["target"]
        target = objs[t]
        assert r.query.startswith(f"the {target.color} {target.shape} ")
        assert sum((o.color, o.shape) == (target.color, target.shape) for o in objs) == 1
        rel = next(x for x in ("left of", "right of", "above", "below") if f" {x} " in r.query)
        anchor_desc = r.query.split(f" {rel} the ")[1]
        anchor = next(o for o in objs if f"{o.color} {o.shape}" == anchor_desc)
        a, b = target.box, anchor.box
        assert {
            "left of": a[2] <= b[0],
            "right of": a[0] >= b[2],
            "above": a[3] <= b[1],
            "below": a[1] >= b[3],
        }[rel]
        np.testing.assert_array_equal(r.ground_truth.box, target.box)
        assert r.query in r.problem


def test_classification_photos_and_shapes_preprocess():
    photos = build_synthetic_classification(6, seed=1, kind="photo")
    assert [r.ground_truth.label for r in photos] == [
        "astronaut",
        "coffee",
        "cat",
        "rocket",
        "pagoda",
        "flower",
    ]
    again = build_synthetic_classification(6, seed=1, kind="photo")
    assert all(np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0])) for x, y in zip(photos, again))
    # Different classes are different photographs (a crude but real check of the labels).
    means = [np.asarray(r.images[0], dtype=np.float64).mean(axis=(0, 1)) for r in photos]
    assert min(np.abs(means[i] - means[j]).sum() for i in range(6) for j in range(i)) > 1.0
    shapes = build_synthetic_classification(5, seed=2, kind="shape")
    assert [r.ground_truth.label for r in shapes] == [
        "circle",
        "square",
        "triangle",
        "star",
        "diamond",
    ]
    proc = tiny_processor(max_pixels=28 * 28 * 16)
    ex = preprocess_record(shapes[0], proc)
    assert ex.ground_truth.label == "circle" and ex.pixel_values.shape[0] == int(ex.image_grid_thw.prod())
