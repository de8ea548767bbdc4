// The pair kernels: prefill with bfloat16 activations on CPUs with AVX512_BF16, for patterns that keep at most
// 4 weights of every 8 columns (N:8 with N <= 4, N:4 with N <= 2). Called only after a run-time CPU check.
//
// A dense bf16 GEMM spends half of its dot products on zeros. Here the kept weights of a unit (8 columns) of a row
// go in pairs (two slots per row); a slot of 16 rows is a vpshufb control, which picks each row's two activations
// out of the unit's 8 activations of one batch row (repeated in every 128-bit lane), and the 16 rows' bf16 weight
// pairs. One vdpbf16ps then adds both products to the 16 rows' float32 sums: two shuffles and two dot products per
// unit, 16 rows and batch row, where dense takes four dot products.
//
//   pair_weights:     codes of one row tile -> [row block of 16][unit][slot][control, weights]
//   pair_activations: x -> each unit's 8 activations in every 128-bit lane (one load in the loop, no broadcast)
//   pair_gemm:        acc[b][64] += x[b] . W_hat rows of the tile over the units, for every batch row b
//   pair_write:       acc + bias -> bf16 outputs
#include <immintrin.h>

#include <algorithm>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,avx2,fma,bmi,bmi2,popcnt")

#include "decode_avx512.h"

namespace pbs2p::avx512 {

namespace {

// 16 rows' bf16 weight pairs (dwords): the kept weights `first` and `first + 1` of each row, w+ where their sign
// bit in `signs` is set and w- where not, 0 where the row keeps fewer than `kept` weights.
inline __m512i weight_pairs(__m512i signs, int first, int kept, __m512i wp, __m512i wm) {
  const __mmask16 plus0 = _mm512_test_epi32_mask(signs, _mm512_set1_epi32(1 << first));
  const __mmask16 plus1 = _mm512_test_epi32_mask(signs, _mm512_set1_epi32(2 << first));
  const __m512i w0 = _mm512_maskz_mov_epi32(first < kept ? 0xFFFF : 0, _mm512_mask_blend_epi32(plus0, wm, wp));
  const __m512i w1 = _mm512_maskz_mov_epi32(first + 1 < kept ? 0xFFFF : 0, _mm512_mask_blend_epi32(plus1, wm, wp));
  return _mm512_or_si512(w0, _mm512_slli_epi32(w1, 16));
}

// Row block Q of one unit: from pos[k] (2 * column of the k-th kept weight) and signs (bit k: sign of the k-th
// kept weight), one byte per row of the tile, and the tile's (w+, w-) of the unit's scale block `wb`.
template <int Q>
inline void store_row_block(const __m512i pos[4], __m512i signs, int kept, const uint16_t* wb, const NMTables& t,
                            uint8_t* out) {
  const __m512i pattern = _mm512_load_si512(t.dexp[Q]);  // bytes 4r, 4r+1 <- row r of a; 4r+2, 4r+3 <- row r of b
  const __m512i odd = _mm512_set1_epi32(0x01000100);     // + 1: the second byte of each bf16 activation
  const __m512i wp = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + Q * 16)));
  const __m512i wm =
      _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + kTileRows + Q * 16)));
  const __m512i sd = _mm512_cvtepu8_epi32(_mm512_extracti32x4_epi32(signs, Q));
  for (int s = 0; s < 2; ++s) {
    const __m512i ctl = _mm512_or_si512(_mm512_permutex2var_epi8(pos[2 * s], pattern, pos[2 * s + 1]), odd);
    _mm512_storeu_si512(out + s * 128, ctl);
    _mm512_storeu_si512(out + s * 128 + 64, weight_pairs(sd, 2 * s, kept, wp, wm));
  }
}

// Row blocks [rb0, rb0 + 2) of one unit (2 per call; rb0 = 0 or 2).
inline void store_unit(const __m512i pos[4], __m512i signs, int kept, const uint16_t* wb, const NMTables& t,
                       uint8_t* out, int64_t block_bytes, int rb0) {
  if (rb0 == 0) {
    store_row_block<0>(pos, signs, kept, wb, t, out);
    store_row_block<1>(pos, signs, kept, wb, t, out + block_bytes);
  } else {
    store_row_block<2>(pos, signs, kept, wb, t, out + 2 * block_bytes);
    store_row_block<3>(pos, signs, kept, wb, t, out + 3 * block_bytes);
  }
}

}  // namespace

// A unit is one group (m = 8) or two (m = 4). The fields come out of the codes with decode_fields (kept set idx
// and sign bits, one byte per row); the positions of the kept weights are byte-table lookups (pair_pos).
void pair_weights(const NMTables& t, const PairWeightsArgs& a) {
  const Dec c = load_dec(t);
  const int gpu = 8 / t.m, kept = t.n * gpu;
  const int64_t block_bytes = a.units_stride * kPairUnitBytes;
  const __m512i nmask = _mm512_set1_epi8(static_cast<char>((1 << t.n) - 1));
  __m512i tp[4][2];
  for (int k = 0; k < 4; ++k) {
    tp[k][0] = _mm512_load_si512(t.pair_pos[k]);
    tp[k][1] = _mm512_load_si512(t.pair_pos[k] + 64);
  }
  for (int64_t g = 0; g < a.ng; g += gpu) {
    __m512i pos[4], signs;
    if (t.m == 8) {
      __m512i idx, sq;
      decode_fields(c, a.blocks + g * c.bb, idx, sq);
      signs = _mm512_multishift_epi64_epi8(c.shlo, sq);
      for (int k = 0; k < 4; ++k) pos[k] = _mm512_permutex2var_epi8(tp[k][0], idx, tp[k][1]);
    } else {  // m = 4, n <= 2: the first group's n kept weights, then the second's (4 columns on)
      __m512i S[2], s[2];
      for (int h = 0; h < 2; ++h) decode_block4_signs(c, a.blocks + (g + h) * c.bb, S[h], s[h]);
      signs = _mm512_or_si512(_mm512_and_si512(s[0], nmask), _mm512_slli_epi16(_mm512_and_si512(s[1], nmask), t.n));
      const __m512i eight = _mm512_set1_epi8(8);
      for (int k = 0; k < 4; ++k) {
        const int h = std::min(k / t.n, 1), j = k - h * t.n;
        pos[k] = j < t.n ? _mm512_permutexvar_epi8(S[h], tp[j][0]) : _mm512_setzero_si512();
        if (h == 1) pos[k] = _mm512_add_epi8(pos[k], eight);
      }
    }
    const uint16_t* wb = a.w + (a.g_abs + g) / a.gpb * 2 * kTileRows;
    for (int rb0 = a.rb0; rb0 < a.rb1; rb0 += 2) {
      store_unit(pos, signs, kept, wb, t, a.out + g / gpu * kPairUnitBytes, block_bytes, rb0);
    }
  }
}

void pair_activations(const uint16_t* x, int64_t ldx, int64_t nb, int64_t units, uint16_t* xe) {
  for (int64_t b = 0; b < nb; ++b) {
    const uint16_t* xb = x + b * ldx;
    uint16_t* o = xe + b * units * 32;
    for (int64_t u = 0; u < units; ++u) {
      _mm512_storeu_si512(o + u * 32,
                          _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + u * 8))));
    }
  }
}

namespace {

// The activations of unit u of a batch row in every 128-bit lane: from pair_activations (Spread: one load) or from x
// itself (a broadcast, which costs a shuffle-port operation).
template <bool Spread>
inline __m512i unit_activations(const uint16_t* x, int64_t u) {
  if (Spread) return _mm512_loadu_si512(x + u * 32);
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + u * 8)));
}

// Two row blocks (32 rows) and T batch rows: acc[b][0:32] of the row blocks += their products over `units`.
template <int T, bool Spread>
inline void pair_block(const uint16_t* xe, int64_t ldx, const uint8_t* w0, const uint8_t* w1, int64_t units,
                       float* acc) {
  __m512 s0[T], s1[T];
  for (int b = 0; b < T; ++b) {
    s0[b] = _mm512_loadu_ps(acc + b * kTileRows);
    s1[b] = _mm512_loadu_ps(acc + b * kTileRows + 16);
  }
  for (int64_t u = 0; u < units; ++u) {
    const uint8_t* p0 = w0 + u * kPairUnitBytes;
    const uint8_t* p1 = w1 + u * kPairUnitBytes;
    const __m512i c00 = _mm512_loadu_si512(p0), v00 = _mm512_loadu_si512(p0 + 64);
    const __m512i c01 = _mm512_loadu_si512(p0 + 128), v01 = _mm512_loadu_si512(p0 + 192);
    const __m512i c10 = _mm512_loadu_si512(p1), v10 = _mm512_loadu_si512(p1 + 64);
    const __m512i c11 = _mm512_loadu_si512(p1 + 128), v11 = _mm512_loadu_si512(p1 + 192);
#pragma GCC unroll 8
    for (int b = 0; b < T; ++b) {
      const __m512i xb = unit_activations<Spread>(xe + b * ldx, u);
      s0[b] = _mm512_dpbf16_ps(s0[b], (__m512bh)_mm512_shuffle_epi8(xb, c00), (__m512bh)v00);
      s0[b] = _mm512_dpbf16_ps(s0[b], (__m512bh)_mm512_shuffle_epi8(xb, c01), (__m512bh)v01);
      s1[b] = _mm512_dpbf16_ps(s1[b], (__m512bh)_mm512_shuffle_epi8(xb, c10), (__m512bh)v10);
      s1[b] = _mm512_dpbf16_ps(s1[b], (__m512bh)_mm512_shuffle_epi8(xb, c11), (__m512bh)v11);
    }
  }
  for (int b = 0; b < T; ++b) {
    _mm512_storeu_ps(acc + b * kTileRows, s0[b]);
    _mm512_storeu_ps(acc + b * kTileRows + 16, s1[b]);
  }
}

template <int T, bool Spread>
inline void pair_rows(const PairGemmArgs& a, const uint16_t* xe, float* acc) {
  const int64_t block_bytes = a.units * kPairUnitBytes;
  for (int rb = a.rb0; rb < a.rb1; rb += 2) {
    pair_block<T, Spread>(xe, a.ldx, a.w + rb * block_bytes, a.w + (rb + 1) * block_bytes, a.units, acc + rb * 16);
  }
}

template <bool Spread>
void pair_gemm_x(const PairGemmArgs& a) {
  constexpr int kT = 8;  // batch rows per pass: 16 sums, 8 controls and weight pairs in registers
  int64_t b = 0;
  for (; b + kT <= a.nb; b += kT) pair_rows<kT, Spread>(a, a.xe + b * a.ldx, a.acc + b * kTileRows);
  const uint16_t* xe = a.xe + b * a.ldx;
  float* acc = a.acc + b * kTileRows;
  switch (a.nb - b) {
    case 7: pair_rows<7, Spread>(a, xe, acc); break;
    case 6: pair_rows<6, Spread>(a, xe, acc); break;
    case 5: pair_rows<5, Spread>(a, xe, acc); break;
    case 4: pair_rows<4, Spread>(a, xe, acc); break;
    case 3: pair_rows<3, Spread>(a, xe, acc); break;
    case 2: pair_rows<2, Spread>(a, xe, acc); break;
    case 1: pair_rows<1, Spread>(a, xe, acc); break;
    default: break;
  }
}

}  // namespace

void pair_gemm(const PairGemmArgs& a) {
  if (a.spread) {
    pair_gemm_x<true>(a);
  } else {
    pair_gemm_x<false>(a);
  }
}

void pair_write(const float* acc, int64_t nb, const float* bias, int rows, uint16_t* y, int64_t ldy) {
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < rows; r += 16) {
      const __mmask16 k = static_cast<__mmask16>(rows - r >= 16 ? 0xFFFF : (1u << (rows - r)) - 1);
      __m512 v = _mm512_loadu_ps(acc + b * kTileRows + r);
      if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, bias + r));
      _mm256_mask_storeu_epi16(y + b * ldy + r, k, (__m256i)_mm512_cvtneps_pbh(v));
    }
  }
}

}  // namespace pbs2p::avx512

#pragma GCC pop_options
