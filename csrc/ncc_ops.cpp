// Operator schemas of the wide-search NCC layer, declared once.
//
// Kernels are registered per device in cpu/ncc_cpu.cpp and cuda/ncc_cuda.cpp
// (TORCH_LIBRARY_IMPL); fake (meta) implementations and autograd formulas are
// registered from Python in mspcnn/ops/ncc.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing mspcnn._C loads this library, which runs the registrations below.
// The module itself has no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "Kernels of the mspcnn NCC operators.", -1,
      nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(mspcnn, m) {
  m.def("ncc_volume(Tensor a, Tensor b, int patch, int search_rows, float eps) -> Tensor");
  m.def("ncc_volume_backward(Tensor grad, Tensor a, Tensor b, Tensor volume, int patch, "
        "int search_rows, float eps) -> (Tensor, Tensor)");
  m.def("ncc_max(Tensor a, Tensor b, int patch, int search_rows, float eps) -> (Tensor, Tensor)");
  // CUDA only: the tensor-core forward of ncc_max (passes 1: TF32, 3: 3xTF32).
  m.def("ncc_max_tc(Tensor a, Tensor b, int patch, int search_rows, float eps, int passes) "
        "-> (Tensor, Tensor)");
  m.def("ncc_max_backward(Tensor grad, Tensor a, Tensor b, Tensor index, int patch, "
        "int search_rows, float eps) -> (Tensor, Tensor)");
}
