// Decode tables of the N:M patterns and the portable decoder (baseline ISA).
#include <cstring>
#include <memory>
#include <mutex>
#include <stdexcept>

#include "kernels.h"

namespace pbs2p {
namespace {

// pdep(v, mask): the low bits of v, in order, at the set bits of mask.
uint32_t deposit(uint32_t v, uint32_t mask) {
  uint32_t r = 0;
  for (; mask; mask &= mask - 1, v >>= 1) {
    if (v & 1) r |= mask & -mask;
  }
  return r;
}

// pair_pos: 2 * the column of the k-th set bit of S (the byte offset of its bf16 activation), 0 if S has fewer.
uint8_t pair_pos(uint32_t S, int k) {
  const uint32_t bit = deposit(1u << k, S);
  return static_cast<uint8_t>(bit ? 2 * __builtin_ctz(bit) : 0);
}

std::unique_ptr<NMTables> build(int n, int m) {
  if (!(m == 4 || m == 8 || m == 16) || n < 1 || n >= m) {
    throw std::invalid_argument("unsupported N:M pattern");
  }
  auto t = std::make_unique<NMTables>();
  std::memset(t.get(), 0, sizeof(NMTables));
  t->n = n;
  t->m = m;
  t->nib = m / 4;
  int c = 0;
  for (uint32_t s = 0; s < (1u << m); ++s) {
    if (__builtin_popcount(s) == n) t->masks[c++] = static_cast<uint16_t>(s);
  }
  t->ncomb = c;
  int bits = 0;
  while ((1 << bits) < c) ++bits;
  t->idx_bits = bits < 1 ? 1 : bits;
  t->idx_bytes = 8 * t->idx_bits;
  t->block_bytes = 8 * (t->idx_bits + n);
  if (m == 16) return t;

  const int wi = t->idx_bits;
  t->joint_bits = wi + n;
  for (uint32_t j = 0; j < (1u << t->joint_bits); ++j) {
    const uint32_t idx = j >> n, s = j & ((1u << n) - 1);
    if (idx < static_cast<uint32_t>(c)) {
      const uint32_t S = t->masks[idx];
      t->joint[j] = S | deposit(s, S) << 16;
    }
  }

  // AVX-512 decode. Bits of a field above its width are garbage after vpmultishiftqb; every
  // table below is therefore filled for all values of those bits.
  for (int q = 0; q < 8; ++q) {
    for (int k = 0; k < 8; ++k) {
      t->gather_idx[8 * q + k] = static_cast<uint8_t>(q * wi + k);
      t->gather_sgn[8 * q + k] = static_cast<uint8_t>(q * n + k);
      t->shift_slo[8 * q + k] = static_cast<uint8_t>(k * n);
      if (m == 8) {
        t->shift_idx[8 * q + k] = static_cast<uint8_t>(k * wi);
        t->shift_shi[8 * q + k] = static_cast<uint8_t>(k * n + (n > 4 ? n - 4 : 0));
      } else {
        // m = 4: idx lands pre-shifted by n bits, ready to be merged with the signs.
        t->shift_idx[8 * q + k] = static_cast<uint8_t>((k * wi - n) & 63);
      }
    }
  }
  for (int ch = 0; ch < 4; ++ch) {
    for (int i = 0; i < 16; ++i) {
      t->dexp[ch][4 * i + 0] = t->dexp[ch][4 * i + 1] = static_cast<uint8_t>(16 * ch + i);
      t->dexp[ch][4 * i + 2] = t->dexp[ch][4 * i + 3] = static_cast<uint8_t>(64 + 16 * ch + i);
    }
  }
  t->idx_load_mask = (1ull << t->idx_bytes) - 1;
  t->sgn_load_mask = (1ull << (8 * n)) - 1;
  if (m == 8) {
    for (uint32_t v = 0; v < 128; ++v) {
      const uint32_t idx = v & ((1u << wi) - 1);
      t->ts[v] = idx < static_cast<uint32_t>(c) ? static_cast<uint8_t>(t->masks[idx]) : 0;
      t->ts_lo4[v] = static_cast<uint8_t>(t->ts[v] << 4);
      t->ts_hi4[v] = static_cast<uint8_t>(t->ts[v] & 0xF0);
      for (int k = 0; k < 4; ++k) t->pair_pos[k][v] = pair_pos(t->ts[v], k);
    }
    // The low nibble of S takes the first popcount(S_lo) signs; the high nibble the last
    // popcount(S_hi) ones, which are the top bits of the sign byte shifted by max(n - 4, 0).
    const int w = n < 4 ? n : 4;
    for (uint32_t a = 0; a < 16; ++a) {
      const int ca = __builtin_popcount(a);
      for (uint32_t v = 0; v < 16; ++v) {
        t->t1[a << 4 | v] = static_cast<uint8_t>(deposit(v, a));
        if (ca <= w) {
          t->t2[a << 4 | v] = static_cast<uint8_t>(deposit((v >> (w - ca)) & ((1u << ca) - 1), a) << 4);
        }
        t->t2x[a << 4 | v] = static_cast<uint8_t>(16 | t->t2[a << 4 | v] >> 4);
      }
    }
  } else {
    t->jmask = static_cast<uint8_t>(((1u << wi) - 1) << n);
    for (uint32_t v = 0; v < 16 && m == 4; ++v) {  // m = 4: indexed by S itself
      for (int k = 0; k < 4; ++k) t->pair_pos[k][v] = pair_pos(v, k);
    }
    for (uint32_t v = 0; v < 64; ++v) {
      const uint32_t d = t->joint[v & ((1u << t->joint_bits) - 1)];
      t->js[v] = static_cast<uint8_t>(d & 0xFF);
      t->jp[v] = static_cast<uint8_t>(d >> 16);
    }
  }
  return t;
}

// Little-endian read of `len` <= 16 bytes.
unsigned __int128 read_bits(const uint8_t* p, int len) {
  unsigned __int128 v = 0;
  std::memcpy(&v, p, len);
  return v;
}

}  // namespace

const NMTables& nm_tables(int n, int m) {
  static std::mutex mutex;
  static std::unique_ptr<NMTables> cache[17][17];
  std::lock_guard<std::mutex> lock(mutex);
  if (m < 0 || m > 16 || n < 0 || n > 16) throw std::invalid_argument("unsupported N:M pattern");
  auto& slot = cache[n][m];
  if (!slot) slot = build(n, m);
  return *slot;
}

namespace {

// m <= 8: the fields of 8 rows fill exactly W (idx) or N (signs) bytes, so one 8-byte read
// (from a padded copy of the block) holds them all; constant widths make every shift immediate.
template <int W, int N>
void decode_fixed(const NMTables& t, const uint8_t* blocks, int64_t ng, uint32_t* D) {
  constexpr uint64_t imask = (1u << W) - 1, smask = (1u << N) - 1;
  constexpr int bb = 8 * (W + N);
  uint8_t buf[bb + 8] = {};
  for (int64_t g = 0; g < ng; ++g) {
    std::memcpy(buf, blocks + g * bb, bb);
    uint32_t* d = D + g * kTileRows;
    for (int q = 0; q < 8; ++q) {
      uint64_t iv, sv;
      std::memcpy(&iv, buf + q * W, 8);
      std::memcpy(&sv, buf + 8 * W + q * N, 8);
      for (int k = 0; k < 8; ++k) {
        d[8 * q + k] = t.joint[((iv >> (k * W)) & imask) << N | ((sv >> (k * N)) & smask)];
      }
    }
  }
}

void decode_any(const NMTables& t, const uint8_t* blocks, int64_t ng, uint32_t* D) {
  const int wi = t.idx_bits, n = t.n;
  const uint32_t imask = (1u << wi) - 1, smask = (1u << n) - 1;
  for (int64_t g = 0; g < ng; ++g) {
    const uint8_t* blk = blocks + g * t.block_bytes;
    uint32_t* d = D + g * kTileRows;
    for (int q = 0; q < 8; ++q) {
      const unsigned __int128 iv = read_bits(blk + q * wi, wi);
      const unsigned __int128 sv = read_bits(blk + t.idx_bytes + q * n, n);
      for (int k = 0; k < 8; ++k) {
        const uint32_t idx = static_cast<uint32_t>(iv >> (k * wi)) & imask;
        const uint32_t s = static_cast<uint32_t>(sv >> (k * n)) & smask;
        if (t.m <= 8) {
          d[8 * q + k] = t.joint[idx << n | s];
        } else if (idx < static_cast<uint32_t>(t.ncomb)) {
          const uint32_t S = t.masks[idx];
          d[8 * q + k] = S | deposit(s, S) << 16;
        } else {
          d[8 * q + k] = 0;
        }
      }
    }
  }
}

}  // namespace

void decode_generic(const NMTables& t, const uint8_t* blocks, int64_t ng, uint32_t* D) {
  const int key = t.m * 100 + t.n;
  switch (key) {
    case 401: decode_fixed<2, 1>(t, blocks, ng, D); break;
    case 402: decode_fixed<3, 2>(t, blocks, ng, D); break;
    case 403: decode_fixed<2, 3>(t, blocks, ng, D); break;
    case 801: decode_fixed<3, 1>(t, blocks, ng, D); break;
    case 802: decode_fixed<5, 2>(t, blocks, ng, D); break;
    case 803: decode_fixed<6, 3>(t, blocks, ng, D); break;
    case 804: decode_fixed<7, 4>(t, blocks, ng, D); break;
    case 805: decode_fixed<6, 5>(t, blocks, ng, D); break;
    case 806: decode_fixed<5, 6>(t, blocks, ng, D); break;
    case 807: decode_fixed<3, 7>(t, blocks, ng, D); break;
    default: decode_any(t, blocks, ng, D); break;
  }
}

template <typename T>
static void expand_generic(const ExpandArgs& a) {
  for (int64_t g = 0; g < a.ng; ++g) {
    const T* w = static_cast<const T*>(a.w) + ((a.g_abs + g) / a.gpb - a.blk0) * 2 * kTileRows;
    for (int r = 0; r < a.rows; ++r) {
      const uint32_t d = a.D[g * kTileRows + r];
      const T plus = w[r], minus = w[kTileRows + r];
      T* o = static_cast<T*>(a.out) + r * a.ld + g * a.m;
      for (int j = 0; j < a.m; ++j) {
        o[j] = (d >> j & 1) ? (d >> (16 + j) & 1 ? plus : minus) : T(0);
      }
    }
  }
}

void expand_bf16_generic(const ExpandArgs& a) { expand_generic<uint16_t>(a); }
void expand_f32_generic(const ExpandArgs& a) { expand_generic<float>(a); }

}  // namespace pbs2p
