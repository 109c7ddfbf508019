"""Each megatron-core CPU patch in megatron_vrft.distributed.cpu_compat, one test per behaviour.

The multi-rank paths (TP all-gather of logits, PP p2p shape exchange, tied embeddings over PP) are
exercised for real by tests/integration/test_integration_model_parallel_qwen2_vl.py.
"""

import warnings

import pytest
import torch

from megatron_vrft.distributed import cpu_compat
from megatron_vrft.distributed.cpu_compat import apply_cpu_compat_patches, is_cpu_compat_applied

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only patches")

CPU = torch.device("cpu")


@pytest.fixture(scope="module", autouse=True)
def patched():
    assert apply_cpu_compat_patches() is True
    yield


@pytest.fixture
def one_rank_world(patched):
    """A 1-rank gloo world with megatron's model-parallel groups (torn down afterwards)."""
    from megatron_vrft.distributed.parallel_state import single_rank_world

    with single_rank_world(seed=123) as groups:
        yield groups


def test_idempotent_and_reported():
    from megatron.core.tensor_parallel import random as mrandom

    proxy = mrandom.torch
    assert apply_cpu_compat_patches() is True
    assert mrandom.torch is proxy  # not wrapped twice
    assert is_cpu_compat_applied()
    for name in cpu_compat.PATCHED_MODULES:
        module = __import__(name, fromlist=["torch"])
        assert module.torch is not torch, name


def test_not_applied_when_cuda_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert apply_cpu_compat_patches() is False


def test_unverified_version_warns(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.warns(RuntimeWarning, match="0.99.0"):
        apply_cpu_compat_patches()


def test_verified_version_is_silent():
    assert cpu_compat.megatron_core_version() in cpu_compat.VERIFIED_MEGATRON_CORE_VERSIONS
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        apply_cpu_compat_patches()


def test_public_version_drops_the_git_suffix(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.19.2+2ca2477")
    assert cpu_compat.megatron_core_version() == "0.19.2"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        apply_cpu_compat_patches()


def test_proxy_forwards_everything_else():
    from megatron.core.tensor_parallel import mappings

    assert mappings.torch.float32 is torch.float32
    assert mappings.torch.Tensor is torch.Tensor
    assert mappings.torch.cuda.is_available() is False  # real torch.cuda answer
    assert mappings.torch.zeros(2, device="cuda").device == CPU
    assert mappings.torch.zeros(2, device=torch.device("cuda", 0)).device == CPU
    assert mappings.torch.ones(2, device="meta").device.type == "meta"  # non-CUDA untouched


def test_rotary_embedding_inv_freq_stays_on_cpu():
    """Patch 1: RotaryEmbedding.get_emb / MultimodalRotaryEmbedding.__init__ use current_device."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import (
        MultimodalRotaryEmbedding,
        RotaryEmbedding,
    )

    dim, seq = 8, 5
    inv = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    rope = RotaryEmbedding(kv_channels=dim, rotary_percent=1.0, use_cpu_initialization=False)
    emb = rope(seq)
    freqs = torch.arange(seq, dtype=torch.float64)[:, None] * inv[None]
    expected = torch.cat([freqs, freqs], dim=-1)
    assert emb.device == CPU
    torch.testing.assert_close(emb.reshape(seq, dim).double(), expected, atol=1e-6, rtol=0)

    mrope = MultimodalRotaryEmbedding(kv_channels=dim, rotary_percent=1.0)
    pos = torch.stack([torch.arange(seq), torch.arange(seq) * 2, torch.arange(seq) * 3])[:, None]
    out = mrope(pos, [1, 1, 2])
    assert out.device == CPU and out.shape == (seq, 1, 1, dim)
    # Channel pair j uses the temporal/height/width position according to the section it is in.
    axis = torch.tensor([0, 1, 2, 2] * 2)
    scale = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)[axis]
    expected = torch.arange(seq, dtype=torch.float64)[:, None] * scale[None] * inv.repeat(2)[None]
    torch.testing.assert_close(out[:, 0, 0].double(), expected, atol=1e-6, rtol=0)


def test_mappings_gather_allocates_on_cpu(monkeypatch):
    """Patch 2: the all-gather helpers allocate their output on current_device()."""
    from megatron.core.tensor_parallel import mappings

    class TwoRankGroup:
        def size(self):
            return 2

    def fake_all_gather(output, input_, group=None):
        output.copy_(torch.cat([input_, input_ + 100.0]))

    monkeypatch.setattr(mappings, "dist_all_gather_func", fake_all_gather)
    x = torch.arange(6, dtype=torch.float32).view(3, 2)
    out = mappings._gather_along_last_dim(x, TwoRankGroup())
    assert out.device == CPU
    torch.testing.assert_close(out, torch.cat([x, x + 100.0], dim=-1))
    out = mappings._gather_along_first_dim(x, TwoRankGroup())
    torch.testing.assert_close(out, torch.cat([x, x + 100.0], dim=0))


def test_rng_tracker_forks_cpu_generator(one_rank_world):
    """Patch 3: the model-parallel RNG tracker adds/forks CPU generator states."""
    from megatron.core.tensor_parallel import get_cuda_rng_tracker, model_parallel_cuda_manual_seed

    model_parallel_cuda_manual_seed(123, force_reset_rng=True)
    tracker = get_cuda_rng_tracker()
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    with tracker.fork():
        a = torch.rand(4)
    with tracker.fork():
        b = torch.rand(4)
    after = torch.rand(3)
    # The default stream is untouched by the forks.
    torch.testing.assert_close(after, before)
    # megatron seeds the tensor-parallel stream with seed + 2718 + tp_rank (tp_rank = 0 here).
    gen = torch.Generator().manual_seed(123 + 2718)
    torch.testing.assert_close(a, torch.rand(4, generator=gen))
    torch.testing.assert_close(b, torch.rand(4, generator=gen))


def test_default_causal_masks_on_cpu():
    """Patch 4: transformer/utils builds its default masks with device='cuda'."""
    from megatron.core.transformer import utils as tutils

    mask = tutils.get_default_causal_mask(4)
    assert mask.device == CPU
    assert torch.equal(mask, torch.ones(4, 4, dtype=torch.bool).triu(1))
    swa = tutils.get_sliding_window_causal_mask(4, 4, (1, 0))
    assert swa.device == CPU


def test_schedule_without_pipelining_runs_on_cpu(one_rank_world):
    """Patch 5: schedules count tokens in torch.zeros(..., device='cuda')."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.transformer_config import TransformerConfig

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor([2.0, -1.0]))
            self.config = TransformerConfig(
                num_layers=1, hidden_size=4, num_attention_heads=1, use_cpu_initialization=True
            )
            self.model_type = None

        def set_input_tensor(self, t):
            pass

    model = Tiny()
    data = [torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.5])]

    def step(it, m):
        x = next(it)
        out = (m.w * x).sum()
        return out, lambda o: (o, torch.tensor(1, dtype=torch.int), {"out": o.detach().clone()})

    results = get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iter(data),
        model=[model],
        num_microbatches=2,
        seq_length=1,
        micro_batch_size=1,
        forward_only=False,
    )
    assert [r["out"].item() for r in results] == [-1.0, 0.5]
    # Loss per micro-batch / num_tokens (1) / num_microbatches (2): grad = sum(x) / 2.
    torch.testing.assert_close(model.w.grad, torch.tensor([0.75, 1.75]))


def test_p2p_synchronize_and_device_on_cpu():
    """Patch 6: p2p_communication calls torch.cuda.synchronize() and allocates on current_device()."""
    from megatron.core.pipeline_parallel import p2p_communication as p2p

    assert p2p.torch.cuda.synchronize() is None
    shape = p2p.torch.empty((3,), device=p2p.torch.cuda.current_device(), dtype=torch.int64)
    assert shape.device == CPU


def test_global_memory_buffer_on_cpu():
    """Patch 7: GlobalMemoryBuffer.get_tensor (local attention's matmul buffer) uses current_device."""
    from megatron.core.utils import GlobalMemoryBuffer

    buf = GlobalMemoryBuffer()
    t = buf.get_tensor((2, 3), torch.float32, "mpu")
    assert t.device == CPU and t.shape == (2, 3)
    assert buf.get_tensor((3, 2), torch.float32, "mpu").data_ptr() == t.data_ptr()  # reused


def test_tied_embedding_setup_without_cuda(one_rank_world):
    """Patch 8: LanguageModule.setup_embeddings_and_output_layer calls weight.data.cuda()."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    # pipeline_model_parallel_size=2 in the config (first stage only, pre_process without
    # post_process) takes the tied-embedding all-reduce branch in this 1-rank world.
    config = TransformerConfig(
        num_layers=2,
        hidden_size=8,
        num_attention_heads=2,
        use_cpu_initialization=True,
        pipeline_model_parallel_size=2,
        pipeline_dtype=torch.float32,
    )
    model = GPTModel(
        config,
        get_gpt_layer_local_spec(),
        vocab_size=16,
        max_sequence_length=8,
        pre_process=True,
        post_process=False,
        share_embeddings_and_output_weights=True,
    )
    weight = model.embedding.word_embeddings.weight
    assert weight.device == CPU
    assert getattr(weight, "shared_embedding", False)
    assert torch.Tensor.cuda is not None and "lambda" not in repr(torch.Tensor.cuda)  # restored


def test_dist_checkpointing_save_and_load_on_cpu(one_rank_world, tmp_path):
    # patch 9: the writer's torch.cuda.synchronize() and CUDA bookkeeping tensors
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 4, generator=gen)
    bias = torch.randn(6, generator=gen)
    state = {
        "w": ShardedTensor.from_rank_offsets("layer.w", weight, replica_id=0),
        "b": ShardedTensor.from_rank_offsets("layer.b", bias, replica_id=0),
    }
    dist_checkpointing.save(state, str(tmp_path))
    template = {
        "w": ShardedTensor.from_rank_offsets("layer.w", torch.empty(6, 4), replica_id=0),
        "b": ShardedTensor.from_rank_offsets("layer.b", torch.empty(6), replica_id=0),
    }
    loaded = dist_checkpointing.load(template, str(tmp_path))
    assert torch.equal(loaded["w"], weight) and torch.equal(loaded["b"], bias)


def test_megatron_ddp_and_optimizer_step_match_torch_adamw():
    """Patches 10-11: megatron's DDP buffers and optimizer (with gradient clipping) run on CPU and
    take the same step as torch.optim.AdamW + clip_grad_norm_ on a copy of the model."""

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_vrft.data import build_tiny_tokenizer
    from megatron_vrft.distributed.parallel_state import ParallelLayout, single_rank_world
    from megatron_vrft.models.qwen2_vl.build import build_policy, preset_source
    from megatron_vrft.models.qwen2_vl.inputs import build_padded_inputs

    source = preset_source("qwen2_vl", "tiny", build_tiny_tokenizer(), seed=0)
    ids = torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(0))
    with single_rank_world() as groups:
        (policy,) = build_policy(source, ParallelLayout(), groups)
        (reference,) = build_policy(source, ParallelLayout(), groups)
        inputs = build_padded_inputs(source.arch, ids, torch.ones_like(ids)).forward_kwargs()
        ddp = DistributedDataParallel(policy.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), policy)
        opt = get_megatron_optimizer(
            OptimizerConfig(
                optimizer="adam",
                lr=1e-2,
                adam_beta1=0.9,
                adam_beta2=0.99,
                weight_decay=0.0,
                clip_grad=0.05,
                params_dtype=torch.float32,
            ),
            [ddp],
        )
        ddp.zero_grad_buffer()
        ddp(**inputs).logsumexp(-1).mean().backward()
        ddp.finish_grad_sync()
        ok, norm, _ = opt.step()
        torch_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.0)
        reference(**inputs).logsumexp(-1).mean().backward()
        want_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.05)
        torch_opt.step()
    assert ok and abs(norm - float(want_norm)) < 1e-5 * float(want_norm)
    assert float(want_norm) > 0.05  # clipping was active
    for (name, a), (_, b) in zip(policy.named_parameters(), reference.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), name
