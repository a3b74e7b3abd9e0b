"""Deployment paths of a converted model: torch.export saved and loaded in a fresh process
(which registers the ops with `import efficientvit_kernels`), an AOTInductor package likewise,
both packing the CPU weights once, not on every call; cpu_graph's C++ replay and export_cpu's
program of one op (its plan read back, checked and cached); torch.jit.trace,
torch.jit.script refused with a way out, and ONNX through the reference backend (where onnx
and onnxruntime are installed: bootstrap.sh --bench)."""
import copy
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import efficientvit_kernels as K
import python_ref as R
from efficientvit_kernels.plan import encode as encode_plan
from efficientvit_kernels.testing import assert_close, packings, profiled_calls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def fused():
    return K.convert(R.randomize_(R.build("m0"), seed=3).eval())


# Run in a fresh process after `import efficientvit_kernels` (which registers the ops): the
# loaded model's output against the expected one, and no packing on its second call.
CHECK_LOADED = """
import sys, torch, efficientvit_kernels
from efficientvit_kernels.testing import packings
x, expected = torch.load(sys.argv[2])
with torch.no_grad():
    model = LOAD(sys.argv[1])
    out = model(x)
    repacked = packings(lambda: model(x))
assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5), (out - expected).abs().max()
assert repacked == 0, repacked
"""


def _check_in_fresh_process(load, path, fused, tmp_path):
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        torch.save((x, fused(x)), tmp_path / "expected.pt")
    code = CHECK_LOADED.replace("LOAD", load)
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "expected.pt")],
                          capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_exported_program_loads_in_a_fresh_process(fused, tmp_path):
    path = tmp_path / "m0.pt2"
    torch.export.save(torch.export.export(fused, (torch.randn(2, 3, 96, 96),)), path)
    _check_in_fresh_process("(lambda p: torch.export.load(p).module())", path, fused, tmp_path)


def test_aoti_package_loads_in_a_fresh_process(fused, tmp_path):
    """AOTInductor: compiled ahead of time to a package, loaded without Python's model code."""
    program = torch.export.export(fused, (torch.randn(2, 3, 96, 96),))
    path = torch._inductor.aoti_compile_and_package(program,
                                                    package_path=str(tmp_path / "m0_aoti.pt2"))
    _check_in_fresh_process("torch._inductor.aoti_load_package", path, fused, tmp_path)


def test_cpu_graph_replays_the_model(fused):
    """The same kernels on the same weights: the same values, bit for bit, for any input of the
    captured shape; the fused ops as their kernels on weights packed at capture."""
    x = torch.randn(2, 3, 96, 96)
    run = K.cpu_graph(fused, x)
    for y in (x, torch.randn(2, 3, 96, 96).to(memory_format=torch.channels_last)):
        with torch.no_grad():
            assert torch.equal(run(y), fused(y))
    names = set(profiled_calls(lambda: run(x)))
    assert {f"efficientvit_cpu::{op}_packed" for op in ("cga", "ffn", "conv1x1", "patch_embed")} <= names
    assert not names & {f"efficientvit::{op}" for op in ("cga", "ffn", "conv1x1", "patch_embed")}
    assert packings(lambda: run(x)) == 0
    with torch.enable_grad():  # the replay records no graph
        assert not run(x).requires_grad


def test_cpu_graph_of_an_exported_program(fused, tmp_path):
    """A program exported and saved, loaded elsewhere: replayed as the model would be, on its
    kernels; one exported for another shape, or for a dynamic one, is refused."""
    x = torch.randn(1, 3, 64, 64)
    torch.export.save(torch.export.export(fused, (x,)), tmp_path / "m.pt2")
    run = K.cpu_graph(torch.export.load(tmp_path / "m.pt2"), x)
    with torch.no_grad():
        assert torch.equal(run(x), fused(x))
    assert "efficientvit_cpu::ffn_packed" in set(profiled_calls(lambda: run(x)))
    with pytest.raises(ValueError, match="exported for"):
        K.cpu_graph(torch.export.load(tmp_path / "m.pt2"), torch.randn(2, 3, 64, 64))
    two = torch.randn(2, 3, 64, 64)
    dynamic = torch.export.export(fused, (two,), dynamic_shapes=({0: torch.export.Dim("batch", max=8)},))
    with pytest.raises(ValueError, match="exported for"):
        K.cpu_graph(dynamic, two)


def test_cpu_graph_takes_the_weights_at_capture(fused):
    model = copy.deepcopy(fused)
    x = torch.randn(1, 3, 64, 64)
    run = K.cpu_graph(model, x)
    before = run(x)
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.mul_(2)
    assert torch.equal(run(x), before)


def test_cpu_graph_checks_its_input(fused):
    x = torch.randn(1, 3, 64, 64)
    run = K.cpu_graph(fused, x)
    for bad in (torch.randn(2, 3, 64, 64), x.double(), x.numpy()):
        with pytest.raises(ValueError, match="captured for"):
            run(bad)
    with pytest.raises(ValueError, match="CPU tensor"):
        K.cpu_graph(fused, x.to("meta"))


class _MaxOverChannels(nn.Module):
    """An op with two outputs (values, indices), one of them used."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.randn(5, 1, 1))

    def forward(self, x):
        return torch.max(x * self.scale, dim=1).values.relu()


class _CountsCalls(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)
        return x * 2


class _TwoOutputs(nn.Module):
    def forward(self, x):
        return x.relu(), x.sigmoid()


def test_cpu_graph_of_other_modules():
    """Any op runs through the dispatcher: a reference model (convolutions, batch norm, the
    attention's indexing) and an op with two outputs; a graph no program holds is refused."""
    model = R.randomize_(R.build("m0"), seed=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(K.cpu_graph(model, x)(x), model(x), torch.float32)
        x5, max_over_channels = torch.randn(2, 5, 3, 4), _MaxOverChannels()
        assert torch.equal(K.cpu_graph(max_over_channels, x5)(x5), max_over_channels(x5))
    with pytest.raises(NotImplementedError, match="writes to its buffers"):
        K.cpu_graph(_CountsCalls(), x)
    with pytest.raises(NotImplementedError, match="one computed tensor"):
        K.cpu_graph(_TwoOutputs(), x)


def test_program_checks_its_steps():
    program = torch.classes.efficientvit_cpu.Program()
    with pytest.raises(ValueError, match="takes 1 arguments"):
        program.add_op("aten::relu", "", [], [], [])
    with pytest.raises(ValueError, match="no earlier step"):
        program.add_op("aten::relu", "", [None], [1], [[]])
    with pytest.raises(ValueError, match="not a list of tensors"):
        program.add_op("aten::sum", "dim_IntList", [None, None, False, None], [0, -1, -1, -1],
                       [[], [0], [], []])
    with pytest.raises(RuntimeError, match="not finished"):
        program.run(torch.zeros(1))


def test_export_cpu_is_one_op_on_the_models_kernels(fused):
    """One node, the program, computing what the model does bit for bit, on any layout of the
    input; its first call packs the weights, later calls run the packed kernels."""
    x = torch.randn(2, 3, 96, 96)
    exported = K.export_cpu(fused, x)
    calls = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.efficientvit_cpu.program.default]
    run = exported.module()
    torch.ops.efficientvit_cpu.clear_packing_cache()  # builds again, as in a fresh process
    with torch.no_grad():
        assert packings(lambda: run(x)) > 0
        for y in (x, torch.randn(2, 3, 96, 96).to(memory_format=torch.channels_last)):
            assert torch.equal(run(y), fused(y))
    names = set(profiled_calls(lambda: run(x)))
    assert {f"efficientvit_cpu::{op}_packed" for op in ("cga", "ffn", "conv1x1", "patch_embed")} <= names
    assert packings(lambda: run(x)) == 0
    with pytest.raises(AssertionError, match="Guard failed"):  # .module() checks the shape
        run(torch.randn(1, 3, 96, 96))
    plan, sizes = exported.state_dict["plan"], ([2, 3, 96, 96], torch.float32, [2, 1000])
    with pytest.raises(ValueError, match="captured for"):
        torch.ops.efficientvit_cpu.program(x.double(), plan, *sizes, torch.float32)
    with pytest.raises(ValueError, match="its plan takes"):  # the op's arguments are checked
        torch.ops.efficientvit_cpu.program(x, plan, *sizes, torch.float64)
    with torch.no_grad():  # schema, fake (meta) implementation, AOT dispatch
        torch.library.opcheck(torch.ops.efficientvit_cpu.program.default,
                              (x, plan, *sizes, torch.float32))


def test_export_cpu_saved_loads_in_a_fresh_process(fused, tmp_path):
    path = tmp_path / "m0_one_op.pt2"
    torch.export.save(K.export_cpu(fused, torch.randn(2, 3, 96, 96)), path)
    _check_in_fresh_process("(lambda p: torch.export.load(p).module())", path, fused, tmp_path)


def test_export_cpu_aoti_package_loads_in_a_fresh_process(fused, tmp_path):
    exported = K.export_cpu(fused, torch.randn(2, 3, 96, 96))
    path = torch._inductor.aoti_compile_and_package(
        exported, package_path=str(tmp_path / "m0_one_op_aoti.pt2"))
    _check_in_fresh_process("torch._inductor.aoti_load_package", path, fused, tmp_path)


def test_export_cpu_takes_the_weights_at_export(fused):
    """Each program its own weights: two exports of one model, one after its weights changed,
    each computing the model as it was (the programs are cached by their plan's digest)."""
    model = copy.deepcopy(fused)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        before, run_before = model(x), K.export_cpu(model, x).module()
        for t in [*model.parameters(), *model.buffers()]:
            t.mul_(1.5)
        after, run_after = model(x), K.export_cpu(model, x).module()
        assert not torch.equal(before, after)
        for _ in range(2):
            assert torch.equal(run_before(x), before) and torch.equal(run_after(x), after)


def test_export_cpu_of_other_modules():
    """Any op: a reference model (convolutions, batch norm, the attention's indexing; an
    exported program of it) and an op with two outputs, numbers and lists among their arguments."""
    model = R.randomize_(R.build("m0"), seed=4).eval()
    x = torch.randn(1, 3, 64, 64)
    exported = torch.export.export(model, (x,))
    x5, max_over_channels = torch.randn(2, 5, 3, 4), _MaxOverChannels()
    with torch.no_grad():
        assert_close(K.export_cpu(exported, x).module()(x), model(x), torch.float32)
        assert torch.equal(K.export_cpu(max_over_channels, x5).module()(x5), max_over_channels(x5))
    with pytest.raises(NotImplementedError, match="writes to its buffers"):
        K.export_cpu(_CountsCalls(), x)
    with pytest.raises(ValueError, match="exported for"):
        K.export_cpu(exported, torch.randn(2, 3, 64, 64))


def test_plan_holds_only_what_it_can_and_is_checked_when_read():
    """A plan is read back exactly (numbers, strings, lists, tensors of each dtype) and checked
    against its own size: a plan that is cut short, not a plan, or not a uint8 CPU vector
    is refused, not read past its end."""
    x = torch.randn(3, 4)
    weights = {dtype: torch.arange(12).reshape(3, 4).to(dtype)
               for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16,
                             torch.int64, torch.int32, torch.bool)}

    def program(plan):
        return torch.ops.efficientvit_cpu.program(x, plan, [3, 4], torch.float32, [3, 4],
                                                  torch.float32)

    steps = [("add_op", ("aten::add", "Tensor", [None, w, 0.5], [0, -1, -1], [[], [], []]))
             for w in weights.values()]
    steps += [("add_op", ("aten::div", "Tensor_mode", [None, 3.0, "floor"],
                          [len(steps), -1, -1], [[], [], []])),
              ("finish", ([[]] * (len(steps) + 1), len(steps) + 1))]
    steps[len(weights) - 1] = ("add_op", ("aten::add", "Tensor", [None, None, 0.5], [0, 0, -1],
                                          [[], [], []]))  # the last add reads x twice
    plan = encode_plan(steps, x, x)
    assert torch.equal(program(plan), torch.div(x + 0.5 * x, 3.0, rounding_mode="floor"))
    for bad, match in ((plan[:-1], "does not fit"), (plan[:40], "uint8 CPU tensor"),
                       (torch.cat([plan[8:16], plan[8:]]), "not a plan"),
                       (plan.view(torch.int64), "uint8 CPU tensor")):
        with pytest.raises(ValueError, match=match):
            program(bad)
    with pytest.raises(NotImplementedError, match="cannot hold"):
        encode_plan([("add_op", ("aten::relu", "", [torch.device("cpu")], [-1], [[]]))], x, x)


def test_trace_records_the_ops(fused):
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        traced = torch.jit.trace(fused, (x,), check_trace=False)
        assert "efficientvit::cga" in str(traced.inlined_graph)
        y = torch.randn(2, 3, 96, 96)
        assert_close(traced(y), fused(y), torch.float32)


def test_script_is_refused_with_a_way_out(fused):
    with pytest.raises(RuntimeError, match="torch.export"):
        torch.jit.script(fused)


def test_onnx_through_the_reference_backend(tmp_path):
    """The fused ops have no ONNX form; a model converted with backend="reference" (folded,
    plain PyTorch ops) exports, and ONNX Runtime computes what it computes."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")  # torch.onnx's exporter (the older one misreads the windows)
    model = K.convert(R.randomize_(R.build("m0"), seed=5).eval(), backend="reference")
    x = torch.randn(2, 3, 96, 96)
    path = str(tmp_path / "m0.onnx")
    torch.onnx.export(model, (x,), path, input_names=["x"], output_names=["y"], dynamo=True)
    onnx.checker.check_model(path)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        assert_close(torch.from_numpy(session.run(None, {"x": x.numpy()})[0]), model(x), torch.float32)
