// Fused bottleneck-adapter forward and backward, and the Kronecker (PHM) weight builder
// (METHODS.md §12.3, §12.4).
//
// Row-vector convention, x (T, D) contiguous, W_d (D, m) and W_u (m, D) row-major:
//
//   fused_adapter_fwd:  z = x·W_d + b_d                  (fp32 accumulation, returned fp32 (T, m))
//                       h = φ(z)                         (rounded to the compute dtype)
//                       y = h·W_u + b_u [+ x] [+ residual]
//   fused_adapter_bwd:  g_h = dy·W_uᵀ                    (fp32)
//                       g_z = g_h ⊙ φ'(z)                (returned in the compute dtype)
//                       dx  = g_z·W_dᵀ [+ dy]            (g_z rounded first, as the caller sees it)
//                       h = φ(z), db_up = Σ_t dy_t        (fp32)
//   kron_weight:        W[(c,κ),(a,p)] = Σ_i A[i,c,a]·B_i[κ,p], B_i = s_i·t_i when t is given.
//
// Design of the adapter kernels (one CTA of 256 threads = 8 warps per tile of TM tokens):
//   * The bottleneck is padded to MP ∈ {16, 32, 64, 128, 256} (template parameter); padded
//     columns are zero-filled in shared memory, so they contribute nothing.
//   * Phase 1 streams the token tile of x (or dy) and the matching rows of W_d (or columns of
//     W_u) through shared memory in D-chunks of KC columns, with an S1-stage cp.async pipeline,
//     and accumulates the TM×MP product in tensor-core fragments (WMMA 16×16×16, fp32
//     accumulators) for fp16/bf16, or in an FMA emulation of the same fragment interface for
//     fp32 (correctness path).
//   * The TM×MP result goes to shared memory, where bias/activation (forward) or the activation
//     derivative (backward) is applied in fp32, and h (or g_z) is kept in shared memory in the
//     compute dtype.
//   * Phase 2 streams, in D-chunks through an S2-stage pipeline, the other weight, the tile of
//     x / residual (forward) or dy (backward) to add, and the b_u chunk (forward); it multiplies,
//     stages the fp32 result in shared memory and writes the output chunk with coalesced
//     (16-byte when aligned) stores.
//   * Tails: rows past T, columns past D and bottleneck columns past m are zero-filled on load
//     (cp.async with a partial source size, or plain stores of zeros) and masked on store.
//   * 16-byte loads/stores are used only when the row length and every base pointer allow it
//     (checked on the host); otherwise the same tiles are loaded element by element.
//   * db_up: every CTA writes per-column partial sums of its dy tile (NG row groups) into an
//     fp32 workspace, reduced by a second small kernel (deterministic, no atomics).
//
// Includes are deliberately lean (no <torch/extension.h>, no ATen/cuda/CUDAContext.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <atomic>
#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "device_common.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "kadapt's fused adapter kernels need sm_80 or newer (bf16 WMMA, cp.async): set TORCH_CUDA_ARCH_LIST"
#endif

namespace kadapt {

// The largest bottleneck the fused adapter kernels take (kadapt/_extension.py mirrors it).
constexpr int64_t kMaxBottleneck = 256;

namespace {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

enum Activation : int { kGeluTanh = 0, kGelu = 1, kRelu = 2, kSwish = 3 };

// ---------------------------------------------------------------------------------------------
// activations (to_f / from_f, cp.async and load_tile: device_common.cuh)

__device__ __forceinline__ float act_fwd(float z, int act) {
  switch (act) {
    case kGeluTanh: {  // gelu_new: ½z(1 + tanh(√(2/π)(z + 0.044715z³)))
      const float k = 0.7978845608028654f * (z + 0.044715f * z * z * z);
      return 0.5f * z * (1.0f + tanhf(k));
    }
    case kGelu:
      return 0.5f * z * (1.0f + erff(z * 0.7071067811865476f));
    case kRelu:
      return z > 0.0f ? z : 0.0f;
    default: {  // swish / silu
      const float s = 1.0f / (1.0f + expf(-z));
      return z * s;
    }
  }
}

__device__ __forceinline__ float act_grad(float z, int act) {
  switch (act) {
    case kGeluTanh: {  // ½(1 + tanh κ) + ½z(1 − tanh²κ)√(2/π)(1 + 0.134145z²)
      const float c = 0.7978845608028654f;
      const float th = tanhf(c * (z + 0.044715f * z * z * z));
      return 0.5f * (1.0f + th) + 0.5f * z * (1.0f - th * th) * c * (1.0f + 0.134145f * z * z);
    }
    case kGelu:  // Φ(z) + z·pdf(z)
      return 0.5f * (1.0f + erff(z * 0.7071067811865476f)) +
             z * 0.3989422804014327f * expf(-0.5f * z * z);
    case kRelu:
      return z > 0.0f ? 1.0f : 0.0f;
    default: {  // swish: σ(z)(1 + z(1 − σ(z)))
      const float s = 1.0f / (1.0f + expf(-z));
      return s * (1.0f + z * (1.0f - s));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// 16×16 warp tiles: WMMA for fp16/bf16, an FMA emulation with the same interface for fp32.
// A is a 16×16 row-major tile; B a 16×16 tile, row-major (B[k][n] = p[k·ld + n]) or, with
// B_COL, column-major (B[k][n] = p[n·ld + k]); C an fp32 16×16 accumulator.

template <typename T, bool B_COL>
struct Mma {
  using Blay = std::conditional_t<B_COL, wmma::col_major, wmma::row_major>;
  using A = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
  using B = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, Blay>;
  using C = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  static __device__ __forceinline__ void zero(C& c) { wmma::fill_fragment(c, 0.0f); }
  static __device__ __forceinline__ void load_a(A& a, const T* p, int ld) {
    wmma::load_matrix_sync(a, p, ld);
  }
  static __device__ __forceinline__ void load_b(B& b, const T* p, int ld) {
    wmma::load_matrix_sync(b, p, ld);
  }
  static __device__ __forceinline__ void mma(C& c, const A& a, const B& b) {
    wmma::mma_sync(c, a, b, c);
  }
  static __device__ __forceinline__ void load_c(C& c, const float* p, int ld) {
    wmma::load_matrix_sync(c, p, ld, wmma::mem_row_major);
  }
  static __device__ __forceinline__ void store_c(float* p, const C& c, int ld) {
    wmma::store_matrix_sync(p, c, ld, wmma::mem_row_major);
  }
};

template <bool B_COL>
struct Mma<float, B_COL> {
  struct A {
    const float* p;
    int ld;
  };
  using B = A;
  struct C {
    static constexpr int num_elements = 8;
    float x[8];
  };
  // lane l owns row l/2, columns 8·(l%2) .. 8·(l%2)+7 of the 16×16 tile
  static __device__ __forceinline__ int row() { return (threadIdx.x & 31) >> 1; }
  static __device__ __forceinline__ int col() { return (threadIdx.x & 1) * 8; }
  static __device__ __forceinline__ void zero(C& c) {
#pragma unroll
    for (int e = 0; e < 8; ++e) c.x[e] = 0.0f;
  }
  static __device__ __forceinline__ void load_a(A& a, const float* p, int ld) { a = A{p, ld}; }
  static __device__ __forceinline__ void load_b(B& b, const float* p, int ld) { b = B{p, ld}; }
  static __device__ __forceinline__ void mma(C& c, const A& a, const B& b) {
    const int r = row(), c0 = col();
#pragma unroll 4
    for (int k = 0; k < 16; ++k) {
      const float av = a.p[r * a.ld + k];
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float bv = B_COL ? b.p[(c0 + e) * b.ld + k] : b.p[k * b.ld + c0 + e];
        c.x[e] = fmaf(av, bv, c.x[e]);
      }
    }
  }
  static __device__ __forceinline__ void load_c(C& c, const float* p, int ld) {
    const int r = row(), c0 = col();
#pragma unroll
    for (int e = 0; e < 8; ++e) c.x[e] = p[r * ld + c0 + e];
  }
  static __device__ __forceinline__ void store_c(float* p, const C& c, int ld) {
    const int r = row(), c0 = col();
#pragma unroll
    for (int e = 0; e < 8; ++e) p[r * ld + c0 + e] = c.x[e];
  }
};

// ---------------------------------------------------------------------------------------------
// Tile configuration and shared-memory layout (host and device).

constexpr size_t r128(size_t b) { return (b + 127) / 128 * 128; }
constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }

template <typename T, int MP_>
struct Cfg {
  static constexpr int MP = MP_;  // padded bottleneck
  static constexpr bool F32 = sizeof(T) == 4;
  static constexpr int TM = (MP >= 256 || (F32 && MP >= 128)) ? 32 : 64;  // tokens per CTA
  static constexpr int KC = F32 ? 32 : 64;                                // D-chunk
  static constexpr int S1 = F32 ? 2 : (MP <= 64 ? 4 : (MP <= 128 ? 3 : 2));  // phase-1 stages
  static constexpr int S2 = F32 ? 2 : (MP <= 64 ? 3 : 2);                    // phase-2 stages
  static constexpr int V = 16 / static_cast<int>(sizeof(T));  // elements per 16 bytes
  static constexpr int XP = KC + V;                            // pitch of [.][KC] tiles
  static constexpr int MPP = MP + V;                           // pitch of [.][MP] tiles
  static constexpr int ZP = MP + 4;                            // pitch of fp32 [TM][MP]
  static constexpr int YP = KC + 4;                            // pitch of fp32 [TM][KC]
  static constexpr int RT = TM / 16;                           // row tiles
  static constexpr int WPR = kWarps / RT;                      // warps sharing a row tile
  static constexpr int NQM = (MP / 16 + WPR - 1) / WPR;        // MP-wide col tiles per warp
  static constexpr int NQK = (KC / 16 + WPR - 1) / WPR;        // KC-wide col tiles per warp
  static constexpr int NG = kThreads / KC;                     // db_up row groups per CTA

  static constexpr size_t X_TILE = r128(sizeof(T) * TM * XP);   // x / dy / residual chunk
  static constexpr size_t WD_TILE = r128(sizeof(T) * KC * MPP); // W_d rows d0..d0+KC
  static constexpr size_t WU_TILE = r128(sizeof(T) * MP * XP);  // W_u columns d0..d0+KC
  static constexpr size_t H_TILE = r128(sizeof(T) * TM * MPP);  // h or g_z
  static constexpr size_t Z_BUF = r128(sizeof(float) * TM * ZP);
  static constexpr size_t Y_BUF = r128(sizeof(float) * TM * YP);
  static constexpr size_t B_TILE = r128(sizeof(T) * KC);         // b_up chunk

  // forward: region R = phase-1 stages | (z buffer, later y buffer) + phase-2 stages; then h
  static constexpr size_t F_SB1 = X_TILE + WD_TILE;
  static constexpr size_t F_SB2 = WU_TILE + 2 * X_TILE + B_TILE;
  static constexpr size_t F_ST2 = cmax(Z_BUF, Y_BUF);
  static constexpr size_t F_R = cmax(S1 * F_SB1, F_ST2 + S2 * F_SB2);
  static constexpr size_t F_SMEM = F_R + H_TILE;

  // backward: z buffer | region R = phase-1 stages | (g_z tile, dx buffer, phase-2 stages)
  static constexpr size_t B_SB1 = X_TILE + WU_TILE;
  static constexpr size_t B_SB2 = WD_TILE + X_TILE;
  static constexpr size_t B_ST2 = H_TILE + Y_BUF;
  static constexpr size_t B_R = cmax(S1 * B_SB1, B_ST2 + S2 * B_SB2);
  static constexpr size_t B_SMEM = Z_BUF + B_R;

  static_assert(TM % 16 == 0 && kWarps % RT == 0, "warp tiling");
  static_assert(kThreads % KC == 0 && TM % NG == 0, "db_up row groups");
  static_assert(S1 >= 2 && S2 >= 2, "pipeline depth");
  // Every configuration fits the 163 KiB opt-in limit of sm_80 (A100); H100 allows 227 KiB.
  static_assert(F_SMEM <= 166912 && B_SMEM <= 166912, "shared memory beyond sm_80's limit");
};

// ---------------------------------------------------------------------------------------------
// forward

template <typename T, int MP>
__global__ void __launch_bounds__(kThreads)
fused_adapter_fwd_kernel(const T* __restrict__ x, const T* __restrict__ res,
                         const T* __restrict__ wd, const T* __restrict__ bd,
                         const T* __restrict__ wu, const T* __restrict__ bu, T* __restrict__ y,
                         float* __restrict__ z, int64_t T_, int64_t D, int m, int act,
                         bool add_input, bool vec_x, bool vec_w, bool vec_b) {
  using C = Cfg<T, MP>;
  using M1 = Mma<T, false>;
  constexpr int TM = C::TM, KC = C::KC, S1 = C::S1, S2 = C::S2, V = C::V;
  constexpr int XP = C::XP, MPP = C::MPP, ZP = C::ZP, YP = C::YP;
  constexpr int RT = C::RT, WPR = C::WPR;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wi = warp % RT;   // row tile of this warp
  const int wj0 = warp / RT;  // first column tile; then wj0 + WPR, ...
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TM;
  const int ntok = static_cast<int>(T_ - t0 < TM ? T_ - t0 : TM);
  const int nk = static_cast<int>((D + KC - 1) / KC);
  const bool has_res = res != nullptr;

  auto st1_x = [&](int s) { return reinterpret_cast<T*>(smem + s * C::F_SB1); };
  auto st1_w = [&](int s) { return reinterpret_cast<T*>(smem + s * C::F_SB1 + C::X_TILE); };
  float* zbuf = reinterpret_cast<float*>(smem);  // after phase 1
  float* ybuf = reinterpret_cast<float*>(smem);  // phase 2
  auto st2_w = [&](int s) { return reinterpret_cast<T*>(smem + C::F_ST2 + s * C::F_SB2); };
  auto st2_x = [&](int s) {
    return reinterpret_cast<T*>(smem + C::F_ST2 + s * C::F_SB2 + C::WU_TILE);
  };
  auto st2_r = [&](int s) {
    return reinterpret_cast<T*>(smem + C::F_ST2 + s * C::F_SB2 + C::WU_TILE + C::X_TILE);
  };
  auto st2_b = [&](int s) {
    return reinterpret_cast<T*>(smem + C::F_ST2 + s * C::F_SB2 + C::WU_TILE + 2 * C::X_TILE);
  };
  T* hbuf = reinterpret_cast<T*>(smem + C::F_R);

  // ---- phase 1: z = x·W_d ------------------------------------------------------------------
  auto load1 = [&](int k) {
    if (k < nk) {
      const int64_t d0 = static_cast<int64_t>(k) * KC;
      const int dv = static_cast<int>(D - d0 < KC ? D - d0 : KC);
      load_tile<kThreads, T, TM, KC, XP>(st1_x(k % S1), x + t0 * D + d0, D, ntok, dv, vec_x);
      load_tile<kThreads, T, KC, MP, MPP>(st1_w(k % S1), wd + d0 * m, m, dv, m, vec_w);
    }
    cp_async_commit();
  };
  typename M1::C acc[C::NQM];
#pragma unroll
  for (int q = 0; q < C::NQM; ++q) M1::zero(acc[q]);
#pragma unroll
  for (int k = 0; k < S1 - 1; ++k) load1(k);
  for (int k = 0; k < nk; ++k) {
    cp_async_wait<S1 - 2>();
    __syncthreads();  // chunk k landed for everyone; stage (k-1)%S1 is free
    load1(k + S1 - 1);
    const T* xs = st1_x(k % S1);
    const T* ws = st1_w(k % S1);
#pragma unroll
    for (int ks = 0; ks < KC / 16; ++ks) {
      typename M1::A a;
      M1::load_a(a, xs + wi * 16 * XP + ks * 16, XP);
#pragma unroll
      for (int q = 0; q < C::NQM; ++q) {
        const int j = wj0 + q * WPR;
        if (j < MP / 16) {
          typename M1::B b;
          M1::load_b(b, ws + ks * 16 * MPP + j * 16, MPP);
          M1::mma(acc[q], a, b);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // all warps are done with the phase-1 stages

  // ---- phase 2 prefetch (its stages lie beyond the z buffer) ----------------------------------
  auto load2 = [&](int c) {
    if (c < nk) {
      const int64_t d0 = static_cast<int64_t>(c) * KC;
      const int dv = static_cast<int>(D - d0 < KC ? D - d0 : KC);
      const int s = c % S2;
      load_tile<kThreads, T, MP, KC, XP>(st2_w(s), wu + d0, D, m, dv, vec_x);
      load_tile<kThreads, T, 1, KC, KC>(st2_b(s), bu + d0, 0, 1, dv, vec_b);
      if (add_input)
        load_tile<kThreads, T, TM, KC, XP>(st2_x(s), x + t0 * D + d0, D, ntok, dv, vec_x);
      if (has_res)
        load_tile<kThreads, T, TM, KC, XP>(st2_r(s), res + t0 * D + d0, D, ntok, dv, vec_x);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int c = 0; c < S2 - 1; ++c) load2(c);

  // ---- z + b_d, h = φ(z) ----------------------------------------------------------------------
#pragma unroll
  for (int q = 0; q < C::NQM; ++q) {
    const int j = wj0 + q * WPR;
    if (j < MP / 16) M1::store_c(zbuf + wi * 16 * ZP + j * 16, acc[q], ZP);
  }
  __syncthreads();
  for (int i = tid; i < TM * MP; i += kThreads) {
    const int t = i / MP;
    const int j = i - t * MP;
    float hv = 0.0f;
    if (j < m) {
      const float zv = zbuf[t * ZP + j] + to_f(bd[j]);
      if (t < ntok) z[(t0 + t) * m + j] = zv;
      hv = act_fwd(zv, act);
    }
    hbuf[t * MPP + j] = from_f<T>(hv);
  }

  // ---- phase 2: y = h·W_u + b_u [+ x] [+ residual], chunk by chunk ---------------------------
  for (int c = 0; c < nk; ++c) {
    cp_async_wait<S2 - 2>();
    __syncthreads();  // chunk c landed, h complete, y buffer and stage (c-1)%S2 free
    load2(c + S2 - 1);
    const int s = c % S2;
    const T* ws = st2_w(s);
    typename M1::C acc2[C::NQK];
#pragma unroll
    for (int q = 0; q < C::NQK; ++q) M1::zero(acc2[q]);
#pragma unroll
    for (int ks = 0; ks < MP / 16; ++ks) {
      typename M1::A a;
      M1::load_a(a, hbuf + wi * 16 * MPP + ks * 16, MPP);
#pragma unroll
      for (int q = 0; q < C::NQK; ++q) {
        const int j = wj0 + q * WPR;
        if (j < KC / 16) {
          typename M1::B b;
          M1::load_b(b, ws + ks * 16 * XP + j * 16, XP);
          M1::mma(acc2[q], a, b);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < C::NQK; ++q) {
      const int j = wj0 + q * WPR;
      if (j < KC / 16) M1::store_c(ybuf + wi * 16 * YP + j * 16, acc2[q], YP);
    }
    __syncthreads();

    const int64_t d0 = static_cast<int64_t>(c) * KC;
    const T* xs = st2_x(s);
    const T* rs = st2_r(s);
    const T* bs = st2_b(s);
    if (vec_x) {
      constexpr int CPR = KC / V;
      for (int i = tid; i < TM * CPR; i += kThreads) {
        const int t = i / CPR;
        const int cc = (i - t * CPR) * V;
        if (t >= ntok || d0 + cc >= D) continue;  // D % V == 0: the vector is all in or all out
        float v[V];
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = ybuf[t * YP + cc + e] + to_f(bs[cc + e]);
        if (add_input) {
          alignas(16) T tmp[V];
          *reinterpret_cast<uint4*>(tmp) = *reinterpret_cast<const uint4*>(xs + t * XP + cc);
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] += to_f(tmp[e]);
        }
        if (has_res) {
          alignas(16) T tmp[V];
          *reinterpret_cast<uint4*>(tmp) = *reinterpret_cast<const uint4*>(rs + t * XP + cc);
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] += to_f(tmp[e]);
        }
        alignas(16) T out[V];
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] = from_f<T>(v[e]);
        *reinterpret_cast<uint4*>(y + (t0 + t) * D + d0 + cc) = *reinterpret_cast<const uint4*>(out);
      }
    } else {
      for (int i = tid; i < TM * KC; i += kThreads) {
        const int t = i / KC;
        const int cc = i - t * KC;
        if (t >= ntok || d0 + cc >= D) continue;
        float v = ybuf[t * YP + cc] + to_f(bs[cc]);
        if (add_input) v += to_f(xs[t * XP + cc]);
        if (has_res) v += to_f(rs[t * XP + cc]);
        y[(t0 + t) * D + d0 + cc] = from_f<T>(v);
      }
    }
  }
  cp_async_wait<0>();  // nothing may be in flight when the CTA exits (only empty groups remain)
}

// ---------------------------------------------------------------------------------------------
// backward

template <typename T, int MP>
__global__ void __launch_bounds__(kThreads)
fused_adapter_bwd_kernel(const T* __restrict__ dy, const float* __restrict__ z,
                         const T* __restrict__ wd, const T* __restrict__ wu,
                         T* __restrict__ dx, T* __restrict__ gz_out, T* __restrict__ h_out,
                         float* __restrict__ db_part, int64_t T_, int64_t D, int m, int act,
                         bool add_input, bool vec_x, bool vec_w, bool vec_z) {
  using C = Cfg<T, MP>;
  using M1 = Mma<T, true>;  // both products take the weight transposed: B column-major
  constexpr int TM = C::TM, KC = C::KC, S1 = C::S1, S2 = C::S2, V = C::V;
  constexpr int XP = C::XP, MPP = C::MPP, ZP = C::ZP, YP = C::YP;
  constexpr int RT = C::RT, WPR = C::WPR, NG = C::NG;
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int wi = warp % RT;
  const int wj0 = warp / RT;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TM;
  const int ntok = static_cast<int>(T_ - t0 < TM ? T_ - t0 : TM);
  const int nk = static_cast<int>((D + KC - 1) / KC);

  float* zbuf = reinterpret_cast<float*>(smem);
  unsigned char* R = smem + C::Z_BUF;
  auto st1_x = [&](int s) { return reinterpret_cast<T*>(R + s * C::B_SB1); };
  auto st1_w = [&](int s) { return reinterpret_cast<T*>(R + s * C::B_SB1 + C::X_TILE); };
  T* gzbuf = reinterpret_cast<T*>(R);
  float* dxbuf = reinterpret_cast<float*>(R + C::H_TILE);
  auto st2_w = [&](int s) { return reinterpret_cast<T*>(R + C::B_ST2 + s * C::B_SB2); };
  auto st2_x = [&](int s) {
    return reinterpret_cast<T*>(R + C::B_ST2 + s * C::B_SB2 + C::WD_TILE);
  };

  // ---- phase 1: g_h = dy·W_uᵀ, and column sums of dy --------------------------------------
  // z tile joins the first commit group.
  load_tile<kThreads, float, TM, MP, ZP>(zbuf, z + t0 * m, m, ntok, m, vec_z);
  auto load1 = [&](int k) {
    if (k < nk) {
      const int64_t d0 = static_cast<int64_t>(k) * KC;
      const int dv = static_cast<int>(D - d0 < KC ? D - d0 : KC);
      load_tile<kThreads, T, TM, KC, XP>(st1_x(k % S1), dy + t0 * D + d0, D, ntok, dv, vec_x);
      load_tile<kThreads, T, MP, KC, XP>(st1_w(k % S1), wu + d0, D, m, dv, vec_x);
    }
    cp_async_commit();
  };
  typename M1::C acc[C::NQM];
#pragma unroll
  for (int q = 0; q < C::NQM; ++q) M1::zero(acc[q]);
#pragma unroll
  for (int k = 0; k < S1 - 1; ++k) load1(k);
  const int sum_c = tid % KC;        // db_up: column of the chunk this thread sums
  const int sum_g = tid / KC;        // over rows sum_g·TM/NG .. (sum_g+1)·TM/NG
  float* part = db_part + (static_cast<int64_t>(blockIdx.x) * NG + sum_g) * D;
  for (int k = 0; k < nk; ++k) {
    cp_async_wait<S1 - 2>();
    __syncthreads();
    load1(k + S1 - 1);
    const T* xs = st1_x(k % S1);
    const T* ws = st1_w(k % S1);
    {
      const int64_t d = static_cast<int64_t>(k) * KC + sum_c;
      float s = 0.0f;  // rows past T are zero-filled
#pragma unroll 4
      for (int r = sum_g * (TM / NG); r < (sum_g + 1) * (TM / NG); ++r) s += to_f(xs[r * XP + sum_c]);
      if (d < D) part[d] = s;
    }
#pragma unroll
    for (int ks = 0; ks < KC / 16; ++ks) {
      typename M1::A a;
      M1::load_a(a, xs + wi * 16 * XP + ks * 16, XP);
#pragma unroll
      for (int q = 0; q < C::NQM; ++q) {
        const int j = wj0 + q * WPR;
        if (j < MP / 16) {
          typename M1::B b;  // B[kk][n] = W_u[n][d0 + kk]: column-major tile at row n0
          M1::load_b(b, ws + j * 16 * XP + ks * 16, XP);
          M1::mma(acc[q], a, b);
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // phase-1 stages free, z tile landed

  auto load2 = [&](int c) {
    if (c < nk) {
      const int64_t d0 = static_cast<int64_t>(c) * KC;
      const int dv = static_cast<int>(D - d0 < KC ? D - d0 : KC);
      const int s = c % S2;
      load_tile<kThreads, T, KC, MP, MPP>(st2_w(s), wd + d0 * m, m, dv, m, vec_w);
      if (add_input)
        load_tile<kThreads, T, TM, KC, XP>(st2_x(s), dy + t0 * D + d0, D, ntok, dv, vec_x);
    }
    cp_async_commit();
  };
#pragma unroll
  for (int c = 0; c < S2 - 1; ++c) load2(c);

  // ---- h = φ(z) out; g_z = g_h ⊙ φ'(z) -------------------------------------------------------
  for (int i = tid; i < TM * MP; i += kThreads) {
    const int t = i / MP;
    const int j = i - t * MP;
    if (t < ntok && j < m) h_out[(t0 + t) * m + j] = from_f<T>(act_fwd(zbuf[t * ZP + j], act));
  }
  __syncthreads();  // z is read; the tiles are overwritten with g_z next
  // Accumulator fragments of one type share their element ↔ (row, col) mapping, so z loaded as
  // an accumulator lines up with g_h element by element. Padded rows/columns hold z = 0 and
  // g_h = 0 (zero-filled dy rows / W_u rows), so they give g_z = 0.
#pragma unroll
  for (int q = 0; q < C::NQM; ++q) {
    const int j = wj0 + q * WPR;
    if (j < MP / 16) {
      typename M1::C zf;
      float* p = zbuf + wi * 16 * ZP + j * 16;
      M1::load_c(zf, p, ZP);
#pragma unroll
      for (int e = 0; e < zf.num_elements; ++e) acc[q].x[e] *= act_grad(zf.x[e], act);
      M1::store_c(p, acc[q], ZP);
    }
  }
  __syncthreads();
  for (int i = tid; i < TM * MP; i += kThreads) {
    const int t = i / MP;
    const int j = i - t * MP;
    const bool valid = t < ntok && j < m;
    const T g = from_f<T>(valid ? zbuf[t * ZP + j] : 0.0f);
    if (valid) gz_out[(t0 + t) * m + j] = g;
    gzbuf[t * MPP + j] = g;
  }

  // ---- phase 2: dx = g_z·W_dᵀ [+ dy] ---------------------------------------------------------
  for (int c = 0; c < nk; ++c) {
    cp_async_wait<S2 - 2>();
    __syncthreads();
    load2(c + S2 - 1);
    const int s = c % S2;
    const T* ws = st2_w(s);
    typename M1::C acc2[C::NQK];
#pragma unroll
    for (int q = 0; q < C::NQK; ++q) M1::zero(acc2[q]);
#pragma unroll
    for (int ks = 0; ks < MP / 16; ++ks) {
      typename M1::A a;
      M1::load_a(a, gzbuf + wi * 16 * MPP + ks * 16, MPP);
#pragma unroll
      for (int q = 0; q < C::NQK; ++q) {
        const int j = wj0 + q * WPR;
        if (j < KC / 16) {
          typename M1::B b;  // B[kk][n] = W_d[d0 + n][kk]: column-major tile at row n0
          M1::load_b(b, ws + j * 16 * MPP + ks * 16, MPP);
          M1::mma(acc2[q], a, b);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < C::NQK; ++q) {
      const int j = wj0 + q * WPR;
      if (j < KC / 16) M1::store_c(dxbuf + wi * 16 * YP + j * 16, acc2[q], YP);
    }
    __syncthreads();

    const int64_t d0 = static_cast<int64_t>(c) * KC;
    const T* xs = st2_x(s);
    if (vec_x) {
      constexpr int CPR = KC / V;
      for (int i = tid; i < TM * CPR; i += kThreads) {
        const int t = i / CPR;
        const int cc = (i - t * CPR) * V;
        if (t >= ntok || d0 + cc >= D) continue;
        float v[V];
#pragma unroll
        for (int e = 0; e < V; ++e) v[e] = dxbuf[t * YP + cc + e];
        if (add_input) {
          alignas(16) T tmp[V];
          *reinterpret_cast<uint4*>(tmp) = *reinterpret_cast<const uint4*>(xs + t * XP + cc);
#pragma unroll
          for (int e = 0; e < V; ++e) v[e] += to_f(tmp[e]);
        }
        alignas(16) T out[V];
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] = from_f<T>(v[e]);
        *reinterpret_cast<uint4*>(dx + (t0 + t) * D + d0 + cc) = *reinterpret_cast<const uint4*>(out);
      }
    } else {
      for (int i = tid; i < TM * KC; i += kThreads) {
        const int t = i / KC;
        const int cc = i - t * KC;
        if (t >= ntok || d0 + cc >= D) continue;
        float v = dxbuf[t * YP + cc];
        if (add_input) v += to_f(xs[t * XP + cc]);
        dx[(t0 + t) * D + d0 + cc] = from_f<T>(v);
      }
    }
  }
  cp_async_wait<0>();
}

// db_up[d] = Σ_p part[p][d]; block (32, 32): 32 columns, 32 row lanes.
__global__ void __launch_bounds__(1024)
column_sum_kernel(const float* __restrict__ part, int64_t P, int64_t D, float* __restrict__ out) {
  __shared__ float red[32][33];
  const int64_t d = static_cast<int64_t>(blockIdx.x) * 32 + threadIdx.x;
  float s = 0.0f;
  if (d < D) {
#pragma unroll 4
    for (int64_t p = threadIdx.y; p < P; p += 32) s += part[p * D + d];
  }
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && d < D) {
    float t = 0.0f;
#pragma unroll
    for (int i = 0; i < 32; ++i) t += red[i][threadIdx.x];
    out[d] = t;
  }
}

// ---------------------------------------------------------------------------------------------
// kron_weight: one thread per output element

template <typename TA, typename TB>
__global__ void kron_weight_kernel(const TA* __restrict__ A, const TB* __restrict__ B,
                                   const TB* __restrict__ t, TB* __restrict__ W, int64_t n,
                                   int64_t P, int64_t Q, int64_t r, int64_t total) {
  const int64_t cols = n * Q;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = idx / cols;
    const int64_t col = idx - row * cols;
    const int64_t c = row / P, kap = row - c * P;
    const int64_t a = col / Q, p = col - a * Q;
    float acc = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      const float av = to_f(A[(i * n + c) * n + a]);
      float bv;
      if (t == nullptr) {
        bv = to_f(B[(i * P + kap) * Q + p]);
      } else {
        bv = 0.0f;
        const TB* srow = B + (i * P + kap) * r;
        const TB* tcol = t + i * r * Q + p;
        for (int64_t k = 0; k < r; ++k) bv = fmaf(to_f(srow[k]), to_f(tcol[k * Q]), bv);
      }
      acc = fmaf(av, bv, acc);
    }
    W[idx] = from_f<TB>(acc);
  }
}

// ---------------------------------------------------------------------------------------------
// host helpers

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

template <typename T>
const T* cptr(const at::Tensor& t) {
  return reinterpret_cast<const T*>(t.const_data_ptr());
}
template <typename T>
T* mptr(at::Tensor& t) {
  return reinterpret_cast<T*>(t.mutable_data_ptr());
}

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Opts a kernel into `bytes` of dynamic shared memory on the current device (once per device).
template <typename K>
void set_smem(K kernel, size_t bytes, std::atomic<uint64_t>& done, const char* op) {
  int dev = 0;
  C10_CUDA_CHECK(cudaGetDevice(&dev));
  const uint64_t bit = dev < 64 ? (uint64_t{1} << dev) : 0;
  if (bit != 0 && (done.load(std::memory_order_relaxed) & bit)) return;
  int optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  TORCH_CHECK(bytes <= static_cast<size_t>(optin), op, ": this bottleneck size needs ", bytes,
              " bytes of shared memory per block, but device ", dev, " allows only ", optin);
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(bytes)));
  if (bit != 0) done.fetch_or(bit, std::memory_order_relaxed);
}

constexpr const char* kFwd = "kadapt::fused_adapter_fwd";
constexpr const char* kBwd = "kadapt::fused_adapter_bwd";
constexpr const char* kKron = "kadapt::kron_weight";

bool is_adapter_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_same(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* refname,
                const char* op, bool same_dtype = true) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ", refname,
              " is on ", ref.device(), "; all tensors must be on one CUDA device");
  if (same_dtype) {
    TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
                t.scalar_type(), " but ", refname, " has dtype ", ref.scalar_type(),
                "; all inputs must share one dtype");
  }
}

void check_activation(int64_t act, const char* op) {
  TORCH_CHECK(act >= 0 && act <= 3, op, ": activation=", act,
              " is not one of 0 (gelu_tanh), 1 (gelu), 2 (relu), 3 (swish)");
}

void check_m(int64_t m, const char* op) {
  TORCH_CHECK(m <= kMaxBottleneck, op, ": bottleneck size m=", m,
              " exceeds the kernel's limit of ", kMaxBottleneck,
              " (use the reference implementation for larger bottlenecks)");
}

int padded_m(int64_t m) { return m <= 16 ? 16 : m <= 32 ? 32 : m <= 64 ? 64 : m <= 128 ? 128 : 256; }

template <typename S, int MP>
void launch_fwd(const at::Tensor& x, const at::Tensor* res, const at::Tensor& wd,
                const at::Tensor& bd, const at::Tensor& wu, const at::Tensor& bu, at::Tensor& y,
                at::Tensor& z, bool add_input, int act, cudaStream_t stream) {
  using T = typename Raw<S>::type;
  using C = Cfg<T, MP>;
  static std::atomic<uint64_t> done{0};
  auto kernel = fused_adapter_fwd_kernel<T, MP>;
  set_smem(kernel, C::F_SMEM, done, kFwd);
  const int64_t T_ = x.size(0), D = x.size(1);
  const int m = static_cast<int>(wd.size(1));
  const bool vec_x = D % C::V == 0 && aligned16(x) && aligned16(wu) && aligned16(y) &&
                     (res == nullptr || aligned16(*res));
  const bool vec_w = m % C::V == 0 && aligned16(wd);
  const bool vec_b = D % C::V == 0 && aligned16(bu);
  const int64_t blocks = (T_ + C::TM - 1) / C::TM;
  TORCH_CHECK(blocks <= 0x7fffffff, kFwd, ": too many tokens (", T_, ")");
  kernel<<<static_cast<unsigned>(blocks), kThreads, C::F_SMEM, stream>>>(
      cptr<T>(x), res ? cptr<T>(*res) : nullptr, cptr<T>(wd), cptr<T>(bd), cptr<T>(wu),
      cptr<T>(bu), mptr<T>(y), z.mutable_data_ptr<float>(), T_, D, m, act, add_input, vec_x,
      vec_w, vec_b);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename S>
void dispatch_fwd(int mp, const at::Tensor& x, const at::Tensor* res, const at::Tensor& wd,
                  const at::Tensor& bd, const at::Tensor& wu, const at::Tensor& bu, at::Tensor& y,
                  at::Tensor& z, bool add_input, int act, cudaStream_t stream) {
  switch (mp) {
    case 16: return launch_fwd<S, 16>(x, res, wd, bd, wu, bu, y, z, add_input, act, stream);
    case 32: return launch_fwd<S, 32>(x, res, wd, bd, wu, bu, y, z, add_input, act, stream);
    case 64: return launch_fwd<S, 64>(x, res, wd, bd, wu, bu, y, z, add_input, act, stream);
    case 128: return launch_fwd<S, 128>(x, res, wd, bd, wu, bu, y, z, add_input, act, stream);
    default: return launch_fwd<S, 256>(x, res, wd, bd, wu, bu, y, z, add_input, act, stream);
  }
}

template <typename S, int MP>
void launch_bwd(const at::Tensor& dy, const at::Tensor& z, const at::Tensor& wd,
                const at::Tensor& wu, at::Tensor& dx, at::Tensor& gz, at::Tensor& h,
                at::Tensor& db, bool add_input, int act, cudaStream_t stream) {
  using T = typename Raw<S>::type;
  using C = Cfg<T, MP>;
  static std::atomic<uint64_t> done{0};
  auto kernel = fused_adapter_bwd_kernel<T, MP>;
  set_smem(kernel, C::B_SMEM, done, kBwd);
  const int64_t T_ = dy.size(0), D = dy.size(1);
  const int m = static_cast<int>(wd.size(1));
  const bool vec_x = D % C::V == 0 && aligned16(dy) && aligned16(wu) && aligned16(dx);
  const bool vec_w = m % C::V == 0 && aligned16(wd);
  const bool vec_z = m % 4 == 0 && aligned16(z);
  const int64_t blocks = (T_ + C::TM - 1) / C::TM;
  TORCH_CHECK(blocks <= 0x7fffffff, kBwd, ": too many tokens (", T_, ")");
  const int64_t P = blocks * C::NG;
  at::Tensor part = at::empty({P, D}, dy.options().dtype(at::kFloat));
  kernel<<<static_cast<unsigned>(blocks), kThreads, C::B_SMEM, stream>>>(
      cptr<T>(dy), z.const_data_ptr<float>(), cptr<T>(wd), cptr<T>(wu), mptr<T>(dx), mptr<T>(gz),
      mptr<T>(h), part.mutable_data_ptr<float>(), T_, D, m, act, add_input, vec_x, vec_w, vec_z);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (D > 0) {
    const int64_t gx = (D + 31) / 32;
    TORCH_CHECK(gx <= 0x7fffffff, kBwd, ": D too large (", D, ")");
    column_sum_kernel<<<static_cast<unsigned>(gx), dim3(32, 32), 0, stream>>>(
        part.const_data_ptr<float>(), P, D, db.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename S>
void dispatch_bwd(int mp, const at::Tensor& dy, const at::Tensor& z, const at::Tensor& wd,
                  const at::Tensor& wu, at::Tensor& dx, at::Tensor& gz, at::Tensor& h,
                  at::Tensor& db, bool add_input, int act, cudaStream_t stream) {
  switch (mp) {
    case 16: return launch_bwd<S, 16>(dy, z, wd, wu, dx, gz, h, db, add_input, act, stream);
    case 32: return launch_bwd<S, 32>(dy, z, wd, wu, dx, gz, h, db, add_input, act, stream);
    case 64: return launch_bwd<S, 64>(dy, z, wd, wu, dx, gz, h, db, add_input, act, stream);
    case 128: return launch_bwd<S, 128>(dy, z, wd, wu, dx, gz, h, db, add_input, act, stream);
    default: return launch_bwd<S, 256>(dy, z, wd, wu, dx, gz, h, db, add_input, act, stream);
  }
}

template <typename SA, typename SB>
void launch_kron(const at::Tensor& A, const at::Tensor& B, const at::Tensor* t, at::Tensor& W,
                 int64_t n, int64_t P, int64_t Q, int64_t r, cudaStream_t stream) {
  using TA = typename Raw<SA>::type;
  using TB = typename Raw<SB>::type;
  const int64_t total = W.numel();
  const int threads = 256;
  int64_t blocks = (total + threads - 1) / threads;
  if (blocks > 65536) blocks = 65536;  // grid-stride loop covers the rest
  kron_weight_kernel<TA, TB><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      cptr<TA>(A), cptr<TB>(B), t ? cptr<TB>(*t) : nullptr, mptr<TB>(W), n, P, Q, r, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename SB>
void dispatch_kron_a(const at::Tensor& A, const at::Tensor& B, const at::Tensor* t, at::Tensor& W,
                     int64_t n, int64_t P, int64_t Q, int64_t r, cudaStream_t stream) {
  switch (A.scalar_type()) {
    case at::kFloat: return launch_kron<float, SB>(A, B, t, W, n, P, Q, r, stream);
    case at::kHalf: return launch_kron<c10::Half, SB>(A, B, t, W, n, P, Q, r, stream);
    default: return launch_kron<c10::BFloat16, SB>(A, B, t, W, n, P, Q, r, stream);
  }
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// ops

std::tuple<at::Tensor, at::Tensor> fused_adapter_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in, bool add_input,
    const at::Tensor& w_down_in, const at::Tensor& b_down_in, const at::Tensor& w_up_in,
    const at::Tensor& b_up_in, int64_t activation) {
  const char* op = kFwd;
  TORCH_CHECK(x_in.is_cuda(), op, ": x must be a CUDA tensor, got ", x_in.device());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(is_adapter_dtype(dtype), op, ": x has dtype ", dtype,
              "; supported dtypes are float32, float16 and bfloat16");
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be 2-D (T, D), got shape ", x_in.sizes());
  check_activation(activation, op);
  check_same(w_down_in, "w_down", x_in, "x", op);
  check_same(b_down_in, "b_down", x_in, "x", op);
  check_same(w_up_in, "w_up", x_in, "x", op);
  check_same(b_up_in, "b_up", x_in, "x", op);
  const int64_t T_ = x_in.size(0), D = x_in.size(1);
  TORCH_CHECK(w_down_in.dim() == 2 && w_down_in.size(0) == D, op,
              ": w_down must have shape (D, m) with D = x.size(1) = ", D, ", got ",
              w_down_in.sizes());
  const int64_t m = w_down_in.size(1);
  check_m(m, op);
  TORCH_CHECK(b_down_in.dim() == 1 && b_down_in.size(0) == m, op,
              ": b_down must have shape (m,) = (", m, ",), got ", b_down_in.sizes());
  TORCH_CHECK(w_up_in.dim() == 2 && w_up_in.size(0) == m && w_up_in.size(1) == D, op,
              ": w_up must have shape (m, D) = (", m, ", ", D, "), got ", w_up_in.sizes());
  TORCH_CHECK(b_up_in.dim() == 1 && b_up_in.size(0) == D, op, ": b_up must have shape (D,) = (",
              D, ",), got ", b_up_in.sizes());
  at::Tensor residual;
  if (residual_in.has_value()) {
    check_same(*residual_in, "residual", x_in, "x", op);
    TORCH_CHECK(residual_in->sizes() == x_in.sizes(), op, ": residual must have the shape of x ",
                x_in.sizes(), ", got ", residual_in->sizes());
    residual = residual_in->contiguous();
  }

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w_down = w_down_in.contiguous();
  const at::Tensor b_down = b_down_in.contiguous();
  const at::Tensor w_up = w_up_in.contiguous();
  const at::Tensor b_up = b_up_in.contiguous();
  at::Tensor y = at::empty({T_, D}, x.options());
  at::Tensor z = at::empty({T_, m}, x.options().dtype(at::kFloat));
  if (T_ == 0) return {y, z};

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const at::Tensor* res = residual.defined() ? &residual : nullptr;
  const int mp = padded_m(m);
  const int act = static_cast<int>(activation);
  switch (dtype) {
    case at::kFloat:
      dispatch_fwd<float>(mp, x, res, w_down, b_down, w_up, b_up, y, z, add_input, act, stream);
      break;
    case at::kHalf:
      dispatch_fwd<c10::Half>(mp, x, res, w_down, b_down, w_up, b_up, y, z, add_input, act,
                              stream);
      break;
    default:
      dispatch_fwd<c10::BFloat16>(mp, x, res, w_down, b_down, w_up, b_up, y, z, add_input, act,
                                  stream);
      break;
  }
  return {y, z};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_adapter_bwd_cuda(
    const at::Tensor& dy_in, const at::Tensor& z_in, const at::Tensor& w_down_in,
    const at::Tensor& w_up_in, bool add_input, int64_t activation) {
  const char* op = kBwd;
  TORCH_CHECK(dy_in.is_cuda(), op, ": dy must be a CUDA tensor, got ", dy_in.device());
  const auto dtype = dy_in.scalar_type();
  TORCH_CHECK(is_adapter_dtype(dtype), op, ": dy has dtype ", dtype,
              "; supported dtypes are float32, float16 and bfloat16");
  TORCH_CHECK(dy_in.dim() == 2, op, ": dy must be 2-D (T, D), got shape ", dy_in.sizes());
  check_activation(activation, op);
  check_same(z_in, "z", dy_in, "dy", op, /*same_dtype=*/false);
  TORCH_CHECK(z_in.scalar_type() == at::kFloat, op, ": z must be float32 (the saved fp32 "
              "pre-activation), got ", z_in.scalar_type());
  check_same(w_down_in, "w_down", dy_in, "dy", op);
  check_same(w_up_in, "w_up", dy_in, "dy", op);
  const int64_t T_ = dy_in.size(0), D = dy_in.size(1);
  TORCH_CHECK(w_down_in.dim() == 2 && w_down_in.size(0) == D, op,
              ": w_down must have shape (D, m) with D = dy.size(1) = ", D, ", got ",
              w_down_in.sizes());
  const int64_t m = w_down_in.size(1);
  check_m(m, op);
  TORCH_CHECK(w_up_in.dim() == 2 && w_up_in.size(0) == m && w_up_in.size(1) == D, op,
              ": w_up must have shape (m, D) = (", m, ", ", D, "), got ", w_up_in.sizes());
  TORCH_CHECK(z_in.dim() == 2 && z_in.size(0) == T_ && z_in.size(1) == m, op,
              ": z must have shape (T, m) = (", T_, ", ", m, "), got ", z_in.sizes());

  const c10::cuda::CUDAGuard guard(dy_in.device());
  const at::Tensor dy = dy_in.contiguous();
  const at::Tensor z = z_in.contiguous();
  const at::Tensor w_down = w_down_in.contiguous();
  const at::Tensor w_up = w_up_in.contiguous();
  at::Tensor dx = at::empty({T_, D}, dy.options());
  at::Tensor gz = at::empty({T_, m}, dy.options());
  at::Tensor h = at::empty({T_, m}, dy.options());
  if (T_ == 0) {
    at::Tensor db = at::zeros({D}, dy.options().dtype(at::kFloat));
    return {dx, gz, h, db};
  }
  at::Tensor db = at::empty({D}, dy.options().dtype(at::kFloat));

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dy.get_device()).stream();
  const int mp = padded_m(m);
  const int act = static_cast<int>(activation);
  switch (dtype) {
    case at::kFloat:
      dispatch_bwd<float>(mp, dy, z, w_down, w_up, dx, gz, h, db, add_input, act, stream);
      break;
    case at::kHalf:
      dispatch_bwd<c10::Half>(mp, dy, z, w_down, w_up, dx, gz, h, db, add_input, act, stream);
      break;
    default:
      dispatch_bwd<c10::BFloat16>(mp, dy, z, w_down, w_up, dx, gz, h, db, add_input, act, stream);
      break;
  }
  return {dx, gz, h, db};
}

at::Tensor kron_weight_cuda(const at::Tensor& A_in, const at::Tensor& B_in,
                            const std::optional<at::Tensor>& t_in) {
  const char* op = kKron;
  TORCH_CHECK(B_in.is_cuda(), op, ": B must be a CUDA tensor, got ", B_in.device());
  check_same(A_in, "A", B_in, "B", op, /*same_dtype=*/false);
  TORCH_CHECK(is_adapter_dtype(A_in.scalar_type()), op, ": A has dtype ", A_in.scalar_type(),
              "; supported dtypes are float32, float16 and bfloat16");
  TORCH_CHECK(is_adapter_dtype(B_in.scalar_type()), op, ": B has dtype ", B_in.scalar_type(),
              "; supported dtypes are float32, float16 and bfloat16");
  TORCH_CHECK(A_in.dim() == 3 && A_in.size(1) == A_in.size(0) && A_in.size(2) == A_in.size(0),
              op, ": A must have shape (n, n, n), got ", A_in.sizes());
  const int64_t n = A_in.size(0);
  TORCH_CHECK(B_in.dim() == 3 && B_in.size(0) == n, op, ": B must have shape (n, in/n, ",
              t_in.has_value() ? "r" : "out/n", ") with n = ", n, ", got ", B_in.sizes());
  const int64_t P = B_in.size(1);
  int64_t Q = B_in.size(2), r = 0;
  if (t_in.has_value()) {
    check_same(*t_in, "t", B_in, "B", op);
    TORCH_CHECK(t_in->dim() == 3 && t_in->size(0) == n && t_in->size(1) == B_in.size(2), op,
                ": t must have shape (n, r, out/n) = (", n, ", ", B_in.size(2),
                ", out/n) to match B = s of shape ", B_in.sizes(), ", got ", t_in->sizes());
    r = B_in.size(2);
    Q = t_in->size(2);
  }

  const c10::cuda::CUDAGuard guard(B_in.device());
  const at::Tensor A = A_in.contiguous();
  const at::Tensor B = B_in.contiguous();
  at::Tensor t;
  if (t_in.has_value()) t = t_in->contiguous();
  at::Tensor W = at::empty({n * P, n * Q}, B.options());
  if (W.numel() == 0) return W;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(B.get_device()).stream();
  const at::Tensor* tp = t.defined() ? &t : nullptr;
  switch (B.scalar_type()) {
    case at::kFloat: dispatch_kron_a<float>(A, B, tp, W, n, P, Q, r, stream); break;
    case at::kHalf: dispatch_kron_a<c10::Half>(A, B, tp, W, n, P, Q, r, stream); break;
    default: dispatch_kron_a<c10::BFloat16>(A, B, tp, W, n, P, Q, r, stream); break;
  }
  return W;
}

}  // namespace kadapt
