// Pointwise MLP on CPU: [x +] w2 relu(w1 x + b1) + b2, over tiles of tokens. A tile's hidden
// activation (M channels; 288 KiB at M = 768, fp32) lives in a per-thread buffer that stays in
// L2 and never reaches memory.
#undef EFFICIENTVIT_ISA_FILE
#define EFFICIENTVIT_ISA_FILE "cpu/ffn.cpp"
#include "cpu/foreach_isa.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/packed_weights.h"

EFFICIENTVIT_ISA_BEGIN
namespace {

// The packed parameters (ffn_pack): the weights transposed, padded to whole vectors (zeros) and
// in the GEMM's panel-major layout, as the B operands of a token-major tile.
enum FfnPacked {
  kW1,         // (C, MP)
  kB1,         // (MP)
  kW2,         // (M, CP)
  kB2,         // (CP)
  kFfnPacked,  // count
};

std::vector<at::Tensor> pack_ffn(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                                 const at::Tensor& b2) {
  const int64_t M = w1.size(0), C = w1.size(1);
  const int64_t MP = padded(M, w1.scalar_type()), CP = padded(C, w1.scalar_type());
  return {pack_panels(at::constant_pad_nd(w1.t(), {0, MP - M})),
          at::constant_pad_nd(b1, {0, MP - M}).contiguous(),
          pack_panels(at::constant_pad_nd(w2.t(), {0, CP - C})),
          at::constant_pad_nd(b2, {0, CP - C}).contiguous()};
}

template <typename T>
void ffn_tiles(const DenseIO& io, at::TensorList packed, bool residual) {
  const int64_t C = io.input.size(1), M = packed[kW2].size(0);
  const int64_t MP = padded<T>(M), CP = padded<T>(C);
  const T *w1 = packed[kW1].data_ptr<T>(), *b1 = packed[kB1].data_ptr<T>();
  const T *w2 = packed[kW2].data_ptr<T>(), *b2 = packed[kB2].data_ptr<T>();
  for_each_token_tile<T>(io.input, io.channels_last, io.output, CP, kTileTokens * MP, residual,
                         [&](const T* x, int64_t n, T* y, T* hidden, const T* add) {
    gemm<T>(n, MP, C, {x, C, 1}, w1, kPanelMajor, {b1, 0, 1}, hidden, MP, /*apply_relu=*/true,
            {}, first_panel(w2, M, CP));
    gemm<T>(n, CP, M, {hidden, MP, 1}, w2, kPanelMajor, {b2, 0, 1}, y, CP, /*apply_relu=*/false,
            {add, C, 1});  // with add, y is the output
  });
}

void run_ffn(const DenseIO& io, at::TensorList packed, bool residual) {
  if (io.output.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(io.input.scalar_type(), "efficientvit::ffn", [&] {
    ffn_tiles<scalar_t>(io, packed, residual);
  });
}

// The entry points: the op on packed weights, the packing (after the anonymous namespace), its
// cached form (X_pack's), and the op, which packs once per set of weights and runs.

at::Tensor ffn_packed_cpu(const at::Tensor& x, const PackedWeights& weights, bool residual) {
  const DenseIO io = dense_input_and_output(x);
  run_ffn(io, weights.tensors, residual);
  return io.output;
}

}  // namespace

Packed ffn_pack_cpu(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                    const at::Tensor& b2) {
  TORCH_CHECK_VALUE(at::isFloatingType(w1.scalar_type()),
                    "efficientvit: w1 must be a floating-point tensor, got ", w1.scalar_type());
  check_ffn_params(w1.dim() == 2 ? w1.size(1) : 0, {w1, "w1"}, w1, b1, w2, b2);
  return c10::make_intrusive<PackedWeights>("ffn", &ffn_packed_cpu, pack_ffn(w1, b1, w2, b2),
                                            std::vector<int64_t>{}, w1.size(1), w1.scalar_type());
}

Packed ffn_cached_pack_cpu(const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
                           const at::Tensor& b2) {
  return cached_packing("ffn", {w1, b1, w2, b2}, {}, [&] { return ffn_pack_cpu(w1, b1, w2, b2); });
}

at::Tensor ffn_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, bool residual) {
  check_ffn(x, w1, b1, w2, b2);
  return ffn_packed_cpu(x, *ffn_cached_pack_cpu(w1, b1, w2, b2), residual);
}

EFFICIENTVIT_ISA_END

#if EFFICIENTVIT_ISA_LAST_PASS
TORCH_LIBRARY_IMPL(efficientvit, CPU, m) { m.impl("ffn", EFFICIENTVIT_SELECT_ISA(ffn_cpu)); }
#endif
