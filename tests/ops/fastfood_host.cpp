// Host build of the CUDA Fastfood kernels' block code (csrc/fastfood.cuh) for tests/ops/test_fastfood.py:
// the launch sequence of csrc/fastfood.cu `run` and the reduction, each "block" run with one thread
// (tid 0 of 1), which executes every work item of a phase before the next phase, as a block does.
// Compiled with the host C++ compiler and called through ctypes; no GPU, no torch headers.
#include <cstdint>
#include <vector>

#include "fastfood.cuh"

namespace ff = kadapt::fastfood;

namespace {

template <int MODE>
void run(const float* src, float* out, float* ws1, float* ws2, const int64_t* info, const float* sigma,
         const int32_t* inner, int64_t P, const int32_t* const* levels, const int64_t* level_p, int J,
         int logT, int logOC) {
  std::vector<float> s(ff::kSmemFloats);
  for (int64_t p = 0; p < P; ++p)
    ff::inner_block<MODE, 1>(src, ws1, out, info, sigma, inner, logT, p, s.data(), 0, 1);
  for (int j = 0; j < J; ++j)
    for (int64_t p = 0; p < level_p[j]; ++p)
      ff::outer_block<MODE>(ws1, out, info, sigma, levels[j], false, logOC, p, s.data(), 0, 1);
  for (int64_t p = 0; p < P; ++p)
    ff::inner_block<MODE, 2>(ws1, ws2, out, info, sigma, inner, logT, p, s.data(), 0, 1);
  for (int j = 0; j < J; ++j)
    for (int64_t p = 0; p < level_p[j]; ++p)
      ff::outer_block<MODE>(ws2, out, info, sigma, levels[j], true, logOC, p, s.data(), 0, 1);
}

}  // namespace

extern "C" {

// mode 0: out (ΣN) = the forward of src = z; mode 1: dz (d_z) = the backward of src = γ.
void kadapt_fastfood_host(int mode, const float* src, float* out, float* ws1, float* ws2, float* dz,
                          const int64_t* info, const float* sigma, const int32_t* inner, int64_t P,
                          const int32_t* const* levels, const int64_t* level_p, int J, int logT, int logOC,
                          int64_t K, int64_t d_z, int compat) {
  if (mode == 0) {
    run<0>(src, out, ws1, ws2, info, sigma, inner, P, levels, level_p, J, logT, logOC);
    return;
  }
  run<1>(src, nullptr, ws1, ws2, info, sigma, inner, P, levels, level_p, J, logT, logOC);
  for (int64_t j = 0; j < d_z; ++j) ff::reduce_item(ws2, dz, info, K, compat != 0, j);
}

// The generator alone: signs, Gaussians, π and π⁻¹ of k < count for tensor t of the info table.
void kadapt_fastfood_draws(const int64_t* info, int64_t t, int64_t count, float* sign, float* gauss,
                           int64_t* perm, int64_t* inv) {
  const ff::Row r = ff::load_row(info, t);
  for (int64_t k = 0; k < count; ++k) {
    const uint32_t ku = static_cast<uint32_t>(k);
    sign[k] = ff::sign_of(ku, r);
    gauss[k] = ff::gauss_of(ku, r);
    perm[k] = ff::feistel(ku, r.n, r, false);
    inv[k] = ff::feistel(ku, r.n, r, true);
  }
}

}  // extern "C"
