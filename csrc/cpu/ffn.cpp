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

template <typename T>
void run_ffn(const DenseIO& io, const at::Tensor& w1, const at::Tensor& b1, const at::Tensor& w2,
             const at::Tensor& b2, bool residual) {
  const at::Tensor& input = io.input;
  const int64_t B = input.size(0), C = input.size(1), HW = input.size(2) * input.size(3);
  const int64_t M = w1.size(0), MP = padded<T>(M), CP = padded<T>(C);
  const int64_t tokens = B * HW, tile = padded<T>(kTileTokens);
  const bool token_major = io.channels_last;
  // Token-major (channels-last x): the tile of x is the A operand in place, the weights are the
  // B operands, transposed and padded to whole vectors. Channel-major (contiguous x): the
  // weights are the A operands as they are, and the tile of x, copied channel-major, is the B.
  at::Tensor p1, q1, p2, q2;  // packed w1, b1, w2, b2
  if (token_major) {
    p1 = at::constant_pad_nd(w1.t(), {0, MP - M}).contiguous();  // (C, MP)
    q1 = at::constant_pad_nd(b1, {0, MP - M}).contiguous();
    p2 = at::constant_pad_nd(w2.t(), {0, CP - C}).contiguous();  // (M, CP)
    q2 = at::constant_pad_nd(b2, {0, CP - C}).contiguous();
  } else {
    p1 = w1.contiguous(), q1 = b1.contiguous(), p2 = w2.contiguous(), q2 = b2.contiguous();
  }
  const T *w1_ = p1.data_ptr<T>(), *b1_ = q1.data_ptr<T>();
  const T *w2_ = p2.data_ptr<T>(), *b2_ = q2.data_ptr<T>();
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
        gemm<T>(n, MP, C, {xt, C, 1}, w1_, MP, {b1_, 0, 1}, hidden, MP, /*apply_relu=*/true);
        gemm<T>(n, CP, M, {hidden, MP, 1}, w2_, CP, {b2_, 0, 1}, y, CP);
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
        gemm<T>(M, nP, C, {w1_, C, 1}, x_t, nP, {b1_, 1, 0}, hidden, nP, /*apply_relu=*/true);
        gemm<T>(C, nP, M, {w2_, M, 1}, hidden, nP, {b2_, 1, 0}, y, nP);
        for_each_image_part([&](int64_t offset, int64_t col, int64_t len) {
          copy_tile<T>(C, len, {y + col, nP, 1}, {residual ? x + offset : nullptr, HW, 1},
                       {out + offset, HW, 1});
        });
      }
    }
  });
}

at::Tensor ffn_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                   const at::Tensor& w2, const at::Tensor& b2, bool residual) {
  check_ffn(x, w1, b1, w2, b2);
  const DenseIO io = dense_input_and_output(x);
  if (io.output.numel() == 0) return io.output;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::ffn", [&] {
    run_ffn<scalar_t>(io, w1, b1, w2, b2, residual);
  });
  return io.output;
}

}  // namespace
}  // namespace efficientvit::cpu

TORCH_LIBRARY_IMPL(efficientvit, CPU, m) { m.impl("ffn", &efficientvit::cpu::ffn_cpu); }
