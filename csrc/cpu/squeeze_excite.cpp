// Squeeze-excite on CPU: x * sigmoid(w2 relu(w1 mean_hw(x) + b1) + b2), an image at a time, in
// one op: the mean, both layers (dot products on the weights in their own layout, rows of w1
// and w2) and the scaling, which as eight ATen ops cost 4-8x their arithmetic at batch 1 (a
// dispatch, an allocation and a pass over memory each; BLAS's matrix-vector products on AMD
// CPUs take a generic path).
#undef EFFICIENTVIT_ISA_FILE
#define EFFICIENTVIT_ISA_FILE "cpu/squeeze_excite.cpp"
#include "cpu/foreach_isa.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/packed_weights.h"

EFFICIENTVIT_ISA_BEGIN
namespace {

// The sum of a[i] * b[i] (b null: of a[i]), i < n, in vectors, then the tail.
template <typename T>
T sum_of_products(const T* a, const T* b, int64_t n) {
  using S = Simd<T>;
  typename S::Vec acc{};
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) acc += b ? S::load(a + i) * S::load(b + i) : S::load(a + i);
  T sum = 0;
  for (int l = 0; l < S::kLanes; ++l) sum += acc[l];
  for (; i < n; ++i) sum += b ? a[i] * b[i] : a[i];
  return sum;
}

// out[i] = x[i] * scale[i % C] over an image's HW pixels of C channels (channels-last), or
// out[c * HW + p] = x[c * HW + p] * scale[c] (contiguous).
template <typename T>
void scale_image(const T* x, const T* scale, int64_t C, int64_t HW, bool channels_last, T* out) {
  using S = Simd<T>;
  if (channels_last) {
    for (int64_t p = 0; p < HW; ++p) {
      const T* row = x + p * C;
      T* out_row = out + p * C;
      int64_t c = 0;
      for (; c + S::kLanes <= C; c += S::kLanes)
        S::store(out_row + c, S::load(row + c) * S::load(scale + c));
      for (; c < C; ++c) out_row[c] = row[c] * scale[c];
    }
    return;
  }
  for (int64_t c = 0; c < C; ++c) {
    const T* plane = x + c * HW;
    T* out_plane = out + c * HW;
    const typename S::Vec s = S::splat(scale[c]);
    int64_t p = 0;
    for (; p + S::kLanes <= HW; p += S::kLanes) S::store(out_plane + p, S::load(plane + p) * s);
    for (; p < HW; ++p) out_plane[p] = plane[p] * scale[c];
  }
}

template <typename T>
void squeeze_excite_images(const DenseIO& io, const T* w1, const T* b1, const T* w2, const T* b2,
                           int64_t R) {
  const int64_t B = io.input.size(0), C = io.input.size(1);
  const int64_t HW = io.input.size(2) * io.input.size(3);
  const T* x = io.input.data_ptr<T>();
  T* out = io.output.data_ptr<T>();
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> mean(C), hidden(R), scale(C);
    for (int64_t b = begin; b < end; ++b) {
      const T* image = x + b * C * HW;
      if (io.channels_last) {  // sum the pixels' rows, then divide
        using S = Simd<T>;
        std::fill(mean.begin(), mean.end(), T(0));
        for (int64_t p = 0; p < HW; ++p) {
          const T* row = image + p * C;
          int64_t c = 0;
          for (; c + S::kLanes <= C; c += S::kLanes)
            S::store(mean.data() + c, S::load(mean.data() + c) + S::load(row + c));
          for (; c < C; ++c) mean[c] += row[c];
        }
        for (T& m : mean) m /= static_cast<T>(HW);
      } else {
        for (int64_t c = 0; c < C; ++c)
          mean[c] = sum_of_products<T>(image + c * HW, nullptr, HW) / static_cast<T>(HW);
      }
      for (int64_t r = 0; r < R; ++r)
        hidden[r] = relu(b1[r] + sum_of_products(w1 + r * C, mean.data(), C));
      for (int64_t c = 0; c < C; ++c)
        scale[c] = T(1) / (T(1) + std::exp(-(b2[c] + sum_of_products(w2 + c * R, hidden.data(), R))));
      scale_image(image, scale.data(), C, HW, io.channels_last, out + b * C * HW);
    }
  });
}

// w1, b1, w2, b2, contiguous: the op's parameters as they are.
void run_squeeze_excite(const DenseIO& io, at::TensorList weights) {
  if (io.output.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(io.input.scalar_type(), "efficientvit::squeeze_excite", [&] {
    squeeze_excite_images<scalar_t>(io, weights[0].data_ptr<scalar_t>(),
                                    weights[1].data_ptr<scalar_t>(),
                                    weights[2].data_ptr<scalar_t>(),
                                    weights[3].data_ptr<scalar_t>(), weights[0].size(0));
  });
}

at::Tensor squeeze_excite_packed_cpu(const at::Tensor& x, const PackedWeights& weights, bool) {
  const DenseIO io = dense_input_and_output(x);
  run_squeeze_excite(io, weights.tensors);
  return io.output;
}

at::Tensor squeeze_excite_cpu(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& b1,
                              const at::Tensor& w2, const at::Tensor& b2) {
  check_ffn(x, w1, b1, w2, b2);  // the same parameters as ffn's
  const auto dense = [&] {
    return std::vector<at::Tensor>{w1.contiguous(), b1.contiguous(), w2.contiguous(),
                                   b2.contiguous()};
  };
  // The packing is a copy of the weights as they are, into the packed weights' memory (2 MiB
  // pages): at batch 1 the op's time is mostly reading them from memory (M4: 2 MB; its forward
  // took 1.5% less, M2's and M5's 1.1% and 1.7%). Inference tensors would be copied on every
  // call (no packing of theirs is reused), so those are read where they are.
  if (w1.is_inference() || b1.is_inference() || w2.is_inference() || b2.is_inference()) {
    const DenseIO io = dense_input_and_output(x);
    run_squeeze_excite(io, dense());
    return io.output;
  }
  const Packed packed = cached_packing("squeeze_excite", {w1, b1, w2, b2}, {}, [&] {
    return c10::make_intrusive<PackedWeights>("squeeze_excite", &squeeze_excite_packed_cpu,
                                              dense(), std::vector<int64_t>{}, w1.size(1),
                                              w1.scalar_type());
  });
  return squeeze_excite_packed_cpu(x, *packed, false);
}

}  // namespace
EFFICIENTVIT_ISA_END

#if EFFICIENTVIT_ISA_LAST_PASS
TORCH_LIBRARY_IMPL(efficientvit, CPU, m) {
  m.impl("squeeze_excite", EFFICIENTVIT_SELECT_ISA(squeeze_excite_cpu));
}
#endif
