"""Notebook contract and `repro run`: parameters cells, bad input stops early, the smoke report renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jupytext
import pytest
from conftest import HAND_SPLITS, hand_events, tiny_run_project, write_meds

from repro.cli import main
from repro.report.pipeline import NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_has_literal_parameters_cell(name):
    nb = jupytext.read(ROOT / "notebooks" / f"{name}.py")
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: needs exactly one cell tagged 'parameters'"
    src = cells[0].source
    namespace: dict = {}
    exec(compile(src, name, "exec"), {}, namespace)  # literals only: runs with no imports
    assert set(namespace) == {"params_file", "run_dir", "data_dir", "work_dir"}


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_labelled_cells_have_captions(name):
    nb = jupytext.read(ROOT / "notebooks" / f"{name}.py")
    for cell in nb.cells:
        if "#| label:" in cell.source:
            label = cell.source.split("#| label:")[1].split()[0]
            cap = "#| fig-cap:" if label.startswith("fig-") else "#| tbl-cap:"
            assert cap in cell.source, f"{name}: {label} has no caption"


def test_report_embeds_exist():
    qmd = (ROOT / "report.qmd").read_text()
    for name in NOTEBOOKS:
        nb = jupytext.read(ROOT / "notebooks" / f"{name}.py").cells
        labels = {c.source.split("#| label:")[1].split()[0] for c in nb if "#| label:" in c.source}
        for label in labels:
            assert f"notebooks/{name}.ipynb#{label}" in qmd, f"report.qmd does not embed {name}#{label}"


def test_report_states_the_rules_the_code_applies():
    from repro.evaluation.results import ALL_RULE, OVERALL_RULE
    from repro.evaluation.significance import LABEL_RULE, VERDICT_RULE
    from repro.profiling.scaling import H2_RULE, H4_MEMORY_RULE

    text = " ".join((ROOT / "report.qmd").read_text().split())
    for name, rule in [
        ("VERDICT_RULE", VERDICT_RULE),
        ("OVERALL_RULE", OVERALL_RULE),
        ("ALL_RULE", ALL_RULE),
        ("LABEL_RULE", LABEL_RULE),
        ("H2_RULE", H2_RULE),
        ("H4_MEMORY_RULE", H4_MEMORY_RULE),
    ]:
        assert " ".join(rule.split()) in text, f"report.qmd does not state {name} as the code has it"


@pytest.fixture
def outputs_guard():
    """Protect an existing outputs/ run dir used by the error-path tests."""
    run = ROOT / "outputs" / "pytest-existing"
    run.mkdir(parents=True, exist_ok=True)
    (run / "marker.txt").write_text("keep me")
    yield run
    shutil.rmtree(run, ignore_errors=True)
    shutil.rmtree(ROOT / "outputs" / "pytest-existing.failed", ignore_errors=True)


def _bad_meds(tmp_path, kind):
    root = tmp_path / kind
    splits = {1: "tuning", 2: "tuning", 3: "held_out"} if kind == "nosplit" else HAND_SPLITS
    write_meds(root, hand_events(), splits)
    shard = root / "data" / "0.parquet"
    if kind in ("missing", "dtype"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        t = pq.read_table(shard)
        t = (
            t.drop_columns(["code"])
            if kind == "missing"
            else t.set_column(0, "subject_id", t.column("subject_id").cast(pa.int32()))
        )
        pq.write_table(t, shard)
    return root


@pytest.mark.parametrize(
    "kind,message",
    [
        ("missing", "Missing required columns: code"),
        ("dtype", "subject_id (want int64, got int32)"),
        ("nosplit", "no subjects in the 'train' split"),
    ],
)
def test_bad_meds_stops_with_one_line_and_writes_nothing(tmp_path, capsys, outputs_guard, kind, message):
    root = _bad_meds(tmp_path, kind)
    before = sorted(p.name for p in outputs_guard.parent.iterdir())
    code = main(["run", "params/smoke.yaml", "--data", str(root), "--name", "pytest-existing", "--force"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("repro: error: ") and message in err and "\n" not in err
    assert (outputs_guard / "marker.txt").read_text() == "keep me"
    assert sorted(p.name for p in outputs_guard.parent.iterdir()) == before


def test_existing_run_is_not_overwritten_without_force(capsys, outputs_guard):
    code = main(["run", "params/smoke.yaml", "--name", "pytest-existing"])
    assert code == 2 and "pass --force" in capsys.readouterr().err
    assert (outputs_guard / "marker.txt").read_text() == "keep me"


def test_unknown_notebook_is_a_one_line_error(capsys, outputs_guard):
    code = main(["run", "params/smoke.yaml", "--name", "pytest-existing", "--force", "--notebooks", "07"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--notebooks: '07' names no notebook" in err and "\n" not in err
    assert (outputs_guard / "marker.txt").read_text() == "keep me"


@pytest.mark.e2e
def test_smoke_report_end_to_end():
    """The README's `make report` path: every notebook runs on params/smoke.yaml and the report renders."""
    out = ROOT / "outputs" / "pytest-smoke"  # never the user's outputs/smoke
    cmd = [sys.executable, "-m", "repro.cli", "run", "params/smoke.yaml", "--name", "pytest-smoke", "--force"]
    subprocess.run(cmd, cwd=ROOT, check=True)
    html = (out / "report.html").read_text().replace("\xa0", " ").replace("&nbsp;", " ")
    assert (out / "report.pdf").read_bytes()[:4] == b"%PDF"
    for needle in ("Table 1", "Figure 1", "EHRMamba", "CEHR-BERT", "Counts + LR", "Oracle", "on plateau"):
        assert needle in html, needle
    assert "??" not in html
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["notebooks"]) == set(NOTEBOOKS)
    assert "reference-steps" in manifest["kernel_paths"]  # CPU: EHRMamba's PyTorch scan, recorded
    assert manifest["dataset"]["etl_name"] == "repro.data.synthetic"  # `repro compare` pools one dataset
    plan = manifest["plan"]  # written before any training
    assert plan["summary"][0].startswith(f"plan: {len(plan['runs'])} training runs")
    assert {r["model"] for r in plan["runs"]} >= {"ehrmamba", "cehr_bert"}
    ahead = manifest["training"]  # the runs of 01, 03 and 05, in one pool before the notebooks
    assert ahead["notebooks"] == ["01_accuracy", "03_mpf", "05_representations"] and ahead["workers"] == 2
    assert ahead["mps"] == "off: no CUDA GPU"  # a CPU run shares no GPU
    mps = {nb: g.get("mps") for g in manifest["groups"] for nb in g["notebooks"]}  # they only evaluate
    assert mps["01_accuracy"] is None and mps["02_efficiency"] is None


@pytest.mark.e2e
def test_h4_without_long_histories_renders_a_sentence_not_a_failure(tmp_path):
    """No held-out history longer than efficiency.long_history_tokens: notebook 04 runs, and its empty H4
    comparison renders as a line that says why (it once failed the whole render)."""
    import yaml

    from repro.report.render import render_report

    raw = yaml.safe_load((ROOT / "params" / "smoke.yaml").read_text())
    raw["efficiency"]["long_history_tokens"] = 10**6
    params = tmp_path / "nolong.yaml"
    params.write_text(yaml.safe_dump(raw))
    name = "pytest-nolong"
    out = ROOT / "outputs" / name
    try:
        assert main(["run", str(params), "--name", name, "--force", "--notebooks", "04"]) == 0
        qmd = out / "mini.qmd"
        qmd.write_text(
            "---\ntitle: H4\n---\n\n{{< embed notebooks/04_long_sequences.ipynb#tbl-long-history >}}\n\n"
            "{{< embed notebooks/04_long_sequences.ipynb#tbl-h4 >}}\n"
        )
        html = " ".join(
            render_report(qmd, out, formats=["html"], engine="offline")["html"].read_text().split()
        )
        assert "no held-out subject has a history longer than 1000000 tokens" in html
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(ROOT / "outputs" / f"{name}.failed", ignore_errors=True)


def test_dry_run_checks_everything_and_writes_nothing(capsys):
    def listing():
        out = ROOT / "outputs"
        return sorted(p.name for p in out.iterdir() if p.name != ".cache") if out.exists() else []

    before = listing()
    assert main(["run", "params/smoke.yaml", "--dry-run", "--name", "pytest-dry"]) == 0
    out = capsys.readouterr().out
    assert "notebook 90_verdicts: parameters injected" in out and out.strip().endswith(
        "nothing was trained or written (the data cache is filled)"
    )
    assert re.search(r"pre-flight: mortality_1m: samples \d+ / \d+ / \d+, positives \d+ / \d+ / \d+", out)
    assert "training: the runs of 01_accuracy, 03_mpf, 05_representations in one pool of 2 processes" in out
    assert listing() == before


def _tiny_project(root, monkeypatch, fail_flag, counter):
    return tiny_run_project(
        root,
        monkeypatch,
        {
            "a": f"with open({str(counter)!r}, 'a') as f:\n    f.write('a')\n",
            "b": f"import os\nassert not os.path.exists({str(fail_flag)!r}), 'planted failure'\n",
        },
        f"name: tiny\ndevice: cpu\ndata:\n  synthetic: true\n  meds_dir: {root / 'no-data'}\n",
    )


def test_resume_reruns_only_the_notebook_that_failed(tmp_path, monkeypatch):
    from repro.report import notebook_exec, pipeline

    fail_flag, counter = tmp_path / "fail", tmp_path / "count.txt"
    params = _tiny_project(tmp_path, monkeypatch, fail_flag, counter)  # no data in this project
    fail_flag.write_text("x")
    with pytest.raises(
        notebook_exec.RunError, match=r"notebook b failed in cell 3 \(AssertionError: planted failure\)"
    ):
        pipeline.run(str(params), render=False, notebooks=("a", "b"))
    failed = tmp_path / "outputs" / "tiny.failed"
    assert (failed / "notebooks" / "b.ipynb").exists()  # the partial executed copy is kept
    assert list(json.loads((failed / "manifest.json").read_text())["notebooks"]) == ["a"]
    fail_flag.unlink()
    out = pipeline.run(str(params), render=False, notebooks=("a", "b"), resume=True)
    assert counter.read_text() == "a"  # a ran once, before the failure
    assert sorted(json.loads((out / "manifest.json").read_text())["notebooks"]) == ["a", "b"]
    assert not failed.exists()
    with pytest.raises(notebook_exec.RunError, match="no failed run to resume"):
        pipeline.run(str(params), render=False, notebooks=("a", "b"), resume=True, force=True)


def test_a_render_that_fails_after_the_notebooks_keeps_the_finished_run(tmp_path, monkeypatch):
    from repro.report import notebook_exec, pipeline, render
    from repro.report.pandoc import RenderError

    params = _tiny_project(tmp_path, monkeypatch, tmp_path / "never", tmp_path / "count.txt")

    def no_pandoc(qmd, out_dir, engine="auto"):
        raise RenderError(f"the offline renderer needs pandoc, rendering {qmd}")

    monkeypatch.setattr(render, "render_report", no_pandoc)
    final = tmp_path / "outputs" / "tiny"
    with pytest.raises(notebook_exec.RunError, match=r"every notebook ran.*needs pandoc") as err:
        pipeline.run(str(params), notebooks=("a", "b"))
    assert f"repro render {final}" in str(err.value) and ".staging" not in str(err.value)
    assert (final / "notebooks" / "b.ipynb").exists() and not (tmp_path / "outputs" / "tiny.failed").exists()
    manifest = json.loads((final / "manifest.json").read_text())
    assert sorted(manifest["notebooks"]) == ["a", "b"] and "needs pandoc" in manifest["render"]["error"]
    assert not [p for p in (tmp_path / "outputs").iterdir() if p.name.startswith(".staging")]


def test_plan_runs_every_notebook_once_and_timing_notebooks_alone():
    from repro.report.pipeline import NOTEBOOKS, plan

    for jobs in (1, 2, 3):
        groups = plan(NOTEBOOKS, jobs)
        flat = [nb for g in groups for nb in g]
        assert sorted(flat) == sorted(NOTEBOOKS) and len(flat) == len(NOTEBOOKS)
        assert max(map(len, groups)) <= jobs
        for g in groups:  # the efficiency notebooks time steps: nothing may share the GPU with them
            assert len(g) == 1 or not {"02_efficiency", "04_long_sequences"} & set(g)
        where = {nb: i for i, g in enumerate(groups) for nb in g}
        assert where["01_accuracy"] < where["03_mpf"] and where["01_accuracy"] < where["05_representations"]
        assert where["90_verdicts"] == len(groups) - 1
    assert plan(("02_efficiency", "00_cohort"), 2) == [("00_cohort",), ("02_efficiency",)]


def test_notebooks_of_a_group_run_at_the_same_time(tmp_path, monkeypatch):
    from repro.evaluation import summary
    from repro.report import notebook_exec, pipeline

    waits = {  # each waits for the other to start: deadlock if serial
        me: "import pathlib, time\n"
        f"pathlib.Path({str(tmp_path / me)!r}).touch()\n"
        f"t = time.time()\nwhile not pathlib.Path({str(tmp_path / other)!r}).exists():\n"
        "    assert time.time() - t < 60, 'the other notebook never started'\n    time.sleep(0.1)\n"
        for me, other in (("a", "b"), ("b", "a"))
    }
    params = tiny_run_project(
        tmp_path,
        monkeypatch,
        waits | {"c": "assert False, 'planted failure'\n"},
        f"name: tiny\ndevice: cpu\nnotebook_jobs: 2\ndata:\n  meds_dir: {tmp_path}\n",
    )
    monkeypatch.setattr(pipeline, "STAGES", (("a", "b"),))
    out = pipeline.run(str(params), render=False, notebooks=("a", "b"))
    manifest = json.loads((out / "manifest.json").read_text())
    assert [g["notebooks"] for g in manifest["groups"]] == [["a", "b"]]
    table = summary.timing_table(manifest)
    assert list(table["ran alongside"]) == ["b", "a", ""]
    assert table["wall time"].iloc[-1] == f"{manifest['groups'][0]['seconds']:,.0f} s"  # counted once
    one_by_one = {"notebooks": manifest["notebooks"], "groups": [{"notebooks": ["a"], "seconds": 2.0}]}
    assert "ran alongside" not in summary.timing_table(one_by_one)  # nothing ran together: no column
    assert "training processes" not in table  # a CPU run: no GPU to share
    shared = {
        "notebooks": {"a": {"seconds": 5.0}, "b": {"seconds": 3.0}, "c": {"seconds": 1.0}},
        "groups": [
            {"notebooks": ["a"], "seconds": 5.0, "mps": "on"},
            {"notebooks": ["b"], "seconds": 3.0, "mps": "off: no nvidia-cuda-mps-control on PATH"},
            {"notebooks": ["c"], "seconds": 1.0},
        ],
    }
    assert list(summary.timing_table(shared)["training processes"]) == ["MPS", "by turns", "", ""]
    lone = json.loads(
        (pipeline.run(str(params), render=False, notebooks=("a",), force=True) / "manifest.json").read_text()
    )
    assert lone["groups"] == [
        {"notebooks": ["a"], **lone["notebooks"]["a"]}
    ]  # its own record, no second sampler
    monkeypatch.setattr(pipeline, "STAGES", (("a", "c"),))
    with pytest.raises(notebook_exec.RunError, match=r"notebook c failed in cell 3 \(AssertionError"):
        pipeline.run(str(params), render=False, notebooks=("a", "c"), force=True)
    failed = json.loads((tmp_path / "outputs" / "tiny.failed" / "manifest.json").read_text())
    assert list(failed["notebooks"]) == ["a"] and failed["groups"] == []  # a finished; resume skips it


def test_check_data_reads_every_shard_of_a_valid_directory(meds_dir):
    from repro.report.pipeline import check_data

    assert check_data(str(meds_dir)) == len(hand_events())


def test_real_data_params_without_data_stop_early(capsys):
    assert main(["run", "params/mimic-iv.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        "data.synthetic is false but data.meds_dir is not set; pass --data MEDS_DIR" in err
        and "\n" not in err
    )


def test_gpu_trace_is_written_whole_and_replaced(tmp_path):
    from repro.profiling.gpu_monitor import GpuMonitor

    mon = GpuMonitor(interval_ms=500)
    path = tmp_path / "results" / "gpu-trace-01_accuracy.csv"
    mon.write_trace(path)
    assert not path.exists()  # no samples (a CPU run): no file
    mon.samples = [(90.0, 1024.0), (10.0, 2048.0)]
    mon.write_trace(path)
    mon.samples = [(50.0, 10.0)]
    mon.write_trace(path)
    assert path.read_text().splitlines() == ["seconds,gpu_busy_pct,gpu_mem_mib", "0.0,50,10"]


def test_prepare_checks_the_data_like_run(tmp_path, capsys):
    root = _bad_meds(tmp_path, "nosplit")
    assert main(["prepare", "params/smoke.yaml", "--data", str(root)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("repro: error: ") and "no subjects in the 'train' split" in err and "\n" not in err
    assert main(["prepare", str(tmp_path / "none.yaml")]) == 2
    assert "params file not found" in capsys.readouterr().err


@pytest.mark.slow  # several processes (pyproject: slow)
def test_the_training_notebooks_runs_train_in_one_pool_before_them(tmp_path, monkeypatch):
    """`repro run` trains the runs of every training notebook in one pool first (their workers would idle
    notebook by notebook); the notebooks then find them in their work folder. A resumed run keeps that
    record and does not train again."""
    from repro.evaluation import summary
    from repro.report import notebook_exec, pipeline
    from repro.training import shard

    def seen(name: str) -> str:  # whether the pool had trained when the notebook started
        return f"import pathlib\npathlib.Path({str(tmp_path)!r}, 'seen-{name}').write_text(str(pathlib.Path(run_dir, 'work', 'trained').exists()))\n"

    fail_flag = tmp_path / "fail"
    later = f"import pathlib\nassert not pathlib.Path({str(fail_flag)!r}).exists(), 'planted failure'\n"
    params = tiny_run_project(
        tmp_path,
        monkeypatch,
        {"a": seen("a"), "b": seen("b"), "c": later},
        f"name: tiny\ndevice: cpu\ntrain:\n  workers: 2\ndata:\n  meds_dir: {tmp_path}\n",
    )
    calls = []

    def fake_shard(params, data_dir, work, part, workers):
        calls.append((Path(work).name, part, workers))
        Path(work).mkdir(parents=True, exist_ok=True)
        (Path(work) / "trained").write_text("")
        return ["shard 0/1: every group of the slice finished"]

    monkeypatch.setattr(shard, "train_shard", fake_shard)
    monkeypatch.setattr(pipeline, "TRAINING_NOTEBOOKS", ("a", "b"))
    monkeypatch.setattr(pipeline, "_manifest_plan", lambda *args: {"runs": [], "summary": []})
    fail_flag.write_text("x")
    with pytest.raises(notebook_exec.RunError, match="notebook c failed"):
        pipeline.run(str(params), render=False, notebooks=("a", "b", "c"))
    assert calls == [("work", (0, 1), 2)]
    assert (tmp_path / "seen-a").read_text() == (tmp_path / "seen-b").read_text() == "True"
    fail_flag.unlink()
    out = pipeline.run(str(params), render=False, notebooks=("a", "b", "c"), resume=True)
    assert len(calls) == 1  # a and b finished before the failure: nothing to train again
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["training"]["notebooks"] == ["a", "b"] and manifest["training"]["workers"] == 2
    table = summary.timing_table(manifest)
    assert list(table["notebook"]) == ["training (a, b)", "a", "b", "c", "all of the above"]
    total = manifest["training"]["seconds"] + sum(g["seconds"] for g in manifest["groups"])
    assert table["wall time"].iloc[-1] == f"{total:,.0f} s"
    # one training notebook alone: it trains its own runs
    pipeline.run(str(params), render=False, notebooks=("a", "c"), force=True)
    assert len(calls) == 1 and (tmp_path / "seen-a").read_text() == "False"
    # a pool cut off (here Ctrl-C) leaves a failed run that says how long it trained; --resume trains again
    monkeypatch.setattr(shard, "train_shard", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(str(params), render=False, notebooks=("a", "b", "c"), force=True)
    cut = json.loads((tmp_path / "outputs" / "tiny.failed" / "manifest.json").read_text())
    assert "training" not in cut and cut["training_cut"]["notebooks"] == ["a", "b"]
    assert cut["training_cut"]["workers"] == 2 and cut["training_cut"]["seconds"] >= 0
    monkeypatch.setattr(shard, "train_shard", fake_shard)
    out = pipeline.run(str(params), render=False, notebooks=("a", "b", "c"), resume=True, force=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(calls) == 2 and "training_cut" not in manifest and manifest["training"]["workers"] == 2


def test_a_cuda_run_without_mamba_kernels_stops_before_it_starts(tmp_path, monkeypatch, capsys):
    """On a GPU node where mamba_ssm does not import (here: this CPU machine, with CUDA faked), `repro run`
    stops with one line naming the Mamba models and the remedy, instead of training them for hours on the
    reference scan; `efficiency.allow_reference_on_cuda` lets it go on, and a run without Mamba models
    never asks."""
    import torch

    from repro.config import load_params
    from repro.models import ehrmamba
    from repro.report.pipeline import _check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ehrmamba, "selective_scan_fn", None)
    path = ROOT / "params" / "default.yaml"
    params = load_params(path)
    with pytest.raises(
        Exception, match=r"mamba_ssm's kernels do not import, so ehrmamba, hybrid would train"
    ) as err:
        _check_device(params, path)
    assert "make kernels" in str(err.value) and "allow_reference_on_cuda" in str(err.value)
    assert main(["run", str(path), "--dry-run", "--name", "pytest-kernels"]) == 2
    assert "mamba_ssm's kernels do not import" in capsys.readouterr().err
    _check_device(load_params(path, {"efficiency.allow_reference_on_cuda": True}), path)
    _check_device(params, path, ("00_cohort", "90_verdicts"))  # notebooks that run no model
    with pytest.raises(Exception, match=r"so ehrmamba would train"):
        _check_device(params, path, ("03_mpf",))
    no_mamba = {
        "models": ["cehr_bert"],
        "mpf_models": [],
        "efficiency.models": ["transformer"],
        "efficiency.long_models": ["transformer"],
        "representations.variants": {},
    }
    _check_device(load_params(path, no_mamba), path)
