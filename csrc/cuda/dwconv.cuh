// Depthwise KxK convolution, zero padding K/2: out = [x +] [relu](dwconv(x) + bias). The kernel
// and its launch plan, shared by dwconv.cu and the CPU emulation (tests/emulation).
//
// Each thread computes V consecutive channels of one pixel, walking the tensor in memory order
// so that a warp reads and writes consecutive addresses; the K*K neighbours it reads were
// loaded by nearby threads and come from L1/L2, so device memory sees x once and out once.
// Channels-last with C a multiple of 16 bytes' worth: V fills 16 bytes, every access of x and
// out is one 128-bit load or store, and the index arithmetic (divisions) is paid once per V
// outputs, outside the K*K loop. Otherwise V = 1. The kernel reads the weights tap-major and in
// fp32 (dwconv_taps): a tap's V weights are one or two 128-bit loads and no conversions, where
// channel-major in T they were V 16-bit loads, 9 elements apart, each converted.
#pragma once

#include <algorithm>
#include <climits>

#include "checks.h"
#include "cuda_utils.cuh"

namespace efficientvit {
namespace gpu {
namespace {

template <class T>
struct DwconvArgs {
  global_ptr<const T> x;
  global_ptr<const float> weight;  // (K, K, C) fp32: dwconv_taps
  global_ptr<const T> bias;
  global_ptr<T> out;
  int64_t total;
  int C, H, W, K;
  bool channels_last, relu, residual;
};

// I: the index type, 32-bit where the tensor allows (64-bit division is several times slower).
// V: channels per thread (1, or kVec16<T> with channels last).
template <class T, class I, int V>
__global__ void __launch_bounds__(kThreads) dwconv_kernel(const DwconvArgs<T> p) {
  const I C = p.C, H = p.H, W = p.W, items = static_cast<I>(p.total / V);
  const I sh = p.channels_last ? W * C : W, sw = p.channels_last ? C : 1;
  const int K = p.K, pad = p.K / 2;
  for (I e = blockIdx.x * static_cast<I>(blockDim.x) + threadIdx.x; e < items;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    // item e covers elements e*V .. e*V+V-1 in memory order, also their offsets in x and out
    const I at = e * V;
    I c, y, x;
    if (p.channels_last) {
      const I pixel = at / C;
      c = at - pixel * C;
      x = pixel % W;
      y = pixel / W % H;
    } else {
      x = at % W;
      y = at / W % H;
      c = at / (W * H) % C;
    }
    const global_ptr<const T> plane = p.x + (at - y * sh - x * sw);  // (b, c, 0, 0)
    float acc[V];
#pragma unroll
    for (int v = 0; v < V; ++v) acc[v] = to_float(p.bias[c + v]);
    for (int ky = 0; ky < K; ++ky) {
      const I yy = y + ky - pad;
      if (yy < 0 || yy >= H) continue;
      for (int kx = 0; kx < K; ++kx) {
        const I xx = x + kx - pad;
        if (xx < 0 || xx >= W) continue;
        const Pack<T, V> in = load_pack<T, V>(plane + (yy * sh + xx * sw));
        const Pack<float, V> w = load_pack<float, V>(p.weight + ((ky * K + kx) * C + c));
#pragma unroll
        for (int v = 0; v < V; ++v) acc[v] += w.v[v] * to_float(in.v[v]);
      }
    }
    Pack<T, V> result;
    const Pack<T, V> skip = p.residual ? load_pack<T, V>(p.x + at) : Pack<T, V>{};
#pragma unroll
    for (int v = 0; v < V; ++v) {
      float r = p.relu ? relu(acc[v]) : acc[v];
      if (p.residual) r += to_float(skip.v[v]);
      result.v[v] = T(r);
    }
    store_pack<T, V>(p.out + at, result);
  }
}

template <class T>
using DwconvKernel = void (*)(DwconvArgs<T>);

// The launch plan of a dwconv call: dwconv_kernel<T, I, V><<<blocks, kThreads>>>, I = int64_t
// where wide, else int32_t; V = kVec16<T> where vector, else 1.
struct DwconvLaunch {
  int64_t total, blocks;
  bool wide, vector;
};

inline DwconvLaunch plan_dwconv(const at::Tensor& x, at::MemoryFormat format,
                                const at::Tensor& out) {
  const int64_t total = x.numel(), C = x.size(1), V = 16 / x.element_size();
  const bool vector = format == at::MemoryFormat::ChannelsLast && C % V == 0 && aligned16(x) &&
                      aligned16(out);
  const int64_t items = vector ? total / V : total;
  // grid-stride loop: a few waves' worth of blocks covers any size
  const int64_t blocks = std::min<int64_t>(ceil_div(items, kThreads), 1 << 20);
  // the loop index reaches items + one grid's worth of threads, and the element offset total
  return {total, blocks, std::max(total, items + blocks * kThreads) > INT32_MAX, vector};
}

// The kernel variant the plan launches.
template <class T>
DwconvKernel<T> dwconv_kernel_for(const DwconvLaunch& l) {
  if (l.vector) {
    return l.wide ? dwconv_kernel<T, int64_t, kVec16<T>> : dwconv_kernel<T, int32_t, kVec16<T>>;
  }
  return l.wide ? dwconv_kernel<T, int64_t, 1> : dwconv_kernel<T, int32_t, 1>;
}

// The weights (C, K, K) as the kernel reads them: (K, K, C) in fp32 (exact for fp16 and bf16),
// always a new tensor, so that its packs are aligned (a contiguous view might not be).
inline at::Tensor dwconv_taps(const at::Tensor& weight) {
  at::Tensor taps = at::empty({weight.size(1), weight.size(2), weight.size(0)},
                              weight.options().dtype(at::kFloat));
  return taps.copy_(weight.permute({1, 2, 0}));
}

// The kernel's arguments: x and out dense in `format`, taps from dwconv_taps, bias contiguous.
template <class T>
DwconvArgs<T> dwconv_args(const DwconvLaunch& l, const at::Tensor& x, at::MemoryFormat format,
                          at::Tensor& out, const at::Tensor& taps, const at::Tensor& bias,
                          bool relu, bool residual) {
  return {in_ptr<T>(x, "x"),
          in_ptr<float>(taps, "weight"),
          in_ptr<T>(bias, "bias"),
          out_ptr<T>(out, "out"),
          l.total,
          static_cast<int>(x.size(1)),
          static_cast<int>(x.size(2)),
          static_cast<int>(x.size(3)),
          static_cast<int>(taps.size(0)),
          format == at::MemoryFormat::ChannelsLast,
          relu,
          residual};
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit
