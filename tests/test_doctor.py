"""`repro doctor` names each model's kernel path and fails when the params' device cannot be served."""

from __future__ import annotations

import re

import pytest
import torch

from repro.cli import main


def test_doctor_on_cpu_lists_every_model_with_its_path(capsys):
    assert main(["doctor", "--params", "params/smoke.yaml"]) == 0
    out = capsys.readouterr().out
    assert "ehrmamba                         reference-steps  [ok]" in out
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


def test_doctor_probes_at_the_runs_length(capsys, tmp_path):
    """BigBird attends block-sparse only from (6 + 2r) blocks on: probed at 64 tokens the doctor called the
    default run's BigBird "bigbird-full" while every run of it trained block-sparse at 1024."""
    import yaml

    raw = yaml.safe_load(open("params/smoke.yaml"))
    raw["models"], raw["efficiency"]["models"] = ["bigbird"], ["bigbird"]
    raw["model_sizes"]["bigbird"] = {"n_layers": 1, "n_heads": 2, "block_size": 16}
    for max_len, path in ((128, "bigbird-full"), (512, "bigbird-block-sparse")):
        raw["tokenizer"]["max_len"] = max_len
        params = tmp_path / f"bb{max_len}.yaml"
        params.write_text(yaml.safe_dump(raw))
        assert main(["doctor", "--params", str(params)]) == 0
        out = capsys.readouterr().out
        assert f"{max_len} tokens (tokenizer.max_len)" in out
        assert re.search(rf"\n  bigbird +{path}  \[ok\]", out), out
