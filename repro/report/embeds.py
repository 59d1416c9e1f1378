"""Quarto's ``{{< embed notebook.ipynb#label >}}`` for the offline renderer: find the labelled cell of an
executed notebook and turn its outputs into pandoc blocks (a numbered figure or table with its caption)."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from repro.report.pandoc import RenderError, _inlines, _iter_nodes, _mime_text, _pandoc, _plain_text

_EMBED_RE = re.compile(r"\{\{<\s*embed\s+(?P<target>[^\s>]+)(?P<opts>[^>]*?)\s*>\}\}")


_FENCE_RE = re.compile(r"^\s{0,3}(`{3,}|~{3,})")


_PLACEHOLDER = "REPROEMBEDPLACEHOLDER{}"


_PLACEHOLDER_RE = re.compile(r"^REPROEMBEDPLACEHOLDER(\d+)$")


_IMAGE_MIMES = (("image/png", ".png"), ("image/svg+xml", ".svg"), ("image/jpeg", ".jpg"))


def parse_cell_options(source: str) -> dict[str, Any]:
    """Read the Quarto ``#|`` options at the top of a code cell (YAML), e.g. ``label`` and ``fig-cap``.

    >>> parse_cell_options('#| label: fig-a\\n#| fig-cap: "Token lengths."\\nplot()')
    {'label': 'fig-a', 'fig-cap': 'Token lengths.'}
    >>> parse_cell_options("x = 1")
    {}
    >>> parse_cell_options('#| label: [fig-a')
    Traceback (most recent call last):
    ...
    repro.report.pandoc.RenderError: bad `#|` cell options: ...
    """
    lines = []
    for line in source.splitlines():
        if not line.startswith("#|"):
            break
        lines.append(line[3:] if line.startswith("#| ") else line[2:])
    if not lines:
        return {}
    try:
        opts = yaml.safe_load("\n".join(lines))
    except yaml.YAMLError as err:
        raise RenderError(f"bad `#|` cell options: {' '.join(str(err).split())}") from None
    if not isinstance(opts, dict):
        raise RenderError(f"bad `#|` cell options: expected `key: value` lines, got {lines!r}")
    return opts


@dataclass
class _Embed:
    """One embed shortcode: where it is and the pandoc blocks that replace it."""

    line: int  # 1-based line in the qmd
    notebook: str  # as written in the shortcode
    label: str
    blocks: list[dict] = field(default_factory=list)


def _extract_embeds(body: str, offset: int, qmd: Path) -> tuple[str, list[_Embed]]:
    """Replace each embed line by a placeholder paragraph (code fences are left alone)."""
    out: list[str] = []
    embeds: list[_Embed] = []
    fence: str | None = None
    for i, line in enumerate(body.splitlines(keepends=True)):
        lineno = offset + i + 1
        m_fence = _FENCE_RE.match(line)
        if fence is not None:
            if m_fence and m_fence.group(1)[0] == fence[0] and len(m_fence.group(1)) >= len(fence):
                fence = None
            out.append(line)
            continue
        if m_fence:
            fence = m_fence.group(1)
            out.append(line)
            continue
        if "{{{<" in line:  # Quarto's escape for a literal shortcode
            out.append(line.replace("{{{<", "{{<").replace(">}}}", ">}}"))
            continue
        m = _EMBED_RE.search(line)
        if m is None:
            out.append(line)
            continue
        if line.strip() != m.group(0):
            raise RenderError(
                f"{qmd.name}:{lineno}: an embed shortcode must stand alone on its line "
                f"(write {{{{{{< ... >}}}}}} to show one literally): {line.strip()}"
            )
        target = m.group("target")
        nb, sep, label = target.partition("#")
        if not sep or not label:
            raise RenderError(
                f"{qmd.name}:{lineno}: embed {target!r} names no cell; "
                "write {{< embed NOTEBOOK.ipynb#LABEL >}}"
            )
        prefix = label.split("-", 1)[0]
        if prefix not in ("fig", "tbl") or "-" not in label:
            raise RenderError(
                f"{qmd.name}:{lineno}: embed label {label!r} must start with 'fig-' or 'tbl-' (notebook {nb})"
            )
        indent = line[: len(line) - len(line.lstrip())]
        out.append(f"\n{indent}{_PLACEHOLDER.format(len(embeds))}\n\n")
        embeds.append(_Embed(line=lineno, notebook=nb, label=label))
    return "".join(out), embeds


def _resolve_embeds(embeds: list[_Embed], qmd: Path, assets: Path, pandoc: str) -> None:
    """Fill each embed's blocks from its notebook cell.

    Captions and tables are markdown (or HTML) that pandoc must parse; they go to pandoc in one batch per
    input format, each wrapped in a div whose id says where it belongs.
    """
    notebooks: dict[Path, list[dict]] = {}
    sources: dict[str, list[tuple[str, str]]] = {"markdown": [], "html": []}
    images: dict[int, list[str]] = {}
    table_fmt: dict[int, str] = {}
    seen: dict[str, int] = {}
    for k, emb in enumerate(embeds):
        where = _embed_where(emb, qmd)
        if emb.label in seen:
            raise RenderError(f"{where}: label already embedded at line {seen[emb.label]}")
        seen[emb.label] = emb.line
        path = (qmd.parent / emb.notebook).resolve()
        if path not in notebooks:
            if not path.is_file():
                raise RenderError(f"{where}: notebook {emb.notebook} not found (looked at {path})")
            try:
                notebooks[path] = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RenderError(f"{where}: notebook {emb.notebook} is not valid JSON: {err}") from None
        cell, opts = _find_cell(notebooks[path], emb, where)
        kind = emb.label.split("-", 1)[0]
        caption = str(opts.get(f"{kind}-cap") or "").strip()
        if not caption:
            raise RenderError(
                f"{where}: the cell has no `#| {kind}-cap:` (Quarto numbers only captioned ones)"
            )
        sources["markdown"].append((f"cap{k}", caption))
        outputs = cell.get("outputs", [])
        if kind == "fig":
            images[k] = _write_images(outputs, emb.label, k, assets)
            if not images[k]:
                raise RenderError(
                    f"{where}: the cell has no image output (png, svg or jpeg); was it executed?"
                )
            continue
        md = [_mime_text(o["data"]["text/markdown"]) for o in outputs if "text/markdown" in o.get("data", {})]
        html = [_mime_text(o["data"]["text/html"]) for o in outputs if "text/html" in o.get("data", {})]
        if not (md or html):
            raise RenderError(f"{where}: the cell has no text/markdown or text/html output (a table)")
        table_fmt[k] = "markdown" if md else "html"
        sources[table_fmt[k]].append((f"tbl{k}", "\n\n".join(md) if md else "\n".join(html)))

    parsed: dict[str, list[dict]] = {}
    for fmt, items in sources.items():
        parsed.update(_parse_divs(items, fmt, pandoc))
    for k, emb in enumerate(embeds):
        caption = _inlines(parsed.get(f"cap{k}", []))
        if k in images:
            emb.blocks = [_figure(emb.label, images[k], caption)]
            continue
        blocks = parsed.get(f"tbl{k}", [])
        table = next((b for b in _iter_nodes(blocks) if b.get("t") == "Table"), None)
        if table is None:
            raise RenderError(f"{_embed_where(emb, qmd)}: the cell's {table_fmt[k]} output holds no table")
        table["c"][0] = [emb.label, table["c"][0][1], table["c"][0][2]]
        table["c"][1] = [None, [{"t": "Plain", "c": caption}]]
        emb.blocks = blocks


def _embed_where(emb: _Embed, qmd: Path) -> str:
    return f"{qmd.name}:{emb.line}: embed {emb.notebook}#{emb.label}"


def _parse_divs(items: list[tuple[str, str]], fmt: str, pandoc: str) -> dict[str, list[dict]]:
    """Parse several markdown or HTML snippets with one pandoc call; return each one's blocks by key."""
    if not items:
        return {}
    if fmt == "markdown":
        src = "".join(f"\n::: {{#reproembed-{key}}}\n\n{text}\n\n:::\n" for key, text in items)
    else:
        src = "".join(f'<div id="reproembed-{key}">\n{text}\n</div>\n' for key, text in items)
    out = {}
    for b in json.loads(_pandoc(pandoc, src, fmt, "json"))["blocks"]:
        if b["t"] == "Div" and b["c"][0][0].startswith("reproembed-"):
            out[b["c"][0][0][len("reproembed-") :]] = b["c"][1]
    return out


def _find_cell(cells: list[dict], emb: _Embed, where: str) -> tuple[dict, dict]:
    found: list[tuple[dict, dict]] = []
    labels: list[str] = []
    for cell in cells:
        if cell.get("cell_type") != "code":
            continue
        try:
            opts = parse_cell_options(_mime_text(cell.get("source", "")))
        except RenderError as err:
            raise RenderError(f"{where}: {err}") from None
        label = opts.get("label")
        if label is not None:
            labels.append(str(label))
        if label == emb.label:
            found.append((cell, opts))
    if not found:
        known = ", ".join(labels) if labels else "none"
        raise RenderError(
            f"{where}: no cell labelled {emb.label!r} in {emb.notebook} (labels there: {known})"
        )
    if len(found) > 1:
        raise RenderError(f"{where}: {len(found)} cells labelled {emb.label!r} in {emb.notebook}")
    return found[0]


def _write_images(outputs: list[dict], label: str, k: int, assets: Path) -> list[str]:
    """Write each image output of a cell into the asset dir; return their paths relative to it."""
    paths = []
    for output in outputs:
        data = output.get("data", {})
        for mime, ext in _IMAGE_MIMES:
            if mime in data:
                name = f"img/{k:03d}-{label}-{len(paths)}{ext}"
                (assets / "img").mkdir(exist_ok=True)
                payload = _mime_text(data[mime])
                if mime == "image/svg+xml":
                    (assets / name).write_text(payload, encoding="utf-8")
                else:
                    (assets / name).write_bytes(base64.b64decode(payload))
                paths.append(name)
                break
    return paths


def _figure(label: str, images: list[str], caption: list[dict]) -> dict:
    alt = [{"t": "Str", "c": _plain_text(caption)}]
    content = [{"t": "Plain", "c": [{"t": "Image", "c": [["", [], []], alt, [p, ""]]}]} for p in images]
    return {"t": "Figure", "c": [[label, [], []], [None, [{"t": "Plain", "c": caption}]], content]}


def _splice_embeds(blocks: list[dict], embeds: list[_Embed]) -> list[dict]:
    """Replace placeholder paragraphs, at any depth, by the embed's blocks."""

    spliced: set[int] = set()

    def visit(node: Any) -> Any:
        if isinstance(node, list):
            out = []
            for item in node:
                k = _placeholder_index(item)
                if k is not None:
                    out.extend(embeds[k].blocks)
                    spliced.add(k)
                else:
                    out.append(visit(item))
            return out
        if isinstance(node, dict) and "c" in node:
            node["c"] = visit(node["c"])
        return node

    result = visit(blocks)
    for k, e in enumerate(embeds):
        if k not in spliced:  # the placeholder landed where pandoc did not keep it as a paragraph of its own
            raise RenderError(f"line {e.line}: embed {e.notebook}#{e.label} is not in a block of its own")
    return result


def _placeholder_index(item: Any) -> int | None:
    if isinstance(item, dict) and item.get("t") in ("Para", "Plain") and len(item["c"]) == 1:
        inline = item["c"][0]
        if inline.get("t") == "Str":
            m = _PLACEHOLDER_RE.match(inline["c"])
            if m:
                return int(m.group(1))
    return None
