// Box IoU / GIoU math shared by the CUDA kernels (box_iou.cu) and the host tests.
// Boxes are (x1, y1, x2, y2); same semantics as megatron_vrft/ops/box_iou.py:
//   degenerate boxes (width or height <= 0) have zero area; a zero union gives IoU 0;
//   GIoU = IoU - (|C| - |A u B|) / |C| with C the enclosing box, and IoU when |C| == 0.
#pragma once

#include "common/host_device.h"

namespace mvrft {

template <typename T>
MVRFT_HOST_DEVICE T box_area(const T* b) {
  return max_of<T>(b[2] - b[0], T(0)) * max_of<T>(b[3] - b[1], T(0));
}

template <typename T>
MVRFT_HOST_DEVICE T box_intersection(const T* a, const T* b) {
  const T w = max_of<T>(min_of<T>(a[2], b[2]) - max_of<T>(a[0], b[0]), T(0));
  const T h = max_of<T>(min_of<T>(a[3], b[3]) - max_of<T>(a[1], b[1]), T(0));
  return w * h;
}

template <typename T>
MVRFT_HOST_DEVICE T box_enclosing_area(const T* a, const T* b) {
  const T w = max_of<T>(max_of<T>(a[2], b[2]) - min_of<T>(a[0], b[0]), T(0));
  const T h = max_of<T>(max_of<T>(a[3], b[3]) - min_of<T>(a[1], b[1]), T(0));
  return w * h;
}

// IoU (giou == false) or GIoU (giou == true) of boxes a and b (4 values each).
template <typename T>
MVRFT_HOST_DEVICE T box_iou_giou(const T* a, const T* b, bool giou) {
  const T inter = box_intersection(a, b);
  const T uni = box_area(a) + box_area(b) - inter;
  T iou = uni > T(0) ? inter / uni : T(0);
  if (giou) {
    const T hull = box_enclosing_area(a, b);
    if (hull > T(0)) iou -= (hull - uni) / hull;
  }
  return iou;
}

}  // namespace mvrft
