"""The offline renderer: the part of Quarto the report needs, without Quarto.

Quarto renders the report where it is installed. The offline renderer does the part of Quarto the
report needs, so the same ``report.qmd`` works on both paths:

* ``{{< embed notebooks/x.ipynb#fig-id >}}`` / ``#tbl-id`` shortcodes, alone on their line, are replaced by
  the outputs of the executed notebook cell whose ``#| label:`` is the id (PNG/SVG/JPEG for ``fig-*``,
  ``text/markdown`` or else ``text/html`` for ``tbl-*``), captioned from ``#| fig-cap`` / ``#| tbl-cap``;
* figures and tables are numbered in order of appearance ("Figure 1: ...", "Table 1: ..."), headers the way
  pandoc's ``--number-sections`` numbers them;
* ``@fig-id``, ``@tbl-id``, ``@sec-id`` (also ``[@fig-id]``, ``-@fig-id``, ``@Fig-id``) become "Figure N",
  "Table N", "Section N" linked to their anchor; an unknown one is an error, never "??", and so is any
  other ``@key`` (there is no bibliography; write ``\\@`` for a literal at sign);
* HTML is one self-contained file (pandoc ``--embed-resources``), PDF goes through pandoc's typst writer and
  the ``typst`` compiler.

The work happens on pandoc's JSON AST, so references inside code are left alone and numbering follows the
document's real order."""

from __future__ import annotations

import datetime as _dt
import json
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from repro.config import atomic_path
from repro.report.embeds import _extract_embeds, _resolve_embeds, _splice_embeds
from repro.report.pandoc import (
    FORMATS,
    OUTPUT_STEM,
    RenderError,
    _atomic_write_bytes,
    _check_formats,
    _child_block_lists,
    _iter_nodes,
    _meta_str,
    _pandoc,
    _pandoc_path,
)

_REF_KINDS = {"fig": "Figure", "tbl": "Table", "sec": "Section"}


_META_KEYS = ("title", "subtitle", "author", "date", "abstract", "lang")


_CSS = """
body { max-width: 60em; margin: 0 auto; padding: 2em 1.5em; font-family: system-ui, -apple-system,
  "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; line-height: 1.55; color: #1f2328; }
h1, h2, h3, h4 { line-height: 1.25; margin-top: 1.6em; }
header#title-block-header { margin-bottom: 2em; }
.abstract { margin: 1.5em 0; padding: 0.8em 1.2em; background: #f6f8fa; border-left: 4px solid #8c959f; }
.abstract-title { font-weight: 600; }
nav#TOC { margin: 1.5em 0; padding: 0.5em 1.2em; border: 1px solid #d0d7de; border-radius: 6px; }
nav#TOC ul { padding-left: 1.2em; }
.header-section-number { margin-right: 0.5em; color: #57606a; }
figure { margin: 1.5em 0; text-align: center; }
figure img { max-width: 100%; height: auto; }
img { max-width: 100%; height: auto; }
figcaption, caption { font-size: 0.92em; color: #424a53; margin: 0.5em 0; }
table { border-collapse: collapse; margin: 1.5em auto; font-size: 0.88em; display: block; width: fit-content;
  max-width: 100%; overflow-x: auto; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #d0d7de; }
thead th { border-bottom: 2px solid #57606a; }
tbody tr:nth-child(even) { background: #f6f8fa; }
code { font-size: 0.9em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; border-radius: 6px; }
a { color: #0969da; }
"""


# Typst rules put after pandoc's template preamble: our captions already carry "Figure N: ", so typst must
# not number figures again; long tables may break across pages, their captions (on top) kept with their
# first rows (``sticky``, typst >= 0.12: a caption was left alone at a page's foot); tables use a smaller font.
_TYPST_HEADER = """
#set figure(numbering: none)
#show figure: set block(breakable: true)
#show figure.caption.where(position: top): set block(sticky: true)
#show table: set text(size: 9pt)
#show table.cell: set par(justify: false)
#show link: set text(fill: rgb("#1f4e9a"))
"""


def render_offline(qmd: Path, out_dir: Path, formats: Iterable[str] = FORMATS) -> dict[str, Path]:
    """Render without Quarto: embeds and cross-references here, pandoc for HTML/typst, typst for PDF."""
    qmd, out_dir = Path(qmd).resolve(), Path(out_dir)
    fmts = _check_formats(formats)
    pandoc = _pandoc_path()
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".render-") as tmp:
        assets = Path(tmp)
        doc = _build_document(qmd, assets, pandoc)
        if "html" in fmts:
            written["html"] = _write_html(doc, out_dir / f"{OUTPUT_STEM}.html", assets, pandoc)
        if "pdf" in fmts:
            written["pdf"] = _write_pdf(doc, out_dir / f"{OUTPUT_STEM}.pdf", assets, pandoc)
    return written


@dataclass
class _Document:
    """The resolved report as pandoc JSON, plus what the writers need to know."""

    ast: dict
    toc: bool
    number_sections: bool
    toc_depth: int


def _build_document(qmd: Path, assets: Path, pandoc: str) -> _Document:
    text = qmd.read_text(encoding="utf-8")
    front, body, body_offset = _split_front_matter(text, qmd)
    body, embeds = _extract_embeds(body, body_offset, qmd)
    _resolve_embeds(embeds, qmd, assets, pandoc)

    meta = _pandoc_meta(front, qmd)
    source = "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + body
    ast = json.loads(_pandoc(pandoc, source, "markdown", "json"))
    _copy_local_images(ast["blocks"], qmd.parent, assets)
    ast["blocks"] = _splice_embeds(ast["blocks"], embeds)
    targets = _number_targets(ast["blocks"], qmd)
    _replace_refs([ast["blocks"], list(ast["meta"].values())], targets, text, qmd)
    return _Document(
        ast=ast,
        toc=bool(front.get("toc", True)),
        number_sections=bool(front.get("number-sections", True)),
        toc_depth=int(front.get("toc-depth", 3)),
    )


def _split_front_matter(text: str, qmd: Path) -> tuple[dict, str, int]:
    """Return (front matter dict, body, number of lines before the body)."""
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].strip() != "---":
        return {}, text, 0
    for i in range(1, len(lines)):
        if lines[i].strip() in ("---", "..."):
            try:
                front = yaml.safe_load("".join(lines[1:i])) or {}
            except yaml.YAMLError as err:
                raise RenderError(
                    f"{qmd.name}: bad YAML front matter: {' '.join(str(err).split())}"
                ) from None
            if not isinstance(front, dict):
                raise RenderError(f"{qmd.name}: front matter must be a YAML mapping")
            return front, "".join(lines[i + 1 :]), i + 1
    raise RenderError(f"{qmd.name}:1: front matter opened with '---' is never closed")


def _copy_local_images(blocks: list[dict], base: Path, assets: Path) -> None:
    """Images written in the qmd itself: copy into the asset dir so both writers find them."""
    n = 0
    for node in _iter_nodes(blocks):
        if node.get("t") != "Image":
            continue
        target = node["c"][2][0]
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # data:, http:, ...
            continue
        src = (base / target).resolve()
        if not src.is_file():
            raise RenderError(f"image {target!r} not found (looked at {src})")
        name = f"local/{n:03d}-{src.name}"
        (assets / "local").mkdir(exist_ok=True)
        shutil.copyfile(src, assets / name)
        node["c"][2][0] = name
        n += 1


def _number_targets(blocks: list[dict], qmd: Path) -> dict[str, str]:
    """Number headers (as pandoc's --number-sections does), figures and tables; return id -> "Kind N"."""
    targets: dict[str, str] = {}
    counters = {"fig": 0, "tbl": 0}
    section: list[int] = []

    def add(ident: str, text: str) -> None:
        if ident in targets:
            raise RenderError(f"{qmd.name}: the id {ident!r} is defined twice")
        targets[ident] = text

    def visit_blocks(items: list[dict], top: bool) -> None:
        nonlocal section
        for b in items:
            t = b.get("t")
            if t == "Header" and top:
                level, (ident, classes, _), _ = b["c"]
                if "unnumbered" in classes or "-" in classes:
                    if ident.startswith("sec-"):
                        add(ident, "")
                    continue
                section = (section + [0] * level)[:level]
                section[level - 1] += 1
                if ident.startswith("sec-"):
                    add(ident, "Section\u00a0" + ".".join(map(str, section)))
                continue
            if t in ("Figure", "Table"):
                ident = b["c"][0][0]
                kind = ident.split("-", 1)[0]
                if kind == ("fig" if t == "Figure" else "tbl") and "-" in ident:
                    counters[kind] += 1
                    label = f"{_REF_KINDS[kind]}\u00a0{counters[kind]}"
                    add(ident, label)
                    cap = b["c"][1][1]
                    prefix = [{"t": "Str", "c": label + (":" if cap else "")}]
                    if cap and cap[0]["t"] in ("Plain", "Para"):
                        cap[0]["c"] = prefix + [{"t": "Space"}] + cap[0]["c"]
                    else:
                        cap.insert(0, {"t": "Plain", "c": prefix})
            # headers in divs are numbered by pandoc too; those in lists/quotes are not sections
            for child in _child_block_lists(b):
                visit_blocks(child, top and t == "Div")

    visit_blocks(blocks, True)
    return targets


def _replace_refs(blocks: list, targets: dict[str, str], text: str, qmd: Path) -> None:
    """Turn ``@fig-x``-style citations into links carrying the target's number."""

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                if isinstance(item, dict) and item.get("t") == "Cite":
                    repl = _ref_inlines(item, targets, text, qmd)
                    node[i] = {"t": "Span", "c": [["", ["quarto-xref"], []], repl]}
                    continue
                visit(item)
        elif isinstance(node, dict) and "c" in node:
            visit(node["c"])

    visit(blocks)


def _ref_inlines(cite: dict, targets: dict[str, str], text: str, qmd: Path) -> list[dict]:
    citations = cite["c"][0]
    kinds = [_ref_kind(c["citationId"]) for c in citations]
    if not all(kinds):  # without a bibliography, an ordinary citation would print as "?@key"
        bad = next(c["citationId"] for c, k in zip(citations, kinds, strict=True) if not k)
        raise RenderError(
            f"{_where(text, bad, qmd)}: @{bad} is neither a @fig-/@tbl-/@sec- reference nor supported as a "
            "citation (no bibliography); write \\@ for a literal @"
        )
    out: list[dict] = []
    for c in citations:
        ident = c["citationId"]
        key = ident[0].lower() + ident[1:]
        if key not in targets:
            raise RenderError(f"{_where(text, ident, qmd)}: unknown cross-reference @{ident}")
        label = targets[key]
        if not label:
            raise RenderError(f"{_where(text, ident, qmd)}: @{ident} refers to an unnumbered section")
        if c["citationMode"]["t"] == "SuppressAuthor":
            label = label.split("\u00a0", 1)[1]
        if out:
            out += [{"t": "Str", "c": ","}, {"t": "Space"}]
        if c["citationPrefix"]:
            out += c["citationPrefix"] + [{"t": "Space"}]
        out.append({"t": "Link", "c": [["", [], []], [{"t": "Str", "c": label}], ["#" + key, ""]]})
        out += c["citationSuffix"]
    return out


def _ref_kind(ident: str) -> str | None:
    """'fig', 'tbl' or 'sec' for a cross-reference id (``Fig-x`` too), None for anything else."""
    kind, sep, rest = ident.partition("-")
    return kind.lower() if sep and rest and kind.lower() in _REF_KINDS else None


def _where(text: str, ident: str, qmd: Path) -> str:
    m = re.search(r"(?<![\w@])-?@" + re.escape(ident) + r"(?![\w-])", text)
    if m is None:
        return qmd.name
    return f"{qmd.name}:{text.count(chr(10), 0, m.start()) + 1}"


def _write_html(doc: _Document, target: Path, assets: Path, pandoc: str) -> Path:
    css = assets / "report.css"
    css.write_text(_CSS, encoding="utf-8")
    args = ["--standalone", "--embed-resources", f"--css={css}", f"--resource-path={assets}"]
    args += _common_args(doc)
    with atomic_path(target) as tmp:
        _pandoc(pandoc, json.dumps(doc.ast), "json", "html5", args + [f"--output={tmp}"])
    return target


def _write_pdf(doc: _Document, target: Path, assets: Path, pandoc: str) -> Path:
    try:
        import typst
    except ImportError as err:  # pragma: no cover - typst is a declared dependency
        raise RenderError("the offline PDF needs the `typst` package (pip install typst)") from err
    ast = json.loads(json.dumps(doc.ast))  # the typst tweaks must not leak into other formats
    ast["blocks"] = _typst_tables(ast["blocks"])
    ast["meta"]["margin"] = {"t": "MetaMap", "c": {k: _meta_str("2cm") for k in ("x", "y")}}
    ast["meta"]["papersize"] = _meta_str("a4")
    header = assets / "typst-header.typ"
    header.write_text(_TYPST_HEADER, encoding="utf-8")
    typ = assets / "report.typ"
    args = ["--standalone", f"--include-in-header={header}"] + _common_args(doc)
    _pandoc(pandoc, json.dumps(ast), "json", "typst", args + [f"--output={typ}"])
    try:
        pdf = typst.compile(str(typ), root=str(assets), ignore_system_fonts=True)
    except typst.TypstError as err:  # it carries the source location
        raise RenderError(f"typst could not compile the report: {err}") from None
    _atomic_write_bytes(target, pdf)
    return target


def _common_args(doc: _Document) -> list[str]:
    args = []
    if doc.toc:
        args += ["--toc", f"--toc-depth={doc.toc_depth}"]
    if doc.number_sections:
        args.append("--number-sections")
    return args


def _typst_tables(blocks: list[dict]) -> list[dict]:
    """Make tables fit the PDF page: smaller font for wide ones, and long ``snake_case`` or ``a/b`` words
    (column names) may break after ``_`` and ``/``, which typst would otherwise never do.

    Column widths are left to typst (``auto``). Pandoc sizes a long pipe table's columns by the lengths of
    its ``---`` rules, so a short column beside a long prose one (``verdict`` beside ``evidence``) got 5 %
    of the page and its words ran into the next column; typst's auto columns keep short columns whole and
    share the rest among the long ones, as a browser does."""

    def visit(node: Any) -> Any:
        if isinstance(node, list):
            out = []
            for item in node:
                if isinstance(item, dict) and item.get("t") == "Table":
                    for colspec in item["c"][2]:
                        colspec[1] = {"t": "ColWidthDefault"}
                    for inline in _iter_nodes(item["c"][3:]):
                        if inline.get("t") == "Str" and len(inline["c"]) > 8:
                            inline["c"] = re.sub(r"(?<=[_/])(?=.)", "\u200b", inline["c"])
                    ncols = len(item["c"][2])
                    size = "6.5pt" if ncols > 8 else "7.5pt" if ncols > 5 else None
                    if size:
                        out += [_raw_typst(f"#[#show table: set text(size: {size})"), item, _raw_typst("]")]
                        continue
                out.append(visit(item))
            return out
        if isinstance(node, dict) and "c" in node:
            node["c"] = visit(node["c"])
        return node

    return visit(blocks)


def _raw_typst(code: str) -> dict:
    return {"t": "RawBlock", "c": ["typst", code]}


def _pandoc_meta(front: dict, qmd: Path) -> dict:
    """Keep the front-matter keys pandoc's templates use, in the shapes they expect."""
    meta: dict[str, Any] = {}
    for key in _META_KEYS:
        if front.get(key) is None:
            continue
        value = front[key]
        if key == "author":
            value = [_author_name(a) for a in (value if isinstance(value, list) else [value])]
        elif key == "date":
            value = _date(value, qmd)
        meta[key] = value if isinstance(value, list) else str(value)
    return meta


def _author_name(author: Any) -> str:
    if isinstance(author, dict):
        name = author.get("name", author)
        if isinstance(name, dict):
            name = name.get("literal") or " ".join(str(name[k]) for k in ("given", "family") if k in name)
        return str(name)
    return str(author)


def _date(value: Any, qmd: Path) -> str:
    if value in ("today", "now"):
        return _dt.date.today().isoformat()
    if value == "last-modified":
        return _dt.date.fromtimestamp(qmd.stat().st_mtime).isoformat()
    return str(value)
