// Device helpers shared by kadapt's CUDA kernels (fused_adapter.cu, inducer_attention.cu): dtype
// conversions, cp.async (sm_80+) and the zero-filling shared-memory tile copy. Internal linkage:
// each translation unit gets its own inlined copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace kadapt {
namespace {

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_f(float v);
template <>
__device__ __forceinline__ float from_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Copies the ROWS×COLS tile whose element (0, 0) is g (row stride ld elements) into shared
// memory s (row stride PITCH elements), THREADS threads of the block cooperating. Elements at
// rows >= rows_valid or columns >= cols_valid are zero-filled; g is dereferenced only for valid
// elements. vec: 16-byte cp.async (requires ld and the address of g to be multiples of 16 bytes,
// COLS a multiple of 16 bytes; the caller commits and waits); otherwise synchronous element loads.
template <int THREADS, typename T, int ROWS, int COLS, int PITCH>
__device__ __forceinline__ void load_tile(T* __restrict__ s, const T* __restrict__ g, int64_t ld,
                                          int rows_valid, int cols_valid, bool vec) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  static_assert(COLS % V == 0 && (PITCH * sizeof(T)) % 16 == 0, "tile layout");
  if (vec) {
    constexpr int CPR = COLS / V;
    for (int i = threadIdx.x; i < ROWS * CPR; i += THREADS) {
      const int r = i / CPR;
      const int c = (i - r * CPR) * V;
      T* dst = s + r * PITCH + c;
      int n = cols_valid - c;
      n = r < rows_valid ? (n < 0 ? 0 : (n > V ? V : n)) : 0;
      if (n > 0) {
        cp_async16(dst, g + static_cast<int64_t>(r) * ld + c, n * static_cast<int>(sizeof(T)));
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
      }
    }
  } else {
    const T zero = from_f<T>(0.0f);
    for (int i = threadIdx.x; i < ROWS * COLS; i += THREADS) {
      const int r = i / COLS;
      const int c = i - r * COLS;
      s[r * PITCH + c] =
          (r < rows_valid && c < cols_valid) ? g[static_cast<int64_t>(r) * ld + c] : zero;
    }
  }
}

}  // namespace
}  // namespace kadapt
