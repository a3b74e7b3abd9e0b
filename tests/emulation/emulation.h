// CPU emulation of the CUDA built-ins that csrc/cuda/*.cuh use, so their kernels run as host
// C++ in tests (tests/test_cuda_emul.py). Not a general CUDA emulator: only what this library's
// kernels use. Included by cuda_utils.cuh when EFFICIENTVIT_EMULATION is defined.
//
// Supported:
//   - launch(kernel, grid, block, smem, args): a 1-D grid, blocks one after another; the threads
//     of a block are cooperative fibers (ucontext), each run until its next __syncthreads or
//     warp collective before the next one starts, in forward, reverse or shuffled order (the
//     order is reshuffled at each barrier). A missing barrier, or a read of what another
//     thread writes later in the same phase, so gives a wrong answer deterministically.
//   - __syncthreads: reached by every thread of the block, else the launch fails.
//   - warp collectives, all 32 lanes meeting (full mask only; a lane missing fails the
//     launch): __shfl_xor_sync, mma.sync m16n8k16 row.col f32 += f16/bf16 x f16/bf16
//     (mma_m16n8k16, called by Mma<T>::run) with the fragment layouts of the PTX ISA, products
//     of the 16-bit operands exact, sums in fp32; and ldmatrix m8n8 .x4 (ldmatrix_x4), every
//     lane's 16-byte row checked to lie in the dynamic shared memory, aligned, and all rows
//     read when the last lane arrives, as one warp-wide load.
//   - cp.async of 16 bytes, global to shared (cp_async): the source is read and checked when
//     the copy is issued, and the bytes land in shared memory only when the issuing thread
//     waits for its group (cp_async_wait after cp_async_commit), so a read before the wait, or
//     by another thread before the barrier after it, sees the old contents (NaN). A thread that
//     ends with copies not waited for fails the launch.
//   - threadIdx, blockIdx, blockDim, gridDim (x only: y and z are 0 and 1).
//   - dynamic shared memory: exactly the launch's bytes, 16-byte aligned, filled with NaN
//     (0x7fc0 halves: NaN as fp32, fp16 and bf16; a huge offset as int64) at each block's start;
//     bytes written past its end fail the launch.
//   - global memory through Checked<T> (cuda_utils.cuh's global_ptr<T>): every access is
//     checked against the tensor it points into; the first out-of-bounds index fails the
//     launch with the tensor's name, the index, the block and the thread.
//   - __global__, __device__, __host__, __forceinline__, __launch_bounds__; __expf as expf;
//     min(int, int) (fmaxf, fmaf, abs and INFINITY are the host's).
// Not supported: static __shared__, atomics, other warp intrinsics or partial masks, warps of
// fewer than 32 threads, 2-D/3-D grids or blocks, streams, fast-math approximations (__expf
// and division are exact here), and any concurrency between blocks.
#pragma once

#include <ucontext.h>

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

using std::min;

inline float __expf(float v) { return std::exp(v); }

namespace efficientvit {
namespace emulation {

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};

// The running fiber's built-in variables, set by the scheduler before it resumes a thread.
inline Dim3 thread_idx, block_idx, block_dim, grid_dim;

// The launch's first failure; launch() throws it when the grid has run.
inline std::string failure;

inline void fail(const std::string& what) {
  if (failure.empty()) {
    failure = what + " (block " + std::to_string(block_idx.x) + ", thread " +
              std::to_string(thread_idx.x) + ")";
  }
}

// A pointer into a tensor of `size` elements, `at` elements past its start; every access is
// checked against the tensor's bounds.
template <class T>
class Checked {
 public:
  Checked(T* base, int64_t size, const char* name, int64_t at = 0)
      : base_(base), size_(size), at_(at), name_(name) {}
  operator Checked<const T>() const { return {base_, size_, name_, at_}; }

  Checked operator+(int64_t i) const { return {base_, size_, name_, at_ + i}; }
  // The n elements from here, for one access of n * sizeof(T) bytes (a vector load or store,
  // an async copy): in bounds and aligned to its size, as the hardware requires; null if not.
  T* span(int64_t n) const {
    const uintptr_t address = reinterpret_cast<uintptr_t>(base_ + at_);
    if (at_ < 0 || at_ + n > size_) {
      fail(std::string("global memory: ") + name_ + "[" + std::to_string(at_) + ":" +
           std::to_string(at_ + n) + "] is out of bounds (" + std::to_string(size_) +
           " elements)");
      return nullptr;
    }
    if (address % (n * sizeof(T)) != 0) {
      fail(std::string("global memory: ") + name_ + "[" + std::to_string(at_) + "] is not " +
           std::to_string(n * sizeof(T)) + "-byte aligned");
      return nullptr;
    }
    return base_ + at_;
  }
  T& operator[](int64_t i) const {
    const int64_t at = at_ + i;
    if (at < 0 || at >= size_) {
      fail(std::string("global memory: ") + name_ + "[" + std::to_string(at) +
           "] is out of bounds (" + std::to_string(size_) + " elements)");
      static std::remove_const_t<T> scratch;
      scratch = std::remove_const_t<T>(0.f);
      return scratch;
    }
    return base_[at];
  }

 private:
  T* base_;
  int64_t size_, at_;
  const char* name_;
};

enum class State { kRunnable, kBarrier, kWarp, kDone };

// Order in which the scheduler resumes the threads of a block.
enum class Order { kForward = 0, kReverse = 1, kShuffled = 2 };

// What the lanes of one warp deposit for a collective, two rounds deep: a lane can get one
// collective ahead of the others, never two (the next round needs all 32 lanes again).
struct Warp {
  int arrived = 0;
  float shfl[2][32];
  uint32_t a[2][32][4], b[2][32][2];
  const unsigned char* rows[2][32];  // ldmatrix: each lane's row address
  uint32_t loaded[2][32][4];          // ldmatrix: each lane's registers
};

// A cp.async in flight: its bytes, read at issue, and where and when they land.
struct AsyncCopy {
  unsigned char* dst;
  unsigned char bytes[16];
  unsigned group;  // the commit group it belongs to (the thread's count of commits at issue)
};

struct Fiber {
  ucontext_t context;
  State state;
  unsigned round;  // collectives this thread has entered
  std::vector<AsyncCopy> copies;
  unsigned commits;
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  std::vector<int> order;
  std::vector<char> stacks;
  std::vector<unsigned char> smem;  // the dynamic shared memory, then a guard band
  size_t smem_bytes = 0;
  ucontext_t scheduler;
  int current = 0;
  std::function<void()> body;
};

inline Block block;
constexpr size_t kStackBytes = 256 * 1024;
constexpr size_t kGuardBytes = 256;
constexpr unsigned char kPoison[2] = {0xc0, 0x7f};  // 0x7fc0, little-endian

inline unsigned char* dynamic_smem() {
  // 16-byte aligned start inside the buffer (vector storage is only guaranteed 8 or 16)
  const uintptr_t p = reinterpret_cast<uintptr_t>(block.smem.data());
  return block.smem.data() + ((16 - p % 16) % 16);
}

// Suspends the running thread in `state` and returns to the scheduler.
inline void yield(State state) {
  Fiber& f = block.fibers[block.current];
  f.state = state;
  swapcontext(&f.context, &block.scheduler);
}

inline void syncthreads() { yield(State::kBarrier); }

// The running lane enters its next warp collective: returns the buffer round (0 or 1) once
// all 32 lanes of its warp have deposited theirs; the last lane to arrive runs `complete`
// first, before any lane goes on.
template <class Deposit, class Complete>
int warp_meet(Deposit deposit, Complete complete) {
  Fiber& f = block.fibers[block.current];
  const int lane = block.current % 32, round = f.round++ % 2;
  Warp& w = block.warps[block.current / 32];
  deposit(w, round, lane);
  if (++w.arrived == 32) {
    w.arrived = 0;
    complete(w, round);
    for (int l = 0; l < 32; ++l) block.fibers[block.current - lane + l].state = State::kRunnable;
    yield(State::kRunnable);
  } else {
    yield(State::kWarp);
  }
  return round;
}

template <class Deposit>
int warp_meet(Deposit deposit) {
  return warp_meet(deposit, [](Warp&, int) {});
}

// Whether [p, p + bytes) lies in the launch's dynamic shared memory, aligned to `align`; fails
// the launch (naming `what`) if not.
inline bool in_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  const unsigned char* start = dynamic_smem();
  if (c < start || c + bytes > start + block.smem_bytes) {
    fail(std::string(what) + ": shared-memory address outside the launch's " +
         std::to_string(block.smem_bytes) + " bytes");
    return false;
  }
  if (static_cast<size_t>(c - start) % align != 0) {
    fail(std::string(what) + ": shared-memory address not " + std::to_string(align) +
         "-byte aligned");
    return false;
  }
  return true;
}

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lane l gives the address of row l % 8 of matrix
// l / 8 (8 16-bit elements), and gets in r[i] matrix i's elements (l / 4, 2 (l % 4) + {0, 1}).
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  const int round = warp_meet(
      [&](Warp& w, int rd, int l) { w.rows[rd][l] = static_cast<const unsigned char*>(row); },
      [](Warp& w, int rd) {
        for (int l = 0; l < 32; ++l) {
          if (!in_smem(w.rows[rd][l], 16, 16, "ldmatrix")) return;
        }
        for (int l = 0; l < 32; ++l)
          for (int i = 0; i < 4; ++i)
            std::memcpy(&w.loaded[rd][l][i], w.rows[rd][8 * i + l / 4] + 4 * (l % 4), 4);
      });
  const int lane = block.current % 32;
  std::copy(block.warps[block.current / 32].loaded[round][lane],
            block.warps[block.current / 32].loaded[round][lane] + 4, r);
}

// cp.async.cg.shared.global, 16 bytes: read now, landed by cp_async_wait.
inline void cp_async(void* dst, const void* src) {
  if (!in_smem(dst, 16, 16, "cp.async")) return;
  Fiber& f = block.fibers[block.current];
  AsyncCopy c{static_cast<unsigned char*>(dst), {}, f.commits};
  std::memcpy(c.bytes, src, 16);
  f.copies.push_back(c);
}

// cp.async.commit_group: closes the running thread's group of copies.
inline void cp_async_commit() { ++block.fibers[block.current].commits; }

// cp.async.wait_group pending: the running thread's copies land, all but those of its newest
// `pending` groups (and of its open group).
inline void cp_async_wait(unsigned pending) {
  Fiber& f = block.fibers[block.current];
  const unsigned landed = f.commits > pending ? f.commits - pending : 0;
  std::vector<AsyncCopy> still;
  for (const AsyncCopy& c : f.copies) {
    if (c.group < landed) {
      std::memcpy(c.dst, c.bytes, 16);
    } else {
      still.push_back(c);
    }
  }
  f.copies = std::move(still);
}

inline float shfl_xor(unsigned mask, float v, int offset) {
  if (mask != 0xffffffffu) fail("__shfl_xor_sync: only the full mask is emulated");
  const int lane = block.current % 32;
  const int round = warp_meet([&](Warp& w, int r, int l) { w.shfl[r][l] = v; });
  return block.warps[block.current / 32].shfl[round][(lane ^ offset) & 31];
}

template <class T>
float half_bits(uint32_t reg, int hi) {
  const uint16_t bits = static_cast<uint16_t>(hi ? reg >> 16 : reg & 0xffffu);
  return static_cast<float>(T(bits, typename T::from_bits_t{}));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d += A B for the warp's 16x16 A and 16x8
// B, fragments as in the PTX ISA ("Matrix Fragments for mma.m16n8k16"): lane l, g = l / 4,
// t = l % 4 holds A[g + 8 (r % 2)][2t + 8 (r / 2) + {0, 1}] in register r, B[2t + 8r + {0, 1}][g]
// in register r, and D[g + 8 (i / 2)][2t + i % 2] in d[i].
template <class T>
void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const int round = warp_meet([&](Warp& w, int r, int l) {
    std::copy(a, a + 4, w.a[r][l]);
    std::copy(b, b + 2, w.b[r][l]);
  });
  const Warp& w = block.warps[block.current / 32];
  const auto A = [&](int m, int k) {
    return half_bits<T>(w.a[round][m % 8 * 4 + k % 8 / 2][m / 8 + 2 * (k / 8)], k % 2);
  };
  const auto B = [&](int k, int n) {
    return half_bits<T>(w.b[round][n * 4 + k % 8 / 2][k / 8], k % 2);
  };
  const int lane = block.current % 32, g = lane / 4, t = lane % 4;
  for (int i = 0; i < 4; ++i) {
    const int m = g + 8 * (i / 2), n = 2 * t + i % 2;
    float sum = 0.f;
    for (int k = 0; k < 16; ++k) sum += A(m, k) * B(k, n);
    d[i] += sum;
  }
}

inline void fiber_main() {
  block.body();
  Fiber& f = block.fibers[block.current];
  if (!f.copies.empty()) fail("a thread ended with cp.async copies it never waited for");
  f.state = State::kDone;  // uc_link returns to the scheduler
}

inline void resume(int t) {
  block.current = t;
  thread_idx.x = static_cast<unsigned>(t);
  swapcontext(&block.scheduler, &block.fibers[t].context);
}

// Runs the threads of one block to completion; false where it cannot finish (a failure).
inline bool run_block(int threads, Order order, std::mt19937& rng) {
  std::fill(block.smem.begin(), block.smem.end(), 0);
  unsigned char* smem = dynamic_smem();
  for (size_t i = 0; i < block.smem_bytes + kGuardBytes; ++i) smem[i] = kPoison[i % 2];
  for (int t = 0; t < threads; ++t) {
    Fiber& f = block.fibers[t];
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = block.stacks.data() + t * kStackBytes;
    f.context.uc_stack.ss_size = kStackBytes;
    f.context.uc_link = &block.scheduler;
    makecontext(&f.context, fiber_main, 0);
    f.state = State::kRunnable;
    f.round = 0;
    f.copies.clear();
    f.commits = 0;
  }
  for (Warp& w : block.warps) w.arrived = 0;
  for (int t = 0; t < threads; ++t) block.order[t] = order == Order::kReverse ? threads - 1 - t : t;
  if (order == Order::kShuffled) std::shuffle(block.order.begin(), block.order.end(), rng);
  for (;;) {
    bool ran = false;
    for (int t : block.order) {
      if (block.fibers[t].state != State::kRunnable) continue;
      resume(t);
      ran = true;
    }
    if (ran) continue;
    int done = 0, waiting = 0;
    for (const Fiber& f : block.fibers) {
      done += f.state == State::kDone;
      waiting += f.state == State::kWarp;
    }
    if (done == threads) break;
    if (waiting > 0) {
      fail("a warp collective was not reached by all 32 lanes of a warp");
      return false;
    }
    if (done > 0) {
      fail("__syncthreads was reached by " + std::to_string(threads - done) + " of " +
           std::to_string(threads) + " threads");
      return false;
    }
    for (Fiber& f : block.fibers) f.state = State::kRunnable;  // all at the barrier
    if (order == Order::kShuffled) std::shuffle(block.order.begin(), block.order.end(), rng);
  }
  for (size_t i = 0; i < kGuardBytes; ++i) {
    if (smem[block.smem_bytes + i] != kPoison[(block.smem_bytes + i) % 2]) {
      fail("shared memory written past its " + std::to_string(block.smem_bytes) + " bytes");
      return false;
    }
  }
  return true;
}

// kernel<<<grid, threads, smem_bytes>>>(args), run on the CPU; throws on the first failure.
template <class Args>
void launch(void (*kernel)(Args), int64_t grid, int threads, int64_t smem_bytes, const Args& args,
            Order order = Order::kForward, unsigned seed = 0) {
  TORCH_CHECK(threads > 0 && threads % 32 == 0 && threads <= 1024,
              "emulation: blocks of whole warps only, got ", threads, " threads");
  block.fibers.resize(threads);
  block.order.resize(threads);
  block.warps.assign(threads / 32, Warp{});
  if (block.stacks.size() < threads * kStackBytes) block.stacks.resize(threads * kStackBytes);
  block.smem_bytes = static_cast<size_t>(smem_bytes);
  block.smem.resize(block.smem_bytes + kGuardBytes + 16);
  block.body = [&] { kernel(args); };
  block_dim = {static_cast<unsigned>(threads), 1, 1};
  grid_dim = {static_cast<unsigned>(grid), 1, 1};
  failure.clear();
  std::mt19937 rng(seed);
  for (int64_t b = 0; b < grid && failure.empty(); ++b) {
    block_idx = {static_cast<unsigned>(b), 0, 0};
    if (!run_block(threads, order, rng)) break;
  }
  block.body = nullptr;
  TORCH_CHECK(failure.empty(), "emulation: ", failure);
}

}  // namespace emulation
}  // namespace efficientvit

#define threadIdx ::efficientvit::emulation::thread_idx
#define blockIdx ::efficientvit::emulation::block_idx
#define blockDim ::efficientvit::emulation::block_dim
#define gridDim ::efficientvit::emulation::grid_dim
#define __syncthreads ::efficientvit::emulation::syncthreads
#define __shfl_xor_sync ::efficientvit::emulation::shfl_xor
