// C launchers for the per-token log-prob kernels. Usable without torch (ctypes, C++).
// logits (num_rows, V) with unit stride along V and any row stride; fp32, fp16 or bf16.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

extern "C" {

enum MvrftLogitsDtype { kMvrftFloat32 = 0, kMvrftFloat16 = 1, kMvrftBFloat16 = 2 };

// stats (num_rows, 3) fp32: [lse of z over this shard, z[target - vocab_start] or 0 when the
// target is not in [vocab_start, vocab_start + V), entropy of the shard's own softmax (0 unless
// with_entropy)], with z = logits * inv_temperature.
cudaError_t mvrft_logprob_stats(const void* logits, int dtype, int64_t row_stride,
                                const int64_t* targets, float* stats, int64_t num_rows, int64_t V,
                                int64_t vocab_start, float inv_temperature, bool with_entropy,
                                cudaStream_t stream);

// grad (num_rows, V) in the logits' dtype, may alias logits (in-place backward). lse, entropy,
// grad_logprob, grad_entropy are (num_rows,) fp32; entropy and grad_entropy may be nullptr.
cudaError_t mvrft_logprob_backward(const void* logits, int dtype, int64_t row_stride, void* grad,
                                   int64_t grad_row_stride, const int64_t* targets,
                                   const float* lse, const float* entropy,
                                   const float* grad_logprob, const float* grad_entropy,
                                   int64_t num_rows, int64_t V, int64_t vocab_start,
                                   float inv_temperature, cudaStream_t stream);
}
