// Depthwise KxK convolution, zero padding K/2: out = [x +] [relu](dwconv(x) + bias). The kernel
// and its launch plan, shared by dwconv.cu and the CPU emulation (tests/emulation).
//
// One thread per output element, walking the tensor in memory order so that a warp reads
// and writes consecutive addresses; the K*K neighbours it reads were loaded by nearby
// threads and come from L1/L2, so device memory sees x once and out once.
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
  global_ptr<const T> weight;
  global_ptr<const T> bias;
  global_ptr<T> out;
  int64_t total;
  int C, H, W, K;
  bool channels_last, relu, residual;
};

// I: the index type, 32-bit where the tensor allows (64-bit division is several times slower).
template <class T, class I>
__global__ void __launch_bounds__(kThreads) dwconv_kernel(const DwconvArgs<T> p) {
  const I C = p.C, H = p.H, W = p.W, total = static_cast<I>(p.total);
  const I sh = p.channels_last ? W * C : W, sw = p.channels_last ? C : 1;
  const int K = p.K, pad = p.K / 2;
  for (I e = blockIdx.x * static_cast<I>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<I>(gridDim.x) * blockDim.x) {
    // e walks memory order, so it is also the element's offset in x and out
    I c, y, x;
    if (p.channels_last) {
      c = e % C;
      x = e / C % W;
      y = e / (C * W) % H;
    } else {
      x = e % W;
      y = e / W % H;
      c = e / (W * H) % C;
    }
    const global_ptr<const T> plane = p.x + (e - y * sh - x * sw);  // (b, c, 0, 0)
    const global_ptr<const T> wc = p.weight + c * K * K;
    float acc = to_float(p.bias[c]);
    for (int ky = 0; ky < K; ++ky) {
      const I yy = y + ky - pad;
      if (yy < 0 || yy >= H) continue;
      for (int kx = 0; kx < K; ++kx) {
        const I xx = x + kx - pad;
        if (xx < 0 || xx >= W) continue;
        acc += to_float(wc[ky * K + kx]) * to_float(plane[yy * sh + xx * sw]);
      }
    }
    if (p.relu) acc = relu(acc);
    if (p.residual) acc += to_float(p.x[e]);
    p.out[e] = T(acc);
  }
}

// The launch plan of a dwconv call: dwconv_kernel<T, I><<<blocks, kThreads>>>, I = int64_t
// where wide, else int32_t.
struct DwconvLaunch {
  int64_t total, blocks;
  bool wide;
};

inline DwconvLaunch plan_dwconv(const at::Tensor& x) {
  const int64_t total = x.numel();
  // grid-stride loop: a few waves' worth of blocks covers any size
  const int64_t blocks = std::min<int64_t>(ceil_div(total, kThreads), 1 << 20);
  // the loop index reaches total + one grid's worth of threads
  return {total, blocks, total + blocks * kThreads > INT32_MAX};
}

// The kernel's arguments: x and out dense in `format`, weight and bias contiguous.
template <class T>
DwconvArgs<T> dwconv_args(const DwconvLaunch& l, const at::Tensor& x, at::MemoryFormat format,
                          at::Tensor& out, const at::Tensor& weight, const at::Tensor& bias,
                          bool relu, bool residual) {
  return {in_ptr<T>(x, "x"),
          in_ptr<T>(weight, "weight"),
          in_ptr<T>(bias, "bias"),
          out_ptr<T>(out, "out"),
          l.total,
          static_cast<int>(x.size(1)),
          static_cast<int>(x.size(2)),
          static_cast<int>(x.size(3)),
          static_cast<int>(weight.size(1)),
          format == at::MemoryFormat::ChannelsLast,
          relu,
          residual};
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit
