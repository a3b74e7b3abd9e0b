"""The pure helpers of benchmarks/bench_models_gpu.py (floor, traffic count, report), on CPU."""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import bench_models_gpu as B  # noqa: E402
import python_ref  # noqa: E402
from efficientvit_kernels import convert  # noqa: E402
from efficientvit_kernels.modules import LinearSqueezeExcite  # noqa: E402
from efficientvit_kernels.triton_static import Launch  # noqa: E402


def test_floor_is_the_slower_ceiling():
    assert B.floor_seconds(4e9, 1e12, 2e12, 1e15) == pytest.approx(2e-3)  # bytes bound
    assert B.floor_seconds(4e6, 1e12, 2e12, 1e14) == pytest.approx(1e-2)  # FLOPs bound


def test_traffic_counts_each_op_once():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True), nn.Identity(),
                          LinearSqueezeExcite(nn.Linear(4, 2), nn.Linear(2, 4)))
    activations, weights = B.model_traffic(model, torch.randn(1, 3, 2, 2))
    x, y = 3 * 4 * 4, 4 * 4 * 4  # bytes of the input and of every later activation
    # conv: x in, y out; ReLU and squeeze-excite: y in, y out; Identity and the squeeze-excite's
    # inner Linear layers: nothing
    assert activations == x + y + 2 * y + 2 * y
    assert weights == 4 * (4 * 3 + 4 + 4 * 2 + 2 + 2 * 4 + 4)


def test_traffic_of_a_converted_model_scales_with_batch():
    fused = convert(python_ref.build("m0"), backend="reference")
    one, weights = B.model_traffic(fused, torch.randn(1, 3, 32, 32))
    two, _ = B.model_traffic(fused, torch.randn(2, 3, 32, 32))
    assert two == 2 * one and one > 0
    assert weights == 4 * sum(t.numel() for t in (*fused.parameters(), *fused.buffers()))


def _lines():
    meta = dict(kind="meta", device="H200", torch="2.11", cuda="13.0", triton="3.6",
                date="2026-01-01T00:00:00", copy_bandwidth_bytes_per_s=4e12,
                matmul_flops_per_s=5e14, dtype="float16", resolution=224, layout="NCHW",
                compile_mode="default")
    work = dict(bytes=8e12, flops=1e15)  # floor: max(2 s, 2 s) = 2 s: 1024 img/s at batch 2048

    def time(backend, img_per_s, batch=2048):
        return dict(kind="time", model="m4", batch=batch, backend=backend, img_per_s=img_per_s,
                    us=batch / img_per_s * 1e6, **work)
    return [meta, time("eager", 100), time("cuda", 400), time("triton", 200),
            time("compile", 200), time("auto", 400),
            dict(kind="time", model="m4", batch=1, backend="eager", img_per_s=1000, **work),
            dict(kind="time", model="m4", batch=1, backend="compile", status="timeout"),
            dict(kind="check", model="m4", batch=2048, backend="eager", error=3e-3, ok=True),
            dict(kind="check", model="m4", batch=2048, backend="cuda", error=4e-3, ok=True),
            dict(kind="check", model="m4", batch=2048, backend="triton", error=2e-2, ok=False),
            dict(kind="note", text="m4: something to say")]


def test_report_rows_ratios_floor_and_failures():
    text = B.render(_lines())
    rows = [line for line in text.splitlines() if line.startswith("| m4 |")]
    assert rows[0].startswith("| m4 | 1 | 1000 | timeout | - | - |")  # batch 1 first
    assert rows[1] == ("| m4 | 2048 | 100 | 200 | 400 | 200 | 400 | 4.00x | 2.00x | 4.00x | 2.00x "
                       "| 1.00x | 2.00x | 1024 | 39% | 20% | 39% |")
    assert "| m4 | 2048 | 3.0e-03 | 4.0e-03 | 2.0e-02 FAIL | - |" in text
    assert "- m4: something to say" in text
    assert "4.00 TB/s" in text and "500 TFLOP/s" in text
    assert B.failures(_lines()) == ["m4 batch 2048 triton: error 2.0e-02"]


def test_report_without_meta_has_no_floor():
    rows = [line for line in B.render(_lines()[1:]).splitlines() if line.startswith("| m4 | 2048")]
    assert rows[0].endswith("| - | - | - | - |") and "1.00x" in rows[0]


# benchmarks/gpu_ops.py: the per-op-kind breakdown (its CUDA-event timing needs a GPU)
import gpu_ops as G  # noqa: E402


@pytest.mark.parametrize("name", ["m0", "m4"])
def test_reference_and_fused_split_into_the_same_ops(name):
    model = python_ref.build(name)
    kinds = [k for k, _ in G.ops_of(model)]
    assert kinds == [k for k, _ in G.ops_of(convert(model, backend="reference"))]
    depth = sum(python_ref.MODEL_CONFIGS[name]["depth"])
    # per block: two dwconv + ffn pairs and an attention; before and after each of the two
    # patch mergings one more pair
    assert {k: kinds.count(k) for k in G.KINDS} == {
        "stem": 1, "dwconv": 2 * depth + 4, "ffn": 2 * depth + 4, "attention": depth,
        "patch merging": 2, "head": 1}


def test_kind_work_counts_every_flop_once():
    model = python_ref.randomize_(python_ref.build("m0"))
    fused = convert(model, backend="reference")
    work = G.kind_work(model, fused, torch.randn(2, 3, 64, 64))
    assert sum(f for _, f in work.values()) == 2 * 2 * python_ref.count_macs(model, 64)
    assert all(b > 0 and f > 0 for b, f in work.values())


def test_restaged_weights_follow_the_design_point():
    fused = convert(python_ref.build("m4"), backend="reference")

    def weights(module):
        return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
    ffn = fused.blocks3[2][1]  # 384 channels: 64 rows a block, 98 pixels in two
    assert G.restaged_weight_bytes("ffn", ffn, torch.empty(2, 384, 7, 7)) == 2 * weights(ffn)
    attention = fused.blocks1[0].mixer
    # 14x14 in 7x7 windows: four windows an image, one a block
    assert G.restaged_weight_bytes("attention", attention, torch.empty(3, 128, 14, 14)) == (
        12 * weights(attention))
    assert G.restaged_weight_bytes("dwconv", attention, torch.empty(1, 128, 14, 14)) == 0
    # over a whole forward (the head, whose input is 2-D, included): the CUDA kernels' kinds
    restaged = G.restaged_bytes(fused, torch.randn(1, 3, 64, 64))
    assert set(restaged) == set(G.KINDS) and restaged["stem"] == restaged["head"] == 0
    assert restaged["ffn"] > 0 and restaged["attention"] > 0


def test_prediction_is_the_slower_ceiling_over_the_busy_share():
    # FLOPs bound: 1e12 FLOPs at half of 1e15; bytes bound: (1e9 + 5e9 / 2.5) / 1e12
    assert G.predict_ms(1e9, 1e12, 0, 16, 1e12, 1e15) == pytest.approx(2.0)
    assert G.predict_ms(1e9, 1e9, 5e9, 16, 1e12, 1e15) == pytest.approx(3.0)
    # 8 warps: half of the 16 that hide latency, twice the time
    assert G.predict_ms(1e9, 1e12, 0, 8, 1e12, 1e15) == pytest.approx(4.0)
    static = {G.KERNELS["ffn"]: dict(blocks_per_sm=2, threads=256),
              G.KERNELS["attention"]: dict(blocks_per_sm=1, threads=256)}
    work = {"ffn": (1e9, 1e12), "attention": (1e9, 1e12), "stem": (1e9, 1e12)}
    assert G.cuda_predictions(work, {"ffn": 5e9}, 1e12, 1e15, static) == pytest.approx(
        {"ffn": 2.0 * 1.5, "attention": 4.0, "stem": None})


def test_prediction_charges_each_mma_its_share():
    # wgmma (HGMMA in the row) at the whole matmul rate: 1e12 FLOPs at 1e15, not at half of it
    wgmma = dict(blocks_per_sm=2, threads=256, tensor_core_instructions=4,
                 warpgroup_mma_instructions=4)
    assert G.mma_share(wgmma) == G.WGMMA_SHARE == 1.0
    assert G.mma_share(dict(wgmma, warpgroup_mma_instructions=0)) == G.MMA_SYNC_SHARE == 0.5
    assert G.mma_share(dict(wgmma, tensor_core_instructions=0)) is None
    assert G.predict_ms(1e9, 1e12, 0, 16, 1e12, 1e15, G.mma_share(wgmma)) == pytest.approx(1.0)
    work = {"ffn": (1e9, 1e12)}
    assert G.cuda_predictions(work, {}, 1e12, 1e15, {G.KERNELS["ffn"]: wgmma}) == pytest.approx(
        {"ffn": 1.0})


def test_triton_restaged_weights_per_program():
    def kernel(name):
        return SimpleNamespace(fn=SimpleNamespace(__name__=name))
    ffn = Launch(kernel("_ffn_kernel"), (), {}, (8, 13))
    conv = Launch(kernel("_conv1x1_kernel"), (), {}, (100, 4))
    assert G.triton_restaged(ffn, 1000) == 8 * 13 * 1000  # every program reads them all
    assert G.triton_restaged(conv, 1000) == 100 * 1000  # each channel tile reads its share
    def _ffn_staged_kernel(x_ptr, w1_ptr):
        pass
    x = torch.empty(1, device="meta", dtype=torch.float16)
    staged = Launch(SimpleNamespace(fn=_ffn_staged_kernel), (x, None),
                    dict(BT=64, MP=512, C=240, BN=128), (6,))
    # the weights, and the hidden rows written once and read by each of 2 column tiles
    assert G.triton_restaged(staged, 1000) == 6 * 1000 + 6 * 64 * 512 * 2 * 3


def test_triton_prediction_counts_the_instructions_issued(monkeypatch):
    """A Triton kind takes at least its launches' static SASS, once per warp of each program,
    at the issue rate."""
    from efficientvit_kernels import triton_static
    monkeypatch.setattr(triton_static, "launch_key", lambda launch, arch: "row")
    def _cga_kernel(x_ptr, out_ptr):
        pass
    x, out = (torch.empty(1, device="meta") for _ in range(2))
    launch = Launch(SimpleNamespace(fn=_cga_kernel), (x, out), {}, (1000, 2))
    row = dict(blocks_per_sm=2, threads=256, sass_instructions=500)
    assert G.issued_instructions(launch, row) == 2000 * 8 * 500
    issue_ms = 2000 * 8 * 500 / G.ISSUE_RATE * 1e3
    launches = {"attention": [[[(launch, 0)]]]}
    predicted = G.triton_predictions(launches, {"attention": (1e3, 1e3)}, 1e12, 1e15,
                                     {"row": row})
    assert predicted["attention"] == pytest.approx(issue_ms)
    # where the bytes take longer, the bytes
    predicted = G.triton_predictions(launches, {"attention": (1e9, 1e3)}, 1e12, 1e15,
                                     {"row": row})
    assert predicted["attention"] == pytest.approx(1.0) and issue_ms < 1.0


def test_triton_product_flops_count_padding_and_taps():
    def _conv1x1_kernel(x_ptr, C):
        pass
    def _dwconv_kernel(x_ptr, C):
        pass
    conv = dict(BP=64, BN=64, BK=64, DEPTHWISE=False)
    launch = Launch(SimpleNamespace(fn=_conv1x1_kernel), (None, 100), conv, (10, 2))
    assert G.triton_product_flops(launch) == 20 * 2 * 64 * 64 * 128  # 100 channels: 2 steps
    launch = launch._replace(kwargs=dict(conv, DEPTHWISE=True))
    assert G.triton_product_flops(launch) == 9 * 20 * 2 * 64 * 64 * 128  # y at every tap
    ffn = Launch(SimpleNamespace(fn=SimpleNamespace(__name__="_ffn_kernel")), (),
                 dict(BT=32, CP=512, M=720, BM=64), (1, 7))
    assert G.triton_product_flops(ffn) == 7 * 4 * 32 * 512 * 768  # hidden: whole chunks
    staged = Launch(SimpleNamespace(fn=SimpleNamespace(__name__="_ffn_staged_kernel")), (),
                    dict(BT=64, C=240, MP=512, BK=64, BN=128), (5,))
    # first product over 4 steps of 64 channels, second over 2 tiles of 128 columns
    assert G.triton_product_flops(staged) == 5 * 2 * 64 * 512 * (256 + 256)
    assert G.triton_product_flops(Launch(SimpleNamespace(fn=_dwconv_kernel), (), {}, (4,))) == 0


def test_triton_intermediates_are_written_and_read_back():
    def kernel(x_ptr, w_ptr, out_ptr, C):
        pass
    def launch(x, out):
        return Launch(SimpleNamespace(fn=kernel), (x, torch.empty(5, device="meta"), out, 3), {})
    image, a, b, c = (torch.empty(n, 4, device="meta", dtype=torch.float16) for n in (8, 6, 4, 2))
    chain = [[(launch(image, a), 10)], [(launch(a, b), 10)], [(launch(b, c), 10)]]
    assert G.triton_intermediate_bytes(chain) == 2 * (6 * 4 * 2 + 4 * 4 * 2)
    assert G.triton_intermediate_bytes(chain[:1]) == 0  # one launch: the kind's own bytes
    # a module's launches reading only what others wrote: nothing of its own read back
    assert G.triton_intermediate_bytes([chain[0], [(launch(c, b), 10)]]) == 0
    # an output two launches read (squeeze-excite's input: its means, then its scaling)
    two_readers = [chain[0], [(launch(a, b), 10)], [(launch(a, c), 10)]]
    assert G.triton_intermediate_bytes(two_readers) == 3 * 6 * 4 * 2


# Runs where TRITON_INTERPRET is unset: the Triton launches of an M0 forward, on meta tensors.
TRITON_PREDICTIONS = r"""
import json, sys
import torch
sys.path.insert(0, "benchmarks")
import gpu_ops, python_ref
from efficientvit_kernels import convert
model = convert(python_ref.build("m0").eval(), backend="triton").half()
for batch in (1, 2048):
    x = torch.empty(batch, 3, 224, 224, dtype=torch.float16, device="meta")
    work = {k: (1e9, 1e12) for k in gpu_ops.KINDS}
    launches = gpu_ops.triton_launches(model, x)
    print(json.dumps([{k: sum(map(len, v)) for k, v in launches.items()},
                      gpu_ops.triton_predictions(launches, work, 1e12, 1e15,
                                                 gpu_ops.static_rows(backend="triton"))]))
"""


def test_static_profile_predicts_every_triton_launch():
    """Each kind's launches at batch 1 and 2048 are recorded, and each has its row in the
    committed static profile (a profile not regenerated after a kernel's constexprs changed
    would leave a kind unpredicted); the head runs no Triton kernel."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", TRITON_PREDICTIONS], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    depth = sum(python_ref.MODEL_CONFIGS["m0"]["depth"])
    for line in proc.stdout.splitlines():
        counts, predicted = json.loads(line)
        # the stem: two launches, each a pair of convolutions (M0's are narrow); each dwconv
        # in the kernel of the FFN after it; PatchMerging: its 1x1 convolutions, squeeze-excite's
        # means, gates and scaling
        assert counts == {"stem": 2, "ffn": 2 * depth + 4, "attention": depth,
                          "patch merging": 2 * 5, "head": 0}
        unpredicted = [k for k, ms in predicted.items() if ms is None]
        assert unpredicted == ["head"] and predicted["dwconv"] == 0
        assert all(ms > 0 for k, ms in predicted.items() if k not in ("head", "dwconv"))


def test_report_has_the_op_table():
    ms = {k: 1.0 for k in G.KINDS} | {"other": 0.5, "forward": 6.5}
    floor = {k: 0.25 for k in G.KINDS}
    lines = _lines() + [
        dict(kind="ops", model="m4", batch=2048, backend="eager", ms=ms, floor_ms=floor,
             predicted_ms=None),
        dict(kind="ops", model="m4", batch=2048, backend="cuda", ms=dict(ms, ffn=3.0),
             floor_ms=floor, predicted_ms={k: 1.5 if k == "ffn" else None for k in G.KINDS})]
    text = B.render(lines)
    assert "| ffn | 1.000 | 3.000 | 1.500 | 2.00x | 0.250 |" in text
    assert "| forward | 6.500 | 6.500 | - | - | - |" in text
    # a kind predicted to cost nothing (Triton's dwconv runs inside the FFN): no ratio, no error
    lines[-1]["predicted_ms"]["dwconv"] = 0.0
    assert "| dwconv | 1.000 | 1.000 | 0.000 | - | 0.250 |" in B.render(lines)


def test_ncu_table_of_the_first_gpu_profile():
    """benchmarks/ncu_table.py on the committed counters of the H200's M0 forward (batch 256):
    every launch counted once, the largest total first."""
    import ncu_table
    path = os.path.join(ROOT, "benchmarks", "results", "gpu_profile_2026-12-04", "ncu_cuda.csv.gz")
    launches, units = ncu_table.read(path)
    rows = ncu_table.rows(launches, units)
    assert len(launches) == 96 and sum(r["launches"] for _, r in rows) == 96
    (name, grid), top = rows[0]
    assert name == "efficientvit::<unnamed>::ffn_kernel<c10::Half>" and top["launches"] == 7
    assert [r["us"] for _, r in rows] == sorted((r["us"] for _, r in rows), reverse=True)
    assert sum(r["us"] for _, r in rows) == pytest.approx(2481.1, abs=0.1)
    text = ncu_table.table(path)
    assert "| `efficientvit::<unnamed>::cga_kernel<c10::Half>` | 1 | 329.2 |" in text
    assert "wait 2.5, barrier 1.2, selected 1.0" in text  # the three largest stall reasons


def test_gpu_predict_prints_every_kind_without_a_gpu():
    """benchmarks/gpu_predict.py: each kind's floor and predictions for M0 from the committed
    profile; with dwconv_ffn the dwconv kind is inside the FFN's launches (0 ms of its own)."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "benchmarks/gpu_predict.py", "--models", "m0"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {line.split(" | ")[1]: line.strip(" |").split(" | ")[2:]
            for line in proc.stdout.splitlines() if line.startswith("| m0 |")}
    assert set(rows) == {*G.KINDS, "**total**"}
    triton, unpaired, cuda = (float(v) for v in rows["dwconv"][1:])
    assert triton == 0 < unpaired and cuda > 0
    assert rows["stem"][3] == "-" and float(rows["**total**"][1]) < float(rows["**total**"][2])


def test_smoke_calls_hold_their_references():
    """bench_gpu.smoke_calls: each call's reference is what its op computes, checked by running
    the calls in Triton's interpreter: fp32 and fp16 (its bf16 is not faithful), but the large
    FFN (half a minute there; the GPU runs them all)."""
    triton = pytest.importorskip("efficientvit_kernels.triton")
    import bench_gpu
    from efficientvit_kernels.testing import TOLERANCE, relative_error
    calls = [(op, args, reference) for op, args, reference in bench_gpu.smoke_calls("cpu")
             if args[0].dtype != torch.bfloat16 and args[0].numel() < 1e6]
    assert len(calls) == 12
    for op, args, reference in calls:
        out = getattr(triton, op)(*args)
        assert relative_error(out, reference()) < TOLERANCE[out.dtype], op
