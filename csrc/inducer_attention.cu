// Inducer attention forward (METHODS.md §8, §12.1): FlashAttention-2 style attention that also
// returns LSE and the inducer weight w = σ(s0 − LSE), with the key-MLP prologue. It computes the
// same function as the Triton forward (kadapt/ops/triton/inducer_attention.py, _fwd_kernel); the
// backward of the "cuda" backend runs the Triton backward kernels on the outputs saved here.
//
// Per (batch b, head h) with q (B, H, Tq, d), k, v (B, H, Tk, d) contiguous, one dtype:
//
//   s_ij  = c⟨q_i, k_j⟩ over the unmasked keys (causal: j ≤ i + Tk − Tq; kpm[b, j] ≠ 0)
//   O_i   = softmax_j(s_i·) v                    (q's dtype; fp32 accumulation)
//   LSE_i = log Σ_j exp(s_ij)                    (fp32)
//   s0_i  = c⟨q_i, q_i + φ(q_i)⟩, φ(q) = tanh(q A_k[h] + a_k[h]) B_k[h] + b_k[h] (φ = 0 without MLP)
//   w_i   = σ(s0_i − LSE_i)                      (fp32)
//   a row that sees no key: LSE = −inf, O = 0, w = 1.
//
// Design (one CTA of 128 threads = 4 warps per (query tile, b·h); grid.x = query tiles, grid.y =
// min(B·H, 65535) with a grid-stride loop over b·h):
//   * The head dim d is padded to D ∈ {32, 64, 96, 128} (template parameter): padded columns are
//     zero-filled on load and never stored, so every d in 1..128 runs.
//   * Prologue (s0): ⟨q, φ(q)⟩ = Σ_j tanh(q·A[:, j] + a_j)·(B[j, :]·q) + q·b, so φ is never formed:
//     per row and MLP unit j two length-d dot products (plain fp32 FMAs; lanes of a warp take the
//     units j, the warp's own query rows are read from shared memory as broadcasts, A and B from
//     global memory/L1). Any m_k works; the host limits it to kMaxKeyMlp like the Triton kernel.
//   * fp16/bf16 (tensor cores): BM = 64 query rows (16 per warp), BN = 64 keys per tile. Q, K and
//     V tiles live in shared memory with a row pitch of D + 8 elements (16-byte aligned rows,
//     conflict-free ldmatrix); K/V tiles are double-buffered with cp.async (16-byte copies when
//     d % 8 == 0 and the pointers are aligned, else element loads). S = Q·Kᵀ and O += P·V use
//     mma.sync.m16n8k16 (fp32 accumulators): Q fragments stay in registers for the whole loop,
//     K fragments come from ldmatrix.x4, V fragments from ldmatrix.x4.trans, and P goes from the
//     S accumulators straight into A fragments (no shared-memory round trip). The online softmax
//     runs in registers in the log2 domain (exp2f, running max and sum per row; the four lanes
//     that share a row reduce with two shuffles). Masking is applied only on tiles that need it
//     (the Tk tail, a key padding mask, causal tiles crossing the diagonal); with causal the key
//     loop stops at the last tile the query tile can see. The epilogue stages O in the warp's own
//     rows of the Q buffer and writes it with 16-byte stores when possible.
//     Shared memory: (BM + 4·BN)·(D + 8)·sizeof(T) + 4·BM bytes = 87.3 KB at D = 128 (opt-in).
//   * fp32 (correctness path, CUDA cores): BM = BN = 32, 4 threads per query row, S and P·V with
//     scalar FMAs from shared memory (pitches chosen bank-conflict free), expf/logf.
//   * Outputs are written for rows < Tq and columns < d only; rows past Tq and keys past Tk are
//     zero-filled on load (a V row past Tk must be 0, not garbage, since P = 0 there).
//
// Includes are deliberately lean (no <torch/extension.h>).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <atomic>
#include <climits>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

#include "device_common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kadapt's inducer attention kernels need sm_80 or newer (bf16 mma.sync, cp.async): set TORCH_CUDA_ARCH_LIST"
#endif

namespace kadapt {

// Limits of kadapt::inducer_attention_fwd (kadapt/_extension.py mirrors them).
constexpr int64_t kInducerMaxHeadDim = 128;
constexpr int64_t kInducerMaxKeyMlp = 128;

namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------------------------------------
// scalar helpers (to_f / from_f, cp.async and load_tile: device_common.cuh)

// Two floats as one 32-bit register of two 16-bit values (lo in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(kFull, v, off);
  return v;
}

// ---------------------------------------------------------------------------------------------
// ldmatrix, mma.sync (sm_80+)

// Four 8×8 b16 matrices; lanes 8j..8j+7 give the row addresses of matrix j. Without .trans lane
// l receives row l/4, elements 2(l%4), 2(l%4)+1 of each matrix; with .trans the transposed ones
// (rows 2(l%4), 2(l%4)+1 of column l/4).
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* p) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s)
               : "memory");
}

// c (16×8 fp32) += a (16×16, row) · b (16×8, col). Fragments (g = lane/4, t = lane%4):
// a: {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; b: {(k 2t..2t+1, n g),
// (k 2t+8.., n g)}; c: {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}.
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4],
                                                 uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// ---------------------------------------------------------------------------------------------
// parameters and shared pieces

template <typename T>
struct Params {
  const T* q;
  const T* k;
  const T* v;
  const T* A;   // key MLP (H, d, mk), or nullptr (identity key)
  const T* a;   // (H, mk)
  const T* Bm;  // (H, mk, d)
  const T* b;   // (H, d)
  const int8_t* kpm;  // (B, Tk), nonzero = keep, or nullptr
  T* o;
  float* lse;
  float* w;
  int64_t BH;
  int H, Tq, Tk, d, mk;
  float scale;
  bool causal;
  bool vec;  // 16-byte copies allowed (d % 8 == 0 and q, k, v, o 16-byte aligned); fp16/bf16 only
};


// The inducer logits s0 = c(‖q‖² + q·b + Σ_j tanh(q·A[:, j] + a_j)·(B[j, :]·q)) of the RPW query
// rows of this warp (rows in shared memory at qs, pitch P, zero past Tq), written to s0[0..RPW).
// Lanes take the MLP units j (32 at a time); the sums over j reduce across the warp.
template <typename T, int RPW, int P>
__device__ __forceinline__ void inducer_logits(const T* __restrict__ qs, float* __restrict__ s0,
                                               const Params<T>& p, int head, int lane) {
  const int d = p.d;
  float acc[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) acc[r] = 0.0f;
  const T* bvec = p.A != nullptr ? p.b + static_cast<int64_t>(head) * d : nullptr;
  for (int c = lane; c < d; c += 32) {
    const float bc = bvec != nullptr ? to_f(bvec[c]) : 0.0f;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const float qc = to_f(qs[r * P + c]);
      acc[r] = fmaf(qc, qc + bc, acc[r]);
    }
  }
  if (p.A != nullptr) {
    const int mk = p.mk;
    const T* A = p.A + static_cast<int64_t>(head) * d * mk;
    const T* Bm = p.Bm + static_cast<int64_t>(head) * mk * d;
    const T* a = p.a + static_cast<int64_t>(head) * mk;
    for (int j0 = 0; j0 < mk; j0 += 32) {
      const int j = j0 + lane;
      const bool valid = j < mk;
      float z[RPW], y[RPW];
#pragma unroll
      for (int r = 0; r < RPW; ++r) z[r] = y[r] = 0.0f;
      for (int c = 0; c < d; ++c) {
        const float av = valid ? to_f(A[static_cast<int64_t>(c) * mk + j]) : 0.0f;
        const float bv = valid ? to_f(Bm[static_cast<int64_t>(j) * d + c]) : 0.0f;
#pragma unroll
        for (int r = 0; r < RPW; ++r) {
          const float qc = to_f(qs[r * P + c]);
          z[r] = fmaf(qc, av, z[r]);
          y[r] = fmaf(qc, bv, y[r]);
        }
      }
      if (valid) {
        const float aj = to_f(a[j]);
#pragma unroll
        for (int r = 0; r < RPW; ++r) acc[r] = fmaf(tanhf(z[r] + aj), y[r], acc[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const float t = warp_sum(acc[r]);
    if (lane == r) s0[r] = p.scale * t;
  }
}

// 1/l, LSE and w of one row from its LSE (as if the row saw a key), its softmax sum l and s0.
struct RowStats {
  float inv_l, lse, w;
};
__device__ __forceinline__ RowStats finish_row(float lse_if_any, float l, float s0) {
  RowStats r;
  if (l > 0.0f) {
    r.inv_l = 1.0f / l;
    r.lse = lse_if_any;
    r.w = 1.0f / (1.0f + expf(lse_if_any - s0));
  } else {  // no visible key
    r.inv_l = 0.0f;
    r.lse = -INFINITY;
    r.w = 1.0f;
  }
  return r;
}

// Whether query row `row` sees key `col` (causal: col <= row + off; padding: kpm_row[col] != 0).
__device__ __forceinline__ bool key_visible(int col, int row, int off, int Tk, bool causal,
                                            const int8_t* __restrict__ kpm_row) {
  return col < Tk && (!causal || col <= row + off) && (kpm_row == nullptr || kpm_row[col] != 0);
}

// ---------------------------------------------------------------------------------------------
// fp16 / bf16: tensor cores

template <int D>
struct TcCfg {
  static_assert(D % 32 == 0 && D <= 128, "head dim tile");
  static constexpr int BM = 64;  // query rows per CTA (16 per warp)
  static constexpr int BN = 64;  // keys per tile
  static constexpr int PITCH = D + 8;
  static constexpr size_t SMEM =
      static_cast<size_t>(BM + 4 * BN) * PITCH * 2 + static_cast<size_t>(BM) * sizeof(float);
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    inducer_fwd_tc_kernel(const Params<T> p) {
  using C = TcCfg<D>;
  constexpr int BM = C::BM, BN = C::BN, PITCH = C::PITCH;
  constexpr int KT = D / 16;   // k-steps of S = Q·Kᵀ
  constexpr int NB = BN / 8;   // n-blocks of S
  constexpr int OB = D / 8;    // n-blocks of O
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* Qs = reinterpret_cast<T*>(smem_raw);
  T* Kbuf = Qs + BM * PITCH;    // 2 buffers of BN × PITCH
  T* Vbuf = Kbuf + 2 * BN * PITCH;
  float* s0s = reinterpret_cast<float*>(Vbuf + 2 * BN * PITCH);

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int H = p.H, Tq = p.Tq, Tk = p.Tk, d = p.d;
  const int q0 = blockIdx.x * BM;
  const int qw = q0 + warp * 16;  // first query row of this warp
  const int off = Tk - Tq;        // causal: query i sees keys j <= i + off
  int n_end = Tk;
  if (p.causal) {
    const int64_t hi = static_cast<int64_t>(q0) + BM + off;
    n_end = hi < Tk ? (hi > 0 ? static_cast<int>(hi) : 0) : Tk;
  }
  const int n_tiles = (n_end + BN - 1) / BN;
  const float sl = p.scale * kLog2e;
  const int row0 = qw + g, row1 = row0 + 8;
  // ldmatrix row/column offsets of this lane (see ldsm_x4)
  const int lr = lane & 7, lj = lane >> 3;

  for (int64_t bh = blockIdx.y; bh < p.BH; bh += gridDim.y) {
    const int64_t b = bh / H;
    const int head = static_cast<int>(bh - b * H);
    const T* kg = p.k + bh * Tk * d;
    const T* vg = p.v + bh * Tk * d;
    const int8_t* kpm_row = p.kpm != nullptr ? p.kpm + b * Tk : nullptr;

    load_tile<kThreads, T, BM, D, PITCH>(Qs, p.q + (bh * Tq + q0) * d, d, Tq - q0, d, p.vec);
    cp_async_commit();
    if (n_tiles > 0) {
      load_tile<kThreads, T, BN, D, PITCH>(Kbuf, kg, d, Tk, d, p.vec);
      load_tile<kThreads, T, BN, D, PITCH>(Vbuf, vg, d, Tk, d, p.vec);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();

    // prologue: s0 of this warp's rows, and its Q fragments (kept in registers)
    inducer_logits<T, 16, PITCH>(Qs + warp * 16 * PITCH, s0s + warp * 16, p, head, lane);
    uint32_t qf[KT][4];
#pragma unroll
    for (int ks = 0; ks < KT; ++ks) {
      // matrices: (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15), (rows 8-15, k 8-15)
      ldsm_x4(qf[ks], Qs + (warp * 16 + lr + 8 * (lj & 1)) * PITCH + ks * 16 + 8 * (lj >> 1));
    }
    __syncwarp();

    float o[OB][4];
#pragma unroll
    for (int i = 0; i < OB; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;  // rows g and g + 8

    for (int t = 0; t < n_tiles; ++t) {
      if (t + 1 < n_tiles) {
        const int nn = (t + 1) * BN;
        const int nb = (t + 1) & 1;
        load_tile<kThreads, T, BN, D, PITCH>(Kbuf + nb * BN * PITCH,
                                             kg + static_cast<int64_t>(nn) * d, d, Tk - nn, d, p.vec);
        load_tile<kThreads, T, BN, D, PITCH>(Vbuf + nb * BN * PITCH,
                                             vg + static_cast<int64_t>(nn) * d, d, Tk - nn, d, p.vec);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* Ks = Kbuf + (t & 1) * BN * PITCH;
      const T* Vs = Vbuf + (t & 1) * BN * PITCH;
      const int n0 = t * BN;

      // S = Q·Kᵀ (16 × BN per warp)
      float s[NB][4];
#pragma unroll
      for (int i = 0; i < NB; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
      for (int ks = 0; ks < KT; ++ks) {
#pragma unroll
        for (int np = 0; np < BN / 16; ++np) {
          // matrices: (keys 0-7, k 0-7), (keys 0-7, k 8-15), (keys 8-15, k 0-7), (keys 8-15, k 8-15)
          uint32_t kb[4];
          ldsm_x4(kb, Ks + (np * 16 + lr + 8 * (lj >> 1)) * PITCH + ks * 16 + 8 * (lj & 1));
          mma16816<T>(s[2 * np], qf[ks], kb[0], kb[1]);
          mma16816<T>(s[2 * np + 1], qf[ks], kb[2], kb[3]);
        }
      }

      // scale to log2 units, mask
      const bool need_mask = n0 + BN > Tk || kpm_row != nullptr ||
                             (p.causal && n0 + BN - 1 > qw + off);
#pragma unroll
      for (int i = 0; i < NB; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float x = s[i][e] * sl;
          if (need_mask) {
            const int col = n0 + i * 8 + 2 * tig + (e & 1);
            const int row = e < 2 ? row0 : row1;
            if (!key_visible(col, row, off, Tk, p.causal, kpm_row)) x = -INFINITY;
          }
          s[i][e] = x;
        }
      }

      // online softmax (the four lanes of a quad share rows g and g + 8)
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int i = 0; i < NB; ++i) {
        mx0 = fmaxf(mx0, fmaxf(s[i][0], s[i][1]));
        mx1 = fmaxf(mx1, fmaxf(s[i][2], s[i][3]));
      }
#pragma unroll
      for (int sh = 1; sh <= 2; sh <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(kFull, mx0, sh));
        mx1 = fmaxf(mx1, __shfl_xor_sync(kFull, mx1, sh));
      }
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
      const float mu0 = mn0 == -INFINITY ? 0.0f : mn0;
      const float mu1 = mn1 == -INFINITY ? 0.0f : mn1;
      const float al0 = exp2f(m0 - mu0), al1 = exp2f(m1 - mu1);
      m0 = mn0;
      m1 = mn1;
      float ls0 = 0.0f, ls1 = 0.0f;
#pragma unroll
      for (int i = 0; i < NB; ++i) {
        s[i][0] = exp2f(s[i][0] - mu0);
        s[i][1] = exp2f(s[i][1] - mu0);
        s[i][2] = exp2f(s[i][2] - mu1);
        s[i][3] = exp2f(s[i][3] - mu1);
        ls0 += s[i][0] + s[i][1];
        ls1 += s[i][2] + s[i][3];
      }
      l0 = l0 * al0 + ls0;  // per-lane partial sums; reduced over the quad in the epilogue
      l1 = l1 * al1 + ls1;
#pragma unroll
      for (int i = 0; i < OB; ++i) {
        o[i][0] *= al0;
        o[i][1] *= al0;
        o[i][2] *= al1;
        o[i][3] *= al1;
      }

      // O += P·V: the S accumulators of n-blocks 2kk, 2kk+1 are the A fragment of k-step kk
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t pa[4];
        pa[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
        pa[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
        pa[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
        pa[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
        for (int np = 0; np < D / 16; ++np) {
          // transposed matrices: (keys 0-7, dims 0-7), (keys 8-15, dims 0-7), (keys 0-7, dims
          // 8-15), (keys 8-15, dims 8-15)
          uint32_t vb[4];
          ldsm_x4_trans(vb, Vs + (kk * 16 + lr + 8 * (lj & 1)) * PITCH + np * 16 + 8 * (lj >> 1));
          mma16816<T>(o[2 * np], pa, vb[0], vb[1]);
          mma16816<T>(o[2 * np + 1], pa, vb[2], vb[3]);
        }
      }
      __syncthreads();  // the next iteration refills this buffer
    }

    // epilogue
#pragma unroll
    for (int sh = 1; sh <= 2; sh <<= 1) {
      l0 += __shfl_xor_sync(kFull, l0, sh);
      l1 += __shfl_xor_sync(kFull, l1, sh);
    }
    const RowStats r0 = finish_row((m0 + log2f(l0)) * kLn2, l0, s0s[warp * 16 + g]);
    const RowStats r1 = finish_row((m1 + log2f(l1)) * kLn2, l1, s0s[warp * 16 + g + 8]);
    if (tig == 0) {
      if (row0 < Tq) {
        p.lse[bh * Tq + row0] = r0.lse;
        p.w[bh * Tq + row0] = r0.w;
      }
      if (row1 < Tq) {
        p.lse[bh * Tq + row1] = r1.lse;
        p.w[bh * Tq + row1] = r1.w;
      }
    }
    // stage O in this warp's own 16 rows of the Q buffer, then store rows < Tq, columns < d
    T* Os = Qs + warp * 16 * PITCH;
#pragma unroll
    for (int i = 0; i < OB; ++i) {
      const int c = i * 8 + 2 * tig;
      *reinterpret_cast<uint32_t*>(Os + g * PITCH + c) =
          pack2<T>(o[i][0] * r0.inv_l, o[i][1] * r0.inv_l);
      *reinterpret_cast<uint32_t*>(Os + (g + 8) * PITCH + c) =
          pack2<T>(o[i][2] * r1.inv_l, o[i][3] * r1.inv_l);
    }
    __syncwarp();
    T* og = p.o + (bh * Tq + qw) * d;
    const int rows_valid = Tq - qw;
    if (p.vec) {
      constexpr int CPR = D / 8;
      for (int i = lane; i < 16 * CPR; i += 32) {
        const int r = i / CPR;
        const int c = (i - r * CPR) * 8;
        if (r < rows_valid && c < d) {
          *reinterpret_cast<uint4*>(og + static_cast<int64_t>(r) * d + c) =
              *reinterpret_cast<const uint4*>(Os + r * PITCH + c);
        }
      }
    } else {
      for (int i = lane; i < 16 * D; i += 32) {
        const int r = i / D;
        const int c = i - r * D;
        if (r < rows_valid && c < d) og[static_cast<int64_t>(r) * d + c] = Os[r * PITCH + c];
      }
    }
    __syncthreads();  // before the next b·h reloads Q, K, V and s0
  }
}

// ---------------------------------------------------------------------------------------------
// fp32: CUDA cores (correctness path)

template <int D>
struct F32Cfg {
  static_assert(D % 32 == 0 && D <= 128, "head dim tile");
  static constexpr int BM = 32;  // query rows per CTA (4 threads per row, 8 rows per warp)
  static constexpr int BN = 32;  // keys per tile
  static constexpr int QP = D + 1, KP = D + 1, VP = D, PP = BN + 1;
  static constexpr size_t SMEM =
      static_cast<size_t>(BM * QP + BN * KP + BN * VP + BM * PP + BM) * sizeof(float);
};

template <int D>
__global__ void __launch_bounds__(kThreads) inducer_fwd_f32_kernel(const Params<float> p) {
  using C = F32Cfg<D>;
  constexpr int BM = C::BM, BN = C::BN, QP = C::QP, KP = C::KP, VP = C::VP, PP = C::PP;
  constexpr int SJ = BN / 4;  // logits per thread per tile
  constexpr int OD = D / 4;   // output columns per thread
  extern __shared__ __align__(16) unsigned char smem_raw[];
  float* Qs = reinterpret_cast<float*>(smem_raw);
  float* Ks = Qs + BM * QP;
  float* Vs = Ks + BN * KP;
  float* Ps = Vs + BN * VP;
  float* s0s = Ps + BM * PP;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r = tid >> 2, q4 = tid & 3;  // this thread's query row in the tile and quad lane
  const int H = p.H, Tq = p.Tq, Tk = p.Tk, d = p.d;
  const int q0 = blockIdx.x * BM;
  const int row = q0 + r;
  const int off = Tk - Tq;
  int n_end = Tk;
  if (p.causal) {
    const int64_t hi = static_cast<int64_t>(q0) + BM + off;
    n_end = hi < Tk ? (hi > 0 ? static_cast<int>(hi) : 0) : Tk;
  }
  const int n_tiles = (n_end + BN - 1) / BN;

  for (int64_t bh = blockIdx.y; bh < p.BH; bh += gridDim.y) {
    const int64_t b = bh / H;
    const int head = static_cast<int>(bh - b * H);
    const float* kg = p.k + bh * Tk * d;
    const float* vg = p.v + bh * Tk * d;
    const int8_t* kpm_row = p.kpm != nullptr ? p.kpm + b * Tk : nullptr;
    const float* qg = p.q + (bh * Tq + q0) * d;
    for (int i = tid; i < BM * D; i += kThreads) {
      const int rr = i / D, c = i - rr * D;
      Qs[rr * QP + c] = (q0 + rr < Tq && c < d) ? qg[static_cast<int64_t>(rr) * d + c] : 0.0f;
    }
    __syncthreads();
    inducer_logits<float, 8, QP>(Qs + warp * 8 * QP, s0s + warp * 8, p, head, lane);

    float o[OD];
#pragma unroll
    for (int i = 0; i < OD; ++i) o[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    for (int t = 0; t < n_tiles; ++t) {
      const int n0 = t * BN;
      for (int i = tid; i < BN * D; i += kThreads) {
        const int rr = i / D, c = i - rr * D;
        const bool ok = n0 + rr < Tk && c < d;
        const int64_t gi = static_cast<int64_t>(n0 + rr) * d + c;
        Ks[rr * KP + c] = ok ? kg[gi] : 0.0f;
        Vs[rr * VP + c] = ok ? vg[gi] : 0.0f;
      }
      __syncthreads();
      float s[SJ];
#pragma unroll
      for (int i = 0; i < SJ; ++i) s[i] = 0.0f;
#pragma unroll 4
      for (int c = 0; c < D; ++c) {
        const float qv = Qs[r * QP + c];
#pragma unroll
        for (int i = 0; i < SJ; ++i) s[i] = fmaf(qv, Ks[(q4 + 4 * i) * KP + c], s[i]);
      }
      float mx = -INFINITY;
#pragma unroll
      for (int i = 0; i < SJ; ++i) {
        const int col = n0 + q4 + 4 * i;
        s[i] = key_visible(col, row, off, Tk, p.causal, kpm_row) ? s[i] * p.scale
                                                                           : -INFINITY;
        mx = fmaxf(mx, s[i]);
      }
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
      const float mn = fmaxf(m, mx);
      const float mu = mn == -INFINITY ? 0.0f : mn;
      const float alpha = expf(m - mu);
      m = mn;
      float ls = 0.0f;
#pragma unroll
      for (int i = 0; i < SJ; ++i) {
        const float pv = expf(s[i] - mu);
        ls += pv;
        Ps[r * PP + q4 + 4 * i] = pv;
      }
      l = l * alpha + ls;
      __syncwarp();  // the row's P comes from the four lanes of this quad
#pragma unroll
      for (int i = 0; i < OD; ++i) o[i] *= alpha;
#pragma unroll 2
      for (int j = 0; j < BN; ++j) {
        const float pj = Ps[r * PP + j];
#pragma unroll
        for (int i = 0; i < OD; ++i) o[i] = fmaf(pj, Vs[j * VP + q4 + 4 * i], o[i]);
      }
      __syncthreads();  // before the next tile overwrites K, V, P
    }
    l += __shfl_xor_sync(kFull, l, 1);
    l += __shfl_xor_sync(kFull, l, 2);
    __syncwarp();
    const RowStats st = finish_row(m + logf(l), l, s0s[r]);
    if (row < Tq) {
      if (q4 == 0) {
        p.lse[bh * Tq + row] = st.lse;
        p.w[bh * Tq + row] = st.w;
      }
      float* og = p.o + (bh * Tq + row) * d;
#pragma unroll
      for (int i = 0; i < OD; ++i) {
        const int c = q4 + 4 * i;
        if (c < d) og[c] = o[i] * st.inv_l;
      }
    }
    __syncthreads();  // before the next b·h reloads Q and s0
  }
}

// ---------------------------------------------------------------------------------------------
// host side

template <typename S>
struct Raw;
template <>
struct Raw<float> {
  using type = float;
};
template <>
struct Raw<c10::Half> {
  using type = __half;
};
template <>
struct Raw<c10::BFloat16> {
  using type = __nv_bfloat16;
};

constexpr const char* kOp = "kadapt::inducer_attention_fwd";

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

// Opts a kernel into `bytes` of dynamic shared memory on the current device (once per device).
template <typename K>
void set_smem(K kernel, size_t bytes, std::atomic<uint64_t>& done) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), kOp, ": this head dim needs ", bytes,
              " bytes of shared memory per block, but device ", dev, " allows only ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (bit != 0) done.fetch_or(bit, std::memory_order_relaxed);
}

template <typename S>
Params<typename Raw<S>::type> make_params(const at::Tensor& q, const at::Tensor& k,
                                          const at::Tensor& v, const at::Tensor* A,
                                          const at::Tensor* a, const at::Tensor* Bm,
                                          const at::Tensor* b, const at::Tensor* kpm,
                                          at::Tensor& o, at::Tensor& lse, at::Tensor& w,
                                          double scale, bool causal) {
  using T = typename Raw<S>::type;
  auto c = [](const at::Tensor* t) {
    return t != nullptr ? reinterpret_cast<const T*>(t->const_data_ptr()) : nullptr;
  };
  Params<T> p;
  p.q = c(&q);
  p.k = c(&k);
  p.v = c(&v);
  p.A = c(A);
  p.a = c(a);
  p.Bm = c(Bm);
  p.b = c(b);
  p.kpm = kpm != nullptr ? reinterpret_cast<const int8_t*>(kpm->const_data_ptr()) : nullptr;
  p.o = reinterpret_cast<T*>(o.mutable_data_ptr());
  p.lse = lse.mutable_data_ptr<float>();
  p.w = w.mutable_data_ptr<float>();
  p.BH = q.size(0) * q.size(1);
  p.H = static_cast<int>(q.size(1));
  p.Tq = static_cast<int>(q.size(2));
  p.Tk = static_cast<int>(k.size(2));
  p.d = static_cast<int>(q.size(3));
  p.mk = A != nullptr ? static_cast<int>(A->size(2)) : 0;
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.vec = sizeof(T) == 2 && p.d % 8 == 0 && aligned16(p.q) && aligned16(p.k) && aligned16(p.v) &&
          aligned16(p.o);
  return p;
}

dim3 grid_for(int64_t Tq, int BM, int64_t BH) {
  const int64_t gx = (Tq + BM - 1) / BM;
  TORCH_CHECK(gx <= 0x7fffffff, kOp, ": too many query rows (Tq = ", Tq, ")");
  const int64_t gy = BH < 65535 ? BH : 65535;  // larger B·H: the kernels loop over b·h
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy), 1);
}

template <typename T, int D>
void launch_tc(const Params<T>& p, cudaStream_t stream) {
  using C = TcCfg<D>;
  static std::atomic<uint64_t> done{0};
  auto kernel = inducer_fwd_tc_kernel<T, D>;
  set_smem(kernel, C::SMEM, done);
  kernel<<<grid_for(p.Tq, C::BM, p.BH), kThreads, C::SMEM, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int D>
void launch_f32(const Params<float>& p, cudaStream_t stream) {
  using C = F32Cfg<D>;
  static std::atomic<uint64_t> done{0};
  auto kernel = inducer_fwd_f32_kernel<D>;
  set_smem(kernel, C::SMEM, done);
  kernel<<<grid_for(p.Tq, C::BM, p.BH), kThreads, C::SMEM, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The head dim the kernels are instantiated for: d padded to 32, 64, 96 or 128.
int padded_head_dim(int64_t d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : 128; }

template <typename T>
void dispatch_tc(const Params<T>& p, cudaStream_t stream) {
  switch (padded_head_dim(p.d)) {
    case 32: return launch_tc<T, 32>(p, stream);
    case 64: return launch_tc<T, 64>(p, stream);
    case 96: return launch_tc<T, 96>(p, stream);
    default: return launch_tc<T, 128>(p, stream);
  }
}

void dispatch_f32(const Params<float>& p, cudaStream_t stream) {
  switch (padded_head_dim(p.d)) {
    case 32: return launch_f32<32>(p, stream);
    case 64: return launch_f32<64>(p, stream);
    case 96: return launch_f32<96>(p, stream);
    default: return launch_f32<128>(p, stream);
  }
}

void check_input(const at::Tensor& t, const char* name, const at::Tensor& q) {
  TORCH_CHECK(t.device() == q.device(), kOp, ": ", name, " is on ", t.device(), " but q is on ",
              q.device(), "; all tensors must be on one CUDA device");
  TORCH_CHECK(t.scalar_type() == q.scalar_type(), kOp, ": ", name, " has dtype ", t.scalar_type(),
              " but q has dtype ", q.scalar_type(), "; q, k, v and the key MLP must share one dtype");
  TORCH_CHECK(t.is_contiguous(), kOp, ": ", name, " must be contiguous");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> inducer_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& A_k, const std::optional<at::Tensor>& a_k,
    const std::optional<at::Tensor>& B_k, const std::optional<at::Tensor>& b_k,
    const std::optional<at::Tensor>& kpm, double scale, bool causal) {
  TORCH_CHECK(q.is_cuda(), kOp, ": q must be a CUDA tensor, got ", q.device());
  const auto dtype = q.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              ": q has dtype ", dtype, "; supported dtypes are float32, float16 and bfloat16");
  TORCH_CHECK(q.dim() == 4, kOp, ": q must be 4-D (B, H, Tq, d), got shape ", q.sizes());
  TORCH_CHECK(q.is_contiguous(), kOp, ": q must be contiguous");
  const int64_t B = q.size(0), H = q.size(1), Tq = q.size(2), d = q.size(3);
  TORCH_CHECK(d >= 1 && d <= kInducerMaxHeadDim, kOp, ": q: head dim d=", d, " must be in 1..",
              kInducerMaxHeadDim);
  check_input(k, "k", q);
  check_input(v, "v", q);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(1) == H && k.size(3) == d, kOp,
              ": k must have shape (B, H, Tk, d) = (", B, ", ", H, ", Tk, ", d, "), got ",
              k.sizes());
  const int64_t Tk = k.size(2);
  TORCH_CHECK(v.sizes() == k.sizes(), kOp, ": v must have the shape of k ", k.sizes(), ", got ",
              v.sizes());
  TORCH_CHECK(Tq < (int64_t{1} << 30) && Tk < (int64_t{1} << 30), kOp,
              ": sequence lengths must be below 2^30, got Tq = ", Tq, ", Tk = ", Tk);
  TORCH_CHECK(std::isfinite(static_cast<float>(scale)), kOp, ": scale must be finite, got ", scale);

  const bool has_mlp = A_k.has_value();
  TORCH_CHECK(a_k.has_value() == has_mlp && B_k.has_value() == has_mlp &&
                  b_k.has_value() == has_mlp,
              kOp, ": the key MLP needs all of A_k, a_k, B_k, b_k (or none for the identity key)");
  int64_t mk = 0;
  if (has_mlp) {
    check_input(*A_k, "A_k", q);
    check_input(*a_k, "a_k", q);
    check_input(*B_k, "B_k", q);
    check_input(*b_k, "b_k", q);
    TORCH_CHECK(A_k->dim() == 3 && A_k->size(0) == H && A_k->size(1) == d && A_k->size(2) >= 1,
                kOp, ": A_k must have shape (H, d, m_k) = (", H, ", ", d, ", m_k ≥ 1), got ",
                A_k->sizes());
    mk = A_k->size(2);
    TORCH_CHECK(mk <= kInducerMaxKeyMlp, kOp, ": key-MLP width m_k=", mk,
                " exceeds the kernel's limit of ", kInducerMaxKeyMlp);
    TORCH_CHECK(a_k->dim() == 2 && a_k->size(0) == H && a_k->size(1) == mk, kOp,
                ": a_k must have shape (H, m_k) = (", H, ", ", mk, "), got ", a_k->sizes());
    TORCH_CHECK(B_k->dim() == 3 && B_k->size(0) == H && B_k->size(1) == mk && B_k->size(2) == d,
                kOp, ": B_k must have shape (H, m_k, d) = (", H, ", ", mk, ", ", d, "), got ",
                B_k->sizes());
    TORCH_CHECK(b_k->dim() == 2 && b_k->size(0) == H && b_k->size(1) == d, kOp,
                ": b_k must have shape (H, d) = (", H, ", ", d, "), got ", b_k->sizes());
  }
  if (kpm.has_value()) {
    TORCH_CHECK(kpm->device() == q.device(), kOp, ": kpm is on ", kpm->device(),
                " but q is on ", q.device(), "; all tensors must be on one CUDA device");
    TORCH_CHECK(kpm->scalar_type() == at::kChar || kpm->scalar_type() == at::kBool, kOp,
                ": kpm must be an int8 (or bool) key padding mask (nonzero = keep), got dtype ",
                kpm->scalar_type());
    TORCH_CHECK(kpm->dim() == 2 && kpm->size(0) == B && kpm->size(1) == Tk, kOp,
                ": kpm must have shape (B, Tk) = (", B, ", ", Tk, "), got ", kpm->sizes());
    TORCH_CHECK(kpm->is_contiguous(), kOp, ": kpm must be contiguous");
  }

  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor o = at::empty(q.sizes(), q.options());
  at::Tensor lse = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  at::Tensor w = at::empty({B, H, Tq}, q.options().dtype(at::kFloat));
  if (B * H * Tq == 0) return {o, lse, w};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(q.get_device()).stream();
  const at::Tensor* A = has_mlp ? &*A_k : nullptr;
  const at::Tensor* a = has_mlp ? &*a_k : nullptr;
  const at::Tensor* Bm = has_mlp ? &*B_k : nullptr;
  const at::Tensor* b = has_mlp ? &*b_k : nullptr;
  const at::Tensor* mask = kpm.has_value() ? &*kpm : nullptr;
  switch (dtype) {
    case at::kFloat:
      dispatch_f32(make_params<float>(q, k, v, A, a, Bm, b, mask, o, lse, w, scale, causal),
                   stream);
      break;
    case at::kHalf:
      dispatch_tc(make_params<c10::Half>(q, k, v, A, a, Bm, b, mask, o, lse, w, scale, causal),
                  stream);
      break;
    default:
      dispatch_tc(
          make_params<c10::BFloat16>(q, k, v, A, a, Bm, b, mask, o, lse, w, scale, causal),
          stream);
      break;
  }
  return {o, lse, w};
}

}  // namespace kadapt
