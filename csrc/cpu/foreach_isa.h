// Compiles the kernel file that includes it once per instruction-set level (see isa.h), the way
// a file includes itself: the file defines EFFICIENTVIT_ISA_FILE as its own path and includes
// this before anything else; this includes the file again for each extra level, then returns to
// it for the last pass, the baseline. In each pass the file's code, between
// EFFICIENTVIT_ISA_BEGIN and EFFICIENTVIT_ISA_END, lands in namespace
// efficientvit::cpu::EFFICIENTVIT_ISA, compiled for that level, with kVecBytes its vector width.
// EFFICIENTVIT_ISA_LAST_PASS is 1 in the last pass, where every level is defined: the file
// registers its kernels there, with EFFICIENTVIT_SELECT_ISA. No include guard: the passes of
// one file include it once each and it does something only in the first.
#ifndef EFFICIENTVIT_ISA
#include "cpu/isa.h"

#define EFFICIENTVIT_ISA_LAST_PASS 0
#if EFFICIENTVIT_MULTI_ISA
#define EFFICIENTVIT_ISA avx512
#define EFFICIENTVIT_ISA_TARGET_PRAGMA _Pragma("GCC target(\"arch=x86-64-v4\")")
#define EFFICIENTVIT_ISA_VEC_BYTES 64
#include EFFICIENTVIT_ISA_FILE
#undef EFFICIENTVIT_ISA
#undef EFFICIENTVIT_ISA_TARGET_PRAGMA
#undef EFFICIENTVIT_ISA_VEC_BYTES

#define EFFICIENTVIT_ISA avx2
#define EFFICIENTVIT_ISA_TARGET_PRAGMA _Pragma("GCC target(\"arch=x86-64-v3\")")
#define EFFICIENTVIT_ISA_VEC_BYTES 32
#include EFFICIENTVIT_ISA_FILE
#undef EFFICIENTVIT_ISA
#undef EFFICIENTVIT_ISA_TARGET_PRAGMA
#undef EFFICIENTVIT_ISA_VEC_BYTES
#endif

// The last pass: the rest of the including file, compiled with the build's own flags.
#undef EFFICIENTVIT_ISA_LAST_PASS
#define EFFICIENTVIT_ISA_LAST_PASS 1
#define EFFICIENTVIT_ISA baseline
#define EFFICIENTVIT_ISA_TARGET_PRAGMA
#endif
