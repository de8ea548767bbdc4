// Portable kernels: plain C++, compiled for the baseline ISA.
#include "kernels.h"

namespace pbs2p::scalar {

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

void build_tables(const void* x, bool x_bf16, int64_t ldx, int64_t B, int m, int64_t g0, int64_t g1,
                  float* tables) {
  const int nib = m / 4;
  for (int64_t g = g0; g < g1; ++g) {
    for (int64_t b = 0; b < B; ++b) {
      const int64_t xi = b * ldx + g * m;
      float* tb = tables + (g * B + b) * nib * 16;
      for (int t = 0; t < nib; ++t, tb += 16) {
        tb[0] = 0.0f;
        for (int j = 0; j < 4; ++j) {
          for (int i = 0; i < (1 << j); ++i) tb[(1 << j) + i] = tb[i] + activation(x, x_bf16, xi + 4 * t + j);
        }
      }
    }
  }
}

void decode(const NMTables& t, const uint8_t* blocks, int64_t ng, uint32_t* D) {
  decode_generic(t, blocks, ng, D);
}

void lookup(const LookupArgs& a) {
  const int nib = a.nib;
  float s[kMaxNb][kTileRows], p[kMaxNb][kTileRows];
  for (int64_t g = 0; g < a.ng;) {
    const int64_t blk = (a.g_abs + g) / a.gpb;
    int64_t gend = (blk + 1) * a.gpb - a.g_abs;
    if (gend > a.ng) gend = a.ng;
    for (int j = 0; j < a.nb; ++j) {
      for (int r = 0; r < kTileRows; ++r) s[j][r] = p[j][r] = 0.0f;
    }
    for (; g < gend; ++g) {
      const uint32_t* d = a.D + g * kTileRows;
      const float* tg = a.tables + g * a.table_stride;
      for (int j = 0; j < a.nb; ++j) {
        const float* tj = tg + j * nib * 16;
        for (int r = 0; r < kTileRows; ++r) {
          float ss = 0.0f, pp = 0.0f;
          for (int t = 0; t < nib; ++t) {
            ss += tj[16 * t + ((d[r] >> (4 * t)) & 15)];
            pp += tj[16 * t + ((d[r] >> (16 + 4 * t)) & 15)];
          }
          s[j][r] += ss;
          p[j][r] += pp;
        }
      }
    }
    const float* sc = a.scales + (blk - a.blk0) * 2 * kTileRows;
    for (int j = 0; j < a.nb; ++j) {
      float* o = a.acc + j * kTileRows;
      for (int r = 0; r < kTileRows; ++r) o[r] += sc[r] * s[j][r] + sc[kTileRows + r] * p[j][r];
    }
  }
}

void expand_bf16(const ExpandArgs& a) { expand_bf16_generic(a); }
void expand_f32(const ExpandArgs& a) { expand_f32_generic(a); }

void int8_rows(const Int8RowsArgs& a) {
  for (int64_t r = a.r0; r < a.r1; ++r) {
    const int8_t* w = a.q + r * a.K;
    for (int64_t b = 0; b < a.nb; ++b) {
      const float* x = a.x + b * a.ldx;
      float acc = 0.0f;
      for (int64_t c = 0; c < a.K; ++c) acc += static_cast<float>(w[c]) * x[c];
      a.y[b * a.ldy + r] = acc * a.scale[r];
    }
  }
}

}  // namespace pbs2p::scalar
