"""A converted model's calls on CPU replayed as one C++ program (cpu_replay): the same values as
module by module, bit for bit; no Python between the ops once captured; and module by module
again wherever the program would differ from the modules: hooks, training mode, gradients,
tracing, a changed model. Weights changed after capture are used. Under torch.compile, a call
without gradients is one op that does the same."""
import concurrent.futures
import copy
import os
import pickle
import sys
import warnings

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

import efficientvit_kernels as K
import python_ref as R
from efficientvit_kernels.testing import assert_close, packings, profiled_calls


@pytest.fixture(scope="module")
def model():
    return R.randomize_(R.build("m0"), seed=5).eval()


@pytest.fixture
def fused(model):
    return K.convert(model)


TORCH_DIR = os.path.dirname(torch.__file__)


def forwards(fn):
    """How many Python forward methods of models run in fn() (not torch's own or a generated
    one, as torch.compile's)."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += (event == "call" and frame.f_code.co_name == "forward"
                  and not frame.f_code.co_filename.startswith((TORCH_DIR, "<")))

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


def replayed(model, x):
    """model(x), and whether it ran without Python forwards (the replay)."""
    out = []
    return forwards(lambda: out.append(model(x))) == 0, out[0]


X = torch.randn(2, 3, 96, 96)


@torch.no_grad()
def test_replay_matches_the_modules_bit_for_bit(model):
    fused, plain = K.convert(model), K.convert(model, cpu_replay=False)
    channels_last = X.to(memory_format=torch.channels_last)
    for x in (X, torch.randn(1, 3, 64, 64), channels_last):
        expected = plain(x)
        is_replayed, out = replayed(fused, x)  # a first call: the modules
        assert not is_replayed and torch.equal(out, expected)
        # the second captures (the ops' packings, from their cache), then runs the program
        assert packings(lambda: torch.equal(fused(x), expected)) == 0
        assert torch.equal(fused(x), expected)
        is_replayed, out = replayed(fused, x)
        assert is_replayed and torch.equal(out, expected)
    names = set(profiled_calls(lambda: fused(X)))  # the kernels on packed weights, no op call
    ops = ("cga", "ffn", "conv1x1", "patch_embed")
    assert {f"efficientvit_cpu::{op}_packed" for op in ops} <= names
    assert not names & {f"efficientvit::{op}" for op in ops}
    assert packings(lambda: fused(X)) == 0
    assert_close(fused(X), model(X), torch.float32)
    assert forwards(lambda: plain(X)) > 0 and forwards(lambda: plain(X)) > 0


@torch.no_grad()
def test_weights_changed_after_capture_are_used(model):
    fused, plain = K.convert(model), K.convert(model, cpu_replay=False)
    fused(X), fused(X), plain(X)
    for m in (fused, plain):  # in place, as load_state_dict does
        m.head.weight.mul_(-1)
        m.blocks1[0].mixer.qkv_weight.mul_(0.5)
    expected = plain(X)
    # the attention's and the classifier's, once each
    assert packings(lambda: torch.equal(fused(X), expected)) == 2
    assert torch.equal(fused(X), plain(X)) and packings(lambda: fused(X)) == 0
    assert replayed(fused, X)[0]
    bias, b2 = torch.randn(1000), torch.randn_like(plain.blocks1[0].ffn0.b2)
    for m in (fused, plain):  # through .data: seen once the packings are cleared
        m.blocks1[0].ffn0.w1.data.mul_(-1)
    K.ops.clear_packing_cache()
    assert torch.equal(fused(X), plain(X))
    for m in (fused, plain):  # replaced: the model changed, captured again
        m.head.bias = bias.clone()
        m.blocks1[0].ffn0.b2 = b2.clone()
    expected = plain(X)
    for _ in range(3):
        assert torch.equal(fused(X), expected)
    assert replayed(fused, X)[0]
    w1 = -plain.blocks1[0].ffn0.w1  # swapped in without an attribute set
    swapped = {"blocks1.0.ffn0.w1": w1}
    expected = torch.func.functional_call(plain, swapped, (X,))
    for _ in range(2):
        assert torch.equal(torch.func.functional_call(fused, swapped, (X,)), expected)
    assert torch.equal(fused(X), plain(X))
    for m in (fused, plain):  # a fused module's flag (its attributes are compared after a set)
        m.blocks1[0].ffn0.residual = False
    assert torch.equal(fused(X), plain(X))
    fused(X)
    assert replayed(fused, X)[0]
    fused.head = plain.head = nn.Linear(192, 10)  # a module replaced
    assert torch.equal(fused(X), plain(X)) and fused(X).shape == (2, 10)


@torch.no_grad()
@pytest.mark.parametrize("dict_versions", [True, False], ids=["dict_versions", "values_only"])
def test_the_check_reads_dict_versions_and_compares_values_where_they_moved(
        model, monkeypatch, dict_versions):
    """Unchanged dicts cost a look at their versions, no comparison of their values; a value
    changed back is compared and replays again; without dict versions (Python 3.14 on) the
    values are compared at every call, and changes are seen alike."""
    if not dict_versions:  # as on Python 3.14, where the C call has no versions to check either
        monkeypatch.setattr(K.graphs._C, "max_dict_version", lambda dicts: None)
        monkeypatch.setattr(K.graphs._C, "fast_call_for", lambda *args: None)
    compared = []
    of = K.graphs._Values.of
    monkeypatch.setattr(K.graphs._Values, "of", staticmethod(lambda d: compared.append(1) or of(d)))
    fused, plain = K.convert(model), K.convert(model, cpu_replay=False)
    fused(X), fused(X)
    compared.clear()
    assert replayed(fused, X)[0] and replayed(fused, X)[0]
    assert len(compared) == (0 if dict_versions else 2)
    fused.blocks1.training = True
    fused.blocks1.training = False  # changed back: the values compared, the same
    assert replayed(fused, X)[0] and len(compared) == (1 if dict_versions else 3)
    assert replayed(fused, X)[0] and len(compared) == (1 if dict_versions else 4)  # versions taken
    for m in (fused, plain):
        m.blocks1[0].ffn0 = copy.deepcopy(m.blocks1[0].ffn1)  # a module replaced
    expected = plain(X)
    for _ in range(3):
        assert torch.equal(fused(X), expected)
    assert replayed(fused, X)[0]


@torch.no_grad()
def test_hooks_training_and_gradients_run_the_modules(fused):
    fused(X), fused(X)
    assert replayed(fused, X)[0]
    seen = []
    handle = fused.blocks1[0].mixer.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    out = fused(X)
    assert len(seen) == 1
    handle.remove()
    assert torch.equal(out, fused(X)) and replayed(fused, X)[0]
    handle = fused.register_forward_pre_hook(lambda m, i: seen.append("root"))
    fused(X)
    assert seen[-1] == "root"
    handle.remove()
    fused.train()
    assert not replayed(fused, X)[0]
    fused.eval()  # as captured: the program again
    assert replayed(fused, X)[0]
    fused.head.weight.requires_grad_(True)
    with torch.enable_grad(), pytest.raises(RuntimeError, match="no backward formula"):
        fused(X)  # the modules, which refuse to record the head's gradient (the op's error)
    with torch.no_grad():
        assert replayed(fused, X)[0]  # nothing to record


def test_gradient_mode_inference_mode_and_other_inputs(fused):
    with torch.enable_grad():
        fused(X), fused(X)
        is_replayed, out = replayed(fused, X)
        assert is_replayed and not out.requires_grad
        x = X.clone().requires_grad_()
        for _ in range(2):  # the modules' error, not a replay without gradients
            with pytest.raises(RuntimeError, match="no backward formula"):
                fused(x)
    with torch.inference_mode():
        x = torch.randn(1, 3, 80, 80)
        fused(x), fused(x)  # captured inside inference mode
        assert replayed(fused, x)[0]
    with torch.no_grad():
        assert not replayed(fused, nn.Parameter(X))[0]


class _OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


class _FunctionNames(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def test_modes_global_hooks_and_functorch_run_the_modules(fused):
    """Once replayed, a call amid a dispatch or torch-function mode, with a global module hook,
    or on a functorch tensor (the checks of the call's C fast path) runs the modules."""
    expected = fused(X)
    fused(X)
    assert replayed(fused, X)[0]
    for mode in (_OpNames(), _FunctionNames()):
        with mode:
            assert torch.equal(fused(X), expected)
        assert any("cga" in name for name in mode.names), type(mode).__name__
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__))
    try:
        assert torch.equal(fused(X), expected) and "FusedCGA" in seen
    finally:
        handle.remove()
    assert replayed(fused, X)[0]
    functional = torch.func.functionalize(fused)
    assert forwards(lambda: functional(X)) > 0
    assert torch.equal(functional(X), expected)
    assert replayed(fused, X)[0]


@torch.no_grad()
def test_calls_from_several_threads_match(fused):
    """The replay runs without the GIL: calls from threads at once get the modules' values."""
    plain = copy.deepcopy(fused)  # module by module
    inputs = [torch.randn(2, 3, 96, 96) for _ in range(4)]
    expected = [plain(x) for x in inputs]
    fused(inputs[0]), fused(inputs[0])
    assert replayed(fused, inputs[0])[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(fused, inputs * 3))
    assert all(torch.equal(out, expected[i % 4]) for i, out in enumerate(outs))


def compiled(model, **kwargs):
    """torch.compile(model), and the ops of each graph it compiles (then compiled as by
    default: AOTAutograd's wrappers run the first call amid a dispatch mode)."""
    graphs = []

    def backend(graph, example_inputs):
        graphs.append([str(n.target).removesuffix(".default") for n in graph.graph.nodes
                       if isinstance(n.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket))])
        return torch._dynamo.lookup_backend("inductor")(graph, example_inputs)

    return torch.compile(model, backend=backend, **kwargs), graphs


def test_compiled_without_gradients_one_op_replays(model):
    fused, plain = K.convert(model), K.convert(model, cpu_replay=False)
    fast, graphs = compiled(fused, fullgraph=True)
    with torch.no_grad():
        fused(X)  # seen once: the compiled graph's first call captures (amid a dispatch mode)
        out = [fast(X) for _ in range(3)][-1]
        assert graphs == [["efficientvit_cpu.replay"]]
        assert torch.equal(out, plain(X)) and forwards(lambda: fast(X)) == 0  # the program
        fused.head.bias = plain.head.bias = torch.randn_like(fused.head.bias)
        assert torch.equal(fast(X), plain(X))  # a changed model: its modules, as when called
    with torch.enable_grad():  # gradients: the modules traced
        assert torch.equal(fast(X), plain(X))
        assert "efficientvit.cga" in graphs[-1]
    with torch.no_grad():  # schema, fake (meta) implementation, AOT dispatch
        handle = fused._compiled_call_impl._handle
        torch.library.opcheck(torch.ops.efficientvit_cpu.replay.default, (X, handle))
        assert torch.ops.efficientvit_cpu.replay(X.to("meta"), handle).shape == out.shape


@torch.no_grad()
def test_compiled_as_a_submodule_traces_the_modules(fused):
    """Dynamo calls a submodule's forward (not its __call__): the fused ops in the graph."""
    outer = nn.Sequential(fused, nn.ReLU()).eval()
    fast, graphs = compiled(outer, fullgraph=True)
    assert torch.equal(fast(X), outer(X))
    assert "efficientvit.cga" in graphs[0] and "efficientvit_cpu.replay" not in graphs[0]


@torch.no_grad()
def test_compiled_for_several_batch_sizes(fused):
    plain = copy.deepcopy(fused)  # module by module
    fast, graphs = compiled(fused, dynamic=True)
    for batch in (2, 3, 4, 3):
        x = torch.randn(batch, 3, 64, 64)
        assert torch.equal(fast(x), plain(x))
    assert len(graphs) == 1 and len(fused._compiled_call_impl._programs) == 1  # 3 called twice


@torch.no_grad()
def test_compiled_model_of_several_outputs_is_refused():
    model = K.cpu_replay(_TwoOutputs().eval())
    with pytest.raises(Exception, match="must return one tensor"):
        torch.compile(model, backend="eager")(torch.randn(2, 3))


@torch.no_grad()
def test_export_and_tracing_see_the_modules(fused):
    fused(X), fused(X)
    exported = torch.export.export(fused, (X,))
    assert any(n.target == torch.ops.efficientvit.cga.default for n in exported.graph.nodes)
    assert torch.equal(exported.module()(X), fused(X))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fused, X)
    assert "efficientvit::cga" in str(traced.inlined_graph)
    assert_close(traced(X), fused(X), torch.float32)


@torch.no_grad()
def test_copies_run_the_modules_until_replayed_again(fused):
    fused(X), fused(X)
    for copied in (copy.deepcopy(fused), pickle.loads(pickle.dumps(fused))):
        copied(X)
        assert not replayed(copied, X)[0]
        K.cpu_replay(copied)
        copied(X), copied(X)
        is_replayed, out = replayed(copied, X)
        assert is_replayed and torch.equal(out, fused(X))


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("scale", torch.tensor([2.0]))

    def forward(self, x):
        return x * self.scale


@torch.no_grad()
def test_a_weight_replaced_by_an_equal_one_is_the_new_one():
    """The program holds weights by identity: an equal replacement, changed in place later,
    must not leave it reading the old one."""
    model = K.cpu_replay(_Scale().eval())
    x = torch.ones(3)
    model(x), model(x)
    model.scale = torch.tensor([2.0])
    model(x), model(x)
    model.scale.mul_(3)
    assert torch.equal(model(x), torch.full((3,), 6.0))


@torch.no_grad()
def test_a_program_per_input_shape_strides_and_dtype():
    model = K.cpu_replay(_Scale().eval())
    f64 = torch.float64  # each input differs from the one before in one of the three
    inputs = [torch.ones(2, 3), torch.ones(3, 2).t(), torch.ones(3, 2, dtype=f64).t(),
              torch.ones(2, 2, dtype=f64).t()]
    for captured, x in enumerate(inputs, 1):
        model(x), model(x)  # seen, captured
        is_replayed, out = replayed(model, x)
        assert is_replayed and len(model._compiled_call_impl._programs) == captured
        assert torch.equal(out, x * 2) and out.dtype == x.dtype


class _TwoOutputs(nn.Module):
    def forward(self, x):
        return x.relu(), x.sigmoid()


@torch.no_grad()
def test_a_model_no_program_holds_warns_and_runs_its_modules():
    model = K.cpu_replay(_TwoOutputs().eval())
    x = torch.randn(2, 3)
    model(x)
    with pytest.warns(UserWarning, match="runs module by module"):
        relu, sigmoid = model(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once for this input
        relu, sigmoid = model(x)
    assert torch.equal(relu, x.relu()) and torch.equal(sigmoid, x.sigmoid())


@torch.no_grad()
def test_captures_are_bounded(fused, monkeypatch):
    monkeypatch.setattr(type(fused._compiled_call_impl), "max_captures", 2)
    sizes = (32, 48, 64)
    for size in sizes:
        x = torch.randn(1, 3, size, size)
        fused(x), fused(x)
    assert [replayed(fused, torch.randn(1, 3, s, s))[0] for s in sizes] == [True, True, False]
