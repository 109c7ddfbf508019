"""Checkpoint conversion on tiny random Qwen2-VL / Qwen2.5-VL saved by transformers (safetensors).

HF -> Megatron (dist_checkpointing, TP=2 chunks) -> HF must be bit-exact; a checkpoint must read back
at other TP/PP layouts bit-exactly, load into megatron-core's own GPTModel (the project's policy) via
``dist_checkpointing.load``, and a policy-saved checkpoint must export to the original HF tensors.
"""

from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from megatron_vrft.models.conversion import (
    HfCheckpointReader,
    MegatronCheckpointReader,
    build_policy_sharded_state_dict,
    convert_hf_to_megatron,
    convert_megatron_to_hf,
    reshard_megatron_checkpoint,
    write_checkpoint_meta,
)
from megatron_vrft.models.qwen2_vl.state_dict_adapter import as_arch, hf_to_megatron_shard

CLASSES = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}


def tiny_config(family: str, *, tie: bool, vocab: int = 250):
    text = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
    )
    if family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, patch_size=4)
        return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=2,
        out_hidden_size=64,
        patch_size=4,
        fullatt_block_indexes=[1],
        window_size=16,
    )
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie)


def save_tiny_hf(path, family: str, *, tie: bool, vocab: int = 250, dtype=torch.float32):
    config = tiny_config(family, tie=tie, vocab=vocab)
    torch.manual_seed(hash((family, tie, vocab)) % 1000)
    model = CLASSES[family](config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    model.save_pretrained(path, max_shard_size="200KB")  # several shards + index json
    return model


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield d


def read_all(path) -> dict[str, torch.Tensor]:
    r = HfCheckpointReader(path)
    return {n: r.get(n) for n in r.names()}


@pytest.mark.parametrize("family,tie,dtype", [("qwen2_vl", True, torch.bfloat16), ("qwen2_5_vl", False, torch.float32)])
def test_hf_megatron_hf_round_trip_is_bit_exact(workdir, family, tie, dtype):
    hf = os.path.join(workdir, f"hf-{family}")
    model = save_tiny_hf(hf, family, tie=tie, dtype=dtype)
    mg = os.path.join(workdir, f"mg-{family}")
    convert_hf_to_megatron(hf, mg, tp_size=2, pp_size=2, vocab_padded_size=256, progress=False)
    back = os.path.join(workdir, f"back-{family}")
    convert_megatron_to_hf(mg, back, max_shard_bytes=100_000, progress=False)
    src, out = read_all(hf), read_all(back)
    assert src.keys() == out.keys()
    for name in src:
        assert out[name].dtype == dtype and torch.equal(out[name], src[name]), name
    assert ("lm_head.weight" in out) is (not tie)
    assert len(json.loads(open(os.path.join(back, "model.safetensors.index.json")).read())["weight_map"]) == len(src)
    # transformers itself reads the exported directory.
    reloaded = CLASSES[family].from_pretrained(back, dtype=dtype)
    for k, v in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v), k
    assert not [p for p in os.listdir(workdir) if ".partial-" in p or p.startswith(".staging-")]


@pytest.mark.parametrize("family,tie", [("qwen2_vl", True), ("qwen2_5_vl", False)])
def test_reading_at_another_tp_pp_is_bit_exact(workdir, family, tie):
    hf = os.path.join(workdir, f"hf-reshard-{family}")
    save_tiny_hf(hf, family, tie=tie)
    mg = os.path.join(workdir, f"mg-reshard-{family}")
    convert_hf_to_megatron(hf, mg, tp_size=2, pp_size=2, vocab_padded_size=256, progress=False)
    src = read_all(hf)
    reader = MegatronCheckpointReader(mg)
    for tp, pp in [(1, 2), (4, 1), (2, 4)]:
        for tp_rank in range(tp):
            for pp_rank in range(pp):
                got = reader.load_shard(tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp)
                want = hf_to_megatron_shard(
                    src, reader.arch, tp_rank=tp_rank, tp_size=tp, pp_rank=pp_rank, pp_size=pp, vocab_padded_size=256
                )
                assert got.keys() == want.keys()
                assert all(torch.equal(got[k], want[k]) for k in got), (tp, pp, tp_rank, pp_rank)
    # Re-chunk TP=2 -> TP=1 on disk with no vocabulary padding; contents unchanged.
    mg1 = os.path.join(workdir, f"mg-reshard-tp1-{family}")
    reshard_megatron_checkpoint(mg, mg1, tp_size=1, pp_size=2, vocab_padded_size=250, progress=False)
    r1 = MegatronCheckpointReader(mg1)
    assert r1.vocab_padded_size == 250
    assert r1.get_megatron("language_model.embedding.word_embeddings.weight").shape[0] == 250
    for name, tensor in src.items():
        assert torch.equal(r1.hf_tensor(name), tensor), name


@pytest.fixture(scope="module")
def one_rank_world():
    import torch.distributed as dist

    from megatron_vrft.distributed.parallel_state import (
        ParallelLayout,
        destroy_model_parallel,
        initialize_model_parallel,
    )

    owned = not dist.is_initialized()
    if owned:
        store = os.path.join(tempfile.mkdtemp(), "store")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    initialize_model_parallel(ParallelLayout())
    yield
    destroy_model_parallel()
    if owned:
        dist.destroy_process_group()


@pytest.mark.parametrize("family,tie", [("qwen2_vl", True), ("qwen2_5_vl", False)])
def test_megatron_core_loads_and_saves_the_format(workdir, one_rank_world, family, tie):
    from megatron.core import dist_checkpointing

    from megatron_vrft.models.qwen2_vl.model import Qwen2VLPolicy
    from megatron_vrft.models.qwen2_vl.spec import Qwen2VLParallelism, build_layer_spec, build_transformer_config

    hf = os.path.join(workdir, f"hf-mcore-{family}")
    save_tiny_hf(hf, family, tie=tie, vocab=256)
    mg = os.path.join(workdir, f"mg-mcore-{family}")
    convert_hf_to_megatron(hf, mg, tp_size=2, progress=False)  # written as TP=2 chunks, read at TP=1
    arch = as_arch(HfCheckpointReader(hf).config())
    policy = Qwen2VLPolicy(
        arch,
        build_transformer_config(arch, Qwen2VLParallelism()),
        pre_process=True,
        post_process=True,
        layer_spec=build_layer_spec(use_te=False),
    )
    with torch.no_grad():
        for p in policy.parameters():
            p.zero_()
    loaded = dist_checkpointing.load(build_policy_sharded_state_dict(policy, tp_rank=0, dp_rank=0), mg)
    missing, unexpected = policy.load_state_dict(loaded, strict=False)
    assert not unexpected and not [m for m in missing if not m.endswith("_extra_state")]
    src = read_all(hf)
    want = hf_to_megatron_shard(src, arch, tp_rank=0, tp_size=1, pp_rank=0, pp_size=1)
    params = dict(policy.named_parameters())
    assert params.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(params[k].detach(), v), k

    # The policy saves in the same format; with the sidecar it exports back to the HF tensors.
    saved = os.path.join(workdir, f"mg-saved-{family}")
    os.makedirs(saved)
    from megatron_vrft.distributed.cpu_compat import apply_cpu_compat_patches

    apply_cpu_compat_patches()  # dist_checkpointing's writer hard-codes CUDA (patch 9)
    dist_checkpointing.save(build_policy_sharded_state_dict(policy, tp_rank=0, dp_rank=0), saved)
    write_checkpoint_meta(saved, arch)
    back = os.path.join(workdir, f"back-saved-{family}")
    convert_megatron_to_hf(saved, back, progress=False)
    out = read_all(back)
    assert out.keys() == src.keys()
    assert all(torch.equal(out[k], src[k]) for k in src)


def test_bad_checkpoints_name_the_key(workdir):
    hf = os.path.join(workdir, "hf-bad-src")
    save_tiny_hf(hf, "qwen2_vl", tie=False)
    src = read_all(hf)
    config = HfCheckpointReader(hf).config()

    def write(name, tensors):
        path = os.path.join(workdir, name)
        os.makedirs(path)
        save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        open(os.path.join(path, "config.json"), "w").write(json.dumps(config))
        return path

    missing = write("hf-missing", {k: v for k, v in src.items() if k != "model.layers.3.mlp.up_proj.weight"})
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.3\.mlp\.up_proj\.weight'\]"):
        convert_hf_to_megatron(missing, os.path.join(workdir, "out-missing"), progress=False)
    extra = write("hf-extra", {**src, "model.layers.9.mlp.up_proj.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"unexpected \['model\.layers\.9\.mlp\.up_proj\.weight'\]"):
        convert_hf_to_megatron(extra, os.path.join(workdir, "out-extra"), progress=False)
    shaped = write("hf-shape", {**src, "visual.blocks.1.attn.qkv.weight": torch.zeros(96, 31)})
    out = os.path.join(workdir, "out-shape")
    with pytest.raises(ValueError, match=r"visual\.blocks\.1\.attn\.qkv\.weight.*\(96, 31\)"):
        convert_hf_to_megatron(shaped, out, progress=False)
    assert not os.path.exists(out)  # nothing half-written
    assert not [p for p in os.listdir(workdir) if ".partial-" in p]
    mg = os.path.join(workdir, "mg-bad")
    convert_hf_to_megatron(hf, mg, progress=False)
    with pytest.raises(FileExistsError, match="mg-bad"):
        convert_hf_to_megatron(hf, mg, progress=False)
    with pytest.raises(KeyError, match=r"language_model\.nonexistent"):
        MegatronCheckpointReader(mg).read("language_model.nonexistent")
    with pytest.raises(KeyError, match=r"model\.layers\.4\.mlp\.up_proj\.weight"):
        MegatronCheckpointReader(mg).hf_tensor("model.layers.4.mlp.up_proj.weight")
