"""Build datasets the readers load: few-shot subsets, open-vocabulary splits, format conversions.

    python tools/prepare_data.py coco --annotations instances_train2017.json --out fewshot.json --k 8 --seed 0 \
        [--categories bus "stop sign" ...] [--mode per-category|greedy]
    python tools/prepare_data.py lvis --annotations lvis_v1_train.json --out lvis_10shot.json --k 10
    python tools/prepare_data.py ov-split --split coco-48-17 --out splits/coco_ov [--annotations FILE]
    python tools/prepare_data.py ov-split --split lvis-rare --annotations lvis_v1_train.json --out splits/lvis_ov
    python tools/prepare_data.py image-folder --dataset flowers102|pets|aircraft|cars --root DIR --out DIR \
        --k 4 [--split S] [--link copy|symlink]
    python tools/prepare_data.py lisa --root ReasonSeg/train --out data/lisa_train [--kind sentence]
    python tools/prepare_data.py visual-rft --source TABLE.parquet --out data/vrft [--k 4] [--split train]

Every builder is deterministic for a seed, writes atomically (a temporary sibling renamed into
place; ``--overwrite`` replaces an existing output) and prints what it wrote per category and what
it skipped and why. Library code: ``megatron_vrft.data.prepare``.
"""

from __future__ import annotations

import argparse
import sys

from megatron_vrft.data.errors import DataError
from megatron_vrft.data.prepare import (
    build_aircraft,
    build_cars,
    build_coco_fewshot,
    build_flowers102,
    build_lisa,
    build_ov_split,
    build_pets,
    build_visual_rft,
)


def _run(args: argparse.Namespace):
    if args.command in ("coco", "lvis"):
        return build_coco_fewshot(
            args.annotations,
            args.out,
            k=args.k,
            seed=args.seed,
            categories=args.categories,
            mode=args.mode,
            overwrite=args.overwrite,
        )
    if args.command == "ov-split":
        return build_ov_split(args.out, split=args.split, annotation_file=args.annotations, overwrite=args.overwrite)
    if args.command == "image-folder":
        common = dict(k=args.k, seed=args.seed, link=args.link, overwrite=args.overwrite)
        if args.dataset == "flowers102":
            return build_flowers102(
                args.root, args.out, split=args.split or "train", class_names_file=args.class_names, **common
            )
        if args.dataset == "pets":
            return build_pets(args.root, args.out, split=args.split or "trainval", **common)
        if args.dataset == "aircraft":
            return build_aircraft(args.root, args.out, split=args.split or "train", **common)
        extra = {key: value for key, value in (("annos", args.cars_annos), ("images", args.cars_images)) if value}
        return build_cars(args.root, args.out, **extra, **common)
    if args.command == "lisa":
        return build_lisa(args.root, args.out, kind=args.kind, overwrite=args.overwrite)
    return build_visual_rft(args.source, args.out, split=args.split, k=args.k, seed=args.seed, overwrite=args.overwrite)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help_text: str, *, seeded: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--out", required=True, help="output file (coco/lvis) or directory")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output")
        if seeded:
            p.add_argument("--seed", type=int, default=0, help="sampling seed")
        return p

    for name in ("coco", "lvis"):
        p = add(name, f"k-shot subset of a {name.upper()} instance JSON")
        p.add_argument("--annotations", required=True, help="instance JSON")
        p.add_argument("--k", type=int, required=True, help="images per category (at most)")
        p.add_argument("--categories", nargs="+", help="category names (or ids) to keep; default all")
        p.add_argument(
            "--mode",
            choices=("per-category", "greedy"),
            default="per-category",
            help="per-category: k images per category, only its annotations kept on each; "
            "greedy: images kept whole, skipped when they would push a category over k",
        )
    p = add("ov-split", "open-vocabulary base/novel category config fragments", seeded=False)
    p.add_argument("--split", choices=("coco-48-17", "lvis-rare"), required=True)
    p.add_argument("--annotations", help="instance JSON (required for lvis-rare; checks names for coco)")
    p = add("image-folder", "few-shot class folders from a fine-grained classification release")
    p.add_argument("--dataset", choices=("flowers102", "pets", "aircraft", "cars"), required=True)
    p.add_argument("--root", required=True, help="the dataset's extracted release folder")
    p.add_argument("--k", type=int, required=True, help="images per class (at most)")
    p.add_argument(
        "--split", help="flowers102: train/val/test/all; pets: trainval/test; aircraft: train/val/trainval/test"
    )
    p.add_argument("--link", choices=("copy", "symlink"), default="copy")
    p.add_argument("--class-names", help="flowers102: file with one class name per line (default: built in)")
    p.add_argument(
        "--cars-annos", help="cars: annotation .mat relative to --root (default devkit/cars_train_annos.mat)"
    )
    p.add_argument("--cars-images", help="cars: image folder relative to --root (default cars_train)")
    p = add("lisa", "LISA ReasonSeg split folder -> grounding JSON", seeded=False)
    p.add_argument("--root", required=True, help="a split folder of <name>.jpg + <name>.json")
    p.add_argument("--kind", choices=("all", "sentence", "phrase"), default="all")
    p = add("visual-rft", "import a released Visual-RFT table (image/problem/solution)")
    p.add_argument("--source", required=True, help=".parquet, folder of them, save_to_disk folder, .json or .jsonl")
    p.add_argument("--split", default="train")
    p.add_argument("--k", type=int, help="rows per class (at most); default all")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = _run(args)
    except (DataError, ValueError) as err:
        print(f"prepare_data.py {args.command}: error: {err}", file=sys.stderr)
        return 2
    print(summary.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
