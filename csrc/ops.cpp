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

// csrc/bottleneck_adapter.cu
std::tuple<at::Tensor, at::Tensor> bottleneck_adapter_fwd_cuda(
    const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& w_down,
    const at::Tensor& b_down, const at::Tensor& w_up, const at::Tensor& b_up, int64_t activation);

}  // namespace kadapt

TORCH_LIBRARY(kadapt, m) {
  m.def(
      "bottleneck_adapter_fwd(Tensor x, Tensor? residual, Tensor w_down, Tensor b_down, "
      "Tensor w_up, Tensor b_up, int activation) -> (Tensor y, Tensor z)");
}

TORCH_LIBRARY_IMPL(kadapt, CUDA, m) {
  m.impl("bottleneck_adapter_fwd", &kadapt::bottleneck_adapter_fwd_cuda);
}

static struct PyModuleDef kadapt_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "kadapt CUDA ops; importing this module registers them under torch.ops.kadapt",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kadapt_c_module); }
