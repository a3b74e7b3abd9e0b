// Building blocks shared by the CPU kernels: SIMD vectors, a small register-blocked GEMM,
// strided tile copies and the input/output layout handling. Included once per
// instruction-set pass of a kernel file (cpu/foreach_isa.h), so no include guard: its code is
// the pass's.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>

#include "checks.h"
#include "cpu/isa.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

EFFICIENTVIT_ISA_BEGIN

// One SIMD register of T, as a GCC/Clang vector type, so the same code compiles to AVX-512,
// AVX2, SSE or NEON: the pass's level, or in the baseline pass the build's flags.
#if defined(EFFICIENTVIT_ISA_VEC_BYTES)
constexpr int kVecBytes = EFFICIENTVIT_ISA_VEC_BYTES;
#elif defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct Simd {
  typedef T Vec __attribute__((vector_size(kVecBytes)));
  // The same, at T's alignment, for unaligned loads and stores. (A vector type may alias its
  // element type and nothing else; a memcpy would also alias the caller's integers and force
  // them to be reloaded after every store.)
  typedef T UnalignedVec __attribute__((vector_size(kVecBytes), aligned(alignof(T))));
  static constexpr int64_t kLanes = kVecBytes / sizeof(T);

  static inline Vec load(const T* p) { return *reinterpret_cast<const UnalignedVec*>(p); }
  static inline void store(T* p, Vec v) { *reinterpret_cast<UnalignedVec*>(p) = v; }
  static inline Vec splat(T s) { return s - Vec{}; }  // one broadcast (s - 0 folds to s)
};

inline int64_t round_up(int64_t n, int64_t multiple) {
  return (n + multiple - 1) / multiple * multiple;
}

// Padded widths: every matrix a GEMM writes, or reads as its B operand, has whole vectors per row.
template <typename T>
inline int64_t padded(int64_t n) {
  return round_up(n, Simd<T>::kLanes);
}

// padded<T> for a dtype known at run time.
inline int64_t padded(int64_t n, at::ScalarType dtype) {
  return round_up(n, kVecBytes / static_cast<int64_t>(c10::elementSize(dtype)));
}

// ReLU of a value or a vector that keeps NaN (std::max(0, NaN) would return 0).
template <typename V>
inline V relu(V v) {
  return v < 0 ? V{} : v;
}

// ---------------------------------------------------------------------------------------------
// GEMM: C (m x n) = [relu](A (m x k) * B (k x n) + init). A is read one element at a time
// (broadcast), so it may have any strides (a transposed or channel-strided tile needs no copy);
// C is row-major with unit column stride and n a multiple of the vector width (callers pad).
// B is row-major with row stride ldb, or, with ldb = kPanelMajor, laid out by pack_panels: the
// block loop walks B one column panel at a time, and a weight packed that way is read as one
// sequential stream per panel, which the prefetcher follows from memory (a row-major weight's
// panel is k short runs, one per row, and costs 5-15% more when it is not in cache). While a
// panel of kPrefetchMinRowBlocks row blocks or more computes, the next panel of a panel-major B
// (after the last, `then`: what the caller reads next) is brought into cache (see Prefetch).
// init has a column stride of 1 (a matrix; init = C accumulates) or 0 (each row one value,
// broadcast: a bias per row), and a row stride of 0 for a bias per column; init.data null: zero.
// residual, if given (data not null, unit column stride), is added to the finished result (after
// the ReLU): C = [relu](A * B + init) + residual, rounded as a separate addition would be.
// The tiles here are small (tens to hundreds), where BLAS call overhead dominates, and libtorch
// does not export the cpublas::gemm overloads for float and double.

// A matrix (or tile) with element (i, j) at data[i * row_stride + j * col_stride].
template <typename T>
struct Tile {
  T* data;
  int64_t row_stride, col_stride;
  Tile<T> transposed() const { return {data, col_stride, row_stride}; }
};
template <typename T>
using MatA = Tile<const T>;

// Bytes a GEMM brings into cache while it computes: with a cold cache (every weight, at batch 1)
// the weights arrive at the core's memory bandwidth only if they are asked for ahead of their
// use (the hardware prefetchers stop at every 4 KiB page).
struct PrefetchRange {
  const void* data = nullptr;
  int64_t bytes = 0;
};

namespace detail {

// Accumulators: 6 rows x 4 vectors take 24 of the 32 AVX-512 registers, 6 x 2 12 of the 16
// AVX2 or SSE ones.
constexpr int kRowBlock = 6;
constexpr int kVecBlock = kVecBytes == 64 ? 4 : 2;

// The fewest row blocks (of a panel) for which gemm prefetches the next panel. With fewer, the
// panel's first block, a third or more of its time, streams it from memory anyway, and the
// prefetches slowed that down (measured, on weights in 2 MiB pages: a chain of FFNs at 16 tokens,
// 3 blocks, ran 13% faster without them, M0, M2, M4 and M5 at batch 1 1.5-3.5%; at 49 tokens,
// 9 blocks, they saved 5%).
constexpr int64_t kPrefetchMinRowBlocks = 4;

// A PrefetchRange asked for over a panel's steps (its blocks' k steps each), the same number of
// lines at each step, so that the last goes before the panel's last step. Spread over the panel
// rather than asked for in its first block (as long as the next one arrives from memory), it
// took 2-8% off M0's and M4's batch-1 forwards; into L1 (and L2) rather than only L2, 2-3% more.
struct Prefetch {
  const char* next;
  const char* end;
  int64_t lines_per_step;

  Prefetch(PrefetchRange range, int64_t panel_steps)
      : next(static_cast<const char*>(range.data)),
        end(next ? next + range.bytes : nullptr),
        lines_per_step(((range.bytes + 63) / 64 + panel_steps - 1) /
                       std::max<int64_t>(1, panel_steps)) {}
};

// `blocks` blocks of MR rows x NV vectors, one below the other: one call covers a whole column
// panel, so the per-call cost (arguments, spills) is paid per panel rather than per block.
template <typename T, int MR, int NV>
void gemm_blocks(int64_t blocks, int64_t k, MatA<T> a, const T* b, int64_t ldb, MatA<T> init,
                 MatA<T> residual, T* c, int64_t ldc, bool apply_relu, Prefetch& prefetch) {
  using S = Simd<T>;
  using Vec = typename S::Vec;
  // in locals, so that the k loop keeps them in registers
  const char* next = prefetch.next;
  const char* const end = prefetch.end;
  const int64_t lines_per_step = prefetch.lines_per_step;
  for (int64_t block = 0; block < blocks; ++block) {
    // The accumulators stay in registers only if the loops that set and finish them are
    // unrolled too: otherwise GCC keeps the array on the stack and copies it in and out around
    // the k loop, at every block (1.5-6% of a GEMM's time at k = 128-1024).
    Vec acc[MR][NV];
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v)
        acc[r][v] = !init.data        ? Vec{}
                    : init.col_stride ? S::load(init.data + r * init.row_stride + v * S::kLanes)
                                      : S::splat(init.data[r * init.row_stride]);
    for (int64_t p = 0; p < k; ++p) {
      if (next < end) {
        for (int64_t line = 0; line < lines_per_step; ++line)
          __builtin_prefetch(next + line * 64, 0, 3);
        next += lines_per_step * 64;
      }
      Vec bv[NV];
      for (int v = 0; v < NV; ++v) bv[v] = S::load(b + p * ldb + v * S::kLanes);
      const T* ap = a.data + p * a.col_stride;
      for (int r = 0; r < MR; ++r) {
        const Vec av = S::splat(ap[r * a.row_stride]);
        for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
      }
    }
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) {
        Vec y = apply_relu ? relu(acc[r][v]) : acc[r][v];
        if (residual.data) y += S::load(residual.data + r * residual.row_stride + v * S::kLanes);
        S::store(c + r * ldc + v * S::kLanes, y);
      }
    a.data += MR * a.row_stride, c += MR * ldc;
    if (init.data) init.data += MR * init.row_stride;
    if (residual.data) residual.data += MR * residual.row_stride;
  }
  prefetch.next = next;
}

template <typename T>
using GemmBlocksFn = void (*)(int64_t, int64_t, MatA<T>, const T*, int64_t, MatA<T>, MatA<T>, T*,
                              int64_t, bool, Prefetch&);

// table[(mr - 1) * kVecBlock + nv - 1] = gemm_blocks<T, mr, nv>, for the edges of any m and n.
template <typename T, size_t... I>
constexpr std::array<GemmBlocksFn<T>, sizeof...(I)> gemm_blocks_table(std::index_sequence<I...>) {
  return {&gemm_blocks<T, int(I / kVecBlock) + 1, int(I % kVecBlock) + 1>...};
}

}  // namespace detail

constexpr int64_t kPanelMajor = 0;  // gemm's ldb for a B laid out by pack_panels

// The width of gemm's column panels: the columns one block of accumulators covers.
template <typename T>
constexpr int64_t kPanelWidth = detail::kVecBlock * Simd<T>::kLanes;

// The first column panel of a (k x n) panel-major weight: where a GEMM on it starts reading.
template <typename T>
PrefetchRange first_panel(const T* w, int64_t k, int64_t n) {
  return {w, k * std::min(n, kPanelWidth<T>) * int64_t(sizeof(T))};
}

template <typename T>
void gemm(int64_t m, int64_t n, int64_t k, MatA<T> a, const T* b, int64_t ldb, MatA<T> init, T* c,
          int64_t ldc, bool apply_relu = false, MatA<T> residual = {}, PrefetchRange then = {}) {
  using namespace detail;
  static constexpr auto table =
      gemm_blocks_table<T>(std::make_index_sequence<kRowBlock * kVecBlock>{});
  constexpr int64_t L = Simd<T>::kLanes;
  const int64_t full = m / kRowBlock, rest = m % kRowBlock;
  for (int64_t j = 0; j < n; j += kPanelWidth<T>) {
    const int64_t nv = std::min<int64_t>(kVecBlock, (n - j) / L);
    // Panel j of a panel-major B: k rows of nv vectors, after the k x j elements of those before.
    const T* b_j = ldb == kPanelMajor ? b + j * k : b + j;
    const int64_t ldb_j = ldb == kPanelMajor ? nv * L : ldb;
    const MatA<T> init_j{init.data ? init.data + j * init.col_stride : nullptr, init.row_stride,
                         init.col_stride};
    const MatA<T> residual_j{residual.data ? residual.data + j : nullptr, residual.row_stride, 1};
    // the next panel of a panel-major B starts where this one ends
    const int64_t next_j = j + kPanelWidth<T>;
    const int64_t row_blocks = full + (rest > 0);
    Prefetch prefetch(row_blocks < kPrefetchMinRowBlocks ? PrefetchRange{}
                      : next_j >= n                      ? then
                      : ldb == kPanelMajor ? first_panel(b_j + k * nv * L, k, n - next_j)
                                           : PrefetchRange{},
                      row_blocks * k);
    if (full > 0)
      table[(kRowBlock - 1) * kVecBlock + nv - 1](full, k, a, b_j, ldb_j, init_j, residual_j,
                                                  c + j, ldc, apply_relu, prefetch);
    if (rest > 0) {
      const int64_t i = full * kRowBlock;
      table[(rest - 1) * kVecBlock + nv - 1](
          1, k, {a.data + i * a.row_stride, a.row_stride, a.col_stride}, b_j, ldb_j,
          {init_j.data ? init_j.data + i * init.row_stride : nullptr, init.row_stride,
           init.col_stride},
          {residual_j.data ? residual_j.data + i * residual.row_stride : nullptr,
           residual.row_stride, 1},
          c + i * ldc + j, ldc, apply_relu, prefetch);
    }
  }
}

// Asks for the n elements from p to be brought into the cache ahead of their use.
template <typename T>
inline void prefetch(const T* p, int64_t n) {
  const char* bytes = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < n * int64_t(sizeof(T)); i += 64) __builtin_prefetch(bytes + i);
}

// ---------------------------------------------------------------------------------------------
// Tiles and layouts.

namespace detail {

// d[0, kLen) = s [+ a], as one vector of kLen elements.
template <int kLen, typename T>
inline void copy_chunk(T* __restrict__ d, const T* __restrict__ s, const T* __restrict__ a) {
  typedef T Chunk __attribute__((vector_size(kLen * sizeof(T))));
  Chunk v, w;
  std::memcpy(&v, s, sizeof(Chunk));
  if (a) {
    std::memcpy(&w, a, sizeof(Chunk));
    v += w;
  }
  std::memcpy(d, &v, sizeof(Chunk));
}

// The last n < 2 * kLen elements of a unit-stride run, in chunks of kLen, kLen / 2, ..., 1.
template <int kLen, typename T>
inline void copy_tail(int64_t n, T* __restrict__ d, const T* __restrict__ s,
                      const T* __restrict__ a) {
  if constexpr (kLen == 1) {
    if (n & 1) *d = a ? *s + *a : *s;
  } else {
    if (n & kLen) {
      copy_chunk<kLen>(d, s, a);
      d += kLen, s += kLen, a = a ? a + kLen : nullptr;
    }
    copy_tail<kLen / 2>(n, d, s, a);
  }
}

// d[j] = s[j * ss] [+ a[j * as]] for j < n. The runs are often short (a window row of 7), so the
// unit-stride case runs in whole vectors and then a few smaller ones: a plain copy loop would
// become a memmove call, which costs more than the copy at these lengths.
template <typename T>
inline void copy_row(int64_t n, const T* __restrict__ s, int64_t ss, const T* __restrict__ a,
                     int64_t as, T* __restrict__ d) {
  using S = Simd<T>;
  if (ss == 1 && (a == nullptr || as == 1)) {
    int64_t j = 0;
    for (; j + S::kLanes <= n; j += S::kLanes)
      S::store(d + j, a ? S::load(s + j) + S::load(a + j) : S::load(s + j));
    copy_tail<S::kLanes / 2>(n - j, d + j, s + j, a ? a + j : nullptr);
  } else {
    for (int64_t j = 0; j < n; ++j) d[j] = a ? s[j * ss] + a[j * as] : s[j * ss];
  }
}

}  // namespace detail

// dst = src [+ add] on a rows x cols tile (add.data may be null); dst has a unit row or column
// stride. The inner loop runs along it, so the memory side of a gather or scatter is sequential.
template <typename T>
void copy_tile(int64_t rows, int64_t cols, Tile<const T> src, Tile<const T> add, Tile<T> dst) {
  if (dst.col_stride != 1 && dst.row_stride == 1)
    return copy_tile(cols, rows, src.transposed(), add.transposed(), dst.transposed());
  TORCH_INTERNAL_ASSERT_DEBUG_ONLY(dst.col_stride == 1);
  for (int64_t i = 0; i < rows; ++i)
    detail::copy_row(cols, src.data + i * src.row_stride, src.col_stride,
                     add.data ? add.data + i * add.row_stride : nullptr, add.col_stride,
                     dst.data + i * dst.row_stride);
}

// ---------------------------------------------------------------------------------------------
// Tokens per tile of the per-pixel ops: a whole number of the GEMM's 6-row blocks (a 64-token
// tile's last block of 4 rows cost ~3%).
constexpr int64_t kTileTokens = 96;

// Whether for_each_token_tile has compute write its rows straight into out (rather than into a
// tile buffer copied to out): channels-last, and Co a whole number of vectors (CoP).
inline bool tiles_go_straight_to_out(bool channels_last, int64_t Co, int64_t CoP) {
  return channels_last && Co == CoP;
}

// The loop of the per-pixel (1x1) ops: x (B, C, H, W) in tiles of kTileTokens tokens.
// compute(x_tile, n, y, scratch, add) gets a tile as n rows of C channels (x_tile: in place for
// channels-last x, where the tokens of all images are one run of rows; gathered from each image
// the tile spans for channel-major x) and writes n rows of Co values, row stride CoP, to y; they
// are written to out (Co channels, x's layout; plus x's tile when residual, Co == C), or, where
// they can be (channels-last, Co == CoP), straight into out. There, with residual, add is
// x_tile, which compute adds to its rows itself; otherwise add is null. scratch:
// scratch_per_tile elements per thread, uninitialized.
template <typename T, typename Compute>
void for_each_token_tile(const at::Tensor& x, bool channels_last, const at::Tensor& out,
                         int64_t CoP, int64_t scratch_per_tile, bool residual, Compute&& compute) {
  constexpr int64_t tile = kTileTokens;
  const int64_t B = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3), Co = out.size(1);
  const int64_t tokens = B * HW;
  const T* xp = x.data_ptr<T>();
  T* outp = out.data_ptr<T>();
  at::parallel_for(0, (tokens + tile - 1) / tile, 1, [&](int64_t begin, int64_t end) {
    const at::Tensor buffer =
        at::empty({tile * CoP + (channels_last ? 0 : tile * C) + scratch_per_tile}, x.options());
    T* y = buffer.data_ptr<T>();                 // n x CoP
    T* scratch = y + tile * CoP;
    T* x_gathered = scratch + scratch_per_tile;  // n x C, for channel-major x
    for (int64_t t = begin; t < end; ++t) {
      const int64_t t0 = t * tile, n = std::min(tile, tokens - t0);
      // The tile's part in each image: f(image * HW, its first token in the image, its first
      // row in the tile, its length).
      const auto for_each_image_part = [&](auto&& f) {
        for (int64_t s = t0; s < t0 + n;) {
          const int64_t len = std::min(HW - s % HW, t0 + n - s);
          f(s / HW * HW, s % HW, s - t0, len);
          s += len;
        }
      };
      const T* x_tile = xp + t0 * C;
      if (!channels_last) {
        for_each_image_part([&](int64_t image, int64_t token, int64_t row, int64_t len) {
          copy_tile<T>(len, C, {xp + image * C + token, 1, HW}, {}, {x_gathered + row * C, C, 1});
        });
        x_tile = x_gathered;
      }
      const bool straight_to_out = tiles_go_straight_to_out(channels_last, Co, CoP);
      compute(x_tile, n, straight_to_out ? outp + t0 * Co : y, scratch,
              straight_to_out && residual ? x_tile : nullptr);
      if (straight_to_out) continue;
      if (channels_last) {
        copy_tile<T>(n, Co, {y, CoP, 1}, {residual ? x_tile : nullptr, C, 1},
                     {outp + t0 * Co, Co, 1});
      } else {
        for_each_image_part([&](int64_t image, int64_t token, int64_t row, int64_t len) {
          copy_tile<T>(len, Co, {y + row * CoP, CoP, 1},
                       {residual ? xp + image * C + token : nullptr, 1, HW},
                       {outp + image * Co + token, 1, HW});
        });
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Packing and layouts.

// w (k x n, n a multiple of the vector width) laid out for gemm's ldb = kPanelMajor: its column
// panels of kPanelWidth (the last may be narrower), each k x width and row-major, one after the
// other. The shape stays w's.
inline at::Tensor pack_panels(const at::Tensor& w) {
  const int64_t width = detail::kVecBlock * kVecBytes / static_cast<int64_t>(w.element_size());
  std::vector<at::Tensor> panels;
  for (int64_t j = 0; j < w.size(1); j += width)
    panels.push_back(w.narrow(1, j, std::min(width, w.size(1) - j)).flatten());
  return panels.empty() ? w.contiguous() : at::cat(panels).view(w.sizes());  // n = 0: nothing
}

// x dense in output_memory_format(x) (checks.h), and an uninitialized output of the same shape
// and format (with out_channels channels, if given).
struct DenseIO {
  at::Tensor input, output;
  bool channels_last;
};
inline DenseIO dense_input_and_output(const at::Tensor& x, int64_t out_channels = -1) {
  const auto format = output_memory_format(x);
  std::vector<int64_t> shape = x.sizes().vec();
  if (out_channels >= 0) shape[1] = out_channels;
  return {x.contiguous(format), at::empty(shape, x.options().memory_format(format)),
          format == at::MemoryFormat::ChannelsLast};
}

EFFICIENTVIT_ISA_END
