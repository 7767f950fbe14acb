// Fused bottleneck-adapter forward (Houlsby / Pfeiffer style adapters).
//
// Row-vector convention; for every token row t of x (T x D, flattened leading dims):
//   z_t = x_t . W_down + b_down                 (W_down: D x m row-major, b_down: m)
//   a_t = act(z_t)
//   y_t = residual_t + a_t . W_up + b_up         (W_up: m x D row-major, b_up: D)
// Accumulation is in fp32 for every input dtype (fp32 / fp16 / bf16); z is returned in fp32
// (the backward needs the pre-activation).
//
// Design: one CTA handles a tile of TOK tokens.
//   phase 1: the x rows of the tile are staged (as fp32) in shared memory, DCHUNK columns at a
//            time; warp w owns bottleneck columns j = w, w + NWARPS, ...; its lanes stride over d,
//            each W_down element is loaded once and used for all TOK tokens, and a warp reduction
//            adds the partial dot products into zs[t][j] (shared memory, initialised to b_down).
//   phase 2: z is written out, a = act(z) is kept in shared memory, then threads stride over D;
//            each W_up element is loaded once (coalesced along D) and used for all TOK tokens.
// Large m (tile does not fit the 48 KiB default of shared memory) runs with TOK = 1.
//
// Includes are deliberately lean (no <torch/extension.h>, no ATen/cuda/CUDAContext.h which needs
// the cuBLAS/cuSPARSE headers): the file compiles in well under a minute.
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <tuple>

namespace kadapt {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kChunk = 1024;             // x columns staged in shared memory at a time
constexpr int kSmemLimit = 48 * 1024;    // default dynamic shared memory limit, no opt-in needed

enum Activation : int64_t { kGeluTanh = 0, kGelu = 1, kRelu = 2, kSwish = 3 };

__device__ __forceinline__ float activate(float z, int act) {
  switch (act) {
    case kGeluTanh: {
      // gelu_new / gelu_pytorch_tanh: 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3)))
      const float k = 0.7978845608028654f;
      return 0.5f * z * (1.0f + tanhf(k * (z + 0.044715f * z * z * z)));
    }
    case kGelu:
      return 0.5f * z * (1.0f + erff(z * 0.7071067811865476f));
    case kRelu:
      return z > 0.0f ? z : 0.0f;
    default:  // kSwish
      return z / (1.0f + expf(-z));
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

template <typename scalar_t, int TOK>
__global__ void __launch_bounds__(kThreads)
bottleneck_adapter_fwd_kernel(const scalar_t* __restrict__ x,
                              const scalar_t* __restrict__ residual,  // may be nullptr
                              const scalar_t* __restrict__ w_down,
                              const scalar_t* __restrict__ b_down,
                              const scalar_t* __restrict__ w_up,
                              const scalar_t* __restrict__ b_up,
                              scalar_t* __restrict__ y,
                              float* __restrict__ z_out,
                              int64_t T, int64_t D, int64_t m, int act) {
  extern __shared__ float smem[];
  float* xs = smem;                 // [TOK][kChunk]
  float* zs = smem + TOK * kChunk;  // [TOK][m]

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t t0 = static_cast<int64_t>(blockIdx.x) * TOK;
  const int ntok = static_cast<int>(T - t0 < TOK ? T - t0 : TOK);

  for (int64_t i = tid; i < static_cast<int64_t>(TOK) * m; i += kThreads) {
    zs[i] = static_cast<float>(b_down[i % m]);
  }

  // ---- phase 1: z = x . W_down + b_down ---------------------------------------------------------
  for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
    const int dc = static_cast<int>(D - d0 < kChunk ? D - d0 : kChunk);
    __syncthreads();  // previous chunk fully consumed (and zs initialised on the first pass)
    for (int i = tid; i < TOK * dc; i += kThreads) {
      const int t = i / dc;
      const int d = i - t * dc;
      xs[t * kChunk + d] = t < ntok ? static_cast<float>(x[(t0 + t) * D + d0 + d]) : 0.0f;
    }
    __syncthreads();
    for (int64_t j = warp; j < m; j += kWarps) {
      float acc[TOK];
#pragma unroll
      for (int t = 0; t < TOK; ++t) acc[t] = 0.0f;
      for (int d = lane; d < dc; d += 32) {
        const float w = static_cast<float>(w_down[(d0 + d) * m + j]);
#pragma unroll
        for (int t = 0; t < TOK; ++t) acc[t] += xs[t * kChunk + d] * w;
      }
#pragma unroll
      for (int t = 0; t < TOK; ++t) {
        const float s = warp_sum(acc[t]);
        if (lane == 0) zs[t * m + j] += s;  // column j is owned by this warp only: no race
      }
    }
  }
  __syncthreads();

  // ---- z out, a = act(z) in place ----------------------------------------------------------------
  for (int64_t i = tid; i < static_cast<int64_t>(TOK) * m; i += kThreads) {
    const int t = static_cast<int>(i / m);
    const float zv = zs[i];
    if (t < ntok) z_out[(t0 + t) * m + (i - t * m)] = zv;
    zs[i] = activate(zv, act);
  }
  __syncthreads();

  // ---- phase 2: y = residual + a . W_up + b_up -----------------------------------------------------
  for (int64_t d = tid; d < D; d += kThreads) {
    const float bias = static_cast<float>(b_up[d]);
    float acc[TOK];
#pragma unroll
    for (int t = 0; t < TOK; ++t) acc[t] = 0.0f;
    for (int64_t j = 0; j < m; ++j) {
      const float w = static_cast<float>(w_up[j * D + d]);
#pragma unroll
      for (int t = 0; t < TOK; ++t) acc[t] += zs[t * m + j] * w;  // smem broadcast
    }
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
      if (t < ntok) {
        const int64_t off = (t0 + t) * D + d;
        float out = acc[t] + bias;
        if (residual != nullptr) out += static_cast<float>(residual[off]);
        y[off] = static_cast<scalar_t>(out);
      }
    }
  }
}

template <typename scalar_t, int TOK>
void launch(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& w_down,
            const at::Tensor& b_down, const at::Tensor& w_up, const at::Tensor& b_up, at::Tensor& y,
            at::Tensor& z, int64_t T, int64_t D, int64_t m, int act, cudaStream_t stream) {
  const int64_t blocks = (T + TOK - 1) / TOK;
  const size_t smem = sizeof(float) * TOK * (kChunk + m);
  bottleneck_adapter_fwd_kernel<scalar_t, TOK>
      <<<static_cast<unsigned int>(blocks), kThreads, smem, stream>>>(
          x.const_data_ptr<scalar_t>(),
          residual != nullptr ? residual->const_data_ptr<scalar_t>() : nullptr,
          w_down.const_data_ptr<scalar_t>(), b_down.const_data_ptr<scalar_t>(),
          w_up.const_data_ptr<scalar_t>(), b_up.const_data_ptr<scalar_t>(),
          y.mutable_data_ptr<scalar_t>(), z.mutable_data_ptr<float>(), T, D, m, act);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void dispatch_tile(const at::Tensor& x, const at::Tensor* residual, const at::Tensor& w_down,
                   const at::Tensor& b_down, const at::Tensor& w_up, const at::Tensor& b_up,
                   at::Tensor& y, at::Tensor& z, int64_t T, int64_t D, int64_t m, int act,
                   cudaStream_t stream) {
  if (sizeof(float) * 8 * (kChunk + m) <= static_cast<size_t>(kSmemLimit)) {
    launch<scalar_t, 8>(x, residual, w_down, b_down, w_up, b_up, y, z, T, D, m, act, stream);
  } else {
    launch<scalar_t, 1>(x, residual, w_down, b_down, w_up, b_up, y, z, T, D, m, act, stream);
  }
}

void check_arg(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK(t.device() == x.device(), "kadapt::bottleneck_adapter_fwd: ", name, " is on ",
              t.device(), " but x is on ", x.device(), "; all tensors must be on one CUDA device");
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), "kadapt::bottleneck_adapter_fwd: ", name,
              " has dtype ", t.scalar_type(), " but x has dtype ", x.scalar_type(),
              "; all inputs must share one dtype");
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_fwd_cuda(
    const at::Tensor& x_in, const std::optional<at::Tensor>& residual_in,
    const at::Tensor& w_down_in, const at::Tensor& b_down_in, const at::Tensor& w_up_in,
    const at::Tensor& b_up_in, int64_t activation) {
  TORCH_CHECK(x_in.is_cuda(), "kadapt::bottleneck_adapter_fwd: x must be a CUDA tensor, got ",
              x_in.device());
  const auto dtype = x_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "kadapt::bottleneck_adapter_fwd: x has dtype ", dtype,
              "; supported dtypes are float32, float16 and bfloat16");
  TORCH_CHECK(x_in.dim() >= 1, "kadapt::bottleneck_adapter_fwd: x must have at least 1 dimension");
  TORCH_CHECK(activation >= 0 && activation <= 3, "kadapt::bottleneck_adapter_fwd: activation=",
              activation, " is not one of 0 (gelu_tanh), 1 (gelu), 2 (relu), 3 (swish)");
  check_arg(w_down_in, "w_down", x_in);
  check_arg(b_down_in, "b_down", x_in);
  check_arg(w_up_in, "w_up", x_in);
  check_arg(b_up_in, "b_up", x_in);

  const int64_t D = x_in.size(-1);
  TORCH_CHECK(w_down_in.dim() == 2 && w_down_in.size(0) == D,
              "kadapt::bottleneck_adapter_fwd: w_down must have shape (D, m) with D = x.size(-1) = ",
              D, ", got ", w_down_in.sizes());
  const int64_t m = w_down_in.size(1);
  TORCH_CHECK(b_down_in.dim() == 1 && b_down_in.size(0) == m,
              "kadapt::bottleneck_adapter_fwd: b_down must have shape (m,) = (", m, ",), got ",
              b_down_in.sizes());
  TORCH_CHECK(w_up_in.dim() == 2 && w_up_in.size(0) == m && w_up_in.size(1) == D,
              "kadapt::bottleneck_adapter_fwd: w_up must have shape (m, D) = (", m, ", ", D,
              "), got ", w_up_in.sizes());
  TORCH_CHECK(b_up_in.dim() == 1 && b_up_in.size(0) == D,
              "kadapt::bottleneck_adapter_fwd: b_up must have shape (D,) = (", D, ",), got ",
              b_up_in.sizes());
  TORCH_CHECK(sizeof(float) * (kChunk + m) <= static_cast<size_t>(kSmemLimit),
              "kadapt::bottleneck_adapter_fwd: bottleneck size m=", m, " is too large (max ",
              kSmemLimit / sizeof(float) - kChunk, ")");

  at::Tensor residual;
  if (residual_in.has_value()) {
    check_arg(*residual_in, "residual", x_in);
    TORCH_CHECK(residual_in->sizes() == x_in.sizes(),
                "kadapt::bottleneck_adapter_fwd: residual must have the shape of x ", x_in.sizes(),
                ", got ", residual_in->sizes());
    residual = residual_in->contiguous();
  }

  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const at::Tensor w_down = w_down_in.contiguous();
  const at::Tensor b_down = b_down_in.contiguous();
  const at::Tensor w_up = w_up_in.contiguous();
  const at::Tensor b_up = b_up_in.contiguous();
  int64_t rows = 1;  // T: product of the leading dims (well defined when D == 0 too)
  for (int64_t i = 0; i + 1 < x.dim(); ++i) rows *= x.size(i);

  at::Tensor y = x.new_empty(x.sizes());
  at::Tensor z = x.new_empty({rows, m}, x.options().dtype(at::kFloat));
  if (rows == 0) return {y, z};
  if (D == 0) {  // no input features: z = b_down, y is empty
    z.copy_(b_down.to(at::kFloat).unsqueeze(0).expand({rows, m}));
    return {y, z};
  }

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  const at::Tensor* res_ptr = residual.defined() ? &residual : nullptr;
  const int act = static_cast<int>(activation);
  switch (dtype) {
    case at::kFloat:
      dispatch_tile<float>(x, res_ptr, w_down, b_down, w_up, b_up, y, z, rows, D, m, act, stream);
      break;
    case at::kHalf:
      dispatch_tile<c10::Half>(x, res_ptr, w_down, b_down, w_up, b_up, y, z, rows, D, m, act, stream);
      break;
    default:
      dispatch_tile<c10::BFloat16>(x, res_ptr, w_down, b_down, w_up, b_up, y, z, rows, D, m, act,
                                   stream);
      break;
  }
  return {y, z};
}

}  // namespace kadapt
