// pbs2p::sweep_groups — the group loop of one column block of the compensated sweep
// (pbs2p.algorithms.method.sweep), the same arithmetic as its torch loop, without one Python
// dispatch per tensor operation.
//
// The block is held transposed: row k of Wt is column s + k of the weight (its `out` values
// contiguous). For each group of m columns, in order: every row keeps, among the columns not pruned
// before (Mt true on entry = pruned), the n of highest score; with `column` compensation each column
// is then binarized under its levels (hi, lo where kept, 0 elsewhere), its error divided by U's
// diagonal is stored in Et and pushed onto the group's later columns, and finally onto the block's
// later groups with one matrix product (at::addmm_, the call the torch loop makes).
//
// Every rounding is the torch loop's: each product, sum and quotient rounded on its own (the torch loop
// writes the within-group update as a product, then a difference). The file is built for baseline
// x86-64, which has no fused multiply-add for the compiler to contract into.
// Ties between equal scores go to the lower column.

#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <vector>

namespace pbs2p {
namespace {

void check(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.is_contiguous(), "sweep_groups: ", name,
              " must be a contiguous CPU tensor of type ", dtype);
}

void sweep_groups(at::Tensor Wt, at::Tensor Mt, at::Tensor Et, const at::Tensor& a, const at::Tensor& u,
                  const at::Tensor& hi, const at::Tensor& lo, const at::Tensor& v, const at::Tensor& U,
                  const at::Tensor& d, int64_t s, int64_t n, int64_t m, bool oneshot, bool column) {
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&Wt, &Et, &a, &u, &hi, &lo})
    check(*t, at::kFloat, "Wt, Et, a, u, hi, lo");
  check(Mt, at::kBool, "Mt");
  check(v, at::kFloat, "v");
  check(d, at::kFloat, "d");
  TORCH_CHECK(U.device().is_cpu() && U.scalar_type() == at::kFloat && U.dim() == 2, "sweep_groups: U");
  const int64_t bs = Wt.size(0), out = Wt.size(1);
  TORCH_CHECK(m >= 1 && n >= 0 && n <= m && bs % m == 0, "sweep_groups: need whole groups");
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&Mt, &Et, &a, &u, &hi, &lo})
    TORCH_CHECK(t->size(0) == bs && t->size(1) == out, "sweep_groups: shapes differ");
  TORCH_CHECK(s >= 0 && s + bs <= v.numel() && s + bs <= d.numel() && s + bs <= U.size(0) && s + bs <= U.size(1),
              "sweep_groups: block outside the weight");

  float* W = Wt.data_ptr<float>();
  bool* M = Mt.data_ptr<bool>();
  float* E = Et.data_ptr<float>();
  const float *A = a.data_ptr<float>(), *Mu = u.data_ptr<float>(), *Hi = hi.data_ptr<float>(),
              *Lo = lo.data_ptr<float>(), *V = v.data_ptr<float>(), *D = d.data_ptr<float>();
  const auto Ua = U.accessor<float, 2>();
  const float minus_inf = -std::numeric_limits<float>::infinity();
  std::vector<float> score(static_cast<size_t>(m * out));
  std::vector<int32_t> beaten(static_cast<size_t>(out));

  for (int64_t g0 = 0; g0 < bs; g0 += m) {
    // scores: v * w^2 (one-shot) or v * (w^2 - (|w - mu| - alpha)^2), -inf where pruned before
    for (int64_t j = 0; j < m; ++j) {
      const int64_t row = (g0 + j) * out;
      const float vj = V[s + g0 + j];
      float* sc = score.data() + j * out;
      for (int64_t r = 0; r < out; ++r) {
        const float w = W[row + r];
        const float w2 = w * w;
        const float t = std::fabs(w - Mu[row + r]) - A[row + r];
        const float t2 = t * t;
        const float delta = oneshot ? w2 : w2 - t2;
        const float value = delta * vj;
        sc[r] = M[row + r] ? minus_inf : value;
      }
    }
    // a column is kept if fewer than n columns of its row beat it (a higher score, or an equal one further left)
    for (int64_t j = 0; j < m; ++j) {
      const float* sj = score.data() + j * out;
      std::fill(beaten.begin(), beaten.end(), 0);
      for (int64_t k = 0; k < m; ++k) {
        const float* sk = score.data() + k * out;
        if (k < j) {
          for (int64_t r = 0; r < out; ++r) beaten[r] += sk[r] >= sj[r];
        } else if (k > j) {
          for (int64_t r = 0; r < out; ++r) beaten[r] += sk[r] > sj[r];
        }
      }
      bool* keep = M + (g0 + j) * out;
      for (int64_t r = 0; r < out; ++r) keep[r] = beaten[r] < n;
    }
    if (!column) continue;
    // column by column: binarize, divide the error by U_jj, push it onto the group's later columns
    for (int64_t j = 0; j < m; ++j) {
      const int64_t row = (g0 + j) * out, c = s + g0 + j;
      const float dj = D[c];
      for (int64_t r = 0; r < out; ++r) {
        const float x = W[row + r];
        const float keep = static_cast<float>(M[row + r]);
        const float high = Hi[row + r] * keep, low = Lo[row + r] * keep;
        const float level = x >= Mu[row + r] ? high : low;
        const float diff = x - level;
        E[row + r] = diff / dj;
      }
      for (int64_t k = j + 1; k < m; ++k) {  // w -= U_jk * err, the product rounded, then the difference
        float* target = W + (g0 + k) * out;
        const float ujk = Ua[c][s + g0 + k];
        const float* err = E + row;
        for (int64_t r = 0; r < out; ++r) {
          const float product = ujk * err[r];
          target[r] = target[r] - product;
        }
      }
    }
    if (g0 + m < bs) {  // the block's later groups: Wt[g1:] -= U[g, g1:e]^T Et[g]
      const int64_t g1 = g0 + m;
      auto Ug = U.narrow(0, s + g0, m).narrow(1, s + g1, bs - g1);
      Wt.narrow(0, g1, bs - g1).addmm_(Ug.t(), Et.narrow(0, g0, m), 1.0, -1.0);
    }
  }
}

}  // namespace
}  // namespace pbs2p

TORCH_LIBRARY_FRAGMENT(pbs2p, lib) {
  lib.def(
      "sweep_groups(Tensor(a!) Wt, Tensor(b!) Mt, Tensor(c!) Et, Tensor a, Tensor u, Tensor hi, Tensor lo, "
      "Tensor v, Tensor U, Tensor d, int s, int n, int m, bool oneshot, bool column) -> ()");
}

TORCH_LIBRARY_IMPL(pbs2p, CPU, lib) { lib.impl("sweep_groups", &pbs2p::sweep_groups); }
