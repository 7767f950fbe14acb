// Block-level code of the Fastfood kernels (csrc/fastfood.cu; METHODS.md §12.5): the counter-hash
// generator, the keyed Feistel permutation and the shared-memory Walsh–Hadamard transform, written
// once for the device and the host.
//
// Every block function is a sequence of phases separated by block_sync(); each phase is a loop
// `for (j = tid; j < count; j += nthreads)` over independent work items. On the device tid/nthreads
// are threadIdx.x/blockDim.x and block_sync is __syncthreads; compiled by a host C++ compiler (no
// __CUDACC__) with tid = 0, nthreads = 1, the same functions run every work item of a phase before the
// next phase, which is exactly the block's semantics. tests/ops/test_fastfood.py compiles this header
// for the host that way and checks the kernels' index arithmetic, generator bits and transform against
// the PyTorch reference on a machine without a GPU.
//
// The generator must equal kadapt/ops/fastfood.py (torch int64 ops emulating uint32) and
// kadapt/ops/triton/fastfood.py (Triton uint32) draw for draw: same mix constants, same key columns
// of the plan's info table, same Box–Muller in fp32, same Feistel widths and round order.
#pragma once

#include <math.h>

#include <cstdint>

#ifdef __CUDACC__
#define KADAPT_FF_HD __host__ __device__ __forceinline__
#else
#define KADAPT_FF_HD inline
#endif
#ifdef __CUDA_ARCH__  // the device pass only: host compilers warn about an unknown pragma
#define KADAPT_FF_UNROLL _Pragma("unroll")
#else
#define KADAPT_FF_UNROLL
#endif

namespace kadapt {
namespace fastfood {

// Columns of the plan's info table (kadapt/ops/fastfood.py INFO_COLS): N, L, log2 L, workspace
// offset, output offset, min(d_z, L), 0, 0, then kKeys 32-bit keys (stored as int64).
constexpr int kInfoCols = 19;
constexpr int kKeyCol = 8;
constexpr int kKeys = 11;  // sign (2), u1 (2), u2 (2), whitening (1), Feistel round keys (4)
// The largest transform one block does in shared memory: 2^13 fp32 = 32 KiB (+ 2 KiB of padding),
// under the 48 KiB of static shared memory a block may use without opting in.
constexpr int kMaxTileLog2 = 13;
constexpr int kSmemFloats = (1 << kMaxTileLog2) + (1 << (kMaxTileLog2 - 4));

KADAPT_FF_HD void block_sync() {
#ifdef __CUDA_ARCH__
  __syncthreads();
#endif
}

// ---------------------------------------------------------------------------------------------
// generator

KADAPT_FF_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  return x ^ (x >> 16);
}

KADAPT_FF_HD uint32_t hash32(uint32_t k, uint32_t a, uint32_t b) { return mix32(mix32(k ^ a) ^ b); }

// One tensor's row of the info table.
struct Row {
  int64_t N, L, ws_off, out_off, m;
  int n;  // log2 L
  uint32_t key[kKeys];
};

KADAPT_FF_HD Row load_row(const int64_t* info, int64_t t) {
  const int64_t* p = info + t * kInfoCols;
  Row r;
  r.N = p[0];
  r.L = p[1];
  r.n = static_cast<int>(p[2]);
  r.ws_off = p[3];
  r.out_off = p[4];
  r.m = p[5];
  for (int i = 0; i < kKeys; ++i) r.key[i] = static_cast<uint32_t>(p[kKeyCol + i]);
  return r;
}

// b_k ∈ {±1}: the top bit of the sign stream.
KADAPT_FF_HD float sign_of(uint32_t k, const Row& r) {
  return 1.0f - 2.0f * static_cast<float>(hash32(k, r.key[0], r.key[1]) >> 31);
}

// u ∈ (0, 1) from the top 24 bits (exact in fp32).
KADAPT_FF_HD float uniform_of(uint32_t h) {
  return (static_cast<float>(h >> 8) + 0.5f) * 5.960464477539063e-08f;
}

// g_k ~ N(0, 1): Box–Muller in fp32 (full-precision logf/cosf/sqrtf: the extension is built without
// --use_fast_math).
KADAPT_FF_HD float gauss_of(uint32_t k, const Row& r) {
  const float u1 = uniform_of(hash32(k, r.key[2], r.key[3]));
  const float u2 = uniform_of(hash32(k, r.key[4], r.key[5]));
  return sqrtf(-2.0f * logf(u1)) * cosf(6.283185307179586f * u2);
}

// π(k), or π⁻¹(k) when inverse, for k < 2^n: k ⊕ w, then 4 Feistel rounds on ⌊n/2⌋ high | ⌈n/2⌉ low
// bits; round q's function mix(x ⊕ key_q) is cropped to ⌊n/2⌋ bits for even q, ⌈n/2⌉ for odd q.
KADAPT_FF_HD uint32_t feistel(uint32_t k, int n, const Row& r, bool inverse) {
  const int nl = n / 2;
  const int nr = n - nl;
  const uint32_t ml = (1u << nl) - 1u;
  const uint32_t mr = (1u << nr) - 1u;
  const uint32_t w = r.key[6] & ((1u << n) - 1u);  // n ≤ 30 (MAX_LOG2_LENGTH)
  const uint32_t* rk = r.key + 7;
  if (!inverse) {
    const uint32_t x = k ^ w;
    uint32_t left = x >> nr, right = x & mr;
KADAPT_FF_UNROLL
    for (int q = 0; q < 4; ++q) {
      const uint32_t t = left ^ (mix32(right ^ rk[q]) & ((q & 1) ? mr : ml));
      left = right;
      right = t;
    }
    return (left << nr) | right;
  }
  uint32_t left = k >> nr, right = k & mr;
KADAPT_FF_UNROLL
  for (int q = 3; q >= 0; --q) {
    const uint32_t t = right ^ (mix32(left ^ rk[q]) & ((q & 1) ? mr : ml));
    right = left;
    left = t;
  }
  return ((left << nr) | right) ^ w;
}

// ---------------------------------------------------------------------------------------------
// shared-memory Walsh–Hadamard transform

// Shared-memory slot of element j: one pad word per 16 so that the stride-16 accesses of the
// lowest butterfly group hit 32 different banks.
KADAPT_FF_HD int slot(int j) { return j + (j >> 4); }

// Butterflies (a, b) → (a + b, a − b) on the Q index bits b0 … b0+Q−1 of the 2^logm elements in s:
// each work item gathers the 2^Q elements that differ only in those bits into registers, does the Q
// radix-2 stages there and writes them back.
template <int Q>
KADAPT_FF_HD void butterfly_group(float* s, int b0, int logm, int tid, int nthreads) {
  constexpr int E = 1 << Q;
  const int count = (1 << logm) >> Q;
  const int low = (1 << b0) - 1;
  for (int u = tid; u < count; u += nthreads) {
    const int base = (u & low) | ((u & ~low) << Q);  // u with Q zero bits inserted at b0
    float v[E];
KADAPT_FF_UNROLL
    for (int e = 0; e < E; ++e) v[e] = s[slot(base + (e << b0))];
KADAPT_FF_UNROLL
    for (int h = 1; h < E; h <<= 1) {
KADAPT_FF_UNROLL
      for (int e = 0; e < E; ++e) {
        if ((e & h) == 0) {
          const float a = v[e], c = v[e | h];
          v[e] = a + c;
          v[e | h] = a - c;
        }
      }
    }
KADAPT_FF_UNROLL
    for (int e = 0; e < E; ++e) s[slot(base + (e << b0))] = v[e];
  }
}

// H_2 ⊗ … on every index bit in [lo, hi) of the 2^logm elements in s, in groups of at most 4 bits
// (the stages of different bits commute); starts and ends with the block synchronised.
KADAPT_FF_HD void hadamard_bits(float* s, int lo, int hi, int logm, int tid, int nthreads) {
  for (int b = lo; b < hi; b += 4) {
    switch (hi - b < 4 ? hi - b : 4) {
      case 1: butterfly_group<1>(s, b, logm, tid, nthreads); break;
      case 2: butterfly_group<2>(s, b, logm, tid, nthreads); break;
      case 3: butterfly_group<3>(s, b, logm, tid, nthreads); break;
      default: butterfly_group<4>(s, b, logm, tid, nthreads); break;
    }
    block_sync();
  }
}

// ---------------------------------------------------------------------------------------------
// the blocks (one per program-table row)

// Inner pass: program `pid` of the (P, 2) table (tensor t, tile) transforms elements
// [tile·T, tile·T + min(L, T)) of tensor t by H_{min(L, T)} (T = 2^logT). When L < T this is the
// first L outputs of H_T on the zero-padded tile, as in the Triton kernel. STAGE 1 loads b ⊙ E z
// (MODE 0, forward) or pad(σ γ) (MODE 1, backward) from src and writes the workspace dst; STAGE 2
// gathers g_k x_{π(k)} (forward) or g_{π⁻¹(k)} v_{π⁻¹(k)} (backward: Πᵀ as a gather) from the
// workspace src and, when L ≤ T (the tensor's last pass), stores σ v[:N] into out (forward) or
// b ⊙ v[:min(d_z, L)] into dst (backward); otherwise it writes dst for the outer levels.
template <int MODE, int STAGE>
KADAPT_FF_HD void inner_block(const float* __restrict__ src, float* __restrict__ dst,
                              float* __restrict__ out, const int64_t* __restrict__ info,
                              const float* __restrict__ sigma_tab, const int32_t* __restrict__ prog,
                              int logT, int64_t pid, float* s, int tid, int nthreads) {
  const int64_t t = prog[2 * pid];
  const int64_t tile = prog[2 * pid + 1];
  const Row r = load_row(info, t);
  const float sigma = sigma_tab[t];
  const int logm = r.n < logT ? r.n : logT;
  const int count = 1 << logm;
  const int64_t base = tile << logT;
  for (int j = tid; j < count; j += nthreads) {
    const int64_t k = base + j;
    const uint32_t ku = static_cast<uint32_t>(k);  // k < L ≤ 2^30
    float x;
    if (STAGE == 1) {
      if (MODE == 0) {
        x = k < r.m ? src[k] * sign_of(ku, r) : 0.0f;
      } else {
        x = k < r.N ? src[r.out_off + k] * sigma : 0.0f;
      }
    } else if (MODE == 0) {
      x = src[r.ws_off + feistel(ku, r.n, r, false)] * gauss_of(ku, r);
    } else {
      const uint32_t p = feistel(ku, r.n, r, true);
      x = src[r.ws_off + p] * gauss_of(p, r);
    }
    s[slot(j)] = x;
  }
  block_sync();
  hadamard_bits(s, 0, logm, logm, tid, nthreads);
  const bool last = STAGE == 2 && r.L <= (int64_t{1} << logT);
  for (int j = tid; j < count; j += nthreads) {
    const int64_t k = base + j;
    const float y = s[slot(j)];
    if (!last) {
      dst[r.ws_off + k] = y;
    } else if (MODE == 0) {
      if (k < r.N) out[r.out_off + k] = y * sigma;
    } else if (k < r.m) {
      dst[r.ws_off + k] = y * sign_of(static_cast<uint32_t>(k), r);
    }
  }
}

// Outer level: program `pid` of a (P_j, 5) table (tensor t, block, radix bits rb, stride bits sb,
// last level) applies H_R (R = 2^rb) along the rows of the R × OC block of tensor t whose element
// (r, c) is k = o·R·S + r·S + s0 + c (S = 2^sb; o, s0 from the block id as in the Triton kernel), in
// place on buf: OC contiguous columns per row, so loads and stores are coalesced. The last level of
// the second Hadamard (final_ok) stores σ v[:N] into out (forward) or b ⊙ v[:min(d_z, L)] into buf.
template <int MODE>
KADAPT_FF_HD void outer_block(float* __restrict__ buf, float* __restrict__ out,
                              const int64_t* __restrict__ info, const float* __restrict__ sigma_tab,
                              const int32_t* __restrict__ prog, bool final_ok, int logOC, int64_t pid,
                              float* s, int tid, int nthreads) {
  const int32_t* p = prog + 5 * pid;
  const int64_t t = p[0];
  const int64_t blk = p[1];
  const int rb = p[2];
  const int sb = p[3];
  const bool last = final_ok && p[4] != 0;
  const Row r = load_row(info, t);
  const int64_t S = int64_t{1} << sb;
  const int64_t ncb = S >> logOC;  // column blocks per stride (S ≥ T ≥ OC)
  const int64_t base = (blk / ncb) * (S << rb) + (blk % ncb) * (int64_t{1} << logOC);
  const int logm = rb + logOC;
  const int count = 1 << logm;
  const int cmask = (1 << logOC) - 1;
  for (int j = tid; j < count; j += nthreads) {
    s[slot(j)] = buf[r.ws_off + base + (j >> logOC) * S + (j & cmask)];
  }
  block_sync();
  hadamard_bits(s, logOC, logm, logm, tid, nthreads);
  const float sigma = sigma_tab[t];
  for (int j = tid; j < count; j += nthreads) {
    const int64_t k = base + (j >> logOC) * S + (j & cmask);
    const float y = s[slot(j)];
    if (!last) {
      buf[r.ws_off + k] = y;
    } else if (MODE == 0) {
      if (k < r.N) out[r.out_off + k] = y * sigma;
    } else if (k < r.m) {
      buf[r.ws_off + k] = y * sign_of(static_cast<uint32_t>(k), r);
    }
  }
}

// ∂z[j] = Σ_i [j < min(d_z, L_i)] · s_i · q_i[j] over the tensors in order (s_i = 1/L_i under
// grad_scale_compat, else 1): one work item per j, deterministic.
KADAPT_FF_HD void reduce_item(const float* __restrict__ q, float* __restrict__ dz,
                              const int64_t* __restrict__ info, int64_t K, bool compat, int64_t j) {
  float acc = 0.0f;
  for (int64_t i = 0; i < K; ++i) {
    const int64_t* row = info + i * kInfoCols;
    if (j < row[5]) {
      const float scale = compat ? 1.0f / static_cast<float>(row[1]) : 1.0f;
      acc += q[row[3] + j] * scale;
    }
  }
  dz[j] = acc;
}

}  // namespace fastfood
}  // namespace kadapt
