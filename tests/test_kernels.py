"""`python -m repro.kernels`: one architecture patched into setup.py, kept wheels reused, provenance said."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from repro import kernels

# The shape both setup.py files have (mamba-ssm 2.3.2.post1, causal-conv1d 1.7.0): the list starts empty
# inside a branch, gets flags and -gencode pairs under version checks, and is concatenated into nvcc's args.
SETUP = """
SKIP_CUDA_BUILD = False
bare_metal_version = (12, 8)
if not SKIP_CUDA_BUILD:
    cc_flag = []
    cc_flag.append("-DBUILD_PYTHON_PACKAGE")
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_75,code=sm_75")
    if bare_metal_version >= (11, 8):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_100,code=sm_100")
    nvcc = ["-O3", "-lineinfo"] + cc_flag
"""


def test_setup_builds_for_the_one_architecture_asked():
    ns: dict = {}
    exec(kernels.restrict_arch(SETUP, "90"), ns)
    assert ns["nvcc"] == [
        "-O3",
        "-lineinfo",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-DBUILD_PYTHON_PACKAGE",
    ]
    ns = {}
    exec(kernels.restrict_arch(SETUP, "120"), ns)  # an architecture the file does not list is built anyway
    assert [f for f in ns["nvcc"] if "compute" in f] == ["arch=compute_120,code=sm_120"]
    with pytest.raises(ValueError, match="build for every architecture"):
        kernels.restrict_arch("cc_flag = ['-O3']\n", "90")
    with pytest.raises(ValueError, match="architecture"):
        kernels.restrict_arch(SETUP, "sm_90")


def test_a_build_is_kept_and_the_next_node_installs_it(tmp_path, monkeypatch):
    monkeypatch.setenv("REPRO_KERNEL_CACHE", str(tmp_path / "cache"))
    calls: list[tuple[str, ...]] = []
    seen: dict = {}

    def fake_sdist(kernel, work, sdist_dir):
        src = work / "src" / f"{kernel.module}-{kernel.version}"
        src.mkdir(parents=True)
        (src / "setup.py").write_text(SETUP)
        return src

    def fake_pip(*args, env=None, log=None):
        calls.append(args)
        if args[0] == "wheel":
            src = Path(args[-1])
            seen["setup"] = (src / "setup.py").read_text()
            seen["env"] = env
            out = Path(args[args.index("-w") + 1])
            out.mkdir(parents=True)
            (out / "mamba_ssm-2.3.2.post1-cp312-cp312-linux_x86_64.whl").write_bytes(b"wheel")
            log.write_text("compiled\n")

    monkeypatch.setattr(kernels, "_sdist", fake_sdist)
    monkeypatch.setattr(kernels, "_pip", fake_pip)
    line = kernels.build("mamba-ssm", sm="90")
    assert "built for sm_90" in line
    assert kernels.MARK in seen["setup"] and seen["env"]["MAMBA_FORCE_BUILD"] == "TRUE"
    keep = next((tmp_path / "cache").iterdir())
    assert keep.name.endswith("-sm90") and json.loads((keep / "build.json").read_text())["arch"] == "sm_90"
    assert calls[-1][0] == "install" and calls[-1][-1].endswith(".whl")
    calls.clear()
    line = kernels.build("mamba-ssm", sm="90")  # the next node: no build
    assert "installed the kept wheel for sm_90" in line and [c[0] for c in calls] == ["install"]
    assert not list((tmp_path / "cache").glob("*.tmp*"))  # nothing half-written left behind


def test_provenance_names_a_kept_wheel_and_admits_what_pip_does_not_record(tmp_path, monkeypatch):
    assert kernels.provenance("surely_not_installed_module") == "not installed"
    keep = tmp_path / "mamba-ssm-x-sm90"
    keep.mkdir()
    (keep / "build.json").write_text(json.dumps({"arch": "sm_90", "seconds": 163, "date": "2026-12-04"}))

    class Dist:
        version = "2.3.2.post1"

        def __init__(self, url):
            self.url = url

        def read_text(self, name):
            return json.dumps({"url": self.url}) if self.url else None

    monkeypatch.setattr(kernels.metadata, "distribution", lambda name: Dist(f"file://{keep}/m.whl"))
    assert "kept wheel built for sm_90 in 163 s" in kernels.provenance("mamba_ssm")
    monkeypatch.setattr(kernels.metadata, "distribution", lambda name: Dist(None))
    assert "pip records neither" in kernels.provenance("mamba_ssm")


def test_the_kept_wheel_key_names_everything_its_binary_depends_on():
    import torch

    k = kernels.key(kernels.KERNELS["causal-conv1d"], "90")
    assert k.endswith("-sm90") and f"cu{torch.version.cuda}" in k and "abi" in k and "+" not in k
    assert kernels.arch_list("90") == "9.0" and kernels.arch_list("100a") == "10.0a"
