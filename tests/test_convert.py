"""convert(): fused models and submodules against the reference, for python_ref and timm models;
its passes; and what a converted model must survive (copies, pickling, inference mode, autograd,
users' own modules)."""
import collections
import copy
import io
import pickle
import warnings

import pytest
import torch
from torch import nn

import efficientvit_kernels as K
import python_ref as R
from efficientvit_kernels.testing import assert_close, relative_error, tolerance
from timm_stub import import_timm

MODELS = ["m0", "m1", "m2", "m3", "m4", "m5"]
BACKENDS = ["cpu", "reference"]
# fp32 fused model against the fp64 reference model: docs/design.md's fp32 tolerance
TOL = tolerance(torch.float32)


@pytest.fixture(scope="module")
def models():
    return {n: R.randomize_(R.build(n), seed=i) for i, n in enumerate(MODELS)}


def _check_model(fused, reference, sizes, batch=2):
    ref64 = R.fold_batchnorm(reference).double()
    for size in sizes:
        x = torch.randn(batch, 3, *size)
        with torch.no_grad():
            out, ref = fused(x), ref64(x.double())
        assert out.shape == ref.shape
        assert relative_error(out, ref) < TOL, size


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODELS)
def test_convert_reference_models(name, backend, models):
    fused = K.convert(models[name], backend=backend)
    assert not any(isinstance(m, (R.LocalWindowAttention, torch.nn.BatchNorm2d)) for m in fused.modules())
    _check_model(fused, models[name], [(224, 224), (160, 192)])


def test_convert_channels_last_and_batch_one(models):
    fused = K.convert(models["m4"])
    ref = R.fold_batchnorm(models["m4"]).double()
    for x in (torch.randn(1, 3, 224, 224), torch.randn(3, 3, 200, 216).to(memory_format=torch.channels_last)):
        with torch.no_grad():
            assert relative_error(fused(x), ref(x.double())) < TOL


def test_input_model_is_not_modified(models):
    model = models["m0"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    types = [type(m) for m in model.modules()]
    fused = K.convert(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [type(m) for m in model.modules()] == types
    shared = {p.data_ptr() for p in model.parameters()} & {t.data_ptr() for t in fused.state_dict().values()}
    assert not shared


def test_convert_submodules(models):
    block = models["m4"].blocks2[3]
    residual = block.mixer
    layer = residual.m
    x = torch.randn(2, layer.dim, 10, 13)
    with torch.no_grad():
        fused_layer = K.convert(layer)
        assert isinstance(fused_layer, K.FusedCGA) and not fused_layer.residual
        assert relative_error(fused_layer(x), layer(x)) < TOL
        fused_residual = K.convert(residual)
        assert isinstance(fused_residual, K.FusedCGA) and fused_residual.residual
        assert relative_error(fused_residual(x), residual(x)) < TOL
        assert relative_error(K.convert(block)(x), block(x)) < TOL
        ffn = block.ffn0.m
        assert isinstance(K.convert(ffn), K.FusedFFN)
        assert relative_error(K.convert(ffn)(x), ffn(x)) < TOL


def test_stem_and_patch_merging(models):
    """PatchMerging becomes FusedPatchMerging, its squeeze-excite a LinearSqueezeExcite (on CPU
    a FusedSqueezeExcite), on CPU its convolutions FusedConv1x1 (the first 1x1 with the
    depthwise one and both ReLUs); on CPU the stem's convolutions and ReLUs become a
    FusedPatchEmbed and the classifier a FusedLinear; on CPU the other convolutions' weights
    are channels-last; the caller's tensor is never written."""
    model = models["m4"]
    fused = K.convert(model)
    merging = [m for m in fused.modules() if isinstance(m, K.FusedPatchMerging)]
    assert len(merging) == 2 and all(isinstance(m.se, K.FusedSqueezeExcite) for m in merging)
    assert all(isinstance(m.se, K.modules.LinearSqueezeExcite) for m in
               K.convert(model, passes=("fuse",)).modules() if isinstance(m, K.FusedPatchMerging))
    assert all(isinstance(m.conv1, K.FusedConv1x1) and m.conv1.relu and m.conv1.dw_weight.shape[1:] == (3, 3)
               and all(getattr(m, n) is None for n in ("act1", "conv2", "act2"))
               and isinstance(m.conv3, K.FusedConv1x1) and not m.conv3.relu for m in merging)
    stem = fused.patch_embed[0]  # the four convolutions and three ReLUs
    assert isinstance(stem, K.FusedPatchEmbed) and not stem.final_relu
    assert [stem.get_buffer(f"weight{i}").shape[:2] for i in range(4)] == [(16, 3), (32, 16), (64, 32), (128, 64)]
    assert len(fused.patch_embed) == 1  # the modules it took in are gone
    assert not any(isinstance(m, K.FusedPatchEmbed) for m in K.convert(model, backend="reference").modules())
    assert not any(isinstance(m, torch.nn.Conv2d) for m in fused.modules())  # all in fused ops
    assert isinstance(fused.head, K.FusedLinear)  # the classifier, its batch norm folded
    assert type(K.convert(model, passes=("fuse",)).head) is nn.Linear
    x = torch.randn(2, 3, 64, 80)
    x0 = x.clone()
    with torch.no_grad():
        fused(x)
        assert torch.equal(x, x0)
        merge = next(m for m in model.modules() if isinstance(m, R.model.PatchMerging))
        z = torch.randn(2, merge.conv1.c.in_channels, 9, 7)
        z0 = z.clone()
        assert relative_error(K.convert(merge)(z), merge(z0)) < TOL and torch.equal(z, z0)


def test_squeeze_excite_gate_is_known_by_what_it_computes():
    """A gate of another class named Sigmoid (timm's) is taken when it computes the sigmoid,
    and a squeeze-excite whose gate computes anything else is left as written."""
    class SqueezeExcite(nn.Module):  # timm's SEModule as EfficientViT builds it
        def __init__(self, gate):
            super().__init__()
            self.fc1, self.bn, self.act = nn.Conv2d(16, 4, 1), nn.Identity(), nn.ReLU()
            self.fc2, self.gate = nn.Conv2d(4, 16, 1), gate

        def forward(self, x):
            s = self.fc2(self.act(self.bn(self.fc1(x.mean((2, 3), keepdim=True)))))
            return x * self.gate(s)

    def named(name, fn):
        return type(name, (nn.Module,), {"forward": lambda self, x: fn(x)})()

    x = torch.randn(2, 16, 5, 6)
    for gate, fused in ((nn.Sigmoid(), True), (named("Sigmoid", torch.sigmoid), True),
                        (named("Sigmoid", torch.tanh), False), (named("Gate", torch.sigmoid), False)):
        se = SqueezeExcite(gate)
        converted = K.convert(se)
        assert isinstance(converted, K.modules.LinearSqueezeExcite) == fused, gate
        with torch.no_grad():
            assert relative_error(converted(x), se(x)) < TOL


@pytest.mark.parametrize("passes", [(), ("fuse",), ("fuse", "patch_ops"), ("fuse", "channels_last"),
                                    ("channels_last",), K.PASSES],
                         ids=lambda p: "+".join(p) or "none")
def test_passes(models, passes):
    """Each pass is switchable and every subset computes the same model."""
    fused = K.convert(models["m0"], passes=passes)
    kinds = {type(m) for m in fused.modules()}
    assert (K.FusedCGA in kinds) == ("fuse" in passes)
    assert (K.FusedPatchEmbed in kinds) == ("fuse" in passes and "patch_ops" in passes)
    assert any(isinstance(m, nn.Conv2d) and m.weight.is_contiguous(memory_format=torch.channels_last)
               and not m.weight.is_contiguous() for m in fused.modules()) == (
        "channels_last" in passes and "patch_ops" not in passes)
    _check_model(fused, models["m0"], [(64, 80)])
    with pytest.raises(ValueError, match="unknown conversion pass"):
        K.convert(models["m0"], passes=("fuse", "fold"))


def test_default_passes(models):
    """All four for Triton; all but dwconv_ffn for the other backends with kernels for
    patch_embed, conv1x1 or squeeze_excite (the CPU's; the CUDA backend's patch_embed; "auto",
    which on a GPU measures them against PyTorch's); fuse alone otherwise."""
    from efficientvit_kernels.convert import _default_passes
    model = models["m0"]
    on_meta = copy.deepcopy(model).to("meta")  # a model on another device than the CPU
    for m in (model, on_meta):
        assert _default_passes(m, "triton") == K.PASSES
        assert _default_passes(m, "auto") == ("fuse", "patch_ops", "channels_last")
        assert _default_passes(m, "cuda") == ("fuse", "patch_ops", "channels_last")
        assert _default_passes(m, "reference") == ("fuse",)
    assert _default_passes(model, "cpu") == ("fuse", "patch_ops", "channels_last")
    assert _default_passes(on_meta, "cpu") == ("fuse",)


def test_backend_errors(models):
    with pytest.raises(ValueError, match="unknown backend"):
        K.convert(models["m0"], backend="tpu")
    if not K.ops.has_compiled_kernels("cuda"):
        with pytest.raises(RuntimeError, match="CUDA kernels were not built"):
            K.convert(models["m0"], backend="cuda")


def test_torch_compile_fullgraph(models):
    """The modules traced (no replay: compiled, a replayed model is one op), compiled before
    any call, without torch.compile's warning of a call traced through an lru_cache (the fused
    modules' op lookup was one)."""
    fused = K.convert(models["m0"], cpu_replay=False)
    compiled = torch.compile(fused, fullgraph=True, dynamic=False)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(x)
    assert not [str(w.message) for w in caught if "lru_cache" in str(w.message)]
    with torch.no_grad():
        assert relative_error(out, fused(x)) < TOL


def test_torch_export(models):
    fused = K.convert(models["m0"])
    x = torch.randn(2, 3, 160, 160)
    exported = torch.export.export(fused, (x,))
    assert any("efficientvit.cga" in str(n.target) for n in exported.graph.nodes)
    with torch.no_grad():
        assert relative_error(exported.module()(x), fused(x)) < TOL


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_replay(models):
    fused = K.convert(models["m4"]).cuda().half()
    x = torch.randn(1, 3, 224, 224, device="cuda", dtype=torch.half)
    run = K.cuda_graph(fused, x)
    with torch.no_grad():
        assert torch.equal(run(x), fused(x))
    with pytest.raises(ValueError, match="captured for"):
        run(x.float())


def _kernel_census(model):
    """How many modules of each kind compute: the fused ones, and the ATen layers left."""
    kinds = (K.modules._Fused, torch.nn.Conv2d, torch.nn.Linear, torch.nn.ReLU, torch.nn.Sigmoid)
    return collections.Counter(type(m).__name__ for m in model.modules() if isinstance(m, kinds))


@pytest.fixture(scope="module")
def timm():
    timm = import_timm()
    if timm is None:
        pytest.skip("timm is not installed (.ci/run installs it)")
    return timm


@pytest.mark.parametrize("name", MODELS)
def test_convert_timm_models(name, timm):
    model = R.randomize_(timm.create_model(f"efficientvit_{name}"), seed=7)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        model(x)  # fills timm's attention-bias cache with non-leaf tensors
    fused = K.convert(model)
    ours = R.load_checkpoint(R.build(name), model.state_dict())
    # converted as fully as the reference (timm's squeeze-excite gate is its own Sigmoid class)
    assert _kernel_census(fused) == _kernel_census(K.convert(ours))
    _check_model(fused, ours, [(224, 224), (256, 192)])
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) < TOL


# What a converted model must survive.

def test_copies_pickles_and_converts_again(models):
    fused = K.convert(models["m0"])
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        expected = fused(x)
        buffer = io.BytesIO()
        torch.save(fused, buffer)
        copies = [copy.deepcopy(fused), pickle.loads(pickle.dumps(fused)),
                  torch.load(io.BytesIO(buffer.getvalue()), weights_only=False), K.convert(fused)]
        for other in copies:
            assert torch.equal(other(x), expected)
        assert_close(K.convert(fused, backend="reference")(x), expected, torch.float32)


def test_shares_nothing_mutable_with_the_input(models):
    model = copy.deepcopy(models["m0"])
    fused = K.convert(model)
    calls = []
    model.register_forward_hook(lambda *a: calls.append("input model"))
    fused.register_forward_hook(lambda *a: calls.append("converted"))
    with torch.no_grad():
        fused(torch.randn(1, 3, 64, 64))
    assert calls == ["converted"]
    originals = dict(model.named_modules())
    for name, c in fused.named_modules():
        m = originals.get(name)
        for key, value in vars(m).items() if m is not None else ():
            if isinstance(value, (dict, list, set)) and key in vars(c):
                assert vars(c)[key] is not value, (name, key)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_convert_and_run_under_inference_mode(models, mode):
    x = torch.randn(2, 3, 64, 64)
    with getattr(torch, mode)():
        fused = K.convert(models["m0"])
        out = fused(x)
    with torch.no_grad():
        assert torch.equal(fused(x), out)  # usable outside the mode too


def test_autograd_is_refused_with_a_way_out(models):
    fused = K.convert(models["m0"])
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward formula.*backend=.reference"):
        fused(x)
    reference = K.convert(models["m0"], backend="reference")
    reference(x).sum().backward()  # plain PyTorch: gradients reach the input
    assert x.grad is not None and x.grad.abs().sum() > 0


class ReusingSequential(nn.Sequential):
    """Not a chain: both children read the input, and the second's output is read twice."""

    def forward(self, x):
        y = self[0](x)
        return self[1](x) + y + self[1](x)


class FirstOnly(nn.Sequential):
    """Uses its first child only."""

    def forward(self, x):
        return self[0](x)


def test_users_sequential_subclasses_run_as_written(models):
    """No pass rewrites or computes in place inside a Sequential whose forward is the user's."""
    block = models["m4"].blocks2[3]
    seq = ReusingSequential(block.ffn0, block.mixer)
    x = torch.randn(2, 256, 7, 7)
    x0 = x.clone()
    with torch.no_grad():
        out = K.convert(seq)(x)
        assert torch.equal(x, x0)
        assert relative_error(out, seq(x0)) < TOL
    stem = FirstOnly(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1))
    fused = K.convert(stem)
    assert not any(isinstance(m, K.FusedPatchEmbed) for m in fused.modules())
    img = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert fused(img).shape == stem(img).shape == (1, 8, 8, 8)
        assert relative_error(fused(img), stem(img)) < TOL


def test_patch_merging_with_its_own_forward_is_not_replaced(models):
    merge = copy.deepcopy(next(m for m in models["m4"].modules() if isinstance(m, R.model.PatchMerging)))

    class Doubled(type(merge)):
        def forward(self, x):
            return 2 * super().forward(x)

    merge.__class__ = Doubled
    fused = K.convert(merge)
    assert not isinstance(fused, K.FusedPatchMerging)
    z = torch.randn(1, merge.conv1.c.in_channels, 8, 8)
    with torch.no_grad():
        assert relative_error(fused(z), merge(z)) < TOL


def _ffn_census(model):
    return collections.Counter(type(m).__name__ for m in model.modules()
                               if isinstance(m, (K.FusedDWConv, K.FusedFFN, K.FusedDWConvFFN)))


def test_triton_fuses_each_dwconv_with_the_ffn_after_it(models, timm):
    """The dwconv_ffn pass (by default with backend "triton" only): every depthwise
    convolution and the FFN it feeds become one FusedDWConvFFN, in the blocks and in the
    stages' downsampling Sequentials, for the reference's and timm's classes alike; a block
    or Sequential with a forward of its own keeps them apart."""
    model = models["m4"]
    ffns = _ffn_census(K.convert(model, backend="reference"))["FusedFFN"]
    assert ffns == _ffn_census(K.convert(model, backend="reference"))["FusedDWConv"] == 2 * 6 + 2 * 2
    for m in (model, R.randomize_(timm.create_model("efficientvit_m4"), seed=7)):
        assert _ffn_census(K.convert(m, backend="triton")) == {"FusedDWConvFFN": ffns}
    fused = K.convert(model, backend="triton")
    sandwich, block = fused.blocks2[0], fused.blocks2[3]  # (dw, FFN) before PatchMerging; a block
    assert list(map(type, sandwich)) == [K.FusedDWConvFFN]
    assert isinstance(block.dw0, K.FusedDWConvFFN) and type(block.ffn0) is nn.Identity
    assert block.dw1.w1.shape == (2 * 256, 256) and block.dw1.dw_weight.shape == (256, 3, 3)
    for backend in ("auto", "cpu"):
        assert "FusedDWConvFFN" not in _ffn_census(K.convert(model, backend=backend, cpu_replay=False))
    unpaired = K.convert(model, backend="triton", passes=("fuse", "patch_ops", "channels_last"))
    assert _ffn_census(unpaired) == {"FusedDWConv": ffns, "FusedFFN": ffns}
    on_cpu = K.convert(model, backend="cpu", passes=K.PASSES)  # the dwconv and ffn kernels in turn
    assert _ffn_census(on_cpu) == {"FusedDWConvFFN": ffns}
    _check_model(on_cpu, model, [(64, 80)])

    class OwnForward(type(model.blocks1[0])):
        def forward(self, x):
            return self.ffn0(x) + self.dw0(x)

    own = copy.deepcopy(model.blocks1[0])
    own.__class__ = OwnForward
    seq = ReusingSequential(copy.deepcopy(model.blocks1[0].dw0), copy.deepcopy(model.blocks1[0].ffn0))
    for m in (own, seq):
        assert "FusedDWConvFFN" not in _ffn_census(K.convert(m, backend="triton"))
