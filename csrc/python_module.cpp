// efficientvit_kernels._C: importing it loads this library, whose static initializers register
// the ops; its one function serves cpu_replay's check before each call (graphs.py).
#include <Python.h>

#include <algorithm>
#include <cstdint>

namespace {

// The largest version tag among a list of dicts (PEP 509: every change to a dict gives it a tag
// above every tag given before), so that a model's dicts are known unchanged since the last
// call by reading one cache line of each, not their entries and the objects in them (at batch
// 1, with the caches cold after the model's weights went through, that took ~0.1 ms). None
// from Python 3.14 on, whose dicts have no version; the caller then compares the entries.
PyObject* max_dict_version(PyObject*, PyObject* dicts) {
#if PY_VERSION_HEX < 0x030E0000
  if (!PyList_CheckExact(dicts)) {
    PyErr_SetString(PyExc_TypeError, "max_dict_version takes a list of dicts");
    return nullptr;
  }
  uint64_t version = 0;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(dicts); ++i) {
    PyObject* d = PyList_GET_ITEM(dicts, i);
    if (!PyDict_Check(d)) {
      PyErr_SetString(PyExc_TypeError, "max_dict_version takes a list of dicts");
      return nullptr;
    }
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // deprecated from 3.12, kept to 3.13
    version = std::max<uint64_t>(version, reinterpret_cast<PyDictObject*>(d)->ma_version_tag);
#pragma GCC diagnostic pop
  }
  return PyLong_FromUnsignedLongLong(version);
#else
  Py_RETURN_NONE;
#endif
}

PyMethodDef methods[] = {
    {"max_dict_version", max_dict_version, METH_O,
     "The largest version tag among a list of dicts; None where dicts have none."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
