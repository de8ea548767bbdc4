// pbs2p::int8_rows_linear, the CPU operator of the compact embedding / LM head (pbs2p.embeddings):
// y = x @ (scale[:, None] * q).T for an int8 matrix q [V, K] with one float32 scale per row.
//
// Up to kMaxGemvRows activation rows (decoding): the ISA kernels (kernels.h, Int8RowsArgs) read each
// int8 row once for all activation rows and sum in float32, rows split over torch's threads. From
// kMaxGemvRows rows on (prefill, perplexity windows) the matrix is widened to float32 kChunkRows rows
// at a time and multiplied with the BLAS. Activations float32 or bfloat16; y in the activations' dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "kernels.h"
#include "parallel_items.h"

namespace pbs2p {
namespace {

constexpr int64_t kMaxGemvRows = 16;
// Rows per work item: long runs of the matrix per thread. Measured on Zen 4 (2 vCPUs), 49,152 x 576, caches
// flushed before each call, medians of 35 calls alternating in one process, three runs: 2048 rows 1.77 / 1.31 /
// 2.31 ms against 1.96 / 1.50 / 2.43 with 256 (the machine's speed drifts between runs); 1024 and 4096 rows as
// 2048; one half of the matrix per thread 2.48 (first run).
constexpr int64_t kRowsPerItem = 2048;
constexpr int64_t kChunkRows = 4096;
constexpr int64_t kParallelWork = 1 << 16;

void (*isa_int8_rows(int isa))(const Int8RowsArgs&) {
  switch (isa) {
    case 2: return avx512::int8_rows;
    case 1: return avx2::int8_rows;
    default: return scalar::int8_rows;
  }
}

at::Tensor int8_rows_linear_cpu(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar, "pbs2p::int8_rows_linear: q must be a 2-D int8 tensor, got ",
              q.scalar_type(), " of shape ", q.sizes());
  const int64_t V = q.size(0), K = q.size(1);
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == V && scale.scalar_type() == at::kFloat,
              "pbs2p::int8_rows_linear: scale must be float32 of shape [", V, "], got ", scale.scalar_type(), " of shape ",
              scale.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "pbs2p::int8_rows_linear: activations must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == K, "pbs2p::int8_rows_linear: activations of shape ", x.sizes(),
              " do not match the ", K, " columns of q");
  TORCH_CHECK(x.device().is_cpu() && q.device().is_cpu() && scale.device().is_cpu(),
              "pbs2p::int8_rows_linear: tensors must be on the CPU");
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = V;
  const int64_t B = x.numel() / std::max<int64_t>(K, 1);
  const at::Tensor xf = x.reshape({B, K}).to(at::kFloat).contiguous();
  const at::Tensor qc = q.contiguous(), sc = scale.contiguous();
  at::Tensor y = at::empty({B, V}, xf.options());
  if (B == 0 || V == 0) return y.view(shape).to(x.scalar_type());
  if (B >= kMaxGemvRows) {
    for (int64_t r = 0; r < V; r += kChunkRows) {
      const int64_t n = std::min(kChunkRows, V - r);
      const at::Tensor w = qc.narrow(0, r, n).to(at::kFloat).mul_(sc.narrow(0, r, n).unsqueeze(1));
      y.narrow(1, r, n).copy_(at::mm(xf, w.t()));
    }
    return y.view(shape).to(x.scalar_type());
  }
  const auto kernel = isa_int8_rows(active_isa());
  Int8RowsArgs a{qc.data_ptr<int8_t>(), sc.data_ptr<float>(), xf.data_ptr<float>(), K, K, B, 0, 0, V,
                 y.data_ptr<float>()};
  const int64_t items = (V + kRowsPerItem - 1) / kRowsPerItem;
  const int threads = V * K * B >= kParallelWork && !at::in_parallel_region() ? at::get_num_threads() : 1;
  parallel_items(items, threads, [&](int64_t i) {
    Int8RowsArgs part = a;
    part.r0 = i * kRowsPerItem;
    part.r1 = std::min(V, part.r0 + kRowsPerItem);
    kernel(part);
  });
  return y.view(shape).to(x.scalar_type());
}

}  // namespace
}  // namespace pbs2p

TORCH_LIBRARY_FRAGMENT(pbs2p, lib) { lib.def("int8_rows_linear(Tensor x, Tensor q, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(pbs2p, CPU, lib) { lib.impl("int8_rows_linear", &pbs2p::int8_rows_linear_cpu); }
