// The Python module moe_ext._C: importing it runs the static TORCH_LIBRARY registrations.
// Ops are reached through torch.ops.moe_ext.*; nothing is bound here.
#include <Python.h>

extern "C" {
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "moe_ext operators (torch.ops.moe_ext)", -1,
                                          nullptr};
  return PyModule_Create(&module_def);
}
}
