"""Full-size name/shape checks on the meta device: Qwen2-VL-2B/7B, Qwen2.5-VL-3B/7B public configs.

The name table (``PARAM_TABLE``) is checked complete and consistent against both references: every HF
tensor and every megatron-core parameter maps to exactly one row, and back.

Independent references: the HF model built on ``meta`` from the public config (names and shapes of
every HF tensor), and megatron-core's ``GPTModel`` built on ``meta`` with the project's layer spec and
config (names and TP=1 shapes of every language-model tensor, per pipeline stage). TP > 1 shapes are
derived from the ``partition_dim`` megatron-core attaches to each parallel parameter.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from transformers import CONFIG_MAPPING, Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from megatron_vrft.models.qwen2_vl.state_dict_adapter import (
    PARAM_TABLE,
    as_arch,
    compute_vocab_padded_size,
    expand_param_table,
    find_hf_mapping,
    find_megatron_mapping,
    hf_export_order,
    hf_hub_name,
    hf_param_shapes,
    hf_to_megatron_shard,
    megatron_param_shapes,
    tp_split_axis,
)

ASSET = Path(__file__).resolve().parents[1] / "assets" / "conversion_public_qwen_vl_configs.json"
PUBLIC = {k: v for k, v in json.loads(ASSET.read_text()).items() if not k.startswith("_")}
LM = "language_model."


def public_config(name: str):
    d = dict(PUBLIC[name]["config"])
    return CONFIG_MAPPING[d.pop("model_type")](**d)


def hf_meta_state(config) -> dict[str, torch.Size]:
    cls = Qwen2VLForConditionalGeneration if config.model_type == "qwen2_vl" else Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = cls(config)
    return {hf_hub_name(k): v.shape for k, v in model.state_dict().items()}


def valid_tp(arch, tp: int) -> bool:
    return arch.num_attention_heads % tp == 0 and (
        arch.num_key_value_heads % tp == 0 or tp % arch.num_key_value_heads == 0
    )


@pytest.fixture(scope="module")
def mcore_world():
    import torch.distributed as dist

    from megatron_vrft.distributed.cpu_compat import apply_cpu_compat_patches

    apply_cpu_compat_patches()
    from megatron.core import parallel_state

    owned = not dist.is_initialized()
    if owned:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    owned_mp = not parallel_state.model_parallel_is_initialized()
    if owned_mp:
        parallel_state.initialize_model_parallel(1, 1)
    yield
    if owned_mp:
        parallel_state.destroy_model_parallel()
    if owned:
        dist.destroy_process_group()


def mcore_meta_params(arch, *, pp: int, pre: bool, post: bool, vocab_padded_size: int):
    """name -> (TP=1 shape, partition_dim or None) of megatron-core's GPTModel for one stage."""
    from megatron.core.models.gpt import GPTModel

    from megatron_vrft.models.qwen2_vl.spec import Qwen2VLParallelism, build_layer_spec, build_transformer_config

    tc = build_transformer_config(arch, Qwen2VLParallelism(pipeline_parallel_size=pp), use_cpu_initialization=True)
    # Tied embeddings with PP > 1: the last stage allocates output_layer.weight exactly as an untied
    # model does (``skip_weight_param_allocation = pre_process and share``); building it untied avoids
    # mcore's first-stage assertion, which a one-process world (pp rank 0 everywhere) would trip.
    share = arch.tie_word_embeddings and pp == 1
    with torch.device("meta"):
        model = GPTModel(
            config=tc,
            transformer_layer_spec=build_layer_spec(use_te=False),
            vocab_size=vocab_padded_size,
            max_sequence_length=arch.max_position_embeddings,
            pre_process=pre,
            post_process=post,
            share_embeddings_and_output_weights=share,
            position_embedding_type="mrope",
        )
    return {
        LM + k: (p.shape, getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None)
        for k, p in model.named_parameters()
    }


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_hf_names_shapes_and_published_size(name):
    config = public_config(name)
    arch = as_arch(config)
    hf = hf_meta_state(config)
    if arch.tie_word_embeddings:  # HF lists the tied head in its state dict; checkpoints omit it
        assert hf.pop("lm_head.weight") == hf["model.embed_tokens.weight"]
    assert hf == hf_param_shapes(arch)
    total = sum(s.numel() for s in hf.values())
    published = PUBLIC[name]["published_params"]
    assert abs(total - published) / published < 0.03, (total, published)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_megatron_shapes_match_mcore_gptmodel_at_every_tp_pp(mcore_world, name):
    config = public_config(name)
    arch = as_arch(config)
    hf = hf_param_shapes(arch)
    hf_total = sum(s.numel() for s in hf.values())
    checked = 0
    for tp in (1, 2, 4, 8):
        if not valid_tp(arch, tp):
            with pytest.raises(ValueError, match=f"tp_size={tp}"):
                megatron_param_shapes(arch, tp_size=tp, pp_size=1, pp_rank=0)
            continue
        vp = compute_vocab_padded_size(arch.vocab_size, make_vocab_size_divisible_by=128, tp_size=tp)
        for pp in (1, 2):
            mega_total = 0
            for rank in range(pp):
                ours = megatron_param_shapes(arch, tp_size=tp, pp_size=pp, pp_rank=rank, vocab_padded_size=vp)
                ref = mcore_meta_params(arch, pp=pp, pre=rank == 0, post=rank == pp - 1, vocab_padded_size=vp)
                lm = {k: v for k, v in ours.items() if k.startswith(LM)}
                assert lm.keys() == ref.keys(), (tp, pp, rank, lm.keys() ^ ref.keys())
                for key, (shape, dim) in ref.items():
                    want = list(shape)
                    if dim is not None:
                        assert want[dim] % tp == 0, key
                        want[dim] //= tp
                    assert list(lm[key]) == want, (key, tp, pp)
                vision = {k[len("vision.") :]: v for k, v in ours.items() if k.startswith("vision.")}
                assert vision == (
                    {k[len("visual.") :]: v for k, v in hf.items() if k.startswith("visual.")} if rank == 0 else {}
                )
                # Parameter count over all TP ranks: split tensors x tp, replicated ones once.
                for key, shape in ours.items():
                    split = key.startswith(LM) and ref[key][1] is not None
                    mega_total += shape.numel() * (tp if split else 1)
                checked += 1
            padding = (vp - arch.vocab_size) * arch.hidden_size
            heads = 1 if (not arch.tie_word_embeddings or pp > 1) else 0  # output layer present
            tied_copy = arch.vocab_size * arch.hidden_size if (arch.tie_word_embeddings and pp > 1) else 0
            assert mega_total == hf_total + padding * (1 + heads) + tied_copy, (tp, pp)
    assert checked >= 6


@pytest.mark.parametrize("name", ["Qwen2-VL-7B-Instruct", "Qwen2.5-VL-3B-Instruct"])
def test_every_hf_tensor_is_read_by_exactly_one_stage(name):
    arch = as_arch(public_config(name))
    shapes = hf_param_shapes(arch)
    tp, pp = 2, 2
    for tp_rank in range(tp):
        reads: dict[str, int] = {}

        def get(key):
            reads[key] = reads.get(key, 0) + 1
            return torch.empty(shapes[key], device="meta")

        for pp_rank in range(pp):
            hf_to_megatron_shard(get, arch, tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp)
        assert reads.keys() == shapes.keys()
        twice = {k for k, n in reads.items() if n != 1}
        # Only the tied embedding is read twice: once for the embedding, once for the last stage's copy.
        assert twice == ({"model.embed_tokens.weight"} if arch.tie_word_embeddings else set())


def test_te_names_are_mcore_fused_norm_names():
    """The local spec's checkpoint key map (mcore's own) renames its norms to our TE-spec names."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    keys_map = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    arch = as_arch(public_config("Qwen2-VL-2B-Instruct"))
    local = megatron_param_shapes(arch, tp_size=2, pp_size=1, pp_rank=0, layer_spec="local")
    te = megatron_param_shapes(arch, tp_size=2, pp_size=1, pp_rank=0, layer_spec="te")
    renamed = {}
    for key, shape in local.items():
        for old, new in keys_map.items():
            if f".{old}" in key:
                key = key.replace(f".{old}", f".{new}")
        renamed[key] = shape
    assert renamed == te
    assert "language_model.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te


# ----------------------------------------------------------------------------------------------
# The name table (PARAM_TABLE): complete and consistent on the real configs


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_hf_tensor_maps_to_exactly_one_row_and_back(name):
    config = public_config(name)
    arch = as_arch(config)
    hf = hf_meta_state(config)
    if arch.tie_word_embeddings:
        hf.pop("lm_head.weight")
    bound = expand_param_table(arch)
    exported = [n for b in bound for n in b.hf]
    assert sorted(exported) == sorted(hf), set(exported) ^ set(hf)  # each HF tensor exactly once
    assert hf_export_order(exported) == list(hf)  # HF's own state-dict order
    for b in bound:
        for i, hf_name in enumerate(b.hf):
            matches = [(row, j) for row in PARAM_TABLE for j, t in enumerate(row.hf) if _matches(t, hf_name)]
            assert matches == [(b.mapping, i)], hf_name
            row, j, fields = find_hf_mapping(hf_name)
            assert (row, j) == (b.mapping, i)
            assert row.megatron.format(**fields) == b.global_megatron  # and back
        row, fields = find_megatron_mapping(b.global_megatron)
        assert row is b.mapping and tuple(h.format(**fields) for h in row.hf) == b.hf


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_mcore_parameter_maps_to_exactly_one_row(mcore_world, name):
    arch = as_arch(public_config(name))
    tp = 2
    vp = compute_vocab_padded_size(arch.vocab_size, make_vocab_size_divisible_by=128, tp_size=tp)
    for pp in (1, 2):
        for rank in range(pp):
            ref = mcore_meta_params(arch, pp=pp, pre=rank == 0, post=rank == pp - 1, vocab_padded_size=vp)
            bound = {b.megatron: b for b in expand_param_table(arch, pp_rank=rank, pp_size=pp)}
            assert {k for k in bound if k.startswith(LM)} == ref.keys(), (pp, rank)
            for key, (_, partition_dim) in ref.items():
                rows = [row for row in PARAM_TABLE if _matches(row.megatron, key)]
                assert rows == [bound[key].mapping], key
                assert find_megatron_mapping(key)[0] is rows[0]
                assert rows[0].tp_axis == partition_dim, key  # TP axis = mcore's partition_dim
                assert tp_split_axis(key) == partition_dim
            # The TE spec's names: the local spec's, renamed as mcore's checkpoint key map does.
            te = [b.megatron for b in expand_param_table(arch, layer_spec="te", pp_rank=rank, pp_size=pp)]
            assert [find_megatron_mapping(n)[0] for n in te] == [b.mapping for b in bound.values()]


def _matches(template: str, name: str) -> bool:
    import re

    parts = re.split(r"(\{layer\}|\{name\})", template)
    regex = "".join({"{layer}": "[0-9]+", "{name}": ".+"}.get(p) or re.escape(p) for p in parts)
    return re.fullmatch(regex, name) is not None
