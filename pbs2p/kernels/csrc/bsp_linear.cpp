// pbs2p::bsp_linear, the CPU operator on packed 1-bit N:M weights (format v1).
//
// Lookup-table path (every ISA, below the BLAS batch):
// y[b, r] = sum over scale blocks of (mu - alpha) * sum_{c in S} x[b, c] + 2 alpha * sum_{c in P} x[b, c]
// where S are the kept columns of row r and P the kept columns with sign +1, both read from
// tables of activation subset sums (see kernels.h). Loop nest, per pass of <= 64 batch rows:
//
//   tables for every (group, batch row)                               parallel over groups
//   for each item of 1-8 row tiles of 64 rows:                          parallel over items
//     for each K-chunk (its tables fit in L2): for each tile of the item:
//       for each 32 groups: decode D once, then lookups for up to 8 batch rows at a time
//
// A tile's outputs accumulate in fp32 across chunks and are written (+ bias, cast) at the end. One batch row on
// AVX-512 (m = 4, 8) takes batch1_pass instead: one parallel region, each thread with tables of its own, decode
// and lookup fused.
//
// Pair path (bfloat16 activations from pair_min_batch rows on AVX-512 CPUs with bf16 dot products, patterns that
// keep at most 4 of every 8 columns): bf16 dot products on the kept weights only, see pair_kernels.cpp.
//
// BLAS path (float32 activations from blas_min_batch rows on every ISA; bfloat16 ones from theirs on
// AVX-512 with bf16 dot products where the pair path does not apply): expand W_hat to the activations' dtype 64 MB
// at a time, exactly as the torch path rounds it, and call at::linear.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <limits>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "parallel_items.h"

namespace pbs2p {
namespace {

enum Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kIsaNames[] = {"scalar", "avx2", "avx512"};

struct IsaOps {
  int max_nb;
  int (*table_floats)(int);
  void (*build_tables)(const void*, bool, int64_t, int64_t, int, int64_t, int64_t, float*);
  void (*decode)(const NMTables&, const uint8_t*, int64_t, uint32_t*);
  void (*lookup)(const LookupArgs&);
  void (*expand_bf16)(const ExpandArgs&);
  void (*expand_f32)(const ExpandArgs&);
};

IsaOps isa_ops(int isa) {
  switch (isa) {
    case kAvx512: return {avx512::kMaxNb, avx512::table_floats, avx512::build_tables, avx512::decode, avx512::lookup, avx512::expand_bf16, avx512::expand_f32};
    case kAvx2: return {avx2::kMaxNb, avx2::table_floats, avx2::build_tables, avx2::decode, avx2::lookup, avx2::expand_bf16, avx2::expand_f32};
    default: return {scalar::kMaxNb, scalar::table_floats, scalar::build_tables, scalar::decode, scalar::lookup, scalar::expand_bf16, scalar::expand_f32};
  }
}

bool cpu_supports(int isa) {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("popcnt");
  switch (isa) {
    case kAvx512:
      return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vbmi") && __builtin_cpu_supports("bmi") &&
             __builtin_cpu_supports("bmi2");
    case kAvx2: return avx2;
    default: return true;
  }
}

int best_isa() {
  for (int isa = kAvx512; isa > kScalar; --isa) {
    if (cpu_supports(isa)) return isa;
  }
  return kScalar;
}

std::atomic<int>& current_isa() {
  static std::atomic<int> isa{best_isa()};
  return isa;
}

std::string kernel_isa() { return kIsaNames[current_isa().load()]; }

}  // namespace

int active_isa() { return current_isa().load(); }

namespace {

std::vector<std::string> supported_kernel_isas() {
  std::vector<std::string> names;
  for (int i = kScalar; i <= kAvx512; ++i) {
    if (cpu_supports(i)) names.emplace_back(kIsaNames[i]);
  }
  return names;
}

std::string set_kernel_isa(const std::string& name) {
  int isa = -1;
  if (name == "best") {
    isa = best_isa();
  } else {
    for (int i = kScalar; i <= kAvx512; ++i) {
      if (name == kIsaNames[i]) isa = i;
    }
  }
  TORCH_CHECK(isa >= 0, "pbs2p: unknown kernel ISA '", name, "' (expected scalar, avx2, avx512 or best)");
  TORCH_CHECK(cpu_supports(isa), "pbs2p: this CPU cannot run the ", name, " kernels");
  current_isa().store(isa);
  return kIsaNames[isa];
}

struct FreeDeleter {
  void operator()(void* p) const { std::free(p); }
};

// Grow-only 64-byte aligned scratch memory, one per thread and purpose: reused across calls, so
// large tables are not page-faulted in again on every call.
template <typename T>
class Scratch {
 public:
  T* get(int64_t count) {
    if (count > capacity_) {
      const size_t bytes = (static_cast<size_t>(count) * sizeof(T) + 63) / 64 * 64;
      buf_.reset(static_cast<T*>(std::aligned_alloc(64, bytes)));
      TORCH_CHECK(buf_, "pbs2p::bsp_linear: out of memory");
      capacity_ = count;
    }
    return buf_.get();
  }

 private:
  std::unique_ptr<T[], FreeDeleter> buf_;
  int64_t capacity_ = 0;
};

// This tile's scales of blocks [blk_a, blk_b]: [blk][2][64] = (mu - alpha, 2 alpha), 0 past `out`.
template <typename T>
void prepare_scales_t(const T* alpha, const T* mu, int64_t n_blocks, int64_t out, int64_t tile,
                      int64_t blk_a, int64_t blk_b, float* sc) {
  for (int64_t blk = blk_a; blk <= blk_b; ++blk) {
    float* s = sc + (blk - blk_a) * 2 * kTileRows;
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t row = tile * kTileRows + r;
      float a = 0.0f, u = 0.0f;
      if (row < out) {
        a = static_cast<float>(alpha[row * n_blocks + blk]);
        u = static_cast<float>(mu[row * n_blocks + blk]);
      }
      s[r] = u - a;
      s[kTileRows + r] = 2.0f * a;
    }
  }
}

template <typename T>
void write_tile(const float* acc, int64_t nb, int64_t out, int64_t tile, const float* bias, T* y) {
  const int64_t row0 = tile * kTileRows;
  const int rows = static_cast<int>(std::min<int64_t>(kTileRows, out - row0));
  for (int64_t b = 0; b < nb; ++b) {
    const float* a = acc + b * kTileRows;
    T* yb = y + b * out + row0;
    for (int r = 0; r < rows; ++r) yb[r] = static_cast<T>(a[r] + (bias ? bias[row0 + r] : 0.0f));
  }
}

constexpr int64_t kGroupsPerDecode = 32;        // D buffer: 8 KB, stays in L1 with its tables
constexpr int64_t kGroupsPerExpand = 128;       // rows written 128 * m * 2 bytes at a time
constexpr int64_t kExpandBytes = 64 << 20;      // W_hat expanded per GEMM call
constexpr int64_t kTableBytesPerChunk = 256 << 10;
constexpr int64_t kMaxBatchPerPass = 64;        // bounds the tables: 64 bytes per 4 activations per row
// Below (about 50 us of work) a second thread costs more than it gains: SmolLM2's linears (0.2-0.6 M) on two
// threads made its compiled decode 0.92x as fast (Zen 5, 2 cores, 12 alternating rounds, the driver before
// batch1_pass). Work = rows x groups x (batch rows + 4).
constexpr int64_t kParallelWork = 1 << 21;
// The same for batch1_pass (tables per thread, one parallel region): SmolLM2's gate + up (1.1 M) and down_proj
// (0.55 M) gain from two threads, its q + k + v (0.35 M) and o_proj (0.21 M) do not. Compiled SmolLM2 4:8 decode
// with int8 embeddings, 2 threads, Zen 4, six rounds alternating in one process with llama.cpp: 1.11x llama.cpp
// with the threshold at 0.4 M, 1.10x at 0.2 M (all on two threads), 1.05x at 2 M (all on one).
constexpr int64_t kParallelWorkBatch1 = 1 << 19;

struct Problem {
  const NMTables* t;
  int isa;
  IsaOps ops;
  int64_t K, G, out, tiles, n_blocks, gpb;
  const uint8_t* codes;
  at::ScalarType scale_type;
  const void* alpha;
  const void* mu;
  const float* bias;
  bool x_bf16;
  int threads;
};

// Batch from which activations take the expand + BLAS path; PBS2P_BLAS_MIN_BATCH overrides it (tests, tuning).
// float32: from 32 rows with the AVX2 and scalar kernels (benchmarks/blas_crossover.py on 2 AVX2 cores: at 32
// rows the two are within 30 % either way, from 64 rows the BLAS is faster for every shape); never with the
// AVX-512 kernels, whose tables beat float32 BLAS at batch 128 (measured on Zen 5, 2 cores).
// bfloat16: from 48 rows with the AVX-512 kernels where oneDNN has native bf16 dot products (Zen 5).
int64_t blas_min_batch(int isa, bool bf16) {
  if (const char* env = std::getenv("PBS2P_BLAS_MIN_BATCH")) return std::atoll(env);
  if (!bf16) return isa == kAvx512 ? INT64_MAX : 32;
  static const bool bf16_dot = __builtin_cpu_supports("avx512bf16");
  return isa == kAvx512 && bf16_dot ? 48 : INT64_MAX;
}

int64_t current_blas_min_batch(bool bf16) { return blas_min_batch(current_isa().load(), bf16); }

void prepare_scales(const Problem& p, int64_t tile, int64_t blk_a, int64_t blk_b, float* sc) {
  switch (p.scale_type) {
    case at::kBFloat16:
      prepare_scales_t(static_cast<const at::BFloat16*>(p.alpha), static_cast<const at::BFloat16*>(p.mu),
                       p.n_blocks, p.out, tile, blk_a, blk_b, sc);
      break;
    case at::kHalf:
      prepare_scales_t(static_cast<const at::Half*>(p.alpha), static_cast<const at::Half*>(p.mu), p.n_blocks,
                       p.out, tile, blk_a, blk_b, sc);
      break;
    default:
      prepare_scales_t(static_cast<const float*>(p.alpha), static_cast<const float*>(p.mu), p.n_blocks, p.out,
                       tile, blk_a, blk_b, sc);
  }
}

// Groups per K-chunk whose tables (`table_floats` floats per group) fit in kTableBytesPerChunk: all G groups, or
// a multiple of kGroupsPerDecode.
int64_t chunk_groups(int64_t G, int64_t table_floats) {
  const int64_t gc = std::max<int64_t>(kTableBytesPerChunk / (table_floats * 4), kGroupsPerDecode);
  return gc >= G ? G : gc / kGroupsPerDecode * kGroupsPerDecode;
}

// Codes are read in bursts (decode, then lookups with no memory traffic): without a hint the
// hardware prefetcher stops at each burst's end, and cold weights (the usual case in a model)
// arrive at a fraction of the memory bandwidth. Each burst prefetches the next one (measured
// on Zen 5: farther or into L2 only is slower).
inline void prefetch(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

// The AVX-512 kernels for one batch row (batch1_pass). N:8 weights take the kernels that read each group's kept
// sum by idx (the others add two nibble lookups per row): bfloat16 activations on CPUs with bf16 dot products take
// bf16 tables (rounded once, within the bf16 contract of pbs2p.kernels.ops.TOLERANCE), the others float32 tables.
// Measured on Zen 5, 2 threads, calls alternating with the nibble kernels in one process: 4096 x 4096 1.22x (bf16)
// and 1.03-1.09x (float32) their speed, 11008 x 4096 1.69-1.74x and 1.18-1.20x; SmolLM2's float32 shapes
// 1.01-1.07x. N:4 weights take the nibble kernel with decode and lookup fused (no D buffer).
enum class Batch1 { kNone, kNibbles, kIdx, kIdxBf16 };

Batch1 batch1_kernel(const Problem& p, int64_t nb) {
  static const bool bf16_dot = __builtin_cpu_supports("avx512bf16");
  if (nb != 1 || p.isa != kAvx512) return Batch1::kNone;
  if (p.t->m == 4) return Batch1::kNibbles;
  if (p.t->m != 8) return Batch1::kNone;
  return p.x_bf16 && bf16_dot ? Batch1::kIdxBf16 : Batch1::kIdx;
}

// One product of batch1_pass: its problem and its output row.
template <typename T>
struct Batch1Job {
  const Problem* p;
  T* y;
};

// y[0] = x[0] @ W_hat.T + bias of each job (products of the same x: bsp_linear_multi fuses the q, k and v
// projections of a layer, or gate and up) with a Batch1 kernel, in one parallel region. Every worker builds all of the
// tables into a buffer of its own (a few microseconds for 4096 columns), so no thread waits for another's tables
// and no table line moves between cores; it then claims runs of row tiles, about two per thread (long runs of
// contiguous codes; a thread that falls behind still leaves work to the other). The kernels prefetch, group by
// group, the codes of the same groups one tile on (45 KB ahead at 4096 columns, 4:8), so that the codes, cold in
// a model, stream in while the arithmetic runs; a K-chunk (all of K up to 5632 columns with bf16 tables, 3072
// with float32 ones) goes through the item's tiles before the next. Measured on Zen 4 (2 vCPUs), medians of calls
// alternating with dense F.linear in one process, against the previous driver (tables shared by the threads,
// built in a parallel region of their own; bursts of 32 groups, each prefetching the next): bf16 4096 x 4096
// 0.25-0.28 ms instead of 0.29-0.33, 11008 x 4096 0.73 instead of 0.92, 4096 x 11008 0.68 instead of 0.80;
// float32 4096 x 4096 0.30 instead of 0.35; SmolLM2's shapes (one thread) 1.04-1.2x. Then group by group instead
// of a whole tile at once before it: 4096 x 4096 0.26-0.30 instead of 0.32-0.36, 11008 x 4096 0.60 instead of 0.76.
// Several jobs share the tables (built once per worker) and one queue of items.
template <typename T>
void batch1_pass(const std::vector<Batch1Job<T>>& jobs, const void* x, Batch1 b1, int threads) {
  const Problem& p0 = *jobs[0].p;
  const NMTables& t = *p0.t;
  const int64_t G = p0.G, bb = t.block_bytes;
  const int64_t tf = b1 == Batch1::kIdxBf16 ? avx512::kIdxBf16TableFloats
                     : b1 == Batch1::kIdx   ? avx512::kIdxTableFloats
                                            : p0.ops.table_floats(t.m);
  const int64_t gc = chunk_groups(G, tf);
  // Job j's items are [first[j], first[j + 1]), runs of tiles_per_item[j] tiles.
  std::vector<int64_t> tiles_per_item(jobs.size()), first(jobs.size() + 1, 0);
  int64_t max_run = 1;
  for (size_t j = 0; j < jobs.size(); ++j) {
    const int64_t tiles = jobs[j].p->tiles;
    tiles_per_item[j] = std::max<int64_t>(1, tiles / (2 * threads));
    first[j + 1] = first[j] + (tiles + tiles_per_item[j] - 1) / tiles_per_item[j];
    max_run = std::max(max_run, tiles_per_item[j]);
  }
  const auto job_of = [&](int64_t item) {
    size_t j = 0;
    while (item >= first[j + 1]) ++j;
    return j;
  };
  parallel_workers(first.back(), threads, [&](ItemQueue& queue) {
    static thread_local Scratch<float> tscratch, sscratch, ascratch;
    int64_t item;
    if (!queue.next(item)) return;
    const size_t j0 = job_of(item);
    // the first tile's codes, while the tables build
    prefetch(jobs[j0].p->codes + (item - first[j0]) * tiles_per_item[j0] * G * bb, gc * bb);
    float* tables = tscratch.get(G * tf);
    switch (b1) {
      case Batch1::kIdxBf16:
        avx512::build_tables_bf16(t, static_cast<const uint16_t*>(x), 0, G, reinterpret_cast<uint8_t*>(tables));
        break;
      case Batch1::kIdx: avx512::build_tables_idx(t, x, p0.x_bf16, 0, G, tables); break;
      default: p0.ops.build_tables(x, p0.x_bf16, p0.K, 1, t.m, 0, G, tables);
    }
    float* acc = ascratch.get(max_run * kTileRows);
    do {
      const size_t j = job_of(item);
      const Problem& p = *jobs[j].p;
      const int64_t tile0 = (item - first[j]) * tiles_per_item[j], tile1 = std::min(p.tiles, tile0 + tiles_per_item[j]);
      std::fill(acc, acc + (tile1 - tile0) * kTileRows, 0.0f);
      for (int64_t c0 = 0; c0 < G; c0 += gc) {
        const int64_t c1 = std::min(G, c0 + gc), blk_a = c0 / p.gpb, blk_b = (c1 - 1) / p.gpb;
        float* sbuf = sscratch.get((blk_b - blk_a + 1) * 2 * kTileRows);
        LookupArgs a;
        a.D = nullptr;
        a.ng = c1 - c0;
        a.tables = tables + c0 * tf;
        a.table_stride = tf;
        a.nb = 1;
        a.nib = t.nib;
        a.scales = sbuf;
        a.g_abs = c0;
        a.blk0 = blk_a;
        a.gpb = p.gpb;
        for (int64_t tile = tile0; tile < tile1; ++tile) {
          prepare_scales(p, tile, blk_a, blk_b, sbuf);
          a.acc = acc + (tile - tile0) * kTileRows;
          // The same groups one tile on; after the item's last tile, the next chunk of its first tile.
          const int64_t next = tile + 1 < tile1 || c1 == G ? (tile + 1) * G + c0 : tile0 * G + c1;
          a.prefetch = next < p.tiles * G ? p.codes + next * bb : nullptr;
          const uint8_t* blocks = p.codes + (tile * G + c0) * bb;
          switch (b1) {
            case Batch1::kIdxBf16: avx512::decode_lookup1_bf16(t, blocks, a); break;
            case Batch1::kIdx: avx512::decode_lookup1_idx(t, blocks, a); break;
            default: avx512::decode_lookup1(t, blocks, a);
          }
        }
      }
      for (int64_t tile = tile0; tile < tile1; ++tile) {
        write_tile(acc + (tile - tile0) * kTileRows, 1, p.out, tile, p.bias, jobs[j].y);
      }
    } while (queue.next(item));
  });
}

// Buffers of the calling thread (the other threads only read and write them during its call).
Scratch<float>& caller_tables() {
  static thread_local Scratch<float> s;
  return s;
}
Scratch<float>& caller_accumulators() {
  static thread_local Scratch<float> s;
  return s;
}

// y[0:nb] = x[0:nb] @ W_hat.T + bias with the lookup-table kernels (nb <= kMaxBatchPerPass).
template <typename T>
void lut_pass(const Problem& p, const void* x, int64_t nb, T* y) {
  if (const Batch1 b1 = batch1_kernel(p, nb); b1 != Batch1::kNone) {
    return batch1_pass(std::vector<Batch1Job<T>>{{&p, y}}, x, b1, p.threads);
  }
  const NMTables& t = *p.t;
  const int64_t K = p.K, G = p.G, max_nb = p.ops.max_nb, tf = p.ops.table_floats(t.m);
  // Tables of each block of max_nb batch rows are contiguous, [b-block][g][row][tf], so one
  // lookup call walks them with a small stride (a stride of nb * 512 bytes thrashes L1 sets).
  const int64_t bblocks = (nb + max_nb - 1) / max_nb, bblock_floats = G * std::min(max_nb, nb) * tf;
  float* tables = caller_tables().get(bblocks * bblock_floats);
  float* yacc = caller_accumulators().get(p.tiles * nb * kTileRows);

  const int64_t tgroups = std::max<int64_t>(16, 131072 / (max_nb * tf)), titems = (G + tgroups - 1) / tgroups;
  parallel_items(bblocks * titems, p.threads, [&](int64_t i) {
    const int64_t bb = i / titems, g0 = i % titems * tgroups, g1 = std::min(G, g0 + tgroups);
    const int64_t offset = bb * max_nb * K * (p.x_bf16 ? 2 : 4);
    p.ops.build_tables(static_cast<const char*>(x) + offset, p.x_bf16, K, std::min(max_nb, nb - bb * max_nb), t.m,
                       g0, g1, tables + bb * bblock_floats);
  });

  // K-chunks whose tables (all nb rows) fit in L2; an item is a few tiles that go through the
  // chunks together, so each chunk's tables serve them all. One synchronisation per pass: on a
  // busy machine every wait for a descheduled thread costs a scheduler time slice.
  const int64_t gc = chunk_groups(G, nb * tf);
  // With all of K in one chunk, an item is a run of consecutive tiles, about two per thread, as in batch1_pass.
  const int64_t tiles_per_item = gc == G ? std::max<int64_t>(1, p.tiles / (2 * p.threads))
                                         : std::max<int64_t>(1, std::min<int64_t>(8, p.tiles / (4 * p.threads)));
  const int64_t items = (p.tiles + tiles_per_item - 1) / tiles_per_item;
  parallel_items(items, p.threads, [&](int64_t item) {
    static thread_local Scratch<uint32_t> dscratch;
    static thread_local Scratch<float> sscratch;
    uint32_t* dbuf = dscratch.get(kGroupsPerDecode * kTileRows);
    const int64_t tile0 = item * tiles_per_item, tile1 = std::min(p.tiles, tile0 + tiles_per_item);
    for (int64_t c0 = 0; c0 < G; c0 += gc) {
      const int64_t c1 = std::min(G, c0 + gc);
      const int64_t blk_a = c0 / p.gpb, blk_b = (c1 - 1) / p.gpb;
      float* sbuf = sscratch.get((blk_b - blk_a + 1) * 2 * kTileRows);
      for (int64_t tile = tile0; tile < tile1; ++tile) {
        float* acc = yacc + tile * nb * kTileRows;
        if (c0 == 0) std::fill(acc, acc + nb * kTileRows, 0.0f);
        prepare_scales(p, tile, blk_a, blk_b, sbuf);
        LookupArgs a;
        a.nib = t.nib;
        a.scales = sbuf;
        a.blk0 = blk_a;
        a.gpb = p.gpb;
        for (int64_t g = c0; g < c1; g += kGroupsPerDecode) {
          const uint8_t* blocks = p.codes + (tile * G + g) * t.block_bytes;
          a.ng = std::min(kGroupsPerDecode, c1 - g);
          a.g_abs = g;
          if (g + a.ng < c1) {
            prefetch(blocks + a.ng * t.block_bytes, std::min(kGroupsPerDecode, c1 - g - a.ng) * t.block_bytes);
          } else if (tile + 1 < p.tiles) {  // most likely the next tile this or another thread takes
            prefetch(p.codes + ((tile + 1) * G + c0) * t.block_bytes,
                     std::min(kGroupsPerDecode, c1 - c0) * t.block_bytes);
          }
          p.ops.decode(t, blocks, a.ng, dbuf);
          a.D = dbuf;
          for (int64_t bb = 0; bb < bblocks; ++bb) {
            const int64_t bbn = std::min(max_nb, nb - bb * max_nb);
            a.tables = tables + bb * bblock_floats + g * bbn * tf;
            a.table_stride = bbn * tf;
            a.nb = static_cast<int>(bbn);
            a.acc = acc + bb * max_nb * kTileRows;
            p.ops.lookup(a);
          }
        }
        if (c1 == G) write_tile(acc, nb, p.out, tile, p.bias, y);
      }
    }
  });
}

// The two values of this tile's kept weights, all blocks: [blk][2][64] = (w+, w-) = (mu + alpha, mu - alpha),
// rounded the way the torch path rounds W_hat for activations of type T: computed in float32 from the
// stored scales, then rounded to T (for bf16, W = bf16(bf16(mu) +- bf16(alpha)), see below).
template <typename T, typename S>
void prepare_weights_t(const S* alpha, const S* mu, int64_t n_blocks, int64_t out, int64_t tile, T* w) {
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    T* wb = w + blk * 2 * kTileRows;
    for (int r = 0; r < kTileRows; ++r) {
      const int64_t row = tile * kTileRows + r;
      float a = 0.0f, u = 0.0f;
      if (row < out) {
        a = static_cast<float>(alpha[row * n_blocks + blk]);
        u = static_cast<float>(mu[row * n_blocks + blk]);
      }
      if constexpr (std::is_same_v<T, float>) {
        wb[r] = u + a;
        wb[kTileRows + r] = u - a;
      } else {  // bf16 bits, from scales rounded to bf16 first
        a = static_cast<float>(static_cast<at::BFloat16>(a));
        u = static_cast<float>(static_cast<at::BFloat16>(u));
        wb[r] = static_cast<at::BFloat16>(u + a).x;
        wb[kTileRows + r] = static_cast<at::BFloat16>(u - a).x;
      }
    }
  }
}

template <typename T>
void prepare_weights(const Problem& p, int64_t tile, T* w) {
  switch (p.scale_type) {
    case at::kBFloat16:
      prepare_weights_t(static_cast<const at::BFloat16*>(p.alpha), static_cast<const at::BFloat16*>(p.mu),
                        p.n_blocks, p.out, tile, w);
      break;
    case at::kHalf:
      prepare_weights_t(static_cast<const at::Half*>(p.alpha), static_cast<const at::Half*>(p.mu), p.n_blocks,
                        p.out, tile, w);
      break;
    default:
      prepare_weights_t(static_cast<const float*>(p.alpha), static_cast<const float*>(p.mu), p.n_blocks, p.out,
                        tile, w);
  }
}

// Prefill: expand W_hat (T = uint16_t: bf16 bits, or float), up to 64 MB of rows at a time, and let the
// BLAS (oneDNN) multiply, exactly as the torch path does with the whole W_hat.
template <typename T>
void blas_pass(const Problem& p, const at::Tensor& x2d, const at::Tensor& bias, at::Tensor& y2d) {
  static thread_local Scratch<T> wscratch;
  const NMTables& t = *p.t;
  const int64_t K = p.K, G = p.G;
  const at::ScalarType dtype = std::is_same_v<T, float> ? at::kFloat : at::kBFloat16;
  const auto expand = std::is_same_v<T, float> ? p.ops.expand_f32 : p.ops.expand_bf16;
  // Few large chunks: each GEMM is an OpenMP region, whose closing barrier costs a scheduler time
  // slice whenever one of its threads has been descheduled (a shared machine). The buffer is kept
  // for the next call (page-faulting tens of MB in again would cost more than the expansion).
  const int64_t tiles_per_chunk = std::max<int64_t>(1, kExpandBytes / (kTileRows * K * sizeof(T)));
  T* wbuf = wscratch.get(std::min(tiles_per_chunk, p.tiles) * kTileRows * K);
  for (int64_t t0 = 0; t0 < p.tiles; t0 += tiles_per_chunk) {
    const int64_t t1 = std::min(p.tiles, t0 + tiles_per_chunk);
    const int64_t row0 = t0 * kTileRows, rows = std::min(p.out, t1 * kTileRows) - row0;
    parallel_items(t1 - t0, p.threads, [&](int64_t i) {
      static thread_local Scratch<uint32_t> dscratch;
      static thread_local Scratch<T> sscratch;
      const int64_t tile = t0 + i;
      uint32_t* dbuf = dscratch.get(kGroupsPerExpand * kTileRows);
      T* w = sscratch.get(p.n_blocks * 2 * kTileRows);
      prepare_weights(p, tile, w);
      for (int64_t g = 0; g < G; g += kGroupsPerExpand) {
        ExpandArgs a;
        a.D = dbuf;
        a.ng = std::min(kGroupsPerExpand, G - g);
        a.m = t.m;
        a.w = w;
        a.g_abs = g;
        a.blk0 = 0;
        a.gpb = p.gpb;
        a.out = wbuf + i * kTileRows * K + g * t.m;
        a.ld = K;
        a.rows = static_cast<int>(std::min<int64_t>(kTileRows, p.out - tile * kTileRows));
        p.ops.decode(t, p.codes + (tile * G + g) * t.block_bytes, a.ng, dbuf);
        expand(a);
      }
    });
    const at::Tensor wc = at::from_blob(wbuf, {rows, K}, at::TensorOptions().dtype(dtype));
    const at::Tensor yc = bias.defined() ? at::linear(x2d, wc, bias.narrow(0, row0, rows)) : at::linear(x2d, wc);
    y2d.narrow(1, row0, rows).copy_(yc);
  }
}

// Prefill with bf16 activations through the pair kernels (see pair_kernels.cpp), per block of up to 128 batch rows.
// An item is a run of up to 16 halves of row tiles (32 rows each), as long as an even share of the threads allows
// (one-tile items left one of 2 threads with 5 of 9 tiles); it goes through the columns 32 units (256 columns) at a
// time: per tile it lays the kept weights out in pairs (up to 32 KB, stays in L1) and runs every batch row of the
// block through them. A tile's sums stay in float32 until the end.
// The activations of each unit are read from x with a broadcast, or, for weights of at least 1024 rows and at most
// 4096 columns, spread once per block beforehand (pair_activations: 4x the bytes of x, read by every item) and
// read with plain loads. Measured at batch 128, 2 threads, alternating with dense bf16, spread / broadcast:
// 4096 x 4096 1.07x / 1.01x dense, 1536 x 576 1.07x / 1.00x, 4096 x 11008 0.98x / 1.03x, 576 x 1536 0.88x / 1.24x,
// 192 x 576 (SmolLM2's k and v projections) 0.67x / 1.28x.
constexpr int64_t kPairUnitsPerChunk = 32, kPairHalvesPerItem = 16, kPairBatch = 128;
constexpr int64_t kPairSpreadRows = 1024, kPairSpreadColumns = 4096;
// Below about 20 us of work (4 M multiply-adds) a product of the pair kernels stays on the calling thread.
constexpr int64_t kPairParallelWork = 1 << 22;

Scratch<uint16_t>& caller_pair_activations() {
  static thread_local Scratch<uint16_t> s;
  return s;
}

// Batch from which bf16 activations take the pair kernels where they apply (pair_kernels_apply); PBS2P_PAIR_MIN_BATCH
// overrides it (tests, tuning). Measured on Zen 5, 2 threads, calls alternating in one process: against the lookup
// tables 0.73-0.88x at 2 rows, 0.84-1.10x at 4, 1.14-1.27x at 6, 1.27-1.36x at 8 (4096 x 4096, 1536 x 576,
// 576 x 1536, 4:8).
int64_t pair_min_batch() {
  if (const char* env = std::getenv("PBS2P_PAIR_MIN_BATCH")) return std::atoll(env);
  return 6;
}

bool pair_kernels_run(int isa) {
  static const bool bf16_dot = __builtin_cpu_supports("avx512bf16");
  return isa == kAvx512 && bf16_dot;
}

int64_t current_pair_min_batch() { return pair_kernels_run(current_isa().load()) ? pair_min_batch() : INT64_MAX; }

// Whether the pair kernels can run this product: the AVX-512 kernels on a CPU with bf16 dot products, at most 4 kept
// weights per 8 columns, each 8 columns in one scale block.
bool pair_kernels_apply(const Problem& p) {
  const NMTables& t = *p.t;
  return pair_kernels_run(p.isa) && t.m <= 8 && t.n * 8 / t.m <= 4 && p.K % 8 == 0 && p.gpb * t.m % 8 == 0;
}

enum class Path { kTables, kPairs, kBlas };

Path choose_path(const Problem& p, bool bf16, int64_t B) {
  if (bf16 && B >= pair_min_batch() && pair_kernels_apply(p)) return Path::kPairs;
  return B >= blas_min_batch(p.isa, bf16) ? Path::kBlas : Path::kTables;
}

void pair_pass(const Problem& p, const uint16_t* x, int64_t B, uint16_t* y) {
  const NMTables& t = *p.t;
  const int64_t units = p.K / 8, gpu = 8 / t.m, wfloats = p.n_blocks * 2 * kTileRows;
  const int threads = p.out * p.K * B >= kPairParallelWork && !at::in_parallel_region() ? at::get_num_threads() : 1;
  // Items: runs of 32-row halves of tiles, up to 16 (8 tiles), in rounds of one item per thread.
  const int64_t halves = (p.out + 31) / 32;
  const int64_t rounds = (halves + threads * kPairHalvesPerItem - 1) / (threads * kPairHalvesPerItem);
  const int64_t per_item = (halves + threads * rounds - 1) / (threads * rounds);
  const int64_t items = (halves + per_item - 1) / per_item;
  const bool spread = p.out >= kPairSpreadRows && p.K <= kPairSpreadColumns;
  uint16_t* xe = spread ? caller_pair_activations().get(std::min(B, kPairBatch) * units * 32) : nullptr;
  for (int64_t b0 = 0; b0 < B; b0 += kPairBatch) {
    const int64_t nb = std::min(kPairBatch, B - b0), rows_per_item = (nb + 2 * threads - 1) / (2 * threads);
    if (spread) {
      parallel_items((nb + rows_per_item - 1) / rows_per_item, threads, [&](int64_t i) {
        const int64_t r0 = i * rows_per_item, r1 = std::min(nb, r0 + rows_per_item);
        avx512::pair_activations(x + (b0 + r0) * p.K, p.K, r1 - r0, units, xe + r0 * units * 32);
      });
    }
    parallel_items(items, threads, [&](int64_t item) {
      static thread_local Scratch<uint16_t> wscratch;
      static thread_local Scratch<uint8_t> pscratch;
      static thread_local Scratch<float> ascratch;
      const int64_t h0 = item * per_item, h1 = std::min(halves, h0 + per_item);
      const int64_t tile0 = h0 / 2, tiles = (h1 + 1) / 2 - tile0;
      // the row blocks of tile i of the item: all 4, but the first tile may start and the last end half-way
      const auto rb0 = [&](int64_t i) { return i == 0 ? static_cast<int>(h0 % 2) * 2 : 0; };
      const auto rb1 = [&](int64_t i) { return i == tiles - 1 && h1 % 2 ? 2 : kTileRows / 16; };
      uint16_t* w = wscratch.get(tiles * wfloats);
      uint8_t* pw = pscratch.get(kTileRows / 16 * kPairUnitsPerChunk * kPairUnitBytes);
      float* acc = ascratch.get(tiles * nb * kTileRows);
      for (int64_t i = 0; i < tiles; ++i) prepare_weights(p, tile0 + i, w + i * wfloats);
      std::fill(acc, acc + tiles * nb * kTileRows, 0.0f);
      for (int64_t u0 = 0; u0 < units; u0 += kPairUnitsPerChunk) {
        const int64_t nu = std::min(kPairUnitsPerChunk, units - u0), g0 = u0 * gpu;
        for (int64_t i = 0; i < tiles; ++i) {
          PairWeightsArgs wa;
          wa.blocks = p.codes + ((tile0 + i) * p.G + g0) * t.block_bytes;
          wa.ng = nu * gpu;
          wa.w = w + i * wfloats;
          wa.g_abs = g0;
          wa.gpb = p.gpb;
          wa.out = pw;
          wa.units_stride = nu;
          wa.rb0 = rb0(i);
          wa.rb1 = rb1(i);
          avx512::pair_weights(t, wa);
          PairGemmArgs ga;
          ga.xe = spread ? xe + u0 * 32 : x + b0 * p.K + u0 * 8;
          ga.spread = spread;
          ga.ldx = spread ? units * 32 : p.K;
          ga.nb = nb;
          ga.w = pw;
          ga.units = nu;
          ga.rb0 = rb0(i);
          ga.rb1 = rb1(i);
          ga.acc = acc + i * nb * kTileRows;
          avx512::pair_gemm(ga);
        }
      }
      for (int64_t i = 0; i < tiles; ++i) {
        const int64_t row0 = (tile0 + i) * kTileRows + rb0(i) * 16;
        const int rows = static_cast<int>(std::min<int64_t>((rb1(i) - rb0(i)) * 16, p.out - row0));
        avx512::pair_write(acc + i * nb * kTileRows + rb0(i) * 16, nb, p.bias ? p.bias + row0 : nullptr, rows,
                           y + b0 * p.out + row0, p.out);
      }
    });
  }
}

// Whether no element is NaN or Inf (exponent bits all ones), on the bits: a loop the compiler vectorizes.
template <typename Bits, Bits kExponent>
bool all_finite_bits(const void* data, int64_t n) {
  const Bits* p = static_cast<const Bits*>(data);
  Bits bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= static_cast<Bits>((p[i] & kExponent) == kExponent);
  return bad == 0;
}

bool all_finite(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat ? all_finite_bits<uint32_t, 0x7f800000u>(t.const_data_ptr(), t.numel())
                                       : all_finite_bits<uint16_t, 0x7f80u>(t.const_data_ptr(), t.numel());
}

// The NaN/Inf rule of every path (pbs2p.kernels.ops.propagate_nonfinite): a row of x holding NaN or Inf gives
// NaN in all its outputs, a weight row whose alpha or mu is NaN or Inf gives NaN in its output column. A
// non-finite scale always reaches its column's outputs (Inf * 0 is NaN), so when x and y are all finite there is
// nothing to do: the usual case costs one pass over x and y; the full rule runs otherwise.
void apply_nonfinite_rule(const at::Tensor& x, const at::Tensor& alpha, const at::Tensor& mu, at::Tensor& y) {
  if (all_finite(x) && all_finite(y)) return;
  const at::Tensor x2d = x.reshape({-1, x.size(-1)}), y2d = y.view({-1, y.size(-1)});
  const at::Tensor rows = at::isfinite(x2d).all(-1, /*keepdim=*/true);
  const at::Tensor columns = at::logical_and(at::isfinite(alpha).all(-1), at::isfinite(mu).all(-1));
  y2d.copy_(at::where(at::logical_and(rows, columns), y2d, std::numeric_limits<float>::quiet_NaN()));
}

// The path a product of `batch` rows of float32 or bfloat16 activations on an N:M weight takes on this CPU and ISA:
// "tables", "pairs" or "blas" (benchmarks print it; tests check which path they test).
std::string native_path(bool bf16, int64_t batch, int64_t n, int64_t m, int64_t in_features, int64_t scale_block) {
  TORCH_CHECK((m == 4 || m == 8 || m == 16) && 1 <= n && n < m && in_features % m == 0 && scale_block >= 1,
              "pbs2p::_native_path: unsupported N:M, in_features or scale_block");
  Problem p{};
  p.t = &nm_tables(static_cast<int>(n), static_cast<int>(m));
  p.isa = current_isa().load();
  p.K = in_features;
  p.G = in_features / m;
  p.gpb = scale_block >= in_features ? p.G : scale_block / m;
  switch (choose_path(p, bf16, batch)) {
    case Path::kPairs: return "pairs";
    case Path::kBlas: return "blas";
    default: return "tables";
  }
}

// One product's checked inputs: its Problem (threads not set), the tensors its pointers point into, its output y.
struct Product {
  Problem p;
  at::Tensor codes, alpha, mu, bias;
  at::Tensor y;
};

// Checks x, codes, alpha, mu, bias of one product and fills the Product (y allocated, not written).
void prepare(Product& q, const at::Tensor& x, const at::Tensor& codes, const at::Tensor& alpha, const at::Tensor& mu,
             const std::optional<at::Tensor>& bias, int64_t n, int64_t m, int64_t scale_block) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "pbs2p::bsp_linear: x must be float32 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "pbs2p::bsp_linear: x must have at least one dimension");
  TORCH_CHECK((m == 4 || m == 8 || m == 16) && 1 <= n && n < m, "pbs2p::bsp_linear: unsupported N:M = ", n,
              ":", m);
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 3,
              "pbs2p::bsp_linear: codes must be uint8 [tiles, G, bytes]");
  TORCH_CHECK(alpha.dim() == 2 && mu.sizes() == alpha.sizes(),
              "pbs2p::bsp_linear: alpha and mu must be [out, n_blocks]");
  TORCH_CHECK(at::isFloatingType(alpha.scalar_type()) && at::isFloatingType(mu.scalar_type()),
              "pbs2p::bsp_linear: alpha and mu must be floating point");
  TORCH_CHECK(scale_block >= 1, "pbs2p::bsp_linear: scale_block must be positive");
  for (const at::Tensor* t : {&codes, &alpha, &mu}) {
    TORCH_CHECK(t->device().is_cpu(), "pbs2p::bsp_linear: all tensors must be on the CPU");
  }
  const NMTables& t = nm_tables(static_cast<int>(n), static_cast<int>(m));
  const int64_t K = x.size(-1), out = alpha.size(0), tiles = codes.size(0);
  TORCH_CHECK(K % m == 0, "pbs2p::bsp_linear: in_features ", K, " is not a multiple of M = ", m);
  const int64_t G = K / m, n_blocks = (K + scale_block - 1) / scale_block;
  TORCH_CHECK(codes.size(1) == G && codes.size(2) == t.block_bytes && tiles == (out + kTileRows - 1) / kTileRows,
              "pbs2p::bsp_linear: codes of shape ", codes.sizes(), " do not hold ", out, " x ", K, " ", n, ":", m,
              " blocks");
  TORCH_CHECK(alpha.size(1) == n_blocks, "pbs2p::bsp_linear: alpha has ", alpha.size(1), " blocks, ", n_blocks,
              " expected for scale_block ", scale_block);
  TORCH_CHECK(n_blocks <= 1 || scale_block % m == 0,
              "pbs2p::bsp_linear: scale_block must be a multiple of M (or >= in_features)");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == out && bias->device().is_cpu(),
                "pbs2p::bsp_linear: bias must be a CPU vector of ", out, " elements");
    q.bias = bias->to(at::kFloat).contiguous();
  }
  std::vector<int64_t> out_shape = x.sizes().vec();
  out_shape.back() = out;
  q.y = at::empty(out_shape, x.options());
  q.codes = codes.contiguous();
  q.alpha = alpha.contiguous();
  q.mu = mu.contiguous();
  if (q.alpha.scalar_type() != q.mu.scalar_type() ||
      !(q.alpha.scalar_type() == at::kFloat || q.alpha.scalar_type() == at::kBFloat16 ||
        q.alpha.scalar_type() == at::kHalf)) {
    q.alpha = q.alpha.to(at::kFloat);
    q.mu = q.mu.to(at::kFloat);
  }
  Problem& p = q.p;
  p = Problem{};
  p.t = &t;
  p.isa = current_isa().load();
  p.ops = isa_ops(p.isa);
  p.K = K;
  p.G = G;
  p.out = out;
  p.tiles = tiles;
  p.n_blocks = n_blocks;
  p.gpb = n_blocks <= 1 ? G : scale_block / m;
  p.codes = q.codes.data_ptr<uint8_t>();
  p.scale_type = q.alpha.scalar_type();
  p.alpha = q.alpha.data_ptr();
  p.mu = q.mu.data_ptr();
  p.bias = q.bias.defined() ? q.bias.data_ptr<float>() : nullptr;
  p.x_bf16 = x.scalar_type() == at::kBFloat16;
}

// The work of a product of B rows.
int64_t product_work(const Problem& p, int64_t B) {
  return p.tiles * kTileRows * p.G * (std::min(B, kMaxBatchPerPass) + 4);
}

// Threads for `work` (one thread below kParallelWork, or kParallelWorkBatch1 on the batch1_pass kernels).
int threads_for(int64_t work, bool batch1) {
  const int64_t from = batch1 ? kParallelWorkBatch1 : kParallelWork;
  return work >= from && !at::in_parallel_region() ? at::get_num_threads() : 1;
}

// The product q of x (checked by prepare) on the path choose_path gives.
void run(Product& q, const at::Tensor& x) {
  Problem& p = q.p;
  at::Tensor& y = q.y;
  if (y.numel() == 0) return;
  const int64_t B = y.numel() / p.out;
  if (p.G == 0) {
    y.zero_();
    if (q.bias.defined()) y.add_(q.bias.to(y.scalar_type()));
    return;
  }
  p.threads = threads_for(product_work(p, B), batch1_kernel(p, B) != Batch1::kNone);
  const Path path = choose_path(p, p.x_bf16, B);
  if (path != Path::kTables) {
    at::Tensor y2d = y.view({B, p.out});
    const at::Tensor x2d = x.reshape({B, p.K}).contiguous();
    const at::Tensor bias_x = q.bias.defined() ? q.bias.to(x.scalar_type()) : at::Tensor();
    if (path == Path::kPairs) {
      // the bias rounded to bf16 first, as at::linear takes it on the BLAS path
      const at::Tensor bias_r = q.bias.defined() ? bias_x.to(at::kFloat).contiguous() : at::Tensor();
      p.bias = q.bias.defined() ? bias_r.const_data_ptr<float>() : nullptr;
      pair_pass(p, static_cast<const uint16_t*>(x2d.const_data_ptr()), B,
                reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()));
    } else if (x.scalar_type() == at::kFloat) {
      blas_pass<float>(p, x2d, bias_x, y2d);
    } else {
      blas_pass<uint16_t>(p, x2d, bias_x, y2d);
    }
    apply_nonfinite_rule(x2d, q.alpha, q.mu, y2d);
    return;
  }
  // x itself when contiguous: no reshaped view (a tensor object per call, hundreds per decoded token)
  const at::Tensor xc = x.contiguous();
  const int64_t row_bytes = p.K * static_cast<int64_t>(xc.element_size());
  for (int64_t b0 = 0; b0 < B; b0 += kMaxBatchPerPass) {
    const int64_t nb = std::min(kMaxBatchPerPass, B - b0);
    const char* xp = static_cast<const char*>(xc.data_ptr()) + b0 * row_bytes;
    if (y.scalar_type() == at::kFloat) {
      lut_pass(p, xp, nb, y.data_ptr<float>() + b0 * p.out);
    } else {
      lut_pass(p, xp, nb, y.data_ptr<at::BFloat16>() + b0 * p.out);
    }
  }
  apply_nonfinite_rule(xc, q.alpha, q.mu, y);
}

at::Tensor bsp_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& alpha,
                          const at::Tensor& mu, const std::optional<at::Tensor>& bias, int64_t n, int64_t m,
                          int64_t scale_block) {
  Product q;
  prepare(q, x, codes, alpha, mu, bias, n, m, scale_block);
  run(q, x);
  return q.y;
}

// [bsp_linear(x, codes[i], alpha[i], mu[i], None, n, m, scale_block) for each i], equal to them bit for bit. One
// batch row on the batch1_pass kernels takes one pass for all (the tables built once, one parallel region); other
// products run one after the other.
std::vector<at::Tensor> bsp_linear_multi_cpu(const at::Tensor& x, at::TensorList codes, at::TensorList alpha,
                                             at::TensorList mu, int64_t n, int64_t m, int64_t scale_block) {
  TORCH_CHECK(!codes.empty() && alpha.size() == codes.size() && mu.size() == codes.size(),
              "pbs2p::bsp_linear_multi: codes, alpha and mu must be lists of the same positive length, got ",
              codes.size(), ", ", alpha.size(), ", ", mu.size());
  std::vector<Product> qs(codes.size());
  for (size_t i = 0; i < qs.size(); ++i) prepare(qs[i], x, codes[i], alpha[i], mu[i], std::nullopt, n, m, scale_block);
  std::vector<at::Tensor> ys;
  ys.reserve(qs.size());
  const Problem& p0 = qs[0].p;
  const int64_t B = p0.out > 0 ? qs[0].y.numel() / p0.out : 0;
  const Batch1 b1 = B == 1 && p0.G > 0 ? batch1_kernel(p0, 1) : Batch1::kNone;
  bool fused = b1 != Batch1::kNone;
  int64_t work = 0;
  for (const Product& q : qs) {
    fused = fused && q.p.out > 0 && choose_path(q.p, q.p.x_bf16, 1) == Path::kTables;
    work += product_work(q.p, 1);
  }
  if (!fused) {
    for (Product& q : qs) {
      run(q, x);
      ys.push_back(q.y);
    }
    return ys;
  }
  const at::Tensor xc = x.contiguous();
  const int threads = threads_for(work, true);
  if (x.scalar_type() == at::kFloat) {
    std::vector<Batch1Job<float>> jobs;
    for (Product& q : qs) jobs.push_back({&q.p, q.y.data_ptr<float>()});
    batch1_pass(jobs, xc.const_data_ptr(), b1, threads);
  } else {
    std::vector<Batch1Job<at::BFloat16>> jobs;
    for (Product& q : qs) jobs.push_back({&q.p, q.y.data_ptr<at::BFloat16>()});
    batch1_pass(jobs, xc.const_data_ptr(), b1, threads);
  }
  for (Product& q : qs) {
    apply_nonfinite_rule(xc, q.alpha, q.mu, q.y);
    ys.push_back(q.y);
  }
  return ys;
}

}  // namespace
}  // namespace pbs2p

TORCH_LIBRARY_FRAGMENT(pbs2p, lib) {
  lib.def("bsp_linear(Tensor x, Tensor codes, Tensor alpha, Tensor mu, Tensor? bias, int n, int m, int scale_block) -> Tensor");
  lib.def("bsp_linear_multi(Tensor x, Tensor[] codes, Tensor[] alpha, Tensor[] mu, int n, int m, int scale_block) -> Tensor[]");
  lib.def("_kernel_isa() -> str", &pbs2p::kernel_isa);
  lib.def("_set_kernel_isa(str isa) -> str", &pbs2p::set_kernel_isa);
  lib.def("_supported_kernel_isas() -> str[]", &pbs2p::supported_kernel_isas);
  lib.def("_blas_min_batch(bool bf16) -> int", &pbs2p::current_blas_min_batch);
  lib.def("_pair_min_batch() -> int", &pbs2p::current_pair_min_batch);
  lib.def("_native_path(bool bf16, int batch, int n, int m, int in_features, int scale_block) -> str",
          &pbs2p::native_path);
}

TORCH_LIBRARY_IMPL(pbs2p, CPU, lib) {
  lib.impl("bsp_linear", &pbs2p::bsp_linear_cpu);
  lib.impl("bsp_linear_multi", &pbs2p::bsp_linear_multi_cpu);
}
