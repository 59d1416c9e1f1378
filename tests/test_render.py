"""The offline renderer turns report.qmd + executed notebooks into one HTML file and a PDF."""

from __future__ import annotations

import io
import os
import re
import shutil
import stat
import textwrap
from pathlib import Path

import nbformat
import pytest

from repro.report import offline, pandoc, render
from repro.report.pandoc import RenderError
from repro.report.render import render_report

FIXTURES = Path(__file__).parent / "fixtures" / "render"
FIG_CAP = "Demo figure caption."
TBL_CAP = "Demo table caption."
MD_TABLE = "| model | AUROC |\n|:--|--:|\n| EHRMamba | 0.81 |\n| CEHR-BERT | 0.79 |\n"
HTML_TABLE = (
    "<table><thead><tr><th>model</th><th>AUROC</th></tr></thead>"
    "<tbody><tr><td>EHRMamba</td><td>0.81</td></tr></tbody></table>"
)


def _png() -> str:
    """A real (tiny) matplotlib PNG, base64 as papermill stores it."""
    import base64

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(2, 1.5), dpi=40)
    ax.plot([0, 1, 2], [0, 1, 0])
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _write_notebook(path: Path, png: str, table_html_only: bool = False) -> None:
    fig = nbformat.v4.new_code_cell(f'#| label: fig-demo\n#| fig-cap: "{FIG_CAP}"\nplot_demo()')
    fig.outputs = [
        nbformat.v4.new_output("display_data", data={"image/png": png, "text/plain": "<Figure>"}),
    ]
    tbl = nbformat.v4.new_code_cell(f"#| label: tbl-demo\n#| tbl-cap: {TBL_CAP}\nshow_table()")
    data = {"text/html": HTML_TABLE, "text/plain": "model AUROC"}
    if not table_html_only:
        data["text/markdown"] = MD_TABLE
    tbl.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="computing...\n"),
        nbformat.v4.new_output("display_data", data=data),
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Demo"), fig, tbl])
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


@pytest.fixture(scope="module")
def png() -> str:
    return _png()


@pytest.fixture()
def run_dir(tmp_path: Path, png: str) -> Path:
    shutil.copy(FIXTURES / "report.qmd", tmp_path / "report.qmd")
    _write_notebook(tmp_path / "notebooks" / "demo.ipynb", png)
    return tmp_path


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory, png: str) -> dict[str, Path]:
    run = tmp_path_factory.mktemp("run")
    shutil.copy(FIXTURES / "report.qmd", run / "report.qmd")
    _write_notebook(run / "notebooks" / "demo.ipynb", png)
    return render_report(run / "report.qmd", run, engine="offline")


def test_html_is_one_self_contained_file(rendered: dict[str, Path]) -> None:
    html_path = rendered["html"]
    assert html_path == html_path.parent / "report.html"
    html = html_path.read_text(encoding="utf-8")
    srcs = re.findall(r'\ssrc="([^"]*)"', html)
    assert srcs and all(s.startswith("data:") for s in srcs), srcs
    assert not re.search(r'<link[^>]+href="(?!data:)', html)
    # no asset or temp files left next to the outputs
    assert sorted(p.name for p in html_path.parent.iterdir() if p.name.startswith(".")) == []


def test_html_numbers_and_references(rendered: dict[str, Path]) -> None:
    html = rendered["html"].read_text(encoding="utf-8").replace("\u00a0", " ").replace("&nbsp;", " ")
    text = re.sub(r"<[^>]+>", "", html)
    assert f"Figure 1: {FIG_CAP}" in text
    assert f"Table 1: {TBL_CAP}" in text
    assert "??" not in text and "@fig-demo)" not in text and "@tbl-" not in text
    assert '<a href="#fig-demo">Figure 1</a>' in html
    assert '<a href="#tbl-demo">Table 1</a>' in html  # [@tbl-demo] and @Tbl-demo
    assert '<a href="#fig-demo">1</a>' in html  # -@fig-demo
    assert '<a href="#sec-results">Section 2</a>' in html and '<a href="#sec-intro">Section 1</a>' in html
    # our section numbers agree with pandoc's --number-sections
    assert re.search(r'id="sec-results"[^>]*>\s*<span class="header-section-number">2</span>', html)
    assert "someone@fig-demo.org" in text and "@fig-in-code" in text and "fig-not-embedded" in text
    assert "Render fixture" in text and "A. Tester" in text and "A tiny report" in text
    assert 'id="TOC"' in html
    assert "EHRMamba" in text and "0.81" in text


def test_pdf_written(rendered: dict[str, Path]) -> None:
    pdf = rendered["pdf"]
    assert pdf == pdf.parent / "report.pdf"
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF")
    assert b"/Title(Results)" in data or b"Results" in data  # heading bookmarks are plain strings
    try:
        from pypdf import PdfReader
    except ImportError:
        return  # pypdf is not a dependency; the caption check needs it
    text = " ".join(page.extract_text() for page in PdfReader(pdf).pages)
    assert FIG_CAP in text and TBL_CAP in text and "??" not in text


def test_table_falls_back_to_html(run_dir: Path, png: str) -> None:
    _write_notebook(run_dir / "notebooks" / "demo.ipynb", png, table_html_only=True)
    out = render_report(run_dir / "report.qmd", run_dir / "out", formats=("html",), engine="offline")
    assert set(out) == {"html"}
    text = re.sub(r"<[^>]+>", "", out["html"].read_text(encoding="utf-8")).replace("\u00a0", " ")
    assert f"Table 1: {TBL_CAP}" in text and "EHRMamba" in text and "model AUROC" not in text


def test_missing_label_names_line_notebook_and_label(run_dir: Path) -> None:
    qmd = run_dir / "report.qmd"
    qmd.write_text("# A\n\ntext\n\n{{< embed notebooks/demo.ipynb#fig-nope >}}\n", encoding="utf-8")
    with pytest.raises(RenderError, match=r"report\.qmd:5: .*notebooks/demo\.ipynb.*'fig-nope'.*fig-demo"):
        render_report(qmd, run_dir, formats=("html",), engine="offline")
    assert not (run_dir / "report.html").exists()


def test_missing_notebook_is_an_error(run_dir: Path) -> None:
    qmd = run_dir / "report.qmd"
    qmd.write_text("{{< embed notebooks/absent.ipynb#tbl-demo >}}\n", encoding="utf-8")
    with pytest.raises(RenderError, match=r"report\.qmd:1: .*absent\.ipynb not found"):
        render_report(qmd, run_dir, formats=("html",), engine="offline")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "# A {#sec-a}\n\nSee @sec-a and\n@fig-unknown.\n",
            r"report\.qmd:4: unknown cross-reference @fig-unknown",
        ),
        ("# A\n\nAs @smith2020 showed.\n", r"report\.qmd:3: @smith2020 is neither"),
    ],
)
def test_unknown_reference_is_an_error(run_dir: Path, body: str, message: str) -> None:
    qmd = run_dir / "report.qmd"
    qmd.write_text(body, encoding="utf-8")
    with pytest.raises(RenderError, match=message):
        render_report(qmd, run_dir, formats=("html",), engine="offline")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="formats"):
        render_report(FIXTURES / "report.qmd", Path("."), formats=("docx",))
    with pytest.raises(ValueError, match="engine"):
        render_report(FIXTURES / "report.qmd", Path("."), engine="latex")


def test_auto_without_quarto_is_offline(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    out = render_report(run_dir / "report.qmd", run_dir, formats=["html"])
    assert out["html"].read_text(encoding="utf-8").count("Figure\u00a01") >= 2


def test_quarto_branch_moves_outputs(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in `quarto` checks the command line and writes what Quarto would, next to the qmd."""
    bindir = run_dir / "bin"
    bindir.mkdir()
    fake = bindir / "quarto"
    fake.write_text(
        textwrap.dedent(
            """\
            #!/bin/sh
            [ "$1" = render ] && [ "$2" = report.qmd ] && [ "$3" = --to ] && [ -f report.qmd ] || exit 3
            case "$4" in html) echo '<html>q</html>' > report.html ;; typst) echo '%PDF-q' > report.pdf ;;
            *) exit 5 ;; esac
            """
        )
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    out = render_report(run_dir / "report.qmd", run_dir / "out")
    assert out == {"html": run_dir / "out" / "report.html", "pdf": run_dir / "out" / "report.pdf"}
    assert out["pdf"].read_bytes().startswith(b"%PDF")
    assert not (run_dir / "report.html").exists()
    # rendering in place (out_dir is the qmd's directory) leaves the file where Quarto put it
    assert render_report(run_dir / "report.qmd", run_dir, formats=("html",))["html"].is_file()


def test_uncaptioned_figure_is_an_error(run_dir: Path, png: str) -> None:
    nb = nbformat.read(run_dir / "notebooks" / "demo.ipynb", as_version=4)
    nb.cells[1].source = "#| label: fig-demo\nplot_demo()"
    nbformat.write(nb, run_dir / "notebooks" / "demo.ipynb")
    with pytest.raises(RenderError, match=r"report\.qmd:26: .*fig-demo.*fig-cap"):
        render_report(run_dir / "report.qmd", run_dir, formats=("html",), engine="offline")


def test_pdf_tables_leave_column_widths_to_typst() -> None:
    """A long pipe table gets widths from its ``---`` rules in pandoc, which squeezed a short ``verdict``
    column beside a long ``evidence`` one until its words overlapped the next column in the PDF."""
    import json

    exe = pandoc._pandoc_path()
    md = (
        "| id | verdict | evidence |\n|:--|:--|:--|\n"
        + f"| H4 (memory) | inconclusive | {'long prose ' * 20}|\n"
    )
    ast = json.loads(pandoc._pandoc(exe, md, "markdown", "json"))
    assert "%" in pandoc._pandoc(exe, json.dumps(ast), "json", "typst")  # pandoc's own relative widths
    ast["blocks"] = offline._typst_tables(ast["blocks"])
    typ = pandoc._pandoc(exe, json.dumps(ast), "json", "typst")
    assert "columns: 3," in typ and "%" not in typ


def test_show_table_marks_missing_values_in_every_view(monkeypatch):
    import numpy as np
    import pandas as pd
    from IPython import display as ipd

    from repro.evaluation import figures

    shown = {}
    monkeypatch.setattr(ipd, "display", lambda out, raw: shown.update(out))
    figures.show_table(pd.DataFrame({"AUROC": [0.81234, np.nan], "CI": ["[0.7, 0.9]", "nan"], "n": [3, 4]}))
    for view in ("text/markdown", "text/html", "text/plain"):
        assert "nan" not in shown[view].lower() and "None" not in shown[view]
        assert shown[view].count(figures.MISSING) == 2
    assert "0.812" in shown["text/markdown"] and "<td>0.812</td>" in shown["text/html"]
    # counts stored as floats beside a missing value, and infinite degrees of freedom
    figures.show_table(pd.DataFrame({"positives": [17.0, np.nan], "df": [1055.0, np.inf], "p": [1.0, 0.5]}))
    for view in ("text/markdown", "text/html", "text/plain"):
        assert "17.0" not in shown[view] and "1055.0" not in shown[view] and "inf" not in shown[view]
        assert "17" in shown[view] and "∞" in shown[view]
    assert "1.000" in shown["text/markdown"]  # a p-value that happens to be whole keeps its format
    # text that reads as a number stays as written (comparison_table's df), "inf" text too; a permutation p
    # that would round to 0 prints as a bound
    figures.show_table(pd.DataFrame({"df": ["8.5", "inf"], "p (perm.)": [0.0004, 0.25]}))
    md = shown["text/markdown"]
    assert "8.5 " in md and "8.500" not in md and "∞" in md and "<0.001" in md and "0.250" in md
    assert "0.000" not in md
    twins = pd.DataFrame([[1.5, 2.0], [np.nan, 3.0]], columns=["x", "x"])  # duplicate names still render
    figures.show_table(twins)
    assert "| 1.5 |" in shown["text/markdown"] and figures.MISSING in shown["text/markdown"]
    # a column of tenths (seconds rounded to 0.1) keeps one decimal; any finer value gives all three
    figures.show_table(pd.DataFrame({"seconds": [24.9, 1.2], "AUROC": [0.5, 0.8125]}))
    md = shown["text/markdown"]
    assert "24.9 " in md and "24.900" not in md and "0.500" in md and "0.812" in md
    figures.show_table(pd.DataFrame({"AUROC": [0.5, 0.5]}))  # chance everywhere: still a metric's format
    assert "0.500" in shown["text/markdown"]


def test_embedded_cells_output_only_their_table_or_figure():
    """Quarto embeds a labelled cell's whole output: a print there would sit above the table."""
    for nb in sorted((Path(__file__).parents[1] / "notebooks").glob("*.py")):
        for cell in nb.read_text().split("# %%"):
            label = re.search(r"^#\| label: (\S+)$", cell, re.M)
            if label:
                assert "print(" not in cell, f"{nb.name}: cell {label.group(1)} prints"


def test_quarto_config_breaks_long_tables_and_links_no_notebook_previews():
    import yaml

    root = Path(__file__).parents[1]
    cfg = yaml.safe_load((root / "_quarto.yml").read_text())
    typst, html = cfg["format"]["typst"], cfg["format"]["html"]
    assert html["notebook-links"] is False and typst["notebook-links"] is False
    assert typst["papersize"] == "a4"
    header = (root / typst["include-in-header"]).read_text()
    assert "#show figure: set block(breakable: true)" in header
    from repro.report.pipeline import REPORT_FILES

    assert typst["include-in-header"] in REPORT_FILES  # copied into every run, so `repro render` finds it


def test_every_cell_option_block_is_valid_yaml():
    """Quarto and the offline renderer read a cell's ``#|`` lines as YAML: a caption with a bare double
    quote inside its double-quoted string stops the render after every notebook has run."""
    import yaml

    for nb in sorted((Path(__file__).parents[1] / "notebooks").glob("*.py")):
        for cell in nb.read_text().split("# %%"):
            options = "\n".join(line[3:] for line in cell.splitlines() if line.startswith("#| "))
            if options:
                try:
                    parsed = yaml.safe_load(options)
                except yaml.YAMLError as err:
                    raise AssertionError(f"{nb.name}: cell options are not YAML:\n{options}\n{err}") from err
                assert isinstance(parsed, dict), f"{nb.name}: {options}"
