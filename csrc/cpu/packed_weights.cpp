// The CPU backend's private library: the PackedWeights class and, per op with packed weights,
// its packing X_pack (see packed_weights.h). Not part of the public API: the layout and these
// schemas may change with any build. Registered in this one file, in this order: an op's
// schema names the class, which must be registered first (static initializers of different
// files run in no set order).
#include "cpu/packed_weights.h"

#include <ATen/record_function.h>
#include <torch/library.h>

#include "checks.h"
#include "inference_only.h"

namespace efficientvit::cpu {

at::Tensor PackedWeights::run(const at::Tensor& x, bool flag) const {
  RECORD_FUNCTION(name, std::vector<c10::IValue>({x}));
  check_no_grad(name.c_str(), x);
  check_input(x);
  TORCH_CHECK_VALUE(x.device().is_cpu(), "efficientvit: ", op, " on packed weights: x is on ",
                    x.device(), "; packed weights are for the CPU kernels");
  TORCH_CHECK_VALUE(x.scalar_type() == dtype, "efficientvit: x has dtype ", x.scalar_type(),
                    " but the weights were packed for ", dtype);
  TORCH_CHECK_VALUE(x.size(1) == channels, "efficientvit: x has ", x.size(1),
                    " channels but the weights were packed for ", channels);
  return kernel(x, *this, flag);
}

}  // namespace efficientvit::cpu

#define EFFICIENTVIT_PACKED_WEIGHTS "__torch__.torch.classes.efficientvit_cpu.PackedWeights"

TORCH_LIBRARY(efficientvit_cpu, m) {
  m.class_<efficientvit::cpu::PackedWeights>("PackedWeights")
      .def("run", &efficientvit::cpu::PackedWeights::run);
  m.def(
      "cga_pack(Tensor qkv_weight, Tensor qkv_bias, Tensor dw_weight, Tensor dw_bias, "
      "Tensor attention_bias, Tensor proj_weight, Tensor proj_bias, int window_size, "
      "float scale) -> " EFFICIENTVIT_PACKED_WEIGHTS);
  m.def("ffn_pack(Tensor w1, Tensor b1, Tensor w2, Tensor b2) -> " EFFICIENTVIT_PACKED_WEIGHTS);
  m.def(
      "conv1x1_pack(Tensor weight, Tensor bias, Tensor? dw_weight=None, Tensor? dw_bias=None) -> "
      EFFICIENTVIT_PACKED_WEIGHTS);
  m.def("patch_embed_pack(Tensor[] weights, Tensor[] biases) -> " EFFICIENTVIT_PACKED_WEIGHTS);
}

TORCH_LIBRARY_IMPL(efficientvit_cpu, CPU, m) {
  using namespace efficientvit::cpu;
  m.impl("cga_pack", &cga_pack_cpu);
  m.impl("ffn_pack", &ffn_pack_cpu);
  m.impl("conv1x1_pack", &conv1x1_pack_cpu);
  m.impl("patch_embed_pack", &patch_embed_pack_cpu);
}
