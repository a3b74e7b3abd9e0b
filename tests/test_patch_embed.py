"""patch_embed (CPU and Triton kernels; with backend "cuda", its plain-PyTorch definition): the
patch embedding's chain of 3x3 stride-2 convolutions and ReLUs (one to four of them, the last
with or without its ReLU), against its spec, python_ref.functional.patch_embed, in float64; and
the CPU kernel on packed weights, bit for bit against it."""
import pytest
import torch
import torch.nn.functional as F

import efficientvit_kernels as K
from efficientvit_kernels.testing import (DTYPES, LAYOUTS, assert_close, in_layout, packings,
                                          random_input, random_patch_embed_params)
from python_ref import functional

ops = torch.ops.efficientvit
cpu = torch.ops.efficientvit_cpu
STEM = [3, 16, 32, 64, 128]  # M4's: embed_dim / 8, / 4, / 2, embed_dim


def check(x, layers, dtype, final_relu=False):
    weights, biases = layers
    out = ops.patch_embed(x.to(dtype), [w.to(dtype) for w in weights], [b.to(dtype) for b in biases],
                        final_relu)
    ref = functional.patch_embed(x.double(), [w.double() for w in weights],
                               [b.double() for b in biases], final_relu)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref, dtype)
    packed = cpu.patch_embed_pack([w.to(dtype) for w in weights], [b.to(dtype) for b in biases])
    assert torch.equal(packed.run(x.to(dtype), final_relu), out)
    return out


# One convolution: C1 = embed_dim / 8 of every model (8, 16, 24), a width that is not whole
# vectors (12, 20) and one that needs several channel blocks (40); the image size of the models,
# odd and unequal sizes (the right/bottom edge taps fall outside), 1x1 and 2x2.
@pytest.mark.parametrize("C1", [8, 16, 24, 12, 20, 40])
@pytest.mark.parametrize("H,W", [(224, 224), (17, 9), (10, 31), (1, 1), (2, 2), (3, 64)])
@pytest.mark.parametrize("final_relu", [False, True], ids=["linear", "relu"])
def test_patch_embed_one_layer(C1, H, W, final_relu):
    check(random_input(2, 3, H, W, seed=H * 7 + W), random_patch_embed_params([3, C1], seed=C1),
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
def test_patch_embed_chain(channels, H, W):
    layers = random_patch_embed_params(channels, seed=len(channels) + channels[-1])
    x = random_input(2, 3, H, W, seed=H * 7 + W)
    check(x, layers, torch.float32)
    check(x, layers, torch.float32, final_relu=True)


@pytest.mark.parametrize("batch", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("Ci", [1, 3, 5])
@pytest.mark.parametrize("layers", [1, 2, 4])
def test_patch_embed_batch_dtype_channels(batch, dtype, Ci, layers):
    channels = [Ci, *STEM[1:layers + 1]]
    check(random_input(batch, Ci, 23, 30, seed=batch), random_patch_embed_params(channels, seed=Ci), dtype)


def test_patch_embed_threads():
    """Rows split between threads: a thread's first row computes every row it reads, at every
    convolution, instead of taking them from the row before."""
    layers = random_patch_embed_params(STEM)
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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("layers", [1, 4])
def test_patch_embed_any_input_layout(layout, layers):
    check(random_input(2, 3, 15, 12, layout=layout), random_patch_embed_params(STEM[:layers + 1]), torch.float32)


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_patch_embed_every_output_written_and_nan_kept(layers):
    weights, biases = ([t.float() for t in ts] for ts in random_patch_embed_params(STEM[:layers + 1]))
    size = 2 ** layers + 1  # an odd size at every step
    empty = ops.patch_embed(torch.zeros(0, 3, size, size), weights, biases, False)
    assert empty.shape == (0, STEM[layers], 2, 2)
    for y, x_ in [(size // 2, size // 2), (0, size - 1), (size - 1, 0)]:  # centre, two edges
        x = random_input(2, 3, size, size, seed=y).float()
        x[1, 2, y, x_] = float("nan")
        out = ops.patch_embed(x, weights, biases, False)
        # the outputs whose receptive field holds the NaN pixel, and no others
        reach = torch.zeros(2, 1, size, size)
        reach[1, 0, y, x_] = 1
        for _ in range(layers):
            reach = F.conv2d(reach, torch.ones(1, 1, 3, 3), stride=2, padding=1)
        assert torch.equal(torch.isnan(out), (reach > 0).expand_as(out)), (y, x_)


def test_patch_embed_bad_input():
    (w0, w1), (b0, b1) = ([t.float() for t in ts] for ts in random_patch_embed_params([3, 8, 16]))
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
            ops.patch_embed(*args, False)
        if not args[0].dtype.is_floating_point:
            continue
        with pytest.raises((RuntimeError, ValueError), match=message):
            K.ops.check_patch_embed(*args)  # the fake's check
        if args[0].shape[1] == 3 and args[0].dim() == 4 and args[1]:  # the same when packing
            with pytest.raises((RuntimeError, ValueError), match=message):
                cpu.patch_embed_pack(*args[1:])


def test_patch_embed_packed_bad_input():
    """A packing that does not fit x is rejected, not misread."""
    (w0, w1), (b0, b1) = ([t.float() for t in ts] for ts in random_patch_embed_params([3, 8, 20]))
    x = torch.randn(1, 3, 8, 8)
    packed = cpu.patch_embed_pack([w0, w1], [b0, b1])
    assert torch.equal(packed.run(x, False), ops.patch_embed(x, [w0, w1], [b0, b1], False))
    with pytest.raises(ValueError, match="4 channels but the weights were packed for 3"):
        packed.run(torch.randn(1, 4, 8, 8), False)
    with pytest.raises(ValueError, match="packed for Float"):
        packed.run(x.double(), False)
    with pytest.raises(ValueError, match="4-D"):
        packed.run(x[0], False)


@pytest.mark.parametrize("layers", [1, 2, 4])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_patch_embed_opcheck(layers, layout):
    weights, biases = ([t.float() for t in ts] for ts in random_patch_embed_params(STEM[:layers + 1]))
    x = random_input(2, 3, 11, 14, layout=layout, dtype=torch.float32)
    torch.library.opcheck(ops.patch_embed.default, (x, weights, biases, layers == 2))


@pytest.mark.parametrize("layers", [1, 2, 4])
def test_fused_patch_embed_module(layers):
    weights, biases = ([t.float() for t in ts] for ts in random_patch_embed_params(STEM[:layers + 1]))
    module = K.FusedPatchEmbed(weights, biases, final_relu=False)
    assert len(module.state_dict()) == 2 * layers
    x = random_input(2, 3, 13, 10).float()
    ref = functional.patch_embed(x, weights, biases, False)
    with torch.no_grad():
        assert_close(module(x), ref)
        assert_close(K.FusedPatchEmbed(weights, biases, False, backend="reference")(x), ref)
    with pytest.raises(ValueError, match="a bias per weight"):
        K.FusedPatchEmbed(weights, biases[:-1], False)
    with pytest.raises(ValueError, match="one or more weights"):
        K.FusedPatchEmbed([], [], False)


def test_fused_patch_embed_module_repacks():
    """The module's op packs on the first call, and again after its weights change in place."""
    weights, biases = ([t.float() for t in ts] for ts in random_patch_embed_params(STEM))
    module = K.FusedPatchEmbed(weights, biases, final_relu=True)
    x = random_input(2, 3, 16, 16).float()
    with torch.no_grad():
        first = module(x)
        assert packings(lambda: torch.equal(module(x), first) or pytest.fail()) == 0
        module.weight3.mul_(2)  # repacked: the version counter moved
        ref = functional.patch_embed(x, [*weights[:3], weights[3] * 2], biases, True)
        assert packings(lambda: assert_close(module(x), ref)) == 1


def test_cuda_definition():
    """What the op runs on CUDA (its spec, checked, channels-last), on CPU tensors."""
    weights, biases = (list(t) for t in random_patch_embed_params(STEM[:3], dtype=torch.float32))
    x = random_input(2, 3, 17, 16, dtype=torch.float32)
    out = K.ops.patch_embed_composite(x, weights, biases, False)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ops.patch_embed(x, weights, biases, False), torch.float32)
    with pytest.raises(ValueError, match="a bias per weight"):
        K.ops.patch_embed_composite(x, weights, biases[:1], False)


# Every backend with a kernel of its own (tests/conftest.py: patch_ops_backend), in each dtype
# it runs: name: (channels, B, H, W, final_relu, layout, small). M4's stem at the model's
# image size; a chain whose widths are not whole tiles (12 -> 20 -> 36) on odd sizes (each next
# convolution's last taps read padding); one convolution from more channels than one reduction
# step holds (136 -> 24: a tap in two steps in the interpreter, three on a GPU); 1x1; an empty
# batch; the Triton kernel's pairs of convolutions over several tiles of outputs, whole and cut
# at the right and bottom (a pair, then convolutions alone; from 20 channels, more than the
# pair kernel reduces in one step); M5's first two convolutions (24 channels: a pair of the
# wider kind, padded to 32), that kind over several tiles cut at the right and bottom (20
# channels), and a first convolution too wide for a pair (40 channels: the chain unpaired); a
# convolution from fewer than 16 channels, whose (tap, channel) pairs take two of the
# interpreter's steps (135 > 128); widths whose pixel strides are multiples of 2 only (18,
# 10, after 40: convolutions alone), which the Triton kernel's loads and stores take as
# vectors of that many.
BACKEND_CASES = {
    "m4_stem": (STEM, 2, 224, 224, False, "contiguous", False),
    "odd_chain": ([3, 12, 20, 36], 2, 17, 9, False, "permuted", True),
    "relu_chain": ([3, 16, 32], 1, 10, 31, True, "channels_last", True),
    "wide_reduction": ([136, 24], 2, 6, 13, False, "strided", True),
    "one_pixel": ([3, 8, 16], 1, 1, 1, False, "contiguous", True),
    "batch0": ([3, 8], 0, 5, 5, False, "contiguous", True),
    "pair_tiles": ([3, 12, 40, 20], 2, 61, 33, False, "contiguous", True),
    "m0_stem": ([3, 8, 16, 32, 64], 1, 45, 58, True, "channels_last", True),
    "pair_wide_input": ([20, 12, 16], 1, 19, 23, False, "strided", True),
    "m5_pair": ([3, 24, 48], 1, 13, 11, True, "channels_last", True),
    "wide_pair_tiles": ([3, 20, 40, 24], 2, 45, 37, False, "contiguous", True),
    "unpaired_wide": ([3, 40, 24], 1, 13, 11, False, "channels_last", True),
    "pairs_over_steps": ([15, 20], 2, 9, 7, False, "strided", True),
    "narrow_vectors": ([3, 40, 18, 10], 1, 13, 11, False, "channels_last", True),
}


# The weights as users pass them, as FusedPatchEmbed holds them (channels-last: the Triton
# kernel's unit-stride reads) and dense in neither format.
WEIGHT_LAYOUTS = ("contiguous", "channels_last", "permuted")


@pytest.mark.parametrize("weight_layout", WEIGHT_LAYOUTS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(BACKEND_CASES))
def test_patch_embed_backend(patch_ops_backend, case, dtype, weight_layout):
    channels, B, H, W, final_relu, layout, small = BACKEND_CASES[case]
    backend, dtype = patch_ops_backend, DTYPES[dtype]
    backend.skip_unless_small(small)
    weights, biases = random_patch_embed_params(channels, seed=len(channels))
    x = random_input(B, channels[0], H, W, seed=H + W, dtype=dtype, layout=layout,
                     device=backend.device)
    out = backend.ops.patch_embed(
        x, [in_layout(w.to(backend.device, dtype), weight_layout) for w in weights],
        [b.to(backend.device, dtype) for b in biases], final_relu)
    ref = functional.patch_embed(x.cpu().double(), weights, biases, final_relu)
    assert out.dtype == dtype and out.shape == ref.shape
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close(out, ref, dtype, f"{backend.name} patch_embed")


def test_patch_embed_backend_nan(patch_ops_backend):
    """A NaN pixel reaches exactly the outputs whose receptive field holds it."""
    dtype, device = patch_ops_backend.dtypes[0], patch_ops_backend.device
    weights, biases = ([t.to(device, dtype) for t in ts] for ts in random_patch_embed_params(STEM[:3]))
    x = random_input(1, 3, 9, 9, dtype=dtype, device=device)
    x[0, 1, 8, 0] = float("nan")  # bottom left: reaches output (1, 0) of 3x3 after two steps
    out = patch_ops_backend.ops.patch_embed(x, weights, biases, False).cpu()
    assert torch.isnan(out[0, :, 2, 0]).all() and torch.isnan(out).sum() == STEM[2]
    # An infinite pixel with positive weights: +inf there, no NaN (the padded channels of a
    # width that is not a whole tile, 12, must not turn it into inf * 0)
    weights, biases = ([t.abs().to(device, dtype) for t in ts]
                       for ts in random_patch_embed_params([3, 12, 20]))
    x[0, 1, 8, 0] = float("inf")
    out = patch_ops_backend.ops.patch_embed(x, weights, biases, False).cpu()
    assert torch.isposinf(out[0, :, 2, 0]).all() and torch.isfinite(out).sum() == out.numel() - 20
