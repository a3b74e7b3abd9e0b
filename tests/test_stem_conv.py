"""stem_conv (CPU only): the patch embedding's chain of 3x3 stride-2 convolutions and ReLUs (one
to four of them, the last with or without its ReLU), against its spec,
python_ref.functional.stem_conv, in float64; and its packed halves (stem_conv_pack,
stem_conv_packed), bit for bit against it."""
import pytest
import torch
import torch.nn.functional as F

import efficientvit_kernels as K
from cases import random_input, relative_error
from python_ref import functional

ops = torch.ops.efficientvit
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
STEM = [3, 16, 32, 64, 128]  # M4's: embed_dim / 8, / 4, / 2, embed_dim


def random_layers(channels, seed=0, dtype=torch.float64):
    """(weights, biases) of the chain channels[0] -> channels[1] -> ..."""
    g = torch.Generator().manual_seed(seed)
    weights, biases = [], []
    for ci, co in zip(channels, channels[1:]):
        weights.append((torch.randn(co, ci, 3, 3, generator=g, dtype=torch.float64)
                        * (9 * ci) ** -0.5).to(dtype))
        biases.append((torch.randn(co, generator=g, dtype=torch.float64) * 0.3).to(dtype))  # some ReLU'd to 0
    return weights, biases


def check(x, layers, dtype, final_relu=False):
    weights, biases = layers
    out = ops.stem_conv(x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases],
                        final_relu)
    ref = functional.stem_conv(x.double(), [w.double() for w in weights],
                               [b.double() for b in biases], final_relu)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, ref) < TOL[dtype]
    packed = ops.stem_conv_pack([w.to(dtype) for w in weights], [b.to(dtype) for b in biases])
    assert torch.equal(ops.stem_conv_packed(x.to(dtype), packed, weights[-1].shape[0], final_relu),
                       out)
    return out


# One convolution: C1 = embed_dim / 8 of every model (8, 16, 24), a width that is not whole
# vectors (12, 20) and one that needs several channel blocks (40); the image size of the models,
# odd and unequal sizes (the right/bottom edge taps fall outside), 1x1 and 2x2.
@pytest.mark.parametrize("C1", [8, 16, 24, 12, 20, 40])
@pytest.mark.parametrize("H,W", [(224, 224), (17, 9), (10, 31), (1, 1), (2, 2), (3, 64)])
def test_stem_conv_one_layer(C1, H, W):
    for final_relu in (False, True):
        check(random_input(2, 3, H, W, seed=H * 7 + W), random_layers([3, C1], seed=C1),
              torch.float32, final_relu)


# Chains: M4's four convolutions, M0's and M5's, two and three of them, widths that are not
# whole vectors (12 -> 20 -> 36) and several GEMM panels (40 -> 72); sizes whose outputs are odd
# (the next convolution's right/bottom taps read the padding) or even at each step, 1x1, 4x4,
# H != W; the model's image size for M4's widths.
CHAINS = [STEM, [3, 8, 16, 32, 64], [3, 24, 48, 96, 192], [3, 16, 32], [3, 16, 32, 64],
          [3, 12, 20, 36], [3, 40, 72]]
SIZES = [(17, 9), (10, 31), (1, 1), (4, 4), (6, 13), (50, 35)]


@pytest.mark.parametrize("channels,H,W", [(c, H, W) for c in CHAINS for H, W in SIZES]
                         + [(STEM, 224, 224)], ids=lambda v: "-".join(map(str, v)) if isinstance(v, list) else str(v))
def test_stem_conv_chain(channels, H, W):
    layers = random_layers(channels, seed=len(channels) + channels[-1])
    x = random_input(2, 3, H, W, seed=H * 7 + W)
    check(x, layers, torch.float32)
    check(x, layers, torch.float32, final_relu=True)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Ci", [1, 3, 5])
@pytest.mark.parametrize("layers", [1, 2, 4])
def test_stem_conv_batch_dtype_channels(batch, dtype, Ci, layers):
    channels = [Ci, *STEM[1:layers + 1]]
    check(random_input(batch, Ci, 23, 30, seed=batch), random_layers(channels, seed=Ci), dtype)


def test_stem_conv_threads():
    """Rows split between threads: a thread's first row computes every row it reads, at every
    convolution, instead of taking them from the row before."""
    layers = random_layers(STEM)
    x = random_input(3, 3, 70, 36)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(check(x, layers, torch.float64))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("layout", ["channels_last", "strided"])
@pytest.mark.parametrize("layers", [1, 4])
def test_stem_conv_any_input_layout(layout, layers):
    x = random_input(2, 3, 15, 12)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    else:
        x = random_input(2, 3, 15, 24)[..., ::2]  # every other column: not dense
    check(x, random_layers(STEM[:layers + 1]), torch.float32)


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_stem_conv_every_output_written_and_nan_kept(layers):
    weights, biases = ([t.float() for t in ts] for ts in random_layers(STEM[:layers + 1]))
    size = 2 ** layers + 1  # an odd size at every step
    empty = ops.stem_conv(torch.zeros(0, 3, size, size), weights, biases, False)
    assert empty.shape == (0, STEM[layers], 2, 2)
    for y, x_ in [(size // 2, size // 2), (0, size - 1), (size - 1, 0)]:  # centre, two edges
        x = random_input(2, 3, size, size, seed=y).float()
        x[1, 2, y, x_] = float("nan")
        out = ops.stem_conv(x, weights, biases, False)
        # the outputs whose receptive field holds the NaN pixel, and no others
        reach = torch.zeros(2, 1, size, size)
        reach[1, 0, y, x_] = 1
        for _ in range(layers):
            reach = F.conv2d(reach, torch.ones(1, 1, 3, 3), stride=2, padding=1)
        assert torch.equal(torch.isnan(out), (reach > 0).expand_as(out)), (y, x_)


def test_stem_conv_bad_input():
    (w0, w1), (b0, b1) = ([t.float() for t in ts] for ts in random_layers([3, 8, 16]))
    x = torch.randn(1, 3, 8, 8)
    bad = [
        ((torch.randn(1, 4, 8, 8), [w0], [b0]), r"weights\[0\] must have shape"),
        ((x, [w0[0]], [b0]), r"weights\[0\] must be 4-D"),
        ((x, [torch.zeros(8, 3, 5, 5)], [b0]), r"weights\[0\] must have shape"),
        ((x, [w0], [b0[:4]]), r"biases\[0\] must have shape"),
        ((x, [w0], [b0.double()]), r"biases\[0\] has dtype"),
        ((x, [w0, w1[:, :4]], [b0, b1]), r"weights\[1\] must have shape"),
        ((x, [w0, w1[0]], [b0, b1]), r"weights\[1\] must be 4-D"),
        ((x, [w0, w1], [b0, b1[:4]]), r"biases\[1\] must have shape"),
        ((x, [w0, w1.double()], [b0, b1]), r"weights\[1\] has dtype"),
        ((x, [w0, w1], [b0]), "a bias per weight"),
        ((x, [], []), "at least one convolution"),
        ((x[0], [w0], [b0]), "4-D"),
        ((x.int(), [w0], [b0]), "floating"),
    ]
    for args, message in bad:
        with pytest.raises((RuntimeError, ValueError), match=message):
            ops.stem_conv(*args, False)
        if not args[0].dtype.is_floating_point:
            continue
        with pytest.raises((RuntimeError, ValueError), match=message):
            K.ops.check_stem_conv(*args)  # the fake's check
        if args[0].shape[1] == 3 and args[0].dim() == 4:  # the same checks when packing
            with pytest.raises((RuntimeError, ValueError), match=message):
                K.ops.stem_conv_pack(*args[1:])


def test_stem_conv_packed_bad_input():
    """A packing that does not fit x, out_channels or x's dtype is rejected, not misread."""
    (w0, w1), (b0, b1) = ([t.float() for t in ts] for ts in random_layers([3, 8, 20]))
    x = torch.randn(1, 3, 8, 8)
    packed = ops.stem_conv_pack([w0, w1], [b0, b1])
    assert torch.equal(ops.stem_conv_packed(x, packed, 20, False), ops.stem_conv(x, [w0, w1], [b0, b1], False))
    bad = [
        ((torch.randn(1, 4, 8, 8), packed, 20), r"packed weights\[0\] must have shape"),
        ((x, packed, 40), r"packed weights\[1\] must have shape"),
        ((x, packed, 0), "out_channels must be positive"),
        ((x, packed[:3], 20), "a weight and a bias per convolution"),
        ((x, [], 20), "a weight and a bias per convolution"),
        ((x, packed[:2], 20), r"packed weights\[0\] must have shape"),
        ((x, [packed[0], packed[1], packed[2][:9], packed[3]], 20), r"packed weights\[1\] must have shape"),
        ((x.double(), packed, 20), r"packed weights\[0\] has dtype"),
        ((x[0], packed, 20), "4-D"),
    ]
    for args, message in bad:
        with pytest.raises(RuntimeError, match=message):
            ops.stem_conv_packed(*args, False)


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_stem_conv_opcheck(layers):
    weights, biases = ([t.float() for t in ts] for ts in random_layers(STEM[:layers + 1]))
    x = random_input(2, 3, 11, 14).float()
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_static", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.stem_conv.default, (x, weights, biases, layers == 2), test_utils=utils)
    torch.library.opcheck(ops.stem_conv_packed.default,
                          (x, ops.stem_conv_pack(weights, biases), STEM[layers], layers == 2),
                          test_utils=utils)


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_fused_stem_conv_module(layers):
    weights, biases = ([t.float() for t in ts] for ts in random_layers(STEM[:layers + 1]))
    module = K.FusedStemConv(weights, biases, final_relu=False)
    assert len(module.state_dict()) == 2 * layers
    x = random_input(2, 3, 13, 10).float()
    ref = functional.stem_conv(x, weights, biases, False)
    with torch.no_grad():
        assert relative_error(module(x), ref) < TOL[torch.float32]
        # the spec path, which the module takes on devices without the op
        assert relative_error(K.FusedStemConv(weights, biases, False, backend="reference")(x), ref) < 1e-6
    with pytest.raises(ValueError, match="a bias per weight"):
        K.FusedStemConv(weights, biases[:-1], False)
    with pytest.raises(ValueError, match="one or more weights"):
        K.FusedStemConv([], [], False)


def test_fused_stem_conv_module_packs_once(monkeypatch):
    """The module packs at construction and calls the op on the packing; it packs again after
    its weights change in place, and not under torch.compile (the traced graph calls the op on
    the weights)."""
    weights, biases = ([t.float() for t in ts] for ts in random_layers(STEM))
    module = K.FusedStemConv(weights, biases, final_relu=True)
    x = random_input(2, 3, 16, 16).float()
    packs = []
    pack = K.ops.stem_conv_pack
    monkeypatch.setattr(K.ops, "stem_conv_pack", lambda *a: packs.append(1) or pack(*a))
    with torch.no_grad():
        first = module(x)
        assert torch.equal(module(x), first) and not packs
        module.weight3.mul_(2)  # repacked: the version counter moved
        assert relative_error(module(x), functional.stem_conv(
            x, [*weights[:3], weights[3] * 2], biases, True)) < TOL[torch.float32]
        assert len(packs) == 1
