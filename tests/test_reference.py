"""python_ref: the paper's sizes, checkpoint loading, the functional spec, BN folding, errors."""
import pytest
import torch

import python_ref as R
from efficientvit_kernels.testing import relative_error, tolerance
from timm_stub import import_timm

# Table 2 of the paper: params (M) and FLOPs (multiply-adds, M) at 224^2
PAPER = {"m0": (2.3, 79), "m1": (3.0, 167), "m2": (4.2, 201), "m3": (6.9, 263), "m4": (8.8, 299),
         "m5": (12.4, 522)}
MODELS = list(PAPER)


@pytest.fixture(scope="module")
def models():
    return {n: R.randomize_(R.build(n), seed=i) for i, n in enumerate(MODELS)}


@pytest.mark.parametrize("name", MODELS)
def test_params_and_flops_match_paper(name, models):
    params, macs = PAPER[name]
    assert abs(R.count_params(models[name]) / 1e6 - params) <= 0.1
    assert abs(R.count_macs(models[name]) / 1e6 - macs) <= 0.01 * macs


@pytest.mark.parametrize("name", MODELS)
def test_folded_equals_unfolded(name, models):
    model = models[name].double()
    folded = R.fold_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    for size in ((224, 224), (160, 192)):
        x = torch.randn(2, 3, *size, dtype=torch.float64)
        with torch.no_grad():
            assert relative_error(folded(x), model(x)) < tolerance(torch.float64)
    model.float()


def _attention_layers(model):
    return [m for m in model.modules() if isinstance(m, R.LocalWindowAttention)]


@pytest.mark.parametrize("name", MODELS)
def test_functional_spec_equals_module_forward(name, models):
    model = models[name].double()
    folded = R.fold_batchnorm(model)
    for layer, folded_layer in zip(_attention_layers(model), _attention_layers(folded)):
        res = layer.resolution
        for H, W in {(res, res), (res + 3, res - 1), (5, 7), (3, 3)}:
            x = torch.randn(2, layer.dim, H, W, dtype=torch.float64)
            with torch.no_grad():
                ref = x + layer(x)
                for source in (layer, folded_layer):
                    out = R.functional.cga(x, **R.cga_params(source.attn), residual=True)
                    assert relative_error(out, ref) < tolerance(torch.float64), (H, W)
    for block in model.modules():
        if isinstance(block, R.EfficientViTBlock):
            x = torch.randn(1, block.dw0.m.c.in_channels, 9, 5, dtype=torch.float64)
            with torch.no_grad():
                w, b = R.dwconv_params(block.dw0.m)
                assert relative_error(R.functional.dwconv(x, w, b, False, True), block.dw0(x)) < tolerance(torch.float64)
                out = R.functional.ffn(x, *R.ffn_params(block.ffn0.m), True)
                assert relative_error(out, block.ffn0(x)) < tolerance(torch.float64)
    model.float()


def test_window_padding_semantics():
    """A map of exactly ws x ws is one window; smaller maps are padded to a window, like timm."""
    layer = R.randomize_(R.LocalWindowAttention(32, 16, 2, attn_ratio=1, resolution=4,
                                                window_resolution=7, kernels=(5, 5)))
    assert layer.attn.resolution == 4
    x = torch.randn(1, 32, 3, 2)
    padded = torch.nn.functional.pad(x, (0, 2, 0, 1))
    with torch.no_grad():
        assert torch.allclose(layer(x), layer.attn(padded)[:, :, :3, :2])


def test_official_checkpoint_loads_strict(tmp_path, models):
    model = models["m0"]
    state = model.state_dict()
    # released checkpoints keep the squeeze-excite 1x1 conv weights as 2-D matrices
    state = {k: v[:, :, 0, 0] if k.endswith("se.fc1.weight") else v for k, v in state.items()}
    path = tmp_path / "efficientvit_m0.pth"
    torch.save({"model": state}, path)
    fresh = R.load_checkpoint(R.efficientvit_m0().eval(), str(path))
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    fresh.load_state_dict(model.state_dict(), strict=True)


@pytest.mark.parametrize("name", ["m0", "m4", "m5"])
def test_timm_checkpoint_gives_identical_outputs(name):
    timm = import_timm()
    if timm is None:
        pytest.skip("timm is not installed (.ci/run installs it)")
    theirs = R.randomize_(timm.create_model(f"efficientvit_{name}"), seed=3)
    ours = R.load_checkpoint(R.build(name).eval(), theirs.state_dict())
    for size in (224, 256):
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            assert torch.equal(ours(x), theirs(x)), size


def test_bad_input_names_the_problem(models):
    model = models["m0"]
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(1, 4, 224, 224))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 224, 224))
    with pytest.raises(ValueError, match="unknown model"):
        R.build("m9")


def test_bad_checkpoints_name_the_problem(models):
    state = models["m0"].state_dict()
    missing = {k: v for k, v in state.items() if not k.startswith("head.")}
    with pytest.raises(ValueError, match="missing keys.*head"):
        R.load_checkpoint(R.efficientvit_m0(), missing)
    extra = {**state, "blocks9.0.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="unexpected keys.*blocks9"):
        R.load_checkpoint(R.efficientvit_m0(), extra)
    with pytest.raises(ValueError, match="wrong shape.*EfficientViT-M0.*EfficientViT-M4"):
        R.load_checkpoint(R.efficientvit_m4(), state)
    with pytest.raises(ValueError, match="missing keys.*EfficientViT-M2.*EfficientViT-M1"):
        R.load_checkpoint(R.efficientvit_m1(), R.efficientvit_m2().state_dict())
    with pytest.raises(ValueError, match="not a state dict"):
        R.load_checkpoint(R.efficientvit_m0(), {"model": {"a": 1}})
