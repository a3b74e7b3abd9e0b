// efficientvit_kernels._C: importing it loads this library, whose static initializers register
// the ops; its functions serve cpu_replay's call (graphs.py): the check that a model's dicts
// are unchanged, and a program's call with every check that lets it stand for the model.
#include <Python.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/jit/python/pybind_utils.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/program.h"

namespace {

// The largest version tag among a list of dicts (PEP 509: every change to a dict gives it a tag
// above every tag given before), so that a model's dicts are known unchanged since the last
// call by reading one cache line of each, not their entries and the objects in them (at batch
// 1, with the caches cold after the model's weights went through, that took ~0.1 ms). Nothing
// from Python 3.14 on, whose dicts have no version. Sets a TypeError unless dicts is a list of
// dicts.
std::optional<uint64_t> dicts_version(PyObject* dicts, bool* ok) {
  *ok = PyList_CheckExact(dicts);
  uint64_t version = 0;
  for (Py_ssize_t i = 0; *ok && i < PyList_GET_SIZE(dicts); ++i) {
    PyObject* d = PyList_GET_ITEM(dicts, i);
    *ok = PyDict_Check(d);
#if PY_VERSION_HEX < 0x030E0000
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"  // deprecated from 3.12, kept to 3.13
    if (*ok) {
      version = std::max<uint64_t>(version, reinterpret_cast<PyDictObject*>(d)->ma_version_tag);
    }
#pragma GCC diagnostic pop
#endif
  }
  if (!*ok) PyErr_SetString(PyExc_TypeError, "expected a list of dicts");
#if PY_VERSION_HEX < 0x030E0000
  return version;
#else
  return std::nullopt;
#endif
}

// max_dict_version(dicts): that version, or None.
PyObject* max_dict_version(PyObject*, PyObject* dicts) {
  bool ok;
  const std::optional<uint64_t> version = dicts_version(dicts, &ok);
  if (!ok) return nullptr;
  if (!version) Py_RETURN_NONE;
  return PyLong_FromUnsignedLongLong(*version);
}

// A program standing in for a model's call (cpu_replay), with what its capture assumed: the
// input's shape, strides and dtype, the model's dicts at a version, _Fused.changes, no weight
// requiring a gradient while gradients are recorded, no global module hook. fast_call checks all
// of that and runs the program in one C call: at batch 1, with the caches cold after a forward,
// the same checks in Python and the program's method call took 0.1-0.2 ms.
struct FastCall {
  c10::intrusive_ptr<efficientvit::cpu::Program> program;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  PyObject* dicts;          // the model's (a list, owned)
  uint64_t version;         // their version then
  long long changes;        // _Fused.changes then
  PyObject* global_hooks;   // nn.Module's global hook dicts (a list, owned)
  std::vector<at::Tensor> weights;

  ~FastCall() {
    Py_XDECREF(dicts);
    Py_XDECREF(global_hooks);
  }

  // x: a plain CPU tensor (no functorch or functionalization wrapper, no subclass: the caller
  // checks the type), as captured, and no gradient to record.
  bool takes(const at::Tensor& x) const {
    static const c10::DispatchKeySet wrappers{
        c10::DispatchKey::FuncTorchGradWrapper, c10::DispatchKey::FuncTorchBatched,
        c10::DispatchKey::BatchedNestedTensor, c10::DispatchKey::Functionalize,
        c10::DispatchKey::Python};
    if (!x.is_cpu() || x.layout() != at::kStrided || x.key_set().has_any(wrappers) ||
        x.scalar_type() != dtype || !x.sizes().equals(sizes) || !x.strides().equals(strides)) {
      return false;
    }
    if (at::GradMode::is_enabled() &&
        (x.requires_grad() || std::any_of(weights.begin(), weights.end(),
                                          [](const at::Tensor& w) { return w.requires_grad(); }))) {
      return false;
    }
    return !torch::jit::tracer::isTracing() && c10::impl::TorchDispatchModeTLS::stack_len() == 0 &&
           !at::impl::torch_function_mode_enabled();
  }

  bool model_unchanged(long long changes_now) const {
    if (changes_now != changes) return false;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(global_hooks); ++i) {
      if (PyDict_GET_SIZE(PyList_GET_ITEM(global_hooks, i)) != 0) return false;
    }
    bool ok;
    const std::optional<uint64_t> now = dicts_version(dicts, &ok);
    return ok && now == version;
  }
};

constexpr const char* kFastCall = "efficientvit_kernels._C.FastCall";

void free_fast_call(PyObject* capsule) {
  delete static_cast<FastCall*>(PyCapsule_GetPointer(capsule, kFastCall));
}

// A torch.Tensor, not a subclass (nn.Parameter included), as graphs.py's _replayable asks.
bool is_plain_tensor(PyObject* x) {
  return Py_TYPE(x) == reinterpret_cast<PyTypeObject*>(THPVariableClass);
}

// fast_call_for(program, x, dicts, changes, global_hooks, weights): the FastCall of a Program
// (efficientvit_cpu.Program) for inputs like x, while the dicts keep their version now and
// _Fused.changes stays `changes`; None where dicts have no version (Python 3.14 on).
PyObject* fast_call_for(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 6, "fast_call_for takes 6 arguments, got ", nargs);
  TORCH_CHECK_TYPE(THPVariable_Check(args[1]), "fast_call_for: x must be a tensor");
  TORCH_CHECK_TYPE(PyList_CheckExact(args[4]) && PyList_CheckExact(args[5]),
                   "fast_call_for: global_hooks and weights must be lists");
  bool ok;
  const std::optional<uint64_t> version = dicts_version(args[2], &ok);
  if (!ok) return nullptr;
  if (!version) Py_RETURN_NONE;
  auto call = std::make_unique<FastCall>();
  call->program =
      torch::jit::toIValue(args[0], c10::getCustomClassType<
                                        c10::intrusive_ptr<efficientvit::cpu::Program>>())
          .toCustomClass<efficientvit::cpu::Program>();
  const at::Tensor& x = THPVariable_Unpack(args[1]);
  call->sizes = x.sizes().vec(), call->strides = x.strides().vec();
  call->dtype = x.scalar_type();
  call->version = *version;
  call->changes = PyLong_AsLongLong(args[3]);
  if (call->changes == -1 && PyErr_Occurred()) return nullptr;
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[4]); ++i) {
    TORCH_CHECK_TYPE(PyDict_Check(PyList_GET_ITEM(args[4], i)),
                     "fast_call_for: global_hooks must be dicts");
  }
  for (Py_ssize_t i = 0; i < PyList_GET_SIZE(args[5]); ++i) {
    PyObject* w = PyList_GET_ITEM(args[5], i);
    TORCH_CHECK_TYPE(THPVariable_Check(w), "fast_call_for: weights must be tensors");
    call->weights.push_back(THPVariable_Unpack(w));
  }
  Py_INCREF(args[2]), call->dicts = args[2];
  Py_INCREF(args[4]), call->global_hooks = args[4];
  PyObject* capsule = PyCapsule_New(call.get(), kFastCall, free_fast_call);
  if (capsule) call.release();
  return capsule;
  END_HANDLE_TH_ERRORS
}

// fast_call(call, x, changes): the program's output on x where the FastCall takes x and the
// model is unchanged (_Fused.changes is `changes`); None otherwise, for the caller's checks.
PyObject* fast_call(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  HANDLE_TH_ERRORS
  TORCH_CHECK_TYPE(nargs == 3, "fast_call takes 3 arguments, got ", nargs);
  auto* call = static_cast<FastCall*>(PyCapsule_GetPointer(args[0], kFastCall));
  if (!call) return nullptr;
  const long long changes = PyLong_AsLongLong(args[2]);
  if (changes == -1 && PyErr_Occurred()) return nullptr;
  if (!is_plain_tensor(args[1])) Py_RETURN_NONE;
  const at::Tensor& x = THPVariable_Unpack(args[1]);
  if (!call->takes(x) || !call->model_unchanged(changes)) {
    if (PyErr_Occurred()) return nullptr;
    Py_RETURN_NONE;
  }
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's ops: other threads run meanwhile
    y = call->program->run(x);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyMethodDef methods[] = {
    {"max_dict_version", max_dict_version, METH_O,
     "The largest version tag among a list of dicts; None where dicts have none."},
    {"fast_call_for", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_call_for)),
     METH_FASTCALL, "A program's FastCall (capsule), or None; see python_module.cpp."},
    {"fast_call", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(fast_call)),
     METH_FASTCALL, "A FastCall's program on x, or None where it may not stand for the model."},
    {nullptr, nullptr, 0, nullptr},
};

}  // namespace

extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
