// Per-token log-prob math shared by the CUDA kernels (logprob.cu) and the host test
// (tests/test_logprob_math.cpp); same semantics as megatron_vrft/ops/_logprob_stats.py.
//
// z = logits / T are the temperature-scaled logits of one row (token).
// LseState summarises a set of z values: m = max z, s = sum exp(z - m),
//   t = sum exp(z - m) * (z - m);  log-sum-exp = m + log(s), entropy of its softmax = log(s) - t/s.
// t is measured from the max so the entropy never cancels two O(|z|) numbers in fp32.
// States of disjoint sets merge exactly (lse_merge), so threads, warps, vocabulary blocks and
// tensor-parallel shards can each reduce their part and combine in any order.
// RowStats (lse, target logit or 0, entropy) is the per-shard summary exchanged across TP ranks.
#pragma once

#include <math.h>

#include "common/host_device.h"

namespace mvrft {

struct LseState {
  float m;  // running max (-inf for the empty set)
  float s;  // sum exp(z - m)
  float t;  // sum exp(z - m) * (z - m)
};

struct RowStats {
  float lse;      // log sum exp(z) over the slice (-inf for an empty slice)
  float target;   // z[target] when the slice owns the target id, else 0
  float entropy;  // entropy of the slice's own softmax
};

MVRFT_HOST_DEVICE LseState lse_empty() { return LseState{-INFINITY, 0.0f, 0.0f}; }

// exp(a - b) that is exactly 0 when a == -inf, even if b == -inf too (no NaN from inf - inf).
MVRFT_HOST_DEVICE float exp_shifted(float a, float b) { return a == -INFINITY ? 0.0f : expf(a - b); }

// Add one value; a new maximum re-references what was summed so far (one exp per value).
MVRFT_HOST_DEVICE LseState lse_push(LseState st, float z) {
  if (z > st.m) {
    if (st.m == -INFINITY) return LseState{z, 1.0f, 0.0f};
    const float a = expf(st.m - z);
    st.t = a * (st.t + (st.m - z) * st.s);  // the new value adds exp(0) * 0 to t
    st.s = st.s * a + 1.0f;
    st.m = z;
  } else {
    const float e = exp_shifted(z, st.m);
    st.s += e;
    st.t += e > 0.0f ? e * (z - st.m) : 0.0f;  // z = -inf contributes 0, not 0 * -inf
  }
  return st;
}

// One side of lse_merge: its (s, t) re-referenced from its own max to the merged max m.
MVRFT_HOST_DEVICE void lse_rescale(LseState part, float m, float* s, float* t) {
  const float w = exp_shifted(part.m, m);
  *s = w > 0.0f ? part.s * w : 0.0f;
  *t = w > 0.0f ? w * (part.t + (part.m - m) * part.s) : 0.0f;
}

// State of the union of two disjoint sets.
MVRFT_HOST_DEVICE LseState lse_merge(LseState a, LseState b) {
  const float m = a.m > b.m ? a.m : b.m;
  float sa, ta, sb, tb;
  lse_rescale(a, m, &sa, &ta);
  lse_rescale(b, m, &sb, &tb);
  return LseState{m, sa + sb, ta + tb};
}

MVRFT_HOST_DEVICE float lse_value(LseState st) {
  return st.s > 0.0f ? st.m + logf(st.s) : -INFINITY;
}

MVRFT_HOST_DEVICE float lse_entropy(LseState st) {
  return st.s > 0.0f ? logf(st.s) - st.t / st.s : 0.0f;
}

// Summary of two disjoint vocabulary slices of one row (e.g. two TP shards): with slice weights
// w = exp(lse_slice - lse) (summing to 1), entropy = sum w * (entropy_slice - log w).
MVRFT_HOST_DEVICE RowStats row_stats_merge(RowStats a, RowStats b) {
  const float hi = a.lse > b.lse ? a.lse : b.lse;
  const float wa = exp_shifted(a.lse, hi);
  const float wb = exp_shifted(b.lse, hi);
  const float sum = wa + wb;  // in [1, 2] unless both slices are empty
  RowStats out;
  out.target = a.target + b.target;
  if (!(sum > 0.0f)) {
    out.lse = -INFINITY;
    out.entropy = 0.0f;
    return out;
  }
  const float log_sum = logf(sum);
  out.lse = hi + log_sum;
  // log w = lse_slice - lse = (lse_slice - hi) - log_sum
  const float ta = wa > 0.0f ? wa * (a.entropy - (a.lse - hi - log_sum)) : 0.0f;
  const float tb = wb > 0.0f ? wb * (b.entropy - (b.lse - hi - log_sum)) : 0.0f;
  out.entropy = (ta + tb) / sum;
  return out;
}

// dL/dlogit for one element. z: scaled logit; lse, entropy: global over the whole vocabulary;
// g_lp, g_ent: upstream gradients of the log-prob and entropy (g_ent = 0 without entropy).
//   dL/dx = (g_lp * (onehot - p) - g_ent * p * (log p + H)) / T,   p = exp(z - lse).
MVRFT_HOST_DEVICE float logprob_grad(float z, bool is_target, float lse, float entropy, float g_lp,
                                     float g_ent, float inv_temperature) {
  const float p = expf(z - lse);
  float g = g_lp * ((is_target ? 1.0f : 0.0f) - p);
  if (p > 0.0f) g -= g_ent * p * (z - lse + entropy);
  return g * inv_temperature;
}

}  // namespace mvrft
