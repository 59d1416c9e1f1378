"""`repro doctor`: what this machine will run, before a long batch job finds out the hard way.

Reports Python, torch, CUDA and the GPU, whether mamba_ssm's CUDA kernels and causal-conv1d import (and
where each came from: a wheel `make kernels` built for this GPU, or the package index), and
the kernel path each model of a params file actually takes in a tiny forward pass on the params' device.
Exit status 1 when the params ask for CUDA and a model would fall back to a slow reference path (the
path that made an earlier reproduction's Mamba epochs 18x slower), or CUDA is missing; 0 otherwise.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from repro.config import RunParams, load_params, resolve
from repro.kernels import provenance
from repro.profiling import sweep, timing

TINY_VOCAB = 64


def _import(name: str, attr: str | None = None) -> str:
    """'version' when ``name`` (and ``attr`` in it) imports, else 'missing: <why>'."""
    try:
        mod = importlib.import_module(name)
        if attr:
            getattr(mod, attr)
    except Exception as exc:  # noqa: BLE001 - a broken build raises anything from ImportError to OSError
        return f"missing ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    return str(getattr(mod, "__version__", "installed"))


def packages() -> list[tuple[str, str]]:
    """(item, status) for the runtime and the optional kernels."""
    cuda = torch.cuda.is_available()
    rows = [
        ("torch", f"{torch.__version__} (CUDA build {torch.version.cuda or 'none'})"),
        ("CUDA device", torch.cuda.get_device_name(0) if cuda else "none visible"),
    ]
    if cuda:
        major, minor = torch.cuda.get_device_capability(0)
        free, total = torch.cuda.mem_get_info(0)
        rows.append(
            (
                "GPU capability / memory",
                f"sm_{major}{minor} / {free / 2**30:.1f} of {total / 2**30:.1f} GiB free",
            )
        )
    rows += [
        ("mamba_ssm", _import("mamba_ssm")),
        (
            "mamba_ssm selective scan (CUDA)",
            _import("selective_scan_cuda") if cuda else "not checked (no GPU)",
        ),
        ("causal_conv1d (optional)", _import("causal_conv1d")),
        ("mamba_ssm came from", provenance("mamba_ssm")),
        ("causal_conv1d came from", provenance("causal_conv1d")),
        ("triton", _import("triton")),
    ]
    return rows


def kernel_paths(params: RunParams, device: str | None = None) -> list[dict[str, Any]]:
    """The kernel path each neural model of the params takes in one forward pass of a single row of
    ``tokenizer.max_len`` tokens on the device (the length the run trains at)."""
    from repro.models.registry import build_model

    dev = torch.device(device or params.device)
    names = [m for m in dict.fromkeys([*params.models, *params.efficiency.models]) if m not in ("count_lr",)]
    rows = []
    for name in names:
        backbone = "bigbird" if name == "multibird" else name
        row: dict[str, Any] = {"model": name, "device": str(dev)}
        try:
            model = build_model(backbone, TINY_VOCAB, **params.model_sizes.get(backbone, {})).to(dev)
            path = sweep.probe_kernel_path(model, dev, length=params.tokenizer.max_len) or "-"
            row["kernel_path"] = path
            slow = dev.type == "cuda" and timing.is_reference(path)
            row["status"] = "SLOW reference path on CUDA" if slow else "ok"
        except Exception as exc:  # noqa: BLE001 - report every model, then decide
            row["kernel_path"] = "-"
            row["status"] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        rows.append(row)
    return rows


def renderer() -> tuple[str, bool]:
    """(what would render the report, whether anything would): Quarto when on PATH, else the offline
    renderer's pandoc and typst; checked here so a GPU run does not find out after its notebooks."""
    import shutil
    import subprocess

    quarto = shutil.which("quarto")
    if quarto:
        out = subprocess.run([quarto, "--version"], capture_output=True, text=True, check=False).stdout
        return f"quarto {out.strip() or '(version unknown)'} at {quarto}", True
    from repro.report.pandoc import RenderError, _pandoc_path

    try:
        pandoc = _pandoc_path()
    except RenderError as err:
        return f"no quarto on PATH, and {err}", False
    typst = _import("typst", "compile")
    if typst.startswith("missing"):
        return f"no quarto on PATH; pandoc at {pandoc}, typst {typst} (pip install typst)", False
    return f"offline renderer: pandoc at {pandoc}, typst {typst}", True


def main(params_file: str, device: str | None = None) -> int:
    """Print the report; 1 when the params' device cannot run every model on its fast path."""
    params = load_params(resolve(params_file))
    want = device or params.device
    width = 32
    print(f"repro doctor for {params_file} (device: {want})")
    for item, status in packages():
        print(f"  {item:<{width}} {status}")
    how, can_render = renderer()
    print(f"  {'report renderer':<{width}} {how}")
    if want == "cuda" and not torch.cuda.is_available():
        print(f"  {'verdict':<{width}} FAIL: the params ask for cuda and no CUDA device is visible")
        return 1
    from repro.training import mps

    sharing, mps_ok = mps.describe(params.mps, want, params.train.workers, torch.cuda.is_available())
    print(f"  {'training processes':<{width}} {sharing}")
    if not mps_ok:
        print(f"  {'verdict':<{width}} FAIL: mps: required, and MPS cannot run here")
        return 1
    rows = kernel_paths(params, want)
    print(f"  {'kernel paths at':<{width}} {params.tokenizer.max_len} tokens (tokenizer.max_len)")
    for r in rows:
        print(f"  {r['model']:<{width}} {r['kernel_path']}  [{r['status']}]")
    bad = [r["model"] for r in rows if r["status"] != "ok"]
    if bad:
        print(f"  {'verdict':<{width}} FAIL: {', '.join(bad)} would not run on the fast path (see above)")
        return 1
    if not can_render:
        print(
            f"  {'verdict':<{width}} FAIL: nothing here renders the report; install Quarto or pypandoc-binary "
            "and typst, or run with --no-render and render elsewhere (repro render RUN_DIR)"
        )
        return 1
    print(f"  {'verdict':<{width}} ok: every model runs on the path shown")
    return 0
