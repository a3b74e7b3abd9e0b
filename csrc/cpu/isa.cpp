// Chooses the instruction-set level of the CPU kernels (see isa.h) and tells Python which.
#include "cpu/isa.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>

namespace efficientvit::cpu {
namespace {

constexpr Isa kLevels[] = {Isa::kBaseline, Isa::kAvx2, Isa::kAvx512};

bool cpu_has(Isa isa) {
#if EFFICIENTVIT_MULTI_ISA
  __builtin_cpu_init();  // may run before the libgcc constructor that fills in the features
  switch (isa) {
    case Isa::kAvx512: return __builtin_cpu_supports("x86-64-v4");
    case Isa::kAvx2: return __builtin_cpu_supports("x86-64-v3");
    default: return true;
  }
#else
  return isa == Isa::kBaseline;
#endif
}

// The level to run, and why the one EFFICIENTVIT_CPU_ISA names is not it, if so. (This runs while
// the library loads, where an exception would abort the process: the error waits for isa().)
struct Choice {
  Isa isa = Isa::kBaseline;
  std::string error;
};

Choice choose() {
  Choice best;
  for (Isa isa : kLevels) {
    if (cpu_has(isa)) best.isa = isa;
  }
  const char* requested = std::getenv("EFFICIENTVIT_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best;
  for (Isa isa : kLevels) {
    if (std::strcmp(requested, isa_name(isa)) != 0) continue;
    if (cpu_has(isa)) return {isa, ""};
    best.error = std::string("efficientvit: EFFICIENTVIT_CPU_ISA=") + requested + ", but " +
                 (EFFICIENTVIT_MULTI_ISA ? "this CPU lacks it" : "this build has one level only");
    return best;
  }
  best.error = std::string("efficientvit: EFFICIENTVIT_CPU_ISA=") + requested +
               " names no level (baseline, avx2 = x86-64-v3, avx512 = x86-64-v4)";
  return best;
}

const Choice& choice() {
  static const Choice chosen = choose();
  return chosen;
}

std::string isa_op() {
  TORCH_CHECK_VALUE(choice().error.empty(), choice().error);
#ifdef EFFICIENTVIT_NATIVE
  return "native";
#else
  return isa_name(choice().isa);
#endif
}

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

Isa selected_isa() { return choice().isa; }

std::vector<std::string> built_isas() {
#if EFFICIENTVIT_MULTI_ISA
  return {"baseline", "avx2", "avx512"};
#elif defined(EFFICIENTVIT_NATIVE)
  return {"native"};
#else
  return {"baseline"};
#endif
}

}  // namespace efficientvit::cpu

TORCH_LIBRARY_FRAGMENT(efficientvit_cpu, m) {
  m.def("isa() -> str", &efficientvit::cpu::isa_op);
  m.def("built_isas() -> str[]", &efficientvit::cpu::built_isas);
}
