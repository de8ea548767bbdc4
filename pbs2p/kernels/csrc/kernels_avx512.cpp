// AVX-512 kernels (F, BW, VL, DQ, VBMI): called only after a run-time CPU check.
//
// Decode: the 64 rows of one group at once. vpermb + vpmultishiftqb extract the idx and sign
// fields into bytes, vpermi2b turns idx into S, two 256-entry byte tables give
// P = pdep(signs, S) one nibble at a time, and vpermt2b spreads (S, P) into dwords D.
// Lookup: vpermps indexes the 16-entry fp32 subset-sum table of each nibble of activations
// with a nibble of D, for 16 rows per instruction.
#include <immintrin.h>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx2,fma,bmi,bmi2,popcnt")

#include "decode_avx512.h"

namespace pbs2p::avx512 {

const int kMaxNb = 8;

int table_floats(int m) { return m / 4 * 16; }

// Activation i of a float32 or bfloat16 (bits) array, as float (internal linkage: see kernels.h).
static inline float activation(const void* x, bool x_bf16, int64_t i) {
  if (!x_bf16) return static_cast<const float*>(x)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(x)[i]) << 16;
  float v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

// What the table builders share: bit[j][i] = bit j of i (0.0 or 1.0), and for every idx byte (m = 8) the low and
// high nibble of its kept set.
struct SumConsts {
  __m512 bit[4];
  alignas(64) int32_t lo_of[128], hi_of[128];
};

static inline void sum_consts(const NMTables* t, SumConsts& c) {
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int j = 0; j < 4; ++j) {
    c.bit[j] = _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(lane, j), _mm512_set1_epi32(1)));
  }
  if (t == nullptr) return;
  for (int v = 0; v < 128; ++v) {
    c.lo_of[v] = t->ts[v] & 15;
    c.hi_of[v] = t->ts[v] >> 4;
  }
}

// The 16 subset sums of activations xi .. xi + 3: sum_{bit j of i} x[xi + j] at i.
static inline __m512 subset_sums(const SumConsts& c, const void* x, bool x_bf16, int64_t xi) {
  __m512 v = _mm512_mul_ps(_mm512_set1_ps(activation(x, x_bf16, xi)), c.bit[0]);
  for (int j = 1; j < 4; ++j) v = _mm512_fmadd_ps(_mm512_set1_ps(activation(x, x_bf16, xi + j)), c.bit[j], v);
  return v;
}

// The kept sums of idx 16 q .. 16 q + 15 of a group of 8 whose halves' subset sums are v[0], v[1].
static inline __m512 kept_sums(const SumConsts& c, const __m512 v[2], int q) {
  return _mm512_add_ps(_mm512_permutexvar_ps(_mm512_load_si512(c.lo_of + 16 * q), v[0]),
                       _mm512_permutexvar_ps(_mm512_load_si512(c.hi_of + 16 * q), v[1]));
}

void build_tables(const void* x, bool x_bf16, int64_t ldx, int64_t B, int m, int64_t g0, int64_t g1,
                  float* tables) {
  const int nib = m / 4;
  SumConsts c;
  sum_consts(nullptr, c);
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t xi = b * ldx + g * m;
      float* tb = tables + (g * B + b) * nib * 16;
      for (int t = 0; t < nib; ++t) _mm512_storeu_ps(tb + 16 * t, subset_sums(c, x, x_bf16, xi + 4 * t));
    }
  }
}

template <int M>
static void decode_m(const NMTables& t, const uint8_t* blocks, int64_t ng, uint32_t* D) {
  const Dec c = load_dec(t);
  for (int64_t g = 0; g < ng; ++g) {
    __m512i S, P;
    decode_block<M>(c, blocks + g * c.bb, S, P);
    uint32_t* d = D + g * kTileRows;
    for (int i = 0; i < 4; ++i) _mm512_store_si512(d + 16 * i, _mm512_permutex2var_epi8(S, c.dx[i], P));
  }
}

void decode(const NMTables& t, const uint8_t* blocks, int64_t ng, uint32_t* D) {
  if (t.m == 8) {
    decode_m<8>(t, blocks, ng, D);
  } else if (t.m == 4) {
    decode_m<4>(t, blocks, ng, D);
  } else {
    decode_generic(t, blocks, ng, D);
  }
}

// Sum over the nibbles of S (or P, shift 16) of table[nibble t][that nibble of d].
template <int NIB>
static inline __m512 nibble_sum(__m512i d, int shift, const float* tj) {
  __m512 r = _mm512_permutexvar_ps(shift ? _mm512_srli_epi32(d, shift) : d, _mm512_loadu_ps(tj));
  if (NIB >= 2) {
    r = _mm512_add_ps(r, _mm512_permutexvar_ps(_mm512_srli_epi32(d, shift + 4), _mm512_loadu_ps(tj + 16)));
  }
  if (NIB == 4) {
    const __m512 r2 = _mm512_add_ps(
        _mm512_permutexvar_ps(_mm512_srli_epi32(d, shift + 8), _mm512_loadu_ps(tj + 32)),
        _mm512_permutexvar_ps(_mm512_srli_epi32(d, shift + 12), _mm512_loadu_ps(tj + 48)));
    r = _mm512_add_ps(r, r2);
  }
  return r;
}

template <int NB, int NIB>
static void lookup_nb(const LookupArgs& a) {
  for (int c = 0; c < 4; ++c) {
    for (int64_t g = 0; g < a.ng;) {
      const int64_t blk = (a.g_abs + g) / a.gpb;
      int64_t gend = (blk + 1) * a.gpb - a.g_abs;
      if (gend > a.ng) gend = a.ng;
      __m512 accs[NB], accp[NB];
      for (int j = 0; j < NB; ++j) accs[j] = accp[j] = _mm512_setzero_ps();
      for (; g < gend; ++g) {
        const __m512i d = _mm512_load_si512(a.D + g * kTileRows + 16 * c);
        const float* tg = a.tables + g * a.table_stride;
        for (int j = 0; j < NB; ++j) {
          accs[j] = _mm512_add_ps(accs[j], nibble_sum<NIB>(d, 0, tg + j * NIB * 16));
          accp[j] = _mm512_add_ps(accp[j], nibble_sum<NIB>(d, 16, tg + j * NIB * 16));
        }
      }
      const float* sc = a.scales + (blk - a.blk0) * 2 * kTileRows + 16 * c;
      const __m512 as = _mm512_loadu_ps(sc), ap = _mm512_loadu_ps(sc + kTileRows);
      for (int j = 0; j < NB; ++j) {
        float* o = a.acc + j * kTileRows + 16 * c;
        _mm512_storeu_ps(o, _mm512_fmadd_ps(accs[j], as, _mm512_fmadd_ps(accp[j], ap, _mm512_loadu_ps(o))));
      }
    }
  }
}

// Group g's block of the codes at a.prefetch (LookupArgs): one line, two for blocks over 64 bytes (every line
// of the blocks is then prefetched: blocks of m = 4 and m = 8, the callers' patterns, are at most 88 bytes).
static inline void prefetch_group(const LookupArgs& a, int64_t g, int bb) {
  if (a.prefetch == nullptr) return;
  const char* q = reinterpret_cast<const char*>(a.prefetch + g * bb);
  _mm_prefetch(q, _MM_HINT_T0);
  if (bb > 64) _mm_prefetch(q + 64, _MM_HINT_T0);
}

// Batch 1: decode and look up without storing D (m = 4 and 8; the driver calls it for m = 4, m = 8 takes the idx kernels).
template <int M>
static void decode_lookup1_m(const NMTables& t, const uint8_t* blocks, const LookupArgs& a) {
  const Dec c = load_dec(t);
  for (int64_t g = 0; g < a.ng;) {
    const int64_t blk = (a.g_abs + g) / a.gpb;
    int64_t gend = (blk + 1) * a.gpb - a.g_abs;
    if (gend > a.ng) gend = a.ng;
    __m512 accs[4], accp[4];
    for (int i = 0; i < 4; ++i) accs[i] = accp[i] = _mm512_setzero_ps();
    for (; g < gend; ++g) {
      __m512i S, P;
      prefetch_group(a, g, c.bb);
      decode_block<M>(c, blocks + g * c.bb, S, P);
      const float* tg = a.tables + g * a.table_stride;
      for (int i = 0; i < 4; ++i) {
        const __m512i d = _mm512_permutex2var_epi8(S, c.dx[i], P);
        accs[i] = _mm512_add_ps(accs[i], nibble_sum<M / 4>(d, 0, tg));
        accp[i] = _mm512_add_ps(accp[i], nibble_sum<M / 4>(d, 16, tg));
      }
    }
    const float* sc = a.scales + (blk - a.blk0) * 2 * kTileRows;
    for (int i = 0; i < 4; ++i) {
      float* o = a.acc + 16 * i;
      const __m512 as = _mm512_loadu_ps(sc + 16 * i), ap = _mm512_loadu_ps(sc + kTileRows + 16 * i);
      _mm512_storeu_ps(o, _mm512_fmadd_ps(accs[i], as, _mm512_fmadd_ps(accp[i], ap, _mm512_loadu_ps(o))));
    }
  }
}

void decode_lookup1(const NMTables& t, const uint8_t* blocks, const LookupArgs& a) { decode_lookup1_m<4>(t, blocks, a); }

// Batch 1, float32 tables, m = 8: each group's kept sum read by idx. Per group (640 bytes, see build_tables_idx):
// the kept sum of every idx (128 float32 values, idx has up to 7 bits) as four planes of 128 bytes, byte j of every
// value in plane j, each read by one vpermi2b with idx; then the 16 subset sums of each half for the positive sum,
// read by vpermps as in the other kernels. Unpacking the four bytes of 64 rows gives the kept sums of 16 rows per
// vector in lane order (slot 16 k + 4 L + i holds row 16 L + 4 k + i), put back in row order per scale block.
// Every sum is the one the other float32 kernels compute (the two half sums added in float32).
void build_tables_idx(const NMTables& t, const void* x, bool x_bf16, int64_t g0, int64_t g1, float* tables) {
  alignas(64) uint8_t planes[64];  // byte j of value i to 16 j + i
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 4; ++j) planes[16 * j + i] = static_cast<uint8_t>(4 * i + j);
  }
  const __m512i ctl = _mm512_load_si512(planes);
  SumConsts c;
  sum_consts(&t, c);
  for (int64_t g = g0; g < g1; ++g) {
    const __m512 v[2] = {subset_sums(c, x, x_bf16, g * 8), subset_sums(c, x, x_bf16, g * 8 + 4)};
    float* tg = tables + g * kIdxTableFloats;
    __m512 b[8];  // kept sums of idx 16 q .. 16 q + 15 as [byte 0 x 16 | byte 1 x 16 | byte 2 x 16 | byte 3 x 16]
    for (int q = 0; q < 8; ++q) {
      b[q] = _mm512_castsi512_ps(_mm512_permutexvar_epi8(ctl, _mm512_castps_si512(kept_sums(c, v, q))));
    }
    for (int h = 0; h < 2; ++h) {  // plane j, idx 64 h .. 64 h + 63: chunk j of b[4 h .. 4 h + 3]
      __m512* q = b + 4 * h;
      const __m512 t0 = _mm512_shuffle_f32x4(q[0], q[1], 0x44), t1 = _mm512_shuffle_f32x4(q[0], q[1], 0xEE);
      const __m512 t2 = _mm512_shuffle_f32x4(q[2], q[3], 0x44), t3 = _mm512_shuffle_f32x4(q[2], q[3], 0xEE);
      _mm512_storeu_ps(tg + 0 * 32 + 16 * h, _mm512_shuffle_f32x4(t0, t2, 0x88));
      _mm512_storeu_ps(tg + 1 * 32 + 16 * h, _mm512_shuffle_f32x4(t0, t2, 0xDD));
      _mm512_storeu_ps(tg + 2 * 32 + 16 * h, _mm512_shuffle_f32x4(t1, t3, 0x88));
      _mm512_storeu_ps(tg + 3 * 32 + 16 * h, _mm512_shuffle_f32x4(t1, t3, 0xDD));
    }
    _mm512_storeu_ps(tg + 128, v[0]);
    _mm512_storeu_ps(tg + 144, v[1]);
  }
}

// Lane order to row order: v[k] holds rows 16 L + 4 k + i at 4 L + i; afterwards v[q] holds rows 16 q + j at j (a
// transpose of 4 x 4 blocks of 128 bits).
static inline void to_row_order(__m512 v[4]) {
  const __m512 t0 = _mm512_shuffle_f32x4(v[0], v[1], 0x44), t1 = _mm512_shuffle_f32x4(v[0], v[1], 0xEE);
  const __m512 t2 = _mm512_shuffle_f32x4(v[2], v[3], 0x44), t3 = _mm512_shuffle_f32x4(v[2], v[3], 0xEE);
  v[0] = _mm512_shuffle_f32x4(t0, t2, 0x88);
  v[1] = _mm512_shuffle_f32x4(t0, t2, 0xDD);
  v[2] = _mm512_shuffle_f32x4(t1, t3, 0x88);
  v[3] = _mm512_shuffle_f32x4(t1, t3, 0xDD);
}

// acc[r] += (mu - alpha)[r] * sums[r] + 2 alpha[r] * pos[r] for the 64 rows of one scale block (all in row order;
// sc = the block's [2][64] scales).
static inline void add_scaled(const float* sc, const __m512 sums[4], const __m512 pos[4], float* acc) {
  for (int k = 0; k < 4; ++k) {
    const __m512 as = _mm512_loadu_ps(sc + 16 * k), ap = _mm512_loadu_ps(sc + kTileRows + 16 * k);
    _mm512_storeu_ps(acc + 16 * k, _mm512_fmadd_ps(sums[k], as, _mm512_fmadd_ps(pos[k], ap, _mm512_loadu_ps(acc + 16 * k))));
  }
}

// Decode constants of the idx kernels: the shared ones, idx -> S_lo << 4 / S_hi << 4, and t2x.
struct IdxDec {
  Dec c;
  __m512i sl[2], sh[2], t2[4];
};

static inline IdxDec load_idx_dec(const NMTables& t) {
  IdxDec d;
  d.c = load_dec(t);
  for (int h = 0; h < 2; ++h) {
    d.sl[h] = _mm512_load_si512(t.ts_lo4 + 64 * h);
    d.sh[h] = _mm512_load_si512(t.ts_hi4 + 64 * h);
  }
  for (int i = 0; i < 4; ++i) d.t2[i] = _mm512_load_si512(t.t2x + 64 * i);
  return d;
}

// P's low nibble (from t1) or a byte whose low nibble is P's high nibble (from t2x), one byte per row.
static inline __m512i positive_half(__m512i i, const __m512i t[4]) {
  return _mm512_mask_blend_epi8(_mm512_movepi8_mask(i), _mm512_permutex2var_epi8(t[0], i, t[1]),
                                _mm512_permutex2var_epi8(t[2], i, t[3]));
}

// One block for the idx kernels: idx, P's low nibble (plo) and 16 + P's high nibble (phi), one byte per row.
template <bool N4>
static inline void decode_idx(const IdxDec& d, const uint8_t* b, __m512i& idx, __m512i& plo, __m512i& phi) {
  const Dec& c = d.c;
  // 4:8: 56 idx bytes then 32 sign bytes, so plain loads stay inside the block
  const __m512i ia = N4 ? _mm512_loadu_si512(b) : _mm512_maskz_loadu_epi8(c.lmi, b);
  const __m512i sa = N4 ? _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + c.ib)))
                        : _mm512_maskz_loadu_epi8(c.lms, b + c.ib);
  idx = _mm512_multishift_epi64_epi8(c.shi, _mm512_permutexvar_epi8(c.gi, ia));
  const __m512i sq = _mm512_permutexvar_epi8(c.gs, sa);
  // 0xE4: (a & c) | (b & ~c): high nibble from a (S_lo << 4 or S_hi << 4), low nibble from b (signs).
  const __m512i i1 = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(d.sl[0], idx, d.sl[1]),
                                               _mm512_multishift_epi64_epi8(c.shlo, sq), c.f0, 0xE4);
  const __m512i i2 = _mm512_ternarylogic_epi32(_mm512_permutex2var_epi8(d.sh[0], idx, d.sh[1]),
                                               _mm512_multishift_epi64_epi8(c.shhi, sq), c.f0, 0xE4);
  plo = positive_half(i1, c.t1);
  phi = positive_half(i2, d.t2);
}

template <bool N4>
static void decode_lookup1_idx_n(const NMTables& t, const uint8_t* blocks, const LookupArgs& a) {
  const IdxDec d = load_idx_dec(t);
  const Dec& c = d.c;
  for (int64_t g = 0; g < a.ng;) {
    const int64_t blk = (a.g_abs + g) / a.gpb;
    int64_t gend = (blk + 1) * a.gpb - a.g_abs;
    if (gend > a.ng) gend = a.ng;
    __m512 sums[4], pos[4];  // kept sums in lane order, positive sums in row order
    for (int k = 0; k < 4; ++k) sums[k] = pos[k] = _mm512_setzero_ps();
    for (; g < gend; ++g) {
      __m512i idx, plo, phi;
      prefetch_group(a, g, c.bb);
      decode_idx<N4>(d, blocks + g * c.bb, idx, plo, phi);
      const float* tg = a.tables + g * a.table_stride;
      __m512i bytes[4];
      for (int j = 0; j < 4; ++j) {
        bytes[j] = _mm512_permutex2var_epi8(_mm512_loadu_si512(tg + 32 * j), idx, _mm512_loadu_si512(tg + 32 * j + 16));
      }
      const __m512i w01[2] = {_mm512_unpacklo_epi8(bytes[0], bytes[1]), _mm512_unpackhi_epi8(bytes[0], bytes[1])};
      const __m512i w23[2] = {_mm512_unpacklo_epi8(bytes[2], bytes[3]), _mm512_unpackhi_epi8(bytes[2], bytes[3])};
      for (int h = 0; h < 2; ++h) {
        sums[2 * h] = _mm512_add_ps(sums[2 * h], _mm512_castsi512_ps(_mm512_unpacklo_epi16(w01[h], w23[h])));
        sums[2 * h + 1] = _mm512_add_ps(sums[2 * h + 1], _mm512_castsi512_ps(_mm512_unpackhi_epi16(w01[h], w23[h])));
      }
      const __m512 tlo = _mm512_loadu_ps(tg + 128), thi = _mm512_loadu_ps(tg + 144);
      for (int k = 0; k < 4; ++k) {
        const __m512i d = _mm512_permutex2var_epi8(plo, c.dx[k], phi);  // P_lo in bits 0-3, P_hi in bits 16-19
        pos[k] = _mm512_add_ps(pos[k], _mm512_add_ps(_mm512_permutexvar_ps(d, tlo),
                                                     _mm512_permutexvar_ps(_mm512_srli_epi32(d, 16), thi)));
      }
    }
    to_row_order(sums);
    add_scaled(a.scales + (blk - a.blk0) * 2 * kTileRows, sums, pos, a.acc);
  }
}

void decode_lookup1_idx(const NMTables& t, const uint8_t* blocks, const LookupArgs& a) {
  if (t.n == 4) {
    decode_lookup1_idx_n<true>(t, blocks, a);
  } else {
    decode_lookup1_idx_n<false>(t, blocks, a);
  }
}

// Batch 1, bfloat16 activations, m = 8 (CPUs with AVX512_BF16): tables of bf16 values, looked up a byte at a time,
// summed by vdpbf16ps. Per group of 8 activations (384 bytes, see build_tables_bf16):
//   * the kept sum of every idx: bf16(sum over the kept columns of idx), 128 entries (idx has up to 7 bits) as a
//     plane of low bytes and a plane of high bytes, each read by one vpermi2b with idx itself;
//   * the 32 subset sums of the two halves, [t][i] = bf16(sum_{bit j of i} x[8 g + 4 t + j]), for the positive
//     sum: their low bytes then their high bytes, and again with the halves swapped, so that vpermb with the
//     same index reads the low byte from the first 64 bytes and the high byte from the second.
// Every value is a float32 sum rounded once. Decode gives, per row, idx and the two index bytes of P (its low
// nibble, 16 + its high nibble); unpacking the two planes (or the P pair) byte by byte makes bf16 words (pairs of
// words for P), and vdpbf16ps times (1, 0) / (0, 1) (times (1, 1) for P's two halves) adds them to float32 sums.
// The unpacks leave rows in two interleaved orders; each scale block's sums are put back in row order before its
// scales apply. About 45 vector instructions per group of 64 rows against about 100 for the float32 tables.
#pragma GCC push_options
#pragma GCC target("avx512bf16")

void build_tables_bf16(const NMTables& t, const uint16_t* x, int64_t g0, int64_t g1, uint8_t* tables) {
  alignas(64) uint8_t split[64];  // bytes 2 i (low) to i, 2 i + 1 (high) to 32 + i
  for (int i = 0; i < 32; ++i) {
    split[i] = static_cast<uint8_t>(2 * i);
    split[32 + i] = static_cast<uint8_t>(2 * i + 1);
  }
  const __m512i ctl = _mm512_load_si512(split);
  SumConsts c;
  sum_consts(&t, c);
  for (int64_t g = g0; g < g1; ++g) {
    const __m512 v[2] = {subset_sums(c, x, true, g * 8), subset_sums(c, x, true, g * 8 + 4)};
    uint8_t* tg = tables + g * kIdxBf16TableFloats * 4;
    __m512i b[4];  // kept sums of idx 32 q .. 32 q + 31: 32 low bytes, 32 high bytes
    for (int q = 0; q < 4; ++q) {
      const __m512bh words = _mm512_cvtne2ps_pbh(kept_sums(c, v, 2 * q + 1), kept_sums(c, v, 2 * q));
      b[q] = _mm512_permutexvar_epi8(ctl, reinterpret_cast<__m512i>(words));
    }
    _mm512_storeu_si512(tg, _mm512_shuffle_i64x2(b[0], b[1], 0x44));
    _mm512_storeu_si512(tg + 64, _mm512_shuffle_i64x2(b[2], b[3], 0x44));
    _mm512_storeu_si512(tg + 128, _mm512_shuffle_i64x2(b[0], b[1], 0xEE));
    _mm512_storeu_si512(tg + 192, _mm512_shuffle_i64x2(b[2], b[3], 0xEE));
    const __m512i halves = _mm512_permutexvar_epi8(ctl, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(v[1], v[0])));
    _mm512_storeu_si512(tg + 256, halves);
    _mm512_storeu_si512(tg + 320, _mm512_shuffle_i64x2(halves, halves, 0x4E));
  }
}

template <bool N4>
static void decode_lookup1_bf16_n(const NMTables& t, const uint8_t* blocks, const LookupArgs& a) {
  const IdxDec d = load_idx_dec(t);
  const Dec& c = d.c;
  const __m512bh one = reinterpret_cast<__m512bh>(_mm512_set1_epi16(0x3F80));
  const __m512bh even = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x3F80));
  const __m512bh odd = reinterpret_cast<__m512bh>(_mm512_set1_epi32(0x3F800000));
  const uint8_t* tables = reinterpret_cast<const uint8_t*>(a.tables);
  const int64_t stride = a.table_stride * 4;  // bytes
  for (int64_t g = 0; g < a.ng;) {
    const int64_t blk = (a.g_abs + g) / a.gpb;
    int64_t gend = (blk + 1) * a.gpb - a.g_abs;
    if (gend > a.ng) gend = a.ng;
    // kept sums of rows 16 L + 2 i (e0), 16 L + 2 i + 1 (o0), 16 L + 8 + 2 i (e1), 16 L + 9 + 2 i (o1) at 4 L + i;
    // positive sums in lane order
    __m512 e0 = _mm512_setzero_ps(), o0 = e0, e1 = e0, o1 = e0, p0 = e0, p1 = e0, p2 = e0, p3 = e0;
    for (; g < gend; ++g) {
      __m512i idx, Plo, Phi;
      prefetch_group(a, g, c.bb);
      decode_idx<N4>(d, blocks + g * c.bb, idx, Plo, Phi);
      const uint8_t* tg = tables + g * stride;
      const __m512i lo = _mm512_permutex2var_epi8(_mm512_loadu_si512(tg), idx, _mm512_loadu_si512(tg + 64));
      const __m512i hi = _mm512_permutex2var_epi8(_mm512_loadu_si512(tg + 128), idx, _mm512_loadu_si512(tg + 192));
      const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_unpacklo_epi8(lo, hi));
      const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_unpackhi_epi8(lo, hi));
      e0 = _mm512_dpbf16_ps(e0, w0, even);
      o0 = _mm512_dpbf16_ps(o0, w0, odd);
      e1 = _mm512_dpbf16_ps(e1, w1, even);
      o1 = _mm512_dpbf16_ps(o1, w1, odd);
      const __m512i tl = _mm512_loadu_si512(tg + 256), th = _mm512_loadu_si512(tg + 320);
      const auto halves = [&](__m512i pair, __m512& first, __m512& second) {
        const __m512i l = _mm512_permutexvar_epi8(pair, tl), h = _mm512_permutexvar_epi8(pair, th);
        first = _mm512_dpbf16_ps(first, reinterpret_cast<__m512bh>(_mm512_unpacklo_epi8(l, h)), one);
        second = _mm512_dpbf16_ps(second, reinterpret_cast<__m512bh>(_mm512_unpackhi_epi8(l, h)), one);
      };
      halves(_mm512_unpacklo_epi8(Plo, Phi), p0, p1);
      halves(_mm512_unpackhi_epi8(Plo, Phi), p2, p3);
    }
    __m512 sums[4] = {_mm512_unpacklo_ps(e0, o0), _mm512_unpackhi_ps(e0, o0), _mm512_unpacklo_ps(e1, o1),
                      _mm512_unpackhi_ps(e1, o1)};
    __m512 pos[4] = {p0, p1, p2, p3};
    to_row_order(sums);
    to_row_order(pos);
    add_scaled(a.scales + (blk - a.blk0) * 2 * kTileRows, sums, pos, a.acc);
  }
}

void decode_lookup1_bf16(const NMTables& t, const uint8_t* blocks, const LookupArgs& a) {
  if (t.n == 4) {
    decode_lookup1_bf16_n<true>(t, blocks, a);
  } else {
    decode_lookup1_bf16_n<false>(t, blocks, a);
  }
}

#pragma GCC pop_options

// One batch row: all 4 chunks of 16 rows per group, the group's tables held in registers.
template <int NIB>
static void lookup_one(const LookupArgs& a) {
  for (int64_t g = 0; g < a.ng;) {
    const int64_t blk = (a.g_abs + g) / a.gpb;
    int64_t gend = (blk + 1) * a.gpb - a.g_abs;
    if (gend > a.ng) gend = a.ng;
    __m512 accs[4], accp[4];
    for (int c = 0; c < 4; ++c) accs[c] = accp[c] = _mm512_setzero_ps();
    for (; g < gend; ++g) {
      const float* tg = a.tables + g * a.table_stride;
      __m512 tab[NIB];
      for (int t = 0; t < NIB; ++t) tab[t] = _mm512_loadu_ps(tg + 16 * t);
      for (int c = 0; c < 4; ++c) {
        const __m512i d = _mm512_load_si512(a.D + g * kTileRows + 16 * c);
        __m512 s = _mm512_permutexvar_ps(d, tab[0]);
        __m512 p = _mm512_permutexvar_ps(_mm512_srli_epi32(d, 16), tab[0]);
        for (int t = 1; t < NIB; ++t) {
          s = _mm512_add_ps(s, _mm512_permutexvar_ps(_mm512_srli_epi32(d, 4 * t), tab[t]));
          p = _mm512_add_ps(p, _mm512_permutexvar_ps(_mm512_srli_epi32(d, 16 + 4 * t), tab[t]));
        }
        accs[c] = _mm512_add_ps(accs[c], s);
        accp[c] = _mm512_add_ps(accp[c], p);
      }
    }
    const float* sc = a.scales + (blk - a.blk0) * 2 * kTileRows;
    for (int c = 0; c < 4; ++c) {
      float* o = a.acc + 16 * c;
      const __m512 as = _mm512_loadu_ps(sc + 16 * c), ap = _mm512_loadu_ps(sc + kTileRows + 16 * c);
      _mm512_storeu_ps(o, _mm512_fmadd_ps(accs[c], as, _mm512_fmadd_ps(accp[c], ap, _mm512_loadu_ps(o))));
    }
  }
}

template <int NIB>
static void lookup_nib(const LookupArgs& a) {
  switch (a.nb) {
    case 1: lookup_one<NIB>(a); break;
    case 2: lookup_nb<2, NIB>(a); break;
    case 3: lookup_nb<3, NIB>(a); break;
    case 4: lookup_nb<4, NIB>(a); break;
    case 5: lookup_nb<5, NIB>(a); break;
    case 6: lookup_nb<6, NIB>(a); break;
    case 7: lookup_nb<7, NIB>(a); break;
    default: lookup_nb<8, NIB>(a); break;
  }
}

void lookup(const LookupArgs& a) {
  if (a.nib == 1) {
    lookup_nib<1>(a);
  } else if (a.nib == 2) {
    lookup_nib<2>(a);
  } else {
    lookup_nib<4>(a);
  }
}

// Every row's kept / positive bits of 32 columns (32 / M groups) as two dwords, for 16 rows.
template <int M>
static inline void row_masks(const uint32_t* d, __m512i& S, __m512i& P) {
  S = _mm512_setzero_si512();
  P = _mm512_setzero_si512();
  for (int j = 0; j < 32 / M; ++j) {
    const __m512i v = _mm512_load_si512(d + j * kTileRows);
    const __m512i field = _mm512_set1_epi32(static_cast<int>(((1ull << M) - 1) << (M * j)));
    const __m512i ps = M * j >= 16 ? _mm512_slli_epi32(v, M * j - 16) : _mm512_srli_epi32(v, 16 - M * j);
    S = _mm512_ternarylogic_epi32(S, _mm512_slli_epi32(v, M * j), field, 0xF8);  // S | (v' & field)
    P = _mm512_ternarylogic_epi32(P, ps, field, 0xF8);
  }
}

// 32 columns per store: every row's 32-bit masks of kept and positive weights select w+ / w- / 0.
template <int M>
static void expand_m(const ExpandArgs& a) {
  constexpr int kGroups = 32 / M;
  const int64_t units = a.ng / kGroups;
  alignas(64) uint32_t sm[16 * kTileRows], pm[16 * kTileRows];  // 16 units at a time
  for (int64_t u0 = 0; u0 < units; u0 += 16) {
    const int64_t nu = units - u0 < 16 ? units - u0 : 16;
    for (int64_t u = 0; u < nu; ++u) {
      for (int c = 0; c < 4; ++c) {
        __m512i S, P;
        row_masks<M>(a.D + (u0 + u) * kGroups * kTileRows + 16 * c, S, P);
        _mm512_store_si512(sm + u * 64 + 16 * c, S);
        _mm512_store_si512(pm + u * 64 + 16 * c, P);
      }
    }
    for (int r = 0; r < a.rows; ++r) {
      uint16_t* o = static_cast<uint16_t*>(a.out) + r * a.ld + u0 * 32;
      for (int64_t u = 0; u < nu; ++u) {
        const int64_t g = a.g_abs + (u0 + u) * kGroups;
        const uint16_t* w = static_cast<const uint16_t*>(a.w) + (g / a.gpb - a.blk0) * 2 * kTileRows;
        const __m512i v = _mm512_mask_blend_epi16(static_cast<__mmask32>(pm[u * 64 + r]),
                                                  _mm512_set1_epi16(static_cast<short>(w[kTileRows + r])),
                                                  _mm512_set1_epi16(static_cast<short>(w[r])));
        _mm512_storeu_si512(o + 32 * u, _mm512_maskz_mov_epi16(static_cast<__mmask32>(sm[u * 64 + r]), v));
      }
    }
  }
  if (units * kGroups < a.ng) {
    ExpandArgs rest = a;
    rest.D = a.D + units * kGroups * kTileRows;
    rest.ng = a.ng - units * kGroups;
    rest.g_abs = a.g_abs + units * kGroups;
    rest.out = static_cast<uint16_t*>(a.out) + units * 32;
    expand_bf16_generic(rest);
  }
}

void expand_bf16(const ExpandArgs& a) {
  // A unit of 32 columns must lie in one scale block.
  if (a.gpb % (32 / a.m) != 0 && a.gpb < a.g_abs + a.ng) {
    expand_bf16_generic(a);
  } else if (a.m == 8) {
    expand_m<8>(a);
  } else if (a.m == 4) {
    expand_m<4>(a);
  } else {
    expand_m<16>(a);
  }
}

// float32 W_hat: the AVX2 expansion.
void expand_f32(const ExpandArgs& a) { avx2::expand_f32(a); }

// R rows at a time (R independent sums, enough to keep both FMA pipes busy), 16 columns per step:
// sign-extend 16 int8 weights to int32, convert to float32, fused multiply-add with the activations;
// the last columns under a mask.
static inline __m512 widen16(const int8_t* p, __mmask16 k) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(k, p)));
}

template <int R>
static inline void int8_rows_block(const Int8RowsArgs& a, int64_t r) {
  const int64_t K = a.K, K16 = K / 16 * 16;
  const __mmask16 tail = static_cast<__mmask16>((1u << (K - K16)) - 1u);
  const int8_t* w = a.q + r * K;
  for (int64_t b = 0; b < a.nb; ++b) {
    const float* x = a.x + b * a.ldx;
    __m512 s[R];
    for (int i = 0; i < R; ++i) s[i] = _mm512_setzero_ps();
    for (int64_t c = 0; c < K16; c += 16) {
      const __m512 xv = _mm512_loadu_ps(x + c);
      for (int i = 0; i < R; ++i) s[i] = _mm512_fmadd_ps(widen16(w + i * K + c, 0xFFFF), xv, s[i]);
    }
    if (tail) {
      const __m512 xv = _mm512_maskz_loadu_ps(tail, x + K16);
      for (int i = 0; i < R; ++i) s[i] = _mm512_fmadd_ps(widen16(w + i * K + K16, tail), xv, s[i]);
    }
    float* y = a.y + b * a.ldy + r;
    for (int i = 0; i < R; ++i) y[i] = _mm512_reduce_add_ps(s[i]) * a.scale[r + i];
  }
}

// The rows of the next block but one are prefetched (non-temporal hint): the matrix (the LM head, 28 MB for
// SmolLM2) is read once per decoded token, from memory. Measured on Zen 5, 2 threads: 49,152 x 576 in 0.56-0.69
// ms instead of 0.72-0.78 (warm caches); compiled SmolLM2 decode steps 0.7-1.1 ms faster (medians, one process).
void int8_rows(const Int8RowsArgs& a) {
  constexpr int64_t kAhead = 16;
  int64_t r = a.r0;
  for (; r + 8 <= a.r1; r += 8) {
    if (r + 8 + kAhead <= a.r1) {
      const char* next = reinterpret_cast<const char*>(a.q + (r + kAhead) * a.K);
      for (int64_t off = 0; off < 8 * a.K; off += 64) _mm_prefetch(next + off, _MM_HINT_NTA);
    }
    int8_rows_block<8>(a, r);
  }
  for (; r < a.r1; ++r) int8_rows_block<1>(a, r);
}

}  // namespace pbs2p::avx512

#pragma GCC pop_options
