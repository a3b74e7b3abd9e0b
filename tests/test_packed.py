"""CPU weight packing: cga_pack/cga_packed and ffn_pack/ffn_packed compute exactly what the
ops compute, and their in-place variants (cga_packed_, ffn_packed_) exactly that into x; they
reject packings that do not fit x, and the fused modules repack when (and only when) their
weights change."""
import pytest
import torch

import efficientvit_kernels as K
from cases import (cast, cga_args, random_cga_params, random_ffn_params, random_input, reference_cga,
                   relative_error)
from python_ref import functional

ops = torch.ops.efficientvit


def cga_case(C=48, heads=3, kernels=(7, 5, 3), window=7, key_dim=16, dtype=torch.float32, seed=0):
    return cast(random_cga_params(C, heads, kernels, window, key_dim=key_dim, seed=seed), dtype)


def cga_packed(x, p, residual=True):
    packed = ops.cga_pack(*cga_args(p))
    return ops.cga_packed(x, packed, p["dw_weight"].shape[1], p["window_size"], residual)


@pytest.mark.parametrize("C,heads,kernels,key_dim,window,H,W", [
    (48, 3, (7, 5, 3), 16, 7, 9, 11), (64, 4, (7, 5, 3, 3), 16, 7, 14, 14), (384, 4, (7, 5, 3, 3), 16, 4, 4, 4),
    (60, 5, (5, 3, 3, 1, 1), 4, 7, 7, 9), (24, 2, (3, 1), 8, 5, 3, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_cga_packed_equals_cga(C, heads, kernels, key_dim, window, H, W, dtype, channels_last):
    p = cga_case(C, heads, kernels, window, key_dim, dtype)
    x = random_input(2, C, H, W, dtype=dtype, channels_last=channels_last)
    for residual in (True, False):
        out = cga_packed(x, p, residual)
        assert torch.equal(out, ops.cga(x, *cga_args(p), residual))
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert relative_error(cga_packed(x, p), reference_cga(x.double(), p)) < {torch.float32: 1e-5,
                                                                             torch.float64: 1e-12}[dtype]


@pytest.mark.parametrize("C,M", [(64, 128), (20, 7), (384, 768)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_ffn_packed_equals_ffn(C, M, dtype, channels_last):
    weights = [t.to(dtype) for t in random_ffn_params(C, M, seed=C)]
    x = random_input(3, C, 5, 7, dtype=dtype, channels_last=channels_last)
    packed = ops.ffn_pack(*weights)
    for residual in (True, False):
        assert torch.equal(ops.ffn_packed(x, packed, residual), ops.ffn(x, *weights, residual))


# Where x lies in the tensor it is part of: dense in both layouts, where the kernels write in
# place, or a view that is not dense, computed out of place and copied back.
# (channels_last, the tensor's channels and width, as multiples of x's, x's index in it)
IN_PLACE_CASES = {"contiguous": (False, 1, 1, ()), "channels_last": (True, 1, 1, ()),
                  "columns": (False, 1, 2, (Ellipsis, slice(3, 14))),
                  "channel_slice": (True, 2, 1, (slice(None), slice(0, None, 2)))}


def _check_in_place(op_in_place, op, C, dtype, case):
    channels_last, channels, width, index = IN_PLACE_CASES[case]
    whole = random_input(2, channels * C, 9, width * 11, dtype=dtype, channels_last=channels_last)
    x = whole[index]
    expected = whole.clone()
    expected[index] = op(x)
    ptr, strides = x.data_ptr(), x.stride()
    assert op_in_place(x) is x and x.data_ptr() == ptr and x.stride() == strides
    assert torch.equal(whole, expected)  # x as op(x) computes it, and nothing else written




@pytest.mark.parametrize("C,heads,kernels", [(48, 3, (7, 5, 3)), (20, 2, (5, 3))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(IN_PLACE_CASES))
@pytest.mark.parametrize("residual", [True, False])
def test_cga_packed_in_place(C, heads, kernels, dtype, case, residual):
    p = cga_case(C, heads, kernels, dtype=dtype)
    packed = ops.cga_pack(*cga_args(p))
    args = (packed, p["dw_weight"].shape[1], p["window_size"], residual)
    _check_in_place(lambda x: K.ops.cga_packed_(x, *args), lambda x: ops.cga_packed(x, *args),
                    C, dtype, case)


@pytest.mark.parametrize("C,M", [(64, 128), (20, 7)])  # 20: not a whole number of vectors
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(IN_PLACE_CASES))
@pytest.mark.parametrize("residual", [True, False])
def test_ffn_packed_in_place(C, M, dtype, case, residual):
    packed = ops.ffn_pack(*[t.to(dtype) for t in random_ffn_params(C, M, seed=C)])
    _check_in_place(lambda x: K.ops.ffn_packed_(x, packed, residual),
                    lambda x: ops.ffn_packed(x, packed, residual), C, dtype, case)


def test_packed_batch_zero_and_nan():
    p = cga_case()
    packed = ops.cga_pack(*cga_args(p))
    assert ops.cga_packed(torch.empty(0, 48, 9, 9), packed, 16, 7, True).shape == (0, 48, 9, 9)
    x = random_input(1, 48, 9, 9).float()
    x[0, 5, 3, 3] = float("nan")
    assert torch.equal(ops.cga_packed(x, packed, 16, 7, True).isnan(),
                       functional.cga(x, **p, residual=True).isnan())


def _bad_cga_packed_cases():
    p = cga_case()
    packed = ops.cga_pack(*cga_args(p))
    x = random_input(1, 48, 9, 9).float()
    other = ops.cga_pack(*cga_args(cga_case(C=64, heads=4, kernels=(7, 5, 3, 3))))
    radius = list(packed)
    radius[7] = torch.tensor([9, 0, 0])
    strided = list(packed)
    strided[0] = strided[0].transpose(1, 2).contiguous().transpose(1, 2)  # same shape and values
    return {
        "count": ((x, packed[:5], 16, 7, True), "tensors of cga_pack"),
        "dtype": ((x.double(), packed, 16, 7, True), "dtype"),
        "other layer": ((random_input(1, 96, 9, 9).float(), packed, 16, 7, True), "must have shape"),
        "other channels": ((x, other, 16, 7, True), "heads do not divide|must have shape"),
        "key dim": ((x, packed, 8, 7, True), "must have shape"),
        "window": ((x, packed, 16, 5, True), "must have shape"),
        "radius": ((x, radius, 16, 7, True), "radius"),
        "not contiguous": ((x, strided, 16, 7, True), "contiguous"),
        "rank": ((x[0], packed, 16, 7, True), "4-D"),
    }


@pytest.mark.parametrize("case", list(_bad_cga_packed_cases()))
@pytest.mark.parametrize("op", ["cga_packed", "cga_packed_"])
def test_cga_packed_bad_input(case, op):
    args, message = _bad_cga_packed_cases()[case]
    x0 = args[0].clone()
    with pytest.raises((RuntimeError, ValueError), match=message):
        getattr(ops, op)(*args)
    assert torch.equal(args[0], x0)  # rejected before anything is written


def test_pack_bad_input():
    p = cga_case()
    with pytest.raises(RuntimeError, match="attention_bias"):
        ops.cga_pack(*cga_args(dict(p, attention_bias=torch.zeros(3, 5, 5))))
    with pytest.raises(RuntimeError, match="proj_bias has dtype"):
        ops.cga_pack(*cga_args(dict(p, proj_bias=p["proj_bias"].double())))
    with pytest.raises(RuntimeError, match="floating"):
        ops.cga_pack(*cga_args(dict(p, qkv_weight=p["qkv_weight"].int())))
    w1, b1, w2, b2 = (t.float() for t in random_ffn_params(16, 32))
    with pytest.raises(RuntimeError, match="w2 must have shape"):
        ops.ffn_pack(w1, b1, w2[:8], b2)
    packed = ops.ffn_pack(w1, b1, w2, b2)
    with pytest.raises(RuntimeError, match="must have shape"):
        ops.ffn_packed(torch.randn(1, 24, 3, 3), packed, True)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.ffn_packed(torch.randn(1, 16, 3, 3, dtype=torch.float64), packed, True)
    with pytest.raises(RuntimeError, match="tensors of ffn_pack"):
        ops.ffn_packed(torch.randn(1, 16, 3, 3), packed[:3], True)
    with pytest.raises(RuntimeError, match="must have shape"):
        ops.ffn_packed_(torch.randn(1, 24, 3, 3), packed, True)
    with pytest.raises(RuntimeError, match="dtype"):
        ops.ffn_packed_(torch.randn(1, 16, 3, 3, dtype=torch.float64), packed, True)
    with pytest.raises(RuntimeError, match="unsupported operation"):  # elements that share memory
        ops.ffn_packed_(torch.randn(1, 16, 1, 1).expand(2, 16, 3, 3), packed, True)


def test_opcheck_packed():
    p = cga_case()
    x = random_input(2, 48, 9, 8).float()
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(ops.cga_packed.default, (x, ops.cga_pack(*cga_args(p)), 16, 7, True),
                          test_utils=utils)
    ffn = [t.float() for t in random_ffn_params(48, 96)]
    torch.library.opcheck(ops.ffn_packed.default, (x, ops.ffn_pack(*ffn), True), test_utils=utils)
    # the in-place variants: the schema's mutation annotation checked against what they write
    torch.library.opcheck(ops.cga_packed_.default, (x.clone(), ops.cga_pack(*cga_args(p)), 16, 7, True),
                          test_utils=utils)
    torch.library.opcheck(ops.ffn_packed_.default, (x.clone(), ops.ffn_pack(*ffn), True), test_utils=utils)
    torch.library.opcheck(ops.cga_pack.default, tuple(cga_args(p)), test_utils=("test_schema",))
    torch.library.opcheck(ops.ffn_pack.default, tuple(ffn), test_utils=("test_schema",))


# The modules: packed once at construction, repacked when a weight changes.

def _fused_cga(backend="auto"):
    p = cga_case()
    return K.FusedCGA(**p, residual=True, backend=backend), p


def _count_packs(module, monkeypatch):
    calls = []
    pack = type(module)._pack_op

    def counting(*args):
        calls.append(1)
        return pack(*args)

    monkeypatch.setattr(type(module), "_pack_op", staticmethod(counting))
    return calls


def test_module_packs_once(monkeypatch):
    m, p = _fused_cga()
    assert m._packed is not None  # packed at construction
    calls = _count_packs(m, monkeypatch)
    packed_calls = []
    cga_on_packed = K.ops.cga_packed
    monkeypatch.setattr(K.ops, "cga_packed", lambda *a: packed_calls.append(1) or cga_on_packed(*a))
    x = random_input(2, 48, 9, 11).float()
    for _ in range(3):
        assert torch.equal(m(x), ops.cga(x, *cga_args(p), True))
    assert calls == [] and packed_calls == [1, 1, 1]


def test_module_repacks_after_in_place_change_and_load(monkeypatch):
    m, p = _fused_cga()
    x = random_input(2, 48, 9, 11).float()
    with torch.no_grad():
        m.proj_weight.mul_(2)
    assert torch.equal(m(x), ops.cga(x, *cga_args(dict(p, proj_weight=p["proj_weight"] * 2)), True))
    q = cga_case(seed=3)
    m.load_state_dict({k: q[k] for k in m.state_dict()})
    assert torch.equal(m(x), ops.cga(x, *cga_args(q), True))
    q["attention_bias"] = cga_case(seed=4)["attention_bias"]
    m.attention_bias = q["attention_bias"].clone()  # a buffer replaced
    assert torch.equal(m(x), ops.cga(x, *cga_args(q), True))
    calls = _count_packs(m, monkeypatch)
    m.qkv_bias.data.add_(1)  # moves no version counter: repack() by hand
    m.repack()
    assert calls == [1]
    q["qkv_bias"] = q["qkv_bias"] + 1
    assert torch.equal(m(x), ops.cga(x, *cga_args(q), True))


def test_module_follows_dtype_and_format():
    w = [t.float() for t in random_ffn_params(24, 48)]
    m = K.FusedFFN(*w, residual=True)
    x = random_input(2, 24, 5, 6)
    assert torch.equal(m.double()(x), ops.ffn(x, *[t.double() for t in w], True))
    xl = x.float().to(memory_format=torch.channels_last)
    out = m.float()(xl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ops.ffn(xl, *w, True))
    with pytest.raises((RuntimeError, ValueError), match="dtype"):
        m(x)  # float64 x, float32 weights: the op's own error


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_module_in_place(backend):
    """inplace: the CPU kernel on packed weights writes into x; any other path leaves x alone."""
    w = [t.float() for t in random_ffn_params(32, 64)]
    m = K.FusedFFN(*w, residual=True, inplace=True, backend=backend)
    assert "inplace=True" in repr(m)
    x = random_input(2, 32, 5, 6).float().to(memory_format=torch.channels_last)
    expected, x0 = ops.ffn(x, *w, True), x.clone()
    out = m(x)
    assert torch.allclose(out, expected, rtol=1e-5, atol=1e-5)
    assert (out is x) == (backend == "auto")
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = x0.clone()
    assert torch.allclose(compiled(y), expected, rtol=1e-5, atol=1e-5) and torch.equal(y, x0)


def test_module_reference_backend_does_not_pack():
    m, p = _fused_cga("reference")
    assert m._packed is None
    x = random_input(1, 48, 7, 7).float()
    assert torch.equal(m(x), functional.cga(x, **p, residual=True))


def test_module_compiled_uses_unpacked_op():
    m, p = _fused_cga()
    x = random_input(2, 48, 9, 11).float()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), ops.cga(x, *cga_args(p), True))
    graph = torch.export.export(m, (x,)).graph_module.code
    assert "efficientvit.cga.default" in graph and "cga_packed" not in graph
