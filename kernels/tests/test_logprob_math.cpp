// Host test of kernels/logprob.h (compiled as plain C++): returns non-zero on failure.
// Oracles, independent of the header's code: long double direct sums (log-sum-exp, entropy)
// and, for the gradient formula, central finite differences of the long double loss
//   L(x) = g_lp * log softmax(x / T)[target] + g_ent * H(softmax(x / T)).
// Cases: random rows (incl. |z| ~ 100 where a naive float sum-exp overflows), -inf entries, empty
// and all -inf sets, random splits merged in random orders (threads / warps / vocab blocks / TP
// shards), and the RowStats combine across shards.

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "logprob.h"

namespace {

int failures = 0;

void check_close(const char* what, int idx, double got, long double want, double rtol,
                 double atol) {
  const bool both_neg_inf = std::isinf(got) && got < 0 && std::isinf(static_cast<double>(want)) &&
                            want < 0;
  const bool ok = both_neg_inf ||
                  std::fabs(got - static_cast<double>(want)) <=
                      atol + rtol * std::fabs(static_cast<double>(want));
  if (!ok) {
    if (failures < 30) std::printf("FAIL %s #%d: got %.9g want %.9Lg\n", what, idx, got, want);
    ++failures;
  }
}

long double oracle_lse(const std::vector<float>& z) {
  long double hi = -INFINITY;
  for (float v : z) hi = std::max<long double>(hi, v);
  if (std::isinf(hi)) return hi;
  long double s = 0;
  for (float v : z) s += std::exp(static_cast<long double>(v) - hi);
  return hi + std::log(s);
}

long double oracle_entropy(const std::vector<float>& z) {
  const long double lse = oracle_lse(z);
  long double entropy = 0;
  for (float v : z) {
    const long double logp = static_cast<long double>(v) - lse;
    if (std::exp(logp) > 0) entropy -= std::exp(logp) * logp;
  }
  return entropy;
}

std::vector<float> random_row(std::mt19937& rng, int n, float scale, float neg_inf_fraction) {
  std::normal_distribution<float> normal(0.0f, scale);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::vector<float> z(n);
  for (float& v : z) v = unit(rng) < neg_inf_fraction ? -INFINITY : normal(rng);
  return z;
}

mvrft::LseState push_all(const std::vector<float>& z, size_t lo, size_t hi) {
  mvrft::LseState st = mvrft::lse_empty();
  for (size_t i = lo; i < hi; ++i) st = mvrft::lse_push(st, z[i]);
  return st;
}

void test_push_and_merge(std::mt19937& rng) {
  const float scales[] = {1.0f, 5.0f, 60.0f};  // 60: exp overflows float without the running max
  const float inf_fracs[] = {0.0f, 0.3f};
  int idx = 0;
  for (float scale : scales) {
    for (float frac : inf_fracs) {
      for (int rep = 0; rep < 20; ++rep, ++idx) {
        const int n = 1 + static_cast<int>(rng() % 3000);
        std::vector<float> z = random_row(rng, n, scale, frac);
        if (rep == 0) z.assign(n, -INFINITY);                 // all masked
        if (rep == 1) std::sort(z.begin(), z.end());           // max arrives last
        if (rep == 2) std::sort(z.rbegin(), z.rend());         // max arrives first
        const long double lse = oracle_lse(z), entropy = oracle_entropy(z);
        const mvrft::LseState whole = push_all(z, 0, z.size());
        check_close("push lse", idx, mvrft::lse_value(whole), lse, 2e-6, 2e-6);
        if (!std::isinf(static_cast<double>(lse))) {
          check_close("push entropy", idx, mvrft::lse_entropy(whole), entropy, 1e-5, 1e-5);
        }
        // Random split into parts (like threads / vocabulary blocks), merged in a random order.
        const int parts = 1 + static_cast<int>(rng() % 40);
        std::vector<size_t> cuts = {0, z.size()};
        for (int p = 1; p < parts; ++p) cuts.push_back(rng() % (z.size() + 1));
        std::sort(cuts.begin(), cuts.end());
        std::vector<mvrft::LseState> states;
        for (size_t c = 0; c + 1 < cuts.size(); ++c) states.push_back(push_all(z, cuts[c], cuts[c + 1]));
        std::shuffle(states.begin(), states.end(), rng);
        while (states.size() > 1) {  // pairwise tree like a warp shuffle reduction
          std::vector<mvrft::LseState> next;
          for (size_t i = 0; i + 1 < states.size(); i += 2) next.push_back(mvrft::lse_merge(states[i], states[i + 1]));
          if (states.size() % 2) next.push_back(mvrft::lse_merge(states.back(), mvrft::lse_empty()));
          states.swap(next);
        }
        check_close("merge lse", idx, mvrft::lse_value(states[0]), lse, 2e-6, 2e-6);
        if (!std::isinf(static_cast<double>(lse))) {
          check_close("merge entropy", idx, mvrft::lse_entropy(states[0]), entropy, 1e-5, 1e-5);
        }
      }
    }
  }
  // The empty set: lse = -inf, entropy 0, and merging with it is the identity.
  const mvrft::LseState empty = mvrft::lse_empty();
  check_close("empty lse", 0, mvrft::lse_value(empty), -INFINITY, 0, 0);
  check_close("empty entropy", 0, mvrft::lse_entropy(mvrft::lse_merge(empty, empty)), 0.0L, 0, 0);
  const mvrft::LseState one = mvrft::lse_push(empty, 3.5f);
  check_close("identity lse", 0, mvrft::lse_value(mvrft::lse_merge(empty, one)), 3.5L, 1e-7, 0);
  check_close("identity entropy", 0, mvrft::lse_entropy(mvrft::lse_merge(one, empty)), 0.0L, 0, 0);
}

void test_row_stats_merge(std::mt19937& rng) {
  for (int idx = 0; idx < 50; ++idx) {
    const int n = 2 + static_cast<int>(rng() % 2000);
    std::vector<float> z = random_row(rng, n, idx % 2 ? 30.0f : 2.0f, idx % 3 == 0 ? 0.2f : 0.0f);
    const int target = static_cast<int>(rng() % n);
    const int shards = 1 + static_cast<int>(rng() % 8);
    // Contiguous shards (one may be empty or all -inf), combined in order like a TP all-gather.
    std::vector<size_t> cuts = {0, z.size()};
    for (int s = 1; s < shards; ++s) cuts.push_back(rng() % (z.size() + 1));
    std::sort(cuts.begin(), cuts.end());
    mvrft::RowStats acc{-INFINITY, 0.0f, 0.0f};
    for (size_t c = 0; c + 1 < cuts.size(); ++c) {
      const mvrft::LseState st = push_all(z, cuts[c], cuts[c + 1]);
      const bool owned = static_cast<size_t>(target) >= cuts[c] && static_cast<size_t>(target) < cuts[c + 1];
      const mvrft::RowStats shard{mvrft::lse_value(st), owned ? z[target] : 0.0f,
                                  mvrft::lse_entropy(st)};
      acc = mvrft::row_stats_merge(acc, shard);
    }
    check_close("stats lse", idx, acc.lse, oracle_lse(z), 2e-6, 2e-6);
    check_close("stats target", idx, acc.target, z[target], 0, 0);
    if (!std::isinf(static_cast<double>(oracle_lse(z)))) {
      check_close("stats entropy", idx, acc.entropy, oracle_entropy(z), 1e-5, 1e-5);
    }
  }
}

long double oracle_loss(const std::vector<long double>& x, int target, long double inv_t,
                        long double g_lp, long double g_ent) {
  long double hi = -INFINITY;
  for (long double v : x) hi = std::max(hi, v * inv_t);
  long double s = 0;
  for (long double v : x) s += std::exp(v * inv_t - hi);
  const long double lse = hi + std::log(s);
  long double entropy = 0;
  for (long double v : x) {
    const long double logp = v * inv_t - lse;
    entropy -= std::exp(logp) * logp;
  }
  return g_lp * (x[target] * inv_t - lse) + g_ent * entropy;
}

void test_grad(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 2.0f);
  const float temperatures[] = {1.0f, 0.7f, 1.6f};
  int idx = 0;
  for (float temperature : temperatures) {
    for (int rep = 0; rep < 6; ++rep, ++idx) {
      const int n = 3 + static_cast<int>(rng() % 40);
      std::vector<float> x(n);
      for (float& v : x) v = normal(rng);
      const int target = rep == 0 ? 0 : (rep == 1 ? n - 1 : static_cast<int>(rng() % n));
      const float g_lp = normal(rng), g_ent = rep % 2 ? normal(rng) : 0.0f;
      const float inv_t = 1.0f / temperature;
      std::vector<float> z(n);
      for (int j = 0; j < n; ++j) z[j] = x[j] * inv_t;
      const mvrft::LseState st = push_all(z, 0, z.size());
      const float lse = mvrft::lse_value(st);
      const float entropy = mvrft::lse_entropy(st);
      std::vector<long double> xl(x.begin(), x.end());
      for (int j = 0; j < n; ++j) {
        const long double h = 1e-6L;
        std::vector<long double> up = xl, down = xl;
        up[j] += h;
        down[j] -= h;
        const long double fd = (oracle_loss(up, target, inv_t, g_lp, g_ent) -
                                oracle_loss(down, target, inv_t, g_lp, g_ent)) / (2 * h);
        const float got = mvrft::logprob_grad(z[j], j == target, lse, entropy, g_lp, g_ent, inv_t);
        check_close("grad", idx * 1000 + j, got, fd, 1e-4, 2e-6);
      }
    }
  }
  // A -inf logit has probability 0 and gradient 0 (no NaN from 0 * -inf).
  const float g = mvrft::logprob_grad(-INFINITY, false, 1.0f, 0.5f, 1.0f, 1.0f, 1.0f);
  check_close("grad -inf", 0, g, 0.0L, 0, 0);
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  test_push_and_merge(rng);
  test_row_stats_merge(rng);
  test_grad(rng);
  if (failures) {
    std::printf("%d failure(s)\n", failures);
    return 1;
  }
  std::printf("test_logprob_math: all checks passed\n");
  return 0;
}
