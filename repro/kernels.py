"""Build mamba-ssm and causal-conv1d for this node's GPU only, keep the wheels, and say where each came from.

Why our own: pip installs both from source distributions whose setup.py first guesses a prebuilt wheel on
the project's GitHub releases (named by package version, CUDA major, torch major.minor, C++ ABI and Python)
and, when none matches or the node cannot reach GitHub, compiles for every architecture in its list
(sm_75 ... sm_121): 133-177 s for mamba-ssm and 406 s for causal-conv1d built for sm_90 alone on an H200,
several times that for all of them. Nothing in pip builds for one architecture or keeps the result for the
next node, so `python -m repro.kernels build` (`make kernels`) does both:

- the GPU's compute capability (torch.cuda.get_device_capability) names the one architecture built:
  setup.py's ``cc_flag = []`` becomes a list that keeps only that ``-gencode`` (``restrict_arch``);
- the wheel goes to ``$REPRO_KERNEL_CACHE`` (default ``~/.cache/repro/kernels``) under a key of package,
  version, torch, CUDA, Python and architecture, with ``build.json`` (seconds, nvcc, date) beside it; a
  node with the same key installs it in seconds;
- ``provenance`` tells ``repro doctor`` whether an installed kernel is such a kept wheel (and for which
  architecture) or came from the package index (a prebuilt release wheel or a build for every
  architecture: pip records neither).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path


@dataclass(frozen=True)
class Kernel:
    """A CUDA kernel package built from its source distribution."""

    dist: str  # the name pip knows
    module: str  # what imports
    version: str  # the version measured with this project
    env: str  # prefix of its setup.py switches: <env>_FORCE_BUILD, <env>_SKIP_CUDA_BUILD


KERNELS = {
    "mamba-ssm": Kernel("mamba-ssm", "mamba_ssm", "2.3.2.post1", "MAMBA"),
    "causal-conv1d": Kernel("causal-conv1d", "causal_conv1d", "1.7.0", "CAUSAL_CONV1D"),
}
MARK = "# repro.kernels: one architecture"


def cache_root() -> Path:
    """Where kept wheels live (``$REPRO_KERNEL_CACHE``, else ``~/.cache/repro/kernels``)."""
    return Path(os.environ.get("REPRO_KERNEL_CACHE") or Path.home() / ".cache" / "repro" / "kernels")


def restrict_arch(setup_py: str, sm: str) -> str:
    """``setup_py`` with its ``cc_flag`` list building for ``sm`` (e.g. "90") only.

    The list keeps every other flag; each ``-gencode`` pair appended to it is dropped and the one for
    ``sm`` is there from the start, so the patch holds however the file chooses its architectures.

    >>> src = 'cc_flag = []\\ncc_flag.append("-gencode")\\ncc_flag.append("arch=compute_80,code=sm_80")\\n'
    >>> src += 'cc_flag.append("-DX")\\n'
    >>> ns = {}
    >>> exec(restrict_arch(src, "90"), ns)
    >>> ns["cc_flag"]
    ['-gencode', 'arch=compute_90,code=sm_90', '-DX']
    """
    if not re.fullmatch(r"\d{2,3}[a-z]?", sm):
        raise ValueError(f"architecture must look like 90 or 100a, got {sm!r}")
    lines = setup_py.splitlines(keepends=True)
    hits = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*cc_flag\s*=\s*\[\]\s*", line)]
    if len(hits) != 1:
        raise ValueError(
            f"setup.py has {len(hits)} lines 'cc_flag = []' (want 1): build for every architecture"
        )
    i = hits[0]
    indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
    cls = (
        f"{indent}{MARK}\n"
        f"{indent}class _OneArch(list):\n"
        f"{indent}    def append(self, flag):\n"
        f"{indent}        if flag == '-gencode' or str(flag).startswith('arch=compute_'):\n"
        f"{indent}            return\n"
        f"{indent}        super().append(flag)\n"
        f"{indent}cc_flag = _OneArch(['-gencode', 'arch=compute_{sm},code=sm_{sm}'])\n"
    )
    lines[i] = cls
    return "".join(lines)


def arch_list(sm: str) -> str:
    """nvcc's "90" / "100a" as TORCH_CUDA_ARCH_LIST writes it.

    >>> arch_list("90"), arch_list("100a")
    ('9.0', '10.0a')
    """
    m = re.fullmatch(r"(\d+)(\d)([a-z]?)", sm)
    if not m:
        raise ValueError(f"architecture must look like 90 or 100a, got {sm!r}")
    return f"{m[1]}.{m[2]}{m[3]}"


def gpu_arch() -> str:
    """This node's GPU compute capability as nvcc names it ("90" on an H100 / H200)."""
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device visible: build the kernels on the GPU node that will run them")
    major, minor = torch.cuda.get_device_capability(0)
    return f"{major}{minor}"


def key(kernel: Kernel, sm: str) -> str:
    """The kept wheel's folder name: everything its binary depends on."""
    import torch

    py = f"cp{sys.version_info.major}{sys.version_info.minor}"
    abi = "abi1" if torch._C._GLIBCXX_USE_CXX11_ABI else "abi0"
    cuda = f"cu{torch.version.cuda}"
    return f"{kernel.dist}-{kernel.version}-torch{torch.__version__}-{cuda}-{abi}-{py}-sm{sm}".replace(
        "+", "_"
    )


def _pip(*args: str, env: dict[str, str] | None = None, log: Path | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args]
    if log is None:
        subprocess.run(cmd, check=True, env=env)
        return
    with open(log, "w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode:
        tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
        raise RuntimeError(f"{' '.join(cmd[2:5])} ... failed (log: {log}):\n{tail}")


def _sdist(kernel: Kernel, work: Path, sdist_dir: Path | None) -> Path:
    """The package's source tree under ``work``: from ``sdist_dir`` when it holds the tarball (offline
    nodes), else downloaded from the index without building."""
    stem = kernel.dist.replace("-", "_")
    found = sorted((sdist_dir or work).glob(f"{stem}-{kernel.version}.tar.gz"))
    if not found:
        env = os.environ | {f"{kernel.env}_SKIP_CUDA_BUILD": "TRUE"}
        _pip(
            "download", "-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation",
            "-d", str(work), f"{kernel.dist}=={kernel.version}", env=env,
        )  # fmt: skip
        found = sorted(work.glob(f"{stem}-{kernel.version}.tar.gz"))
    if not found:
        raise RuntimeError(f"no source distribution {stem}-{kernel.version}.tar.gz found or downloaded")
    with tarfile.open(found[0]) as tar:
        tar.extractall(work / "src", filter="data")
    return next((work / "src").iterdir())


def _nvcc() -> str:
    try:
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "not found"
    return out.strip().splitlines()[-1]


def build(name: str, sm: str | None = None, sdist_dir: Path | None = None, jobs: int | None = None) -> str:
    """Install ``name`` built for this GPU's architecture: the kept wheel when there is one, else built
    now and kept. Returns one line saying which, with the build's time."""
    kernel = KERNELS[name]
    sm = sm or gpu_arch()
    keep = cache_root() / key(kernel, sm)
    wheels = sorted(keep.glob("*.whl"))
    if wheels:
        info = json.loads((keep / "build.json").read_text()) if (keep / "build.json").exists() else {}
        _pip("install", "-q", "--no-deps", "--force-reinstall", str(wheels[0]))
        return f"{name} {kernel.version}: installed the kept wheel for sm_{sm} ({info.get('seconds', '?')} s to build) {wheels[0]}"
    with tempfile.TemporaryDirectory(prefix=f"build-{kernel.module}-") as tmp:
        work = Path(tmp)
        src = _sdist(kernel, work, sdist_dir)
        setup = src / "setup.py"
        setup.write_text(restrict_arch(setup.read_text(), sm))
        env = os.environ | {
            f"{kernel.env}_FORCE_BUILD": "TRUE",
            "MAX_JOBS": str(jobs or os.cpu_count() or 1),
            "NVCC_THREADS": "1",
            "TORCH_CUDA_ARCH_LIST": arch_list(sm),
        }
        t0 = time.perf_counter()
        log = work / "build.log"
        _pip(
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(work / "wheel"),
            str(src),
            env=env,
            log=log,
        )
        seconds = round(time.perf_counter() - t0)
        built = next((work / "wheel").glob("*.whl"))
        staging = keep.with_name(keep.name + f".tmp{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        shutil.copy2(built, staging / built.name)
        shutil.copy2(log, staging / "build.log")
        info = {"arch": f"sm_{sm}", "seconds": seconds, "nvcc": _nvcc(), "date": dt.date.today().isoformat()}
        (staging / "build.json").write_text(json.dumps(info, indent=2))
        shutil.rmtree(keep, ignore_errors=True)
        os.replace(staging, keep)  # a kept wheel is whole or absent
    _pip("install", "-q", "--no-deps", "--force-reinstall", str(keep / built.name))
    return f"{name} {kernel.version}: built for sm_{sm} in {seconds} s, kept in {keep}"


def provenance(module: str) -> str:
    """Where the installed ``module`` came from, in words (for ``repro doctor``)."""
    dist = next((k.dist for k in KERNELS.values() if k.module == module), module)
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return "not installed"
    url = json.loads(d.read_text("direct_url.json") or "{}").get("url", "")
    if url.startswith("file://"):
        path = Path(url.removeprefix("file://"))
        info = path.parent / "build.json"
        if info.exists():
            b = json.loads(info.read_text())
            return f"{d.version}: kept wheel built for {b['arch']} in {b['seconds']} s ({b['date']}), {path.parent}"
        return f"{d.version}: installed from {path}"
    return (
        f"{d.version}: from the package index (a prebuilt release wheel, or a build for every architecture "
        "in its setup.py: pip records neither; `make kernels` builds for this GPU and keeps the wheel)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m repro.kernels", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or install the kept wheel of) each kernel for this GPU")
    b.add_argument(
        "packages", nargs="*", default=list(KERNELS), help=f"among {', '.join(KERNELS)} (default: both)"
    )
    b.add_argument("--arch", help="compute capability as nvcc names it, e.g. 90 (default: this GPU's)")
    b.add_argument("--sdist-dir", type=Path, help="folder holding the source tarballs (offline nodes)")
    b.add_argument("--jobs", type=int, help="parallel compile jobs (default: every core)")
    sub.add_parser("where", help="where each installed kernel came from")
    args = p.parse_args(argv)
    if args.command == "where":
        for k in KERNELS.values():
            print(f"{k.module}: {provenance(k.module)}")
        return 0
    bad = [n for n in args.packages if n not in KERNELS]
    if bad:
        p.error(f"unknown packages {bad}; known: {list(KERNELS)}")
    try:
        for name in args.packages:
            print(build(name, args.arch, args.sdist_dir, args.jobs), flush=True)
    except (RuntimeError, ValueError) as exc:
        print(f"python -m repro.kernels: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
