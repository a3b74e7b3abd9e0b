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

// The output row oy of one image (x: its first element) with its valid kernel rows.
template <typename T>
StemRow<T> stem_row_of(const T* x, int64_t Ci, int64_t H, int64_t W, int64_t oy) {
  return {x, Ci, H * W, W, 2 * oy - 1, std::max<int64_t>(0, 1 - 2 * oy),
          std::min<int64_t>(3, H + 1 - 2 * oy)};
}

// All CoP channels of an output row, pixel by pixel (pixel stride CoP), in blocks of vectors.
template <typename T>
void stem_row(const StemRow<T>& row, int64_t W, int64_t Wo, const T* w, int64_t CoP,
              const T* bias, T* dst) {
  int64_t co = 0;
  for (; co + 3 * kLanes <= CoP; co += 3 * kLanes)
    stem_row_block<T, 3>(row, W, Wo, co, w, CoP, bias, dst, CoP);
  if (CoP - co == 2 * kLanes) stem_row_block<T, 2>(row, W, Wo, co, w, CoP, bias, dst, CoP);
  if (CoP - co == kLanes) stem_row_block<T, 1>(row, W, Wo, co, w, CoP, bias, dst, CoP);
}

// The first convolution's weights: (Ci * 9, CoP), the weights of a tap a row of whole vectors.
struct StemWeights {
  at::Tensor w, b;
  int64_t CoP;
};
StemWeights pack_stem(const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t Co = weight.size(0), Ci = weight.size(1), CoP = round_up(Co, kLanes);
  return {at::constant_pad_nd(weight.permute({1, 2, 3, 0}).reshape({Ci * 9, Co}), {0, CoP - Co})
              .contiguous(),
          at::constant_pad_nd(bias, {0, CoP - Co}).contiguous(), CoP};
}

template <typename T>
void run_stem_conv(const at::Tensor& x, const StemWeights& first, at::Tensor& output) {
  const int64_t B = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = output.size(1), Ho = output.size(2), Wo = output.size(3), CoP = first.CoP;
  const T *xp = x.data_ptr<T>(), *w = first.w.data_ptr<T>(), *bias = first.b.data_ptr<T>();
  T* out = output.data_ptr<T>();
  at::parallel_for(0, B * Ho, 1, [&](int64_t begin, int64_t end) {
    // Rows are computed into scratch when Co is not a whole number of vectors.
    const at::Tensor scratch = at::empty({Co == CoP ? 0 : Wo * CoP}, x.options());
    for (int64_t r = begin; r < end; ++r) {
      T* out_row = out + r * Wo * Co;
      T* dst = Co == CoP ? out_row : scratch.data_ptr<T>();
      stem_row<T>(stem_row_of(xp + r / Ho * Ci * H * W, Ci, H, W, r % Ho), W, Wo, w, CoP, bias,
                  dst);
      if (dst != out_row) copy_tile<T>(Wo, Co, {dst, CoP, 1}, {}, {out_row, Co, 1});
    }
  });
}

// Both convolutions. The second runs as an implicit GEMM per output row: output pixel ox reads
// pixels 2ox-1 .. 2ox+1 of three rows of the first's output y, and the C1P channels of a pixel
// follow one another, so for kernel row ky, A(ox, kx * C1P + c) = y_row[(2ox - 1 + kx) * C1P + c]
// is a matrix with rows 2 * C1P apart that gemm reads in place. y's rows are computed as they
// are needed into a ring of three, each with a zero pixel either side (the padding); rows above
// and below the image read a zero row. y never leaves the cache.
template <typename T>
void run_stem_conv2(const at::Tensor& x, const StemWeights& first, const at::Tensor& w2,
                    const at::Tensor& b2, at::Tensor& output) {
  const int64_t B = x.size(0), Ci = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t H1 = (H + 1) / 2, W1 = (W + 1) / 2, C1P = first.CoP;
  const int64_t C2 = output.size(1), Ho = output.size(2), Wo = output.size(3);
  const int64_t C2P = b2.size(0), k = 3 * C1P;  // gemm's depth per kernel row
  const int64_t ring_row = (W1 + 2) * C1P;
  const T *xp = x.data_ptr<T>(), *w1 = first.w.data_ptr<T>(), *bias1 = first.b.data_ptr<T>();
  const T *w2p = w2.data_ptr<T>(), *bias2 = b2.data_ptr<T>();
  T* out = output.data_ptr<T>();
  at::parallel_for(0, B * Ho, 1, [&](int64_t begin, int64_t end) {
    // The zero row, the ring's three rows, and (when C2 is not a whole number of vectors) the
    // output row's scratch. Zeroed once: the padding pixels are never written.
    const at::Tensor buffer =
        at::zeros({4 * ring_row + (C2 == C2P ? 0 : Wo * C2P)}, x.options());
    T* const zero_row = buffer.data_ptr<T>();
    T* const ring = zero_row + ring_row;
    T* const scratch = ring + 3 * ring_row;
    int64_t held[3] = {-1, -1, -1};  // the row of y (image * H1 + row) each ring slot holds
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / Ho, oy = r % Ho;
      const T* rows[3];
      for (int64_t ky = 0; ky < 3; ++ky) {
        const int64_t iy = 2 * oy - 1 + ky;
        if (iy < 0 || iy >= H1) {
          rows[ky] = zero_row;
          continue;
        }
        T* slot = ring + iy % 3 * ring_row;  // three consecutive rows: three slots
        if (held[iy % 3] != b * H1 + iy) {
          stem_row<T>(stem_row_of(xp + b * Ci * H * W, Ci, H, W, iy), W, W1, w1, C1P, bias1,
                      slot + C1P);
          held[iy % 3] = b * H1 + iy;
        }
        rows[ky] = slot;
      }
      // The image rows of the next output row's two new rows of y, fetched during this row's
      // GEMMs: the image comes from memory, and without this the op took ~40% longer with a
      // cold cache than a warm one (16 -> 32 channels, batch 16); with it, ~5%.
      if (r + 1 < end) {
        const int64_t next = r + 1, first_row = 4 * (next % Ho) - 1;
        for (int64_t c = 0; c < Ci; ++c)
          for (int64_t ih = std::max<int64_t>(0, first_row); ih < std::min(H, first_row + 4); ++ih)
            prefetch(xp + ((next / Ho * Ci + c) * H + ih) * W, W);
      }
      T* out_row = out + r * Wo * C2;
      T* dst = C2 == C2P ? out_row : scratch;
      for (int64_t ky = 0; ky < 3; ++ky)
        gemm<T>(Wo, C2P, k, {rows[ky], 2 * C1P, 1}, w2p + ky * k * C2P, C2P,
                ky == 0 ? MatA<T>{bias2, 0, 1} : MatA<T>{dst, C2P, 1}, dst, C2P,
                /*apply_relu=*/ky == 2);
      if (dst != out_row) copy_tile<T>(Wo, C2, {dst, C2P, 1}, {}, {out_row, C2, 1});
    }
  });
}

at::Tensor stem_conv_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                         const std::optional<at::Tensor>& weight2,
                         const std::optional<at::Tensor>& bias2) {
  check_stem_conv(x, weight, bias, weight2, bias2);
  const at::Tensor input = x.contiguous();  // NCHW: a row of taps is a stride-2 run
  int64_t Co = weight.size(0), Ho = (x.size(2) + 1) / 2, Wo = (x.size(3) + 1) / 2;
  if (weight2) Co = weight2->size(0), Ho = (Ho + 1) / 2, Wo = (Wo + 1) / 2;
  at::Tensor output = at::empty({x.size(0), Co, Ho, Wo},
                                x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (output.numel() == 0) return output;
  const StemWeights first = pack_stem(weight, bias);
  if (!weight2) {
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::stem_conv", [&] {
      run_stem_conv<scalar_t>(input, first, output);
    });
    return output;
  }
  // (3, 3 * C1P, C2P): for kernel row ky, the B operand of A's columns (kx, c); zero rows for
  // the first convolution's padding channels.
  const int64_t C1 = weight.size(0), C1P = first.CoP, C2P = padded(Co, x.scalar_type());
  const at::Tensor w2 =
      at::constant_pad_nd(weight2->permute({2, 3, 1, 0}), {0, C2P - Co, 0, C1P - C1})
          .reshape({3, 3 * C1P, C2P})
          .contiguous();
  const at::Tensor b2 = at::constant_pad_nd(*bias2, {0, C2P - Co}).contiguous();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::stem_conv", [&] {
    run_stem_conv2<scalar_t>(input, first, w2, b2, output);
  });
  return output;
}

}  // namespace
}  // namespace efficientvit::cpu

TORCH_LIBRARY_IMPL(efficientvit, CPU, m) { m.impl("stem_conv", &efficientvit::cpu::stem_conv_cpu); }
