"""`repro doctor` names each model's kernel path and fails when the params' device cannot be served."""

from __future__ import annotations

import pytest
import torch

from repro.cli import main


def test_doctor_on_cpu_lists_every_model_with_its_path(capsys):
    assert main(["doctor", "--params", "params/smoke.yaml"]) == 0
    out = capsys.readouterr().out
    assert "ehrmamba                         reference-chunked  [ok]" in out
    assert "transformer                      sdpa-causal  [ok]" in out
    assert out.strip().endswith("ok: every model runs on the path shown")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU failure")
def test_doctor_fails_when_params_want_cuda_and_there_is_none(capsys):
    assert main(["doctor", "--params", "params/default.yaml"]) == 1
    assert "FAIL: the params ask for cuda and no CUDA device is visible" in capsys.readouterr().out


def test_doctor_fails_where_nothing_can_render_the_report(capsys, monkeypatch):
    import shutil

    import pypandoc

    from repro.report import doctor

    monkeypatch.setattr(shutil, "which", lambda name: None)  # no quarto, no pandoc on PATH
    monkeypatch.setattr(pypandoc, "get_pandoc_path", lambda: (_ for _ in ()).throw(OSError("none")))
    how, ok = doctor.renderer()
    assert not ok and "needs pandoc" in how
    assert main(["doctor", "--params", "params/smoke.yaml"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: nothing here renders the report" in out and "--no-render" in out
