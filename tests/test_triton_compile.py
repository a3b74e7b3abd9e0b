"""Every Triton kernel specialization the launchers produce for M0-M5 compiles for sm_90 and
sm_80 without a GPU, and passes the static resource gate (efficientvit_kernels/cuda_static.py:
no spill to local memory, shared memory within the device's per-block limit, a block fits a
multiprocessor).

The specializations are those of the Triton-converted models at 224x224 (batch 1 and 2048)
and 288x288 (windows cut by the map's edge), contiguous and channels-last, in fp32, fp16 and
bf16, with every autotune config that survives the launcher's pruning
(efficientvit_kernels/triton_static.py). Compiling runs in a subprocess without
TRITON_INTERPRET (the other tests run the kernels in the interpreter).
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from efficientvit_kernels.cuda_static import format_profiles, resource_violations  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("triton_static") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "efficientvit_kernels.triton_static",
                           "--arch", "90", "80", "--jobs", "2", "--json", str(out)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)["rows"]


def test_every_specialization_compiles(rows):
    print(format_profiles([r for r in rows if "error" not in r]), file=sys.stderr)
    assert {r["arch"] for r in rows} == {80, 90}
    assert {r["kernel"] for r in rows} == {"_cga_kernel", "_dwconv_kernel", "_ffn_kernel"}
    errors = [f"{r['kernel']} [{r['variant']}] sm_{r['arch']}: {r['error']}"
              for r in rows if "error" in r]
    assert not errors, "\n".join(errors)


def test_resource_gate(rows):
    named = [dict(r, kernel=f"{r['kernel']} [{r['variant']}]") for r in rows if "error" not in r]
    found = resource_violations(named)
    assert not found, "\n".join(found)
