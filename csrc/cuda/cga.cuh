// Local-window cascaded group attention (docs/design.md), one launch for the whole layer:
// the kernel and its launch plan, shared by cga.cu and the CPU emulation (tests/emulation).
//
// A block takes `wpb` windows (as many as fill 64 token rows, so 4x4 windows share the
// weight reads of the two projections) and keeps everything in shared memory:
//   X    rows x C   fp32: the window(s) of x, token-major, zero rows for padding tokens; head
//                         i turns its slot into feat_i = out_{i-1} + x_i, then into out_i
//   QKV  rows x (2kd + d): q, k, v of the current head
//   Q2   rows x kd:        q after the depthwise conv
//   S    rows x N:         scores, then attention weights, per window
// The residual is re-read from x at the end (L2-resident), so X can be overwritten.
#pragma once

#include <algorithm>
#include <climits>

#include "checks.h"
#include "cuda_utils.cuh"

namespace efficientvit {
namespace gpu {
namespace {

// Shared-memory layout, computed the same way on host (size, launch) and device (pointers).
struct CgaPlan {
  int64_t tokens, rows, ldx, ldq, ldq2, lds;   // tokens per window; leading dims in floats
  int64_t x_at, qkv_at, q2_at, s_at, bytes;    // byte offsets; row offsets sit at 0

  __host__ __device__ CgaPlan(int64_t ws, int64_t wpb, int64_t C, int64_t kd, int64_t d)
      : tokens(ws * ws), rows(wpb * ws * ws), ldx(padded(C)), ldq(padded(2 * kd + d)),
        ldq2(padded(kd)), lds(padded(ws * ws)) {
    x_at = align16(rows * sizeof(int64_t));
    qkv_at = x_at + align16(rows * ldx * 4);
    q2_at = qkv_at + align16(rows * ldq * 4);
    s_at = q2_at + align16(rows * ldq2 * 4);
    bytes = s_at + align16(rows * lds * 4);
  }
};

template <class T>
struct CgaArgs {
  global_ptr<const T> x;
  global_ptr<T> out;
  global_ptr<const T> qkv_w, qkv_b, dw_w, dw_b, ab, proj_w, proj_b;
  Strides s;
  int H, W, C, heads, kd, d, K, ws, nwy, nwx, wpb;
  int64_t windows;
  float scale;
  bool residual;
};

// 2 blocks per multiprocessor, as kSmemTarget plans: ptxas may use up to 128 registers. Its
// default for 256 threads (64: 4 blocks) spilled the 16-bit variants, and 80 (3) still may.
template <class T>
__global__ void __launch_bounds__(kThreads, 2) cga_kernel(const CgaArgs<T> p) {
  const CgaPlan L(p.ws, p.wpb, p.C, p.kd, p.d);
  unsigned char* smem = dynamic_smem();
  int64_t* rowoff = reinterpret_cast<int64_t*>(smem);
  float* X = reinterpret_cast<float*>(smem + L.x_at);
  float* QKV = reinterpret_cast<float*>(smem + L.qkv_at);
  float* Q2 = reinterpret_cast<float*>(smem + L.q2_at);
  float* S = reinterpret_cast<float*>(smem + L.s_at);
  const int N = L.tokens, R = L.rows, ldx = L.ldx, ldq = L.ldq, ldq2 = L.ldq2, lds = L.lds;
  const int C = p.C, d = p.d, kd = p.kd, K = p.K, ws = p.ws, nq = 2 * kd + d;

  // Where each row's token lives in x (and out); -1 for padding and for windows past the end.
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    const int64_t win = static_cast<int64_t>(blockIdx.x) * p.wpb + r / N;
    int64_t o = -1;
    if (win < p.windows) {
      const int64_t b = win / (p.nwy * p.nwx);
      const int wi = static_cast<int>(win % (p.nwy * p.nwx)), t = r % N;
      const int y = wi / p.nwx * ws + t / ws, x = wi % p.nwx * ws + t % ws;
      if (y < p.H && x < p.W) o = b * p.s.b + y * p.s.h + x * p.s.w;
    }
    rowoff[r] = o;
  }
  __syncthreads();
  for_tile(R, C, p.s.c, [&](int r, int c) {
    const int64_t o = rowoff[r];
    X[r * ldx + c] = o < 0 ? 0.f : to_float(p.x[o + c * p.s.c]);
  });
  __syncthreads();

  for (int i = 0; i < p.heads; ++i) {
    float* Xi = X + i * d;
    if (i > 0) {  // the cascade: feat_i = out_{i-1} + x_i
      for (int e = threadIdx.x; e < R * d; e += blockDim.x) {
        const int r = e / d, c = e % d;
        Xi[r * ldx + c] += Xi[r * ldx + c - d];
      }
      __syncthreads();
    }
    // q, k, v = W_i feat_i + b_i for every token
    const global_ptr<const T> wq = p.qkv_w + static_cast<int64_t>(i) * nq * d;
    const global_ptr<const T> bq = p.qkv_b + i * nq;
    block_gemm<T>(
        1, R, nq, d, [&](int, int m, int k) { return Xi[m * ldx + k]; },
        [&](int, int n, int k) { return to_float(wq[n * d + k]); },
        [&](int, int m, int n, float v) { QKV[m * ldq + n] = v + to_float(bq[n]); });
    __syncthreads();
    // q = dwconv_KxK(q) + c_i on each window's ws x ws grid, zero padding at its edge
    const global_ptr<const T> wd = p.dw_w + static_cast<int64_t>(i) * kd * K * K;
    const global_ptr<const T> bd = p.dw_b + i * kd;
    for (int e = threadIdx.x; e < R * kd; e += blockDim.x) {
      const int r = e / kd, c = e % kd, t = r % N, first = r - t;
      const int ty = t / ws, tx = t % ws;
      float acc = to_float(bd[c]);
      for (int ky = 0; ky < K; ++ky) {
        const int y = ty + ky - K / 2;
        if (y < 0 || y >= ws) continue;
        for (int kx = 0; kx < K; ++kx) {
          const int x = tx + kx - K / 2;
          if (x < 0 || x >= ws) continue;
          acc += to_float(wd[(c * K + ky) * K + kx]) * QKV[(first + y * ws + x) * ldq + c];
        }
      }
      Q2[r * ldq2 + c] = acc;
    }
    __syncthreads();
    // scores = scale q^T k + AB_i[|dy|, |dx|], window by window
    const global_ptr<const T> ab = p.ab + i * ws * ws;
    block_gemm<T>(
        p.wpb, N, N, kd, [&](int w, int m, int k) { return Q2[(w * N + m) * ldq2 + k]; },
        [&](int w, int n, int k) { return QKV[(w * N + n) * ldq + kd + k]; },
        [&](int w, int m, int n, float v) {
          const int dy = abs(m / ws - n / ws), dx = abs(m % ws - n % ws);
          S[(w * N + m) * lds + n] = p.scale * v + to_float(ab[dy * ws + dx]);
        });
    __syncthreads();
    // softmax over each row, one warp per row
    for (int r = threadIdx.x / 32; r < R; r += blockDim.x / 32) {
      float* s = S + r * lds;
      const int lane = threadIdx.x % 32;
      float mx = -INFINITY;
      for (int n = lane; n < N; n += 32) mx = fmaxf(mx, s[n]);
      mx = warp_max(mx);
      float sum = 0.f;
      for (int n = lane; n < N; n += 32) {
        const float e = __expf(s[n] - mx);
        s[n] = e;
        sum += e;
      }
      const float inv = 1.f / warp_sum(sum);  // a NaN score makes the row NaN: max skips NaN, exp does not
      for (int n = lane; n < N; n += 32) s[n] *= inv;
    }
    __syncthreads();
    // out_i = attention x v, into x_i's slot (feat_i is no longer needed)
    block_gemm<T>(
        p.wpb, N, d, N, [&](int w, int m, int k) { return S[(w * N + m) * lds + k]; },
        [&](int w, int n, int k) { return QKV[(w * N + k) * ldq + 2 * kd + n]; },
        [&](int w, int m, int n, float v) { Xi[(w * N + m) * ldx + n] = v; });
    __syncthreads();
  }

  // y = P relu(concat(out_0 .. out_{h-1})) + p [+ x], one write per valid token
  block_gemm<T>(
      1, R, C, C, [&](int, int m, int k) { return relu(X[m * ldx + k]); },
      [&](int, int n, int k) { return to_float(p.proj_w[static_cast<int64_t>(n) * C + k]); },
      [&](int, int m, int n, float v) {
        const int64_t o = rowoff[m];
        if (o < 0) return;
        const int64_t at = o + n * p.s.c;
        v += to_float(p.proj_b[n]);
        if (p.residual) v += to_float(p.x[at]);
        p.out[at] = T(v);
      });
}


// The launch plan of a cga call: cga_kernel<T><<<blocks, kThreads, smem.bytes>>>.
struct CgaLaunch {
  int64_t nwy, nwx, windows;  // windows down, across, in all
  int64_t wpb, blocks;        // windows per block, blocks
  CgaPlan smem;               // shared-memory layout; smem.bytes is the dynamic size
};

// Windows per block: up to 64 token rows, fewer where the layout would exceed `target` bytes
// (room for only one block per multiprocessor); fails where one window needs over `limit`.
inline CgaLaunch plan_cga(const CgaDims& dims, int64_t target, int64_t limit) {
  const int64_t ws = dims.window, C = dims.channels, kd = dims.key_dim, d = dims.value_dim;
  const int64_t nwy = ceil_div(dims.height, ws), nwx = ceil_div(dims.width, ws);
  const int64_t windows = dims.batch * nwy * nwx;
  int64_t wpb = std::max<int64_t>(1, std::min(64 / (ws * ws), windows));
  while (wpb > 1 && CgaPlan(ws, wpb, C, kd, d).bytes > target) --wpb;
  const CgaPlan plan(ws, wpb, C, kd, d);
  TORCH_CHECK(plan.bytes <= limit, "efficientvit: cga keeps a ", ws, "x", ws, " window of ", C,
              " channels (key dim ", kd, ") in shared memory, which needs ", plan.bytes,
              " bytes; this device allows ", limit, " per block. Use smaller windows or fewer channels.");
  const int64_t blocks = ceil_div(windows, wpb);
  TORCH_CHECK(blocks <= INT32_MAX, "efficientvit: cga input has too many windows (", windows, ")");
  return {nwy, nwx, windows, wpb, blocks, plan};
}

// The kernel's arguments: x and out dense in `format`, params the seven weight tensors
// (contiguous, in the op's order).
template <class T>
CgaArgs<T> cga_args(const CgaDims& dims, const CgaLaunch& l, const at::Tensor& x,
                    at::MemoryFormat format, at::Tensor& out, const at::Tensor (&params)[7],
                    double scale, bool residual) {
  return {in_ptr<T>(x, "x"),
          out_ptr<T>(out, "out"),
          in_ptr<T>(params[0], "qkv_weight"),
          in_ptr<T>(params[1], "qkv_bias"),
          in_ptr<T>(params[2], "dw_weight"),
          in_ptr<T>(params[3], "dw_bias"),
          in_ptr<T>(params[4], "attention_bias"),
          in_ptr<T>(params[5], "proj_weight"),
          in_ptr<T>(params[6], "proj_bias"),
          strides_of(x, format),
          static_cast<int>(dims.height),
          static_cast<int>(dims.width),
          static_cast<int>(dims.channels),
          static_cast<int>(dims.heads),
          static_cast<int>(dims.key_dim),
          static_cast<int>(dims.value_dim),
          static_cast<int>(dims.kernel),
          static_cast<int>(dims.window),
          static_cast<int>(l.nwy),
          static_cast<int>(l.nwx),
          static_cast<int>(l.wpb),
          l.windows,
          static_cast<float>(scale),
          residual};
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit
