"""Convert Qwen2-VL / Qwen2.5-VL checkpoints between HF safetensors and Megatron distributed checkpoints.

    # HF -> Megatron (dist_checkpointing; loads at any TP/PP, --tp only chooses the on-disk chunking)
    python tools/convert_checkpoint.py hf-to-megatron --hf Qwen2-VL-2B --out ckpt/qwen2vl-2b --tp 2 --pp 2
    # Megatron (any TP/PP, e.g. saved by the trainer) -> HF hub layout
    python tools/convert_checkpoint.py megatron-to-hf --ckpt ckpt/qwen2vl-2b --out hf-export
    # re-chunk / change vocabulary padding
    python tools/convert_checkpoint.py reshard --ckpt ckpt/a --out ckpt/b --tp 4 --vocab-padded-size 151936
    # run HF and the Megatron policy (CPU, TP=PP=1) on one fixed input; print the max logit difference
    python tools/convert_checkpoint.py verify --hf Qwen2-VL-2B --ckpt ckpt/qwen2vl-2b

``--verify`` on a conversion runs the same check on its result. Exit status 1 when the difference
exceeds ``--verify-tol``. Conversions stream one layer at a time and write atomically (temporary
directory, then rename); a missing, unexpected or misshaped tensor stops with an error naming it.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch


def _fixed_inputs(arch, *, seed: int):
    """A short prompt with one 4x4-patch image when the vocabulary has the image token."""
    from megatron_vrft.models.qwen2_vl.inputs import compute_mrope_position_ids

    gen = torch.Generator().manual_seed(seed)
    cfg = arch.hf_config
    text = lambda n: torch.randint(0, min(arch.vocab_size, 1000), (n,), generator=gen)  # noqa: E731
    vision = cfg.vision_config
    specials = (arch.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
    pixels = grid = None
    if all(t is not None and t < arch.vocab_size for t in specials):
        m = arch.spatial_merge_size
        grid = torch.tensor([[1, 2 * m, 2 * m]])
        image = torch.tensor([cfg.vision_start_token_id] + [arch.image_token_id] * 4 + [cfg.vision_end_token_id])
        ids = torch.cat([text(5), image, text(5)])[None]
        patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        pixels = torch.randn(int(grid.prod()), patch_dim, generator=gen)
    else:
        ids = text(12)[None]
    # Keep the image tokens out of the random text.
    ids = torch.where((ids == arch.image_token_id) & (torch.arange(ids.shape[1]) < 5), 0, ids)
    return ids, pixels, grid, compute_mrope_position_ids(arch, ids, image_grid_thw=grid)


def verify(hf_dir: str, ckpt_dir: str, *, seed: int = 0) -> float:
    """Max |HF logits - Megatron logits| on a fixed input, both in float32 on the CPU at TP=PP=1."""
    from megatron.core import dist_checkpointing

    from megatron_vrft.distributed.parallel_state import single_rank_world
    from megatron_vrft.models.conversion import MegatronCheckpointReader, build_policy_sharded_state_dict
    from megatron_vrft.models.qwen2_vl.arch import hf_classes
    from megatron_vrft.models.qwen2_vl.inputs import compute_mm_token_type_ids
    from megatron_vrft.models.qwen2_vl.model import Qwen2VLPolicy
    from megatron_vrft.models.qwen2_vl.spec import Qwen2VLParallelism, build_layer_spec, build_transformer_config

    reader = MegatronCheckpointReader(ckpt_dir)
    arch = reader.arch
    hf = hf_classes(arch.family).for_generation.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager"
    )
    hf.eval()
    with single_rank_world():
        config = build_transformer_config(arch, Qwen2VLParallelism(), params_dtype=torch.float32)
        policy = Qwen2VLPolicy(
            arch, config, pre_process=True, post_process=True, layer_spec=build_layer_spec(use_te=False)
        ).eval()
        if reader.vocab_padded_size == arch.vocab_size:
            # megatron-core's own loader: exercises the checkpoint format end to end.
            state = dist_checkpointing.load(build_policy_sharded_state_dict(policy, tp_rank=0, dp_rank=0), ckpt_dir)
            missing, unexpected = policy.load_state_dict(state, strict=False)
            missing = [m for m in missing if not m.endswith("_extra_state")]
            if missing or unexpected:
                raise RuntimeError(f"checkpoint does not fit the policy: missing {missing}, unexpected {unexpected}")
        else:  # the policy has no vocabulary padding: read and drop it
            shard = reader.load_shard(tp_rank=0, tp_size=1, pp_rank=0, pp_size=1, vocab_padded_size=arch.vocab_size)
            with torch.no_grad():
                for name, p in policy.named_parameters():
                    p.copy_(shard[name])
        ids, pixels, grid, pos = _fixed_inputs(arch, seed=seed)
        with torch.no_grad():
            ours = policy(ids, pos, None, pixel_values=pixels, image_grid_thw=grid).float()
            kwargs = dict(pixel_values=pixels, image_grid_thw=grid) if pixels is not None else {}
            ref = hf(input_ids=ids, mm_token_type_ids=compute_mm_token_type_ids(arch, ids), **kwargs).logits.float()
        return (ours - ref).abs().max().item()


def _vocab_padded_size(args, vocab_size: int) -> int | None:
    from megatron_vrft.models.qwen2_vl.state_dict_adapter import compute_vocab_padded_size

    if args.vocab_padded_size and args.make_vocab_size_divisible_by:
        raise SystemExit("give --vocab-padded-size or --make-vocab-size-divisible-by, not both")
    if args.make_vocab_size_divisible_by:
        return compute_vocab_padded_size(
            vocab_size, make_vocab_size_divisible_by=args.make_vocab_size_divisible_by, tp_size=args.tp
        )
    return args.vocab_padded_size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, *, tp: bool):
        sp.add_argument("--out", required=True, help="output directory (must not exist unless --overwrite)")
        sp.add_argument("--overwrite", action="store_true")
        sp.add_argument("--no-progress", action="store_true")
        sp.add_argument("--verify", action="store_true", help="run HF and Megatron on a fixed input afterwards")
        sp.add_argument("--verify-tol", type=float, default=1e-3)
        if tp:
            sp.add_argument("--tp", type=int, default=1, help="TP chunking on disk (any TP loads the result)")
            sp.add_argument("--pp", type=int, default=1, help="pipeline size to validate the layer split for")
            sp.add_argument("--vocab-padded-size", type=int, default=None)
            sp.add_argument(
                "--make-vocab-size-divisible-by",
                type=int,
                default=None,
                help="pad the vocabulary to a multiple of this times --tp (Megatron-LM rule)",
            )

    a = sub.add_parser("hf-to-megatron", help="HF safetensors directory -> Megatron distributed checkpoint")
    a.add_argument("--hf", required=True)
    common(a, tp=True)
    b = sub.add_parser("megatron-to-hf", help="Megatron distributed checkpoint -> HF safetensors directory")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--max-shard-size-gb", type=float, default=4.0)
    common(b, tp=False)
    c = sub.add_parser("reshard", help="rewrite a Megatron checkpoint with another TP chunking / vocab padding")
    c.add_argument("--ckpt", required=True)
    common(c, tp=True)
    d = sub.add_parser("verify", help="max logit difference between an HF and a Megatron checkpoint")
    d.add_argument("--hf", required=True)
    d.add_argument("--ckpt", required=True)
    d.add_argument("--verify-tol", type=float, default=1e-3)
    return p


def main(argv: list[str] | None = None) -> int:
    from megatron_vrft.models import conversion
    from megatron_vrft.models.qwen2_vl.state_dict_adapter import as_arch

    args = build_parser().parse_args(argv)
    progress = not getattr(args, "no_progress", False)
    if args.command == "hf-to-megatron":
        vocab = as_arch(conversion.HfCheckpointReader(args.hf).config()).vocab_size
        conversion.convert_hf_to_megatron(
            args.hf,
            args.out,
            tp_size=args.tp,
            pp_size=args.pp,
            vocab_padded_size=_vocab_padded_size(args, vocab),
            overwrite=args.overwrite,
            progress=progress,
        )
        hf_dir, ckpt_dir = args.hf, args.out
    elif args.command == "megatron-to-hf":
        conversion.convert_megatron_to_hf(
            args.ckpt,
            args.out,
            max_shard_bytes=int(args.max_shard_size_gb * 2**30),
            overwrite=args.overwrite,
            progress=progress,
        )
        hf_dir, ckpt_dir = args.out, args.ckpt
    elif args.command == "reshard":
        vocab = conversion.MegatronCheckpointReader(args.ckpt).arch.vocab_size
        conversion.reshard_megatron_checkpoint(
            args.ckpt,
            args.out,
            tp_size=args.tp,
            pp_size=args.pp,
            vocab_padded_size=_vocab_padded_size(args, vocab),
            overwrite=args.overwrite,
            progress=progress,
        )
        hf_dir, ckpt_dir = None, args.out
    else:
        hf_dir, ckpt_dir = args.hf, args.ckpt
    if args.command != "verify":
        print(f"wrote {os.path.abspath(args.out)}")
    if args.command == "verify" or (args.verify and hf_dir is not None):
        diff = verify(hf_dir, ckpt_dir)
        ok = diff <= args.verify_tol
        print(f"verify: max |logit diff| = {diff:.3e} (tol {args.verify_tol:.0e}) {'OK' if ok else 'FAILED'}")
        return 0 if ok else 1
    return 0


if __name__ == "__main__":  # the guard dist_checkpointing's writer processes need
    sys.exit(main())
