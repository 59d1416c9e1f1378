"""environment.yml: conda-forge only, with what the README promises a GPU node gets."""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_is_conda_forge_only_with_quarto_and_jupyterlab():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"], "the pytorch and nvidia channels stopped at PyTorch 2.5.1"
    deps = [d for d in env["dependencies"] if isinstance(d, str)]
    names = {d.split("=")[0].split(">")[0].split("<")[0].strip() for d in deps}
    assert not any("::" in d for d in deps), "no package pinned to another channel"
    for need in ("python", "pytorch-gpu", "cuda-nvcc", "quarto", "jupyterlab", "jupytext", "pip"):
        assert need in names, need
    assert "python=3.12" in deps
    assert not names & {"pytorch-cuda", "cudatoolkit"}, "pytorch-channel-only packages"
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert any("notebook" in p and "report" in p for p in pip)
