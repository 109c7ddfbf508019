// Per-token log-prob CUDA kernels (forward stats and fused backward); math in logprob.h, shared
// with the host test. One block per row (token): each thread folds a strided slice of the row into
// an online log-sum-exp state, then warps and the block merge states with lse_merge. Reads are
// 16-byte vectors when the row is aligned. Memory bound: forward reads the row once, backward
// reads it once and writes the gradient once (into the logits buffer for the in-place backward).

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "logprob.cuh"
#include "logprob.h"

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15) == 0;
}

__device__ __forceinline__ mvrft::LseState warp_merge(mvrft::LseState st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    mvrft::LseState other;
    other.m = __shfl_xor_sync(0xffffffffu, st.m, offset);
    other.s = __shfl_xor_sync(0xffffffffu, st.s, offset);
    other.t = __shfl_xor_sync(0xffffffffu, st.t, offset);
    st = mvrft::lse_merge(st, other);
  }
  return st;
}

// The merged state of the whole block, valid in thread 0.
__device__ __forceinline__ mvrft::LseState block_merge(mvrft::LseState st) {
  __shared__ mvrft::LseState warp_states[kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  st = warp_merge(st);
  if (lane == 0) warp_states[warp] = st;
  __syncthreads();
  if (warp == 0) {
    st = lane < kWarps ? warp_states[lane] : mvrft::lse_empty();
    st = warp_merge(st);
  }
  return st;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    logprob_stats_kernel(const T* __restrict__ logits, int64_t row_stride,
                         const int64_t* __restrict__ targets, float* __restrict__ stats,
                         int64_t V, int64_t vocab_start, float inv_temperature, bool with_entropy) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  mvrft::LseState st = mvrft::lse_empty();
  int64_t tail_start = 0;
  if (aligned16(x)) {
    const int64_t num_vec = V / kVec;
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    for (int64_t i = threadIdx.x; i < num_vec; i += kThreads) {
      const uint4 raw = __ldg(xv + i);
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < kVec; ++k) st = mvrft::lse_push(st, to_float(vals[k]) * inv_temperature);
    }
    tail_start = num_vec * kVec;
  }
  for (int64_t j = tail_start + threadIdx.x; j < V; j += kThreads) {
    st = mvrft::lse_push(st, to_float(x[j]) * inv_temperature);
  }
  st = block_merge(st);
  if (threadIdx.x == 0) {
    const int64_t local = targets[row] - vocab_start;
    const bool owned = local >= 0 && local < V;
    float* out = stats + row * 3;
    out[0] = mvrft::lse_value(st);
    out[1] = owned ? to_float(x[local]) * inv_temperature : 0.0f;
    out[2] = with_entropy ? mvrft::lse_entropy(st) : 0.0f;
  }
}

// No __restrict__ on logits/grad: they alias for the in-place backward (each element is read and
// written by the same thread, read first).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    logprob_backward_kernel(const T* logits, int64_t row_stride, T* grad, int64_t grad_row_stride,
                            const int64_t* __restrict__ targets, const float* __restrict__ lse,
                            const float* __restrict__ entropy,
                            const float* __restrict__ grad_logprob,
                            const float* __restrict__ grad_entropy, int64_t V, int64_t vocab_start,
                            float inv_temperature) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  T* g = grad + row * grad_row_stride;
  const float row_lse = lse[row];
  const float row_g_lp = grad_logprob[row];
  const bool has_entropy = entropy != nullptr && grad_entropy != nullptr;
  const float row_entropy = has_entropy ? entropy[row] : 0.0f;
  const float row_g_ent = has_entropy ? grad_entropy[row] : 0.0f;
  const int64_t local = targets[row] - vocab_start;  // matches no column when not owned
  int64_t tail_start = 0;
  if (aligned16(x) && aligned16(g)) {
    const int64_t num_vec = V / kVec;
    for (int64_t i = threadIdx.x; i < num_vec; i += kThreads) {
      const uint4 raw = reinterpret_cast<const uint4*>(x)[i];
      const T* vals = reinterpret_cast<const T*>(&raw);
      uint4 packed;
      T* outs = reinterpret_cast<T*>(&packed);
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const int64_t j = i * kVec + k;
        outs[k] = from_float<T>(mvrft::logprob_grad(to_float(vals[k]) * inv_temperature,
                                                    j == local, row_lse, row_entropy, row_g_lp,
                                                    row_g_ent, inv_temperature));
      }
      reinterpret_cast<uint4*>(g)[i] = packed;
    }
    tail_start = num_vec * kVec;
  }
  for (int64_t j = tail_start + threadIdx.x; j < V; j += kThreads) {
    g[j] = from_float<T>(mvrft::logprob_grad(to_float(x[j]) * inv_temperature, j == local,
                                             row_lse, row_entropy, row_g_lp, row_g_ent,
                                             inv_temperature));
  }
}

template <typename T>
cudaError_t launch_stats(const void* logits, int64_t row_stride, const int64_t* targets,
                         float* stats, int64_t num_rows, int64_t V, int64_t vocab_start,
                         float inv_temperature, bool with_entropy, cudaStream_t stream) {
  logprob_stats_kernel<T><<<static_cast<unsigned>(num_rows), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), row_stride, targets, stats, V, vocab_start, inv_temperature,
      with_entropy);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_backward(const void* logits, int64_t row_stride, void* grad,
                            int64_t grad_row_stride, const int64_t* targets, const float* lse,
                            const float* entropy, const float* grad_logprob,
                            const float* grad_entropy, int64_t num_rows, int64_t V,
                            int64_t vocab_start, float inv_temperature, cudaStream_t stream) {
  logprob_backward_kernel<T><<<static_cast<unsigned>(num_rows), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), row_stride, static_cast<T*>(grad), grad_row_stride, targets,
      lse, entropy, grad_logprob, grad_entropy, V, vocab_start, inv_temperature);
  return cudaGetLastError();
}

// gridDim.x is limited to 2**31 - 1 rows per launch.
constexpr int64_t kMaxRows = 2147483647;

}  // namespace

extern "C" cudaError_t mvrft_logprob_stats(const void* logits, int dtype, int64_t row_stride,
                                           const int64_t* targets, float* stats, int64_t num_rows,
                                           int64_t V, int64_t vocab_start, float inv_temperature,
                                           bool with_entropy, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  if (num_rows > kMaxRows || V <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case kMvrftFloat32:
      return launch_stats<float>(logits, row_stride, targets, stats, num_rows, V, vocab_start,
                                 inv_temperature, with_entropy, stream);
    case kMvrftFloat16:
      return launch_stats<__half>(logits, row_stride, targets, stats, num_rows, V, vocab_start,
                                  inv_temperature, with_entropy, stream);
    case kMvrftBFloat16:
      return launch_stats<__nv_bfloat16>(logits, row_stride, targets, stats, num_rows, V,
                                         vocab_start, inv_temperature, with_entropy, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

extern "C" cudaError_t mvrft_logprob_backward(const void* logits, int dtype, int64_t row_stride,
                                              void* grad, int64_t grad_row_stride,
                                              const int64_t* targets, const float* lse,
                                              const float* entropy, const float* grad_logprob,
                                              const float* grad_entropy, int64_t num_rows,
                                              int64_t V, int64_t vocab_start,
                                              float inv_temperature, cudaStream_t stream) {
  if (num_rows == 0) return cudaSuccess;
  if (num_rows > kMaxRows || V <= 0) return cudaErrorInvalidValue;
  switch (dtype) {
    case kMvrftFloat32:
      return launch_backward<float>(logits, row_stride, grad, grad_row_stride, targets, lse,
                                    entropy, grad_logprob, grad_entropy, num_rows, V, vocab_start,
                                    inv_temperature, stream);
    case kMvrftFloat16:
      return launch_backward<__half>(logits, row_stride, grad, grad_row_stride, targets, lse,
                                     entropy, grad_logprob, grad_entropy, num_rows, V,
                                     vocab_start, inv_temperature, stream);
    case kMvrftBFloat16:
      return launch_backward<__nv_bfloat16>(logits, row_stride, grad, grad_row_stride, targets,
                                            lse, entropy, grad_logprob, grad_entropy, num_rows, V,
                                            vocab_start, inv_temperature, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

#ifdef MEGATRON_VRFT_TORCH_EXTENSION
// torch.ops.megatron_vrft.token_logprob_{stats,backward}; used by impl="cuda" of
// megatron_vrft/ops/logprob.py (same contract as the Triton and torch backends in
// megatron_vrft/ops/_logprob_stats.py).
#include <ATen/ATen.h>
// c10's stream header, not ATen/cuda/CUDAContext.h: it needs no cuSPARSE/cuBLAS headers.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kMvrftFloat32;
    case at::kHalf:
      return kMvrftFloat16;
    case at::kBFloat16:
      return kMvrftBFloat16;
    default:
      TORCH_CHECK(false, "logits must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return -1;
}

void check_rows(const at::Tensor& t, int64_t num_rows, at::ScalarType type, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.scalar_type() == type && t.is_contiguous(), name,
              " must be a contiguous CUDA tensor of ", type);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == num_rows, name, " must have shape (", num_rows, ",)");
}

void check_logits(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.size(1) > 0, name, " must be a (N, V>0) CUDA tensor");
  TORCH_CHECK(t.size(1) == 1 || t.stride(1) == 1, name, " must have unit stride along V");
}

at::Tensor token_logprob_stats_op(const at::Tensor& logits, const at::Tensor& targets,
                                  int64_t vocab_start, double inv_temperature, bool with_entropy) {
  check_logits(logits, "logits");
  const int64_t num_rows = logits.size(0), V = logits.size(1);
  check_rows(targets, num_rows, at::kLong, "targets");
  const c10::cuda::CUDAGuard guard(logits.device());
  auto stats = at::empty({num_rows, 3}, logits.options().dtype(at::kFloat));
  const cudaError_t err = mvrft_logprob_stats(
      logits.data_ptr(), dtype_code(logits), logits.stride(0), targets.data_ptr<int64_t>(),
      stats.data_ptr<float>(), num_rows, V, vocab_start, static_cast<float>(inv_temperature),
      with_entropy, c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "token_logprob_stats launch failed: ", cudaGetErrorString(err));
  return stats;
}

void token_logprob_backward_op(const at::Tensor& logits, const at::Tensor& targets,
                               const at::Tensor& lse, const c10::optional<at::Tensor>& entropy,
                               const at::Tensor& grad_logprob,
                               const c10::optional<at::Tensor>& grad_entropy, int64_t vocab_start,
                               double inv_temperature, const at::Tensor& grad_logits) {
  check_logits(logits, "logits");
  check_logits(grad_logits, "grad_logits");
  const int64_t num_rows = logits.size(0), V = logits.size(1);
  TORCH_CHECK(grad_logits.sizes() == logits.sizes() &&
                  grad_logits.scalar_type() == logits.scalar_type(),
              "grad_logits must match logits in shape and dtype");
  check_rows(targets, num_rows, at::kLong, "targets");
  check_rows(lse, num_rows, at::kFloat, "lse");
  check_rows(grad_logprob, num_rows, at::kFloat, "grad_logprob");
  TORCH_CHECK(entropy.has_value() == grad_entropy.has_value(),
              "entropy and grad_entropy must be given together");
  const float* entropy_ptr = nullptr;
  const float* grad_entropy_ptr = nullptr;
  if (entropy.has_value()) {
    check_rows(*entropy, num_rows, at::kFloat, "entropy");
    check_rows(*grad_entropy, num_rows, at::kFloat, "grad_entropy");
    entropy_ptr = entropy->data_ptr<float>();
    grad_entropy_ptr = grad_entropy->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(logits.device());
  const cudaError_t err = mvrft_logprob_backward(
      logits.data_ptr(), dtype_code(logits), logits.stride(0), grad_logits.data_ptr(),
      grad_logits.stride(0), targets.data_ptr<int64_t>(), lse.data_ptr<float>(), entropy_ptr,
      grad_logprob.data_ptr<float>(), grad_entropy_ptr, num_rows, V, vocab_start,
      static_cast<float>(inv_temperature), c10::cuda::getCurrentCUDAStream());
  TORCH_CHECK(err == cudaSuccess, "token_logprob_backward launch failed: ",
              cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(megatron_vrft, m) {
  m.def(
      "token_logprob_stats(Tensor logits, Tensor targets, int vocab_start, float inv_temperature, "
      "bool with_entropy) -> Tensor");
  m.def(
      "token_logprob_backward(Tensor logits, Tensor targets, Tensor lse, Tensor? entropy, "
      "Tensor grad_logprob, Tensor? grad_entropy, int vocab_start, float inv_temperature, "
      "Tensor(a!) grad_logits) -> ()");
}

TORCH_LIBRARY_IMPL(megatron_vrft, CUDA, m) {
  m.impl("token_logprob_stats", &token_logprob_stats_op);
  m.impl("token_logprob_backward", &token_logprob_backward_op);
}
#endif  // MEGATRON_VRFT_TORCH_EXTENSION
