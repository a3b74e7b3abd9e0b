// Cascaded group attention on CPU (docs/design.md), one window at a time: the window's tokens and
// every per-head tensor (q, k, v, scores, head outputs) live in a per-thread scratch of a few
// tens of KiB, so nothing but x, the weights and the output touch memory.
#undef EFFICIENTVIT_ISA_FILE
#define EFFICIENTVIT_ISA_FILE "cpu/cga.cpp"
#include "cpu/foreach_isa.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "cpu/cpu_utils.h"
#include "cpu/packed_weights.h"

EFFICIENTVIT_ISA_BEGIN
namespace {

// Starts loading the cache lines of a rows x cols tile (unit row or column stride) into the
// caches, for reading or, with kWrite, for writing: the gathers and scatters of a window touch
// short runs spread over many lines, which the hardware prefetchers do not anticipate.
template <bool kWrite, typename T>
void prefetch_tile(int64_t rows, int64_t cols, Tile<T> t) {
  if (t.col_stride != 1) return prefetch_tile<kWrite>(cols, rows, t.transposed());
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t i = 0; i < rows; ++i) {
    const T* row = t.data + i * t.row_stride;
    for (int64_t j = 0; j < cols; j += kLine) __builtin_prefetch(row + j, kWrite, 3);
    __builtin_prefetch(row + cols - 1, kWrite, 3);  // the last line, when the run is unaligned
  }
}

// Strides of a 4-D (B, C, H, W) tensor, in elements.
struct Strides4 {
  int64_t b = 0, c = 0, h = 0, w = 0;
  Strides4() = default;
  explicit Strides4(const at::Tensor& t)
      : b(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

// e^x for x <= 0 (scores minus their maximum) or NaN, which it keeps. The float version is a
// branch-free Cephes-style polynomial, vectorized, within 1.5 ulp; below -87.34 (e^x < 2^-126,
// nothing next to the maximum's e^0 = 1) it gives 0. Double uses std::exp.
template <typename T>
inline typename Simd<T>::Vec exp_nonpositive(typename Simd<T>::Vec x) {
  using Vec = typename Simd<T>::Vec;
  if constexpr (std::is_same_v<T, float>) {
    typedef int32_t Int __attribute__((vector_size(kVecBytes)));
    const Vec lowest = Simd<T>::splat(-87.33654f);  // ln 2^-126: 2^-126 is the smallest normal
    const Vec clamped = x < lowest ? lowest : x;     // comparisons with NaN are false: NaN stays
    // n = round(x / ln 2): adding 1.5 * 2^23 leaves n in the low mantissa bits.
    const Vec magic = Simd<T>::splat(12582912.0f);
    const Vec shifted = clamped * 1.44269504088896341f + magic;
    const Vec n = shifted - magic;
    const Vec r = clamped - n * 0.693359375f - n * -2.12194440e-4f;  // ln 2 in two parts
    Vec p = Simd<T>::splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const Int exponent = ((Int)shifted - (Int)magic + 127) << 23;  // 2^n
    const Vec result = p * (Vec)exponent;
    return x < lowest ? Vec{} : result;
  } else {
    for (int64_t l = 0; l < Simd<T>::kLanes; ++l) x[l] = std::exp(x[l]);
    return x;
  }
}

// Softmax over the rows of s (keys x queries, row stride ld, ld a multiple of the vector
// width): each column is one query's distribution, so the loops run across queries, in whole
// vectors. A NaN score may be skipped by the maximum but not by exp, so it reaches the sum
// and every probability of its query.
template <typename T>
void softmax_columns(T* s, int64_t keys, int64_t ld) {
  using S = Simd<T>;
  for (int64_t j = 0; j < ld; j += S::kLanes) {
    T* col = s + j;
    auto max = S::load(col);
    for (int64_t m = 1; m < keys; ++m) {
      const auto v = S::load(col + m * ld);
      max = v > max ? v : max;
    }
    auto sum = S::splat(0);
    for (int64_t m = 0; m < keys; ++m) {
      const auto e = exp_nonpositive<T>(S::load(col + m * ld) - max);
      S::store(col + m * ld, e);
      sum += e;
    }
    const auto inv = S::splat(1) / sum;
    for (int64_t m = 0; m < keys; ++m) S::store(col + m * ld, S::load(col + m * ld) * inv);
  }
}

// Widths of a cga call padded to whole vectors of its dtype: the packed weights' shapes and the
// window loop's strides.
struct CgaLayout {
  int64_t N;    // tokens per window, ws * ws
  int64_t NP;   // N padded to whole vectors: row stride of q^T and of the scores
  int64_t kdP, dP, CP;  // kd, d and C padded to whole vectors
  int64_t ldq;      // row stride of a token's q | k | v (v padded to dP, whole vectors)
  int64_t cat_ld;   // heads * dP: the concatenated head outputs, head i at channel i * dP
  CgaLayout(const CgaDims& dims, at::ScalarType dtype)
      : N(dims.window * dims.window),
        NP(padded(N, dtype)),
        kdP(padded(dims.key_dim, dtype)),
        dP(padded(dims.value_dim, dtype)),
        CP(padded(dims.channels, dtype)),
        ldq(padded(2 * dims.key_dim + dP, dtype)),
        cat_ld(dims.heads * dP) {}
};

// The packed parameters (cga_pack), in this order. Every B operand has whole vectors per row,
// and the padding is zero. The weights are in gemm's panel-major layout (pack_panels): at batch 1
// they come from memory, and a panel is then one sequential stream (row-major, M0's, M4's and
// M5's batch-1 forwards took 2-3% longer cold).
enum CgaPacked {
  kQkvW,       // (h, d, ldq): each head's qkv 1x1 conv, transposed, panel-major per head
  kQkvB,       // (h, ldq)
  kQueryW,     // (h, K, K, kdP): the query conv, channels innermost, times scale
  kQueryB,     // (h, kdP), times scale
  kAttnBias,   // (h, N, NP): the bias of every (key, query) pair
  kProjW,      // (cat_ld, CP): the output 1x1 conv, transposed, each head's d inputs padded to
               // dP, panel-major
  kProjB,      // (CP)
  kRadius,     // (h) int64: each head's query kernel without its all-zero border rings
  kCgaPacked,  // count
};

// One cga call: sizes, padded widths (CgaLayout), layouts and the packed parameters, for the
// window loop.
template <typename T>
struct Cga : CgaLayout {
  int64_t C, H, W, heads, kd, d, K, ws;
  int64_t n_windows_y, n_windows_x;
  int64_t pad_w;  // tokens per row of the query conv's padded q: ws + 2R, + kGroup - 1
  bool residual;
  // The window's activations (x, the cascade's input, the head outputs) are token-major for
  // channels-last x and channel-major otherwise, so that gathering the window copies runs that
  // are contiguous on both sides, and no step before the projection transposes. The projection
  // is token-major in both (its weight, panel-major, is gemm's B operand): for channel-major x,
  // the result's scatter transposes it. Strides of a token and of a channel in each:
  bool token_major;
  int64_t xw_tok, xw_ch, feat_tok, feat_ch, cat_tok, cat_ch;
  const int64_t* radius;
  const T *qkv_w, *qkv_b, *q_w, *q_b, *attn_bias, *proj_w, *proj_b;
  const T* x;
  T* out;
  Strides4 xs, os;

  // Per-thread scratch, in elements: the window of x (N x C), the cascade's input of a head
  // (N x d), q | k | v of each token (N x ldq), q padded for its conv (ws x pad_w x kdP), q
  // transposed (kd x NP), the scores (keys x queries, N x NP), the head outputs (N x cat_ld or
  // cat_ld x NP) and the projection (N x CP). Each starts on a 64-byte boundary.
  static constexpr int kBuffers = 8;
  std::array<int64_t, kBuffers> scratch_sizes() const {
    return {N * C,        N * d,   N * ldq,     ws * pad_w * kdP,
            kd * NP,      N * NP,  cat_ld * NP, N * CP};
  }
  int64_t scratch_size() const {
    int64_t total = 0;
    for (const int64_t size : scratch_sizes()) total += padded<T>(size);
    return total;
  }
  std::array<T*, kBuffers> carve(T* scratch) const {
    std::array<T*, kBuffers> buffers;
    const auto sizes = scratch_sizes();
    for (int i = 0; i < kBuffers; ++i) buffers[i] = scratch, scratch += padded<T>(sizes[i]);
    return buffers;
  }
  // Window coordinates: batch, first row and column, and the rows and columns inside x.
  struct Place {
    int64_t b, y0, x0, rows, cols;
  };
  Place place(int64_t window) const {
    const int64_t y0 = (window / n_windows_x) % n_windows_y * ws, x0 = window % n_windows_x * ws;
    return {window / (n_windows_y * n_windows_x), y0, x0, std::min(ws, H - y0),
            std::min(ws, W - x0)};
  }
  // Window rows copied as one run: all of them where x and the output hold them back to back
  // (a window as wide as the map), else one.
  int64_t run_rows(const Place& p) const {
    return p.cols == ws && xs.h == ws * xs.w && os.h == ws * os.w ? p.rows : 1;
  }
  void run_window(int64_t window, int64_t next_window, T* scratch) const;
  void query_conv(int64_t head, const T* qkv, T* q_pad, T* q_t) const;
  static constexpr int kGroup = 4;  // tokens whose query conv sums are computed together
};

// q of one head: scale * (dwconv(q) + bias) on the ws x ws token grid with zero padding at the
// window edge (the scale is folded into q_w and q_b), written transposed (kd x NP) as the B
// operand of the scores. q is first copied into rows with R = K / 2 zero tokens on the left and
// at least that many on the right (q_pad, ws x pad_w tokens of kdP), so that the horizontal taps
// need no bounds checks; then kGroup neighbouring tokens of a row accumulate their taps at once,
// in registers, in vectors over channels (independent sums hide the FMA latency). Lanes past
// kd (k times zero weights) and tokens past the row end are computed and not stored.
template <typename T>
void Cga<T>::query_conv(int64_t head, const T* qkv, T* q_pad, T* q_t) const {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  const int64_t r = radius[head], R = K / 2;
  const T* w = q_w + head * K * K * kdP;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < kdP; c += S::kLanes)
      S::store(q_pad + ((n / ws) * pad_w + n % ws + R) * kdP + c, S::load(qkv + n * ldq + c));
  for (int64_t ty = 0; ty < ws; ++ty) {
    const int64_t dy0 = std::max(-r, -ty), dy1 = std::min(r, ws - 1 - ty);
    for (int64_t tx = 0; tx < ws; tx += kGroup) {
      for (int64_t c = 0; c < kd; c += S::kLanes) {
        Vec acc[kGroup];
        for (int g = 0; g < kGroup; ++g) acc[g] = S::load(q_b + head * kdP + c);
        for (int64_t dy = dy0; dy <= dy1; ++dy) {
          const T* q = q_pad + ((ty + dy) * pad_w + tx + R) * kdP + c;
          const T* tap = w + (dy + R) * K * kdP + c;
          for (int64_t dx = -r; dx <= r; ++dx) {
            const Vec wv = S::load(tap + (dx + R) * kdP);
            for (int g = 0; g < kGroup; ++g) acc[g] += wv * S::load(q + (dx + g) * kdP);
          }
        }
        T sums[kGroup][S::kLanes];  // transposed through memory: cheaper than lane extracts
        for (int g = 0; g < kGroup; ++g) S::store(sums[g], acc[g]);
        for (int64_t l = 0; l < std::min(S::kLanes, kd - c); ++l)
          for (int g = 0; g < kGroup && tx + g < ws; ++g)
            q_t[(c + l) * NP + ty * ws + tx + g] = sums[g][l];
      }
    }
  }
}

template <typename T>
void Cga<T>::run_window(int64_t window, int64_t next_window, T* scratch) const {
  const Place here = place(window);
  const auto [b, y0, x0, rows, cols] = here;
  const int64_t run = run_rows(here);
  const auto [xw, feat, qkv, q_pad, q_t, scores, cat, y] = carve(scratch);

  if (rows < ws || cols < ws) std::fill(xw, xw + N * C, T(0));
  const T* xb = x + b * xs.b + y0 * xs.h + x0 * xs.w;
  for (int64_t ty = 0; ty < rows; ty += run)
    copy_tile<T>(run * cols, C, {xb + ty * xs.h, xs.w, xs.c}, {},
                 {xw + ty * ws * xw_tok, xw_tok, xw_ch});
  // While this window computes, bring in the next window's x and this window's output.
  T* ob = out + b * os.b + y0 * os.h + x0 * os.w;
  for (int64_t ty = 0; ty < rows; ty += run)
    prefetch_tile<true>(run * cols, C, Tile<T>{ob + ty * os.h, os.w, os.c});
  if (next_window >= 0) {
    const Place next = place(next_window);
    const int64_t next_run = run_rows(next);
    const T* nb = x + next.b * xs.b + next.y0 * xs.h + next.x0 * xs.w;
    for (int64_t ty = 0; ty < next.rows; ty += next_run)
      prefetch_tile<false>(next_run * next.cols, C, Tile<const T>{nb + ty * xs.h, xs.w, xs.c});
  }

  for (int64_t i = 0; i < heads; ++i) {
    MatA<T> in{xw, xw_tok, xw_ch};  // head 0 reads its channels of x in place
    if (i > 0) {  // the cascade: the previous head's output plus this head's channels
      copy_tile<T>(N, d, {cat + (i - 1) * dP * cat_ch, cat_tok, cat_ch},
                   {xw + i * d * xw_ch, xw_tok, xw_ch}, {feat, feat_tok, feat_ch});
      in = {feat, feat_tok, feat_ch};
    }
    gemm<T>(N, ldq, d, in, qkv_w + i * d * ldq, kPanelMajor, {qkv_b + i * ldq, 0, 1}, qkv, ldq);
    query_conv(i, qkv, q_pad, q_t);
    // Scores transposed (keys x queries) = k q^T + bias: the softmax runs across queries in
    // whole vectors, and the probabilities are the B operand of a channel-major head output.
    gemm<T>(N, NP, kd, {qkv + kd, ldq, 1}, q_t, NP, {attn_bias + i * N * NP, NP, 1}, scores, NP);
    softmax_columns(scores, N, NP);
    const T* v = qkv + 2 * kd;
    if (token_major)  // out (N x dP) = probabilities (A, read transposed) v
      gemm<T>(N, dP, N, {scores, 1, NP}, v, ldq, {}, cat + i * dP, cat_ld);
    else              // out^T (dP x NP) = v^T (A, read transposed) probabilities^T
      gemm<T>(dP, NP, N, {v, 1, ldq}, scores, NP, {}, cat + i * dP * NP, NP);
  }

  for (int64_t j = 0; j < cat_ld * NP; ++j) cat[j] = relu(cat[j]);
  // y (N x CP) = relu(cat) proj_w^T + proj_b (cat read in its layout)
  gemm<T>(N, CP, cat_ld, {cat, cat_tok, cat_ch}, proj_w, kPanelMajor, {proj_b, 0, 1}, y, CP);

  // Valid tokens only, plus the residual.
  for (int64_t ty = 0; ty < rows; ty += run)
    copy_tile<T>(run * cols, C, {y + ty * ws * CP, CP, 1},
                 {residual ? xw + ty * ws * xw_tok : nullptr, xw_tok, xw_ch},
                 {ob + ty * os.h, os.w, os.c});
}

// Largest ring (Chebyshev distance from the centre) of each head's query kernel that holds a
// nonzero (or NaN) weight: a head with a smaller kernel is stored zero-padded to K x K, and
// its zero taps are skipped.
at::Tensor kernel_radii(const at::Tensor& dw_weight) {
  const at::Tensor nonzero = dw_weight.ne(0).any(1).cpu();  // (heads, K, K)
  const auto nz = nonzero.accessor<bool, 3>();
  const int64_t R = dw_weight.size(3) / 2;
  at::Tensor radius = at::zeros({dw_weight.size(0)}, at::kLong);
  auto r = radius.accessor<int64_t, 1>();
  for (int64_t i = 0; i < nonzero.size(0); ++i)
    for (int64_t ky = 0; ky < nonzero.size(1); ++ky)
      for (int64_t kx = 0; kx < nonzero.size(2); ++kx)
        if (nz[i][ky][kx]) r[i] = std::max({r[i], std::abs(ky - R), std::abs(kx - R)});
  return radius;
}

std::vector<at::Tensor> pack_cga(const CgaDims& dims, const at::Tensor& qkv_weight,
                                 const at::Tensor& qkv_bias, const at::Tensor& dw_weight,
                                 const at::Tensor& dw_bias, const at::Tensor& attention_bias,
                                 const at::Tensor& proj_weight, const at::Tensor& proj_bias,
                                 double scale) {
  const CgaLayout L(dims, qkv_weight.scalar_type());
  const int64_t h = dims.heads, kd = dims.key_dim, d = dims.value_dim, C = dims.channels;
  const int64_t ws = dims.window, nq = 2 * kd + d;
  std::vector<at::Tensor> packed(kCgaPacked);
  const at::Tensor qkv_t = at::constant_pad_nd(qkv_weight.transpose(1, 2), {0, L.ldq - nq});
  std::vector<at::Tensor> qkv_heads;
  for (int64_t i = 0; i < h; ++i) qkv_heads.push_back(pack_panels(qkv_t[i]));
  packed[kQkvW] = at::stack(qkv_heads);
  packed[kQkvB] = at::constant_pad_nd(qkv_bias, {0, L.ldq - nq}).contiguous();
  packed[kQueryW] =
      at::constant_pad_nd((dw_weight * scale).permute({0, 2, 3, 1}), {0, L.kdP - kd}).contiguous();
  packed[kQueryB] = at::constant_pad_nd(dw_bias * scale, {0, L.kdP - kd}).contiguous();
  // attention_bias[i, |dy|, |dx|] of every (key, query) pair.
  const at::Tensor t = at::arange(ws, qkv_weight.options().dtype(at::kLong));
  const at::Tensor ty = t.repeat_interleave(ws), tx = t.repeat({ws});
  const at::Tensor index = (ty.unsqueeze(1) - ty.unsqueeze(0)).abs() * ws +
                           (tx.unsqueeze(1) - tx.unsqueeze(0)).abs();
  packed[kAttnBias] = at::constant_pad_nd(
      attention_bias.reshape({h, L.N}).index_select(1, index.flatten()).view({h, L.N, L.N}),
      {0, L.NP - L.N}).contiguous();
  // proj_weight (C, h*d) -> (h, d, C) -> padded (h, dP, CP) -> (cat_ld, CP).
  const at::Tensor proj_heads = proj_weight.reshape({C, h, d}).permute({1, 2, 0});
  packed[kProjW] = pack_panels(
      at::constant_pad_nd(proj_heads, {0, L.CP - C, 0, L.dP - d}).reshape({L.cat_ld, L.CP}));
  packed[kProjB] = at::constant_pad_nd(proj_bias, {0, L.CP - C}).contiguous();
  packed[kRadius] = kernel_radii(dw_weight);
  return packed;
}

template <typename T>
void cga_windows(const CgaDims& dims, const DenseIO& io, at::TensorList packed, bool residual) {
  Cga<T> k{CgaLayout(dims, io.input.scalar_type())};
  k.C = dims.channels, k.H = dims.height, k.W = dims.width, k.heads = dims.heads;
  k.kd = dims.key_dim, k.d = dims.value_dim, k.K = dims.kernel, k.ws = dims.window;
  k.n_windows_y = (k.H + k.ws - 1) / k.ws, k.n_windows_x = (k.W + k.ws - 1) / k.ws;
  k.pad_w = k.ws + 2 * (k.K / 2) + Cga<T>::kGroup - 1;
  k.residual = residual;

  k.x = io.input.data_ptr<T>(), k.out = io.output.data_ptr<T>();
  k.xs = Strides4(io.input), k.os = Strides4(io.output);
  k.token_major = io.channels_last;
  const int64_t C = k.C, d = k.d, N = k.N;
  if (k.token_major) {
    k.xw_tok = C, k.xw_ch = 1, k.feat_tok = d, k.feat_ch = 1;
    k.cat_tok = k.cat_ld, k.cat_ch = 1;
  } else {
    k.xw_tok = 1, k.xw_ch = N, k.feat_tok = 1, k.feat_ch = N;
    k.cat_tok = 1, k.cat_ch = k.NP;
  }
  k.qkv_w = packed[kQkvW].data_ptr<T>(), k.qkv_b = packed[kQkvB].data_ptr<T>();
  k.q_w = packed[kQueryW].data_ptr<T>(), k.q_b = packed[kQueryB].data_ptr<T>();
  k.attn_bias = packed[kAttnBias].data_ptr<T>();
  k.proj_w = packed[kProjW].data_ptr<T>(), k.proj_b = packed[kProjB].data_ptr<T>();
  k.radius = packed[kRadius].data_ptr<int64_t>();

  const int64_t windows = dims.batch * k.n_windows_y * k.n_windows_x;
  at::parallel_for(0, windows, 1, [&](int64_t begin, int64_t end) {
    // 64-byte aligned; zeroed: the padding of q and of q^T stays zero.
    const at::Tensor scratch = at::zeros({k.scratch_size()}, io.input.options());
    for (int64_t w = begin; w < end; ++w)
      k.run_window(w, w + 1 < end ? w + 1 : -1, scratch.data_ptr<T>());
  });
}

void run_cga(const CgaDims& dims, const DenseIO& io, at::TensorList packed, bool residual) {
  if (io.output.numel() == 0) return;
  AT_DISPATCH_FLOATING_TYPES(io.input.scalar_type(), "efficientvit::cga", [&] {
    cga_windows<scalar_t>(dims, io, packed, residual);
  });
}

// The sizes a packing fixes, in PackedWeights::sizes.
enum CgaSize { kHeads, kKeyDim, kValueDim, kKernel, kWindow, kCgaSizes };

// The entry points: the op on packed weights, the packing (after the anonymous namespace), its
// cached form (X_pack's), and the op, which packs once per set of weights and runs.

at::Tensor cga_packed_cpu(const at::Tensor& x, const PackedWeights& weights, bool residual) {
  const std::vector<int64_t>& s = weights.sizes;
  CgaDims dims{};
  dims.batch = x.size(0), dims.channels = x.size(1), dims.height = x.size(2);
  dims.width = x.size(3), dims.heads = s[kHeads], dims.key_dim = s[kKeyDim];
  dims.value_dim = s[kValueDim], dims.kernel = s[kKernel], dims.window = s[kWindow];
  const DenseIO io = dense_input_and_output(x);
  run_cga(dims, io, weights.tensors, residual);
  return io.output;
}

}  // namespace

Packed cga_pack_cpu(const at::Tensor& qkv_weight, const at::Tensor& qkv_bias,
                    const at::Tensor& dw_weight, const at::Tensor& dw_bias,
                    const at::Tensor& attention_bias, const at::Tensor& proj_weight,
                    const at::Tensor& proj_bias, int64_t window_size, double scale) {
  TORCH_CHECK_VALUE(at::isFloatingType(qkv_weight.scalar_type()),
                    "efficientvit: qkv_weight must be a floating-point tensor, got ",
                    qkv_weight.scalar_type());
  // C = heads * d, from qkv_weight (h, 2kd+d, d); its rank is checked with the rest.
  const int64_t channels = qkv_weight.dim() == 3 ? qkv_weight.size(0) * qkv_weight.size(2) : 0;
  const CgaDims dims =
      check_cga_params(channels, {qkv_weight, "qkv_weight"}, qkv_weight, qkv_bias, dw_weight,
                       dw_bias, attention_bias, proj_weight, proj_bias, window_size);
  std::vector<int64_t> sizes(kCgaSizes);
  sizes[kHeads] = dims.heads, sizes[kKeyDim] = dims.key_dim, sizes[kValueDim] = dims.value_dim;
  sizes[kKernel] = dims.kernel, sizes[kWindow] = dims.window;
  return c10::make_intrusive<PackedWeights>(
      "cga", &cga_packed_cpu,
      pack_cga(dims, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight,
               proj_bias, scale),
      std::move(sizes), channels, qkv_weight.scalar_type());
}

Packed cga_cached_pack_cpu(const at::Tensor& qkv_weight, const at::Tensor& qkv_bias,
                           const at::Tensor& dw_weight, const at::Tensor& dw_bias,
                           const at::Tensor& attention_bias, const at::Tensor& proj_weight,
                           const at::Tensor& proj_bias, int64_t window_size, double scale) {
  return cached_packing(
      "cga", {qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight, proj_bias},
      {static_cast<double>(window_size), scale}, [&] {
        return cga_pack_cpu(qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias,
                            proj_weight, proj_bias, window_size, scale);
      });
}

at::Tensor cga_cpu(const at::Tensor& x, const at::Tensor& qkv_weight, const at::Tensor& qkv_bias,
                   const at::Tensor& dw_weight, const at::Tensor& dw_bias,
                   const at::Tensor& attention_bias, const at::Tensor& proj_weight,
                   const at::Tensor& proj_bias, int64_t window_size, double scale, bool residual) {
  check_cga(x, qkv_weight, qkv_bias, dw_weight, dw_bias, attention_bias, proj_weight, proj_bias,
            window_size);
  const Packed packed = cga_cached_pack_cpu(qkv_weight, qkv_bias, dw_weight, dw_bias,
                                            attention_bias, proj_weight, proj_bias, window_size,
                                            scale);
  return cga_packed_cpu(x, *packed, residual);
}

EFFICIENTVIT_ISA_END

#if EFFICIENTVIT_ISA_LAST_PASS
TORCH_LIBRARY_IMPL(efficientvit, CPU, m) { m.impl("cga", EFFICIENTVIT_SELECT_ISA(cga_cpu)); }
#endif
