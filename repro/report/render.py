"""Render ``report.qmd`` to ``report.html`` and ``report.pdf``: with Quarto where it is installed, else with
the offline renderer (`repro.report.offline`), so the same ``report.qmd`` works on both paths."""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path

import yaml

from repro.report.offline import render_offline
from repro.report.pandoc import FORMATS, OUTPUT_STEM, RenderError, _atomic_write_bytes, _check_formats

__all__ = ["RenderError", "render_offline", "render_quarto", "render_report"]


log = logging.getLogger(__name__)


ENGINES = ("auto", "offline", "quarto")


_QUARTO_TO = {"html": "html", "pdf": "typst"}  # Quarto's typst format produces the PDF


def render_report(
    qmd: Path, out_dir: Path, formats: Iterable[str] = FORMATS, engine: str = "auto"
) -> dict[str, Path]:
    """Render ``qmd`` to ``out_dir/report.{html,pdf}``; return ``{format: path}`` of what was written.

    ``engine="auto"`` uses Quarto when ``quarto`` is on PATH, else the offline renderer; ``"quarto"`` and
    ``"offline"`` force one.
    """
    qmd, out_dir = Path(qmd), Path(out_dir)
    fmts = _check_formats(formats)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not qmd.is_file():
        raise RenderError(f"report source not found: {qmd}")
    if engine == "auto":
        engine = "quarto" if shutil.which("quarto") else "offline"
    log.info("rendering %s with the %s renderer to %s", qmd, engine, ", ".join(fmts))
    if engine == "quarto":
        return render_quarto(qmd, out_dir, fmts)
    return render_offline(qmd, out_dir, fmts)


def render_quarto(qmd: Path, out_dir: Path, formats: Iterable[str] = FORMATS) -> dict[str, Path]:
    """Run ``quarto render`` in the qmd's directory (so its ``_quarto.yml`` applies) and move the outputs.

    Quarto writes next to the qmd, or into ``project: output-dir`` when ``_quarto.yml`` sets one; the fresh
    file found there is moved to ``out_dir/report.{html,pdf}``.
    """
    qmd, out_dir = Path(qmd).resolve(), Path(out_dir).resolve()
    fmts = _check_formats(formats)
    exe = shutil.which("quarto")
    if exe is None:
        raise RenderError("engine 'quarto' asked for but `quarto` is not on PATH")
    out_dir.mkdir(parents=True, exist_ok=True)
    places = [qmd.parent]
    project_dir = _quarto_output_dir(qmd.parent)
    if project_dir is not None:
        places.insert(0, project_dir)
    written: dict[str, Path] = {}
    for fmt in fmts:
        to = _QUARTO_TO[fmt]
        suffix = ".html" if fmt == "html" else ".pdf"
        started = time.time() - 1.0  # file-system timestamps can be coarse
        cmd = [exe, "render", qmd.name, "--to", to]
        proc = subprocess.run(cmd, check=False, cwd=qmd.parent, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout)[-4000:]
            raise RenderError(f"`{' '.join(cmd)}` failed in {qmd.parent} (exit {proc.returncode}):\n{tail}")
        fresh = [
            p
            for p in (d / f"{qmd.stem}{suffix}" for d in places)
            if p.is_file() and p.stat().st_mtime >= started
        ]
        if not fresh:
            where = " or ".join(str(d) for d in places)
            raise RenderError(f"`{' '.join(cmd)}` succeeded but wrote no new {qmd.stem}{suffix} in {where}")
        target = out_dir / f"{OUTPUT_STEM}{suffix}"
        if fresh[0] != target:
            _atomic_write_bytes(target, fresh[0].read_bytes())
            fresh[0].unlink()
        written[fmt] = target
    return written


def _quarto_output_dir(project: Path) -> Path | None:
    """``project: output-dir`` of the ``_quarto.yml`` in ``project``, if any."""
    cfg = project / "_quarto.yml"
    if not cfg.is_file():
        return None
    try:
        data = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise RenderError(f"{cfg}: bad YAML: {' '.join(str(err).split())}") from None
    out = (data.get("project") or {}).get("output-dir") if isinstance(data, dict) else None
    return (project / str(out)).resolve() if out else None
