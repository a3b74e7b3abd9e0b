// Depthwise KxK convolution on CPU, zero padding K//2: [x +] [relu](dwconv(x) + bias), in one
// pass over x. Each plane (one channel of one image for contiguous x; one whole image, C values
// per pixel, for channels-last x) is copied into a zero-bordered plane in scratch, so that no tap
// needs a bounds check; every output vector then sums its K*K taps in a register and is
// finished (bias, ReLU, residual) and written once.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace efficientvit::cpu {
namespace {

// [relu](v) [+ x0], for a value or a vector of values.
template <typename V>
inline V finish(V v, V x0, bool relu_out, bool residual) {
  if (relu_out) v = relu(v);
  return residual ? v + x0 : v;
}

// Loads and stores of V: a SIMD vector of T, or T itself (the last C % lanes channels).
template <typename V, typename T>
inline V load_as(const T* p) {
  if constexpr (std::is_same_v<V, T>) {
    return *p;
  } else {
    return Simd<T>::load(p);
  }
}
template <typename V, typename T>
inline void store_as(T* p, V v) {
  if constexpr (std::is_same_v<V, T>) {
    *p = v;
  } else {
    Simd<T>::store(p, v);
  }
}

// Sizes; kK > 0 fixes K at compile time, so that the tap loops unroll.
template <int64_t kK>
struct Conv {
  int64_t H, W, C, k, R, PW;  // PW: width of the padded plane, W + 2R
  bool relu_out, residual;
  int64_t K() const { return kK > 0 ? kK : k; }
};

// Channels-last: channels [c, c + width of V) of output pixel (y, px); pad is the padded image
// (pixel stride C, x itself at its centre), w the weights (K, K, C).
template <typename V, int64_t kK, typename T>
inline void conv_pixel(const Conv<kK>& s, const T* pad, const T* w, const T* bias, T* o, int64_t y,
                       int64_t px, int64_t c) {
  V acc = load_as<V>(bias + c);
  const T* p = pad + (y * s.PW + px) * s.C + c;
  for (int64_t ky = 0; ky < s.K(); ++ky)
    for (int64_t kx = 0; kx < s.K(); ++kx)
      acc += load_as<V>(w + (ky * s.K() + kx) * s.C + c) * load_as<V>(p + (ky * s.PW + kx) * s.C);
  const V x0 = load_as<V>(p + (s.R * s.PW + s.R) * s.C);
  store_as(o + (y * s.W + px) * s.C + c, finish(acc, x0, s.relu_out, s.residual));
}

template <typename T, int64_t kK>
void run_dwconv(const DenseIO& io, const T* w, const T* bias, int64_t k, bool relu_out,
                bool residual) {
  using S = Simd<T>;
  const at::Tensor& input = io.input;
  const int64_t B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const Conv<kK> s{H, W, C, k, k / 2, W + 2 * (k / 2), relu_out, residual};
  const int64_t K = s.K();
  const bool channels_last = io.channels_last;
  const int64_t P = channels_last ? C : 1;  // values per pixel
  const int64_t planes = channels_last ? B : B * C, plane = H * W * P;
  // Contiguous x: vectors run along the padded rows, flattened: sums of H x PW positions (whole
  // vectors), whose border columns are dropped. The padded plane has slack for the reads of the
  // last vector's taps.
  const int64_t sums = channels_last ? 0 : round_up(H * s.PW, S::kLanes);
  const int64_t padded_plane = (H + 2 * s.R) * s.PW * P + (channels_last ? 0 : K + S::kLanes);
  const T* x = input.data_ptr<T>();
  T* out = io.output.data_ptr<T>();
  at::parallel_for(0, planes, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor buffer = at::zeros({padded_plane + sums}, input.options());  // border stays 0
    T* pad = buffer.data_ptr<T>();
    T* sum = pad + padded_plane;
    for (int64_t i = begin; i < end; ++i) {
      const T* in = x + i * plane;
      T* o = out + i * plane;
      copy_tile<T>(H, W * P, {in, W * P, 1}, {}, {pad + (s.R * s.PW + s.R) * P, s.PW * P, 1});
      if (channels_last) {
        const int64_t whole = C / S::kLanes * S::kLanes;
        for (int64_t y = 0; y < H; ++y) {
          for (int64_t px = 0; px < W; ++px) {
            for (int64_t c = 0; c < whole; c += S::kLanes)
              conv_pixel<typename S::Vec>(s, pad, w, bias, o, y, px, c);
            for (int64_t c = whole; c < C; ++c) conv_pixel<T>(s, pad, w, bias, o, y, px, c);
          }
        }
      } else {
        const int64_t c = i % C;
        const T* wc = w + c * K * K;
        for (int64_t j = 0; j < sums; j += S::kLanes) {
          auto acc = S::splat(bias[c]);
          for (int64_t ky = 0; ky < K; ++ky)
            for (int64_t kx = 0; kx < K; ++kx)
              acc += S::splat(wc[ky * K + kx]) * S::load(pad + j + ky * s.PW + kx);
          const auto x0 = S::load(pad + j + s.R * s.PW + s.R);
          S::store(sum + j, finish(acc, x0, relu_out, residual));
        }
        copy_tile<T>(H, W, {sum, s.PW, 1}, {}, {o, W, 1});
      }
    }
  });
}

at::Tensor dwconv_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      bool relu, bool residual) {
  check_dwconv(x, weight, bias);
  const DenseIO io = dense_input_and_output(x);
  if (io.output.numel() == 0) return io.output;
  // Weights (C, K, K) per plane, or (K, K, C) with channels innermost for channels-last x.
  const at::Tensor w =
      io.channels_last ? weight.permute({1, 2, 0}).contiguous() : weight.contiguous();
  const at::Tensor b = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::dwconv", [&] {
    // 3x3, the kernel of every EfficientViT dwconv, with its taps unrolled.
    const auto run = weight.size(1) == 3 ? run_dwconv<scalar_t, 3> : run_dwconv<scalar_t, 0>;
    run(io, w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), weight.size(1), relu, residual);
  });
  return io.output;
}

}  // namespace
}  // namespace efficientvit::cpu

TORCH_LIBRARY_IMPL(efficientvit, CPU, m) { m.impl("dwconv", &efficientvit::cpu::dwconv_cpu); }
