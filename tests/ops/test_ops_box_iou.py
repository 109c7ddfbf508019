"""Box IoU/GIoU: torch reference and Triton kernels (interpreter on CPU) vs independent oracles.

Oracles: a float64 per-pair formula written here from the definitions, and pycocotools
``mask.iou`` (bbox mode: ``[x, y, w, h]``, no +1 pixel convention, ``iscrowd`` zeros).
"""

import math

import numpy as np
import pytest
import torch
from pycocotools import mask as coco_mask

from megatron_vrft.ops import box_iou as box_iou_mod
from megatron_vrft.ops.box_iou import (
    available_box_iou_impls,
    box_iou,
    box_iou_elementwise,
    box_iou_elementwise_reference,
    box_iou_pairwise_reference,
)
from megatron_vrft.ops.box_iou_triton import box_iou_elementwise_triton, box_iou_pairwise_triton


def make_boxes(gen: torch.Generator, shape: tuple[int, ...], kinds: bool = True) -> torch.Tensor:
    """Random ``(*shape, 4)`` boxes; with ``kinds``, some are degenerate (zero width/height) or
    inverted (x2 < x1), and some are far away (disjoint from everything else)."""
    xy = torch.rand(*shape, 2, generator=gen, dtype=torch.float64) * 100
    wh = torch.rand(*shape, 2, generator=gen, dtype=torch.float64) * 60 + 0.5
    if kinds:
        pick = torch.randint(0, 10, shape, generator=gen)
        wh[..., 0] = torch.where(pick == 0, 0.0, wh[..., 0])  # zero width
        wh[..., 1] = torch.where(pick == 1, 0.0, wh[..., 1])  # zero height
        wh[..., 0] = torch.where(pick == 2, -wh[..., 0], wh[..., 0])  # inverted
        xy = torch.where((pick == 3).unsqueeze(-1), xy + 1000.0, xy)  # disjoint
    return torch.cat([xy, xy + wh], dim=-1)


def make_pair_sets(seed: int, b: int, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairwise inputs that also contain identical and nested pairs."""
    gen = torch.Generator().manual_seed(seed)
    b1 = make_boxes(gen, (b, n))
    b2 = make_boxes(gen, (b, m))
    k = min(n, m) // 3
    b2[:, :k] = b1[:, :k]  # identical
    centre = (b1[:, k : 2 * k, :2] + b1[:, k : 2 * k, 2:]) / 2
    half = (b1[:, k : 2 * k, 2:] - b1[:, k : 2 * k, :2]) / 4
    b2[:, k : 2 * k] = torch.cat([centre - half, centre + half], dim=-1)  # nested
    return b1, b2


def iou_giou_float64(a, b) -> tuple[float, float]:
    """Per-pair IoU and GIoU from the definitions, in Python floats (float64)."""
    ax1, ay1, ax2, ay2 = (float(v) for v in a)
    bx1, by1, bx2, by2 = (float(v) for v in b)
    area_a = max(ax2 - ax1, 0.0) * max(ay2 - ay1, 0.0)
    area_b = max(bx2 - bx1, 0.0) * max(by2 - by1, 0.0)
    inter = max(min(ax2, bx2) - max(ax1, bx1), 0.0) * max(min(ay2, by2) - max(ay1, by1), 0.0)
    union = area_a + area_b - inter
    iou = inter / union if union > 0 else 0.0
    hull = max(max(ax2, bx2) - min(ax1, bx1), 0.0) * max(max(ay2, by2) - min(ay1, by1), 0.0)
    giou = iou - (hull - union) / hull if hull > 0 else iou
    return iou, giou


def pairwise_float64(b1, b2, mode, valid1=None, valid2=None) -> torch.Tensor:
    bsz, n, m = b1.shape[0], b1.shape[1], b2.shape[1]
    out = torch.zeros(bsz, n, m, dtype=torch.float64)
    for i in range(bsz):
        for j in range(n):
            for k in range(m):
                if (valid1 is not None and not valid1[i, j]) or (valid2 is not None and not valid2[i, k]):
                    continue
                out[i, j, k] = iou_giou_float64(b1[i, j], b2[i, k])[mode == "giou"]
    return out


def coco_iou(b1: torch.Tensor, b2: torch.Tensor) -> np.ndarray:
    """pycocotools bbox IoU: (N, 4) x (M, 4) xyxy -> (N, M)."""

    def xywh(b):
        b = b.double().numpy()
        return np.ascontiguousarray(np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1))

    return coco_mask.iou(xywh(b1), xywh(b2), np.zeros(len(b2), dtype=np.uint8))


@pytest.mark.parametrize("mode", ["iou", "giou"])
def test_reference_matches_float64_formula(mode):
    b1, b2 = make_pair_sets(0, 3, 7, 13)
    gen = torch.Generator().manual_seed(1)
    valid1 = torch.rand(3, 7, generator=gen) > 0.2
    valid2 = torch.rand(3, 13, generator=gen) > 0.2
    want = pairwise_float64(b1, b2, mode, valid1, valid2)
    got64 = box_iou_pairwise_reference(b1, b2, mode, valid1, valid2)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-12)
    got32 = box_iou_pairwise_reference(b1.float(), b2.float(), mode, valid1, valid2)
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-6)
    assert want.abs().sum() > 1.0 and (want == 1.0).any()  # identical pairs present
    if mode == "giou":
        assert (want < 0).any()


@pytest.mark.parametrize("mode", ["iou", "giou"])
@pytest.mark.parametrize("use_masks", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_pairwise_matches_reference(mode, use_masks, dtype):
    b1, b2 = make_pair_sets(2, 3, 7, 13)
    gen = torch.Generator().manual_seed(3)
    valid1 = torch.rand(3, 7, generator=gen) > 0.3 if use_masks else None
    valid2 = torch.rand(3, 13, generator=gen) > 0.3 if use_masks else None
    x1, x2 = b1.to(dtype), b2.to(dtype)
    got = box_iou_pairwise_triton(x1, x2, mode, valid1, valid2)
    assert got.dtype == torch.float32 and got.shape == (3, 7, 13)
    # Same upcast inputs for the oracles: the kernel computes in fp32 from the rounded boxes.
    want = box_iou_pairwise_reference(x1.float(), x2.float(), mode, valid1, valid2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    want64 = pairwise_float64(x1.double(), x2.double(), mode, valid1, valid2)
    torch.testing.assert_close(got.double(), want64, rtol=1e-5, atol=2e-6)
    if use_masks:
        assert (got[~valid1] == 0).all() and (got.transpose(1, 2)[~valid2] == 0).all()


@pytest.mark.parametrize("mode", ["iou", "giou"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_elementwise_matches_reference(mode, dtype):
    gen = torch.Generator().manual_seed(4)
    b1 = make_boxes(gen, (5, 37)).to(dtype)
    b2 = make_boxes(gen, (5, 37)).to(dtype)
    b2[0] = b1[0]
    got = box_iou_elementwise_triton(b1, b2, mode)
    assert got.dtype == torch.float32 and got.shape == (5, 37)
    want = box_iou_elementwise_reference(b1.float(), b2.float(), mode)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    want64 = torch.tensor(
        [iou_giou_float64(a, b)[mode == "giou"] for a, b in zip(b1.double().view(-1, 4), b2.double().view(-1, 4))],
        dtype=torch.float64,
    ).view(5, 37)
    torch.testing.assert_close(got.double(), want64, rtol=1e-5, atol=2e-6)
    assert (got[0] == 1.0).sum() > 20  # identical, non-degenerate pairs


def test_triton_broadcasting_and_empty():
    gen = torch.Generator().manual_seed(5)
    b1 = make_boxes(gen, (2, 1, 5)).float()  # batch dims broadcast against (1, 3)
    b2 = make_boxes(gen, (1, 3, 9)).float()
    valid2 = torch.rand(9, generator=gen) > 0.5  # broadcast over the batch
    got = box_iou_pairwise_triton(b1, b2, "giou", None, valid2)
    want = box_iou_pairwise_reference(b1, b2, "giou", None, valid2)
    assert got.shape == want.shape == (2, 3, 5, 9)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    one = make_boxes(gen, ()).float()  # a single (4,) box against (9, 4)
    torch.testing.assert_close(
        box_iou_elementwise_triton(one, b2[0, 0]),
        box_iou_elementwise_reference(one, b2[0, 0]),
        rtol=1e-5,
        atol=1e-6,
    )
    assert box_iou_pairwise_triton(b1[:, :, :0], b2).shape == (2, 3, 0, 9)
    assert box_iou_elementwise_triton(b1[:, :, :0], b1[:, :, :0]).shape == (2, 1, 0)
    with pytest.raises(ValueError, match="boxes1"):
        box_iou_pairwise_triton(torch.zeros(3, 5), b2)


def test_auto_dispatch_uses_triton_and_keeps_gradients(monkeypatch):
    assert "triton" in available_box_iou_impls()
    calls = []
    pairwise_fn, elementwise_fn, supports = box_iou_mod._IMPLS["triton"]
    monkeypatch.setitem(
        box_iou_mod._IMPLS,
        "triton",
        (
            lambda *a: calls.append("pair") or pairwise_fn(*a),
            lambda *a: calls.append("elem") or elementwise_fn(*a),
            supports,
        ),
    )
    b1, b2 = make_pair_sets(6, 2, 4, 5)
    got = box_iou(b1.float(), b2.float(), "giou")
    torch.testing.assert_close(got, box_iou_pairwise_reference(b1.float(), b2.float(), "giou"), rtol=1e-5, atol=1e-6)
    box_iou_elementwise(b1.float(), b1.float())
    assert calls == ["pair", "elem"]
    # An input that needs grad goes to the differentiable reference.
    leaf = b1.float().requires_grad_()
    out = box_iou(leaf, b2.float(), "giou")
    out.sum().backward()
    assert calls == ["pair", "elem"] and leaf.grad is not None and leaf.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="unknown box IoU impl"):
        box_iou(b1, b2, impl="nope")
    with pytest.raises(ValueError, match="already registered"):
        box_iou_mod.register_box_iou_impl("triton", pairwise_fn, elementwise_fn, supports)


def test_matches_pycocotools_bbox_iou():
    gen = torch.Generator().manual_seed(7)
    # pycocotools takes [x, y, w, h]; a negative w or h is not a box there, so no inverted boxes.
    b1 = make_boxes(gen, (60,), kinds=False)
    b2 = make_boxes(gen, (45,), kinds=False)
    b2[:10] = b1[:10]
    b1[10:15, 2] = b1[10:15, 0]  # zero width
    b2[40:, :2] += 1000.0
    b2[40:, 2:] += 1000.0
    want = torch.from_numpy(coco_iou(b1, b2))
    got64 = box_iou_pairwise_reference(b1, b2)
    torch.testing.assert_close(got64, want, rtol=1e-12, atol=1e-12)
    got = box_iou_pairwise_triton(b1.float(), b2.float())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert math.isclose(float(want[0, 0]), 1.0) and float(want[:, 40:].abs().max()) == 0.0


def test_matches_pycocotools_on_1000_by_1000_boxes():
    """The docs/benchmarks.md comparison set: 1000 x 1000 random boxes, reference == pycocotools."""
    gen = torch.Generator().manual_seed(8)
    b1 = make_boxes(gen, (1000,), kinds=False) * 5
    b2 = make_boxes(gen, (1000,), kinds=False) * 5
    want = torch.from_numpy(coco_iou(b1, b2))
    assert (want > 0).float().mean() > 0.05  # enough overlapping pairs to mean something
    torch.testing.assert_close(box_iou_pairwise_reference(b1, b2), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(box_iou_pairwise_reference(b1.float(), b2.float()).double(), want, rtol=1e-5, atol=1e-6)


def test_cuda_extension_registration_is_consistent():
    from megatron_vrft.ops import cuda_ext

    assert ("cuda" in available_box_iou_impls()) == cuda_ext.is_available()
    assert cuda_ext.is_available() <= cuda_ext.is_built()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("impl", ["triton", "cuda"])
@pytest.mark.parametrize("mode", ["iou", "giou"])
def test_gpu_kernels_match_reference(impl, mode):
    if impl not in available_box_iou_impls():
        pytest.fail(f"{impl} box IoU is not available on this GPU host")
    b1, b2 = make_pair_sets(9, 5, 300, 257)
    gen = torch.Generator().manual_seed(10)
    valid1, valid2 = torch.rand(5, 300, generator=gen) > 0.2, torch.rand(5, 257, generator=gen) > 0.2
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x1, x2 = b1.to(dtype).cuda(), b2.to(dtype).cuda()
        got = box_iou(x1, x2, mode, valid1.cuda(), valid2.cuda(), impl=impl).cpu()
        want = box_iou_pairwise_reference(x1.float().cpu(), x2.float().cpu(), mode, valid1, valid2)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        got_e = box_iou_elementwise(x1[:, :257], x2, mode, impl=impl).cpu()
        want_e = box_iou_elementwise_reference(x1[:, :257].float().cpu(), x2.float().cpu(), mode)
        torch.testing.assert_close(got_e, want_e, rtol=1e-5, atol=1e-6)
