// C launchers for the box IoU kernels (fp32, contiguous). Usable without torch (ctypes, C++).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

extern "C" {

// boxes1 (batch, n, 4), boxes2 (batch, m, 4), valid1 (batch, n) / valid2 (batch, m) or nullptr,
// out (batch, n, m). Pairs with a padded box are 0.
cudaError_t mvrft_box_iou_pairwise(const float* boxes1, const float* boxes2, const bool* valid1,
                                   const bool* valid2, float* out, int64_t batch, int64_t n,
                                   int64_t m, bool giou, cudaStream_t stream);

// boxes1 (num_pairs, 4), boxes2 (num_pairs, 4) -> out (num_pairs).
cudaError_t mvrft_box_iou_elementwise(const float* boxes1, const float* boxes2, float* out,
                                      int64_t num_pairs, bool giou, cudaStream_t stream);
}
