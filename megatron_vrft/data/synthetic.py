"""Synthetic visual tasks with exact labels, for tests and the CPU demo.

Real photographs (scikit-image's ``astronaut``, ``coffee``, ``chelsea``, ``rocket``, ...;
scikit-learn's ``china.jpg`` / ``flower.jpg``) serve as backgrounds or as classification classes;
coloured shapes (circle, square, triangle, star, diamond) are drawn on them at known places. A
shape's box is the bounding box of the pixels actually drawn (``x2``/``y2`` exclusive, i.e.
continuous pixel-edge coordinates), so the ground truth is exact by construction.

Everything is seeded: the same arguments give the same images, boxes and prompts. scikit-image is
imported lazily; scikit-learn is not imported at all (its two JPEGs are read from the package
directory), so these extras cost nothing unless used.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from .boxes import CoordSpace
from .errors import SkipCounts
from .prompts import (
    build_classification_prompt,
    build_detection_prompt,
    build_grounding_prompt,
)
from .records import GroundTruth, RecordSet, VisualRecord

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (20, 170, 40),
    "blue": (30, 60, 235),
    "yellow": (250, 225, 20),
    "orange": (250, 140, 0),
    "purple": (140, 40, 180),
    "white": (250, 250, 250),
    "cyan": (0, 205, 225),
}
# Default classes of the colour task (``kind="color"``).
COLOR_CLASSES: tuple[str, ...] = ("red", "green", "blue", "yellow")
# Classification classes backed by real photographs: label -> (package, name).
PHOTO_CLASSES: dict[str, tuple[str, str]] = {
    "astronaut": ("skimage", "astronaut"),
    "coffee": ("skimage", "coffee"),
    "cat": ("skimage", "chelsea"),
    "rocket": ("skimage", "rocket"),
    "pagoda": ("sklearn", "china.jpg"),
    "flower": ("sklearn", "flower.jpg"),
}
BACKGROUNDS: tuple[str, ...] = ("astronaut", "coffee", "cat", "rocket", "pagoda", "flower")


def load_photo(label: str) -> Image.Image:
    """The RGB photograph behind a :data:`PHOTO_CLASSES` label (offline; lazy imports)."""
    if label not in PHOTO_CLASSES:
        raise ValueError(f"unknown photo {label!r}; available: {sorted(PHOTO_CLASSES)}")
    package, name = PHOTO_CLASSES[label]
    if package == "skimage":
        import skimage.data

        return Image.fromarray(np.asarray(getattr(skimage.data, name)())).convert("RGB")
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scikit-learn is needed for the 'pagoda' / 'flower' photographs")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "images" / name
    with Image.open(path) as img:
        return img.convert("RGB")


def _shape_polygon(shape: str, x: float, y: float, s: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(x + s / 2, y), (x + s, y + s), (x, y + s)]
    if shape == "diamond":
        return [(x + s / 2, y), (x + s, y + s / 2), (x + s / 2, y + s), (x, y + s / 2)]
    if shape == "star":
        cx, cy, r_out = x + s / 2, y + s / 2, s / 2
        pts = []
        for i in range(10):
            r = r_out if i % 2 == 0 else r_out * 0.45
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        return pts
    return None


def draw_shape_mask(shape: str, size: tuple[int, int], x: int, y: int, s: int) -> Image.Image:
    """An ``L`` mask of ``size = (W, H)`` with ``shape`` drawn (255) in the square ``(x, y, s)``."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    if shape == "circle":
        draw.ellipse([x, y, x + s - 1, y + s - 1], fill=255)
    elif shape == "square":
        draw.rectangle([x, y, x + s - 1, y + s - 1], fill=255)
    else:
        poly = _shape_polygon(shape, x, y, s - 1)
        if poly is None:
            raise ValueError(f"unknown shape {shape!r}; available: {SHAPES}")
        draw.polygon(poly, fill=255)
    return mask


@dataclass(frozen=True)
class DrawnObject:
    """One shape drawn on a scene."""

    shape: str
    color: str
    box: tuple[float, float, float, float]
    """Exact ``(x1, y1, x2, y2)`` of the drawn pixels (x2/y2 exclusive) in original pixels."""


def _background(
    rng: np.random.Generator, size: tuple[int, int], kind: str, cache: dict[str, Image.Image]
) -> Image.Image:
    if kind == "plain":
        return Image.new("RGB", size, tuple(int(v) for v in rng.integers(60, 196, size=3)))
    if kind != "photo":
        raise ValueError(f"background must be 'photo' or 'plain', got {kind!r}")
    name = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if name not in cache:
        cache[name] = load_photo(name)
    return cache[name].resize(size, Image.BICUBIC)


def compose_scene(
    rng: np.random.Generator,
    specs: Sequence[tuple[str, str]],
    *,
    size: tuple[int, int],
    background: Literal["photo", "plain"] = "photo",
    min_frac: float = 0.18,
    max_frac: float = 0.35,
    margin: int = 4,
    photo_cache: dict[str, Image.Image] | None = None,
) -> tuple[Image.Image, Image.Image, list[DrawnObject]]:
    """Draw ``specs = [(shape, color), ...]`` at random non-overlapping places.

    Returns ``(scene, background, objects)``; boxes are measured from the drawn masks. Objects
    are separated by at least ``margin`` pixels, so each object's changed pixels are its own.
    ``photo_cache`` keeps decoded photographs across calls.
    """
    w, h = size
    bg = _background(rng, size, background, photo_cache if photo_cache is not None else {})
    scene = bg.copy()
    placed: list[tuple[int, int, int, int]] = []
    objects: list[DrawnObject] = []
    short = min(w, h)
    for shape, color in specs:
        for _ in range(500):
            s = int(rng.integers(max(6, int(min_frac * short)), max(7, int(max_frac * short)) + 1))
            x = int(rng.integers(0, w - s + 1))
            y = int(rng.integers(0, h - s + 1))
            cand = (x - margin, y - margin, x + s + margin, y + s + margin)
            if all(cand[2] <= p[0] or p[2] <= cand[0] or cand[3] <= p[1] or p[3] <= cand[1] for p in placed):
                break
        else:
            raise RuntimeError(f"could not place {len(specs)} shapes on a {w}x{h} image; use fewer or smaller")
        placed.append((x, y, x + s, y + s))
        mask = draw_shape_mask(shape, size, x, y, s)
        scene.paste(Image.new("RGB", size, COLORS[color]), (0, 0), mask)
        x1, y1, x2, y2 = mask.getbbox()
        objects.append(DrawnObject(shape=shape, color=color, box=(float(x1), float(y1), float(x2), float(y2))))
    return scene, bg, objects


def _finish_image(img: Image.Image, out_dir: Path | None, name: str):
    if out_dir is None:
        return img
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"  # lossless: pixel checks stay exact
    img.save(path)
    return path


def _color_scene(rng: np.random.Generator, color: str, size: tuple[int, int]) -> Image.Image:
    """A jittered ``color`` circle or square (45-80 % of the short side) on noisy grey."""
    w, h = size
    grey = rng.integers(90, 166)
    noise = rng.normal(0.0, 12.0, size=(h, w, 3))
    img = Image.fromarray(np.clip(grey + noise, 0, 255).astype(np.uint8), "RGB")
    s = int(rng.integers(int(0.45 * min(w, h)), int(0.8 * min(w, h)) + 1))
    x, y = int(rng.integers(0, w - s + 1)), int(rng.integers(0, h - s + 1))
    rgb = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLORS[color])
    mask = draw_shape_mask(("circle", "square")[int(rng.integers(2))], size, x, y, s)
    img.paste(Image.new("RGB", size, rgb), (0, 0), mask)
    return img


def build_synthetic_classification(
    num_records: int,
    *,
    seed: int = 0,
    kind: Literal["photo", "shape", "color"] = "photo",
    classes: Sequence[str] | None = None,
    image_size: tuple[int, int] | None = None,
    out_dir: str | Path | None = None,
) -> RecordSet:
    """Classification records cycling through ``classes``.

    ``kind="photo"``: classes are :data:`PHOTO_CLASSES` labels; each record is a seeded random
    crop (50-100 % of each side) of the photograph, maybe flipped. ``kind="shape"``: classes are
    shape names; one shape of a random colour on a plain background. ``kind="color"``: classes are
    colour names (default red, green, blue, yellow); one circle or square of that colour (jittered
    by +-25 per channel) on a noisy grey background, 56 x 56 by default: 4 image tokens at the
    default ``min_pixels``, the task the CPU demo trains on (one answer token per class).

    ``image_size`` defaults to 160 x 120 (56 x 56 for ``"color"``).
    """
    rng = np.random.default_rng(seed)
    out = Path(out_dir) if out_dir is not None else None
    if kind == "photo":
        names = list(classes or PHOTO_CLASSES)
        photos = {c: load_photo(c) for c in names}
        prompt = build_classification_prompt(object_type="photograph", attribute="subject")
    elif kind == "shape":
        names = list(classes or SHAPES)
        prompt = build_classification_prompt(object_type="shape", attribute="shape")
    elif kind == "color":
        names = list(classes or COLOR_CLASSES)
        unknown = sorted(set(names) - set(COLORS))
        if unknown:
            raise ValueError(f"unknown colour classes {unknown}; available: {sorted(COLORS)}")
        prompt = build_classification_prompt(object_type="shape", attribute="color")
    else:
        raise ValueError(f"kind must be 'photo', 'shape' or 'color', got {kind!r}")
    if image_size is None:
        image_size = (56, 56) if kind == "color" else (160, 120)
    records = []
    for i in range(num_records):
        label = names[i % len(names)]
        if kind == "photo":
            photo = photos[label]
            pw, ph = photo.size
            cw, ch = int(pw * rng.uniform(0.5, 1.0)), int(ph * rng.uniform(0.5, 1.0))
            x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
            img = photo.crop((x0, y0, x0 + cw, y0 + ch)).resize(image_size, Image.BICUBIC)
            if rng.random() < 0.5:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
        elif kind == "color":
            img = _color_scene(rng, label, image_size)
        else:
            color = list(COLORS)[int(rng.integers(len(COLORS)))]
            img, _, _ = compose_scene(
                rng,
                [(label, color)],
                size=image_size,
                background="plain",
                min_frac=0.4,
                max_frac=0.8,
            )
        sid = f"synthetic-cls-{seed}-{i:05d}"
        records.append(
            VisualRecord(
                source_id=sid,
                task="classification",
                images=[_finish_image(img, out, sid)],
                problem=prompt,
                ground_truth=GroundTruth(label=label),
                image_size=image_size,
                metadata={"kind": kind},
            )
        )
    return RecordSet(records=records, skips=SkipCounts(), source=f"synthetic:classification:{kind}")


def build_synthetic_detection(
    num_records: int,
    *,
    seed: int = 0,
    box_space: CoordSpace = "pixels_resized",
    categories: Sequence[str] = ("circle", "square", "triangle", "star"),
    min_objects: int = 1,
    max_objects: int = 4,
    prompt_categories: Literal["one", "all"] = "one",
    empty_fraction: float = 0.0,
    image_size: tuple[int, int] = (224, 168),
    background: Literal["photo", "plain"] = "photo",
    out_dir: str | Path | None = None,
) -> RecordSet:
    """Detection records: ``min_objects..max_objects`` shapes (categories = shape names, random
    colours) on a photograph.

    ``prompt_categories="one"`` (Visual-RFT): the prompt asks for one category, present unless the
    record is one of the ``empty_fraction`` negatives (then ground truth is empty, "No Objects");
    ``"all"``: the prompt lists every category and the ground truth holds all boxes.
    """
    unknown = [c for c in categories if c not in SHAPES]
    if unknown or not categories:
        raise ValueError(f"categories must be non-empty shape names from {SHAPES}, got {list(categories)}")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"need 1 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir) if out_dir is not None else None
    cats = list(categories)
    cache: dict[str, Image.Image] = {}
    records = []
    for i in range(num_records):
        n = int(rng.integers(min_objects, max_objects + 1))
        query = cats[int(rng.integers(len(cats)))]
        negative = prompt_categories == "one" and len(cats) > 1 and rng.random() < empty_fraction
        pool = [c for c in cats if c != query] if negative else cats
        shapes = [pool[int(rng.integers(len(pool)))] for _ in range(n)]
        if prompt_categories == "one" and not negative and query not in shapes:
            shapes[int(rng.integers(n))] = query
        colors = [list(COLORS)[int(rng.integers(len(COLORS)))] for _ in range(n)]
        img, _, objects = compose_scene(
            rng,
            list(zip(shapes, colors)),
            size=image_size,
            background=background,
            photo_cache=cache,
        )
        asked = [query] if prompt_categories == "one" else cats
        kept = [o for o in objects if o.shape in asked]
        sid = f"synthetic-det-{seed}-{i:05d}"
        records.append(
            VisualRecord(
                source_id=sid,
                task="detection",
                images=[_finish_image(img, out, sid)],
                problem=build_detection_prompt(asked, box_space=box_space),
                ground_truth=GroundTruth(
                    coord_space="pixels_original",
                    boxes=np.asarray([o.box for o in kept], dtype=np.float64).reshape(-1, 4),
                    categories=tuple(o.shape for o in kept),
                ),
                image_size=image_size,
                query=", ".join(asked),
                metadata={"objects": objects},
            )
        )
    return RecordSet(records=records, skips=SkipCounts(), source="synthetic:detection")


_RELATIONS = ("left of", "right of", "above", "below")


def _relation(a: Sequence[float], b: Sequence[float]) -> list[str]:
    """Relations that hold strictly for box ``a`` relative to box ``b`` (no overlap on the axis)."""
    out = []
    if a[2] <= b[0]:
        out.append("left of")
    if a[0] >= b[2]:
        out.append("right of")
    if a[3] <= b[1]:
        out.append("above")
    if a[1] >= b[3]:
        out.append("below")
    return out


def build_synthetic_grounding(
    num_records: int,
    *,
    seed: int = 0,
    box_space: CoordSpace = "pixels_resized",
    min_objects: int = 2,
    max_objects: int = 4,
    image_size: tuple[int, int] = (224, 168),
    background: Literal["photo", "plain"] = "photo",
    out_dir: str | Path | None = None,
) -> RecordSet:
    """Grounding records: shapes with distinct (colour, shape) pairs, and a referring expression
    "the <colour> <shape> <relation> the <colour> <shape>" whose relation (left of / right of /
    above / below, strict: the boxes do not overlap on that axis) holds. The target's
    (colour, shape) is unique in the image, so the expression names exactly one box."""
    if not 2 <= min_objects <= max_objects:
        raise ValueError(f"need 2 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    rng = np.random.default_rng(seed)
    out = Path(out_dir) if out_dir is not None else None
    pairs = [(s, c) for s in SHAPES for c in COLORS]
    cache: dict[str, Image.Image] = {}
    records = []
    for i in range(num_records):
        n = int(rng.integers(min_objects, max_objects + 1))
        chosen = [pairs[j] for j in rng.choice(len(pairs), size=n, replace=False)]
        img, _, objects = compose_scene(rng, chosen, size=image_size, background=background, photo_cache=cache)
        t = int(rng.integers(n))
        target = objects[t]
        options = [(o, r) for j, o in enumerate(objects) if j != t for r in _relation(target.box, o.box)]
        anchor, rel = options[int(rng.integers(len(options)))]  # disjoint boxes: never empty
        expression = f"the {target.color} {target.shape} {rel} the {anchor.color} {anchor.shape}"
        sid = f"synthetic-grd-{seed}-{i:05d}"
        records.append(
            VisualRecord(
                source_id=sid,
                task="grounding",
                images=[_finish_image(img, out, sid)],
                problem=build_grounding_prompt(expression, box_space=box_space),
                ground_truth=GroundTruth(coord_space="pixels_original", box=np.asarray(target.box)),
                image_size=image_size,
                query=expression,
                metadata={"objects": objects, "target": t},
            )
        )
    return RecordSet(records=records, skips=SkipCounts(), source="synthetic:grounding")
