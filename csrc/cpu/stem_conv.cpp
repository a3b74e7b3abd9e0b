// The first convolution of the patch embedding on CPU: relu(conv3x3(x, stride 2, padding 1) + b)
// from a few input channels (3: the image) to a few output channels, written channels-last.
// oneDNN spends 3-6x the arithmetic's time on this convolution (measured, batch 16, 224^2, one
// thread). Here each output pixel's channels are a row of vectors summed in registers over the
// 9 * Ci taps; each tap is a broadcast input value (read in place from NCHW x) times a vector of
// weights. Blocks of pixels along an output row share each weight load.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "checks.h"
#include "cpu/cpu_utils.h"

namespace efficientvit::cpu {
namespace {

// Output channels per vector: 8 fp32 fill a 256-bit register, and 8 | Co in every EfficientViT
// stem (Co = embed_dim / 8).
constexpr int64_t kLanes = 8;
// Accumulators per block (pixels x vectors), within the 32 AVX-512 or 16 AVX2 registers.
constexpr int kAccumulators = kVecBytes == 64 ? 16 : 12;  // GCC 12 spills beyond 16

// (A typedef in a class template: GCC drops vector_size from a dependent alias template.)
template <typename T>
struct Vec8 {
  typedef T V __attribute__((vector_size(kLanes * sizeof(T))));
  typedef T UV __attribute__((vector_size(kLanes * sizeof(T)), aligned(alignof(T))));
};

// Where the taps of one output row are: x (one image), its strides, the output row's first
// input row iy0 = 2 * oy - 1 and its valid kernel rows [ky_lo, ky_hi).
template <typename T>
struct StemRow {
  const T* x;
  int64_t channels, channel_stride, row_stride;  // unit column stride
  int64_t iy0, ky_lo, ky_hi;
};

// NV vectors of output channels of P pixels ox0 .. ox0 + P - 1 whose valid kernel columns are
// [kx_lo, kx_hi); w: (Ci * 9, CoP) weights, tap-major, starting at the first channel of the block.
template <typename T, int P, int NV>
void stem_pixels(const StemRow<T>& row, int64_t ox0, int64_t kx_lo, int64_t kx_hi, const T* w,
                 int64_t ldw, const T* bias, T* out, int64_t pixel_stride) {
  using V = typename Vec8<T>::V;
  using UV = typename Vec8<T>::UV;
  V acc[P][NV];
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v) acc[p][v] = *reinterpret_cast<const UV*>(bias + v * kLanes);
  for (int64_t ci = 0; ci < row.channels; ++ci) {
    for (int64_t ky = row.ky_lo; ky < row.ky_hi; ++ky) {
      const int64_t in = ci * row.channel_stride + (row.iy0 + ky) * row.row_stride;
      // Not unrolled: GCC interleaves the unrolled columns' blocks and spills accumulators.
      _Pragma("GCC unroll 1") for (int64_t kx = kx_lo; kx < kx_hi; ++kx) {
        const T* wt = w + ((ci * 3 + ky) * 3 + kx) * ldw;
        V wv[NV];
        for (int v = 0; v < NV; ++v) wv[v] = *reinterpret_cast<const UV*>(wt + v * kLanes);
        const T* xp = row.x + in + 2 * ox0 - 1 + kx;
        for (int p = 0; p < P; ++p) {
          const V a = xp[2 * p] - V{};  // stride 2
          for (int v = 0; v < NV; ++v) acc[p][v] += a * wv[v];
        }
      }
    }
  }
  for (int p = 0; p < P; ++p)
    for (int v = 0; v < NV; ++v)
      *reinterpret_cast<UV*>(out + p * pixel_stride + v * kLanes) = relu(acc[p][v]);
}

// Pixels [begin, end) of an interior run (all kernel columns valid): blocks of P, then the rest
// in blocks of P/2, P/4, ..., 1.
template <typename T, int P, int NV>
void stem_run(const StemRow<T>& row, int64_t begin, int64_t end, const T* w, int64_t ldw,
              const T* bias, T* out, int64_t pixel_stride) {
  for (; begin + P <= end; begin += P)
    stem_pixels<T, P, NV>(row, begin, 0, 3, w, ldw, bias, out + begin * pixel_stride,
                          pixel_stride);
  if constexpr (P > 1) stem_run<T, P / 2, NV>(row, begin, end, w, ldw, bias, out, pixel_stride);
}

// All channels of the output row (one image's row oy), in blocks of NV vectors.
template <typename T, int NV>
void stem_row_block(const StemRow<T>& row, int64_t W, int64_t Wo, int64_t co, const T* w,
                    int64_t ldw, const T* bias, T* out, int64_t pixel_stride) {
  constexpr int P = kAccumulators / NV;
  // Output ox reads input columns 2ox-1 .. 2ox+1: all valid for ox in [1, interior_end).
  const int64_t interior_end = std::max<int64_t>(1, std::min(Wo, W / 2));
  const auto edge_pixel = [&](int64_t ox) {
    stem_pixels<T, 1, NV>(row, ox, std::max<int64_t>(0, 1 - 2 * ox),
                          std::min<int64_t>(3, W + 1 - 2 * ox), w + co, ldw, bias + co,
                          out + ox * pixel_stride + co, pixel_stride);
  };
  edge_pixel(0);
  stem_run<T, P, NV>(row, 1, interior_end, w + co, ldw, bias + co, out + co, pixel_stride);
  for (int64_t ox = interior_end; ox < Wo; ++ox) edge_pixel(ox);
}

template <typename T>
void run_stem_conv(const at::Tensor& x, const T* w, const T* bias, int64_t CoP, at::Tensor& output) {
  const int64_t B = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = output.size(1), Ho = output.size(2), Wo = output.size(3);
  const T* xp = x.data_ptr<T>();
  T* out = output.data_ptr<T>();
  at::parallel_for(0, B * Ho, 1, [&](int64_t begin, int64_t end) {
    // Rows are computed into scratch when Co is not a whole number of vectors.
    const at::Tensor scratch = at::empty({Co == CoP ? 0 : Wo * CoP}, x.options());
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Ho, oy = r % Ho;
      const StemRow<T> row{xp + b * Ci * H * W, Ci, H * W, W,
                           2 * oy - 1, std::max<int64_t>(0, 1 - 2 * oy),
                           std::min<int64_t>(3, H + 1 - 2 * oy)};
      T* out_row = out + r * Wo * Co;
      T* dst = Co == CoP ? out_row : scratch.data_ptr<T>();
      int64_t co = 0;
      for (; co + 3 * kLanes <= CoP; co += 3 * kLanes)
        stem_row_block<T, 3>(row, W, Wo, co, w, CoP, bias, dst, CoP);
      if (CoP - co == 2 * kLanes) stem_row_block<T, 2>(row, W, Wo, co, w, CoP, bias, dst, CoP);
      if (CoP - co == kLanes) stem_row_block<T, 1>(row, W, Wo, co, w, CoP, bias, dst, CoP);
      if (dst != out_row) copy_tile<T>(Wo, Co, {dst, CoP, 1}, {}, {out_row, Co, 1});
    }
  });
}

at::Tensor stem_conv_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check_stem_conv(x, weight, bias);
  const at::Tensor input = x.contiguous();  // NCHW: a row of taps is a stride-2 run
  const int64_t Co = weight.size(0), Ci = weight.size(1);
  const int64_t Ho = (x.size(2) + 1) / 2, Wo = (x.size(3) + 1) / 2;
  at::Tensor output = at::empty({x.size(0), Co, Ho, Wo},
                                x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (output.numel() == 0) return output;
  // (Ci * 9, CoP): the weights of a tap are a row of whole vectors (zero padded).
  const int64_t CoP = round_up(Co, kLanes);
  const at::Tensor w =
      at::constant_pad_nd(weight.permute({1, 2, 3, 0}).reshape({Ci * 9, Co}), {0, CoP - Co})
          .contiguous();
  const at::Tensor b = at::constant_pad_nd(bias, {0, CoP - Co}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::stem_conv", [&] {
    run_stem_conv<scalar_t>(input, w.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), CoP, output);
  });
  return output;
}

}  // namespace
}  // namespace efficientvit::cpu

TORCH_LIBRARY_IMPL(efficientvit, CPU, m) { m.impl("stem_conv", &efficientvit::cpu::stem_conv_cpu); }
