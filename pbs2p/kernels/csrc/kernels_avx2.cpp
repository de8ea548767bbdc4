// AVX2 + FMA kernels: called only after a run-time CPU check.
//
// Decode is the portable one (joint code -> D table). Lookup: a 16-entry fp32 table is two
// ymm halves; vpermps picks in both with the low 3 bits of the nibble and vblendvps selects
// the half with its bit 3, for 8 rows per instruction. (Tables of 3 columns, 8 entries, need
// no blend but more lookups: measured no faster for m = 8 and slower for m = 4.)
#include <immintrin.h>

#include "kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,popcnt")

namespace pbs2p::avx2 {

const int kMaxNb = 4;

int table_floats(int m) { return m / 4 * 16; }

// Activation i of a float32 or bfloat16 (bits) array, as float (internal linkage: see kernels.h).
static inline float activation(const void* x, bool x_bf16, int64_t i) {
  if (!x_bf16) return static_cast<const float*>(x)[i];
  const uint32_t bits = static_cast<uint32_t>(static_cast<const uint16_t*>(x)[i]) << 16;
  float v;
  __builtin_memcpy(&v, &bits, sizeof(v));
  return v;
}

void build_tables(const void* x, bool x_bf16, int64_t ldx, int64_t B, int m, int64_t g0, int64_t g1,
                  float* tables) {
  const int nib = m / 4;
  const __m256i lane = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  __m256 bit[3];
  for (int j = 0; j < 3; ++j) {
    bit[j] = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(lane, j), _mm256_set1_epi32(1)));
  }
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t xi = b * ldx + g * m;
      float* tb = tables + (g * B + b) * nib * 16;
      for (int t = 0; t < nib; ++t) {
        __m256 v = _mm256_mul_ps(_mm256_set1_ps(activation(x, x_bf16, xi + 4 * t)), bit[0]);
        v = _mm256_fmadd_ps(_mm256_set1_ps(activation(x, x_bf16, xi + 4 * t + 1)), bit[1], v);
        v = _mm256_fmadd_ps(_mm256_set1_ps(activation(x, x_bf16, xi + 4 * t + 2)), bit[2], v);
        _mm256_storeu_ps(tb + 16 * t, v);
        const __m256 x3 = _mm256_set1_ps(activation(x, x_bf16, xi + 4 * t + 3));
        _mm256_storeu_ps(tb + 16 * t + 8, _mm256_add_ps(v, x3));
      }
    }
  }
}

void decode(const NMTables& t, const uint8_t* blocks, int64_t ng, uint32_t* D) {
  decode_generic(t, blocks, ng, D);
}

// table[(d >> shift) & 15] for 8 rows.
static inline __m256 lookup16(__m256i d, int shift, const float* table) {
  const __m256i idx = _mm256_srli_epi32(d, shift);
  const __m256 sel = _mm256_castsi256_ps(_mm256_slli_epi32(d, 28 - shift));
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(_mm256_loadu_ps(table), idx),
                          _mm256_permutevar8x32_ps(_mm256_loadu_ps(table + 8), idx), sel);
}

template <int NIB>
static inline __m256 nibble_sum(__m256i d, int shift, const float* tj) {
  __m256 r = lookup16(d, shift, tj);
  for (int t = 1; t < NIB; ++t) r = _mm256_add_ps(r, lookup16(d, shift + 4 * t, tj + 16 * t));
  return r;
}

template <int NB, int NIB>
static void lookup_nb(const LookupArgs& a) {
  for (int c = 0; c < 8; ++c) {
    for (int64_t g = 0; g < a.ng;) {
      const int64_t blk = (a.g_abs + g) / a.gpb;
      int64_t gend = (blk + 1) * a.gpb - a.g_abs;
      if (gend > a.ng) gend = a.ng;
      __m256 accs[NB], accp[NB];
      for (int j = 0; j < NB; ++j) accs[j] = accp[j] = _mm256_setzero_ps();
      for (; g < gend; ++g) {
        const __m256i d = _mm256_load_si256(reinterpret_cast<const __m256i*>(a.D + g * kTileRows + 8 * c));
        const float* tg = a.tables + g * a.table_stride;
        for (int j = 0; j < NB; ++j) {
          accs[j] = _mm256_add_ps(accs[j], nibble_sum<NIB>(d, 0, tg + j * NIB * 16));
          accp[j] = _mm256_add_ps(accp[j], nibble_sum<NIB>(d, 16, tg + j * NIB * 16));
        }
      }
      const float* sc = a.scales + (blk - a.blk0) * 2 * kTileRows + 8 * c;
      const __m256 as = _mm256_loadu_ps(sc), ap = _mm256_loadu_ps(sc + kTileRows);
      for (int j = 0; j < NB; ++j) {
        float* o = a.acc + j * kTileRows + 8 * c;
        _mm256_storeu_ps(o, _mm256_fmadd_ps(accs[j], as, _mm256_fmadd_ps(accp[j], ap, _mm256_loadu_ps(o))));
      }
    }
  }
}

template <int NIB>
static void lookup_nib(const LookupArgs& a) {
  switch (a.nb) {
    case 1: lookup_nb<1, NIB>(a); break;
    case 2: lookup_nb<2, NIB>(a); break;
    case 3: lookup_nb<3, NIB>(a); break;
    default: lookup_nb<4, NIB>(a); break;
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

void expand_bf16(const ExpandArgs& a) { expand_bf16_generic(a); }

// 4 columns of one row: bit j of s selects column j kept, bit j of p its sign.
static inline __m128 expand4(uint32_t s, uint32_t p, __m128 plus, __m128 minus) {
  const __m128i bits = _mm_setr_epi32(1, 2, 4, 8);
  const __m128i kept = _mm_cmpeq_epi32(_mm_and_si128(_mm_set1_epi32(static_cast<int>(s)), bits), bits);
  const __m128i pos = _mm_cmpeq_epi32(_mm_and_si128(_mm_set1_epi32(static_cast<int>(p)), bits), bits);
  return _mm_and_ps(_mm_blendv_ps(minus, plus, _mm_castsi128_ps(pos)), _mm_castsi128_ps(kept));
}

// 8 columns of one row, the same way.
static inline __m256 expand8(uint32_t s, uint32_t p, __m256 plus, __m256 minus) {
  const __m256i bits = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i kept = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(s)), bits), bits);
  const __m256i pos = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(p)), bits), bits);
  return _mm256_and_ps(_mm256_blendv_ps(minus, plus, _mm256_castsi256_ps(pos)), _mm256_castsi256_ps(kept));
}

void expand_f32(const ExpandArgs& a) {
  for (int64_t g = 0; g < a.ng; ++g) {
    const float* w = static_cast<const float*>(a.w) + ((a.g_abs + g) / a.gpb - a.blk0) * 2 * kTileRows;
    const uint32_t* d = a.D + g * kTileRows;
    float* o = static_cast<float*>(a.out) + g * a.m;
    for (int r = 0; r < a.rows; ++r, o += a.ld) {
      const uint32_t s = d[r] & 0xFFFF, p = d[r] >> 16;
      if (a.m == 4) {
        _mm_storeu_ps(o, expand4(s, p, _mm_set1_ps(w[r]), _mm_set1_ps(w[kTileRows + r])));
        continue;
      }
      const __m256 plus = _mm256_set1_ps(w[r]), minus = _mm256_set1_ps(w[kTileRows + r]);
      for (int c = 0; c < a.m; c += 8) _mm256_storeu_ps(o + c, expand8(s >> c, p >> c, plus, minus));
    }
  }
}

// Four rows at a time (four independent sums), 8 columns per step: sign-extend 8 int8 weights to
// int32, convert to float32, fused multiply-add with the activations.
static inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

static inline __m256 widen8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

void int8_rows(const Int8RowsArgs& a) {
  const int64_t K = a.K, K8 = K / 8 * 8;
  int64_t r = a.r0;
  for (; r + 4 <= a.r1; r += 4) {
    const int8_t* w = a.q + r * K;
    for (int64_t b = 0; b < a.nb; ++b) {
      const float* x = a.x + b * a.ldx;
      __m256 s0 = _mm256_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
      for (int64_t c = 0; c < K8; c += 8) {
        const __m256 xv = _mm256_loadu_ps(x + c);
        s0 = _mm256_fmadd_ps(widen8(w + c), xv, s0);
        s1 = _mm256_fmadd_ps(widen8(w + K + c), xv, s1);
        s2 = _mm256_fmadd_ps(widen8(w + 2 * K + c), xv, s2);
        s3 = _mm256_fmadd_ps(widen8(w + 3 * K + c), xv, s3);
      }
      float t[4] = {hsum8(s0), hsum8(s1), hsum8(s2), hsum8(s3)};
      for (int j = 0; j < 4; ++j) {
        for (int64_t c = K8; c < K; ++c) t[j] += static_cast<float>(w[j * K + c]) * x[c];
        a.y[b * a.ldy + r + j] = t[j] * a.scale[r + j];
      }
    }
  }
  for (; r < a.r1; ++r) {
    const int8_t* w = a.q + r * K;
    for (int64_t b = 0; b < a.nb; ++b) {
      const float* x = a.x + b * a.ldx;
      __m256 s0 = _mm256_setzero_ps();
      for (int64_t c = 0; c < K8; c += 8) s0 = _mm256_fmadd_ps(widen8(w + c), _mm256_loadu_ps(x + c), s0);
      float t = hsum8(s0);
      for (int64_t c = K8; c < K; ++c) t += static_cast<float>(w[c]) * x[c];
      a.y[b * a.ldy + r] = t * a.scale[r];
    }
  }
}

}  // namespace pbs2p::avx2

#pragma GCC pop_options
