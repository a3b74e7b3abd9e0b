// The CUDA ops run by the emulation on CPU tensors: the launchers of csrc/cuda/*.cu with the
// kernel launch replaced by emulation::launch; the same argument checks, launch plans and
// kernel arguments (the kernel headers' functions), output poisoned with NaN. Built by
// tests/test_cuda_emul.py with EFFICIENTVIT_EMULATION defined, as torch ops in the namespace
// TORCH_EXTENSION_NAME (one per build, so a mutant's build loads beside the real one); torch's
// op registration compiles faster than pybind11's bindings.
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <limits>

#include "cga.cuh"
#include "dwconv.cuh"
#include "ffn.cuh"
#include "patch_embed.cuh"

namespace efficientvit {
namespace gpu {
namespace {

// Dynamic shared memory an H100 block may opt in to (the CUDA build asks the device).
constexpr int64_t kSmemLimit = 227 * 1024;

using emulation::Order;

at::Tensor poisoned_output(const at::Tensor& x, at::MemoryFormat format) {
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(format));
  return out.fill_(std::numeric_limits<double>::quiet_NaN());
}

// cga on the emulated device; smem_target stands in for kSmemTarget (a smaller one plans
// fewer windows per block), order and seed pick the order threads run in.
at::Tensor cga(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& qkv_bias,
               const at::Tensor& dw_weight, const at::Tensor& dw_bias,
               const at::Tensor& attention_bias, const at::Tensor& proj_weight,
               const at::Tensor& proj_bias, int64_t window_size, double scale, bool residual,
               int64_t order, int64_t seed, int64_t smem_target) {
  const CgaDims dims = check_cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias,
                                 proj_weight, proj_bias, window_size);
  check_cuda_dtype(x);
  const at::MemoryFormat format = output_memory_format(x);
  at::Tensor out = poisoned_output(x, format);
  if (out.numel() == 0) return out;

  const CgaLaunch plan = plan_cga(dims, x.element_size(), smem_target, kSmemLimit);
  const at::Tensor xc = x.contiguous(format);
  const at::Tensor params[] = {qkv_weight.contiguous(), qkv_bias.contiguous(),
                               dw_weight.contiguous(),  dw_bias.contiguous(),
                               attention_bias.contiguous(), proj_weight.contiguous(),
                               proj_bias.contiguous()};
  EFFICIENTVIT_DISPATCH(x.scalar_type(), "efficientvit_cga_emulated", [&] {
    using T = scalar_t;
    const CgaArgs<T> args = cga_args<T>(dims, plan, xc, format, out, params, scale, residual);
    emulation::launch(cga_kernel<T>, plan.blocks, kThreads, plan.smem.bytes, args,
                      static_cast<Order>(order), static_cast<unsigned>(seed));
  });
  return out;
}

// Windows per block cga plans for x (tests check their shapes reach several).
int64_t cga_windows_per_block(const at::Tensor& x, const at::Tensor& qkv_weight,
                              const at::Tensor& dw_weight, int64_t window_size,
                              int64_t smem_target) {
  const int64_t heads = qkv_weight.size(0), kd = dw_weight.size(1), d = x.size(1) / heads;
  const CgaDims dims{x.size(0), x.size(1), x.size(2), x.size(3), heads, kd, d,
                     dw_weight.size(3), window_size};
  return plan_cga(dims, x.element_size(), smem_target, kSmemLimit).wpb;
}

at::Tensor dwconv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                  bool relu, bool residual, int64_t order, int64_t seed) {
  check_dwconv(x, weight, bias);
  check_cuda_dtype(x);
  const at::MemoryFormat format = output_memory_format(x);
  at::Tensor out = poisoned_output(x, format);
  if (out.numel() == 0) return out;

  const at::Tensor xc = x.contiguous(format), taps = dwconv_taps(weight),
                   bc = bias.contiguous();
  const DwconvLaunch plan = plan_dwconv(xc, format, out);
  EFFICIENTVIT_DISPATCH(x.scalar_type(), "efficientvit_dwconv_emulated", [&] {
    using T = scalar_t;
    const DwconvArgs<T> args = dwconv_args<T>(plan, xc, format, out, taps, bc, relu, residual);
    emulation::launch(dwconv_kernel_for<T>(plan), plan.blocks, kThreads, 0, args,
                      static_cast<Order>(order), static_cast<unsigned>(seed));
  });
  return out;
}

// patch_embed: CPU convolutions standing in for cuDNN's, each followed by the emulated
// bias_act_kernel (patch_embed_chain, as patch_embed.cu runs it).
at::Tensor patch_embed(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                       bool final_relu, int64_t order, int64_t seed) {
  check_patch_embed(x, weights, biases);
  check_cuda_dtype(x);
  return patch_embed_chain(x, weights, biases, final_relu, [&](const BiasActLaunch& plan,
                                                               at::Tensor& y,
                                                               const at::Tensor& bias, bool relu) {
    EFFICIENTVIT_DISPATCH(y.scalar_type(), "efficientvit_bias_act_emulated", [&] {
      using T = scalar_t;
      emulation::launch(bias_act_kernel_for<T>(plan), plan.blocks, kThreads, 0,
                        bias_act_args<T>(plan, y, bias, relu), static_cast<Order>(order),
                        static_cast<unsigned>(seed));
    });
  });
}

at::Tensor ffn(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
               const at::Tensor& w2, const at::Tensor& b2, bool residual, int64_t order,
               int64_t seed, int64_t smem_target) {
  check_ffn(x, w1, b1, w2, b2);
  check_cuda_dtype(x);
  const at::MemoryFormat format = output_memory_format(x);
  at::Tensor out = poisoned_output(x, format);
  if (out.numel() == 0) return out;

  const FfnLaunch plan = plan_ffn(x, w1.size(0), smem_target, kSmemLimit);
  const at::Tensor xc = x.contiguous(format);
  const at::Tensor w1c = w1.contiguous(), b1c = b1.contiguous(), w2c = w2.contiguous(),
                   b2c = b2.contiguous();
  EFFICIENTVIT_DISPATCH(x.scalar_type(), "efficientvit_ffn_emulated", [&] {
    using T = scalar_t;
    const FfnArgs<T> args = ffn_args<T>(plan, xc, format, out, w1c, b1c, w2c, b2c, residual);
    emulation::launch(ffn_kernel<T>, plan.blocks, kThreads, plan.smem.bytes, args,
                      static_cast<Order>(order), static_cast<unsigned>(seed));
  });
  return out;
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit

TORCH_LIBRARY(TORCH_EXTENSION_NAME, m) {
  namespace g = efficientvit::gpu;
  m.def(
      "cga(Tensor x, Tensor qkv_weight, Tensor qkv_bias, Tensor dw_weight, Tensor dw_bias, "
      "Tensor attention_bias, Tensor proj_weight, Tensor proj_bias, int window_size, float scale, "
      "bool residual, int order, int seed, int smem_target) -> Tensor",
      &g::cga);
  m.def(
      "cga_windows_per_block(Tensor x, Tensor qkv_weight, Tensor dw_weight, int window_size, "
      "int smem_target) -> int",
      &g::cga_windows_per_block);
  m.def(
      "dwconv(Tensor x, Tensor weight, Tensor bias, bool relu, bool residual, int order, "
      "int seed) -> Tensor",
      &g::dwconv);
  m.def(
      "patch_embed(Tensor x, Tensor[] weights, Tensor[] biases, bool final_relu, int order, "
      "int seed) -> Tensor",
      &g::patch_embed);
  m.def(
      "ffn(Tensor x, Tensor w1, Tensor b1, Tensor w2, Tensor b2, bool residual, int order, "
      "int seed, int smem_target) -> Tensor",
      &g::ffn);
  m.def("smem_target() -> int", [] { return g::kSmemTarget; });
}
