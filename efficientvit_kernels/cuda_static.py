"""Static resource profile of the CUDA kernels, without a GPU: what ptxas reports and what the
SASS holds, per kernel and architecture, and the gate tests/test_cuda_compile.py applies to it.

csrc/cuda/*.cu are compiled with nvcc as torch's extension build compiles them (plus
``--resource-usage``); ptxas's report gives registers, stack, spills and static shared memory,
and ``cuobjdump -sass`` (Triton's bundled copy) the instruction mix. ``DEVICE_LIMITS``,
``occupancy``, ``sass_stats`` and ``cuobjdump_path`` know nothing of these sources and serve
any kernel's cubin (the Triton kernels' too).

What is estimated rather than measured: the kernels size their dynamic shared memory at
launch, so a row's ``dynamic_shared_bytes`` is what the source plans for, read from its
launches: 0 where a launch passes 0; kSmemTarget (cuda_utils.cuh, 80 KB) where it passes a
plan's bytes and the source plans against kSmemTarget (cga.cu and ffn.cu shrink their tile,
windows or pixel rows per block, until the plan fits it, exceed it only where one window or 16
rows need more, and plan less for small shapes; ffn's fp16/bf16 variants keep at least 64 rows
where the device allows, past kSmemTarget for 256 channels or more); None otherwise.
``threads`` is the launch's block size (kThreads). ``blocks_per_sm`` is the occupancy those bytes and ptxas's registers
allow on a device of the architecture's limits (A100 / H100 class) under the largest
shared-memory carve-out: the design point; a small shape may fit more blocks, one big window
fewer. Needs a source checkout (csrc/ is not installed).
"""
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import tempfile
import time

import torch
from torch.utils import cpp_extension

__all__ = ["DEVICE_LIMITS", "nvcc_path", "nvcc_flags", "compile_sources", "parse_resource_usage",
           "short_name", "cuobjdump_path", "function_sass", "sass_stats", "occupancy",
           "source_profiles", "compiled_profiles", "cuda_kernel_profiles", "resource_violations",
           "format_profiles"]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")

_KB = 1024
# Per-multiprocessor limits (CUDA C++ Programming Guide, "Compute Capabilities"; allocation
# rules as in cuda_occupancy.h). Shared memory: the largest carve-out per multiprocessor, the
# opt-in maximum per block, and the 1 KB the driver reserves for each resident block.
DEVICE_LIMITS = {
    arch: {
        "regs_per_sm": 65536,
        "reg_alloc_unit": 256,          # registers are allocated per warp, in units of 256
        "reg_sub_partitions": 4,        # ... out of four quarters of the register file
        "max_regs_per_thread": 255,
        "warp_size": 32,
        "max_threads_per_block": 1024,
        "max_threads_per_sm": 2048,
        "max_blocks_per_sm": 32,
        "shared_per_sm": shared_per_sm,
        "max_shared_per_block": shared_per_sm - _KB,
        "reserved_shared_per_block": _KB,
        "shared_alloc_unit": 128,
    }
    for arch, shared_per_sm in ((80, 164 * _KB), (90, 228 * _KB))
}


def nvcc_path():
    """nvcc of CUDA_HOME (as torch finds it), else the one on PATH; None if neither."""
    home = cpp_extension.CUDA_HOME or os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidate = os.path.join(home, "bin", "nvcc") if home else None
    return candidate if candidate and os.path.exists(candidate) else shutil.which("nvcc")


def nvcc_flags(archs):
    """nvcc flags for compiling csrc/cuda/*.cu into objects for ``archs`` (e.g. (80, 90))."""
    # What torch.utils.cpp_extension.BuildExtension passes nvcc for setup.py's CUDAExtension
    # (COMMON_NVCC_FLAGS disable the implicit half conversions, as in torch's own build),
    # plus setup.py's own nvcc flags, plus ptxas's resource report.
    flags = [f"-I{p}" for p in cpp_extension.include_paths()]
    flags += [f"-I{os.path.join(ROOT, 'csrc')}", "-std=c++17", "-O3", "--use_fast_math",
              "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
              f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
              "--compiler-options", "-fPIC", "--resource-usage"]
    flags += [f for f in cpp_extension.COMMON_NVCC_FLAGS if f not in flags]
    if "--expt-relaxed-constexpr" not in flags:
        flags.append("--expt-relaxed-constexpr")
    # A CPU-only torch ships c10/cuda headers but not the header its CMake build generates
    # (it only holds the Windows export switch); tell c10 to go without it.
    generated = os.path.join(cpp_extension.include_paths()[0], "c10", "cuda", "impl",
                             "cuda_cmake_macros.h")
    if not os.path.exists(generated):
        flags.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    flags += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags


def compile_sources(archs, out_dir, jobs=2):
    """Compiles each csrc/cuda/*.cu (``nvcc -c``) into ``out_dir``, ``jobs`` at a time.

    Returns (source, returncode, output, seconds, object_path) per source, in source order;
    output is nvcc's stdout and stderr, the ptxas resource report included.
    """
    nvcc, flags = nvcc_path(), nvcc_flags(archs)
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")

    def run(source):
        obj = os.path.join(out_dir, os.path.basename(source) + ".o")
        start = time.perf_counter()
        proc = subprocess.run([nvcc, "-c", source, "-o", obj, *flags], capture_output=True,
                              text=True)
        return source, proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - start, obj

    # threads suffice: each job waits on an nvcc process
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(run, sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))))


def _demangle(names):
    """Demangled C++ names, in order: c++filt, else cu++filt, else the names as given."""
    tool = shutil.which("c++filt") or shutil.which("cu++filt")
    if not names or tool is None:
        return list(names)
    proc = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    out = proc.stdout.splitlines()
    return out if proc.returncode == 0 and len(out) == len(names) else list(names)


def short_name(name):
    """A demangled function name without return type, scope and parameters:
    ``void ns::(anonymous namespace)::cga_kernel<c10::Half>(ns::CgaArgs<c10::Half>)`` ->
    ``cga_kernel<c10::Half>``. A mangled or plain name comes back as it is."""
    depth, start, end = 0, 0, len(name)
    for i, ch in enumerate(name):
        if ch in "<(":
            if ch == "(" and depth == 0 and i > 0 and name[i - 1] != ":":
                end = i  # the parameter list (not "(anonymous namespace)")
                break
            depth += 1
        elif ch in ">)":
            depth -= 1
        elif depth == 0 and ch == " ":
            start = i + 1  # after the return type
        elif depth == 0 and name.startswith("::", i):
            start = i + 2
    return name[start:end]


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_USED_PARTS = {
    "barriers": re.compile(r"used (\d+) barriers"),
    "cumulative_stack_bytes": re.compile(r"(\d+) bytes cumulative stack size"),
    "static_shared_bytes": re.compile(r"(\d+) bytes smem"),
}
_CMEM = re.compile(r"(\d+) bytes cmem\[(\d+)\]")


def parse_resource_usage(text):
    """Per-function records of a ptxas report (``nvcc --resource-usage`` / ``ptxas -v``).

    Each record: name (demangled where c++filt or cu++filt is found), mangled, arch (int: 90
    for sm_90 and sm_90a), entry (a kernel, not a called device function), registers,
    barriers, stack_bytes (the function's frame), cumulative_stack_bytes (frame plus called
    functions' frames), spill_store_bytes, spill_load_bytes, static_shared_bytes and
    constant_bytes ({bank: bytes}). Device functions have no register line: None there.
    """
    records, arch, entry, current, kernel = [], None, None, None, None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry, arch = m.group(1), int(m.group(2))
        elif m := _PROPERTIES.search(line):
            current = {"mangled": m.group(1), "arch": arch, "entry": m.group(1) == entry,
                       "registers": None, "barriers": None, "stack_bytes": 0,
                       "cumulative_stack_bytes": 0, "spill_store_bytes": 0,
                       "spill_load_bytes": 0, "static_shared_bytes": 0, "constant_bytes": {}}
            records.append(current)
            kernel = current if current["entry"] else kernel
        elif current is not None and (m := _FRAME.search(line)):
            current["stack_bytes"], current["spill_store_bytes"], current["spill_load_bytes"] = (
                int(g) for g in m.groups())
        elif kernel is not None and (m := _USED.search(line)):
            # the "Used" line belongs to the kernel being compiled, not to its callees
            kernel["registers"] = int(m.group(1))
            for key, pattern in _USED_PARTS.items():
                if part := pattern.search(line):
                    kernel[key] = int(part.group(1))
            kernel["constant_bytes"] = {int(b): int(n) for n, b in _CMEM.findall(line)}
    for record, name in zip(records, _demangle([r["mangled"] for r in records])):
        record["name"] = name
    return records


def cuobjdump_path():
    """cuobjdump bundled with Triton's NVIDIA backend; None without Triton."""
    try:
        import triton
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def function_sass(object_path, arch):
    """``cuobjdump -sass`` listing of the sm_``arch`` code in an object, fatbinary or cubin."""
    tool = cuobjdump_path()
    if tool is None:
        raise FileNotFoundError("cuobjdump not found (it comes with triton)")
    proc = subprocess.run([tool, "-sass", "-arch", f"sm_{arch}", object_path],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"cuobjdump failed on {object_path}: {proc.stderr.strip()}")
    return proc.stdout


_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)")
# "/*0040*/  @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;": offset, optional predicate, opcode
_INSTRUCTION = re.compile(
    r"^\s*/\*([0-9a-fA-F]+)\*/\s+(?:@!?U?P(?:T|\d+)\s+)?([A-Z][A-Z0-9_.]*)([^;]*)")
# a branch's target address: "BRA 0x32b0", "BRA P1, 0x1540"
_BRANCH_TARGET = re.compile(r"0x([0-9a-fA-F]+)\s*$")
# mma.sync (HMMA, IMMA, ...), Hopper's wgmma (HGMMA, QGMMA, ...), Blackwell's tcgen05 (UTC*MMA)
_TENSOR_CORE = re.compile(r"^(?:[HIDBQO]MMA|[HIQB]GMMA|UTC\w*MMA)$")
_WARPGROUP_MMA = re.compile(r"^[HIQB]GMMA$")
_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "16": 16, "64": 64, "128": 128, "256": 256}


def _access_bits(opcode):
    """Bits one LDG/STG moves per thread: 32 unless a size modifier says otherwise (cache
    hints such as LTC128B are not sizes)."""
    return max((_WIDTHS[m] for m in opcode.split(".")[1:] if m in _WIDTHS), default=32)


def mma_loop_density(code):
    """Instructions per tensor-core instruction in the tensor-core loops of one function's code
    ([(address, base opcode, operands)], NOPs left out): the worst over its innermost loops that
    hold tensor-core instructions (a loop: a backward branch and the code from its target to
    it), None where no loop holds one. What a GEMM's main loop spends around each MMA."""
    loops = []
    for address, base, operands in code:
        target = _BRANCH_TARGET.search(operands) if base == "BRA" else None
        if target and int(target.group(1), 16) <= address:
            body = [b for a, b, _ in code if int(target.group(1), 16) <= a <= address]
            tensor = sum(1 for b in body if _TENSOR_CORE.match(b))
            if tensor:
                loops.append((int(target.group(1), 16), address, len(body), tensor))
    innermost = [(n, t) for start, end, n, t in loops
                 if not any(start <= s2 and e2 <= end and (s2, e2) != (start, end)
                            for s2, e2, *_ in loops)]
    return max((n / t for n, t in innermost), default=None)


def sass_stats(sass_text):
    """Per-function instruction mix of one architecture's ``cuobjdump -sass`` listing.

    {mangled name: {"instructions" (NOP padding not counted), "tensor_core", "warpgroup_mma"
    (those of them that are Hopper's wgmma: HGMMA, ...), "local_memory" (LDL/STL),
    "widest_global_load_bits", "widest_global_store_bits" (0 if none; LDG, LDGSTS and STG,
    generic LD/ST not counted), "cp_async" (LDGSTS), "ldmatrix" (LDSM), "mma_loop_density"
    (``mma_loop_density``)}}.
    """
    stats, code, current = {}, {}, None
    for line in sass_text.splitlines():
        if m := _FUNCTION.match(line):
            if m.group(1) in stats:
                raise ValueError(f"{m.group(1)} listed twice: give one architecture's SASS")
            current = stats[m.group(1)] = {
                "instructions": 0, "tensor_core": 0, "warpgroup_mma": 0, "local_memory": 0,
                "widest_global_load_bits": 0, "widest_global_store_bits": 0, "cp_async": 0,
                "ldmatrix": 0}
            code[m.group(1)] = []
            continue
        m = _INSTRUCTION.match(line)
        if current is None or m is None:
            continue
        opcode = m.group(2)
        base = opcode.split(".")[0]
        if base == "NOP":
            continue
        code[next(reversed(code))].append((int(m.group(1), 16), base, m.group(3)))
        current["instructions"] += 1
        if _TENSOR_CORE.match(base):
            current["tensor_core"] += 1
            current["warpgroup_mma"] += bool(_WARPGROUP_MMA.match(base))
        elif base in ("LDL", "STL"):
            current["local_memory"] += 1
        elif base == "LDG":
            current["widest_global_load_bits"] = max(current["widest_global_load_bits"],
                                                     _access_bits(opcode))
        elif base == "STG":
            current["widest_global_store_bits"] = max(current["widest_global_store_bits"],
                                                      _access_bits(opcode))
        elif base == "LDGSTS":  # cp.async: a global load too
            current["cp_async"] += 1
            current["widest_global_load_bits"] = max(current["widest_global_load_bits"],
                                                     _access_bits(opcode))
        elif base == "LDSM":
            current["ldmatrix"] += 1
    for name, instructions in code.items():
        stats[name]["mma_loop_density"] = mma_loop_density(instructions)
    return stats


def occupancy(registers, threads_per_block, shared_bytes, arch):
    """Blocks of a kernel resident on one multiprocessor of sm_``arch`` (0: it cannot launch),
    from registers per thread, threads per block and shared memory (static plus dynamic) per
    block; the rules of cuda_occupancy.h at the largest shared-memory carve-out."""
    lim = DEVICE_LIMITS[arch]
    if (registers > lim["max_regs_per_thread"] or threads_per_block > lim["max_threads_per_block"]
            or shared_bytes > lim["max_shared_per_block"]):
        return 0
    warps = -(-threads_per_block // lim["warp_size"])
    unit = lim["reg_alloc_unit"]
    regs_per_warp = -(-registers * lim["warp_size"] // unit) * unit
    by_regs = lim["max_blocks_per_sm"]
    if regs_per_warp:
        # each quarter of the register file holds whole warps
        quarter = lim["regs_per_sm"] // lim["reg_sub_partitions"]
        by_regs = quarter // regs_per_warp * lim["reg_sub_partitions"] // warps
    unit = lim["shared_alloc_unit"]
    shared = -(-(shared_bytes + lim["reserved_shared_per_block"]) // unit) * unit
    return min(lim["max_blocks_per_sm"], lim["max_threads_per_sm"] // (warps * lim["warp_size"]),
               by_regs, lim["shared_per_sm"] // shared)


_CONSTANT = re.compile(r"constexpr\s+\w+\s+(k\w+)\s*=\s*([0-9][0-9\s*]*);")
_LAUNCH = re.compile(r"(\w+)\s*(?:<[^;{}]*?>)?\s*<<<(.*?)>>>", re.S)


def _constants():
    """The integer constants of csrc/cuda/cuda_utils.cuh (kThreads, kSmemTarget, ...)."""
    with open(os.path.join(CUDA_DIR, "cuda_utils.cuh")) as f:
        text = f.read()
    values = {}
    for name, expr in _CONSTANT.findall(text):
        value = 1
        for factor in expr.split("*"):
            value *= int(factor)
        values[name] = value
    return values


def _split_args(text):
    """Top-level comma-separated arguments of a <<<...>>> launch configuration."""
    args, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch in "(<[{"
        depth -= ch in ")>]}"
        if ch == "," and depth == 0:
            args.append(text[start:i].strip())
            start = i + 1
    return args + [text[start:].strip()]


def _launches(source):
    """{kernel: (threads per block, planned dynamic shared bytes)} of a source's launches, each
    None where unknown (the module's docstring says how the shared bytes are read)."""
    with open(source) as f:
        text = f.read()
    constants = _constants()
    target = constants.get("kSmemTarget") if "kSmemTarget" in text else None
    launches = {}
    for kernel, config in _LAUNCH.findall(text):
        args = _split_args(config)
        threads = int(args[1]) if args[1].isdigit() else constants.get(args[1])
        dynamic = 0 if len(args) < 3 else int(args[2]) if args[2].isdigit() else target
        launches[kernel] = (threads, dynamic)
    return launches


def source_profiles(source, ptxas_output, sass_by_arch=None):
    """Profile rows of the kernels one source compiled to (see ``cuda_kernel_profiles``),
    from nvcc's output and, where given, ``{arch: SASS listing}`` (None fields without)."""
    launches = _launches(source) if os.path.exists(source) else {}
    sass = {arch: sass_stats(text) for arch, text in (sass_by_arch or {}).items()}
    rows = []
    for rec in parse_resource_usage(ptxas_output):
        if not rec["entry"]:
            continue  # device functions: their frames count in their callers' cumulative stack
        kernel = short_name(rec["name"])
        # a source that launches its kernel's variants through one pointer has one launch
        only = next(iter(launches.values())) if len(launches) == 1 else (None, None)
        threads, dynamic = launches.get(kernel.split("<")[0], only)
        shared = rec["static_shared_bytes"] + (dynamic or 0)
        instr = sass.get(rec["arch"], {}).get(rec["mangled"], {})
        rows.append({
            "backend": "cuda",
            "source": os.path.relpath(source, ROOT),
            "kernel": kernel,
            "arch": rec["arch"],
            "registers": rec["registers"],
            "stack_bytes": max(rec["stack_bytes"], rec["cumulative_stack_bytes"]),
            "spill_store_bytes": rec["spill_store_bytes"],
            "spill_load_bytes": rec["spill_load_bytes"],
            "static_shared_bytes": rec["static_shared_bytes"],
            "dynamic_shared_bytes": dynamic,
            "threads": threads,
            "blocks_per_sm": (occupancy(rec["registers"], threads, shared, rec["arch"])
                              if threads and rec["arch"] in DEVICE_LIMITS else None),
            "sass_instructions": instr.get("instructions"),
            "tensor_core_instructions": instr.get("tensor_core"),
            "warpgroup_mma_instructions": instr.get("warpgroup_mma"),
            "local_memory_instructions": instr.get("local_memory"),
            "widest_global_load_bits": instr.get("widest_global_load_bits"),
            "widest_global_store_bits": instr.get("widest_global_store_bits"),
            "cp_async": instr.get("cp_async"),
            "ldmatrix": instr.get("ldmatrix"),
            "mma_loop_density": instr.get("mma_loop_density"),
        })
    return rows


def compiled_profiles(results, archs, jobs=2):
    """Profile rows of ``compile_sources``'s results (SASS read ``jobs`` objects at a time,
    if cuobjdump is found); raises if a source failed to compile."""
    for source, code, output, _, _ in results:
        if code != 0:
            raise RuntimeError(f"nvcc failed on {source} (exit {code}):\n{output[-4000:]}")

    def sass(obj):
        return {a: function_sass(obj, a) for a in archs} if cuobjdump_path() else None

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        listings = list(pool.map(sass, [obj for *_, obj in results]))
    return [row for (source, _, output, _, _), listing in zip(results, listings)
            for row in source_profiles(source, output, listing)]


def cuda_kernel_profiles(archs=(80, 90)):
    """One row per kernel of csrc/cuda/*.cu per architecture: ptxas's registers, stack (the
    kernel's frame plus those of functions it calls), spills and static shared memory; the
    planned dynamic shared memory and threads per block read from the launches, and the
    occupancy they give; the SASS instruction mix (None fields where cuobjdump is missing).
    Compiles the sources (minutes); raises if one fails."""
    with tempfile.TemporaryDirectory() as out_dir:
        return compiled_profiles(compile_sources(archs, out_dir), archs)


def resource_violations(rows):
    """What breaks the static resource rules in profile rows, one line per finding naming
    kernel and arch: no local-memory traffic (no spills, no stack frame, no LDL/STL where the
    SASS was read), registers within the per-thread limit, shared memory (static plus planned
    dynamic) within the per-block limit, and at least one resident block per multiprocessor."""
    found = []
    for r in rows:
        where = f"{r['kernel']} sm_{r['arch']}" + (f" ({r['source']})" if r.get("source") else "")
        lim = DEVICE_LIMITS[r["arch"]]
        if r["spill_store_bytes"] or r["spill_load_bytes"]:
            found.append(f"{where}: spills, {r['spill_store_bytes']} bytes stored and "
                         f"{r['spill_load_bytes']} bytes loaded")
        if r["stack_bytes"]:
            found.append(f"{where}: {r['stack_bytes']} bytes of stack (local memory)")
        if r.get("local_memory_instructions"):
            found.append(f"{where}: {r['local_memory_instructions']} local-memory instructions "
                         "(LDL/STL) in its SASS")
        if r["registers"] is not None and r["registers"] > lim["max_regs_per_thread"]:
            found.append(f"{where}: {r['registers']} registers per thread, over "
                         f"{lim['max_regs_per_thread']}")
        shared = r["static_shared_bytes"] + (r.get("dynamic_shared_bytes") or 0)
        if shared > lim["max_shared_per_block"]:
            found.append(f"{where}: {shared} bytes of shared memory per block (static "
                         f"{r['static_shared_bytes']}), over {lim['max_shared_per_block']}")
        if r.get("blocks_per_sm") == 0:
            found.append(f"{where}: no block fits a multiprocessor")
    return found


_COLUMNS = (("kernel", "kernel"), ("arch", "sm"), ("registers", "regs"), ("stack_bytes", "stack"),
            ("spill_store_bytes", "spill st"), ("spill_load_bytes", "spill ld"),
            ("static_shared_bytes", "smem"), ("dynamic_shared_bytes", "dyn smem"),
            ("threads", "threads"), ("blocks_per_sm", "blocks/SM"),
            ("sass_instructions", "instrs"), ("tensor_core_instructions", "tensor"),
            ("warpgroup_mma_instructions", "wgmma"),
            ("local_memory_instructions", "LDL/STL"), ("widest_global_load_bits", "ld bits"),
            ("widest_global_store_bits", "st bits"), ("cp_async", "LDGSTS"), ("ldmatrix", "LDSM"),
            ("mma_loop_density", "instr/MMA"))


def format_profiles(rows):
    """Profile rows as a plain-text table ("-" for unknown)."""
    cells = [[h for _, h in _COLUMNS]]
    cells += [["-" if r.get(k) is None else f"{r[k]:.1f}" if isinstance(r[k], float) else str(r[k])
               for k, _ in _COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths))) for row in cells)
