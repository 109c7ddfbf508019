// Batched box IoU / GIoU CUDA kernels; the math lives in box_iou.h (shared with host tests).
// Memory bound on the (batch, n, m) fp32 output: one thread per output element, threads of a block
// run along m so stores coalesce, and the row's box1 is a broadcast load within a warp.

#include "box_iou.cuh"
#include "box_iou.h"

namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridYZ = 65535;

__global__ void box_iou_pairwise_kernel(const float4* __restrict__ boxes1,
                                        const float4* __restrict__ boxes2,
                                        const bool* __restrict__ valid1,
                                        const bool* __restrict__ valid2, float* __restrict__ out,
                                        int64_t batch, int64_t n, int64_t m, bool giou) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j >= m) return;
  // Grid-stride over rows and batches: gridDim.y/z are capped at 65535.
  for (int64_t b = blockIdx.z; b < batch; b += gridDim.z) {
    const float4 bb = boxes2[b * m + j];
    const float bv[4] = {bb.x, bb.y, bb.z, bb.w};
    const bool keep2 = valid2 == nullptr || valid2[b * m + j];
    for (int64_t i = blockIdx.y; i < n; i += gridDim.y) {
      const float4 ab = boxes1[b * n + i];
      const float av[4] = {ab.x, ab.y, ab.z, ab.w};
      const bool keep = keep2 && (valid1 == nullptr || valid1[b * n + i]);
      out[(b * n + i) * m + j] = keep ? mvrft::box_iou_giou(av, bv, giou) : 0.0f;
    }
  }
}

__global__ void box_iou_elementwise_kernel(const float4* __restrict__ boxes1,
                                           const float4* __restrict__ boxes2,
                                           float* __restrict__ out, int64_t num_pairs, bool giou) {
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < num_pairs;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 ab = boxes1[p];
    const float4 bb = boxes2[p];
    const float av[4] = {ab.x, ab.y, ab.z, ab.w};
    const float bv[4] = {bb.x, bb.y, bb.z, bb.w};
    out[p] = mvrft::box_iou_giou(av, bv, giou);
  }
}

int64_t cap(int64_t v, int64_t hi) { return v < 1 ? 1 : (v > hi ? hi : v); }

}  // namespace

extern "C" cudaError_t mvrft_box_iou_pairwise(const float* boxes1, const float* boxes2,
                                              const bool* valid1, const bool* valid2, float* out,
                                              int64_t batch, int64_t n, int64_t m, bool giou,
                                              cudaStream_t stream) {
  if (batch == 0 || n == 0 || m == 0) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>((m + kThreads - 1) / kThreads),
                  static_cast<unsigned>(cap(n, kMaxGridYZ)),
                  static_cast<unsigned>(cap(batch, kMaxGridYZ)));
  box_iou_pairwise_kernel<<<grid, kThreads, 0, stream>>>(
      reinterpret_cast<const float4*>(boxes1), reinterpret_cast<const float4*>(boxes2), valid1,
      valid2, out, batch, n, m, giou);
  return cudaGetLastError();
}

extern "C" cudaError_t mvrft_box_iou_elementwise(const float* boxes1, const float* boxes2,
                                                 float* out, int64_t num_pairs, bool giou,
                                                 cudaStream_t stream) {
  if (num_pairs == 0) return cudaSuccess;
  const int64_t blocks = cap((num_pairs + kThreads - 1) / kThreads, int64_t(1) << 20);
  box_iou_elementwise_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      reinterpret_cast<const float4*>(boxes1), reinterpret_cast<const float4*>(boxes2), out,
      num_pairs, giou);
  return cudaGetLastError();
}

#ifdef MEGATRON_VRFT_TORCH_EXTENSION
// torch.ops.megatron_vrft.box_iou_{pairwise,elementwise}; loaded by megatron_vrft/ops/cuda_ext.py.
// Each kernels/*.cu registers its own ops with TORCH_LIBRARY_FRAGMENT; the Python module init is
// in kernels/common/torch_module.cpp.
#include <cstdint>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace {

void check_boxes(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CUDA tensor");
  TORCH_CHECK(t.dim() == dim && t.size(-1) == 4, name, " must have ", dim, " dims, last 4");
  // The kernels read one box as a float4.
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

const bool* valid_ptr(const c10::optional<at::Tensor>& v, int64_t batch, int64_t len,
                      const char* name) {
  if (!v.has_value()) return nullptr;
  TORCH_CHECK(v->is_cuda() && v->scalar_type() == at::kBool && v->is_contiguous(), name,
              " must be a contiguous bool CUDA tensor");
  TORCH_CHECK(v->dim() == 2 && v->size(0) == batch && v->size(1) == len, name, " has shape ",
              v->sizes(), ", expected (", batch, ", ", len, ")");
  return v->data_ptr<bool>();
}

at::Tensor box_iou_pairwise_op(const at::Tensor& boxes1, const at::Tensor& boxes2,
                               const c10::optional<at::Tensor>& valid1,
                               const c10::optional<at::Tensor>& valid2, bool giou) {
  check_boxes(boxes1, 3, "boxes1");
  check_boxes(boxes2, 3, "boxes2");
  const int64_t batch = boxes1.size(0), n = boxes1.size(1), m = boxes2.size(1);
  TORCH_CHECK(boxes2.size(0) == batch, "boxes1 and boxes2 batch sizes differ");
  const c10::cuda::CUDAGuard guard(boxes1.device());
  auto out = at::empty({batch, n, m}, boxes1.options());
  const cudaError_t err = mvrft_box_iou_pairwise(
      boxes1.data_ptr<float>(), boxes2.data_ptr<float>(), valid_ptr(valid1, batch, n, "valid1"),
      valid_ptr(valid2, batch, m, "valid2"), out.data_ptr<float>(), batch, n, m, giou,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "box_iou_pairwise launch failed: ", cudaGetErrorString(err));
  return out;
}

at::Tensor box_iou_elementwise_op(const at::Tensor& boxes1, const at::Tensor& boxes2, bool giou) {
  check_boxes(boxes1, 2, "boxes1");
  check_boxes(boxes2, 2, "boxes2");
  TORCH_CHECK(boxes1.size(0) == boxes2.size(0), "boxes1 and boxes2 have different lengths");
  const c10::cuda::CUDAGuard guard(boxes1.device());
  auto out = at::empty({boxes1.size(0)}, boxes1.options());
  const cudaError_t err =
      mvrft_box_iou_elementwise(boxes1.data_ptr<float>(), boxes2.data_ptr<float>(),
                                out.data_ptr<float>(), boxes1.size(0), giou,
                                c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "box_iou_elementwise launch failed: ", cudaGetErrorString(err));
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(megatron_vrft, m) {
  m.def("box_iou_pairwise(Tensor boxes1, Tensor boxes2, Tensor? valid1, Tensor? valid2, bool giou) -> Tensor");
  m.def("box_iou_elementwise(Tensor boxes1, Tensor boxes2, bool giou) -> Tensor");
}

TORCH_LIBRARY_IMPL(megatron_vrft, CUDA, m) {
  m.impl("box_iou_pairwise", &box_iou_pairwise_op);
  m.impl("box_iou_elementwise", &box_iou_elementwise_op);
}
#endif  // MEGATRON_VRFT_TORCH_EXTENSION
