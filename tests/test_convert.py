"""convert(): fused models and submodules against the reference, for python_ref and timm models."""
import pytest
import torch

import efficientvit_kernels as K
import python_ref as R
from cases import relative_error
from timm_stub import import_timm

MODELS = ["m0", "m1", "m2", "m3", "m4", "m5"]
BACKENDS = ["cpu", "reference"]
# fp32 fused model against the fp64 reference model: docs/design.md's fp32 tolerance
TOL = 1e-5


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
    """PatchMerging becomes InPlacePatchMerging, its squeeze-excite a LinearSqueezeExcite working
    in place, on CPU its convolutions FusedPointwise (the first 1x1 with the depthwise one and
    both ReLUs); on CPU the stem's convolutions and ReLUs become a FusedStemConv; a ReLU after a
    convolution works in place and never on the caller's tensor; on CPU other convolutions'
    weights are channels-last."""
    model = models["m4"]
    fused = K.convert(model)
    merging = [m for m in fused.modules() if isinstance(m, K.modules.InPlacePatchMerging)]
    assert len(merging) == 2 and all(
        isinstance(m.se, K.modules.LinearSqueezeExcite) and m.se.inplace for m in merging)
    assert all(isinstance(m.conv1, K.FusedPointwise) and m.conv1.relu and m.conv1.dw_weight.shape[1:] == (3, 3)
               and all(isinstance(getattr(m, n), torch.nn.Identity) for n in ("act1", "conv2", "act2"))
               and isinstance(m.conv3, K.FusedPointwise) and not m.conv3.relu for m in merging)
    stem = fused.patch_embed[0]  # the four convolutions and three ReLUs
    assert isinstance(stem, K.FusedStemConv) and not stem.final_relu
    assert [stem.get_buffer(f"weight{i}").shape[:2] for i in range(4)] == [(16, 3), (32, 16), (64, 32), (128, 64)]
    assert all(isinstance(m, torch.nn.Identity) for m in fused.patch_embed[1:])
    assert not any(isinstance(m, K.FusedStemConv) for m in K.convert(model, backend="reference").modules())
    assert not any(isinstance(m, torch.nn.Conv2d) for m in fused.modules())  # all in fused ops
    x = torch.randn(2, 3, 64, 80)
    x0 = x.clone()
    with torch.no_grad():
        fused(x)
        assert torch.equal(x, x0)
        merge = next(m for m in model.modules() if isinstance(m, R.model.PatchMerging))
        z = torch.randn(2, merge.conv1.c.in_channels, 9, 7)
        z0 = z.clone()
        assert relative_error(K.convert(merge)(z), merge(z0)) < TOL and torch.equal(z, z0)
        # a Sequential that starts with a ReLU gets its input from outside: not in place
        seq = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Conv2d(3, 4, 1), torch.nn.ReLU())
        fused_seq = K.convert(seq)
        assert not fused_seq[0].inplace and fused_seq[2].inplace
        assert fused_seq[1].weight.is_contiguous(memory_format=torch.channels_last)
        y = torch.randn(1, 3, 4, 4)
        y0 = y.clone()
        assert relative_error(fused_seq(y), seq(y0)) < TOL and torch.equal(y, y0)


def _in_place(model):
    """Whether each fused attention and FFN writes over its input, by name."""
    return {n: m.inplace for n, m in model.named_modules() if isinstance(m, (K.FusedCGA, K.FusedFFN))}


def test_fused_ops_in_place(models):
    """In a block or Sequential, an attention or FFN after another fused op writes over that
    op's output: in a whole model, every one of them (each follows a depthwise conv, an FFN or
    an attention); the input of a block, a Sequential or the model is never written."""
    fused = K.convert(models["m4"])
    flags = _in_place(fused)
    assert len(flags) == 3 * 6 + 2 * 2 and all(flags.values())  # 6 blocks, 2 downsampling stages
    block = fused.blocks2[3]
    assert [block.ffn0.inplace, block.mixer.inplace, block.ffn1.inplace] == [True] * 3
    ffn_first = K.convert(torch.nn.Sequential(models["m4"].blocks2[3].ffn0, models["m4"].blocks2[3].mixer))
    assert list(_in_place(ffn_first).values()) == [False, True]  # the first reads the caller's x
    x = torch.randn(2, 256, 9, 10).to(memory_format=torch.channels_last)
    x0 = x.clone()
    with torch.no_grad():
        ref = R.fold_batchnorm(models["m4"].blocks2[3]).double()(x0.double())
        assert relative_error(block(x), ref) < TOL and torch.equal(x, x0)
        ffn_first(x)
        assert torch.equal(x, x0)


def test_backend_errors(models):
    with pytest.raises(ValueError, match="unknown backend"):
        K.convert(models["m0"], backend="tpu")
    if not K.ops.has_compiled_kernels("cuda"):
        with pytest.raises(RuntimeError, match="CUDA kernels were not built"):
            K.convert(models["m0"], backend="cuda")


def test_torch_compile_fullgraph(models):
    fused = K.convert(models["m0"])
    compiled = torch.compile(fused, fullgraph=True, dynamic=False)
    x = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        assert relative_error(compiled(x), fused(x)) < TOL


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
    _check_model(fused, ours, [(224, 224), (256, 192)])
    assert all(_in_place(fused).values())  # timm's blocks and Sequentials chain as ours do
    with torch.no_grad():
        assert relative_error(fused(x), model(x)) < TOL
