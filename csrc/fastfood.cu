// CUDA kernels of the Fastfood projection of Intrinsic-SAID (METHODS.md §4, §12.5): the same function as
// the Triton kernels of kadapt/ops/triton/fastfood.py, driven by the same schedule tables.
//
//   fastfood_fwd(z, tables, meta)     v = cat_i σ_i S_{N_i} H G_i Π_i H B_i E_i z      (fp32 (ΣN,))
//   fastfood_bwd(grad, tables, meta)  ∂z = Σ_i s_i P_iᵀ γ_i, s_i = 1/L_i under        (fp32 (d_z,))
//                                     grad_scale_compat (meta's last entry), else 1
//
// tables = [info (K, 19) int64, σ (K,) fp32, inner programs (P, 2) int32, one (P_j, 5) int32 table per
// outer level j]; meta = [d_z, ΣN, ΣL, K, TR, TC, RO, OC, P, J, P_0 … P_{J−1}(, compat)]: exactly what
// `schedule` in kadapt/ops/triton/fastfood.py builds (cached per plan and device), so both backends run
// the same ragged launches:
//   * inner pass: one block per (tensor, tile of T = TR·TC ≤ 2^13 elements) transforms the tile in
//     shared memory and registers (csrc/fastfood.cuh: butterflies on ≤ 4 index bits at a time in
//     registers, shared memory between groups); a tensor with L ≤ T is finished in this one block;
//   * outer levels (L > T): H_L = H_{L/T} ⊗ H_T; the stride-T factor is done in levels of radix
//     R ≤ RO, one block per R × OC tile (OC contiguous columns: coalesced), in place;
//   * forward: inner(b ⊙ E z) → outer levels → inner(gather g_k x_{π(k)}) → outer levels, σ and the
//     crop to N_i in the last store; backward: inner(pad σγ) → outer → inner(gather through π⁻¹) →
//     outer, b and the crop to min(d_z, L_i) in the last store, then one deterministic reduction of the
//     K per-tensor q_i into ∂z.
// One launch per pass over all tensors: 2 + 2J launches forward, 3 + 2J backward.
// The randomness is regenerated in-kernel from the plan's keys (csrc/fastfood.cuh), draw for draw
// what the PyTorch reference and the Triton kernels draw.
//
// Includes are deliberately lean (no <torch/extension.h>, no ATen/cuda/CUDAContext.h).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <vector>

#include "fastfood.cuh"

namespace kadapt {
namespace {

namespace ff = ::kadapt::fastfood;

constexpr int kThreads = 256;
constexpr int kReduceThreads = 256;

template <int MODE, int STAGE>
__global__ void __launch_bounds__(kThreads)
    fastfood_inner_kernel(const float* __restrict__ src, float* __restrict__ dst,
                          float* __restrict__ out, const int64_t* __restrict__ info,
                          const float* __restrict__ sigma, const int32_t* __restrict__ prog,
                          int logT) {
  __shared__ float s[ff::kSmemFloats];
  ff::inner_block<MODE, STAGE>(src, dst, out, info, sigma, prog, logT, blockIdx.x, s,
                               threadIdx.x, blockDim.x);
}

template <int MODE>
__global__ void __launch_bounds__(kThreads)
    fastfood_outer_kernel(float* __restrict__ buf, float* __restrict__ out,
                          const int64_t* __restrict__ info, const float* __restrict__ sigma,
                          const int32_t* __restrict__ prog, bool final_ok, int logOC) {
  __shared__ float s[ff::kSmemFloats];
  // A table built for a larger tile than the shared buffer holds is refused on the host; this
  // guards the buffer against a corrupted table all the same.
  if (prog[5 * static_cast<int64_t>(blockIdx.x) + 2] + logOC > ff::kMaxTileLog2) __trap();
  ff::outer_block<MODE>(buf, out, info, sigma, prog, final_ok, logOC, blockIdx.x, s, threadIdx.x,
                        blockDim.x);
}

__global__ void __launch_bounds__(kReduceThreads)
    fastfood_reduce_kernel(const float* __restrict__ q, float* __restrict__ dz,
                           const int64_t* __restrict__ info, int64_t K, int64_t d_z, bool compat) {
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (j < d_z) ff::reduce_item(q, dz, info, K, compat, j);
}

int log2_exact(int64_t v) {
  int n = 0;
  while ((int64_t{1} << n) < v) ++n;
  return n;
}

bool is_pow2(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// The parsed schedule (see the file comment), checked against the tables.
struct Schedule {
  int64_t d_z, total_out, total_ws, K, P;
  int logT, logOC;
  std::vector<int64_t> level_programs;
  bool compat;
  const at::Tensor* info;
  const at::Tensor* sigma;
  const at::Tensor* inner;
  std::vector<const at::Tensor*> levels;
};

void check_table(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t rows,
                 int64_t cols, const at::Tensor& x, const char* op) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but the input is on ",
              x.device(), "; the schedule tables must be on the input's CUDA device");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ",
              dtype);
  const bool shape_ok = cols < 0 ? (t.dim() == 1 && t.size(0) == rows)
                                 : (t.dim() == 2 && t.size(0) == rows && t.size(1) == cols);
  TORCH_CHECK(shape_ok, op, ": ", name, " has shape ", t.sizes(), ", expected (", rows,
              cols < 0 ? "" : ", ", cols < 0 ? "" : std::to_string(cols), ")");
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

Schedule parse(const at::Tensor& x, at::TensorList tables, at::IntArrayRef meta, bool need_compat,
               const char* op) {
  TORCH_CHECK(meta.size() >= 10, op, ": meta must be [d_z, ΣN, ΣL, K, TR, TC, RO, OC, P, J, P_0 … "
              "P_{J−1}, grad_scale_compat] (kadapt/ops/triton/fastfood.py schedule), got ",
              meta.size(), " entries");
  Schedule sc;
  sc.d_z = meta[0];
  sc.total_out = meta[1];
  sc.total_ws = meta[2];
  sc.K = meta[3];
  const int64_t TR = meta[4], TC = meta[5], RO = meta[6], OC = meta[7];
  sc.P = meta[8];
  const int64_t J = meta[9];
  TORCH_CHECK(J >= 0 && static_cast<int64_t>(meta.size()) - 10 - J >= (need_compat ? 1 : 0) &&
                  static_cast<int64_t>(meta.size()) - 10 - J <= 1,
              op, ": meta has ", meta.size(), " entries but J = ", J, " outer levels need ", 10 + J,
              need_compat ? " + 1 (grad_scale_compat)" : " (+ 1, grad_scale_compat)");
  sc.compat = static_cast<int64_t>(meta.size()) == 11 + J && meta.back() != 0;
  TORCH_CHECK(sc.d_z > 0 && sc.total_out > 0 && sc.total_ws > 0 && sc.K > 0 && sc.P > 0, op,
              ": meta's d_z, ΣN, ΣL, K and P must be positive, got ", meta);
  const int64_t T = TR * TC;
  TORCH_CHECK(is_pow2(TR) && is_pow2(TC) && is_pow2(RO) && is_pow2(OC) && RO >= 2 && OC <= T, op,
              ": bad tile config (TR, TC, RO, OC) = (", TR, ", ", TC, ", ", RO, ", ", OC,
              "): powers of two, RO >= 2, OC <= TR·TC");
  TORCH_CHECK(T <= (int64_t{1} << ff::kMaxTileLog2) && RO * OC <= (int64_t{1} << ff::kMaxTileLog2),
              op, ": the CUDA kernel transforms at most 2^", ff::kMaxTileLog2,
              " elements per block: TR·TC = ", T, " and RO·OC = ", RO * OC, " must both be <= ",
              int64_t{1} << ff::kMaxTileLog2);
  sc.logT = log2_exact(T);
  sc.logOC = log2_exact(OC);
  TORCH_CHECK(static_cast<int64_t>(tables.size()) == 3 + J, op, ": tables must be [info, sigma, inner, ",
              "one table per outer level] (", 3 + J, " tensors for J = ", J, "), got ", tables.size());
  check_table(tables[0], "tables[0] (info)", at::kLong, sc.K, ff::kInfoCols, x, op);
  check_table(tables[1], "tables[1] (sigma)", at::kFloat, sc.K, -1, x, op);
  check_table(tables[2], "tables[2] (inner programs)", at::kInt, sc.P, 2, x, op);
  TORCH_CHECK(sc.P <= INT32_MAX, op, ": P = ", sc.P, " programs exceed the grid limit");
  sc.info = &tables[0];
  sc.sigma = &tables[1];
  sc.inner = &tables[2];
  for (int64_t j = 0; j < J; ++j) {
    const int64_t pj = meta[10 + j];
    TORCH_CHECK(pj >= 0 && pj <= INT32_MAX, op, ": meta's P_", j, " = ", pj, " is out of range");
    const std::string name = "tables[" + std::to_string(3 + j) + "] (outer level " +
                             std::to_string(j) + ")";
    check_table(tables[3 + j], name.c_str(), at::kInt, pj, 5, x, op);
    sc.level_programs.push_back(pj);
    sc.levels.push_back(&tables[3 + j]);
  }
  return sc;
}

// The two Hadamards of one direction (mode 0 forward, 1 backward), launch for launch what
// kadapt/ops/triton/fastfood.py `_run` does; returns the second workspace (the backward's q_i).
template <int MODE>
at::Tensor run(const at::Tensor& src, const Schedule& sc, float* out, cudaStream_t stream) {
  const auto opts = src.options().dtype(at::kFloat);
  at::Tensor ws1 = at::empty({sc.total_ws}, opts);
  at::Tensor ws2 = at::empty({sc.total_ws}, opts);
  const int64_t* info = sc.info->data_ptr<int64_t>();
  const float* sigma = sc.sigma->data_ptr<float>();
  const int32_t* inner = sc.inner->data_ptr<int32_t>();
  float* w1 = ws1.data_ptr<float>();
  float* w2 = ws2.data_ptr<float>();
  const auto grid = [](int64_t n) { return dim3(static_cast<unsigned>(n)); };

  fastfood_inner_kernel<MODE, 1><<<grid(sc.P), kThreads, 0, stream>>>(
      src.data_ptr<float>(), w1, out, info, sigma, inner, sc.logT);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (size_t j = 0; j < sc.levels.size(); ++j) {
    if (sc.level_programs[j] == 0) continue;
    fastfood_outer_kernel<MODE><<<grid(sc.level_programs[j]), kThreads, 0, stream>>>(
        w1, out, info, sigma, sc.levels[j]->data_ptr<int32_t>(), false, sc.logOC);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  fastfood_inner_kernel<MODE, 2><<<grid(sc.P), kThreads, 0, stream>>>(w1, w2, out, info, sigma,
                                                                       inner, sc.logT);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  for (size_t j = 0; j < sc.levels.size(); ++j) {
    if (sc.level_programs[j] == 0) continue;
    fastfood_outer_kernel<MODE><<<grid(sc.level_programs[j]), kThreads, 0, stream>>>(
        w2, out, info, sigma, sc.levels[j]->data_ptr<int32_t>(), true, sc.logOC);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return ws2;
}

void check_input(const at::Tensor& x, const char* name, int64_t numel, const char* what,
                 const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, op, ": ", name, " has dtype ", x.scalar_type(),
              "; only float32 is supported");
  TORCH_CHECK(x.dim() == 1 && x.size(0) == numel, op, ": ", name, " must have shape (", what,
              ",) = (", numel, ",), got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

}  // namespace

at::Tensor fastfood_fwd_cuda(const at::Tensor& z, at::TensorList tables, at::IntArrayRef meta) {
  constexpr const char* op = "kadapt::fastfood_fwd";
  TORCH_CHECK(z.is_cuda(), op, ": z must be a CUDA tensor, got ", z.device());
  const Schedule sc = parse(z, tables, meta, /*need_compat=*/false, op);
  check_input(z, "z", sc.d_z, "d_z", op);
  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor out = at::empty({sc.total_out}, z.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(z.get_device()).stream();
  run<0>(z, sc, out.data_ptr<float>(), stream);
  return out;
}

at::Tensor fastfood_bwd_cuda(const at::Tensor& grad, at::TensorList tables, at::IntArrayRef meta) {
  constexpr const char* op = "kadapt::fastfood_bwd";
  TORCH_CHECK(grad.is_cuda(), op, ": grad must be a CUDA tensor, got ", grad.device());
  const Schedule sc = parse(grad, tables, meta, /*need_compat=*/true, op);
  check_input(grad, "grad", sc.total_out, "ΣN", op);
  const c10::cuda::CUDAGuard guard(grad.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(grad.get_device()).stream();
  const at::Tensor q = run<1>(grad, sc, nullptr, stream);
  at::Tensor dz = at::empty({sc.d_z}, grad.options());
  const int64_t blocks = (sc.d_z + kReduceThreads - 1) / kReduceThreads;
  fastfood_reduce_kernel<<<dim3(static_cast<unsigned>(blocks)), kReduceThreads, 0, stream>>>(
      q.data_ptr<float>(), dz.data_ptr<float>(), sc.info->data_ptr<int64_t>(), sc.K, sc.d_z,
      sc.compat);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

}  // namespace kadapt
