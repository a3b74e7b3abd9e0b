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
//
// fp16/bf16 (tensor cores): the block also stages each chunk's weights, W1 (chunk x C) and W2
// (C x chunk), in shared memory, so all `rows` pixels reuse one read of them; X and the weights
// arrive by 16-byte cp.async where rows are contiguous and aligned, and the products read their
// fragments with ldmatrix (mma_smem). The copies of one chunk's W2 fly during its first product,
// the next chunk's W1 during its second. fp32 keeps fp32 accuracy with FMAs (block_gemm), the
// weights read from global memory (L1/L2).
#pragma once

#include <algorithm>
#include <climits>
#include <type_traits>

#include "checks.h"
#include "cuda_utils.cuh"

namespace efficientvit {
namespace gpu {
namespace {

// Hidden units per chunk, fp32: large enough to keep the second product's K dimension busy.
constexpr int64_t kChunk = 128;
// ... fp16/bf16: the staged weights of a chunk take (2 C + 8) * kMmaChunk * 2 bytes.
constexpr int64_t kMmaChunk = 32;

struct FfnPlan {
  bool mma;                              // 16-bit: tensor cores, staged weights
  int64_t rows, chunk, ldx, ldh, ldy;    // leading dims in elements
  int64_t w1_rows, w2_rows;              // staged weight rows (mma), whole warp tiles
  int64_t x_at, w1_at, h_at, w2_at, y_at, bytes;  // byte offsets; row offsets sit at 0

  __host__ __device__ FfnPlan(int64_t rows, int64_t C, int64_t M, int64_t elem)
      : mma(elem == 2), rows(rows), chunk(mma ? kMmaChunk : M < kChunk ? M : kChunk),
        ldx(mma ? ld_mma(C) : padded(C)), ldh(mma ? ld_mma(chunk) : padded(chunk)),
        ldy(padded(C)), w1_rows(mma ? chunk : 0), w2_rows(mma ? (C + 31) / 32 * 32 : 0) {
    x_at = align16(rows * sizeof(int64_t));
    w1_at = x_at + align16(rows * ldx * elem);
    h_at = w1_at + align16(w1_rows * ldx * elem);
    w2_at = h_at + align16(rows * ldh * elem);
    y_at = w2_at + align16(w2_rows * ldh * elem);
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
  bool x_packs, w1_packs, w2_packs;  // rows of x and out, w1, w2 in 16-byte packs
};

template <class T>
__device__ __forceinline__ void ffn_fma(const FfnArgs<T>& p, const FfnPlan& L, const T* X, T* H,
                                        float* Y) {
  const int R = p.rows, C = p.C, M = p.M, ldx = L.ldx, ldh = L.ldh, ldy = L.ldy;
  for (int m0 = 0; m0 < M; m0 += L.chunk) {
    const int mc = min(static_cast<int>(L.chunk), M - m0);
    // H = relu(w1[m0:m0+mc] x + b1[m0:m0+mc])
    block_gemm(
        1, R, mc, C, [&](int, int m, int k) { return to_float(X[m * ldx + k]); },
        [&](int, int n, int k) { return to_float(p.w1[static_cast<int64_t>(m0 + n) * C + k]); },
        [&](int, int m, int n, float v) { H[m * ldh + n] = T(relu(v + to_float(p.b1[m0 + n]))); });
    __syncthreads();
    // Y += w2[:, m0:m0+mc] H
    block_gemm(
        1, R, C, mc, [&](int, int m, int k) { return to_float(H[m * ldh + k]); },
        [&](int, int n, int k) { return to_float(p.w2[static_cast<int64_t>(n) * M + m0 + k]); },
        [&](int, int m, int n, float v) { Y[m * ldy + n] += v; });
    __syncthreads();
  }
}
// The 16-bit chunk loop: weights staged per chunk, products on tensor cores from shared memory.
// X's copies were issued and committed by the caller; so are Y's initial values.
template <class T>
__device__ __forceinline__ void ffn_mma(const FfnArgs<T>& p, const FfnPlan& L, const T* X, T* H,
                                        float* Y, T* W1, T* W2) {
  const int R = p.rows, C = p.C, M = p.M, chunk = static_cast<int>(L.chunk);
  const int ldx = L.ldx, ldh = L.ldh, ldy = L.ldy;
  // W1 rows m0 .. m0 + chunk (zeros past M); W2's columns m0 .. m0 + chunk, zeros past M
  const auto stage_w1 = [&](int m0) {
    stage_rows<T>(chunk, C, 1, p.w1_packs, W1, ldx, [&](int r) { return m0 + r < M; },
                  [&](int r) { return p.w1 + static_cast<int64_t>(m0 + r) * C; });
    cp_async_commit();
  };
  const auto stage_w2 = [&](int m0) {
    stage_rows<T>(C, min(chunk, M - m0), 1, p.w2_packs, W2, ldh, [](int) { return true; },
                  [&](int n) { return p.w2 + static_cast<int64_t>(n) * M + m0; });
    cp_async_commit();
  };
  stage_w1(0);
  stage_w2(0);
  for (int m0 = 0; m0 < M; m0 += chunk) {
    const int mc = min(chunk, M - m0);
    cp_async_wait<1>();  // X and this chunk's W1 (its W2 may still fly)
    __syncthreads();
    // H = relu(w1[m0:m0+chunk] x + b1): the whole chunk, zero past M (w1's rows there are)
    mma_smem<T>(R, chunk, C, X, ldx, W1, ldx, [&](int m, int n, float v) {
      H[m * ldh + n] = T(relu(v + (n < mc ? to_float(p.b1[m0 + n]) : 0.f)));
    });
    __syncthreads();
    const bool next = m0 + chunk < M;
    if (next) stage_w1(m0 + chunk);  // W1 is free: the next chunk's flies
    if (next) {
      cp_async_wait<1>();  // this chunk's W2
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    // Y += w2[:, m0:m0+mc] H, over whole k steps (H and W2 are zero past mc)
    mma_smem<T>(R, C, (mc + 15) / 16 * 16, H, ldh, W2, ldh,
                [&](int m, int n, float v) { Y[m * ldy + n] += v; });
    __syncthreads();
    if (next) stage_w2(m0 + chunk);
  }
}

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
  const int R = p.rows, C = p.C, ldx = L.ldx, ldy = L.ldy;
  constexpr bool kMma = !std::is_same_v<T, float>;

  // Where each row's pixel lives in x (and out); -1 past the last pixel. Within an image,
  // pixel hw sits at hw * (stride of w) in either memory format.
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    const int64_t pixel = static_cast<int64_t>(blockIdx.x) * R + r;
    rowoff[r] = pixel < p.pixels ? pixel / p.hw * p.s.b + pixel % p.hw * p.s.w : -1;
  }
  __syncthreads();
  if constexpr (kMma) {
    stage_rows<T>(R, C, p.s.c, p.x_packs, X, ldx, [&](int r) { return rowoff[r] >= 0; },
                  [&](int r) { return p.x + rowoff[r]; });
    cp_async_commit();
  } else {
    for_tile(R, C, p.s.c, [&](int r, int c) {
      const int64_t o = rowoff[r];
      X[r * ldx + c] = o < 0 ? T(0.f) : p.x[o + c * p.s.c];
    });
  }
  for_tile(R, C, p.s.c, [&](int r, int c) { Y[r * ldy + c] = to_float(p.b2[c]); });
  if constexpr (kMma) {
    ffn_mma<T>(p, L, X, H, Y, reinterpret_cast<T*>(smem + L.w1_at),
               reinterpret_cast<T*>(smem + L.w2_at));
  } else {
    __syncthreads();
    ffn_fma<T>(p, L, X, H, Y);
  }

  const auto result = [&](int r, int c) {
    return T(Y[r * ldy + c] + (p.residual ? to_float(X[r * ldx + c]) : 0.f));
  };
  if (kMma && p.x_packs) {  // channels last: 16-byte stores
    constexpr int V = kVec16<T>;
    for_packs<V>(R, C, [&](int r, int c) {
      if (rowoff[r] < 0) return;
      Pack<T, V> y;
#pragma unroll
      for (int v = 0; v < V; ++v) y.v[v] = result(r, c + v);
      store_pack<T, V>(p.out + (rowoff[r] + c), y);
    });
    return;
  }
  for_tile(R, C, p.s.c, [&](int r, int c) {
    if (rowoff[r] >= 0) p.out[rowoff[r] + c * p.s.c] = result(r, c);
  });
}

// The launch plan of an ffn call: ffn_kernel<T><<<blocks, kThreads, smem.bytes>>>.
struct FfnLaunch {
  int64_t pixels, hw, blocks;
  FfnPlan smem;  // shared-memory layout, smem.rows pixels per block; smem.bytes the dynamic size
};

// Pixels per block, at most the pixels rounded up to 16. fp32: 64 (four 16-row tiles sharing
// each weight read), fewer where the layout would exceed `target` bytes (room for only one
// block per multiprocessor). fp16/bf16, whose block reads each chunk's weights once for all its
// rows: 128, fewer where over `target`, but not fewer than 64 while the layout fits `limit`
// (reuse of the weights over a second block). Fails where 16 rows need over `limit`.
inline FfnLaunch plan_ffn(const at::Tensor& x, int64_t M, int64_t target, int64_t limit) {
  const int64_t C = x.size(1), hw = x.size(2) * x.size(3);
  const int64_t pixels = x.size(0) * hw, elem = x.element_size();
  const bool mma = elem == 2;
  int64_t rows = std::min<int64_t>(mma ? 128 : 64, ceil_div(pixels, 16) * 16);
  while (rows > (mma ? 64 : 16) && FfnPlan(rows, C, M, elem).bytes > target) rows -= 16;
  while (rows > 16 && FfnPlan(rows, C, M, elem).bytes > limit) rows -= 16;
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
          residual,
          // 16-byte packs (16-bit only): rows of channels (channels last) of x and out, of w1
          // and of w2's chunks, whose starts are multiples of C, C and M (and of the chunk)
          l.smem.mma && format == at::MemoryFormat::ChannelsLast && x.size(1) % 8 == 0 &&
              aligned16(x) && aligned16(out),
          l.smem.mma && w1.size(1) % 8 == 0 && aligned16(w1),
          l.smem.mma && w2.size(1) % 8 == 0 && aligned16(w2)};
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit
