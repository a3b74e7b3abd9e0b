// The patch embedding's chain of 3x3 stride-2 convolutions on CPU, each [relu](conv(x) + b), the
// first from the image's few channels, written channels-last. The first: oneDNN spends 3-6x
// the arithmetic's time on it (measured, batch 16, 224^2, one thread); here each output pixel's
// channels are a row of vectors summed in registers over the 9 * Ci taps, each tap a broadcast
// input value (read in place from NCHW x) times a vector of weights, and blocks of pixels along
// an output row share each weight load. The others: implicit GEMMs on rows of the one before,
// computed as they are needed and held in cache (StemChain).
#undef EFFICIENTVIT_ISA_FILE
#define EFFICIENTVIT_ISA_FILE "cpu/patch_embed.cpp"
#include "cpu/foreach_isa.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/packed_weights.h"

EFFICIENTVIT_ISA_BEGIN
namespace {

// Output channels per vector: 8 fp32 fill a 256-bit register, and 8 | Co in every EfficientViT
// stem (Co = embed_dim / 8).
constexpr int64_t kLanes = 8;
// Pixels per block for NV vectors of output channels: as many accumulators as the registers
// hold beside NV weight vectors and a broadcast. AVX-512 (32 registers): 16 (GCC 12 spills
// beyond). AVX2 (16 registers): 10; at 12 GCC keeps accumulators on the stack (first layer,
// 224^2, one thread, the three sizes timed in interleaved rounds: 3->8 channels 230 / 258 us at
// 10 / 12 accumulators, 3->16 269 / 393 us, 3->24 366 / 427 us).
template <int NV>
constexpr int kPixels = (kVecBytes == 64 ? 16 : 10) / NV;

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
                 int64_t ldw, const T* bias, T* out, int64_t pixel_stride, bool apply_relu) {
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
      *reinterpret_cast<UV*>(out + p * pixel_stride + v * kLanes) =
          apply_relu ? relu(acc[p][v]) : acc[p][v];
}

// Pixels [begin, end) of an interior run (all kernel columns valid): blocks of P, then the rest
// in blocks of P/2, P/4, ..., 1.
template <typename T, int P, int NV>
void stem_run(const StemRow<T>& row, int64_t begin, int64_t end, const T* w, int64_t ldw,
              const T* bias, T* out, int64_t pixel_stride, bool apply_relu) {
  for (; begin + P <= end; begin += P)
    stem_pixels<T, P, NV>(row, begin, 0, 3, w, ldw, bias, out + begin * pixel_stride,
                          pixel_stride, apply_relu);
  if constexpr (P > 1)
    stem_run<T, P / 2, NV>(row, begin, end, w, ldw, bias, out, pixel_stride, apply_relu);
}

// All channels of the output row (one image's row oy), in blocks of NV vectors.
template <typename T, int NV>
void stem_row_block(const StemRow<T>& row, int64_t W, int64_t Wo, int64_t co, const T* w,
                    int64_t ldw, const T* bias, T* out, int64_t pixel_stride, bool apply_relu) {
  constexpr int P = kPixels<NV>;
  // Output ox reads input columns 2ox-1 .. 2ox+1: all valid for ox in [1, interior_end).
  const int64_t interior_end = std::max<int64_t>(1, std::min(Wo, W / 2));
  const auto edge_pixel = [&](int64_t ox) {
    stem_pixels<T, 1, NV>(row, ox, std::max<int64_t>(0, 1 - 2 * ox),
                          std::min<int64_t>(3, W + 1 - 2 * ox), w + co, ldw, bias + co,
                          out + ox * pixel_stride + co, pixel_stride, apply_relu);
  };
  edge_pixel(0);
  stem_run<T, P, NV>(row, 1, interior_end, w + co, ldw, bias + co, out + co, pixel_stride,
                     apply_relu);
  for (int64_t ox = interior_end; ox < Wo; ++ox) edge_pixel(ox);
}

// The output row oy of one image (x: its first element) with its valid kernel rows.
template <typename T>
StemRow<T> stem_row_of(const T* x, int64_t Ci, int64_t H, int64_t W, int64_t oy) {
  return {x, Ci, H * W, W, 2 * oy - 1, std::max<int64_t>(0, 1 - 2 * oy),
          std::min<int64_t>(3, H + 1 - 2 * oy)};
}

// All CoP channels of an output row, in blocks of vectors, pixel by pixel (pixel_stride apart).
template <typename T>
void stem_row(const StemRow<T>& row, int64_t W, int64_t Wo, const T* w, int64_t CoP,
              const T* bias, T* dst, int64_t pixel_stride, bool apply_relu) {
  int64_t co = 0;
  for (; co + 3 * kLanes <= CoP; co += 3 * kLanes)
    stem_row_block<T, 3>(row, W, Wo, co, w, CoP, bias, dst, pixel_stride, apply_relu);
  if (CoP - co == 2 * kLanes)
    stem_row_block<T, 2>(row, W, Wo, co, w, CoP, bias, dst, pixel_stride, apply_relu);
  if (CoP - co == kLanes)
    stem_row_block<T, 1>(row, W, Wo, co, w, CoP, bias, dst, pixel_stride, apply_relu);
}

// The packed parameters (patch_embed_pack): per convolution, its weights and its bias padded to
// CP output channels (zeros). The first's weights are (Ci * 9, CP), the weights of a tap a row of
// whole vectors (CP a multiple of kLanes); a later one's are gemm's B, panel-major, rows
// (kx, ky, c) for the previous convolution's CP channels c (CP a multiple of the vector width).
// CP of convolution l with Co output channels: whole kLanes vectors for the first, whose taps
// stem_pixels sums; whole SIMD vectors for the others, gemm's outputs.
int64_t stem_padded(size_t l, int64_t Co, at::ScalarType dtype) {
  return l == 0 ? round_up(Co, kLanes) : padded(Co, dtype);
}

std::vector<at::Tensor> pack_stem(at::TensorList weights, at::TensorList biases) {
  std::vector<at::Tensor> packed;
  int64_t CP_before = 0;
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor& weight = weights[l];
    const int64_t Co = weight.size(0), Ci = weight.size(1);
    const int64_t CP = stem_padded(l, Co, weight.scalar_type());
    if (l == 0) {
      packed.push_back(at::constant_pad_nd(weight.permute({1, 2, 3, 0}).reshape({Ci * 9, Co}),
                                           {0, CP - Co}).contiguous());
    } else {
      const at::Tensor w =
          at::constant_pad_nd(weight.permute({3, 2, 1, 0}), {0, CP - Co, 0, CP_before - Ci});
      packed.push_back(pack_panels(w.reshape({9 * CP_before, CP})));
    }
    packed.push_back(at::constant_pad_nd(biases[l], {0, CP - Co}).contiguous());
    CP_before = CP;
  }
  return packed;
}

// One convolution of a call: its packed weights and bias, and its output's sizes (Co channels,
// padded to CP).
struct StemLayer {
  at::Tensor w, b;
  int64_t Co, CP, H, W;
};

// channels: each convolution's Co.
std::vector<StemLayer> stem_layers(const at::Tensor& x, at::TensorList packed,
                                   c10::ArrayRef<int64_t> channels) {
  std::vector<StemLayer> layers;
  int64_t H = x.size(2), W = x.size(3);
  for (size_t i = 0; i < packed.size(); i += 2) {
    H = (H + 1) / 2, W = (W + 1) / 2;
    layers.push_back({packed[i], packed[i + 1], channels[i / 2], packed[i + 1].size(0), H, W});
  }
  return layers;
}

// The chain of convolutions on one thread, computed a row at a time: a row of convolution l > 0
// is an implicit GEMM over three rows of convolution l - 1 held in cache, computed as they are
// needed, so no output but the last convolution's reaches memory. Convolution l's input rows
// (kernel rows ky = 0, 1, 2 of its current output row) are kept interleaved by pixel: pixel p
// (from -1, the padding, to the row's width, padding again) holds its three rows' CP channels
// one after the other. Output pixel ox then reads pixels 2ox-1 .. 2ox+1, a run of 9 * CP values,
// 6 * CP after the run of pixel ox - 1: gemm's A in place, rows (kx, ky, c) as the weights'.
template <typename T>
class StemChain {
 public:
  StemChain(const at::Tensor& x, const std::vector<StemLayer>& layers, bool final_relu,
            T* workspace)
      : x_(x.data_ptr<T>()), Ci_(x.size(1)), H_(x.size(2)), W_(x.size(3)), layers_(layers),
        final_relu_(final_relu), last_(layers.size(), -1) {
    for (size_t l = 1; l < layers.size(); ++l) {  // zeroed by the caller: the padding pixels
      inputs_.push_back(workspace);
      workspace += input_size(layers, l);
    }
  }

  // The size of convolution l's input rows (l > 0).
  static int64_t input_size(const std::vector<StemLayer>& layers, size_t l) {
    return (layers[l - 1].W + 2) * 3 * layers[l - 1].CP;
  }

  // Row k of convolution l of `image` to dst, pixels pixel_stride apart.
  void row(size_t l, int64_t image, int64_t k, T* dst, int64_t pixel_stride) {
    const StemLayer& layer = layers_[l];
    const bool apply_relu = l + 1 < layers_.size() || final_relu_;
    compute_row(l, image, k, dst, pixel_stride, apply_relu);
    // The padded channels of a row the next convolution reads (with zero weights) hold
    // relu(0 * x): NaN where an input is infinite, which 0 * NaN would carry into every
    // channel of the next. Zero them.
    if (l + 1 < layers_.size() && layer.Co < layer.CP) {
      for (int64_t p = 0; p < layer.W; ++p)
        std::memset(dst + p * pixel_stride + layer.Co, 0, (layer.CP - layer.Co) * sizeof(T));
    }
  }

 private:
  void compute_row(size_t l, int64_t image, int64_t k, T* dst, int64_t pixel_stride,
                   bool apply_relu) {
    const StemLayer& layer = layers_[l];
    if (l == 0) return first_row(image, k, dst, pixel_stride, apply_relu);
    const StemLayer& in = layers_[l - 1];
    const int64_t pixel = 3 * in.CP;
    T* rows = inputs_[l - 1];
    const auto fill = [&](int64_t ky, int64_t iy) {  // input row iy as kernel row ky
      T* slot = rows + pixel + ky * in.CP;
      if (iy >= 0 && iy < in.H) return row(l - 1, image, iy, slot, pixel);
      for (int64_t p = 0; p < in.W; ++p) std::memset(slot + p * pixel, 0, in.CP * sizeof(T));
    };
    if (k > 0 && last_[l] == image * layer.H + k - 1) {
      // The row after the last: its kernel row 0 was the last's kernel row 2.
      for (int64_t p = 1; p <= in.W; ++p)
        std::memcpy(rows + p * pixel, rows + p * pixel + 2 * in.CP, in.CP * sizeof(T));
    } else {
      fill(0, 2 * k - 1);
    }
    fill(1, 2 * k);
    fill(2, 2 * k + 1);
    last_[l] = image * layer.H + k;
    gemm<T>(layer.W, layer.CP, 9 * in.CP, {rows, 2 * pixel, 1}, layer.w.data_ptr<T>(),
            kPanelMajor, {layer.b.data_ptr<T>(), 0, 1}, dst, pixel_stride, apply_relu);
  }

  void first_row(int64_t image, int64_t k, T* dst, int64_t pixel_stride, bool apply_relu) {
    const StemLayer& layer = layers_[0];
    const T* x = x_ + image * Ci_ * H_ * W_;
    stem_row<T>(stem_row_of(x, Ci_, H_, W_, k), W_, layer.W, layer.w.data_ptr<T>(), layer.CP,
                layer.b.data_ptr<T>(), dst, pixel_stride, apply_relu);
    // The image rows the next row adds, fetched while the convolutions after run: the image
    // comes from memory, and without this the first two convolutions (16 -> 32 channels, batch
    // 16) took ~40% longer with a cold cache than a warm one; with it, ~5%.
    for (int64_t c = 0; c < Ci_; ++c)
      for (int64_t ih = 2 * k + 2; ih < std::min(H_, 2 * k + 4); ++ih)
        prefetch(x + (c * H_ + ih) * W_, W_);
  }

  const T* x_;
  int64_t Ci_, H_, W_;
  const std::vector<StemLayer>& layers_;
  bool final_relu_;
  std::vector<T*> inputs_;     // convolution l's input rows at inputs_[l - 1]
  std::vector<int64_t> last_;  // the row convolution l computed last (image * H + k), or -1
};

template <typename T>
void run_stem_conv(const at::Tensor& x, const std::vector<StemLayer>& layers, bool final_relu,
                   at::Tensor& output) {
  const StemLayer& last = layers.back();
  const int64_t Co = output.size(1), Ho = last.H, Wo = last.W, CP = last.CP;
  int64_t inputs = 0;  // the chain's input rows
  for (size_t l = 1; l < layers.size(); ++l) inputs += StemChain<T>::input_size(layers, l);
  T* out = output.data_ptr<T>();
  at::parallel_for(0, x.size(0) * Ho, 1, [&](int64_t begin, int64_t end) {
    // The input rows, then the output row when Co is not a whole number of vectors.
    const at::Tensor buffer = at::zeros({inputs + (Co == CP ? 0 : Wo * CP)}, x.options());
    T* padded_out = buffer.data_ptr<T>() + inputs;
    StemChain<T> chain(x, layers, final_relu, buffer.data_ptr<T>());
    for (int64_t r = begin; r < end; ++r) {
      T* out_row = out + r * Wo * Co;
      T* dst = Co == CP ? out_row : padded_out;
      chain.row(layers.size() - 1, r / Ho, r % Ho, dst, CP);
      if (dst != out_row) copy_tile<T>(Wo, Co, {dst, CP, 1}, {}, {out_row, Co, 1});
    }
  });
}

at::Tensor run_stem(const at::Tensor& x, at::TensorList packed, c10::ArrayRef<int64_t> channels,
                    bool final_relu) {
  const at::Tensor input = x.contiguous();  // NCHW: a row of taps is a stride-2 run
  const std::vector<StemLayer> layers = stem_layers(x, packed, channels);
  at::Tensor output = at::empty({x.size(0), channels.back(), layers.back().H, layers.back().W},
                                x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (output.numel() == 0) return output;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::patch_embed", [&] {
    run_stem_conv<scalar_t>(input, layers, final_relu, output);
  });
  return output;
}

// The entry points: the op on packed weights, the packing (after the anonymous namespace), its
// cached form (X_pack's), and the op, which packs once per set of weights and runs.

at::Tensor patch_embed_packed_cpu(const at::Tensor& x, const PackedWeights& weights,
                                  bool final_relu) {
  return run_stem(x, weights.tensors, weights.sizes, final_relu);
}

}  // namespace

Packed patch_embed_pack_cpu(at::TensorList weights, at::TensorList biases) {
  TORCH_CHECK_VALUE(!weights.empty() && at::isFloatingType(weights[0].scalar_type()),
                    "efficientvit: patch_embed_pack takes floating-point weights, at least one");
  check_patch_embed_params(weights[0].dim() == 4 ? weights[0].size(1) : 0,
                           {weights[0], "weights[0]"}, weights, biases);
  // sizes: each convolution's output channels
  std::vector<int64_t> channels;
  for (const at::Tensor& weight : weights) channels.push_back(weight.size(0));
  return c10::make_intrusive<PackedWeights>("patch_embed", &patch_embed_packed_cpu,
                                            pack_stem(weights, biases), std::move(channels),
                                            weights[0].size(1), weights[0].scalar_type());
}

Packed patch_embed_cached_pack_cpu(at::TensorList weights, at::TensorList biases) {
  std::vector<at::Tensor> tensors(weights.begin(), weights.end());
  tensors.insert(tensors.end(), biases.begin(), biases.end());
  return cached_packing("patch_embed", tensors, {}, [&] {
    return patch_embed_pack_cpu(weights, biases);
  });
}

at::Tensor patch_embed_cpu(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                           bool final_relu) {
  check_patch_embed(x, weights, biases);
  return patch_embed_packed_cpu(x, *patch_embed_cached_pack_cpu(weights, biases), final_relu);
}

EFFICIENTVIT_ISA_END

#if EFFICIENTVIT_ISA_LAST_PASS
TORCH_LIBRARY_IMPL(efficientvit, CPU, m) {
  m.impl("patch_embed", EFFICIENTVIT_SELECT_ISA(patch_embed_cpu));
}
#endif
