"""torchrun worker: Qwen2VLPolicy under TP/PP vs single-process transformers, over gloo on CPU.

Run by tests/integration/test_integration_model_parallel_qwen2_vl.py with 4 ranks. One launch
loops over families x layouts (TP, PP) in {(2,2), (2,1), (1,2), (1,1)} plus (2,2) with 2 virtual
stages per rank, by destroying and re-creating megatron's model-parallel groups in the same world.
Per layout it runs ONE ``forward_backward`` (1F1B) over four micro-batches of different lengths
(the interleaved layout gets the padded ones padded to one shape: see ``fixed_shape_batches``):

  0. a right-padded batch (B=2) with one image per row,
  1. a left-padded batch (B=2, longer) with images in row 0 only,
  2. a packed row of two sequences (each with an image), block-diagonal causal mask,
  3. a text-only batch (B=2, no pixel_values),

and compares, against ``Qwen2VLForConditionalGeneration`` / ``Qwen2_5_VLForConditionalGeneration``
(float32, eval, same weights): logits (TP-gathered, test only), per-token log-probs and entropy
computed vocab-parallel, and every parameter gradient of this rank's shard (HF gradients mapped into the
shard layout with the state-dict adapter; the mapping is linear, so gradients map like weights).
Results from all ranks land in the JSON file given as argv[1].
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402

from megatron_vrft.distributed.parallel_state import (  # noqa: E402
    ParallelLayout,
    destroy_model_parallel,
    initialize_model_parallel,
    pipeline_stage_flags,
)
from megatron_vrft.models.qwen2_vl.arch import build_qwen2_vl_arch  # noqa: E402
from megatron_vrft.models.qwen2_vl.inputs import (  # noqa: E402
    build_packed_attention_mask,
    build_padded_attention_mask,
    compute_mm_token_type_ids,
    compute_mrope_position_ids,
    pack_sequences,
)
from megatron_vrft.models.qwen2_vl.logprobs import compute_token_logprobs  # noqa: E402
from megatron_vrft.models.qwen2_vl.model import Qwen2VLPolicy  # noqa: E402
from megatron_vrft.models.qwen2_vl.parallelize import (  # noqa: E402
    allreduce_tied_embedding_grads,
    allreduce_vision_grads,
)
from megatron_vrft.models.qwen2_vl.spec import build_transformer_config  # noqa: E402
from megatron_vrft.models.qwen2_vl.state_dict_adapter import hf_to_megatron_shard  # noqa: E402

VOCAB = 320
IMAGE, VIDEO, VSTART, VEND = 300, 301, 302, 303
PATCH = 4
# (TP, PP, virtual stages per PP rank); (2, 2, 2) runs the interleaved 1F1B schedule.
LAYOUTS = [(2, 2, None), (2, 1, None), (1, 2, None), (1, 1, None), (2, 2, 2)]
# ops.logprob's default dispatch: the Triton kernels when TRITON_INTERPRET=1 (set by
# tests/conftest.py and inherited by the ranks), the torch reference otherwise.
LOGPROB_IMPL = os.environ.get("QWEN2_VL_LOGPROB_IMPL", "auto")


def build_hf_model(family: str):
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    common = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)
    if family == "qwen2_vl":
        vision = dict(
            depth=2,
            embed_dim=32,
            hidden_size=64,
            num_heads=2,
            mlp_ratio=2,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
        )
        cfg = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **common)
        cls = Qwen2VLForConditionalGeneration
    else:
        vision = dict(
            depth=2,
            hidden_size=32,
            intermediate_size=48,
            out_hidden_size=64,
            num_heads=2,
            patch_size=PATCH,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=16,
            fullatt_block_indexes=[1],
        )
        # Qwen2.5-VL-3B ties its embeddings: exercise the tied path (and its PP gradient sync).
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **common)
        cls = Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation="eager").float().eval()
    # Larger-than-default random weights so that differences are not hidden by tiny activations.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.1)
    return model, cfg


def make_sequence(gen, n_before: int, n_after: int, grid: tuple[int, int, int] | None) -> torch.Tensor:
    parts = [torch.randint(3, 290, (n_before,), generator=gen)]
    if grid is not None:
        n_img = grid[0] * grid[1] * grid[2] // 4
        parts.append(torch.tensor([VSTART] + [IMAGE] * n_img + [VEND]))
    parts.append(torch.randint(3, 290, (n_after,), generator=gen))
    return torch.cat(parts)


def pixels(gen, grids: list[tuple[int, int, int]]) -> torch.Tensor:
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, 3 * 2 * PATCH * PATCH, generator=gen)


def pad_rows(rows: list[torch.Tensor], *, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), 2, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(length - len(r), length) if left else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def build_micro_batches(arch):
    """Three micro-batches; each a dict with megatron inputs and the HF reference calls."""
    gen = torch.Generator().manual_seed(1)
    batches = []
    # 0: right padding, one image per row.
    g0 = [(1, 4, 4), (1, 4, 8)]
    rows = [make_sequence(gen, 3, 5, g0[0]), make_sequence(gen, 2, 2, g0[1])]
    ids, mask = pad_rows(rows, left=False)
    batches.append(dict(input_ids=ids, pad_mask=mask, grid=torch.tensor(g0), pixels=pixels(gen, g0)))
    # 1: left padding, longer, image in row 0 only.
    g1 = [(1, 8, 4)]
    rows = [make_sequence(gen, 4, 9, g1[0]), make_sequence(gen, 11, 0, None)]
    ids, mask = pad_rows(rows, left=True)
    batches.append(dict(input_ids=ids, pad_mask=mask, grid=torch.tensor(g1), pixels=pixels(gen, g1)))
    # 3: text only (no pixel_values at all), no padding.
    rows = [make_sequence(gen, 9, 0, None), make_sequence(gen, 9, 0, None)]
    ids, mask = pad_rows(rows, left=False)
    batches.append(dict(input_ids=ids, pad_mask=mask, grid=None, pixels=None))
    for b in batches:
        finish_padded(arch, b)
    # 2: packed row of two sequences with images.
    g2 = [(1, 4, 4), (1, 8, 8)]
    seqs = [make_sequence(gen, 2, 4, g2[0]), make_sequence(gen, 3, 3, g2[1])]
    ids, pos, cu = pack_sequences(arch, seqs, [torch.tensor([g2[0]]), torch.tensor([g2[1]])])
    targets = torch.roll(ids, -1, dims=1)
    loss_mask = torch.ones_like(ids, dtype=torch.float)
    loss_mask[0, cu[1:] - 1] = 0  # no target across a sequence boundary
    batches.insert(
        2,
        dict(
            input_ids=ids,
            position_ids=pos,
            attention_mask=build_packed_attention_mask(cu),
            grid=torch.tensor(g2),
            pixels=pixels(gen, g2),
            targets=targets,
            loss_mask=loss_mask,
            cu_seqlens=cu,
            seqs=seqs,
        ),
    )
    return batches


def finish_padded(arch, b: dict) -> dict:
    b["position_ids"] = compute_mrope_position_ids(
        arch, b["input_ids"], image_grid_thw=b["grid"], attention_mask=b["pad_mask"]
    )
    b["attention_mask"] = build_padded_attention_mask(b["pad_mask"])
    b["targets"] = torch.roll(b["input_ids"], -1, dims=1)
    b["loss_mask"] = (b["pad_mask"] * torch.roll(b["pad_mask"], -1, dims=1)).float()
    b["loss_mask"][:, -1] = 0
    return b


def fixed_shape_batches(arch, batches) -> list[dict]:
    """Four (B=2, S=max) micro-batches for the interleaved schedule (fixed p2p shapes)."""
    padded = [b for b in batches if "cu_seqlens" not in b]
    length = max(b["input_ids"].shape[1] for b in padded)
    out = []
    for b in padded + padded[:1]:
        extra = length - b["input_ids"].shape[1]
        ids = torch.nn.functional.pad(b["input_ids"], (0, extra), value=2)
        mask = torch.nn.functional.pad(b["pad_mask"], (0, extra), value=0)
        out.append(finish_padded(arch, dict(input_ids=ids, pad_mask=mask, grid=b["grid"], pixels=b["pixels"])))
    return out


def hf_logits(hf, arch, b) -> torch.Tensor:
    """HF logits (B, S, V) of a micro-batch; a packed row runs sequence by sequence."""
    if "cu_seqlens" not in b:
        return hf(
            input_ids=b["input_ids"],
            attention_mask=b["pad_mask"],
            pixel_values=b["pixels"],
            image_grid_thw=b["grid"],
            mm_token_type_ids=compute_mm_token_type_ids(arch, b["input_ids"]),
        ).logits
    outs, patch_start = [], 0
    for seq, grid in zip(b["seqs"], b["grid"]):
        n = int(grid.prod())
        ids = seq[None]
        outs.append(
            hf(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                pixel_values=b["pixels"][patch_start : patch_start + n],
                image_grid_thw=grid[None],
                mm_token_type_ids=compute_mm_token_type_ids(arch, ids),
            ).logits
        )
        patch_start += n
    return torch.cat(outs, dim=1)


def reference(hf, arch, batches):
    """HF logits, log-probs and parameter gradients of the summed masked log-prob loss."""
    hf.zero_grad(set_to_none=True)
    logits, logprobs, entropies, loss = [], [], [], 0.0
    for b in batches:
        lg = hf_logits(hf, arch, b)
        logp = torch.log_softmax(lg.double(), -1)
        lp = logp.gather(-1, b["targets"][..., None])[..., 0].float()
        loss = loss + loss_value(lp, b["loss_mask"]) / len(batches)
        logits.append(lg.detach())
        logprobs.append(lp.detach())
        entropies.append(-(logp.exp() * logp).sum(-1).detach())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in hf.named_parameters() if p.grad is not None}
    return logits, logprobs, entropies, grads


def loss_value(logprobs: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return -(logprobs * loss_mask).sum() / 10.0


def build_chunks(arch, tconfig, groups, hf, tp, pp, vpp):
    """This rank's model chunks (one, or ``vpp`` when interleaving), loaded with HF weights.

    With interleaving, chunk ``v`` of pipeline rank ``p`` holds the layers of virtual stage
    ``v * pp + p`` out of ``pp * vpp`` equal stages, so the adapter's plain pipeline split over
    ``pp * vpp`` stages gives its weights (vision + embedding on virtual stage 0, head on the last).
    """
    chunks = []
    for v in range(vpp or 1):
        vp_stage = None if vpp is None else v
        pre, post = pipeline_stage_flags(vp_stage)
        policy = Qwen2VLPolicy(arch, tconfig, pre_process=pre, post_process=post, vp_stage=vp_stage)
        stage = groups.pp_rank if vpp is None else v * pp + groups.pp_rank
        shard = hf_to_megatron_shard(
            hf.state_dict(), arch, tp_rank=groups.tp_rank, tp_size=tp, pp_rank=stage, pp_size=pp * (vpp or 1)
        )
        policy.load_shard(shard)
        chunks.append((policy, stage))
    return chunks


def run_layout(family, hf, cfg, arch, batches, ref, tp, pp, vpp) -> dict:
    groups = initialize_model_parallel(
        ParallelLayout(tensor_parallel_size=tp, pipeline_parallel_size=pp, virtual_pipeline_parallel_size=vpp)
    )
    tconfig = build_transformer_config(
        arch,
        ParallelLayout(tensor_parallel_size=tp, pipeline_parallel_size=pp, virtual_pipeline_parallel_size=vpp),
    )
    chunks = build_chunks(arch, tconfig, groups, hf, tp, pp, vpp)

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        out = model(
            b["input_ids"],
            b["position_ids"],
            b["attention_mask"],
            pixel_values=b["pixels"],
            image_grid_thw=b["grid"],
        )

        def loss_func(logits):
            lp, ent = compute_token_logprobs(
                logits, b["targets"], tp_group=groups.tp_group, return_entropy=True, impl=LOGPROB_IMPL
            )
            full = gather_from_tensor_model_parallel_region(logits)  # test only: full vocabulary
            stats = {"logits": full.detach(), "logprobs": lp.detach(), "entropy": ent.detach()}
            return loss_value(lp, b["loss_mask"]), stats

        return out, loss_func

    models = [policy for policy, _ in chunks]
    results = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=[iter(batches) for _ in models] if vpp else iter(batches),
        model=models,
        num_microbatches=len(batches),
        seq_length=max(b["input_ids"].shape[1] for b in batches),
        micro_batch_size=2,
        forward_only=False,
    )
    for policy in models:
        allreduce_vision_grads(policy.vision, groups.tp_group)
        allreduce_tied_embedding_grads(policy.language_model, groups.embedding_group)

    ref_logits, ref_logprobs, ref_entropy, ref_grads = ref
    out = {"family": family, "tp": tp, "pp": pp, "vpp": vpp, "rank": dist.get_rank(), "pp_rank": groups.pp_rank}
    if any(policy.post_process for policy in models):
        logit_err, lp_err, ent_err = 0.0, 0.0, 0.0
        for r, lg, lp, ent, b in zip(results, ref_logits, ref_logprobs, ref_entropy, batches, strict=True):
            valid = b.get("pad_mask", torch.ones_like(b["input_ids"])).bool()
            logit_err = max(logit_err, (r["logits"] - lg).abs()[valid].max().item())
            lp_err = max(lp_err, (r["logprobs"] - lp).abs()[valid].max().item())
            ent_err = max(ent_err, (r["entropy"].double() - ent).abs()[valid].max().item())
        out["logits_max_abs"] = logit_err
        out["logprobs_max_abs"] = lp_err
        out["entropy_max_abs"] = ent_err
    grad_err, worst, checked = 0.0, "", 0
    for policy, stage in chunks:
        expected = hf_to_megatron_shard(
            ref_grads, arch, tp_rank=groups.tp_rank, tp_size=tp, pp_rank=stage, pp_size=pp * (vpp or 1)
        )
        for name, p in policy.named_parameters():
            if p.grad is None:
                raise RuntimeError(f"no gradient for {name}")
            ref_g = expected[name]
            rel = ((p.grad - ref_g).abs().max() / ref_g.abs().max().clamp(min=1e-12)).item()
            checked += 1
            if rel > grad_err:
                grad_err, worst = rel, f"chunk{stage}:{name}"
    out["grad_max_rel"] = grad_err
    out["grad_worst"] = worst
    out["grads_checked"] = checked
    vision = [policy.vision for policy in models if policy.vision is not None]
    out["vision_params"] = sum(1 for v in vision for _ in v.parameters())
    # Vision replicas must be bit-identical across TP after the all-reduce.
    if vision and tp > 1:
        flat = torch.cat([p.grad.reshape(-1) for p in vision[0].parameters()])
        other = flat.clone()
        dist.broadcast(other, src=dist.get_global_rank(groups.tp_group, 0), group=groups.tp_group)
        out["vision_grad_replica_diff"] = (flat - other).abs().max().item()
    del chunks, models
    destroy_model_parallel()
    return out


def _layouts():
    """``QWEN2_VL_LAYOUTS="2,2,2;1,1,0"`` narrows the run (debugging); default: all LAYOUTS."""
    spec = os.environ.get("QWEN2_VL_LAYOUTS")
    if not spec:
        return LAYOUTS
    parsed = [tuple(int(x) for x in item.split(",")) for item in spec.split(";")]
    return [(tp, pp, vpp or None) for tp, pp, vpp in parsed]


def main() -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    families = os.environ.get("QWEN2_VL_FAMILIES", "qwen2_vl,qwen2_5_vl").split(",")
    records = []
    for family in families:
        hf, cfg = build_hf_model(family)
        arch = build_qwen2_vl_arch(cfg)
        variable = build_micro_batches(arch)
        fixed = fixed_shape_batches(arch, variable)
        refs = {}
        for tp, pp, vpp in _layouts():
            batches = variable if vpp is None else fixed
            if id(batches) not in refs:
                refs[id(batches)] = reference(hf, arch, batches)
            records.append(run_layout(family, hf, cfg, arch, batches, refs[id(batches)], tp, pp, vpp))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    if dist.get_rank() == 0:
        with open(sys.argv[1], "w") as f:
            json.dump([r for rank_records in gathered for r in rank_records], f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
