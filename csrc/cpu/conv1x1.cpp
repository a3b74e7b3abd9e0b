// 1x1 convolution on CPU: [relu](w x + b), over tiles of tokens, one GEMM per tile
// with the weights packed panel-major (the convolutions of PatchMerging, where oneDNN reaches
// 35-43 GMAC/s on this core and the GEMM here ~50); optionally followed by PatchMerging's
// depthwise 3x3 stride-2 convolution and ReLU, on bands of rows held in cache.
#undef EFFICIENTVIT_ISA_FILE
#define EFFICIENTVIT_ISA_FILE "cpu/conv1x1.cpp"
#include "cpu/foreach_isa.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <optional>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/packed_weights.h"

EFFICIENTVIT_ISA_BEGIN
namespace {

// The packed parameters (conv1x1_pack): the weight transposed, padded to whole vectors (zeros)
// and panel-major, the B operand of a token-major tile; the bias padded; with the depthwise
// convolution, its weight as (3 * 3, CoP), taps by row, and its bias, padded.
enum Conv1x1Packed {
  kWeight,    // (C, CoP)
  kBias,      // (CoP)
  kDwWeight,  // (9, CoP)
  kDwBias,    // (CoP)
};

std::vector<at::Tensor> pack_conv1x1(const at::Tensor& weight, const at::Tensor& bias,
                                       const std::optional<at::Tensor>& dw_weight,
                                       const std::optional<at::Tensor>& dw_bias) {
  const int64_t Co = weight.size(0), CoP = padded(Co, weight.scalar_type());
  const auto pad = [&](const at::Tensor& t) { return at::constant_pad_nd(t, {0, CoP - Co}); };
  std::vector<at::Tensor> packed{pack_panels(pad(weight.t())), pad(bias).contiguous()};
  if (dw_weight) {
    packed.push_back(pad(dw_weight->reshape({Co, 9}).t()).contiguous());
    packed.push_back(pad(*dw_bias).contiguous());
  }
  return packed;
}

// The 1x1 convolution alone: tiles of tokens.
template <typename T>
void conv1x1_tiles(const DenseIO& io, at::TensorList packed, bool relu) {
  const int64_t C = io.input.size(1), CoP = packed[kBias].size(0);
  const T* w = packed[kWeight].data_ptr<T>();
  const T* b = packed[kBias].data_ptr<T>();
  for_each_token_tile<T>(io.input, io.channels_last, io.output, CoP, 0, /*residual=*/false,
                         [&](const T* x_tile, int64_t n, T* y, T*, const T*) {  // no residual
                           gemm<T>(n, CoP, C, {x_tile, C, 1}, w, kPanelMajor, {b, 0, 1}, y, CoP,
                                   relu);
                         });
}

// The 1x1 convolution, then relu(dwconv3x3_stride2 + dw_bias) on its output, x and out
// channels-last: the convolution's output (PatchMerging's widest activation, four times the
// input's channels) is computed a band of rows at a time into cache and never reaches memory.
// Output row oy reads rows 2oy-1 .. 2oy+1, so a band of an even number of rows [r0, r1) gives
// output rows [r0/2, ceil(r1/2)) with row r0-1 besides: the last row of the band before, when
// this thread computed it, else computed with the band.
template <typename T>
void conv1x1_dwconv_bands(const at::Tensor& x, at::TensorList packed, bool apply_relu,
                            const at::Tensor& out) {
  using S = Simd<T>;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = out.size(1), Ho = out.size(2), Wo = out.size(3);
  const int64_t CoP = packed[kBias].size(0), row = W * CoP;
  const int64_t band = std::max<int64_t>(2, kTileTokens / W / 2 * 2);  // rows per band, ~a tile
  const int64_t bands = (H + band - 1) / band;
  const T* w = packed[kWeight].data_ptr<T>();
  const T* b = packed[kBias].data_ptr<T>();
  const T* dw = packed[kDwWeight].data_ptr<T>();
  const T* dw_b = packed[kDwBias].data_ptr<T>();
  const T* xp = x.data_ptr<T>();
  T* outp = out.data_ptr<T>();
  at::parallel_for(0, B * bands, 1, [&](int64_t begin, int64_t end) {
    // The band's rows after row r0 - 1 (slot r - r0 + 1 holds row r), and an output row when
    // Co is not a whole number of vectors.
    const at::Tensor buffer = at::empty({(band + 1) * row + Wo * CoP}, x.options());
    T* rows = buffer.data_ptr<T>();
    T* padded_out = rows + (band + 1) * row;
    for (int64_t unit = begin; unit < end; ++unit) {
      const int64_t image = unit / bands, r0 = unit % bands * band, r1 = std::min(H, r0 + band);
      int64_t first = r0;  // the first row computed now
      if (r0 > 0 && unit > begin) {
        std::memcpy(rows, rows + band * row, row * sizeof(T));
      } else if (r0 > 0) {
        first = r0 - 1;
      }
      gemm<T>((r1 - first) * W, CoP, C, {xp + (image * H + first) * W * C, C, 1}, w, kPanelMajor,
              {b, 0, 1}, rows + (first - r0 + 1) * row, CoP, apply_relu);
      for (int64_t oy = r0 / 2; oy < (r1 + 1) / 2; ++oy) {
        const int64_t ky0 = oy == 0 ? 1 : 0, ky1 = std::min<int64_t>(3, H + 1 - 2 * oy);
        const T* top = rows + (2 * oy - r0) * row;  // row 2oy - 1 (slot 2oy - r0): tap row 0
        T* o = outp + (image * Ho + oy) * Wo * Co;
        T* y = Co == CoP ? o : padded_out;
        for (int64_t ox = 0; ox < Wo; ++ox) {
          const int64_t kx0 = ox == 0 ? 1 : 0, kx1 = std::min<int64_t>(3, W + 1 - 2 * ox);
          for (int64_t c = 0; c < CoP; c += S::kLanes) {
            auto acc = S::load(dw_b + c);
            for (int64_t ky = ky0; ky < ky1; ++ky)
              for (int64_t kx = kx0; kx < kx1; ++kx)
                acc += S::load(dw + (ky * 3 + kx) * CoP + c) *
                       S::load(top + ky * row + (2 * ox - 1 + kx) * CoP + c);
            S::store(y + ox * CoP + c, relu(acc));
          }
        }
        if (y != o) copy_tile<T>(Wo, Co, {y, CoP, 1}, {}, {o, Co, 1});
      }
    }
  });
}

at::Tensor run_conv1x1(const at::Tensor& x, at::TensorList packed, int64_t Co, bool relu) {
  if (packed.size() == kDwWeight) {
    const DenseIO io = dense_input_and_output(x, Co);
    if (io.output.numel() > 0)
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::conv1x1",
                                 [&] { conv1x1_tiles<scalar_t>(io, packed, relu); });
    return io.output;
  }
  // With the depthwise convolution: computed channels-last, returned in x's layout.
  const at::Tensor input = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor output =
      at::empty({x.size(0), Co, (x.size(2) + 1) / 2, (x.size(3) + 1) / 2},
                x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (output.numel() > 0)
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "efficientvit::conv1x1", [&] {
      conv1x1_dwconv_bands<scalar_t>(input, packed, relu, output);
    });
  return output.contiguous(output_memory_format(x));
}

// The entry points: the op on packed weights, the packing (after the anonymous namespace), its
// cached form (X_pack's), and the op, which packs once per set of weights and runs.

at::Tensor conv1x1_packed_cpu(const at::Tensor& x, const PackedWeights& weights, bool relu) {
  return run_conv1x1(x, weights.tensors, weights.sizes[0], relu);
}

}  // namespace

Packed conv1x1_pack_cpu(const at::Tensor& weight, const at::Tensor& bias,
                        const std::optional<at::Tensor>& dw_weight,
                        const std::optional<at::Tensor>& dw_bias) {
  TORCH_CHECK_VALUE(at::isFloatingType(weight.scalar_type()),
                    "efficientvit: weight must be a floating-point tensor, got ",
                    weight.scalar_type());
  check_conv1x1_params(weight.dim() == 2 ? weight.size(1) : 0, {weight, "weight"}, weight, bias,
                       dw_weight, dw_bias);
  // sizes: {Co}
  return c10::make_intrusive<PackedWeights>(
      "conv1x1", &conv1x1_packed_cpu, pack_conv1x1(weight, bias, dw_weight, dw_bias),
      std::vector<int64_t>{weight.size(0)}, weight.size(1), weight.scalar_type());
}

Packed conv1x1_cached_pack_cpu(const at::Tensor& weight, const at::Tensor& bias,
                               const std::optional<at::Tensor>& dw_weight,
                               const std::optional<at::Tensor>& dw_bias) {
  std::vector<at::Tensor> weights{weight, bias};
  if (dw_weight) weights.push_back(*dw_weight);
  if (dw_bias) weights.push_back(*dw_bias);
  return cached_packing("conv1x1", weights, {}, [&] {
    return conv1x1_pack_cpu(weight, bias, dw_weight, dw_bias);
  });
}

at::Tensor conv1x1_cpu(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                       bool relu, const std::optional<at::Tensor>& dw_weight,
                       const std::optional<at::Tensor>& dw_bias) {
  check_conv1x1(x, weight, bias, dw_weight, dw_bias);
  return conv1x1_packed_cpu(x, *conv1x1_cached_pack_cpu(weight, bias, dw_weight, dw_bias), relu);
}

EFFICIENTVIT_ISA_END

#if EFFICIENTVIT_ISA_LAST_PASS
TORCH_LIBRARY_IMPL(efficientvit, CPU, m) { m.impl("conv1x1", EFFICIENTVIT_SELECT_ISA(conv1x1_cpu)); }
#endif
