// Pointwise MLP at every pixel: out = [x +] w2 relu(w1 x + b1) + b2. The kernel and its launch
// plan, shared by ffn.cu and the CPU emulation (tests/emulation).
//
// A block takes `rows` pixels and keeps in shared memory:
//   X  rows x C      (input dtype, exact): the pixels' channels, also the residual
//   H  rows x chunk  (input dtype): one chunk of the hidden layer, relu(w1 x + b1)
//   Y  rows x C      fp32: the output, b2 plus the sum over the hidden chunks
// so the hidden activation never reaches device memory and any hidden width fits. Tensor
// cores round their operands to the input dtype anyway, so X and H lose nothing by being
// stored in it.
#pragma once

#include <algorithm>
#include <climits>

#include "checks.h"
#include "cuda_utils.cuh"

namespace efficientvit {
namespace gpu {
namespace {

// Hidden units per chunk: large enough to keep the second product's K dimension busy.
constexpr int64_t kChunk = 128;

struct FfnPlan {
  int64_t rows, chunk, ldx, ldh, ldy;  // leading dims in elements
  int64_t x_at, h_at, y_at, bytes;     // byte offsets; row offsets sit at 0

  __host__ __device__ FfnPlan(int64_t rows, int64_t C, int64_t M, int64_t elem)
      : rows(rows), chunk(M < kChunk ? M : kChunk), ldx(padded(C)), ldh(padded(chunk)),
        ldy(padded(C)) {
    x_at = align16(rows * sizeof(int64_t));
    h_at = x_at + align16(rows * ldx * elem);
    y_at = h_at + align16(rows * ldh * elem);
    bytes = y_at + align16(rows * ldy * 4);
  }
};

template <class T>
struct FfnArgs {
  global_ptr<const T> x, w1, b1, w2, b2;
  global_ptr<T> out;
  Strides s;
  int64_t pixels, hw;
  int C, M, rows;
  bool residual;
};

// 2 blocks per multiprocessor, as kSmemTarget plans: ptxas may use up to 128 registers. Its
// default for 256 threads (64: 4 blocks) spilled the 16-bit variants, and 80 (3) still may.
template <class T>
__global__ void __launch_bounds__(kThreads, 2) ffn_kernel(const FfnArgs<T> p) {
  const FfnPlan L(p.rows, p.C, p.M, sizeof(T));
  unsigned char* smem = dynamic_smem();
  int64_t* rowoff = reinterpret_cast<int64_t*>(smem);
  T* X = reinterpret_cast<T*>(smem + L.x_at);
  T* H = reinterpret_cast<T*>(smem + L.h_at);
  float* Y = reinterpret_cast<float*>(smem + L.y_at);
  const int R = p.rows, C = p.C, M = p.M, ldx = L.ldx, ldh = L.ldh, ldy = L.ldy;

  // Where each row's pixel lives in x (and out); -1 past the last pixel. Within an image,
  // pixel hw sits at hw * (stride of w) in either memory format.
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    const int64_t pixel = static_cast<int64_t>(blockIdx.x) * R + r;
    rowoff[r] = pixel < p.pixels ? pixel / p.hw * p.s.b + pixel % p.hw * p.s.w : -1;
  }
  __syncthreads();
  for_tile(R, C, p.s.c, [&](int r, int c) {
    const int64_t o = rowoff[r];
    X[r * ldx + c] = o < 0 ? T(0.f) : p.x[o + c * p.s.c];
    Y[r * ldy + c] = to_float(p.b2[c]);
  });
  __syncthreads();

  for (int m0 = 0; m0 < M; m0 += L.chunk) {
    const int mc = min(static_cast<int>(L.chunk), M - m0);
    // H = relu(w1[m0:m0+mc] x + b1[m0:m0+mc])
    block_gemm<T>(
        1, R, mc, C, [&](int, int m, int k) { return to_float(X[m * ldx + k]); },
        [&](int, int n, int k) { return to_float(p.w1[static_cast<int64_t>(m0 + n) * C + k]); },
        [&](int, int m, int n, float v) { H[m * ldh + n] = T(relu(v + to_float(p.b1[m0 + n]))); });
    __syncthreads();
    // Y += w2[:, m0:m0+mc] H
    block_gemm<T>(
        1, R, C, mc, [&](int, int m, int k) { return to_float(H[m * ldh + k]); },
        [&](int, int n, int k) { return to_float(p.w2[static_cast<int64_t>(n) * M + m0 + k]); },
        [&](int, int m, int n, float v) { Y[m * ldy + n] += v; });
    __syncthreads();
  }

  for_tile(R, C, p.s.c, [&](int r, int c) {
    const int64_t o = rowoff[r];
    if (o < 0) return;
    const float v = Y[r * ldy + c] + (p.residual ? to_float(X[r * ldx + c]) : 0.f);
    p.out[o + c * p.s.c] = T(v);
  });
}

// The launch plan of an ffn call: ffn_kernel<T><<<blocks, kThreads, smem.bytes>>>.
struct FfnLaunch {
  int64_t pixels, hw, blocks;
  FfnPlan smem;  // shared-memory layout, smem.rows pixels per block; smem.bytes the dynamic size
};

// Pixels per block: 64 (four 16-row MMA tiles sharing each weight read), fewer for few pixels
// or where the layout would exceed `target` bytes (room for only one block per
// multiprocessor); fails where 16 rows need over `limit`.
inline FfnLaunch plan_ffn(const at::Tensor& x, int64_t M, int64_t target, int64_t limit) {
  const int64_t C = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t pixels = x.size(0) * hw, elem = x.element_size();
  int64_t rows = std::min<int64_t>(64, ceil_div(pixels, 16) * 16);
  while (rows > 16 && FfnPlan(rows, C, M, elem).bytes > target) rows -= 16;
  const FfnPlan plan(rows, C, M, elem);
  TORCH_CHECK(plan.bytes <= limit, "efficientvit: ffn keeps ", rows, " pixels of ", C,
              " channels in shared memory, which needs ", plan.bytes, " bytes; this device allows ",
              limit, " per block");
  const int64_t blocks = ceil_div(pixels, rows);
  TORCH_CHECK(blocks <= INT32_MAX, "efficientvit: ffn input has too many pixels (", pixels, ")");
  return {pixels, hw, blocks, plan};
}

// The kernel's arguments: x and out dense in `format`, the weights contiguous.
template <class T>
FfnArgs<T> ffn_args(const FfnLaunch& l, const at::Tensor& x, at::MemoryFormat format,
                    at::Tensor& out, const at::Tensor& w1, const at::Tensor& b1,
                    const at::Tensor& w2, const at::Tensor& b2, bool residual) {
  return {in_ptr<T>(x, "x"),
          in_ptr<T>(w1, "w1"),
          in_ptr<T>(b1, "b1"),
          in_ptr<T>(w2, "w2"),
          in_ptr<T>(b2, "b2"),
          out_ptr<T>(out, "out"),
          strides_of(x, format),
          l.pixels,
          l.hw,
          static_cast<int>(x.size(1)),
          static_cast<int>(w1.size(0)),
          static_cast<int>(l.smem.rows),
          residual};
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit
