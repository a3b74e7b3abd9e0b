// Pointwise (1x1) convolution on CPU: [relu](w x + b), over tiles of tokens, one GEMM per tile
// with the weights packed panel-major (the convolutions of PatchMerging, where oneDNN reaches
// 35-43 GMAC/s on this core and the GEMM here ~50).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace efficientvit::cpu {
namespace {

// The packed parameters (pointwise_pack): the weight transposed, padded to whole vectors (zeros)
// and panel-major, the B operand of a token-major tile; the bias padded.
enum PointwisePacked {
  kWeight,           // (C, CoP)
  kBias,             // (CoP)
  kPointwisePacked,  // count
};

std::vector<at::Tensor> pack_pointwise(const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t Co = weight.size(0), CoP = padded(Co, weight.scalar_type());
  return {pack_panels(at::constant_pad_nd(weight.t(), {0, CoP - Co})),
          at::constant_pad_nd(bias, {0, CoP - Co}).contiguous()};
}

at::Tensor run_pointwise(const at::Tensor& x, at::TensorList packed, int64_t Co, bool relu) {
  const DenseIO io = dense_input_and_output(x, Co);
  if (io.output.numel() == 0) return io.output;
  const int64_t C = x.size(1), CoP = packed[kBias].size(0);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::pointwise", [&] {
    const scalar_t* w = packed[kWeight].data_ptr<scalar_t>();
    const scalar_t* b = packed[kBias].data_ptr<scalar_t>();
    for_each_token_tile<scalar_t>(
        io.input, io.channels_last, io.output, CoP, 0,
        /*residual=*/false, [&](const scalar_t* x_tile, int64_t n, scalar_t* y, scalar_t*) {
          gemm<scalar_t>(n, CoP, C, {x_tile, C, 1}, w, kPanelMajor, {b, 0, 1}, y, CoP, relu);
        });
  });
  return io.output;
}

// The three entry points: the op (packs, then runs), the packing alone, and the op on packed
// weights.

at::Tensor pointwise_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         bool relu) {
  check_pointwise(x, weight, bias);
  return run_pointwise(x, pack_pointwise(weight, bias), weight.size(0), relu);
}

std::vector<at::Tensor> pointwise_pack_cpu(const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()),
              "efficientvit: weight must be a floating-point tensor, got ", weight.scalar_type());
  check_pointwise_params(weight.dim() == 2 ? weight.size(1) : 0, {weight, "weight"}, weight, bias);
  return pack_pointwise(weight, bias);
}

at::Tensor pointwise_packed_cpu(const at::Tensor& x, at::TensorList packed, int64_t out_channels,
                                bool relu) {
  check_input(x);
  TORCH_CHECK(out_channels > 0, "efficientvit: pointwise_packed: out_channels must be positive");
  const at::ScalarType dtype = x.scalar_type();
  const int64_t CoP = padded(out_channels, dtype);
  check_packed("pointwise_packed", packed,
               {{"weight", {x.size(1), CoP}, dtype}, {"bias", {CoP}, dtype}});
  return run_pointwise(x, packed, out_channels, relu);
}

}  // namespace
}  // namespace efficientvit::cpu

TORCH_LIBRARY_IMPL(efficientvit, CPU, m) {
  m.impl("pointwise", &efficientvit::cpu::pointwise_cpu);
  m.impl("pointwise_pack", &efficientvit::cpu::pointwise_pack_cpu);
  m.impl("pointwise_packed", &efficientvit::cpu::pointwise_packed_cpu);
}
