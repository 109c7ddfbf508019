// Host test of kernels/box_iou.h (compiled as plain C++): returns non-zero on failure.
// Oracles, both independent of the header's code:
//   1. integer boxes on a small grid: areas counted cell by cell (exact);
//   2. real-valued boxes: long double interval-overlap formulas written here.
// Cases: random, degenerate (zero width/height), inverted (x2 < x1), disjoint, nested, identical.

#include <cmath>
#include <cstdio>
#include <random>

#include "box_iou.h"

namespace {

int failures = 0;

void check(bool ok, const char* what, int idx, double got, double want) {
  if (!ok) {
    if (failures < 20) std::printf("FAIL %s #%d: got %.9g want %.9g\n", what, idx, got, want);
    ++failures;
  }
}

// Cell (cx, cy) is the unit square [cx, cx+1) x [cy, cy+1); inside a box when fully covered.
bool covers(const int* b, int cx, int cy) {
  return b[0] <= cx && cx + 1 <= b[2] && b[1] <= cy && cy + 1 <= b[3];
}

void grid_oracle(const int* a, const int* b, double* iou, double* giou) {
  constexpr int kLo = -2, kHi = 56;  // covers every box drawn below
  long area_a = 0, area_b = 0, inter = 0;
  for (int cx = kLo; cx < kHi; ++cx) {
    for (int cy = kLo; cy < kHi; ++cy) {
      const bool in_a = covers(a, cx, cy), in_b = covers(b, cx, cy);
      area_a += in_a;
      area_b += in_b;
      inter += in_a && in_b;
    }
  }
  const long uni = area_a + area_b - inter;
  // Hull of two boxes, each box taken as-is (an inverted box keeps its corners).
  const int hull_box[4] = {std::min(a[0], b[0]), std::min(a[1], b[1]), std::max(a[2], b[2]),
                           std::max(a[3], b[3])};
  long hull = 0;
  for (int cx = kLo; cx < kHi; ++cx)
    for (int cy = kLo; cy < kHi; ++cy) hull += covers(hull_box, cx, cy);
  *iou = uni > 0 ? double(inter) / double(uni) : 0.0;
  *giou = hull > 0 ? *iou - double(hull - uni) / double(hull) : *iou;
}

long double overlap(long double a0, long double a1, long double b0, long double b1) {
  const long double lo = a0 > b0 ? a0 : b0, hi = a1 < b1 ? a1 : b1;
  return hi > lo ? hi - lo : 0.0L;
}

long double extent(long double a0, long double a1) { return a1 > a0 ? a1 - a0 : 0.0L; }

void real_oracle(const float* a, const float* b, double* iou, double* giou) {
  const long double ia = extent(a[0], a[2]) * extent(a[1], a[3]);
  const long double ib = extent(b[0], b[2]) * extent(b[1], b[3]);
  const long double in = overlap(a[0], a[2], b[0], b[2]) * overlap(a[1], a[3], b[1], b[3]);
  const long double un = ia + ib - in;
  const long double hx = std::fmax((long double)a[2], b[2]) - std::fmin((long double)a[0], b[0]);
  const long double hy = std::fmax((long double)a[3], b[3]) - std::fmin((long double)a[1], b[1]);
  const long double hull = extent(0.0L, hx) * extent(0.0L, hy);
  const long double v = un > 0 ? in / un : 0.0L;
  *iou = double(v);
  *giou = double(hull > 0 ? v - (hull - un) / hull : v);
}

void random_int_box(std::mt19937& rng, int* b) {
  std::uniform_int_distribution<int> pos(0, 24), size(0, 8), kind(0, 9);
  b[0] = pos(rng);
  b[1] = pos(rng);
  b[2] = b[0] + size(rng);  // size 0: degenerate
  b[3] = b[1] + size(rng);
  if (kind(rng) == 0) std::swap(b[0], b[2]);  // inverted
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  // 1. Integer boxes against cell counting.
  for (int t = 0; t < 3000; ++t) {
    int ai[4], bi[4];
    random_int_box(rng, ai);
    random_int_box(rng, bi);
    if (t % 7 == 0) std::copy(ai, ai + 4, bi);  // identical
    if (t % 11 == 0) {                          // nested (when a is large enough)
      bi[0] = ai[0] + 1; bi[1] = ai[1] + 1; bi[2] = ai[2] - 1; bi[3] = ai[3] - 1;
    }
    if (t % 13 == 0) { bi[0] += 20; bi[2] += 20; }  // likely disjoint
    double want_iou, want_giou;
    grid_oracle(ai, bi, &want_iou, &want_giou);
    const float af[4] = {float(ai[0]), float(ai[1]), float(ai[2]), float(ai[3])};
    const float bf[4] = {float(bi[0]), float(bi[1]), float(bi[2]), float(bi[3])};
    const double got_iou = mvrft::box_iou_giou(af, bf, false);
    const double got_giou = mvrft::box_iou_giou(af, bf, true);
    check(std::fabs(got_iou - want_iou) <= 1e-6, "grid iou", t, got_iou, want_iou);
    check(std::fabs(got_giou - want_giou) <= 1e-6, "grid giou", t, got_giou, want_giou);
    check(std::isfinite(got_iou) && got_iou >= 0 && got_iou <= 1, "iou range", t, got_iou, 0);
    check(got_giou >= -1 && got_giou <= got_iou, "giou range", t, got_giou, got_iou);
  }
  // 2. Real-valued boxes against long double formulas; float and double instantiations.
  std::uniform_real_distribution<float> pos(-50.f, 50.f), size(0.f, 30.f), kind(0.f, 1.f);
  for (int t = 0; t < 20000; ++t) {
    float a[4], b[4];
    for (float* box : {a, b}) {
      box[0] = pos(rng);
      box[1] = pos(rng);
      box[2] = box[0] + size(rng);
      box[3] = box[1] + size(rng);
      const float k = kind(rng);
      if (k < 0.05f) box[2] = box[0];                // zero width
      else if (k < 0.10f) std::swap(box[1], box[3]); // inverted
    }
    if (t % 9 == 0) std::copy(a, a + 4, b);
    double want_iou, want_giou;
    real_oracle(a, b, &want_iou, &want_giou);
    const double got_iou = mvrft::box_iou_giou(a, b, false);
    const double got_giou = mvrft::box_iou_giou(a, b, true);
    check(std::fabs(got_iou - want_iou) <= 1e-5 * std::fabs(want_iou) + 1e-6, "real iou f32", t,
          got_iou, want_iou);
    check(std::fabs(got_giou - want_giou) <= 1e-5 * std::fabs(want_giou) + 1e-6, "real giou f32",
          t, got_giou, want_giou);
    const double ad[4] = {a[0], a[1], a[2], a[3]}, bd[4] = {b[0], b[1], b[2], b[3]};
    const double got64 = mvrft::box_iou_giou(ad, bd, true);
    check(std::fabs(got64 - want_giou) <= 1e-12, "real giou f64", t, got64, want_giou);
    if (t % 9 == 0 && mvrft::box_area(a) > 0)
      check(got_iou == 1.0 && got_giou == 1.0, "identical", t, got_giou, 1.0);
  }
  if (failures) {
    std::printf("%d failures\n", failures);
    return 1;
  }
  std::printf("box_iou.h: all checks passed\n");
  return 0;
}
