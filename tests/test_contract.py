"""The ops' argument contract, held twice (csrc/checks.h for the C++ kernels,
efficientvit_kernels/ops.py for the fakes and the Triton kernels): every bad input is rejected
with a ValueError naming the problem, by the CPU kernel and by the fake alike, message for
message; tensors on another device (meta included) are rejected by every op."""
import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import efficientvit_kernels  # noqa: F401
from efficientvit_kernels.testing import (cast, cga_args, random_cga_params, random_dwconv_params,
                                          random_ffn_params, random_input)

ops = torch.ops.efficientvit


def cga_call(**changes):
    p = cast(random_cga_params(32, 2, (5, 3), 7), torch.float32)
    p["x"] = random_input(1, 32, 9, 9).float()
    p.update(changes)
    return ops.cga, (p["x"], *cga_args(p), True)


def dwconv_call(x=None, weight=None, bias=None):
    w, b = (t.float() for t in random_dwconv_params(8))
    return ops.dwconv, (torch.randn(1, 8, 5, 5) if x is None else x, w if weight is None else weight,
                        b if bias is None else bias, False, True)


def _mlp_params(**changes):
    p = dict(zip(("w1", "b1", "w2", "b2"), (t.float() for t in random_ffn_params(8, 16))))
    p["x"] = torch.randn(1, 8, 5, 5)
    p.update(changes)
    return p


def ffn_call(**changes):
    p = _mlp_params(**changes)
    return ops.ffn, (p["x"], p["w1"], p["b1"], p["w2"], p["b2"], True)


def dwconv_ffn_call(**changes):
    p = _mlp_params(**changes)
    dw_weight, dw_bias = (changes.get(n, t.float()) for n, t in zip(("dw_weight", "dw_bias"),
                                                                   random_dwconv_params(8)))
    return ops.dwconv_ffn, (p["x"], dw_weight, dw_bias, p["w1"], p["b1"], p["w2"], p["b2"])


def squeeze_excite_call(**changes):
    p = _mlp_params(**changes)
    return ops.squeeze_excite, (p["x"], p["w1"], p["b1"], p["w2"], p["b2"])


def conv1x1_call(**changes):
    p = dict(x=torch.randn(1, 8, 4, 4), weight=torch.randn(16, 8), bias=torch.randn(16),
             dw_weight=torch.randn(16, 3, 3), dw_bias=torch.randn(16))
    p.update(changes)
    return ops.conv1x1, (p["x"], p["weight"], p["bias"], True, p["dw_weight"], p["dw_bias"])


def patch_embed_call(x=None, weights=None, biases=None):
    w = [torch.randn(8, 3, 3, 3), torch.randn(16, 8, 3, 3)]
    b = [torch.randn(8), torch.randn(16)]
    return ops.patch_embed, (torch.randn(1, 3, 8, 8) if x is None else x,
                             w if weights is None else weights, b if biases is None else biases, False)


def _cases():
    p = cast(random_cga_params(32, 2, (5, 3), 7), torch.float32)
    return {
        "cga channels": (cga_call(x=torch.randn(1, 31, 9, 9)), "heads do not divide"),
        "cga rank": (cga_call(x=torch.randn(32, 9, 9)), "4-D"),
        "cga integer x": (cga_call(x=torch.ones(1, 32, 9, 9, dtype=torch.int32)), "floating"),
        "cga dtype mismatch": (cga_call(proj_bias=p["proj_bias"].double()), "proj_bias has dtype"),
        "cga even kernel": (cga_call(dw_weight=torch.zeros(2, 16, 4, 4)), "odd"),
        "cga bias table": (cga_call(attention_bias=torch.zeros(2, 5, 5)), "attention_bias"),
        "cga window 0": (cga_call(window_size=0), "window_size"),
        "cga huge window": (cga_call(window_size=2 ** 63 - 7), "attention_bias"),
        "cga key dim 0": (cga_call(qkv_weight=torch.zeros(2, 16, 16), qkv_bias=torch.zeros(2, 16),
                                   dw_weight=torch.zeros(2, 0, 5, 5), dw_bias=torch.zeros(2, 0)),
                          "key dim"),
        "cga heads": (cga_call(qkv_weight=torch.zeros(3, 2 * 16 + 10, 10)), "heads do not divide"),
        "cga qkv shape": (cga_call(qkv_weight=torch.zeros(2, 40, 16)), "qkv_weight"),
        "cga proj shape": (cga_call(proj_weight=torch.zeros(32, 16)), "proj_weight"),
        "cga weight on meta": (cga_call(proj_weight=p["proj_weight"].to("meta")), "proj_weight is on meta"),
        "dwconv channels": (dwconv_call(x=torch.randn(1, 9, 5, 5)), "weight must have shape"),
        "dwconv even kernel": (dwconv_call(weight=torch.zeros(8, 2, 2)), "odd"),
        "dwconv rank": (dwconv_call(x=torch.randn(8, 5, 5)), "4-D"),
        "dwconv integer x": (dwconv_call(x=torch.ones(1, 8, 5, 5, dtype=torch.int32)), "floating"),
        "dwconv bias on meta": (dwconv_call(bias=torch.zeros(8, device="meta")), "bias is on meta"),
        "ffn channels": (ffn_call(x=torch.randn(1, 7, 5, 5)), "w1 must have shape"),
        "ffn w2": (ffn_call(w2=torch.zeros(16, 8)), "w2 must have shape"),
        "ffn dtype": (ffn_call(b1=torch.zeros(16, dtype=torch.float64)), "b1 has dtype"),
        "ffn w1 rank": (ffn_call(w1=torch.zeros(16, 8, 1, 1)), "w1 must be 2-D"),
        "ffn weight on meta": (ffn_call(w2=torch.zeros(8, 16, device="meta")), "w2 is on meta"),
        "dwconv_ffn channels": (dwconv_ffn_call(x=torch.randn(1, 7, 5, 5)), "dw_weight must have shape"),
        "dwconv_ffn even kernel": (dwconv_ffn_call(dw_weight=torch.zeros(8, 4, 4)), "odd"),
        "dwconv_ffn dw_bias": (dwconv_ffn_call(dw_bias=torch.zeros(9)), "dw_bias must have shape"),
        "dwconv_ffn w2": (dwconv_ffn_call(w2=torch.zeros(16, 8)), "w2 must have shape"),
        "dwconv_ffn dtype": (dwconv_ffn_call(dw_bias=torch.zeros(8, dtype=torch.float64)),
                             "dw_bias has dtype"),
        "dwconv_ffn on meta": (dwconv_ffn_call(b1=torch.zeros(16, device="meta")), "b1 is on meta"),
        "squeeze_excite channels": (squeeze_excite_call(x=torch.randn(1, 7, 5, 5)), "w1 must have shape"),
        "squeeze_excite w2": (squeeze_excite_call(w2=torch.zeros(16, 8)), "w2 must have shape"),
        "squeeze_excite integer x": (squeeze_excite_call(x=torch.ones(1, 8, 5, 5, dtype=torch.int32)),
                                     "floating"),
        "squeeze_excite on meta": (squeeze_excite_call(b2=torch.zeros(8, device="meta")), "b2 is on meta"),
        "conv1x1 channels": (conv1x1_call(x=torch.randn(1, 5, 4, 4)), "weight must have shape"),
        "conv1x1 dw alone": (conv1x1_call(dw_bias=None), "together"),
        "conv1x1 dw shape": (conv1x1_call(dw_weight=torch.zeros(16, 2, 2)), "dw_weight must have shape"),
        "conv1x1 on meta": (conv1x1_call(bias=torch.zeros(16, device="meta")), "bias is on meta"),
        "patch_embed channels": (patch_embed_call(x=torch.randn(1, 4, 8, 8)), r"weights\[0\] must have shape"),
        "patch_embed chain": (patch_embed_call(weights=[torch.randn(8, 3, 3, 3), torch.randn(16, 4, 3, 3)]),
                              r"weights\[1\] must have shape"),
        "patch_embed no layer": (patch_embed_call(weights=[], biases=[]), "at least one convolution"),
        "patch_embed biases": (patch_embed_call(biases=[torch.randn(8)]), "a bias per weight"),
        "patch_embed on meta": (patch_embed_call(biases=[torch.randn(8), torch.zeros(16, device="meta")]),
                                r"biases\[1\] is on meta"),
    }


CASES = _cases()
# C++ spells dtypes as ATen does; the Python checks as torch does.
DTYPE_NAMES = {"torch.float32": "Float", "torch.float64": "Double", "torch.int32": "Int"}


def normalized(message):
    return re.sub("|".join(map(re.escape, DTYPE_NAMES)), lambda m: DTYPE_NAMES[m.group()],
                  str(message).splitlines()[0])


def fake_call(op, args):
    """op on fake copies of args (the fake implementation and the Python checks)."""
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor)
                else [mode.from_tensor(t) for t in a] if isinstance(a, list) else a for a in args]
        return op(*fake)


@pytest.mark.parametrize("case", list(CASES))
def test_rejected_alike_by_kernel_and_fake(case):
    (op, args), message = CASES[case]
    with pytest.raises(ValueError, match=message) as kernel:
        op(*args)
    with pytest.raises(ValueError, match=message) as fake:
        fake_call(op, args)
    assert normalized(kernel.value) == normalized(fake.value)


@pytest.mark.parametrize("op", ["cga", "dwconv", "ffn", "dwconv_ffn", "conv1x1", "patch_embed",
                                "squeeze_excite"])
def test_x_on_meta_with_cpu_weights(op):
    """x on the meta device, the weights on CPU: rejected (never an uninitialized result)."""
    call, args = {"cga": cga_call, "dwconv": dwconv_call, "ffn": ffn_call,
                  "dwconv_ffn": dwconv_ffn_call, "conv1x1": conv1x1_call,
                  "patch_embed": patch_embed_call, "squeeze_excite": squeeze_excite_call}[op]()
    with pytest.raises(ValueError, match="is on cpu but x is on meta"):
        call(args[0].to("meta"), *args[1:])


def test_fake_matches_kernel_layout_for_every_input_layout():
    """The fakes give the strides the kernels give (the output layout rule, held once per
    language): a permuted dense input included."""
    x = torch.randn(2, 14, 64, 14).permute(0, 2, 1, 3)
    (op, args) = ffn_call(x=x, w1=torch.randn(16, 64), w2=torch.randn(64, 16), b2=torch.randn(64))
    out, fake = op(*args), fake_call(op, args)
    assert out.stride() == fake.stride() == x.contiguous().stride()
