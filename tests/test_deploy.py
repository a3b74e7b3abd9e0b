"""Deployment paths of a converted model: torch.export saved and loaded in a fresh process
(which registers the ops with `import efficientvit_kernels`), an AOTInductor package likewise,
both packing the CPU weights once, not on every call; torch.jit.trace,
torch.jit.script refused with a way out, and ONNX through the reference backend (where onnx
and onnxruntime are installed: bootstrap.sh --bench)."""
import os
import subprocess
import sys

import pytest
import torch

import efficientvit_kernels as K
import python_ref as R
from efficientvit_kernels.testing import assert_close

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
