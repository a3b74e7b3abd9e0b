"""The CUDA sources compile with nvcc for sm_80 and sm_90, also on machines without a GPU, and
their kernels pass the static resource gate (efficientvit_kernels/cuda_static.py) and meet
their design targets (DESIGN_TARGETS below).

setup.py builds csrc/cuda/*.cu only where torch has CUDA, so on a CPU-only CI machine a
syntax or type error in them would land unnoticed; this test compiles each file (`nvcc -c`)
with the flags torch's extension build uses. The gate then holds every kernel, per
architecture, to no local-memory traffic (no spills, no stack, no LDL/STL in its SASS),
at most 255 registers and shared memory within the per-block limit. Run with -s to read
nvcc's resource report and the kernels' profile table. The compile test is skipped only
when nvcc is not installed; the parser and gate tests run everywhere.
"""
import os
import re
import sys
import tempfile

import pytest

from efficientvit_kernels import cuda_static

ARCHS = (80, 90)

# ptxas's report (nvcc 13 --resource-usage), trimmed: a kernel that spills and calls a device
# function, and a clean one built for an arch-specific target
PTXAS = """\
ptxas info    : 28 bytes gmem, 224 bytes cmem[4]
ptxas info    : Compiling entry function '_Z5spillPf' for 'sm_90'
ptxas info    : Function properties for _Z5spillPf
    8 bytes stack frame, 12 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 24 bytes cumulative stack size, \
4096 bytes smem, 464 bytes cmem[0], 8 bytes cmem[2]
ptxas info    : Compile time = 1.5 ms
ptxas info    : Function properties for _Z6helperPfi
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z5cleanPf' for 'sm_90a'
ptxas info    : Function properties for _Z5cleanPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers
"""

# cuobjdump -sass of the same two kernels, trimmed (encodings kept on the first lines)
SASS = """\
\tcode for sm_90
\t\tFunction : _Z5spillPf
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                 /* 0x00000a00ff017b82 */
                                                                          /* 0x000ff00000000800 */
        /*0010*/                   STL [R1], R2 ;                         /* 0x0000000201007387 */
        /*0020*/               @P0 LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/              @!P1 LDG.E.U16 R8, desc[UR4][R2.64] ;
        /*0040*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;
        /*0050*/                   HFMA2.MMA R3, -RZ, RZ, 0, 0 ;
        /*0060*/                   LDGSTS.E.BYPASS.LTC128B.128 [R0], desc[UR4][R2.64] ;
        /*0070*/                   LDSM.16.M88.4 R16, [R0] ;
        /*0080*/             @!UP0 LDL R2, [R1] ;
        /*0090*/                   STG.E.64 desc[UR4][R2.64], R12 ;
        /*00a0*/               @P1 BRA 0x40 ;
        /*00b0*/               @P2 BRA P3, 0x20 ;
        /*00c0*/                   EXIT ;
        /*00d0*/                   BRA 0xd0;
        /*00e0*/                   NOP;
\t\t..........

\t\tFunction : _Z5cleanPf
        /*0000*/                   LDG.E.LTC128B R2, desc[UR4][R2.64] ;
        /*0010*/                   STG.E.U8 desc[UR4][R4.64], R2 ;
        /*0020*/                   HGMMA.64x64x16.F32 R24, gdesc[UR8], R24, gsb0 ;
        /*0030*/                   EXIT ;
"""


def test_parse_resource_usage():
    spill, helper, clean = cuda_static.parse_resource_usage(PTXAS)
    assert spill["mangled"] == "_Z5spillPf" and spill["name"] in ("_Z5spillPf", "spill(float*)")
    assert (spill["arch"], spill["entry"], spill["registers"], spill["barriers"]) == (
        90, True, 64, 1)
    assert (spill["stack_bytes"], spill["cumulative_stack_bytes"]) == (8, 24)
    assert (spill["spill_store_bytes"], spill["spill_load_bytes"]) == (12, 12)
    assert spill["static_shared_bytes"] == 4096 and spill["constant_bytes"] == {0: 464, 2: 8}
    # a called function: its frame, no register line
    assert (helper["entry"], helper["arch"], helper["stack_bytes"], helper["registers"]) == (
        False, 90, 16, None)
    assert (clean["arch"], clean["registers"], clean["stack_bytes"], clean["static_shared_bytes"],
            clean["spill_store_bytes"], clean["constant_bytes"]) == (90, 40, 0, 0, 0, {})


def test_short_name():
    name = ("void efficientvit::gpu::(anonymous namespace)::dwconv_kernel<c10::Half, long>"
            "(efficientvit::gpu::(anonymous namespace)::DwconvArgs<c10::Half>)")
    assert cuda_static.short_name(name) == "dwconv_kernel<c10::Half, long>"
    assert cuda_static.short_name("_Z5spillPf") == "_Z5spillPf"


def test_sass_stats():
    stats = cuda_static.sass_stats(SASS)
    # two loops hold the HMMA, 0x40-0xa0 (7 instructions) inside 0x20-0xb0; the innermost
    # counts. BRA 0xd0 loops on itself, with no tensor-core instruction.
    assert stats["_Z5spillPf"] == {
        "instructions": 14, "tensor_core": 1, "warpgroup_mma": 0, "local_memory": 2,
        "widest_global_load_bits": 128, "widest_global_store_bits": 64, "cp_async": 1,
        "ldmatrix": 1, "mma_loop_density": 7.0}
    # LTC128B is a cache hint, not a 128-bit access; HGMMA is Hopper's wgmma, outside any loop
    assert stats["_Z5cleanPf"] == {
        "instructions": 4, "tensor_core": 1, "warpgroup_mma": 1, "local_memory": 0,
        "widest_global_load_bits": 32, "widest_global_store_bits": 8, "cp_async": 0,
        "ldmatrix": 0, "mma_loop_density": None}
    with pytest.raises(ValueError):
        cuda_static.sass_stats(SASS + SASS)


def test_occupancy():
    kb = 1024
    # 256 threads: 64 registers leave room for 4 blocks (2048 a warp: 8 warps in each quarter
    # of the register file), 80 for 3 (6 warps a quarter), 65 round up to 72 (7 a quarter)
    assert cuda_static.occupancy(64, 256, 0, 80) == 4
    assert cuda_static.occupancy(80, 256, 0, 90) == 3
    assert cuda_static.occupancy(65, 256, 0, 90) == 3
    # 80 KB of shared memory: two blocks on either (164 / 228 KB, 1 KB reserved per block)
    assert cuda_static.occupancy(32, 256, 80 * kb, 80) == 2
    assert cuda_static.occupancy(32, 256, 80 * kb, 90) == 2
    assert cuda_static.occupancy(32, 256, 75 * kb, 90) == 3
    # thread and block-count limits; over a per-block limit nothing launches
    assert cuda_static.occupancy(16, 256, 0, 90) == 8
    assert cuda_static.occupancy(16, 32, 0, 90) == 32
    assert cuda_static.occupancy(32, 256, 164 * kb, 80) == 0
    assert cuda_static.occupancy(32, 256, 227 * kb, 90) == 1
    assert cuda_static.occupancy(256, 32, 0, 90) == 0
    assert cuda_static.occupancy(128, 1024, 0, 90) == 0


def test_gate_reports_violations():
    rows = cuda_static.source_profiles("csrc/cuda/canned.cu", PTXAS, {90: SASS})
    spill, clean = rows  # the called function gets no row: its frame is in spill's stack
    assert (spill["kernel"], spill["arch"]) in (("spill", 90), ("_Z5spillPf", 90))
    assert (spill["stack_bytes"], spill["local_memory_instructions"]) == (24, 2)
    assert (spill["threads"], spill["blocks_per_sm"]) == (None, None)  # no source to read
    found = cuda_static.resource_violations(rows)
    assert len(found) == 3 and all(f.startswith(f"{spill['kernel']} sm_90") for f in found)
    assert "12 bytes stored and 12 bytes loaded" in found[0]
    assert "24 bytes of stack" in found[1] and "2 local-memory instructions" in found[2]
    assert cuda_static.resource_violations([clean]) == []
    worse = dict(clean, registers=300, dynamic_shared_bytes=227 * 1024, static_shared_bytes=4096,
                 blocks_per_sm=0)
    found = cuda_static.resource_violations([worse])
    assert len(found) == 3
    assert "300 registers" in found[0] and str(227 * 1024 + 4096) in found[1]
    assert "no block fits" in found[2]


def test_cuda_sources_compile():
    if cuda_static.nvcc_path() is None:
        pytest.skip("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    with tempfile.TemporaryDirectory() as out_dir:
        # two workers: CI has two cores, and one nvcc call is mostly single-threaded
        results = cuda_static.compile_sources(ARCHS, out_dir, jobs=2)
        assert results, "no csrc/cuda/*.cu found"
        failed = []
        for source, code, output, seconds, _ in results:
            name = os.path.relpath(source, cuda_static.ROOT)
            # the resource report (registers, shared memory, spills) is kept for reading under -s
            print(f"--- {name}: exit {code}, {seconds:.0f} s", file=sys.stderr)
            print(output, file=sys.stderr)
            if code != 0:
                failed.append(f"{name} (exit {code}):\n{output[-4000:]}")
        assert not failed, "nvcc failed:\n" + "\n".join(failed)
        rows = cuda_static.compiled_profiles(results, ARCHS, jobs=2)
    print(cuda_static.format_profiles(rows), file=sys.stderr)
    for source, *_ in results:
        name = os.path.relpath(source, cuda_static.ROOT)
        archs = {r["arch"] for r in rows if r["source"] == name}
        assert archs == set(ARCHS), f"{name}: kernels reported for {sorted(archs)} only"
    # the launches were read (threads, planned shared memory), so occupancy is known; the
    # SASS was found wherever cuobjdump was, so the LDL/STL rule held
    assert all(r["threads"] and r["blocks_per_sm"] is not None for r in rows), [
        r["kernel"] for r in rows if not r["threads"] or r["blocks_per_sm"] is None]
    if cuda_static.cuobjdump_path():
        assert all(r["sass_instructions"] for r in rows), [
            (r["kernel"], r["arch"]) for r in rows if not r["sass_instructions"]]
    violations = cuda_static.resource_violations(rows) + design_violations(rows)
    assert not violations, "static resource gate:\n" + "\n".join(violations)


# The design targets of the CUDA kernels, per variant (kernel name pattern): tensor-core
# kernels stage operands by cp.async and feed mma.sync from ldmatrix with at most 12 SASS
# instructions per MMA in their loops, and load 128 bits at a time (ffn stores so too); the
# fused kernels keep
# two blocks per multiprocessor at the planner's design point; dwconv's channels-last packs,
# and bias_act's packs, load and store 128 bits.
DESIGN_TARGETS = {
    r"(cga|ffn)_kernel<c10::(Half|BFloat16)>": dict(
        tensor_core=True, max_mma_loop_density=12, cp_async=True, ldmatrix=True, load_bits=128,
        store_bits=128, min_blocks_per_sm=2),
    r"(cga|ffn)_kernel<float>": dict(min_blocks_per_sm=2),
    r"dwconv_kernel<float, \w+, 4>|dwconv_kernel<c10::\w+, \w+, 8>": dict(
        load_bits=128, store_bits=128),
    r"bias_act_kernel<float, \w+, 4>|bias_act_kernel<c10::\w+, \w+, 8>": dict(
        load_bits=128, store_bits=128),
}


def design_violations(rows):
    """What misses DESIGN_TARGETS, one line per finding; every target names some kernel."""
    found, matched = [], set()
    for r in rows:
        for pattern, target in DESIGN_TARGETS.items():
            if not re.fullmatch(pattern, r["kernel"]):
                continue
            matched.add(pattern)
            where, misses = f"{r['kernel']} sm_{r['arch']}", []
            if target.get("tensor_core") and not r["tensor_core_instructions"]:
                misses.append("no tensor-core instruction")
            density = r["mma_loop_density"]
            if "max_mma_loop_density" in target and (
                    density is None or density > target["max_mma_loop_density"]):
                misses.append(f"{density} instructions per MMA in its loops")
            if target.get("cp_async") and not r["cp_async"]:
                misses.append("no cp.async (LDGSTS)")
            if target.get("ldmatrix") and not r["ldmatrix"]:
                misses.append("no ldmatrix (LDSM)")
            if r["widest_global_load_bits"] < target.get("load_bits", 0):
                misses.append(f"widest global load {r['widest_global_load_bits']} bits")
            if r["widest_global_store_bits"] < target.get("store_bits", 0):
                misses.append(f"widest global store {r['widest_global_store_bits']} bits")
            if r["blocks_per_sm"] < target.get("min_blocks_per_sm", 0):
                misses.append(f"{r['blocks_per_sm']} blocks per multiprocessor")
            found += [f"{where}: {m}" for m in misses]
    found += [f"no kernel matches the design target {p}" for p in DESIGN_TARGETS if p not in matched]
    return found


def test_design_violations():
    """The targets' checks on canned rows: a kernel meeting them, one missing each."""
    good = dict(kernel="ffn_kernel<c10::Half>", arch=90, tensor_core_instructions=8,
                mma_loop_density=2.5, cp_async=2, ldmatrix=6, widest_global_load_bits=128,
                widest_global_store_bits=16, blocks_per_sm=2)
    rows = [dict(good, widest_global_store_bits=128),
            dict(good, kernel="cga_kernel<c10::BFloat16>", widest_global_store_bits=128),
            dict(good, kernel="cga_kernel<float>"), dict(good, kernel="ffn_kernel<float>"),
            dict(good, kernel="dwconv_kernel<float, int, 4>", widest_global_store_bits=128),
            dict(good, kernel="bias_act_kernel<c10::Half, int, 8>", widest_global_store_bits=128)]
    assert design_violations(rows) == []
    bad = dict(good, tensor_core_instructions=0, mma_loop_density=40.0, cp_async=0, ldmatrix=0,
               widest_global_load_bits=16, blocks_per_sm=1)
    found = design_violations([bad] + rows[1:])
    assert len(found) == 7 and all(f.startswith("ffn_kernel<c10::Half> sm_90: ") for f in found)
    assert "40.0 instructions per MMA" in found[1] and "widest global store 16 bits" in found[5]
    assert "1 blocks" in found[6]
    assert design_violations(rows[:1]) == [
        f"no kernel matches the design target {p}" for p in list(DESIGN_TARGETS)[1:]]
