"""CPU weight packing, a private detail of the CPU backend (``torch.ops.efficientvit_cpu.X_pack``
returns a ``PackedWeights``, whose ``run`` computes op X): each op on packed weights computes
exactly what the op computes; a packing carries the sizes it
was made for, so a call that contradicts them is rejected; the fused modules pack once and
repack when (and only when) their weights change, and never copy or pickle a packing."""
import copy
import io

import pytest
import torch

import efficientvit_kernels as K
from efficientvit_kernels.testing import (assert_close, cast, cga_args, packings, random_cga_params,
                                          random_ffn_params, random_input, reference_cga)
from python_ref import functional

ops = torch.ops.efficientvit
cpu = torch.ops.efficientvit_cpu


def cga_case(C=48, heads=3, kernels=(7, 5, 3), window=7, key_dim=16, dtype=torch.float32, seed=0):
    return cast(random_cga_params(C, heads, kernels, window, key_dim=key_dim, seed=seed), dtype)


CGA_SHAPES = [(48, 3, (7, 5, 3), 16, 7, 9, 11), (64, 4, (7, 5, 3, 3), 16, 7, 14, 14),
              (384, 4, (7, 5, 3, 3), 16, 4, 4, 4), (60, 5, (5, 3, 3, 1, 1), 4, 7, 7, 9),
              (24, 2, (3, 1), 8, 5, 3, 8)]
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
LAYOUTS = pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
RESIDUAL = pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])


@pytest.mark.parametrize("C,heads,kernels,key_dim,window,H,W", CGA_SHAPES,
                         ids=[f"C{s[0]}h{s[1]}ws{s[4]}_{s[5]}x{s[6]}" for s in CGA_SHAPES])
@DTYPES
@LAYOUTS
@RESIDUAL
def test_cga_packed_equals_cga(C, heads, kernels, key_dim, window, H, W, dtype, channels_last,
                               residual):
    p = cga_case(C, heads, kernels, window, key_dim, dtype)
    x = random_input(2, C, H, W, dtype=dtype, channels_last=channels_last)
    out = cpu.cga_pack(*cga_args(p)).run(x, residual)
    assert torch.equal(out, ops.cga(x, *cga_args(p), residual))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_close(out, reference_cga(x, p, residual))


@pytest.mark.parametrize("C,M", [(64, 128), (20, 7), (384, 768)])
@DTYPES
@LAYOUTS
@RESIDUAL
def test_ffn_packed_equals_ffn(C, M, dtype, channels_last, residual):
    weights = [t.to(dtype) for t in random_ffn_params(C, M, seed=C)]
    x = random_input(3, C, 5, 7, dtype=dtype, channels_last=channels_last)
    assert torch.equal(cpu.ffn_pack(*weights).run(x, residual),
                       ops.ffn(x, *weights, residual))


def test_packed_batch_zero_and_nan():
    p = cga_case()
    packed = cpu.cga_pack(*cga_args(p))
    assert packed.run(torch.empty(0, 48, 9, 9), True).shape == (0, 48, 9, 9)
    x = random_input(1, 48, 9, 9).float()
    x[0, 5, 3, 3] = float("nan")
    assert torch.equal(packed.run(x, True).isnan(),
                       functional.cga(x, **p, residual=True).isnan())


def _bad_packed_calls():
    packed = cpu.cga_pack(*cga_args(cga_case()))
    ffn = cpu.ffn_pack(*(t.float() for t in random_ffn_params(48, 96)))
    x = random_input(1, 48, 9, 9).float()
    return {
        "dtype": (lambda: packed.run(x.double(), True), "packed for Float"),
        "channels": (lambda: packed.run(random_input(1, 96, 9, 9).float(), True),
                     "96 channels but the weights were packed for 48"),
        "rank": (lambda: packed.run(x[0], True), "4-D"),
        "meta x": (lambda: ffn.run(x.to("meta"), True), "meta|Meta"),
    }


@pytest.mark.parametrize("case", list(_bad_packed_calls()))
def test_packed_call_bad_input(case):
    call, message = _bad_packed_calls()[case]
    with pytest.raises((RuntimeError, ValueError, NotImplementedError), match=message):
        call()


def test_pack_bad_input():
    p = cga_case()
    with pytest.raises(ValueError, match="attention_bias"):
        cpu.cga_pack(*cga_args(dict(p, attention_bias=torch.zeros(3, 5, 5))))
    with pytest.raises(ValueError, match="proj_bias has dtype"):
        cpu.cga_pack(*cga_args(dict(p, proj_bias=p["proj_bias"].double())))
    with pytest.raises(ValueError, match="floating"):
        cpu.cga_pack(*cga_args(dict(p, qkv_weight=p["qkv_weight"].int())))
    with pytest.raises(ValueError, match="window_size"):  # the bias table is not (3, 2**62, 2**62)
        cpu.cga_pack(*cga_args(dict(p, window_size=2 ** 62)))
    w1, b1, w2, b2 = (t.float() for t in random_ffn_params(16, 32))
    with pytest.raises(ValueError, match="w2 must have shape"):
        cpu.ffn_pack(w1, b1, w2[:8], b2)
    with pytest.raises((RuntimeError, NotImplementedError), match="Meta|meta"):
        cpu.ffn_pack(w1.to("meta"), b1.to("meta"), w2.to("meta"), b2.to("meta"))


def test_packed_weights_refuse_autograd():
    w = [t.float() for t in random_ffn_params(8, 16)]
    x = torch.randn(1, 8, 3, 3, requires_grad=True)
    with pytest.raises(RuntimeError, match="no backward formula"):
        cpu.ffn_pack(*w).run(x, True)
    with torch.no_grad():
        cpu.ffn_pack(*w).run(x, True)


# The modules: their op packs the weights on the first CPU call and again when a weight changes.

def _fused_cga(backend="auto"):
    p = cga_case()
    return K.FusedCGA(**p, residual=True, backend=backend), p


def test_module_packs_once():
    m, p = _fused_cga()
    x = random_input(2, 48, 9, 11).float()
    expected = ops.cga(x, *cga_args(p), True)
    m(x)
    assert packings(lambda: [torch.equal(m(x), expected) or pytest.fail() for _ in range(3)]) == 0


def test_module_repacks_after_in_place_change_and_load():
    m, p = _fused_cga()
    x = random_input(2, 48, 9, 11).float()
    m(x)
    with torch.no_grad():
        m.proj_weight.mul_(2)
    q = dict(p, proj_weight=p["proj_weight"] * 2)
    assert packings(lambda: assert_close(m(x), reference_cga(x, q), torch.float32)) == 1
    q = cga_case(seed=3)
    m.load_state_dict({k: q[k] for k in m.state_dict()})
    assert packings(lambda: assert_close(m(x), reference_cga(x, q), torch.float32)) == 1
    q["proj_weight"] = cga_case(seed=4)["proj_weight"]
    m.proj_weight = q["proj_weight"].clone()  # a buffer replaced
    assert packings(lambda: assert_close(m(x), reference_cga(x, q), torch.float32)) == 1
    m.qkv_weight.data.mul_(-1)  # moves no version counter: clear the cache by hand
    K.ops.clear_packing_cache()
    q["qkv_weight"] = q["qkv_weight"] * -1
    assert packings(lambda: assert_close(m(x), reference_cga(x, q), torch.float32)) == 1


def test_module_follows_dtype_and_format():
    w = [t.float() for t in random_ffn_params(24, 48)]
    m = K.FusedFFN(*w, residual=True)
    x = random_input(2, 24, 5, 6)
    assert torch.equal(m.double()(x), ops.ffn(x, *[t.double() for t in w], True))
    xl = x.float().to(memory_format=torch.channels_last)
    out = m.float()(xl)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ops.ffn(xl, *w, True))
    with pytest.raises(ValueError, match="dtype"):
        m(x)  # float64 x, float32 weights: the op's own error


def test_module_copies_and_pickles():
    m, p = _fused_cga()
    x = random_input(2, 48, 9, 11).float()
    expected = ops.cga(x, *cga_args(p), True)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    for copied in (copy.deepcopy(m), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert torch.equal(copied(x), expected)
    assert torch.equal(m(x), expected)


def test_module_under_inference_mode():
    with torch.inference_mode():
        m, p = _fused_cga()  # its buffers are inference tensors: no version counters
        x = random_input(2, 48, 9, 11).float()
        assert torch.equal(m(x), ops.cga(x, *cga_args(p), True))
    assert torch.equal(m(x), ops.cga(x, *cga_args(p), True))


def test_module_reference_backend_does_not_pack():
    m, p = _fused_cga("reference")
    x = random_input(1, 48, 7, 7).float()
    assert packings(lambda: torch.equal(m(x), functional.cga(x, **p, residual=True))
                    or pytest.fail()) == 0


def test_module_compiled_uses_unpacked_op():
    m, p = _fused_cga()
    x = random_input(2, 48, 9, 11).float()
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), ops.cga(x, *cga_args(p), True))
    assert packings(lambda: compiled(x)) == 0  # the op's packing cache serves the graph
    graph = torch.export.export(m, (x,)).graph_module.code
    assert "efficientvit.cga.default" in graph and "efficientvit_cpu" not in graph


# The ops called with plain weights (as exported, compiled and AOTInductor graphs call them)
# pack once per set of weights and reuse the packing while the weights are unchanged.

def ffn_call(C=32, M=64, seed=0):
    params = [t.float() for t in random_ffn_params(C, M, seed=seed)]
    x = random_input(2, C, 5, 6, dtype=torch.float32)
    ref = functional.ffn(x.double(), *[t.double() for t in params], True)
    return x, params, ref


def test_op_packs_once_per_weights():
    x, params, ref = ffn_call()
    assert packings(lambda: ops.ffn(x, *params, True)) == 1
    assert packings(lambda: [ops.ffn(x, *params, True) for _ in range(3)]) == 0
    other = [p.clone() for p in params]  # equal values, other tensors
    assert packings(lambda: ops.ffn(x, *other, True)) == 1
    assert_close(ops.ffn(x, *params, True), ref, torch.float32)


def test_op_repacks_after_in_place_change():
    x, params, _ = ffn_call(seed=1)
    ops.ffn(x, *params, True)
    with torch.no_grad():
        params[2].mul_(-2)  # w2
    ref = functional.ffn(x.double(), *[t.double() for t in params], True)
    assert packings(lambda: assert_close(ops.ffn(x, *params, True), ref, torch.float32)) == 1


def test_op_does_not_reuse_the_packing_of_freed_weights():
    """New weights where freed ones were (the allocator reuses the address) are new weights."""
    x, params, _ = ffn_call(seed=2)
    ops.ffn(x, *params, True)
    shapes = [p.shape for p in params]
    del params
    for seed in range(3, 6):
        fresh = [torch.randn(s) / s[-1] ** 0.5 for s in shapes]
        ref = functional.ffn(x.double(), *[t.double() for t in fresh], True)
        assert_close(ops.ffn(x, *fresh, True), ref, torch.float32)
        del fresh


def test_squeeze_excite_packs_a_copy_and_reads_inference_weights_where_they_are():
    """Its packing is the weights as they are (copied into the packed weights' memory): packed
    once, again after an in-place change; inference tensors are not copied on every call."""
    x = random_input(2, 48, 5, 6, dtype=torch.float32)
    params = [torch.randn(24, 48), torch.randn(24), torch.randn(48, 24), torch.randn(48)]

    def check(weights, packs):
        ref = functional.squeeze_excite(x.double(), *[w.double() for w in weights])
        assert packings(lambda: assert_close(ops.squeeze_excite(x, *weights), ref,
                                             torch.float32)) == packs

    check(params, 1)
    check(params, 0)
    with torch.no_grad():
        params[2].mul_(-2)
    check(params, 1)
    with torch.inference_mode():
        frozen = [p.clone() for p in params]
    check(frozen, 0)
    check(frozen, 0)


def test_packings_made_and_freed_around_a_live_one_stay_correct():
    """Packed weights share memory (slabs): freeing some never frees or reuses another's."""
    x, kept, ref = ffn_call(seed=7)
    kept_packing = cpu.ffn_pack(*kept)
    for seed in range(8, 12):
        _, params, other_ref = ffn_call(seed=seed)
        assert_close(cpu.ffn_pack(*params).run(x, True), other_ref, torch.float32)
        del params
        assert_close(kept_packing.run(x, True), ref, torch.float32)


def _transparent_huge_pages():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def _anon_huge_page_kb():
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))


@pytest.mark.skipif(_transparent_huge_pages() != "madvise",
                    reason="huge pages only where asked for (THP 'madvise'): there the packing's "
                           "advice is what gives them")
def test_packed_weights_are_in_huge_pages():
    """42 MB of FFN weights, more than a slab: packed into new memory advised for 2 MiB pages."""
    C, M = 1024, 5120
    w1, w2 = torch.randn(M, C), torch.randn(C, M)
    before = _anon_huge_page_kb()
    packing = cpu.ffn_pack(w1, torch.zeros(M), w2, torch.zeros(C))
    assert _anon_huge_page_kb() - before >= 32 * 1024, "packed weights not in 2 MiB pages"
    del packing


def test_op_on_inference_tensors_packs_every_call():
    """Inference tensors have no version counter, so a change to one could not be seen."""
    with torch.inference_mode():
        x, params, ref = ffn_call(seed=6)
        assert packings(lambda: [ops.ffn(x, *params, True) for _ in range(2)]) == 2
        params[0].mul_(-1)
        ref = functional.ffn(x.double(), *[t.double() for t in params], True)
        assert_close(ops.ffn(x, *params, True), ref, torch.float32)


def test_clear_packing_cache_after_a_change_through_data():
    """A change through .data bumps no version counter: clear_packing_cache() is the way."""
    x, params, _ = ffn_call(seed=7)
    ops.ffn(x, *params, True)
    params[2].data.mul_(-2)
    K.ops.clear_packing_cache()
    ref = functional.ffn(x.double(), *[t.double() for t in params], True)
    assert_close(ops.ffn(x, *params, True), ref, torch.float32)


def test_small_weights_are_known_by_value():
    """A graph compiler may rebuild a small constant on every call, in new memory (an AOTInductor
    package does, for the stem's first bias): a weight of at most 1 KB is the same while its
    values are, so it is not repacked for a copy, and is for any change of its values."""
    x, params, _ = ffn_call(seed=8)
    ops.ffn(x, *params, True)
    w1, b1, w2, b2 = params
    assert b1.nbytes <= 1024 < w1.nbytes
    assert packings(lambda: ops.ffn(x, w1, b1.clone(), w2, b2.clone(), True)) == 0
    b1.data.add_(1)  # seen through .data too: the value changed
    ref = functional.ffn(x.double(), *[t.double() for t in params], True)
    assert packings(lambda: assert_close(ops.ffn(x, *params, True), ref, torch.float32)) == 1


def test_every_packed_op_uses_the_cache():
    p = cga_case()
    x = random_input(1, 48, 7, 7, dtype=torch.float32)
    w = torch.randn(24, 48)
    b = torch.randn(24)
    dw_w, dw_b = torch.randn(24, 3, 3), torch.randn(24)
    image = torch.randn(1, 3, 16, 16)
    stem = ([torch.randn(8, 3, 3, 3), torch.randn(16, 8, 3, 3)], [torch.randn(8), torch.randn(16)])
    w2, b2 = torch.randn(48, 24), torch.randn(48)  # squeeze-excite's second layer
    calls = [lambda: ops.cga(x, *cga_args(p), True),
             lambda: ops.conv1x1(x, w, b, True),
             lambda: ops.conv1x1(x, w, b, True, dw_w, dw_b),
             lambda: ops.patch_embed(image, *stem, True),
             lambda: ops.squeeze_excite(x, w, b, w2, b2)]
    for call in calls:
        assert packings(call) == 1
        assert packings(call) == 0


def test_packings_that_share_a_weight_are_told_apart():
    """The cache files a packing under its op and first weight over 1 KB: packings that share
    that weight (or have none) sit side by side and each is found again."""
    x, params, _ = ffn_call(seed=9)
    w1, b1, w2, b2 = params
    other_w2 = torch.randn_like(w2)
    small = [t.float() for t in random_ffn_params(4, 8, seed=10)]
    other_small = [t.float() for t in random_ffn_params(4, 8, seed=11)]
    x_small = random_input(1, 4, 3, 3, dtype=torch.float32)
    calls = [(x, [w1, b1, w2, b2]), (x, [w1, b1, other_w2, b2]),
             (x_small, small), (x_small, other_small)]
    for inputs, weights in calls:
        assert packings(lambda: ops.ffn(inputs, *weights, True)) == 1
    for inputs, weights in calls:
        ref = functional.ffn(inputs.double(), *[t.double() for t in weights], True)
        assert packings(lambda: assert_close(ops.ffn(inputs, *weights, True), ref,
                                             torch.float32)) == 0


def test_cache_drops_the_least_recently_used_beyond_its_bound():
    """At most 1024 packings (kPackingCacheEntries) are kept: the oldest is packed again, the
    newest is not, and every result stays right."""
    K.ops.clear_packing_cache()
    x = random_input(1, 16, 2, 2, dtype=torch.float32)
    sets = [[t.float() for t in random_ffn_params(16, 32, seed=s)] for s in range(1100)]
    for weights in sets:
        ops.ffn(x, *weights, True)
    for weights, expected in ((sets[-1], 0), (sets[0], 1), (sets[0], 0)):
        ref = functional.ffn(x.double(), *[t.double() for t in weights], True)
        assert packings(lambda: assert_close(ops.ffn(x, *weights, True), ref,
                                             torch.float32)) == expected
