"""backend="auto" on a GPU (efficientvit_kernels/auto_backend.py): the per-device table of
measured choices, with timings given, so that its logic runs on CPU; and that on CPU "auto"
never measures. (tests/test_gpu.py runs a model on "auto" on the GPU.)"""
import json

import pytest
import torch

import efficientvit_kernels as K
import python_ref as R
from efficientvit_kernels import auto_backend
from efficientvit_kernels.testing import random_ffn_params


def timed(ms):
    """A timer giving each candidate the time ``ms`` maps its name to, and the names timed."""
    names = []

    def timer(fn):
        name = fn()
        names.append(name)
        return ms[name]
    return timer, names


def candidates(*names):
    return {name: (lambda name=name: name) for name in names}


def test_fastest_measured_then_kept(tmp_path):
    path = str(tmp_path / "sub" / "backends.json")
    timer, names = timed({"cuda": 2.0, "triton": 1.5, "reference": 3.0})
    table = auto_backend.BackendTable(path, timer)
    both = candidates("cuda", "triton", "reference")
    assert table.choose("ffn a", both, lambda op: op()) == "triton"
    assert names == ["cuda", "triton", "reference"]
    assert table.choose("ffn a", both, lambda op: op()) == "triton" and len(names) == 3
    table.timer, names = timed({"cuda": 1.0, "triton": 2.0, "reference": 3.0})  # another shape
    assert table.choose("ffn b", both, lambda op: op()) == "cuda"
    with open(path) as f:
        assert json.load(f)["choices"] == {"ffn a": "triton", "ffn b": "cuda"}

    def never(fn):
        raise AssertionError("a choice on file was measured again")
    reloaded = auto_backend.BackendTable(path, never)
    assert reloaded.choose("ffn a", both, lambda op: op()) == "triton"
    assert reloaded.choose("ffn b", both, lambda op: op()) == "cuda"


def test_eager_wins_where_it_is_fastest():
    timer, _ = timed({"cuda": 2.0, "triton": 1.5, "reference": 0.5})
    table = auto_backend.BackendTable(None, timer)
    assert table.choose("k", candidates("cuda", "triton", "reference"), lambda op: op()) == "reference"


def test_a_candidate_that_raises_is_left_out():
    def call(op):
        if op() == "cuda":
            raise RuntimeError("efficientvit: the attention needs more shared memory")
        return op()
    timer, names = timed({"triton": 2.0, "reference": 3.0})
    table = auto_backend.BackendTable(None, timer)
    assert table.choose("k", candidates("cuda", "triton", "reference"), call) == "triton"

    def bad_input(op):  # the plain-PyTorch definition raising: the call itself is wrong
        raise ValueError("efficientvit: w1 must have shape [16, 8]")
    with pytest.raises(ValueError, match="w1 must have shape"):
        auto_backend.BackendTable(None, timer).choose("k", candidates("cuda", "reference"),
                                                      bad_input)


def test_a_choice_no_longer_available_is_measured_again(tmp_path):
    path = str(tmp_path / "backends.json")
    with open(path, "w") as f:
        json.dump({"choices": {"k": "cuda"}}, f)
    timer, names = timed({"triton": 2.0, "reference": 3.0})
    table = auto_backend.BackendTable(path, timer)  # a machine without the CUDA kernels
    assert table.choose("k", candidates("triton", "reference"), lambda op: op()) == "triton"
    assert names == ["triton", "reference"]


def test_an_unreadable_file_is_measured_again(tmp_path):
    path = tmp_path / "backends.json"
    path.write_text("{not json")
    timer, _ = timed({"triton": 2.0, "reference": 1.0})
    table = auto_backend.BackendTable(str(path), timer)
    assert table.choose("k", candidates("triton", "reference"), lambda op: op()) == "reference"
    assert json.loads(path.read_text())["choices"] == {"k": "reference"}


def test_signature_tells_apart_what_speed_depends_on():
    x = torch.randn(2, 16, 7, 7)
    w = random_ffn_params(16, 32, dtype=torch.float32)
    key = auto_backend.signature("ffn", x, (*w, True))
    assert key == auto_backend.signature("ffn", torch.randn(2, 16, 7, 7), (*w, True))
    others = [auto_backend.signature("ffn", x.half(), (*w, True)),
              auto_backend.signature("ffn", torch.randn(4, 16, 7, 7), (*w, True)),
              auto_backend.signature("ffn", x.to(memory_format=torch.channels_last), (*w, True)),
              auto_backend.signature("ffn", x, (*w, False)),
              auto_backend.signature("squeeze_excite", x, w),
              auto_backend.signature("patch_embed", x, ([w[0][:, :, None, None]], [w[1]], False))]
    assert len({key, *others}) == 1 + len(others)


def test_cpu_auto_never_measures(monkeypatch):
    """On CPU, "auto" is the CPU kernels: the table is never consulted."""
    def fail(*args):
        raise AssertionError("auto_backend.call on a CPU tensor")
    monkeypatch.setattr(auto_backend, "call", fail)
    model = R.randomize_(R.build("m0"), seed=3)
    with torch.no_grad():
        out = K.convert(model)(torch.randn(1, 3, 64, 64))
    assert out.shape == (1, 1000)


def test_call_measures_once_per_module_and_input(monkeypatch):
    """auto_backend.call on its own (with CPU tensors standing in for CUDA ones): the first
    call of a module on an input's signature measures and keeps the choice; a repeat skips the
    signature and the table; a new shape, or a capture, goes back to the table, and a capture
    never measures (an op it has not measured runs the dispatcher's kernel, not kept)."""
    ran, signatures = [], []
    ops = {name: (lambda x, *args, name=name: ran.append(name) or x) for name in ("triton", "reference")}
    monkeypatch.setattr(auto_backend, "_candidates", lambda op: ops)
    signature = auto_backend.signature
    monkeypatch.setattr(auto_backend, "signature",
                        lambda *a: signatures.append(a[0]) or signature(*a))
    measured = []

    def timer(fn):  # runs the candidate once: its time by the name it ran as
        fn()
        measured.append(ran[-1])
        return {"triton": 1.0, "reference": 2.0}[ran[-1]]
    device_table = auto_backend.BackendTable(None, timer)
    monkeypatch.setattr(auto_backend, "table", lambda device: device_table)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    module, x = torch.nn.Identity(), torch.randn(1, 8, 4, 4)
    args = tuple(random_ffn_params(8, 16, dtype=torch.float32)) + (True,)
    auto_backend.call(module, "ffn", x, args)
    assert measured == ["triton", "reference"] and ran[-1] == "triton" and len(signatures) == 1
    auto_backend.call(module, "ffn", torch.randn(1, 8, 4, 4), args)
    assert len(measured) == 2 and ran[-1] == "triton" and len(signatures) == 1  # the repeat
    capturing[0] = True
    dispatcher = []
    monkeypatch.setattr(torch.ops.efficientvit.ffn, "default", lambda x, *a: dispatcher.append(1) or x)
    auto_backend.call(module, "ffn", torch.randn(2, 8, 4, 4), args)  # not measured: dispatcher
    assert dispatcher == [1] and len(measured) == 2 and len(signatures) == 2
    capturing[0] = False
    auto_backend.call(module, "ffn", torch.randn(2, 8, 4, 4), args)  # measured now
    assert len(measured) == 4 and len(signatures) == 3
    capturing[0] = True
    auto_backend.call(torch.nn.Identity(), "ffn", torch.randn(2, 8, 4, 4), args)  # a known one
    assert dispatcher == [1] and len(measured) == 4 and ran[-1] == "triton"
