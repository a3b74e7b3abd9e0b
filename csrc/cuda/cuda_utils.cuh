// Pieces shared by the CUDA kernels: dtype dispatch, memory formats, shared-memory limits,
// 16-byte global accesses, asynchronous copies into shared memory (cp.async), and the
// block-wide matrix products the fused kernels are built from: fp32 on FMAs (block_gemm),
// fp16/bf16 on tensor cores from shared memory (ldmatrix + mma.sync, mma_smem).
//
// Only c10/ATen core headers are included (not ATen/cuda/CUDAContext.h, which pulls in
// cuBLAS and cuSPARSE headers): that keeps compile times down and lets the sources compile
// with a bare CUDA toolkit (tests/test_cuda_compile.py).
//
// The kernel headers (cga.cuh, dwconv.cuh, ffn.cuh) also compile as host C++ with
// EFFICIENTVIT_EMULATION defined: tests/emulation/emulation.h then stands in for the CUDA
// built-ins, global memory is reached through bounds-checked pointers (global_ptr), and
// mma.sync, ldmatrix and cp.async through C++ implementations, so tests run the same kernel
// code on CPU (tests/test_cuda_emul.py).
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "checks.h"

#ifdef EFFICIENTVIT_EMULATION
#include "emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include <cstdint>
#include <type_traits>

namespace efficientvit {
namespace gpu {

// Threads per block of the tiled kernels: 8 warps share each block-wide matrix product.
constexpr int kThreads = 256;
// Shared memory a block may use before the planners trade tile size for occupancy: two
// blocks of this size fit one H100/A100 multiprocessor (228 / 164 KB).
constexpr int64_t kSmemTarget = 80 * 1024;

// fp32, fp16 and bf16; the kernels accumulate in fp32, which would be too coarse for fp64.
#define EFFICIENTVIT_DISPATCH(TYPE, NAME, ...)                      \
  AT_DISPATCH_SWITCH(TYPE, NAME,                                    \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)      \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)       \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

inline void check_cuda_dtype(const at::Tensor& x) {
  const auto t = x.scalar_type();
  TORCH_CHECK(t == at::kFloat || t == at::kHalf || t == at::kBFloat16,
              "efficientvit: the CUDA kernels take float32, float16 or bfloat16 tensors, got ", t);
}

// Element strides of a (B, C, H, W) tensor in `format`, dense.
struct Strides {
  int64_t b, c, h, w;
};

inline Strides strides_of(const at::Tensor& x, at::MemoryFormat format) {
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  if (format == at::MemoryFormat::ChannelsLast) return {H * W * C, 1, W * C, C};
  return {C * H * W, H * W, W, 1};
}

// A kernel's pointer to global memory: plain in the CUDA build, bounds-checked against the
// tensor it was made from in the emulation. in_ptr / out_ptr make one from a dense tensor.
#ifdef EFFICIENTVIT_EMULATION
template <class T>
using global_ptr = emulation::Checked<T>;

template <class T>
global_ptr<const T> in_ptr(const at::Tensor& t, const char* name) {
  return emulation::Checked<const T>(t.const_data_ptr<T>(), t.numel(), name);
}

template <class T>
global_ptr<T> out_ptr(at::Tensor& t, const char* name) {
  return emulation::Checked<T>(t.mutable_data_ptr<T>(), t.numel(), name);
}
#else
template <class T>
using global_ptr = T*;

template <class T>
const T* in_ptr(const at::Tensor& t, const char*) {
  return t.const_data_ptr<T>();
}

template <class T>
T* out_ptr(at::Tensor& t, const char*) {
  return t.mutable_data_ptr<T>();
}
#endif

// The CUDA runtime calls of the launchers (csrc/cuda/*.cu), absent from the emulation.
#ifndef EFFICIENTVIT_EMULATION
// Largest dynamic shared memory one block of the current device may use.
inline int64_t smem_limit() {
  int device = 0, limit = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limit;
}

// Lets `kernel` take `bytes` of dynamic shared memory: beyond the default 48 KB the attribute
// must be raised. It is no stream operation, so doing it per launch is cheap and leaves CUDA
// graph capture alone (torch's flash-attention launches do the same).
template <class Kernel>
void allow_smem(Kernel* kernel, int64_t bytes) {
  if (bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
  }
}
#endif

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// V consecutive elements of T, 16 bytes where V = kVec16<T>: what one thread moves in one
// 128-bit global access (LDG.E.128 / STG.E.128). V = 1 is a plain scalar access.
template <class T>
constexpr int kVec16 = 16 / sizeof(T);

template <class T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// The pack at p, which must be aligned to its size (the emulation checks it).
template <class T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(global_ptr<const T> p) {
  Pack<T, V> r;
#ifdef EFFICIENTVIT_EMULATION
  if (const T* s = p.span(V)) std::copy(s, s + V, r.v);
#else
  r = *reinterpret_cast<const Pack<T, V>*>(p);
#endif
  return r;
}

template <class T, int V>
__device__ __forceinline__ void store_pack(global_ptr<T> p, const Pack<T, V>& r) {
#ifdef EFFICIENTVIT_EMULATION
  if (T* s = p.span(V)) std::copy(r.v, r.v + V, s);
#else
  *reinterpret_cast<Pack<T, V>*>(p) = r;
#endif
}

// Whether a tensor's data can be read in 16-byte packs along its last, contiguous, dimension.
inline bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
}

// Row length, in elements, of a matrix in shared memory: padded to 4 mod 32, so that
// successive rows start on different banks.
__host__ __device__ inline int64_t padded(int64_t n) { return n + (36 - n % 32) % 32; }

__host__ __device__ inline int64_t align16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

__device__ __forceinline__ unsigned char* dynamic_smem() {
#ifdef EFFICIENTVIT_EMULATION
  return emulation::dynamic_smem();
#else
  extern __shared__ __align__(16) unsigned char smem[];
  return smem;
#endif
}

template <class T>
__device__ __forceinline__ float to_float(T v) {
  return static_cast<float>(v);
}

// ReLU that keeps NaN (fmaxf(NaN, 0) would return 0).
__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Tensor-core operations for 16-bit inputs: mma.sync m16n8k16, fp32 accumulators (sm_80+).
template <class T>
struct Mma;

template <>
struct Mma<c10::Half> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#ifdef EFFICIENTVIT_EMULATION
    emulation::mma_m16n8k16<c10::Half>(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

template <>
struct Mma<c10::BFloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
#ifdef EFFICIENTVIT_EMULATION
    emulation::mma_m16n8k16<c10::BFloat16>(d, a, b);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

// Shared-memory address of a generic pointer into shared memory, as PTX's .shared operands take.
__device__ __forceinline__ uint32_t smem_address(const void* p) {
#ifdef EFFICIENTVIT_EMULATION
  return 0;  // unused: the emulated instructions take the pointer
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// Starts an asynchronous 16-byte copy from global to shared memory (cp.async.cg: through L2
// only, not L1). It lands by the cp_async_wait that covers its group: cp_async_commit closes
// the thread's group of copies, and the barrier after the wait makes them visible to the block.
template <class T>
__device__ __forceinline__ void cp_async16(T* dst, global_ptr<const T> src) {
#ifdef EFFICIENTVIT_EMULATION
  if (const T* s = src.span(kVec16<T>)) emulation::cp_async(dst, s);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_address(dst)), "l"(src));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef EFFICIENTVIT_EMULATION
  emulation::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most `pending` of the thread's newest committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
#ifdef EFFICIENTVIT_EMULATION
  emulation::cp_async_wait(pending);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending));
#endif
}

// ldmatrix .x4: four 8x8 matrices of 16-bit elements from shared memory, one warp-wide load.
// Lane l gives the address of row l % 8 of matrix l / 8 (16 bytes, 16-byte aligned) and gets
// in r[i] matrix i's elements (l / 4, 2 (l % 4) + {0, 1}): the layout of an mma.sync fragment.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef EFFICIENTVIT_EMULATION
  emulation::ldmatrix_x4(r, row);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(row)));
#endif
}

// Leading dimension, in elements, of a 16-bit matrix that mma_smem reads with ldmatrix: rows
// whole 16-element k steps, plus 8 elements so that a row starts 16 bytes (mod 128) after the
// one above it and the eight rows of one 8x8 matrix fall in different banks.
__host__ __device__ inline int64_t ld_mma(int64_t k) { return (k + 15) / 16 * 16 + 8; }

// Block-wide matrix product of 16-bit operands in shared memory: for each batch entry
// bi < batch and m < M, n < N,
//   epi(bi, m, n, sum_{k < K} A[bi * a_step + m * lda + k] * B[bi * b_step + n * ldb + k]),
// products in fp32 on tensor cores. A is M x K and B (weight-like, output x input) N x K, row
// major with leading dimensions from ld_mma; steps in elements, multiples of 8. The caller
// provides what the fragments read beyond the product: M a multiple of 16; B rows up to the
// next multiple of 32 (their values only reach masked-out columns); and zeros in both from
// column K to the next multiple of 16. Each warp takes 16 x 32 output tiles; per 16-wide k step
// one ldmatrix gives its A fragment and two give the B fragments of its four n8 tiles, for four
// mma.sync (PTX ISA, "Matrix Fragments for mma.m16n8k16"). Every thread of the block calls
// it; no barrier inside.
template <class T, class E>
__device__ __forceinline__ void mma_smem(int batch, int M, int N, int K, const T* A, int lda,
                                         int a_step, const T* B, int ldb, int b_step, E epi) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int tiles_m = M / 16, tiles = tiles_m * ((N + 31) / 32);
  for (int item = threadIdx.x / 32; item < batch * tiles; item += blockDim.x / 32) {
    const int bi = item / tiles, tile = item - bi * tiles;
    const int m0 = tile % tiles_m * 16, n0 = tile / tiles_m * 32;
    // A: lanes 0-15 address rows 0-15 at k, lanes 16-31 the same rows at k + 8 (a0..a3);
    // B: lane l addresses row l % 8 + 8 (l / 16), column 8 (l / 8 % 2): b0, b1 of two n8 tiles
    const T* a_row = A + bi * a_step + (m0 + lane % 16) * lda + lane / 16 * 8;
    const T* b_row = B + bi * b_step + (n0 + lane % 8 + lane / 16 * 8) * ldb + lane / 8 % 2 * 8;
    float acc[4][4] = {};
    for (int k = 0; k < K; k += 16) {
      uint32_t a[4], b01[4], b23[4];
      ldmatrix_x4(a, a_row + k);
      ldmatrix_x4(b01, b_row + k);
      ldmatrix_x4(b23, b_row + 16 * ldb + k);
      Mma<T>::run(acc[0], a, {b01[0], b01[1]});
      Mma<T>::run(acc[1], a, {b01[2], b01[3]});
      Mma<T>::run(acc[2], a, {b23[0], b23[1]});
      Mma<T>::run(acc[3], a, {b23[2], b23[3]});
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = n0 + 8 * j + 2 * t;
#pragma unroll
      for (int h = 0; h < 2; ++h) {  // rows g and g + 8
        const int m = m0 + g + 8 * h;
        if (n < N) epi(bi, m, n, acc[j][2 * h]);
        if (n + 1 < N) epi(bi, m, n + 1, acc[j][2 * h + 1]);
      }
    }
  }
}

// One product (batch 1) of mma_smem.
template <class T, class E>
__device__ __forceinline__ void mma_smem(int M, int N, int K, const T* A, int lda, const T* B,
                                         int ldb, E epi) {
  mma_smem<T>(1, M, N, K, A, lda, 0, B, ldb, 0,
              [&](int, int m, int n, float v) { epi(m, n, v); });
}

// Stages a rows x cols matrix of 16-bit T into shared memory (row r at dst + r * ldd) and zeros
// columns cols .. the next multiple of 16. Row r, if present(r), starts at start(r) with its
// elements col_stride apart; else it is zeros. 16-byte cp.async where `packs` says the rows are
// contiguous and 16-byte aligned, element by element (plain stores) elsewhere.
template <class T, class Present, class Start>
__device__ __forceinline__ void stage_rows(int rows, int cols, int64_t col_stride, bool packs,
                                           T* dst, int ldd, Present present, Start start) {
  constexpr int V = kVec16<T>;
  const int packs_per_row = (cols + 15) / 16 * 16 / V;
  for (int e = threadIdx.x; e < rows * packs_per_row; e += blockDim.x) {
    const int r = e / packs_per_row, c = (e - r * packs_per_row) * V;
    T* d = dst + r * ldd + c;
    if (!present(r)) {
#pragma unroll
      for (int i = 0; i < V; ++i) d[i] = T(0.f);
    } else if (packs && c + V <= cols) {
      cp_async16(d, start(r) + c);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) d[i] = c + i < cols ? start(r)[(c + i) * col_stride] : T(0.f);
    }
  }
}

// Block-wide fp32 matrix product: for each batch entry bi < batch,
//   epi(bi, m, n, sum_k a(bi, m, k) * b(bi, n, k))   for m < M, n < N,
// with b indexed like a weight matrix (output, input). Operands come through accessors
// returning float, called only in bounds, so one routine serves activations in shared memory
// and weights in global memory. Each thread owns 4x4 tiles of outputs and runs FMAs in fp32,
// which keeps fp32 results at fp32 accuracy (tensor cores would round operands to tf32);
// 16-bit operands go through mma_smem. Every thread of the block must call it; it has no
// barrier: the caller syncs before (operands written) and after (results written).
template <class A, class B, class E>
__device__ __forceinline__ void block_gemm(int batch, int M, int N, int K, A a, B b, E epi) {
  constexpr int TM = 4, TN = 4;
  const int tiles_m = (M + TM - 1) / TM, tiles_n = (N + TN - 1) / TN;
  const int items = batch * tiles_m * tiles_n;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    // neighbouring threads take neighbouring rows: their weight reads coincide
    const int tm = item % tiles_m, rest = item / tiles_m;
    const int m0 = tm * TM, n0 = rest % tiles_n * TN, bi = rest / tiles_n;
    float acc[TM][TN] = {};
    for (int k = 0; k < K; ++k) {
      float av[TM], bv[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) av[i] = m0 + i < M ? a(bi, m0 + i, k) : 0.f;
#pragma unroll
      for (int j = 0; j < TN; ++j) bv[j] = n0 + j < N ? b(bi, n0 + j, k) : 0.f;
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j)
        if (m0 + i < M && n0 + j < N) epi(bi, m0 + i, n0 + j, acc[i][j]);
  }
}

// Calls f(r, c) for every (token row, channel) of a rows x cols tile, spread over the block
// in memory order (channels fastest where they are contiguous, cstride == 1, else tokens),
// so neighbouring threads touch neighbouring addresses of a global tensor.
template <class F>
__device__ __forceinline__ void for_tile(int rows, int cols, int64_t cstride, F f) {
  const bool channels_fastest = cstride == 1;
  for (int e = threadIdx.x; e < rows * cols; e += blockDim.x) {
    if (channels_fastest) {
      f(e / cols, e % cols);
    } else {
      f(e % rows, e / rows);
    }
  }
}

// Calls f(r, c) for every pack of V channels (c a multiple of V) of a rows x cols tile, cols a
// multiple of V, spread over the block channels fastest: on a channels-last tensor, one access
// of V elements a call (16 bytes for V = kVec16<T>).
template <int V, class F>
__device__ __forceinline__ void for_packs(int rows, int cols, F f) {
  const int packs = cols / V;
  for (int e = threadIdx.x; e < rows * packs; e += blockDim.x) {
    const int r = e / packs;
    f(r, (e - r * packs) * V);
  }
}

}  // namespace gpu
}  // namespace efficientvit
