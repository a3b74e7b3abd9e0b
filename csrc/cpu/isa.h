// Instruction-set levels of the CPU kernels. Each kernel file is compiled once per level
// (cpu/foreach_isa.h), each level in its own namespace (efficientvit::cpu::baseline, ::avx2,
// ::avx512), and the best level this CPU runs is chosen when the library loads, as ATen does with
// CPU_CAPABILITY: one binary runs on any x86-64 and uses AVX2+FMA or AVX-512 where the CPU has
// them. A build with EFFICIENTVIT_NATIVE compiles one level, baseline, with the build's flags
// (-march=native: for the build machine only).
#pragma once
#include <string>
#include <vector>

// Multi-level only on x86-64 with GCC (the per-level code is compiled under #pragma GCC target);
// elsewhere the one level is whatever the compiler's flags allow.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    !defined(EFFICIENTVIT_NATIVE)
#define EFFICIENTVIT_MULTI_ISA 1
#else
#define EFFICIENTVIT_MULTI_ISA 0
#endif

namespace efficientvit::cpu {

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The level the kernels run at: the best one built that this CPU has, or the one the
// environment variable EFFICIENTVIT_CPU_ISA names (to test or time a lower one). Decided once.
Isa selected_isa();
const char* isa_name(Isa isa);
// The levels this build holds ("native" for an EFFICIENTVIT_NATIVE build).
std::vector<std::string> built_isas();

template <typename F>
F* select_isa(F* baseline, [[maybe_unused]] F* avx2, [[maybe_unused]] F* avx512) {
  switch (selected_isa()) {
    case Isa::kAvx512: return avx512;
    case Isa::kAvx2: return avx2;
    default: return baseline;
  }
}

}  // namespace efficientvit::cpu

// The selected level's definition of fn (a name in each level's namespace).
#if EFFICIENTVIT_MULTI_ISA
#define EFFICIENTVIT_SELECT_ISA(fn)                                                 \
  ::efficientvit::cpu::select_isa(&::efficientvit::cpu::baseline::fn,               \
                                  &::efficientvit::cpu::avx2::fn,                   \
                                  &::efficientvit::cpu::avx512::fn)
#else
#define EFFICIENTVIT_SELECT_ISA(fn) (&::efficientvit::cpu::baseline::fn)
#endif

// Opens and closes a level's code: its namespace, compiled for its instruction set. Everything
// the code includes from outside (torch, the standard library, checks.h) is included before,
// so that it is compiled for the baseline only: an inline function compiled for AVX-512 and
// merged by the linker with its baseline copy could be the one kept, and crash an older CPU.
#define EFFICIENTVIT_ISA_BEGIN                                  \
  _Pragma("GCC push_options") EFFICIENTVIT_ISA_TARGET_PRAGMA    \
  namespace efficientvit::cpu::EFFICIENTVIT_ISA {
#define EFFICIENTVIT_ISA_END \
  }                          \
  _Pragma("GCC pop_options")
