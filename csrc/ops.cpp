// Op schemas and their CUDA registrations for kadapt._C.
//
// Every op is declared once here with TORCH_LIBRARY(kadapt, m) and its CUDA kernel registered with
// TORCH_LIBRARY_IMPL(kadapt, CUDA, m). There is deliberately no CPU kernel: on CPU tensors the
// dispatcher raises NotImplementedError and kadapt's Python layer uses the reference instead. The
// fake (meta) implementations live in Python (kadapt/_extension.py, torch.library.register_fake).
//
// No pybind11 and no <torch/extension.h>: the module is a plain CPython extension whose init
// function returns an empty module; importing it runs the static registrations below.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

namespace kadapt {

// csrc/fused_adapter.cu
std::tuple<at::Tensor, at::Tensor> fused_adapter_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, bool add_input,
    const at::Tensor& w_down, const at::Tensor& b_down, const at::Tensor& w_up,
    const at::Tensor& b_up, int64_t activation);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_adapter_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& z, const at::Tensor& w_down, const at::Tensor& w_up,
    bool add_input, int64_t activation);
at::Tensor kron_weight_cuda(const at::Tensor& A, const at::Tensor& B,
                            const std::optional<at::Tensor>& t);

// csrc/inducer_attention.cu
std::tuple<at::Tensor, at::Tensor, at::Tensor> inducer_attention_fwd_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& A_k, const std::optional<at::Tensor>& a_k,
    const std::optional<at::Tensor>& B_k, const std::optional<at::Tensor>& b_k,
    const std::optional<at::Tensor>& kpm, double scale, bool causal);

// csrc/fastfood.cu
at::Tensor fastfood_fwd_cuda(const at::Tensor& z, at::TensorList tables, at::IntArrayRef meta);
at::Tensor fastfood_bwd_cuda(const at::Tensor& grad, at::TensorList tables, at::IntArrayRef meta);

}  // namespace kadapt

TORCH_LIBRARY(kadapt, m) {
  // y = φ(x·W_d + b_d)·W_u + b_u [+ x] [+ residual]; z = x·W_d + b_d in fp32. x is (T, D).
  m.def(
      "fused_adapter_fwd(Tensor x, Tensor? residual, bool add_input, Tensor w_down, "
      "Tensor b_down, Tensor w_up, Tensor b_up, int activation) -> (Tensor y, Tensor z)");
  // g_z = (dy·W_uᵀ) ⊙ φ'(z); dx = g_z·W_dᵀ [+ dy]; h = φ(z); db_up = Σ_t dy_t (fp32).
  m.def(
      "fused_adapter_bwd(Tensor dy, Tensor z, Tensor w_down, Tensor w_up, bool add_input, "
      "int activation) -> (Tensor dx, Tensor g_z, Tensor h, Tensor db_up)");
  // W = Σ_i A_i ⊗ B_i (B_i = s_i·t_i when t is given), in B's dtype.
  m.def("kron_weight(Tensor A, Tensor B, Tensor? t) -> Tensor");
  // Inducer attention forward (METHODS.md §8, §12.1) for contiguous q (B, H, Tq, d), k, v
  // (B, H, Tk, d), the optional key MLP (A_k (H, d, m_k), a_k (H, m_k), B_k (H, m_k, d), b_k (H, d))
  // and int8 key padding mask kpm (B, Tk): O (q's dtype), LSE and w = σ(s0 − LSE) (fp32, (B, H, Tq)).
  m.def(
      "inducer_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? A_k, Tensor? a_k, Tensor? B_k, "
      "Tensor? b_k, Tensor? kpm, float scale, bool causal) -> (Tensor O, Tensor LSE, Tensor w)");
  // Fastfood projection of Intrinsic-SAID (METHODS.md §12.5): v = cat_i P_i z (fp32 (ΣN,)) for
  // contiguous fp32 z (d_z,), and its exact transpose ∂z = Σ_i s_i P_iᵀ γ_i (fp32 (d_z,)) for γ (ΣN,);
  // tables and meta are the schedule of kadapt/ops/triton/fastfood.py (meta's last entry:
  // grad_scale_compat, required by the backward).
  m.def("fastfood_fwd(Tensor z, Tensor[] tables, int[] meta) -> Tensor");
  m.def("fastfood_bwd(Tensor grad, Tensor[] tables, int[] meta) -> Tensor");
}

TORCH_LIBRARY_IMPL(kadapt, CUDA, m) {
  m.impl("fused_adapter_fwd", &kadapt::fused_adapter_fwd_cuda);
  m.impl("fused_adapter_bwd", &kadapt::fused_adapter_bwd_cuda);
  m.impl("kron_weight", &kadapt::kron_weight_cuda);
  m.impl("inducer_attention_fwd", &kadapt::inducer_attention_fwd_cuda);
  m.impl("fastfood_fwd", &kadapt::fastfood_fwd_cuda);
  m.impl("fastfood_bwd", &kadapt::fastfood_bwd_cuda);
}

static struct PyModuleDef kadapt_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "kadapt CUDA ops; importing this module registers them under torch.ops.kadapt",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kadapt_c_module); }
