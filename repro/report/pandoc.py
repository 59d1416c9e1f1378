"""Pandoc as the renderer's engine: finding and calling it, walking its JSON AST, writing files atomically."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from repro.config import atomic_path

FORMATS = ("html", "pdf")


OUTPUT_STEM = "report"


_MIN_PANDOC = (3, 1)


class RenderError(ValueError):
    """The report cannot be rendered as written (bad embed, unknown reference, failed tool)."""


def _inlines(blocks: list[dict]) -> list[dict]:
    """The inlines of a parsed caption (paragraphs joined by a space)."""
    inlines: list[dict] = []
    for b in blocks:
        if b["t"] in ("Para", "Plain"):
            if inlines:
                inlines.append({"t": "Space"})
            inlines.extend(b["c"])
    return inlines


def _plain_text(inlines: list[dict]) -> str:
    parts = []
    for node in _iter_nodes(inlines):
        if node.get("t") == "Str":
            parts.append(node["c"])
        elif node.get("t") in ("Space", "SoftBreak", "LineBreak"):
            parts.append(" ")
        elif node.get("t") == "Code":
            parts.append(node["c"][1])
    return "".join(parts)


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    fmts = tuple(dict.fromkeys([formats] if isinstance(formats, str) else formats))
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {fmts!r}")
    return fmts


def _meta_str(s: str) -> dict:
    return {"t": "MetaString", "c": s}


def _mime_text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _iter_nodes(node: Any) -> Iterable[dict]:
    if isinstance(node, list):
        for item in node:
            yield from _iter_nodes(item)
    elif isinstance(node, dict):
        yield node
        if "c" in node:
            yield from _iter_nodes(node["c"])


def _child_block_lists(block: dict) -> list[list[dict]]:
    t, c = block.get("t"), block.get("c")
    if t in ("Div", "Figure"):
        return [c[-1]]
    if t == "BlockQuote":
        return [c]
    if t in ("BulletList",):
        return list(c)
    if t == "OrderedList":
        return list(c[1])
    return []


def _pandoc_path() -> str:
    try:
        import pypandoc

        path = pypandoc.get_pandoc_path()
    except (ImportError, OSError):
        path = shutil.which("pandoc")
    if not path:
        raise RenderError("the offline renderer needs pandoc (pip install pypandoc-binary)")
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    if m is None or (int(m.group(1)), int(m.group(2))) < _MIN_PANDOC:
        raise RenderError(f"pandoc >= {'.'.join(map(str, _MIN_PANDOC))} needed, found {out.splitlines()[:1]}")
    return path


def _pandoc(pandoc: str, text: str, src: str, dst: str, args: list[str] | None = None) -> str:
    cmd = [pandoc, f"--from={src}", f"--to={dst}", *(args or [])]
    proc = subprocess.run(cmd, check=False, input=text, capture_output=True, text=True, encoding="utf-8")
    if proc.returncode != 0:
        raise RenderError(f"pandoc {src} -> {dst} failed (exit {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _atomic_write_bytes(target: Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
