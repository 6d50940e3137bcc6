// Operator schemas of effir's CUDA extension (namespace effir_C, apart from the Python-side effir:: ops that
// wrap them with autograd, fake tensors and dispatch). CUDA implementations: info_nce.cu and
// bottleneck_adapter.cu (TORCH_LIBRARY_IMPL). Signatures mirror the backend contracts of
// effir/ops/info_nce_*.py and effir/ops/bottleneck_adapter_*.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(effir_C, m) {
  m.def(
      "info_nce_fwd(Tensor q, Tensor docs, Tensor temperature, Tensor? query_groups, Tensor? doc_groups, "
      "int pos_offset, bool symmetric) -> (Tensor loss, Tensor lse, Tensor dloss_dt)");
  m.def(
      "info_nce_bwd(Tensor q, Tensor docs, Tensor temperature, Tensor lse, Tensor grad_loss, "
      "Tensor? query_groups, Tensor? doc_groups, int pos_offset) -> (Tensor dq, Tensor ddocs)");
  m.def(
      "adapter_fwd(Tensor x, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, str activation, "
      "float scaling) -> Tensor");
  m.def(
      "adapter_bwd(Tensor dy, Tensor x, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, str activation, "
      "float scaling) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "adapter_ln_fwd(Tensor x, Tensor res, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, "
      "Tensor ln_weight, Tensor ln_bias, str activation, float scaling, float eps, bool original_ln_before) "
      "-> Tensor");
  m.def(
      "adapter_ln_bwd(Tensor dy, Tensor x, Tensor res, Tensor w_down, Tensor b_down, Tensor w_up, Tensor b_up, "
      "Tensor ln_weight, Tensor ln_bias, str activation, float scaling, float eps, bool original_ln_before) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

// `import effir._C` loads this library, which registers the operators above as torch.ops.effir_C.*.
// The module itself is empty (no pybind11: the ops go through the dispatcher, as torch.compile needs).
#define EFFIR_CAT2(a, b) a##b
#define EFFIR_CAT(a, b) EFFIR_CAT2(a, b)
#define EFFIR_STR2(a) #a
#define EFFIR_STR(a) EFFIR_STR2(a)
PyMODINIT_FUNC EFFIR_CAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef def = {PyModuleDef_HEAD_INIT, EFFIR_STR(TORCH_EXTENSION_NAME), nullptr, -1, nullptr};
  return PyModule_Create(&def);
}
