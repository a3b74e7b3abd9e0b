// The ops are for inference: they have no backward formula. Registered at the Autograd key of
// each op, this kernel fails a call that would need one (grad mode on and an input that
// requires grad), saying what to do, instead of returning a result that silently has no
// gradient; any other call goes on to the backend's kernel.
#pragma once
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/grad_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace efficientvit {

constexpr const char* kNoBackward =
    " has no backward formula (the fused ops are for inference), but an input requires grad. "
    "Call it under torch.no_grad() or torch.inference_mode(); for gradients, use the model "
    "before convert(), or convert(model, backend=\"reference\") (plain PyTorch ops).";

// For a kernel reached without the dispatcher (a packed weights' method).
inline void check_no_grad(const char* op, const at::Tensor& x) {
  TORCH_CHECK(!(at::GradMode::is_enabled() && x.requires_grad()), op, kNoBackward);
}

inline bool requires_grad(const c10::IValue& arg) {
  if (arg.isTensor()) return arg.toTensor().requires_grad();
  if (arg.isTensorList())
    for (const at::Tensor& t : arg.toTensorList())
      if (t.requires_grad()) return true;
  return false;
}

inline void inference_only_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                  torch::jit::Stack* stack) {
  if (at::GradMode::is_enabled()) {
    const size_t n = op.schema().arguments().size();
    for (const c10::IValue& arg : torch::jit::last(*stack, n))
      TORCH_CHECK(!requires_grad(arg), op.schema().name(), kNoBackward);
  }
  at::AutoDispatchBelowADInplaceOrView guard;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

inline torch::CppFunction inference_only() {
  return torch::CppFunction::makeFromBoxedFunction<&inference_only_kernel>();
}

}  // namespace efficientvit
