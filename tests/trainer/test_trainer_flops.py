"""The trainer's model-FLOPs count equals torch's FlopCounterMode on the transformers Qwen2-VL
language model (an independent count of the same matmuls), for random shapes and both GQA and MHA."""

from __future__ import annotations

import pytest
import torch

from megatron_vrft.trainer.flops import lm_forward_flops, peak_flops


@pytest.mark.parametrize("seed,kv_heads", [(0, 2), (1, 4)])
def test_lm_forward_flops_equal_flop_counter(seed, kv_heads):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from megatron_vrft.models.qwen2_vl.state_dict_adapter import as_arch

    g = torch.Generator().manual_seed(seed)
    hidden, heads = 64 * int(torch.randint(1, 3, (1,), generator=g)), 4
    half = hidden // heads // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2VLConfig(
        text_config=dict(
            hidden_size=hidden,
            intermediate_size=int(torch.randint(100, 300, (1,), generator=g)),
            num_hidden_layers=int(torch.randint(1, 4, (1,), generator=g)),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            vocab_size=512,
            rope_scaling={"type": "mrope", "mrope_section": mrope},
            tie_word_embeddings=False,
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2),
    )
    # eager attention: explicit matmuls, which FlopCounterMode counts on any device (its SDPA
    # formulas cover the CUDA kernels, not the CPU flash kernel)
    config._attn_implementation = "eager"
    model = Qwen2VLForConditionalGeneration(config).eval()
    arch = as_arch(model.config)
    batch, seq = int(torch.randint(1, 4, (1,), generator=g)), int(torch.randint(5, 40, (1,), generator=g))
    ids = torch.randint(0, 400, (batch, seq), generator=g)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False)
    assert lm_forward_flops(arch, [seq] * batch) == counter.get_total_flops()


def test_peak_flops_table():
    assert peak_flops("NVIDIA H200", "bf16") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert peak_flops("cpu", "fp32") is None
