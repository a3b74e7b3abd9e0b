"""The main job (python -m efficientvit_kernels): check, timing table, JSON, exit code."""
import json

import pytest
import torch

import python_ref as R
from efficientvit_kernels.__main__ import main


def test_main_job_checks_and_writes_json(tmp_path, capsys):
    path = tmp_path / "result.json"
    assert main(["--model", "m0", "--no-compile", "--batch", "2", "--resolution", "96",
                 "--json", str(path)]) == 0
    table = capsys.readouterr().out
    assert "| M0 |" in table and "pass" in table
    result = json.loads(path.read_text())
    row = result["results"][0]
    assert row["passed"] and row["error"] < 1e-5 and row["img_per_s"]["fused"] > 0


def test_main_job_loads_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "m1.pth"
    torch.save({"model": R.randomize_(R.efficientvit_m1()).state_dict()}, path)
    assert main(["--model", "m1", "--checkpoint", str(path), "--no-compile", "--batch", "1",
                 "--resolution", "64"]) == 0
    with pytest.raises(ValueError, match="EfficientViT-M1"):
        main(["--model", "m0", "--checkpoint", str(path), "--no-compile", "--batch", "1"])


def test_main_job_rejects_bad_options():
    with pytest.raises(SystemExit):
        main(["--backend", "tpu"])
    with pytest.raises(SystemExit):
        main(["--batch", "0"])
