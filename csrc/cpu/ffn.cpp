// Pointwise MLP on CPU: [x +] w2 relu(w1 x + b1) + b2, over tiles of tokens. A tile's hidden
// activation (M channels) lives in a per-thread buffer that stays in L2 and never reaches memory.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace efficientvit::cpu {
namespace {

constexpr int64_t kTileTokens = 64;  // hidden tile of 64 x M: 192 KiB at M = 768, fp32

// The packed parameters (ffn_pack): the weights transposed, padded to whole vectors (zeros).
// They are the B operands of a token-major tile; a channel-major tile reads them transposed as
// its A operands.
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
  return {at::constant_pad_nd(w1.t(), {0, MP - M}).contiguous(),
          at::constant_pad_nd(b1, {0, MP - M}).contiguous(),
          at::constant_pad_nd(w2.t(), {0, CP - C}).contiguous(),
          at::constant_pad_nd(b2, {0, CP - C}).contiguous()};
}

template <typename T>
void run_ffn(const DenseIO& io, at::TensorList packed, bool residual) {
  const at::Tensor& input = io.input;
  const int64_t B = input.size(0), C = input.size(1), HW = input.size(2) * input.size(3);
  const int64_t M = packed[kW2].size(0), MP = padded<T>(M), CP = padded<T>(C);
  const int64_t tokens = B * HW, tile = padded<T>(kTileTokens);
  const bool token_major = io.channels_last;
  const T *w1 = packed[kW1].data_ptr<T>(), *b1 = packed[kB1].data_ptr<T>();
  const T *w2 = packed[kW2].data_ptr<T>(), *b2 = packed[kB2].data_ptr<T>();
  const T* x = input.data_ptr<T>();
  T* out = io.output.data_ptr<T>();

  at::parallel_for(0, (tokens + tile - 1) / tile, 1, [&](int64_t begin, int64_t end) {
    // 64-byte aligned; zeroed once: the padding columns of a channel-major tile hold finite values.
    const at::Tensor buffer = at::zeros({token_major ? tile * (MP + CP) : (C + M + C) * tile},
                                        input.options());
    T* scratch = buffer.data_ptr<T>();
    for (int64_t t = begin; t < end; ++t) {
      const int64_t t0 = t * tile, n = std::min(tile, tokens - t0);
      if (token_major) {  // the tokens of all images are one run of rows of C channels
        T* hidden = scratch;        // n x MP
        T* y = hidden + tile * MP;  // n x CP
        const T* xt = x + t0 * C;
        gemm<T>(n, MP, C, {xt, C, 1}, w1, MP, {b1, 0, 1}, hidden, MP, /*apply_relu=*/true);
        gemm<T>(n, CP, M, {hidden, MP, 1}, w2, CP, {b2, 0, 1}, y, CP);
        copy_tile<T>(n, C, {y, CP, 1}, {residual ? xt : nullptr, C, 1}, {out + t0 * C, C, 1});
      } else {  // a tile may span images; its part in each is C rows (stride HW) of tokens
        const int64_t nP = padded<T>(n);
        T* x_t = scratch;            // C x nP
        T* hidden = x_t + C * tile;  // M x nP
        T* y = hidden + M * tile;    // C x nP
        const auto for_each_image_part = [&](auto&& f) {
          for (int64_t s = t0; s < t0 + n;) {
            const int64_t len = std::min(HW - s % HW, t0 + n - s);
            f(s / HW * C * HW + s % HW, s - t0, len);  // offset in x, column in the tile, tokens
            s += len;
          }
        };
        for_each_image_part([&](int64_t offset, int64_t col, int64_t len) {
          copy_tile<T>(C, len, {x + offset, HW, 1}, {}, {x_t + col, nP, 1});
        });
        gemm<T>(M, nP, C, {w1, 1, MP}, x_t, nP, {b1, 1, 0}, hidden, nP, /*apply_relu=*/true);
        gemm<T>(C, nP, M, {w2, 1, CP}, hidden, nP, {b2, 1, 0}, y, nP);
        for_each_image_part([&](int64_t offset, int64_t col, int64_t len) {
          copy_tile<T>(C, len, {y + col, nP, 1}, {residual ? x + offset : nullptr, HW, 1},
                       {out + offset, HW, 1});
        });
      }
    }
  });
}

at::Tensor run_ffn(const at::Tensor& x, at::TensorList packed, bool residual) {
  const DenseIO io = dense_input_and_output(x);
  if (io.output.numel() == 0) return io.output;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::ffn", [&] {
    run_ffn<scalar_t>(io, packed, residual);
  });
  return io.output;
}

// The three entry points: the op (packs, then runs), the packing alone, and the op on packed
// weights.

at::Tensor ffn_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, bool residual) {
  check_ffn(x, w1, b1, w2, b2);
  return run_ffn(x, pack_ffn(w1, b1, w2, b2), residual);
}

std::vector<at::Tensor> ffn_pack_cpu(const at::Tensor& w1, const at::Tensor& b1,
                                     const at::Tensor& w2, const at::Tensor& b2) {
  TORCH_CHECK(at::isFloatingType(w1.scalar_type()),
              "efficientvit: w1 must be a floating-point tensor, got ", w1.scalar_type());
  check_ffn_params(w1.dim() == 2 ? w1.size(1) : 0, {w1, "w1"}, w1, b1, w2, b2);
  return pack_ffn(w1, b1, w2, b2);
}

at::Tensor ffn_packed_cpu(const at::Tensor& x, at::TensorList packed, bool residual) {
  check_input(x);
  TORCH_CHECK(packed.size() == kFfnPacked && packed[kW2].dim() == 2,
              "efficientvit: ffn_packed takes the ", int(kFfnPacked), " tensors of ffn_pack");
  const at::ScalarType dtype = x.scalar_type();
  const int64_t C = x.size(1), M = packed[kW2].size(0);
  const int64_t MP = padded(M, dtype), CP = padded(C, dtype);
  check_packed("ffn_packed", packed,
               {{"w1", {C, MP}, dtype}, {"b1", {MP}, dtype}, {"w2", {M, CP}, dtype},
                {"b2", {CP}, dtype}});
  return run_ffn(x, packed, residual);
}

}  // namespace
}  // namespace efficientvit::cpu

TORCH_LIBRARY_IMPL(efficientvit, CPU, m) {
  m.impl("ffn", &efficientvit::cpu::ffn_cpu);
  m.impl("ffn_pack", &efficientvit::cpu::ffn_pack_cpu);
  m.impl("ffn_packed", &efficientvit::cpu::ffn_packed_cpu);
}
