"""HF <-> Megatron name map on tiny random Qwen2-VL / Qwen2.5-VL: round trips, layouts, errors.

Layouts are checked two ways: against megatron-core's own SelfAttention / MLP modules at TP = 1 (run
on CPU), and at TP > 1 against the split rule written out independently here (the per-rank q/k/v
projections and the per-rank SwiGLU activations of a random input must equal the HF ones).
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from megatron_vrft.models.qwen2_vl.state_dict_adapter import (
    as_arch,
    compute_vocab_padded_size,
    hf_hub_name,
    hf_param_names,
    hf_to_megatron_shard,
    megatron_param_shapes,
    megatron_shards_to_hf,
    pipeline_layer_ranges,
)

LM = "language_model."


def tiny_config(family: str, *, tie: bool, heads: int = 4, kv_heads: int = 2, layers: int = 4):
    hidden = 64
    head_dim = hidden // heads
    quarter = head_dim // 4
    text = dict(
        hidden_size=hidden,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=250,
        rope_parameters=dict(
            rope_type="default", rope_theta=10000.0, mrope_section=[quarter, quarter, head_dim // 2 - 2 * quarter]
        ),
    )
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=4)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=hidden,
        patch_size=4,
        fullatt_block_indexes=[1],
        window_size=16,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie)


def tiny_state_dict(config) -> dict[str, torch.Tensor]:
    cls = Qwen2VLForConditionalGeneration if config.model_type == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(0)
    model = cls(config)
    # Random everything (norms included), so a swapped tensor cannot go unnoticed.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model.state_dict()


def all_shards(sd, arch, tp, pp, **kw):
    return {
        (t, p): hf_to_megatron_shard(sd, arch, tp_rank=t, tp_size=tp, pp_rank=p, pp_size=pp, **kw)
        for t in range(tp)
        for p in range(pp)
    }


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 2), (4, 1), (1, 4)])
@pytest.mark.parametrize("layer_spec", ["local", "te"])
def test_round_trip_is_bit_exact(family, tie, tp, pp, layer_spec):
    cfg = tiny_config(family, tie=tie)
    sd = tiny_state_dict(cfg)  # in-memory naming (model.language_model.*, model.visual.*)
    arch = as_arch(cfg)
    vp = compute_vocab_padded_size(arch.vocab_size, make_vocab_size_divisible_by=8, tp_size=tp)
    shards = all_shards(sd, arch, tp, pp, layer_spec=layer_spec, vocab_padded_size=vp)
    out = list(megatron_shards_to_hf(lambda t, p: shards[(t, p)], arch, tp_size=tp, pp_size=pp, layer_spec=layer_spec))
    names = [n for n, _ in out]
    assert len(names) == len(set(names))
    expected = {hf_hub_name(k): v for k, v in sd.items() if not (tie and k == "lm_head.weight")}
    assert set(names) == set(expected) == set(hf_param_names(arch))
    for name, tensor in out:
        assert torch.equal(tensor, expected[name]), name
    # Shapes of every shard agree with the meta-device shape listing.
    for (_, p), shard in shards.items():
        shapes = megatron_param_shapes(
            arch, tp_size=tp, pp_size=pp, pp_rank=p, layer_spec=layer_spec, vocab_padded_size=vp
        )
        assert {k: v.shape for k, v in shard.items()} == shapes


def test_hub_and_in_memory_naming_give_the_same_shard():
    cfg = tiny_config("qwen2_5_vl", tie=False)
    sd = tiny_state_dict(cfg)
    hub = {hf_hub_name(k): v for k, v in sd.items()}
    assert "model.layers.0.self_attn.q_proj.weight" in hub and "visual.merger.mlp.0.weight" in hub
    a = hf_to_megatron_shard(sd, cfg, tp_rank=1, tp_size=2, pp_rank=0, pp_size=1)
    b = hf_to_megatron_shard(hub.__getitem__, cfg, tp_rank=1, tp_size=2, pp_rank=0, pp_size=1)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("vision.merger.") for k in a)


def _hf_qkv(sd, layer, x):
    p = f"model.language_model.layers.{layer}.self_attn."
    return [F.linear(x, sd[p + f"{n}_proj.weight"], sd[p + f"{n}_proj.bias"]) for n in "qkv"]


@pytest.mark.parametrize("heads,kv_heads,tp", [(4, 2, 2), (8, 2, 2), (8, 2, 4), (8, 2, 8), (4, 4, 4)])
def test_qkv_shards_follow_mcore_split_rule(heads, kv_heads, tp):
    """Per rank: the fused shard split by mcore's rule gives exactly this rank's HF q/k/v heads."""
    cfg = tiny_config("qwen2_vl", tie=False, heads=heads, kv_heads=kv_heads, layers=1)
    sd = tiny_state_dict(cfg)
    arch = as_arch(cfg)
    hd = arch.head_dim
    x = torch.randn(5, arch.hidden_size, dtype=torch.float64)
    sd64 = {k: v.double() for k, v in sd.items()}
    q, k, v = (t.view(5, -1, hd) for t in _hf_qkv(sd64, 0, x))
    shards = all_shards(sd64, arch, tp, 1, vocab_padded_size=256)
    mixed_full = torch.cat(
        [
            F.linear(
                x,
                s[LM + "decoder.layers.0.self_attention.linear_qkv.weight"],
                s[LM + "decoder.layers.0.self_attention.linear_qkv.bias"],
            )
            for (_, _), s in sorted(shards.items())
        ],
        dim=-1,
    )
    for rank in range(tp):
        s = shards[(rank, 0)]
        mixed = F.linear(
            x,
            s[LM + "decoder.layers.0.self_attention.linear_qkv.weight"],
            s[LM + "decoder.layers.0.self_attention.linear_qkv.bias"],
        )
        if kv_heads >= tp:
            groups = kv_heads // tp
            heads_per_rank = heads // tp
        else:  # mcore all-gathers and keeps this rank's one group
            groups, heads_per_rank = 1, heads // tp
            size = mixed_full.shape[-1] // kv_heads
            g = rank // (tp // kv_heads)
            mixed = mixed_full[:, g * size : (g + 1) * size]
        per_group = heads // kv_heads
        m = mixed.view(5, groups, (per_group + 2) * hd)
        mq, mk, mv = torch.split(m, [per_group * hd, hd, hd], dim=-1)
        mq = mq.reshape(5, -1, hd)
        if kv_heads < tp:
            j = rank % (tp // kv_heads)
            mq = mq[:, j * heads_per_rank : (j + 1) * heads_per_rank]
            first_group = rank // (tp // kv_heads)
        else:
            first_group = rank * groups
        h0 = rank * heads_per_rank
        # float64 matmuls of differently shaped weights may round differently in the last bit.
        close = dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mq, q[:, h0 : h0 + heads_per_rank], **close)
        torch.testing.assert_close(mk.reshape(5, -1, hd), k[:, first_group : first_group + groups], **close)
        torch.testing.assert_close(mv.reshape(5, -1, hd), v[:, first_group : first_group + groups], **close)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_mlp_and_row_parallel_shards_reproduce_hf(tp):
    """Sum over ranks of fc2(swiglu(fc1 x)) equals HF's MLP; sum of linear_proj partials equals o_proj."""
    cfg = tiny_config("qwen2_5_vl", tie=False, layers=1)
    sd = {k: v.double() for k, v in tiny_state_dict(cfg).items()}
    arch = as_arch(cfg)
    x = torch.randn(7, arch.hidden_size, dtype=torch.float64)
    p = "model.language_model.layers.0."
    hf_mlp = F.linear(
        F.silu(F.linear(x, sd[p + "mlp.gate_proj.weight"])) * F.linear(x, sd[p + "mlp.up_proj.weight"]),
        sd[p + "mlp.down_proj.weight"],
    )
    attn_in = torch.randn(7, arch.num_attention_heads * arch.head_dim, dtype=torch.float64)
    hf_proj = F.linear(attn_in, sd[p + "self_attn.o_proj.weight"])
    mlp_out = torch.zeros_like(hf_mlp)
    proj_out = torch.zeros_like(hf_proj)
    shards = all_shards(sd, arch, tp, 1, vocab_padded_size=256)
    for rank, s in ((t, shards[(t, 0)]) for t in range(tp)):
        gate, up = torch.chunk(F.linear(x, s[LM + "decoder.layers.0.mlp.linear_fc1.weight"]), 2, dim=-1)
        mlp_out += F.linear(F.silu(gate) * up, s[LM + "decoder.layers.0.mlp.linear_fc2.weight"])
        cols = attn_in.shape[-1] // tp
        proj_out += F.linear(
            attn_in[:, rank * cols : (rank + 1) * cols], s[LM + "decoder.layers.0.self_attention.linear_proj.weight"]
        )
    torch.testing.assert_close(mlp_out, hf_mlp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(proj_out, hf_proj, rtol=1e-12, atol=1e-12)


def test_vocab_padding_rows_are_zero_and_lookup_matches():
    cfg = tiny_config("qwen2_vl", tie=True)
    sd = tiny_state_dict(cfg)
    arch = as_arch(cfg)
    vp = compute_vocab_padded_size(250, make_vocab_size_divisible_by=16, tp_size=4)
    assert vp == 256
    shards = all_shards(sd, arch, 4, 2, vocab_padded_size=vp)
    emb = torch.cat([shards[(t, 0)][LM + "embedding.word_embeddings.weight"] for t in range(4)])
    out = torch.cat([shards[(t, 1)][LM + "output_layer.weight"] for t in range(4)])
    assert emb.shape == (256, 64)
    assert torch.equal(emb[250:], torch.zeros(6, 64))
    ids = torch.randint(0, 250, (20,))
    assert torch.equal(emb[ids], sd["model.language_model.embed_tokens.weight"][ids])
    assert torch.equal(out, emb)  # tied: the last stage's copy equals the embedding
    with pytest.raises(ValueError, match="vocab_padded_size"):
        hf_to_megatron_shard(sd, arch, tp_rank=0, tp_size=4, pp_rank=0, pp_size=1, vocab_padded_size=251)


def test_tied_output_layer_only_with_pipeline():
    cfg = tiny_config("qwen2_vl", tie=True)
    sd = tiny_state_dict(cfg)
    pp1 = hf_to_megatron_shard(sd, cfg, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    assert LM + "output_layer.weight" not in pp1
    last = hf_to_megatron_shard(sd, cfg, tp_rank=0, tp_size=1, pp_rank=1, pp_size=2)
    assert torch.equal(last[LM + "output_layer.weight"], sd["model.language_model.embed_tokens.weight"])
    assert not any(k.startswith("vision.") or "embedding" in k for k in last)


def test_missing_and_misshaped_tensors_name_the_key():
    cfg = tiny_config("qwen2_vl", tie=False)
    sd = tiny_state_dict(cfg)
    broken = dict(sd)
    del broken["model.language_model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(KeyError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        hf_to_megatron_shard(broken, cfg, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    broken = dict(sd)
    broken["model.language_model.layers.1.self_attn.k_proj.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.bias.*\(3,\)"):
        hf_to_megatron_shard(broken, cfg, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)

    def getter(name):  # a callable source raising KeyError on an unknown name
        return {hf_hub_name(k): v for k, v in sd.items()}[name]

    shards = all_shards(sd, cfg, 2, 1)
    del shards[(1, 0)][LM + "decoder.layers.3.mlp.linear_fc2.weight"]
    with pytest.raises(KeyError, match=r"decoder\.layers\.3\.mlp\.linear_fc2\.weight.*tp=1"):
        list(megatron_shards_to_hf(lambda t, p: shards[(t, p)], cfg, tp_size=2, pp_size=1))
    assert hf_to_megatron_shard(getter, cfg, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    with pytest.raises(ValueError, match="tp_size=3"):
        hf_to_megatron_shard(sd, cfg, tp_rank=0, tp_size=3, pp_rank=0, pp_size=1)


def test_pipeline_layer_ranges_follow_mcore_rule():
    assert pipeline_layer_ranges(8, 2) == [range(0, 4), range(4, 8)]
    assert pipeline_layer_ranges(10, 4, num_layers_in_first_pipeline_stage=1, num_layers_in_last_pipeline_stage=3) == [
        range(0, 1),
        range(1, 4),
        range(4, 7),
        range(7, 10),
    ]
    with pytest.raises(ValueError, match="cannot be split"):
        pipeline_layer_ranges(7, 2)
    cfg = tiny_config("qwen2_vl", tie=False, layers=5)
    sd = tiny_state_dict(cfg)
    kw = dict(num_layers_in_first_pipeline_stage=2)
    shards = all_shards(sd, cfg, 1, 2, **kw)
    assert sum(k.endswith("linear_fc2.weight") for k in shards[(0, 1)]) == 3
    out = dict(megatron_shards_to_hf(lambda t, p: shards[(t, p)], cfg, tp_size=1, pp_size=2, **kw))
    assert all(torch.equal(out[hf_hub_name(k)], v) for k, v in sd.items())


# --- against megatron-core's own modules (TP = 1, one process) ------------------------------------


@pytest.fixture(scope="module")
def mcore_world():
    import torch.distributed as dist

    from megatron_vrft.distributed.cpu_compat import apply_cpu_compat_patches

    apply_cpu_compat_patches()
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    owned = not dist.is_initialized()
    tmp = tempfile.mkdtemp()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
    owned_mp = not parallel_state.model_parallel_is_initialized()
    if owned_mp:
        parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(0)
    yield
    if owned_mp:
        parallel_state.destroy_model_parallel()
    if owned:
        dist.destroy_process_group()


@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (8, 2), (4, 4)])
def test_qkv_matches_mcore_self_attention(mcore_world, heads, kv_heads):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module

    from megatron_vrft.models.qwen2_vl.spec import Qwen2VLParallelism, build_transformer_config

    cfg = tiny_config("qwen2_vl", tie=False, heads=heads, kv_heads=kv_heads, layers=1)
    sd = tiny_state_dict(cfg)
    arch = as_arch(cfg)
    tc = build_transformer_config(arch, Qwen2VLParallelism())
    attn = build_module(
        get_gpt_layer_local_spec(normalization="RMSNorm").submodules.self_attention, config=tc, layer_number=1
    )
    shard = hf_to_megatron_shard(sd, arch, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    prefix = LM + "decoder.layers.0.self_attention."
    own = {k[len(prefix) :]: v for k, v in shard.items() if k.startswith(prefix)}
    missing, unexpected = attn.load_state_dict(own, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("_extra_state")]
    x = torch.randn(6, 2, arch.hidden_size)  # (s, b, h)
    with torch.no_grad():
        mq, mk, mv = attn.get_query_key_value_tensors(x)
        q, k, v = _hf_qkv(sd, 0, x)
    hd = arch.head_dim
    close = dict(rtol=1e-5, atol=1e-5)  # fp32 matmuls of fused vs separate weights
    torch.testing.assert_close(mq, q.view(6, 2, heads, hd), **close)
    torch.testing.assert_close(mk, k.view(6, 2, kv_heads, hd), **close)
    torch.testing.assert_close(mv, v.view(6, 2, kv_heads, hd), **close)


def test_fc1_matches_mcore_mlp(mcore_world):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_vrft.models.qwen2_vl.spec import Qwen2VLParallelism, build_transformer_config

    cfg = tiny_config("qwen2_vl", tie=False, layers=1)
    sd = tiny_state_dict(cfg)
    arch = as_arch(cfg)
    tc = build_transformer_config(arch, Qwen2VLParallelism())
    spec = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.mlp
    if isinstance(spec, ModuleSpec):  # megatron-core 0.16: a ModuleSpec of MLP
        mlp = build_module(spec, config=tc)
    else:  # 0.17+: a builder (functools.partial of MLP.as_mlp_submodule), called as TransformerLayer does
        from megatron.core.process_groups_config import ProcessGroupCollection

        mlp = spec(config=tc, pg_collection=ProcessGroupCollection.use_mpu_process_groups(), is_mtp_layer=False)
    shard = hf_to_megatron_shard(sd, arch, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    prefix = LM + "decoder.layers.0.mlp."
    mlp.load_state_dict({k[len(prefix) :]: v for k, v in shard.items() if k.startswith(prefix)}, strict=False)
    x = torch.randn(6, 2, arch.hidden_size)
    p = "model.language_model.layers.0.mlp."
    with torch.no_grad():
        out, _ = mlp(x)
        ref = F.linear(
            F.silu(F.linear(x, sd[p + "gate_proj.weight"])) * F.linear(x, sd[p + "up_proj.weight"]),
            sd[p + "down_proj.weight"],
        )
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)
