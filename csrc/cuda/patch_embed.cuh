// patch_embed on CUDA: cuDNN's convolutions (patch_embed.cu), each followed by this kernel,
// y = [relu](y + bias), in place, one pass. Through ATen, cuDNN's convolution adds its bias in
// a pass of its own and the ReLU is one more (an H200 spent 177 us of M0's 555-us stem at
// batch 256 in those two). The kernel and its launch plan, shared by patch_embed.cu and the
// CPU emulation (tests/emulation).
//
// y is dense, channels-last or contiguous. Each thread takes V consecutive elements, walking y
// in memory order: 16 bytes where their channels allow (channels-last with C a multiple of V,
// or contiguous with H*W one: then V elements share a channel), one element otherwise.
#pragma once

#include <ATen/Context.h>
#include <ATen/ops/_convolution.h>

#include <algorithm>
#include <climits>

#include "checks.h"
#include "cuda_utils.cuh"

namespace efficientvit {
namespace gpu {
namespace {

template <class T>
struct BiasActArgs {
  global_ptr<T> y;
  global_ptr<const T> bias;
  int64_t total;
  int C, HW;
  bool channels_last, relu;
};

// I: the index type, 32-bit where the tensor allows. V: elements per thread (1 or kVec16<T>).
template <class T, class I, int V>
__global__ void __launch_bounds__(kThreads) bias_act_kernel(const BiasActArgs<T> p) {
  const I C = p.C, HW = p.HW, items = static_cast<I>(p.total / V);
  for (I e = blockIdx.x * static_cast<I>(blockDim.x) + threadIdx.x; e < items;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    const I at = e * V;
    const I c = p.channels_last ? at % C : at / HW % C;
    Pack<T, V> v = load_pack<T, V>(p.y + at);
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const float r = to_float(v.v[i]) + to_float(p.bias[p.channels_last ? c + i : c]);
      v.v[i] = T(p.relu ? relu(r) : r);
    }
    store_pack<T, V>(p.y + at, v);
  }
}

template <class T>
using BiasActKernel = void (*)(BiasActArgs<T>);

// The launch plan of bias_act_kernel<T, I, V><<<blocks, kThreads>>>.
struct BiasActLaunch {
  int64_t total, blocks;
  bool channels_last, wide, vector;
};

// y: dense in `format` (channels-last or contiguous).
inline BiasActLaunch plan_bias_act(const at::Tensor& y, at::MemoryFormat format) {
  const int64_t total = y.numel(), C = y.size(1), HW = y.size(2) * y.size(3);
  const int64_t V = 16 / y.element_size();
  const bool channels_last = format == at::MemoryFormat::ChannelsLast;
  const bool vector = (channels_last ? C % V == 0 : HW % V == 0) && aligned16(y);
  const int64_t items = vector ? total / V : total;
  // grid-stride loop: a few waves' worth of blocks covers any size
  const int64_t blocks = std::min<int64_t>(ceil_div(items, kThreads), 1 << 20);
  // the loop index reaches items + one grid's worth of threads, and the element offset total
  return {total, blocks, channels_last, std::max(total, items + blocks * kThreads) > INT32_MAX,
          vector};
}

template <class T>
BiasActKernel<T> bias_act_kernel_for(const BiasActLaunch& l) {
  if (l.vector) {
    return l.wide ? bias_act_kernel<T, int64_t, kVec16<T>> : bias_act_kernel<T, int32_t, kVec16<T>>;
  }
  return l.wide ? bias_act_kernel<T, int64_t, 1> : bias_act_kernel<T, int32_t, 1>;
}

template <class T>
BiasActArgs<T> bias_act_args(const BiasActLaunch& l, at::Tensor& y, const at::Tensor& bias,
                             bool relu) {
  return {out_ptr<T>(y, "y"),
          in_ptr<T>(bias, "bias"),
          l.total,
          static_cast<int>(y.size(1)),
          static_cast<int>(y.size(2) * y.size(3)),
          l.channels_last,
          relu};
}

// patch_embed's chain after its checks: each convolution by ATen (cuDNN on CUDA) without its
// bias, then launch(plan, y, bias, relu) runs bias_act_kernel on y, dense (made so if ATen
// returned it otherwise): patch_embed.cu on the GPU, the emulation on CPU. The convolution is
// at::conv2d's own call with TF32 off: cuDNN's default would round fp32 operands to 10-bit
// mantissas (an H200 measured 3.6e-4 relative error against the 1e-5 fp32 contract).
template <class Launch>
at::Tensor patch_embed_chain(const at::Tensor& x, at::TensorList weights, at::TensorList biases,
                             bool final_relu, const Launch& launch) {
  const at::Context& ctx = at::globalContext();
  at::Tensor y = x;
  for (size_t l = 0; l < weights.size(); ++l) {
    y = at::_convolution(y, weights[l], /*bias=*/{}, /*stride=*/{2, 2}, /*padding=*/{1, 1},
                         /*dilation=*/{1, 1}, /*transposed=*/false, /*output_padding=*/{0, 0},
                         /*groups=*/1, ctx.benchmarkCuDNN(),
                         ctx.deterministicCuDNN() || ctx.deterministicAlgorithms(),
                         ctx.userEnabledCuDNN(), /*allow_tf32=*/false);
    if (y.numel() == 0) continue;
    const at::MemoryFormat format = y.suggest_memory_format();
    if (!y.is_contiguous(format)) y = y.contiguous(format);
    launch(plan_bias_act(y, format), y, biases[l].contiguous(),
           final_relu || l + 1 < weights.size());
  }
  return y.contiguous(at::MemoryFormat::ChannelsLast);
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit
