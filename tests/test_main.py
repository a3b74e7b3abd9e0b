"""The main job (python -m efficientvit_kernels): check, timing table, JSON, exit code."""
import json

import pytest
import torch

import python_ref as R
from efficientvit_kernels.__main__ import main
from efficientvit_kernels.testing import tolerance


def test_main_job_checks_and_writes_json(tmp_path, capsys):
    path = tmp_path / "result.json"
    assert main(["--model", "m0", "--batch", "2", "--resolution", "96",
                 "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "| M0 |" in table and "pass" in table
    result = json.loads(path.read_text())
    row = result["results"][0]
    assert row["passed"] and row["error"] < tolerance(torch.float32) and row["img_per_s"]["fused"] > 0


def test_main_job_times_the_cpu_graph(capsys):
    assert main(["--model", "m0", "--batch", "1", "--resolution", "64", "--cpu-graph"]) == 0
    table = capsys.readouterr().out
    assert "cpu_graph ms" in table and "cpu_graph/eager" in table and "pass" in table


def test_main_job_loads_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "m1.pth"
    torch.save({"model": R.randomize_(R.efficientvit_m1()).state_dict()}, path)
    assert main(["--model", "m1", "--checkpoint", str(path), "--batch", "1",
                 "--resolution", "64"]) == 0
    with pytest.raises(SystemExit) as exit_:  # a checkpoint of another model size
        main(["--model", "m0", "--checkpoint", str(path), "--batch", "1"])
    assert exit_.value.code == 2


def _garbage(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    return str(path)


# name: (the options, given a temporary folder; what the one line of error says)
BAD_OPTIONS = {
    "backend": (lambda tmp: ["--backend", "tpu"], "--backend"),
    "batch": (lambda tmp: ["--batch", "0"], "--batch must be positive"),
    "threads": (lambda tmp: ["--threads", "0"], "--threads must be positive"),
    "resolution": (lambda tmp: ["--resolution", "8"], "--resolution"),
    "fp16 on cpu": (lambda tmp: ["--dtype", "float16", "--device", "cpu"], "on CPU the kernels take fp32"),
    "triton on cpu": (lambda tmp: ["--backend", "triton", "--device", "cpu"], "--backend triton runs on a GPU"),
    "missing checkpoint": (lambda tmp: ["--checkpoint", str(tmp / "missing.pth")], "no such file"),
    "garbage checkpoint": (lambda tmp: ["--checkpoint", _garbage(tmp)], "not a readable PyTorch checkpoint"),
    "json folder": (lambda tmp: ["--json", str(tmp / "no" / "such" / "out.json")], "no such directory"),
    "json is a folder": (lambda tmp: ["--json", str(tmp)], "is a directory"),
    "cpu graph on cuda": (lambda tmp: ["--cpu-graph", "--device", "cuda"], "--cpu-graph replays on CPU"),
}


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_main_job_rejects_bad_options_in_one_line(case, tmp_path, capsys):
    options, message = BAD_OPTIONS[case]
    with pytest.raises(SystemExit) as exit_:
        main(options(tmp_path))
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err
