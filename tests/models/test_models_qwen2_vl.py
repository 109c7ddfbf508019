"""Qwen2-VL policy pieces on one process: arch, M-RoPE positions, masks, packing, TP=PP=1 vs HF.

The multi-rank (TP/PP) equality and gradient checks live in
tests/integration/test_integration_model_parallel_qwen2_vl.py.
"""

import pytest
import torch

from megatron_vrft.models.qwen2_vl.arch import build_qwen2_vl_arch
from megatron_vrft.models.qwen2_vl.inputs import (
    build_packed_attention_mask,
    build_padded_attention_mask,
    compute_mm_token_type_ids,
    compute_mrope_position_ids,
    pack_sequences,
)

IMAGE, VIDEO, VSTART, VEND = 300, 301, 302, 303
PATCH = 4


def tiny_config(family: str, *, tie: bool = False):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    text = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    common = dict(
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
        tie_word_embeddings=tie,
    )
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
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
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
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)


def test_arch_from_full_size_configs():
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    a = build_qwen2_vl_arch(Qwen2VLConfig())
    assert a.family == "qwen2_vl"
    assert (a.hidden_size, a.num_layers, a.num_attention_heads, a.num_key_value_heads) == (8192, 80, 64, 8)
    assert a.head_dim == 128 and a.mrope_section == (16, 24, 24) and a.rope_theta == 1e6
    assert a.vocab_size == 152064 and a.image_token_id == 151655 and not a.tie_word_embeddings
    b = build_qwen2_vl_arch(Qwen2_5_VLConfig(tie_word_embeddings=True))
    assert b.family == "qwen2_5_vl" and b.tie_word_embeddings and b.spatial_merge_size == 2


def test_arch_rejects_bad_configs():
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="unsupported model_type"):
        build_qwen2_vl_arch(LlamaConfig())
    cfg = tiny_config("qwen2_vl")
    cfg.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 2, 2]}
    with pytest.raises(ValueError, match="mrope_section"):
        build_qwen2_vl_arch(cfg)


def test_mrope_positions_hand_computed():
    arch = build_qwen2_vl_arch(tiny_config("qwen2_vl"))
    # 2 text tokens, vision_start, a (1, 4, 4) patch grid = 2x2 merged image tokens, vision_end, 2 text.
    ids = torch.tensor([[5, 6, VSTART, IMAGE, IMAGE, IMAGE, IMAGE, VEND, 7, 8]])
    pos = compute_mrope_position_ids(arch, ids, image_grid_thw=torch.tensor([[1, 4, 4]]))
    t = [0, 1, 2, 3, 3, 3, 3, 5, 6, 7]
    h = [0, 1, 2, 3, 3, 4, 4, 5, 6, 7]
    w = [0, 1, 2, 3, 4, 3, 4, 5, 6, 7]
    assert pos.shape == (3, 1, 10)
    assert pos[:, 0].tolist() == [t, h, w]


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_mrope_positions_equal_hf_model_method(family):
    from transformers import Qwen2_5_VLModel, Qwen2VLModel

    cfg = tiny_config(family)
    arch = build_qwen2_vl_arch(cfg)
    hf = (Qwen2VLModel if family == "qwen2_vl" else Qwen2_5_VLModel)(cfg)
    ids = torch.tensor(
        [
            [2, 2, 9, VSTART] + [IMAGE] * 8 + [VEND, 4, 4],
            [11, VSTART] + [IMAGE] * 4 + [VEND, 3, 3, 3, 3, 3, 3, 3, 3],
        ]
    )
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    grid = torch.tensor([[1, 4, 8], [1, 4, 4]])
    ours = compute_mrope_position_ids(arch, ids, image_grid_thw=grid, attention_mask=mask)
    ref, _ = hf.get_rope_index(
        ids,
        mm_token_type_ids=compute_mm_token_type_ids(arch, ids),
        image_grid_thw=grid,
        attention_mask=mask,
    )
    assert torch.equal(ours, ref)


def test_video_placeholders_rejected():
    arch = build_qwen2_vl_arch(tiny_config("qwen2_vl"))
    with pytest.raises(ValueError, match="video"):
        compute_mrope_position_ids(arch, torch.tensor([[5, VIDEO, 6]]))


def test_padded_mask_matches_loop():
    pad = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    mask = build_padded_attention_mask(pad)
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bool
    for b in range(2):
        for q in range(4):
            for k in range(4):
                allowed = k <= q and pad[b, k] == 1
                assert mask[b, 0, q, k].item() == (not allowed)


def test_packed_mask_blocks_cross_sequence_attention():
    cu = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    mask = build_packed_attention_mask(cu, total_len=11)  # 2 tokens of trailing padding
    seg = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3]
    for q in range(11):
        for k in range(11):
            allowed = seg[q] == seg[k] and k <= q
            assert mask[0, 0, q, k].item() == (not allowed)


def test_pack_sequences_restarts_positions():
    arch = build_qwen2_vl_arch(tiny_config("qwen2_vl"))
    s1 = torch.tensor([5, VSTART, IMAGE, IMAGE, IMAGE, IMAGE, VEND, 6])
    s2 = torch.tensor([7, 8, 9])
    ids, pos, cu = pack_sequences(arch, [s1, s2], [torch.tensor([[1, 4, 4]]), None])
    assert ids.shape == (1, 11) and pos.shape == (3, 1, 11)
    assert cu.tolist() == [0, 8, 11] and cu.dtype == torch.int32
    first = compute_mrope_position_ids(arch, s1[None], image_grid_thw=torch.tensor([[1, 4, 4]]))
    assert torch.equal(pos[:, :, :8], first)
    assert pos[:, 0, 8:].tolist() == [[0, 1, 2]] * 3


# --------------------------------------------------------------------------------------------
# Single-process policy (TP = PP = 1) against transformers.


@pytest.fixture
def one_rank_world():
    from megatron_vrft.distributed.parallel_state import single_rank_world

    with single_rank_world() as groups:
        yield groups


def build_pair(family: str, groups, *, tie: bool):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    from megatron_vrft.distributed.parallel_state import ParallelLayout
    from megatron_vrft.models.qwen2_vl.model import Qwen2VLPolicy
    from megatron_vrft.models.qwen2_vl.spec import build_transformer_config
    from megatron_vrft.models.qwen2_vl.state_dict_adapter import hf_to_megatron_shard

    cfg = tiny_config(family, tie=tie)
    cls = Qwen2VLForConditionalGeneration if family == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    hf = cls._from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn_like(p) if "norm" in name and p.ndim == 1 else 0.1 * torch.randn_like(p))
    arch = build_qwen2_vl_arch(cfg)
    policy = Qwen2VLPolicy(arch, build_transformer_config(arch, ParallelLayout()), pre_process=True, post_process=True)
    policy.load_shard(hf_to_megatron_shard(hf.state_dict(), arch, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1))
    return hf, policy, arch


@pytest.mark.parametrize("family,tie", [("qwen2_vl", False), ("qwen2_5_vl", True)])
def test_policy_equals_hf_single_process(one_rank_world, family, tie):
    from megatron_vrft.models.qwen2_vl.logprobs import compute_token_logprobs

    hf, policy, arch = build_pair(family, one_rank_world, tie=tie)
    gen = torch.Generator().manual_seed(3)
    ids = torch.cat(
        [
            torch.randint(3, 290, (3,), generator=gen),
            torch.tensor([VSTART] + [IMAGE] * 8 + [VEND]),
            torch.randint(3, 290, (4,), generator=gen),
        ]
    )[None]
    grid = torch.tensor([[1, 8, 4]])
    pixels = torch.randn(32, 3 * 2 * PATCH * PATCH, generator=gen)
    pos = compute_mrope_position_ids(arch, ids, image_grid_thw=grid)
    logits = policy(ids, pos, None, pixel_values=pixels, image_grid_thw=grid)
    ref = hf(
        input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=compute_mm_token_type_ids(arch, ids)
    ).logits
    assert logits.shape == ref.shape
    assert (logits - ref).abs().max().item() <= 1e-5
    # Image features really enter: other pixels change the logits after the image.
    other = policy(ids, pos, None, pixel_values=pixels.flip(0), image_grid_thw=grid)
    assert (other - logits)[:, 4:].abs().max().item() > 1e-3

    targets = torch.roll(ids, -1, dims=1)
    lp, ent = compute_token_logprobs(logits, targets, tp_group=None, temperature=0.7, return_entropy=True)
    logp = torch.log_softmax(ref.double() / 0.7, dim=-1)
    torch.testing.assert_close(lp.double(), logp.gather(-1, targets[..., None])[..., 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(ent.double(), -(logp.exp() * logp).sum(-1), atol=1e-5, rtol=0)


def test_policy_rejects_mismatched_image_tokens(one_rank_world):
    hf, policy, arch = build_pair("qwen2_vl", one_rank_world, tie=False)
    ids = torch.tensor([[5, VSTART, IMAGE, IMAGE, VEND, 6]])  # 2 slots, grid gives 4 features
    grid = torch.tensor([[1, 4, 4]])
    with pytest.raises(ValueError, match="image features"):
        policy.embed_inputs(ids, torch.randn(16, 96), grid)


def test_policy_rejects_vocab_not_divisible_by_tp():
    from megatron_vrft.distributed.parallel_state import ParallelLayout
    from megatron_vrft.models.qwen2_vl.model import Qwen2VLPolicy
    from megatron_vrft.models.qwen2_vl.spec import build_transformer_config

    cfg = tiny_config("qwen2_vl")
    cfg.text_config.vocab_size = 321
    arch = build_qwen2_vl_arch(cfg)
    config = build_transformer_config(arch, ParallelLayout(tensor_parallel_size=2))
    with pytest.raises(ValueError, match="divisible by TP"):
        Qwen2VLPolicy(arch, config, pre_process=True, post_process=True)


def test_local_spec_on_cpu_and_config_fields():
    from megatron_vrft.distributed.parallel_state import ParallelLayout
    from megatron_vrft.models.qwen2_vl.spec import (
        Qwen2VLParallelism,
        build_layer_spec,
        build_transformer_config,
        use_transformer_engine,
    )

    assert not use_transformer_engine()  # no GPU here
    spec = build_layer_spec()
    assert "input_layernorm" in spec.submodules.__dataclass_fields__
    arch = build_qwen2_vl_arch(tiny_config("qwen2_vl"))
    c = build_transformer_config(arch, ParallelLayout(tensor_parallel_size=1))
    assert c.add_qkv_bias and not c.add_bias_linear and c.gated_linear_unit
    assert c.normalization == "RMSNorm" and c.num_query_groups == 2 and c.mrope_section == [2, 3, 3]
    assert c.variable_seq_lengths and c.moe_token_dispatcher_type == "alltoall" and c.batch_p2p_comm
    assert Qwen2VLParallelism is ParallelLayout
    # Interleaving: fixed shapes and unbatched p2p (megatron-core 0.16.1 crosses same-peer transfers).
    v = build_transformer_config(arch, ParallelLayout(pipeline_parallel_size=2, virtual_pipeline_parallel_size=1))
    assert not v.variable_seq_lengths and not v.batch_p2p_comm
    with pytest.raises(ValueError, match="variable_seq_lengths"):
        build_transformer_config(
            arch,
            ParallelLayout(pipeline_parallel_size=2, virtual_pipeline_parallel_size=1),
            variable_seq_lengths=True,
        )


def test_packed_policy_equals_hf_per_sequence(one_rank_world):
    """Packing on CPU: block-diagonal causal mask + per-sequence M-RoPE == separate HF forwards."""
    from megatron_vrft.models.qwen2_vl.inputs import build_packed_inputs, build_padded_inputs

    hf, policy, arch = build_pair("qwen2_5_vl", one_rank_world, tie=True)
    gen = torch.Generator().manual_seed(5)
    s1 = torch.cat(
        [
            torch.randint(3, 290, (2,), generator=gen),
            torch.tensor([VSTART] + [IMAGE] * 4 + [VEND]),
            torch.randint(3, 290, (3,), generator=gen),
        ]
    )
    s2 = torch.randint(3, 290, (6,), generator=gen)
    s3 = torch.cat([torch.tensor([VSTART] + [IMAGE] * 8 + [VEND]), torch.randint(3, 290, (2,), generator=gen)])
    grids = [torch.tensor([[1, 4, 4]]), None, torch.tensor([[1, 8, 4]])]
    pixels = torch.randn(16 + 32, 96, generator=gen)
    inputs, cu = build_packed_inputs(arch, [s1, s2, s3], grids, pixel_values=pixels)
    assert inputs.packed_seq_params is None and inputs.attention_mask.shape == (1, 1, 29, 29)
    logits = policy(**inputs.forward_kwargs())
    starts = [0, 16, 16]
    for i, (seq, grid) in enumerate(zip([s1, s2, s3], grids)):
        kwargs = {}
        if grid is not None:
            kwargs = dict(pixel_values=pixels[starts[i] : starts[i] + int(grid.prod())], image_grid_thw=grid)
        ref = hf(input_ids=seq[None], mm_token_type_ids=compute_mm_token_type_ids(arch, seq[None]), **kwargs).logits
        got = logits[:, int(cu[i]) : int(cu[i + 1])]
        assert (got - ref).abs().max().item() <= 1e-5, i
    # Without the block mask the second sequence would see the first: the test can tell.
    leaky = policy(
        inputs.input_ids, inputs.position_ids, None, pixel_values=pixels, image_grid_thw=inputs.image_grid_thw
    )
    assert (leaky - logits)[:, 11:].abs().max().item() > 1e-3

    # A padded batch built with the same helpers (left padding) matches HF with its mask.
    ids = torch.stack([torch.cat([torch.full((4,), 2), s2]), s1[:10]])
    pad = torch.ones_like(ids)
    pad[0, :4] = 0
    padded = build_padded_inputs(arch, ids, pad, pixel_values=pixels[:16], image_grid_thw=grids[0])
    out = policy(**padded.forward_kwargs())
    ref = hf(
        input_ids=ids,
        attention_mask=pad,
        pixel_values=pixels[:16],
        image_grid_thw=grids[0],
        mm_token_type_ids=compute_mm_token_type_ids(arch, ids),
    ).logits
    assert (out - ref).abs()[pad.bool()].max().item() <= 1e-5


def test_load_shard_rejects_mismatches(one_rank_world):
    hf, policy, arch = build_pair("qwen2_vl", one_rank_world, tie=False)
    shard = {n: p.detach().clone() for n, p in policy.named_parameters()}
    extra = dict(shard, **{"language_model.bogus": torch.zeros(1)})
    with pytest.raises(KeyError, match="bogus"):
        policy.load_shard(extra)
    name = "language_model.decoder.final_layernorm.weight"
    bad = dict(shard, **{name: torch.zeros(3)})
    with pytest.raises(ValueError, match="final_layernorm"):
        policy.load_shard(bad)
