// Depthwise KxK convolution on CPU, zero padding K//2: [x +] [relu](dwconv(x) + bias), in one
// pass over x: every output vector sums its K*K taps in a register and is finished (bias, ReLU,
// residual) and written once. Vectors run along the channels of a pixel for channels-last x,
// along a row of one channel for contiguous x.
#undef EFFICIENTVIT_ISA_FILE
#define EFFICIENTVIT_ISA_FILE "cpu/dwconv.cpp"
#include "cpu/foreach_isa.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>
#include <utility>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"

EFFICIENTVIT_ISA_BEGIN
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

// Channels-last x: output row y of one image, pixel by pixel, all channels of a pixel before the
// next, so that x and the output are read and written in order (the rows come from memory or
// L3: a walk over one channel vector at a time would fetch every line of the image once per
// vector). Each pixel sums its in-bounds taps straight from x (no padded copy); the weights,
// (K, K, C), stay in L1. Pixels whose kernel columns are all inside go in runs of up to kRun:
// per vector of channels, the run's sums are independent and each input vector of a kernel row
// is loaded once for all the run's outputs it falls under. (One pixel at a time, a sum's taps
// are a chain of dependent multiply-adds and each output loads 2 K^2 vectors: a 14x14 map with
// 128 channels took 1.3x as long.) Every sum adds its taps in the same order either way: bias,
// then row by row, column by column.
constexpr int64_t kRun = 8;

template <int64_t kK, typename T>
void dwconv_channels_last_row(const Conv<kK>& s, const T* in, const T* w, const T* bias, T* o,
                              int64_t y) {
  using S = Simd<T>;
  const int64_t K = s.K(), C = s.C, W = s.W;
  const int64_t ky0 = std::max<int64_t>(0, s.R - y), ky1 = std::min(K, s.H + s.R - y);
  const int64_t whole = C / S::kLanes * S::kLanes;
  // Channels [c, c + width of V) of pixel px, over kernel columns [kx0, kx1).
  const auto channels = [&](auto vec, int64_t px, int64_t c, int64_t kx0, int64_t kx1) {
    using V = decltype(vec);
    V acc = load_as<V>(bias + c);
    for (int64_t ky = ky0; ky < ky1; ++ky)
      for (int64_t kx = kx0; kx < kx1; ++kx)
        acc += load_as<V>(w + (ky * K + kx) * C + c) *
               load_as<V>(in + ((y + ky - s.R) * W + px + kx - s.R) * C + c);
    store_as(o + (y * W + px) * C + c,
             finish(acc, load_as<V>(in + (y * W + px) * C + c), s.relu_out, s.residual));
  };
  const auto pixel = [&](int64_t px, int64_t kx0, int64_t kx1) {
    for (int64_t c = 0; c < whole; c += S::kLanes) channels(typename S::Vec{}, px, c, kx0, kx1);
    for (int64_t c = whole; c < C; ++c) channels(T{}, px, c, kx0, kx1);
  };
  // Pixels [px, px + P), every kernel column inside.
  const auto run = [&](auto pixels, int64_t px) {
    constexpr int64_t P = decltype(pixels)::value;
    using Vec = typename S::Vec;
    for (int64_t c = 0; c < whole; c += S::kLanes) {
      Vec acc[P];
      for (int64_t p = 0; p < P; ++p) acc[p] = S::load(bias + c);
      for (int64_t ky = ky0; ky < ky1; ++ky) {
        const T* row = in + ((y + ky - s.R) * W + px - s.R) * C + c;
        for (int64_t kx = 0; kx < K; ++kx) {
          const Vec wv = S::load(w + (ky * K + kx) * C + c);
          for (int64_t p = 0; p < P; ++p) acc[p] += wv * S::load(row + (p + kx) * C);
        }
      }
      for (int64_t p = 0; p < P; ++p) {
        const int64_t at = (y * W + px + p) * C + c;
        S::store(o + at, finish(acc[p], S::load(in + at), s.relu_out, s.residual));
      }
    }
    for (int64_t p = 0; p < P; ++p)
      for (int64_t c = whole; c < C; ++c) channels(T{}, px + p, c, 0, K);
  };
  const int64_t inner0 = std::min(s.R, W), inner1 = std::max(inner0, W - s.R);
  const auto edge = [&](int64_t px) {
    pixel(px, std::max<int64_t>(0, s.R - px), std::min(K, W + s.R - px));
  };
  int64_t px = 0;
  for (; px < inner0; ++px) edge(px);
  for (; px + kRun <= inner1; px += kRun) run(std::integral_constant<int64_t, kRun>{}, px);
  for (; px + kRun / 2 <= inner1; px += kRun / 2)
    run(std::integral_constant<int64_t, kRun / 2>{}, px);
  for (; px + 2 <= inner1; px += 2) run(std::integral_constant<int64_t, 2>{}, px);
  for (; px < inner1; ++px) pixel(px, 0, K);
  for (; px < W; ++px) edge(px);
}

template <typename T, int64_t kK>
void run_dwconv(const DenseIO& io, const T* w, const T* bias, int64_t k, bool relu_out,
                bool residual) {
  using S = Simd<T>;
  const at::Tensor& input = io.input;
  const int64_t B = input.size(0), C = input.size(1), H = input.size(2), W = input.size(3);
  const Conv<kK> s{H, W, C, k, k / 2, W + 2 * (k / 2), relu_out, residual};
  const T* x = input.data_ptr<T>();
  T* out = io.output.data_ptr<T>();
  if (io.channels_last) {
    at::parallel_for(0, B * H, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t image = i / H;
        dwconv_channels_last_row(s, x + image * H * W * C, w, bias, out + image * H * W * C, i % H);
      }
    });
    return;
  }
  // Contiguous x: each plane (one channel of one image) is copied into a zero-bordered plane in
  // scratch, so that no tap needs a bounds check; vectors run along the padded rows, flattened:
  // sums of H x PW positions (whole vectors), whose border columns are dropped. The padded
  // plane has slack for the reads of the last vector's taps.
  const int64_t K = s.K();
  const int64_t sums = round_up(H * s.PW, S::kLanes);
  const int64_t padded_plane = (H + 2 * s.R) * s.PW + K + S::kLanes;
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor buffer = at::zeros({padded_plane + sums}, input.options());  // border stays 0
    T* pad = buffer.data_ptr<T>();
    T* sum = pad + padded_plane;
    for (int64_t i = begin; i < end; ++i) {
      const T* in = x + i * H * W;
      T* o = out + i * H * W;
      copy_tile<T>(H, W, {in, W, 1}, {}, {pad + s.R * s.PW + s.R, s.PW, 1});
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
  });
}

at::Tensor dwconv_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                      bool relu, bool residual) {
  check_dwconv(x, weight, bias);
  const DenseIO io = dense_input_and_output(x);
  if (io.output.numel() == 0) return io.output;
  const at::Tensor w = weight.contiguous(), b = bias.contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::dwconv", [&] {
    // Weights (C, K, K) per plane, or (K, K, C), channels innermost, for channels-last x:
    // transposed by a loop here (as ATen ops, permute and copy cost ~20 us a call, a tenth of
    // a batch-1 M0's dwconv time).
    const scalar_t* weights = w.data_ptr<scalar_t>();
    std::vector<scalar_t> taps_by_channel;
    if (io.channels_last) {
      const int64_t C = w.size(0), taps = w.size(1) * w.size(2);
      taps_by_channel.resize(C * taps);
      for (int64_t c = 0; c < C; ++c)
        for (int64_t t = 0; t < taps; ++t) taps_by_channel[t * C + c] = weights[c * taps + t];
      weights = taps_by_channel.data();
    }
    // 3x3, the kernel of every EfficientViT dwconv, with its taps unrolled.
    const auto run = w.size(1) == 3 ? run_dwconv<scalar_t, 3> : run_dwconv<scalar_t, 0>;
    run(io, weights, b.data_ptr<scalar_t>(), w.size(1), relu, residual);
  });
  return io.output;
}

}  // namespace
EFFICIENTVIT_ISA_END

#if EFFICIENTVIT_ISA_LAST_PASS
TORCH_LIBRARY_IMPL(efficientvit, CPU, m) { m.impl("dwconv", EFFICIENTVIT_SELECT_ISA(dwconv_cpu)); }
#endif
