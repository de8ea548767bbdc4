// Shared declarations of the packed N:M kernels (format v1, see pbs2p/kernels/packing.py).
//
// Only plain data and function declarations live here: the ISA translation units compile
// with `#pragma GCC target`, and an inline function instantiated there could be merged by
// the linker into code that runs on CPUs without that ISA.
#pragma once

#include <cstdint>

namespace pbs2p {

constexpr int kTileRows = 64;

// Decode tables of one N:M pattern, built once per (n, m) in nm_tables.cpp.
//
// The kernels turn the fields of a group into one dword per row, D = S | P << 16, where S is
// the bitmask of kept columns and P the bitmask of kept columns with sign +1 (P = pdep(s, S)).
struct NMTables {
  int n, m, nib;                 // nib = m / 4 nibbles per group
  int ncomb, idx_bits;           // C(m, n), ceil(log2 C(m, n))
  int idx_bytes, block_bytes;    // 8 * idx_bits, 8 * (idx_bits + n)
  int joint_bits;                // m <= 8: idx_bits + n, the width of the joint code idx << n | s

  uint32_t joint[1 << 12];       // m <= 8: joint code -> D
  uint16_t masks[12870];         // idx -> S (all m; 12870 = C(16, 8))

  // AVX-512 VBMI decode of 64 rows at once (m = 4, 8).
  alignas(64) uint8_t gather_idx[64];   // vpermb: qword q <- bytes [q * idx_bits, +8) of the idx area
  alignas(64) uint8_t gather_sgn[64];   // vpermb: qword q <- bytes [q * n, +8) of the sign area
  alignas(64) uint8_t shift_idx[64];    // vpmultishiftqb controls: byte k of qword <- field k
  alignas(64) uint8_t shift_slo[64];    //   signs, low bits first
  alignas(64) uint8_t shift_shi[64];    //   m = 8: the top min(n, 4) sign bits
  alignas(64) uint8_t dexp[4][64];      // vpermt2b: bytes (S, P) of 16 rows -> dwords S | P << 16
  alignas(64) uint8_t ts[128];          // m = 8: idx -> S
  alignas(64) uint8_t t1[256];          // m = 8: S_lo << 4 | s_lo -> P_lo
  alignas(64) uint8_t t2[256];          // m = 8: S_hi << 4 | s_hi -> P_hi << 4
  alignas(64) uint8_t t2x[256];         // m = 8: S_hi << 4 | s_hi -> 16 + P_hi (the idx kernels)
  alignas(64) uint8_t ts_lo4[128];      // m = 8: idx -> S_lo << 4
  alignas(64) uint8_t ts_hi4[128];      // m = 8: idx -> S_hi << 4
  alignas(64) uint8_t pair_pos[4][128]; // 2 * column of the k-th kept weight (0 past the last): m = 8 of idx, m = 4 of S
  alignas(64) uint8_t js[64];           // m = 4: joint code -> S
  alignas(64) uint8_t jp[64];           // m = 4: joint code -> P
  uint64_t idx_load_mask, sgn_load_mask;
  uint8_t jmask;                        // m = 4: bits of idx << n in the joint code
};

const NMTables& nm_tables(int n, int m);

// Portable decode of `ng` consecutive (tile, group) blocks into D[ng][64].
void decode_generic(const NMTables& t, const uint8_t* blocks, int64_t ng, uint32_t* D);

// One call of the lookup stage: adds the contributions of `ng` decoded groups of one row tile
// to the outputs of `nb` batch rows.
struct LookupArgs {
  const uint32_t* D;      // [ng][64] decoded rows
  int64_t ng;
  const float* tables;    // activation tables of (group 0 of D, batch row 0 of this call)
  int64_t table_stride;   // floats from one group's tables to the next (nb * table_floats)
  int nb, nib;
  const float* scales;    // this tile's blocks from blk0 on: [blk][2][64] = (mu - alpha, 2 alpha)
  int64_t g_abs;          // absolute group index of D[0]
  int64_t blk0, gpb;      // first block held in `scales`; groups per scale block
  float* acc;             // [nb][64] running outputs of the tile (in/out)
  // avx512::decode_lookup1*: codes read later, prefetched one group per decoded group (group g's block at
  // prefetch + g * block_bytes); null: none.
  const uint8_t* prefetch = nullptr;
};

// One call of the expansion (the prefill path): writes the dense W_hat of `ng` decoded groups of one
// row tile, W_hat = S ? (P ? w+ : w-) : 0 per weight, as bf16 (bits) or float32 elements.
struct ExpandArgs {
  const uint32_t* D;      // [ng][64] decoded rows
  int64_t ng;
  int m;
  const void* w;          // this tile's blocks from blk0 on, as the output's elements: [blk][2][64] = (w+, w-)
  int64_t g_abs;          // absolute group index of D[0]
  int64_t blk0, gpb;
  void* out;              // element (row 0, column g_abs * m) of the tile
  int64_t ld;             // elements from one row to the next
  int rows;               // rows to write (<= 64)
};

void expand_bf16_generic(const ExpandArgs& a);
void expand_f32_generic(const ExpandArgs& a);

// One call of the int8 row product (the compact embedding / LM head, int8_rows.cpp): for the `nb`
// float32 activation rows x[b] (K each, `ldx` floats apart) and rows [r0, r1) of the int8 matrix q
// (K per row), y[b * ldy + r] = scale[r] * sum_c q[r, c] x[b, c], summed in float32.
struct Int8RowsArgs {
  const int8_t* q;
  const float* scale;
  const float* x;
  int64_t K, ldx, nb, r0, r1, ldy;
  float* y;
};

// The pair kernels (pair_kernels.cpp, AVX-512 with VBMI and AVX512_BF16): bf16 prefill for patterns that keep
// at most 4 of every 8 columns. A unit (8 columns) of 16 rows is two slots of a vpshufb control and 16 bf16 weight
// pairs: kPairUnitBytes bytes.
constexpr int kPairUnitBytes = 2 * 128;

// pair_weights: the units of `ng` groups of one row tile (codes `blocks`) into `out`, laid out
// [row block of 16 (stride units_stride units)][unit][slot][control, weights].
struct PairWeightsArgs {
  const uint8_t* blocks;  // codes of the ng groups; ng * m a multiple of 8
  int64_t ng;
  const uint16_t* w;      // bf16 bits of this tile's (w+, w-), every block: [blk][2][64]
  int64_t g_abs;          // absolute group index of the first group (a unit's 8 columns lie in one scale block)
  int64_t gpb;
  uint8_t* out;
  int64_t units_stride;   // units per row block in `out`
  int rb0, rb1;           // the row blocks to lay out: [0, 4) (the tile) or [0, 2), [2, 4) (half of it)
};

// pair_activations: xe[b][u] = the 8 bf16 activations x[b, 8 u : 8 u + 8], repeated in each 128-bit lane (64
// bytes), for the `nb` batch rows of x (`ldx` elements apart, from the first unit's column) and `units` units.
// pair_gemm: acc[b][r] += sum over the `units` units of x[b] . W_hat[r] for the `nb` batch rows and the 64 rows of
// one tile, from pair_activations and pair_weights (units_stride = units).
struct PairGemmArgs {
  const uint16_t* xe;     // spread: pair_activations of the first unit ([nb][units][32]); else x at its first column
  bool spread;
  int64_t ldx, nb;        // elements from one batch row of xe to the next; batch rows
  const uint8_t* w;
  int64_t units;
  int rb0, rb1;           // the row blocks to multiply, as in PairWeightsArgs
  float* acc;             // [nb][64]
};

// The ISA the operators run with (pbs2p::_set_kernel_isa): 0 scalar, 1 AVX2, 2 AVX-512.
int active_isa();

// Every ISA provides the same functions; the driver (bsp_linear.cpp) picks one set.
//   table_floats: floats of the tables of one (group, batch row)
//   build_tables: the tables, from float32 or bfloat16 (bits, when x_bf16) activations: the 16
//                 subset sums of every 4 activations, tables[g][b][t][i] = sum_{bit j of i} x[b, g m + 4 t + j]
//   decode:       blocks -> D
//   lookup:       D + tables -> acc
//   expand_bf16:  D -> bf16 W_hat rows
//   expand_f32:   D -> float32 W_hat rows
//   int8_rows:    the int8 row product (Int8RowsArgs)
#define PBS2P_DECLARE_ISA(ns)                                                                 \
  namespace ns {                                                                              \
  extern const int kMaxNb;                                                                    \
  int table_floats(int m);                                                                    \
  void build_tables(const void* x, bool x_bf16, int64_t ldx, int64_t B, int m, int64_t g0,   \
                    int64_t g1, float* tables);                                               \
  void decode(const NMTables& t, const uint8_t* blocks, int64_t ng, uint32_t* D);            \
  void lookup(const LookupArgs& a);                                                           \
  void expand_bf16(const ExpandArgs& a);                                                      \
  void expand_f32(const ExpandArgs& a);                                                       \
  void int8_rows(const Int8RowsArgs& a);                                                      \
  }

PBS2P_DECLARE_ISA(scalar)
PBS2P_DECLARE_ISA(avx2)
PBS2P_DECLARE_ISA(avx512)

#undef PBS2P_DECLARE_ISA

namespace avx512 {
// decode + lookup for one batch row (m = 4), without the D buffer.
void decode_lookup1(const NMTables& t, const uint8_t* blocks, const LookupArgs& a);
// Floats of `tables` per group of the idx kernels below (see kernels_avx512.cpp): 640 and 384 bytes.
constexpr int kIdxTableFloats = 160, kIdxBf16TableFloats = 96;
// One batch row, m = 8, float32 tables.
void build_tables_idx(const NMTables& t, const void* x, bool x_bf16, int64_t g0, int64_t g1, float* tables);
void decode_lookup1_idx(const NMTables& t, const uint8_t* blocks, const LookupArgs& a);
// One batch row of bfloat16 activations, m = 8, on CPUs with AVX512_BF16: bf16 tables.
void build_tables_bf16(const NMTables& t, const uint16_t* x, int64_t g0, int64_t g1, uint8_t* tables);
void decode_lookup1_bf16(const NMTables& t, const uint8_t* blocks, const LookupArgs& a);
// The pair kernels (see PairWeightsArgs).
void pair_weights(const NMTables& t, const PairWeightsArgs& a);
void pair_activations(const uint16_t* x, int64_t ldx, int64_t nb, int64_t units, uint16_t* xe);
void pair_gemm(const PairGemmArgs& a);
// y[b][r] = bf16(acc[b][r] + bias[r]) for r < rows (bias may be null; y rows `ldy` elements apart).
void pair_write(const float* acc, int64_t nb, const float* bias, int rows, uint16_t* y, int64_t ldy);
}

}  // namespace pbs2p
