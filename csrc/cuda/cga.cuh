// Local-window cascaded group attention (docs/design.md), one launch for the whole layer:
// the kernel and its launch plan, shared by cga.cu and the CPU emulation (tests/emulation).
//
// A block takes `wpb` windows (as many as fill 64 token rows, so 4x4 windows share the
// weight reads of the two projections) and keeps everything in shared memory:
//   X    rows x C   fp32: the window(s) of x, token-major, zero rows for padding tokens; head
//                         i turns its slot into feat_i = out_{i-1} + x_i, then into out_i
// and per head, fp32 (FMAs, block_gemm):
//   QKV  rows x (2kd + d): q, k, v of the current head
//   Q2   rows x kd:        q after the depthwise conv
//   S    rows x N:         scores, then attention weights, per window
// or fp16/bf16 (tensor cores, mma_smem: operands in the input dtype, as tensor cores round
// them anyway; each window's rows padded to a multiple of 16, a whole number of MMA tiles):
//   F    rows x d    feat_i, the qkv product's A;  Wqkv (2kd + d) x d, staged by cp.async
//   Q    rows x kd   fp32 q;  Q2, K  rows x kd: q after the dwconv, k;  Vt  d x rows: v^T
//   S    rows x N    fp32 scores;  P  rows x N: attention weights
// and for the output projection, in the same space: relu(X) in the input dtype and two
// 32-row chunks of its weight, the next one's copies flying during a chunk's product; the
// products go to X (no longer needed), then out, with the residual re-read from x (L2-resident).
// Rows of x and out move in 16-byte packs where they can (16-bit, channels last).
#pragma once

#include <algorithm>
#include <climits>
#include <type_traits>

#include "checks.h"
#include "cuda_utils.cuh"

namespace efficientvit {
namespace gpu {
namespace {

// Shared-memory layout, computed the same way on host (size, launch) and device (pointers).
struct CgaPlan {
  bool mma;                                   // 16-bit: tensor cores on shared-memory operands
  int64_t tokens, np, rows;                   // tokens per window, rows per window, rows
  int64_t ldx, ldq, ldq2, lds;                // leading dims, in elements
  int64_t x_at, qkv_at, q2_at, s_at, bytes;   // byte offsets; row offsets sit at 0
  // 16-bit only: leading dims of F/Wqkv, K/Q2, Vt, P, relu(X)/its weight chunks; offsets
  int64_t ldf, ldk, ldv, ldp, ldr;
  int64_t f_at, w_at, k_at, v_at, p_at, r_at, pw_at;

  __host__ __device__ CgaPlan(int64_t ws, int64_t wpb, int64_t C, int64_t kd, int64_t d,
                              int64_t elem)
      : mma(elem == 2), tokens(ws * ws), np(mma ? (ws * ws + 15) / 16 * 16 : ws * ws),
        rows(wpb * np), ldx(padded(C)), ldq(padded(mma ? kd : 2 * kd + d)), ldq2(padded(kd)),
        lds(padded(ws * ws)), ldf(ld_mma(d)), ldk(ld_mma(kd)), ldv(ld_mma(rows)),
        ldp(ld_mma(np)), ldr(ld_mma(C)) {
    x_at = align16(rows * sizeof(int64_t));
    qkv_at = x_at + align16(rows * ldx * 4);  // the per-head buffers start here
    q2_at = qkv_at + align16(rows * ldq * 4);
    s_at = q2_at + align16(mma ? 0 : rows * ldq2 * 4);
    bytes = s_at + align16(rows * lds * 4);
    if (!mma) return;
    // B operands are read in whole 32-row warp tiles: Wqkv, Vt and the projection's chunks
    // get rows up to a multiple of 32, K 16 rows past the last window's
    const int64_t nq = 2 * kd + d;
    f_at = bytes;
    w_at = f_at + align16(rows * ldf * elem);
    k_at = w_at + align16((nq + 31) / 32 * 32 * ldf * elem);
    q2_at = k_at + align16((rows + 16) * ldk * elem);
    v_at = q2_at + align16(rows * ldk * elem);
    p_at = v_at + align16((d + 31) / 32 * 32 * ldv * elem);
    const int64_t head_end = p_at + align16(rows * ldp * elem);
    r_at = qkv_at;  // after the last head: relu(X), then two weight chunks
    pw_at = r_at + align16(rows * ldr * elem);
    const int64_t proj_end = pw_at + 2 * align16(32 * ldr * elem);
    bytes = head_end > proj_end ? head_end : proj_end;
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
  bool qkv_packs, proj_packs;  // 16-bit: weight rows in 16-byte packs (cp.async)
  bool x_packs;                // 16-bit: rows of channels (channels last) of x and out too
};

// A head's query kernel without its all-zero border rings (a head's smaller kernel comes
// zero-padded to K x K; a NaN weight counts as nonzero), found in two steps either side of a
// barrier the head passes anyway: flag_taps marks each tap that can reach into a ws x ws
// window (offset below ws) and has a nonzero weight (wd: the head's kd x K x K weights), in
// `flags` (shared memory, (2 reach + 1)^2 ints); kernel_radius reads the marks.
__device__ __forceinline__ int tap_reach(int K, int ws) { return std::min(K / 2, ws - 1); }

template <class T>
__device__ __forceinline__ void flag_taps(global_ptr<const T> wd, int kd, int K, int ws,
                                          int* flags) {
  const int reach = tap_reach(K, ws), side = 2 * reach + 1;
  for (int t = threadIdx.x; t < side * side; t += blockDim.x) {
    const int tap = (K / 2 - reach + t / side) * K + K / 2 - reach + t % side;
    bool nonzero = false;
    for (int c = 0; c < kd; ++c) nonzero = nonzero || !(to_float(wd[c * K * K + tap]) == 0.f);
    flags[t] = nonzero;
  }
}

__device__ __forceinline__ int kernel_radius(const int* flags, int K, int ws) {
  const int reach = tap_reach(K, ws), side = 2 * reach + 1;
  int radius = 0;
  for (int y = 0; y < side; ++y) {
    for (int x = 0; x < side; ++x) {
      if (flags[y * side + x]) radius = std::max(radius, std::max(abs(y - reach), abs(x - reach)));
    }
  }
  return radius;
}

// q = dwconv_KxK(q) + bias at token t of a ws x ws window, channel c, zero padding at the
// window's edge, over the taps within `radius` of the centre (kernel_radius: the others'
// weights are zero); q[token * ldq] is the window's q of that channel (fp32).
template <class T>
__device__ __forceinline__ float window_dwconv(global_ptr<const T> wd, global_ptr<const T> bd,
                                               int K, int radius, int ws, const float* q,
                                               int ldq, int t, int c) {
  const int ty = t / ws, tx = t % ws;
  float acc = to_float(bd[c]);
  for (int ky = K / 2 - radius; ky <= K / 2 + radius; ++ky) {
    const int y = ty + ky - K / 2;
    if (y < 0 || y >= ws) continue;
    for (int kx = K / 2 - radius; kx <= K / 2 + radius; ++kx) {
      const int x = tx + kx - K / 2;
      if (x < 0 || x >= ws) continue;
      acc += to_float(wd[(c * K + ky) * K + kx]) * q[(y * ws + x) * ldq];
    }
  }
  return acc;
}

// The heads, fp32: on return X holds out_0 .. out_{h-1}.
template <class T>
__device__ __forceinline__ void cga_heads_fma(const CgaArgs<T>& p, const CgaPlan& L,
                                              unsigned char* smem, float* X) {
  float* QKV = reinterpret_cast<float*>(smem + L.qkv_at);
  float* Q2 = reinterpret_cast<float*>(smem + L.q2_at);
  float* S = reinterpret_cast<float*>(smem + L.s_at);
  const int N = L.tokens, R = L.rows, ldx = L.ldx, ldq = L.ldq, ldq2 = L.ldq2, lds = L.lds;
  const int d = p.d, kd = p.kd, K = p.K, ws = p.ws, nq = 2 * kd + d;
  for (int i = 0; i < p.heads; ++i) {
    float* Xi = X + i * d;
    if (i > 0) {  // the cascade: feat_i = out_{i-1} + x_i
      for (int e = threadIdx.x; e < R * d; e += blockDim.x) {
        const int r = e / d, c = e % d;
        Xi[r * ldx + c] += Xi[r * ldx + c - d];
      }
      __syncthreads();
    }
    // q, k, v = W_i feat_i + b_i for every token; the head's kernel taps flagged in S (free
    // until the scores)
    const global_ptr<const T> wd = p.dw_w + static_cast<int64_t>(i) * kd * K * K;
    flag_taps(wd, kd, K, ws, reinterpret_cast<int*>(S));
    const global_ptr<const T> wq = p.qkv_w + static_cast<int64_t>(i) * nq * d;
    const global_ptr<const T> bq = p.qkv_b + i * nq;
    block_gemm(
        1, R, nq, d, [&](int, int m, int k) { return Xi[m * ldx + k]; },
        [&](int, int n, int k) { return to_float(wq[n * d + k]); },
        [&](int, int m, int n, float v) { QKV[m * ldq + n] = v + to_float(bq[n]); });
    __syncthreads();
    // q = dwconv_KxK(q) + c_i on each window's ws x ws grid, zero padding at its edge
    const global_ptr<const T> bd = p.dw_b + i * kd;
    const int radius = kernel_radius(reinterpret_cast<const int*>(S), K, ws);
    for (int e = threadIdx.x; e < R * kd; e += blockDim.x) {
      const int r = e / kd, c = e % kd, t = r % N;
      Q2[r * ldq2 + c] =
          window_dwconv(wd, bd, K, radius, ws, QKV + (r - t) * ldq + c, ldq, t, c);
    }
    __syncthreads();
    // scores = scale q^T k + AB_i[|dy|, |dx|], window by window
    const global_ptr<const T> ab = p.ab + i * ws * ws;
    block_gemm(
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
    block_gemm(
        p.wpb, N, d, N, [&](int w, int m, int k) { return S[(w * N + m) * lds + k]; },
        [&](int w, int n, int k) { return QKV[(w * N + k) * ldq + 2 * kd + n]; },
        [&](int w, int m, int n, float v) { Xi[(w * N + m) * ldx + n] = v; });
    __syncthreads();
  }

}

template <class T>
__device__ __forceinline__ void cga_projection_fma(const CgaArgs<T>& p, const CgaPlan& L,
                                                   const int64_t* rowoff, const float* X) {
  const int R = L.rows, C = p.C, ldx = L.ldx;
  // y = P relu(concat(out_0 .. out_{h-1})) + p [+ x], one write per valid token
  block_gemm(
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

// The heads, fp16/bf16: on return X holds out_0 .. out_{h-1}. Per head, the qkv weight is
// staged by cp.async while feat_i is formed; the products run on tensor cores.
template <class T>
__device__ __forceinline__ void cga_heads_mma(const CgaArgs<T>& p, const CgaPlan& L,
                                              unsigned char* smem, float* X) {
  float* Q = reinterpret_cast<float*>(smem + L.qkv_at);
  float* S = reinterpret_cast<float*>(smem + L.s_at);
  T* F = reinterpret_cast<T*>(smem + L.f_at);
  T* Wqkv = reinterpret_cast<T*>(smem + L.w_at);
  T* Kt = reinterpret_cast<T*>(smem + L.k_at);
  T* Q2 = reinterpret_cast<T*>(smem + L.q2_at);
  T* Vt = reinterpret_cast<T*>(smem + L.v_at);
  T* P = reinterpret_cast<T*>(smem + L.p_at);
  const int N = L.tokens, np = L.np, R = L.rows, wpb = p.wpb;
  const int ldx = L.ldx, ldq = L.ldq, lds = L.lds, ldf = L.ldf, ldk = L.ldk, ldv = L.ldv,
            ldp = L.ldp;
  const int d = p.d, kd = p.kd, K = p.K, ws = p.ws, nq = 2 * kd + d;
  const int d16 = (d + 15) / 16 * 16, kd16 = (kd + 15) / 16 * 16;

  // q after the dwconv and k past kd: zeros, the k steps' padding (no head writes there)
  for (int e = threadIdx.x; e < (R + 16) * (kd16 - kd); e += blockDim.x) {
    const int r = e / (kd16 - kd), c = kd + e % (kd16 - kd);
    Kt[r * ldk + c] = T(0.f);
    if (r < R) Q2[r * ldk + c] = T(0.f);
  }
  const auto stage_wqkv = [&](int i) {
    const global_ptr<const T> w = p.qkv_w + static_cast<int64_t>(i) * nq * d;
    stage_rows<T>(nq, d, 1, p.qkv_packs, Wqkv, ldf, [](int) { return true; },
                  [&](int n) { return w + n * d; });
    cp_async_commit();
  };
  stage_wqkv(0);
  for (int i = 0; i < p.heads; ++i) {
    float* Xi = X + i * d;
    // the cascade, feat_i = out_{i-1} + x_i, and its copy in T (zeros past d)
    for (int e = threadIdx.x; e < R * d16; e += blockDim.x) {
      const int r = e / d16, c = e - r * d16;
      float v = 0.f;
      if (c < d) {
        v = Xi[r * ldx + c];
        if (i > 0) Xi[r * ldx + c] = v += Xi[r * ldx + c - d];
      }
      F[r * ldf + c] = T(v);
    }
    // the head's kernel taps flagged in S (free until the scores)
    const global_ptr<const T> wd = p.dw_w + static_cast<int64_t>(i) * kd * K * K;
    flag_taps(wd, kd, K, ws, reinterpret_cast<int*>(S));
    cp_async_wait<0>();
    __syncthreads();
    // q (fp32, for the dwconv), k, v^T = W_i feat_i + b_i for every row
    const global_ptr<const T> bq = p.qkv_b + i * nq;
    mma_smem<T>(R, nq, d16, F, ldf, Wqkv, ldf, [&](int m, int n, float v) {
      v += to_float(bq[n]);
      if (n < kd) {
        Q[m * ldq + n] = v;
      } else if (n < 2 * kd) {
        Kt[m * ldk + n - kd] = T(v);
      } else {
        Vt[(n - 2 * kd) * ldv + m] = T(v);
      }
    });
    __syncthreads();
    if (i + 1 < p.heads) stage_wqkv(i + 1);  // Wqkv is free: the next head's flies
    // q = dwconv_KxK(q) + c_i on each window's ws x ws grid, zero padding at its edge
    const global_ptr<const T> bd = p.dw_b + i * kd;
    const int radius = kernel_radius(reinterpret_cast<const int*>(S), K, ws);
    for (int e = threadIdx.x; e < R * kd; e += blockDim.x) {
      const int r = e / kd, c = e - r * kd, t = r % np;  // rows past N: zeros
      Q2[r * ldk + c] =
          T(t < N ? window_dwconv(wd, bd, K, radius, ws, Q + (r - t) * ldq + c, ldq, t, c) : 0.f);
    }
    __syncthreads();
    // scores = scale q^T k + AB_i[|dy|, |dx|], window by window (rows past N left out)
    const global_ptr<const T> ab = p.ab + i * ws * ws;
    mma_smem<T>(wpb, np, N, kd16, Q2, ldk, np * ldk, Kt, ldk, np * ldk,
                [&](int w, int m, int n, float v) {
                  if (m >= N) return;
                  const int dy = abs(m / ws - n / ws), dx = abs(m % ws - n % ws);
                  S[(w * np + m) * lds + n] = p.scale * v + to_float(ab[dy * ws + dx]);
                });
    __syncthreads();
    // softmax over each token's row, one warp per row, into P (zeros past N, the k padding)
    for (int r = threadIdx.x / 32; r < R; r += blockDim.x / 32) {
      if (r % np >= N) continue;
      const float* s = S + r * lds;
      const int lane = threadIdx.x % 32;
      float mx = -INFINITY;
      for (int n = lane; n < N; n += 32) mx = fmaxf(mx, s[n]);
      mx = warp_max(mx);
      float sum = 0.f;
      for (int n = lane; n < N; n += 32) sum += __expf(s[n] - mx);
      const float inv = 1.f / warp_sum(sum);  // a NaN score makes the row NaN, as in fp32
      for (int n = lane; n < np; n += 32) {
        P[r * ldp + n] = T(n < N ? __expf(s[n] - mx) * inv : 0.f);
      }
    }
    __syncthreads();
    // out_i = attention x v, into x_i's slot (feat_i is no longer needed)
    mma_smem<T>(wpb, np, d, np, P, ldp, np * ldp, Vt, ldv, np,
                [&](int w, int m, int n, float v) {
                  if (m < N) Xi[(w * np + m) * ldx + n] = v;
                });
    __syncthreads();
  }
}

// y = P relu(concat(out_0 .. out_{h-1})) + p [+ x], fp16/bf16: relu(X) in T, the weight in
// 32-row chunks, each chunk's product (plus p) into X; then one write per valid token.
template <class T>
__device__ __forceinline__ void cga_projection_mma(const CgaArgs<T>& p, const CgaPlan& L,
                                                   unsigned char* smem, const int64_t* rowoff,
                                                   float* X) {
  T* A = reinterpret_cast<T*>(smem + L.r_at);
  const int R = L.rows, C = p.C, ldx = L.ldx, ldr = L.ldr, c16 = (C + 15) / 16 * 16;
  const int64_t chunk_bytes = align16(32 * ldr * sizeof(T));
  const auto chunk = [&](int j) { return reinterpret_cast<T*>(smem + L.pw_at + j % 2 * chunk_bytes); };
  const auto stage = [&](int j) {
    stage_rows<T>(32, C, 1, p.proj_packs, chunk(j), ldr, [&](int r) { return 32 * j + r < C; },
                  [&](int r) { return p.proj_w + static_cast<int64_t>(32 * j + r) * C; });
    cp_async_commit();
  };
  stage(0);
  for (int e = threadIdx.x; e < R * c16; e += blockDim.x) {
    const int r = e / c16, c = e - r * c16;
    A[r * ldr + c] = T(c < C ? relu(X[r * ldx + c]) : 0.f);
  }
  const int chunks = (C + 31) / 32;
  for (int j = 0; j < chunks; ++j) {
    if (j + 1 < chunks) stage(j + 1);  // its buffer's last reader finished before the barrier
    if (j + 1 < chunks) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    mma_smem<T>(R, min(32, C - 32 * j), c16, A, ldr, chunk(j), ldr, [&](int m, int n, float v) {
      const int c = 32 * j + n;
      X[m * ldx + c] = v + to_float(p.proj_b[c]);
    });
    __syncthreads();
  }
  if (p.x_packs) {
    constexpr int V = kVec16<T>;
    for_packs<V>(R, C, [&](int r, int c) {
      const int64_t o = rowoff[r];
      if (o < 0) return;
      Pack<T, V> x0{}, y;
      if (p.residual) x0 = load_pack<T, V>(p.x + (o + c));
#pragma unroll
      for (int v = 0; v < V; ++v)
        y.v[v] = T(X[r * ldx + c + v] + (p.residual ? to_float(x0.v[v]) : 0.f));
      store_pack<T, V>(p.out + (o + c), y);
    });
    return;
  }
  for_tile(R, C, p.s.c, [&](int r, int c) {
    const int64_t o = rowoff[r];
    if (o < 0) return;
    const int64_t at = o + c * p.s.c;
    p.out[at] = T(X[r * ldx + c] + (p.residual ? to_float(p.x[at]) : 0.f));
  });
}

// 2 blocks per multiprocessor, as kSmemTarget plans: ptxas may use up to 128 registers. Its
// default for 256 threads (64: 4 blocks) spilled the 16-bit variants, and 80 (3) still may.
template <class T>
__global__ void __launch_bounds__(kThreads, 2) cga_kernel(const CgaArgs<T> p) {
  const CgaPlan L(p.ws, p.wpb, p.C, p.kd, p.d, sizeof(T));
  unsigned char* smem = dynamic_smem();
  int64_t* rowoff = reinterpret_cast<int64_t*>(smem);
  float* X = reinterpret_cast<float*>(smem + L.x_at);
  const int N = L.tokens, R = L.rows, ldx = L.ldx, C = p.C, ws = p.ws;

  // Where each row's token lives in x (and out); -1 for padding tokens, the rows that pad a
  // window to np, and windows past the end.
  for (int r = threadIdx.x; r < R; r += blockDim.x) {
    const int64_t win = static_cast<int64_t>(blockIdx.x) * p.wpb + r / L.np;
    const int t = r % L.np;
    int64_t o = -1;
    if (win < p.windows && t < N) {
      const int64_t b = win / (p.nwy * p.nwx);
      const int wi = static_cast<int>(win % (p.nwy * p.nwx));
      const int y = wi / p.nwx * ws + t / ws, x = wi % p.nwx * ws + t % ws;
      if (y < p.H && x < p.W) o = b * p.s.b + y * p.s.h + x * p.s.w;
    }
    rowoff[r] = o;
  }
  __syncthreads();
  if (p.x_packs) {
    constexpr int V = kVec16<T>;
    for_packs<V>(R, C, [&](int r, int c) {
      const int64_t o = rowoff[r];
      Pack<T, V> v{};
      if (o >= 0) v = load_pack<T, V>(p.x + (o + c));
#pragma unroll
      for (int i = 0; i < V; ++i) X[r * ldx + c + i] = o < 0 ? 0.f : to_float(v.v[i]);
    });
  } else {
    for_tile(R, C, p.s.c, [&](int r, int c) {
      const int64_t o = rowoff[r];
      X[r * ldx + c] = o < 0 ? 0.f : to_float(p.x[o + c * p.s.c]);
    });
  }
  __syncthreads();
  if constexpr (std::is_same_v<T, float>) {
    cga_heads_fma<T>(p, L, smem, X);
    cga_projection_fma<T>(p, L, rowoff, X);
  } else {
    cga_heads_mma<T>(p, L, smem, X);
    cga_projection_mma<T>(p, L, smem, rowoff, X);
  }
}

// The launch plan of a cga call: cga_kernel<T><<<blocks, kThreads, smem.bytes>>>.
struct CgaLaunch {
  int64_t nwy, nwx, windows;  // windows down, across, in all
  int64_t wpb, blocks;        // windows per block, blocks
  CgaPlan smem;               // shared-memory layout; smem.bytes is the dynamic size
};

// Windows per block: up to 64 token rows, fewer where the layout would exceed `target` bytes
// (room for only one block per multiprocessor); fails where one window needs over `limit`.
// elem: the element size of x (2: the tensor-core layout).
inline CgaLaunch plan_cga(const CgaDims& dims, int64_t elem, int64_t target, int64_t limit) {
  const int64_t ws = dims.window, C = dims.channels, kd = dims.key_dim, d = dims.value_dim;
  const int64_t nwy = ceil_div(dims.height, ws), nwx = ceil_div(dims.width, ws);
  const int64_t windows = dims.batch * nwy * nwx;
  const int64_t np = CgaPlan(ws, 1, C, kd, d, elem).np;
  int64_t wpb = std::max<int64_t>(1, std::min(64 / np, windows));
  while (wpb > 1 && CgaPlan(ws, wpb, C, kd, d, elem).bytes > target) --wpb;
  const CgaPlan plan(ws, wpb, C, kd, d, elem);
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
          residual,
          l.smem.mma && dims.value_dim % 8 == 0 && aligned16(params[0]),
          l.smem.mma && dims.channels % 8 == 0 && aligned16(params[5]),
          l.smem.mma && format == at::MemoryFormat::ChannelsLast && dims.channels % 8 == 0 &&
              aligned16(x) && aligned16(out)};
}

}  // namespace
}  // namespace gpu
}  // namespace efficientvit
