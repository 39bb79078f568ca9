// Emulation of the sm_80 PTX the portable grouped GEMM uses (grouped_gemm_sm80_impl.cuh), in the
// semantics of the PTX ISA: cp.async (16-byte global -> shared, zero-fill, completed by groups at
// cp.async.wait_group, so a read before its wait sees the old bytes), ldmatrix .x4 (.trans) and
// mma.sync.m16n8k16 with bf16 / f16 inputs and fp32 accumulators, with their fragment layouts.
#pragma once

#include "emu_cuda.h"
#include "emu_half.h"

namespace emu {

// Shared-memory addresses are offsets into the launch's dynamic shared memory.
inline uint32_t shared_offset(const void* p) {
  const auto off = reinterpret_cast<const char*>(p) - static_cast<const char*>(dynamic_smem());
  if (off < 0 || off > 0x7fffffff) fail("__cvta_generic_to_shared: not a dynamic shared-memory address");
  return static_cast<uint32_t>(off);
}
inline char* shared_ptr(uint32_t addr) { return static_cast<char*>(dynamic_smem()) + addr; }

void cp_async_16(uint32_t dst, const void* src, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending);

inline void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr, bool trans) {
  unsigned char all[32][16];
  warp_exchange(0xffffffffu, &addr, sizeof(addr), all);
  const int lane = lane_id(), group = lane >> 2, tig = lane & 3;
  for (int m = 0; m < 4; ++m) {
    uint16_t v[2];
    for (int h = 0; h < 2; ++h) {
      // Matrix m's rows come from lanes 8m..8m+7; lane l holds row l/4, columns 2(l%4)+{0,1}
      // (the transpose: row 2(l%4)+h, column l/4).
      const int row = trans ? 2 * tig + h : group;
      const int col = trans ? group : 2 * tig + h;
      const uint32_t row_addr = warp_get<uint32_t>(all, 8 * m + row);
      std::memcpy(&v[h], shared_ptr(row_addr) + 2 * col, 2);
    }
    r[m] = static_cast<uint32_t>(v[0]) | (static_cast<uint32_t>(v[1]) << 16);
  }
}

template <bool kBf16>
inline float mma_elem(uint32_t reg, int half) {
  const uint16_t bits = static_cast<uint16_t>(reg >> (16 * half));
  return kBf16 ? bf16_bits_to_float(bits) : half_bits_to_float(bits);
}

template <bool kBf16>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  unsigned char A[32][16], B[32][16];
  warp_exchange(0xffffffffu, a, 16, A);
  warp_exchange(0xffffffffu, b, 8, B);
  // A[16][16] row-major and B[16][8] from every lane's fragments.
  float am[16][16], bm[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, t = l & 3;
    const uint32_t* ar = reinterpret_cast<const uint32_t*>(A[l]);
    const uint32_t* br = reinterpret_cast<const uint32_t*>(B[l]);
    for (int h = 0; h < 2; ++h) {
      am[g][2 * t + h] = mma_elem<kBf16>(ar[0], h);
      am[g + 8][2 * t + h] = mma_elem<kBf16>(ar[1], h);
      am[g][2 * t + 8 + h] = mma_elem<kBf16>(ar[2], h);
      am[g + 8][2 * t + 8 + h] = mma_elem<kBf16>(ar[3], h);
      bm[2 * t + h][g] = mma_elem<kBf16>(br[0], h);
      bm[2 * t + 8 + h][g] = mma_elem<kBf16>(br[1], h);
    }
  }
  const int lane = lane_id(), g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + (i >= 2 ? 8 : 0), col = 2 * t + (i & 1);
    double acc = c[i];  // products of 16-bit floats are exact; the sum is rounded once
    for (int kk = 0; kk < 16; ++kk) acc += static_cast<double>(am[row][kk]) * bm[kk][col];
    c[i] = static_cast<float>(acc);
  }
}

}  // namespace emu

inline size_t __cvta_generic_to_shared(const void* p) { return emu::shared_offset(p); }
