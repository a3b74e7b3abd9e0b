"""The CPU kernels' instruction-set levels (csrc/cpu/isa.h): the best level the CPU has is
chosen, every level the CPU runs computes the ops correctly, and no code outside a level's
namespace uses instructions beyond the x86-64 baseline (a binary built on one machine runs on
any other)."""
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

from efficientvit_kernels import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MULTI_ISA = ops.built_isas() == ["baseline", "avx2", "avx512"]
needs_multi_isa = pytest.mark.skipif(not MULTI_ISA, reason="one instruction-set level built")

# The CPU features each level needs, as /proc/cpuinfo names them (x86-64-v3 and -v4).
LEVEL_FLAGS = {
    "avx2": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "movbe", "xsave"},
    "avx512": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
}


def _cpu_flags():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def _levels_this_cpu_has():
    flags, levels = _cpu_flags(), ["baseline"]
    for level in ("avx2", "avx512"):
        if LEVEL_FLAGS[level] <= flags:
            levels.append(level)
        else:
            break
    return levels


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **env), timeout=600)


@needs_multi_isa
@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads /proc/cpuinfo")
def test_the_best_level_of_this_cpu_is_chosen():
    assert ops.cpu_isa() == _levels_this_cpu_has()[-1]


# Each op on random weights in the contiguous and channels-last layouts (the kernels' two code
# paths), against the float64 reference, at the level the environment names.
CHECK_EVERY_OP = """
import os, torch
import efficientvit_kernels as K
from efficientvit_kernels import testing as T
from python_ref import functional as F
assert K.ops.cpu_isa() == os.environ["EFFICIENTVIT_CPU_ISA"], K.ops.cpu_isa()
torch.manual_seed(0)
C, ws = 64, 7
cga = T.random_cga_params(C, 4, [7, 5, 3, 3], ws, dtype=torch.float32)
dw_w, dw_b = T.random_dwconv_params(C, dtype=torch.float32)
ffn = T.random_ffn_params(C, 2 * C, dtype=torch.float32)
pe_w = [torch.randn(16, 3, 3, 3) / 5, torch.randn(32, 16, 3, 3) / 12, torch.randn(C, 32, 3, 3) / 17]
pe_b = [torch.randn(16) / 10, torch.randn(32) / 10, torch.randn(C) / 10]
pm_w, pm_b = torch.randn(2 * C, C) / 8, torch.randn(2 * C) / 10
for layout in (torch.contiguous_format, torch.channels_last):
    x = torch.randn(2, C, 15, 13).to(memory_format=layout)
    image = torch.randn(2, 3, 33, 31).to(memory_format=layout)
    cases = {
        "cga": (K.ops.cga(x, *T.cga_args(cga), True), T.reference_cga(x, cga)),
        "dwconv": (K.ops.dwconv(x, dw_w, dw_b, True, True),
                   F.dwconv(x.double(), dw_w.double(), dw_b.double(), True, True)),
        "ffn": (K.ops.ffn(x, *ffn, True),
                F.ffn(x.double(), *(t.double() for t in ffn), True)),
        "patch_embed": (K.ops.patch_embed(image, pe_w, pe_b, True),
                        F.patch_embed(image.double(), [w.double() for w in pe_w],
                                      [b.double() for b in pe_b], True)),
        "conv1x1": (K.ops.conv1x1(x, pm_w, pm_b, relu=True),
                    F.conv1x1(x.double(), pm_w.double(), pm_b.double(), relu=True)),
        "squeeze_excite": (K.ops.squeeze_excite(x, *ffn),
                           F.squeeze_excite(x.double(), *(t.double() for t in ffn))),
    }
    for name, (out, ref) in cases.items():
        T.assert_close(out, ref, torch.float32, what=f"{name} ({layout})")
import python_ref as R
model = R.randomize_(R.build("m0"))
image = torch.randn(1, 3, 224, 224)
with torch.no_grad():
    ref = R.fold_batchnorm(model).double()(image.double())
    T.assert_close(K.convert(model, backend="cpu")(image), ref, torch.float32, what="M0")
print("ok")
"""


@pytest.mark.parametrize("level", ["baseline", "avx2", "avx512"])
def test_every_level_this_cpu_runs_matches_the_reference(level):
    if level not in ops.built_isas():
        pytest.skip(f"{level} not built")
    if level not in _levels_this_cpu_has():
        pytest.skip(f"this CPU lacks {level}")
    proc = _run(CHECK_EVERY_OP + "\n", EFFICIENTVIT_CPU_ISA=level)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.parametrize("value, message", [
    ("sse9", "names no level"),
    pytest.param("avx512", "this CPU lacks it", marks=pytest.mark.skipif(
        "avx512" in _levels_this_cpu_has() or not MULTI_ISA, reason="this CPU has AVX-512")),
])
def test_a_level_that_cannot_run_fails_the_import(value, message):
    proc = _run("import efficientvit_kernels", EFFICIENTVIT_CPU_ISA=value)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ValueError") and message in last, proc.stderr[-2000:]


LEVEL_NAMESPACE = re.compile(r"efficientvit::cpu::(avx2|avx512)::")


@needs_multi_isa
@pytest.mark.skipif(platform.machine() != "x86_64" or not shutil.which("objdump"),
                    reason="needs x86-64 and objdump")
def test_only_the_levels_code_goes_beyond_the_baseline():
    """Each function in the library using an instruction beyond x86-64 is in the avx2 or avx512
    namespace (a torch inline function compiled there and kept by the linker in place of its
    baseline copy would fail here), and both levels do use such instructions (so this test
    sees them)."""
    from efficientvit_kernels import _C
    disassembly = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__],
                                 capture_output=True, text=True, check=True).stdout
    function, offenders, levels_seen = None, {}, set()
    for line in disassembly.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            function = header.group(1)
            continue
        mnemonic = re.match(r"^\s*[0-9a-f]+:\s+([a-z][a-z0-9]*)", line)
        if not mnemonic or not _beyond_baseline(mnemonic.group(1)):
            continue
        level = LEVEL_NAMESPACE.search(function or "")
        if level:
            levels_seen.add(level.group(1))
        else:
            offenders.setdefault(function, mnemonic.group(1))
    assert levels_seen == {"avx2", "avx512"}
    assert not offenders, "\n".join(f"{f}: {m}" for f, m in list(offenders.items())[:20])


# Instructions the x86-64 baseline lacks: every VEX or EVEX encoding (AVX and later) is spelled
# with a leading v by objdump (vmovups, vfmadd231ps, vpbroadcastd, ...), AVX-512's mask
# instructions with a leading k (kmovw, kortestw, ...); and BMI's and MOVBE.
BMI_AND_MOVBE = {"andn", "bextr", "blsi", "blsmsk", "blsr", "bzhi", "mulx", "pdep", "pext",
                 "rorx", "sarx", "shlx", "shrx", "movbe"}


def _beyond_baseline(mnemonic):
    return mnemonic.startswith(("v", "k")) or mnemonic in BMI_AND_MOVBE
