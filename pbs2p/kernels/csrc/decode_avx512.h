// The AVX-512 VBMI decode of one block (64 rows of one group), shared by the AVX-512 translation units. Include
// it after their `#pragma GCC target` (AVX-512 F, BW, VBMI at least): everything here has internal linkage, so no
// copy compiled for one ISA can stand in for another's.
#pragma once

#include <immintrin.h>

#include "kernels.h"

namespace pbs2p::avx512 {

// Decode constants, loaded once per call.
struct Dec {
  __m512i gi, gs, shi, shlo, shhi, ts0, ts1, t1[4], t2[4], dx[4], f0, js, jp, jm;
  __mmask64 lmi, lms;
  int bb, ib;
};

static inline Dec load_dec(const NMTables& t) {
  Dec c;
  c.gi = _mm512_load_si512(t.gather_idx);
  c.gs = _mm512_load_si512(t.gather_sgn);
  c.shi = _mm512_load_si512(t.shift_idx);
  c.shlo = _mm512_load_si512(t.shift_slo);
  c.shhi = _mm512_load_si512(t.shift_shi);
  c.ts0 = _mm512_load_si512(t.ts);
  c.ts1 = _mm512_load_si512(t.ts + 64);
  for (int i = 0; i < 4; ++i) {
    c.t1[i] = _mm512_load_si512(t.t1 + 64 * i);
    c.t2[i] = _mm512_load_si512(t.t2 + 64 * i);
    c.dx[i] = _mm512_load_si512(t.dexp[i]);
  }
  c.f0 = _mm512_set1_epi8(static_cast<char>(0xF0));
  c.js = _mm512_load_si512(t.js);
  c.jp = _mm512_load_si512(t.jp);
  c.jm = _mm512_set1_epi8(static_cast<char>(t.jmask));
  c.lmi = t.idx_load_mask;
  c.lms = t.sgn_load_mask;
  c.bb = t.block_bytes;
  c.ib = t.idx_bytes;
  return c;
}

// The fields of the 64 rows of one block, one byte per row: idx (its low idx_bits bits; m = 4: shifted up by n),
// and sq, whose qword q holds the sign fields of rows 8q..8q+7 (c.shlo, c.shhi take them out).
static inline void decode_fields(const Dec& c, const uint8_t* blk, __m512i& idx, __m512i& sq) {
  const __m512i ia = _mm512_maskz_loadu_epi8(c.lmi, blk);
  const __m512i sa = _mm512_maskz_loadu_epi8(c.lms, blk + c.ib);
  idx = _mm512_multishift_epi64_epi8(c.shi, _mm512_permutexvar_epi8(c.gi, ia));
  sq = _mm512_permutexvar_epi8(c.gs, sa);
}

// S and P (bytes, one per row) of the 64 rows of one block.
template <int M>
static inline void decode_block(const Dec& c, const uint8_t* blk, __m512i& S, __m512i& P) {
  __m512i idx, sq;
  decode_fields(c, blk, idx, sq);
  if (M == 8) {
    S = _mm512_permutex2var_epi8(c.ts0, idx, c.ts1);
    const __m512i slo = _mm512_multishift_epi64_epi8(c.shlo, sq);
    const __m512i shv = _mm512_multishift_epi64_epi8(c.shhi, sq);
    // 0xE4: (a & c) | (b & ~c): high nibble from a, low nibble from b.
    const __m512i i1 = _mm512_ternarylogic_epi32(_mm512_slli_epi16(S, 4), slo, c.f0, 0xE4);
    const __m512i i2 = _mm512_ternarylogic_epi32(S, shv, c.f0, 0xE4);
    const __m512i pl = _mm512_mask_blend_epi8(_mm512_movepi8_mask(i1), _mm512_permutex2var_epi8(c.t1[0], i1, c.t1[1]),
                                              _mm512_permutex2var_epi8(c.t1[2], i1, c.t1[3]));
    const __m512i ph = _mm512_mask_blend_epi8(_mm512_movepi8_mask(i2), _mm512_permutex2var_epi8(c.t2[0], i2, c.t2[1]),
                                              _mm512_permutex2var_epi8(c.t2[2], i2, c.t2[3]));
    P = _mm512_or_si512(pl, ph);
  } else {
    const __m512i s = _mm512_multishift_epi64_epi8(c.shlo, sq);
    const __m512i j = _mm512_ternarylogic_epi32(idx, s, c.jm, 0xE4);  // idx is pre-shifted by n
    S = _mm512_permutexvar_epi8(j, c.js);
    P = _mm512_permutexvar_epi8(j, c.jp);
  }
}

// m = 4: S and the sign bits in kept order (low n bits of each byte; the bits above are the next row's), one byte
// per row, of the 64 rows of one block.
static inline void decode_block4_signs(const Dec& c, const uint8_t* blk, __m512i& S, __m512i& s) {
  __m512i idx, sq;
  decode_fields(c, blk, idx, sq);
  s = _mm512_multishift_epi64_epi8(c.shlo, sq);
  S = _mm512_permutexvar_epi8(_mm512_ternarylogic_epi32(idx, s, c.jm, 0xE4), c.js);  // idx is pre-shifted by n
}

}  // namespace pbs2p::avx512
