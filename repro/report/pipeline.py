"""`repro run`: execute every notebook with papermill into a staging folder, write a manifest, render.

A run is built in `outputs/.staging-<name>-<pid>` and moved to `outputs/<name>` only when every
notebook ran, so an error never leaves a half-written run where a complete one was. A failed run is kept
as `outputs/<name>.failed/` with the partial executed notebook, and the error names the notebook and the
cell. Rendering comes after the move: a render that fails leaves the finished run in `outputs/<name>`
(its manifest records the error) and says which command renders it.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import sys
import time
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from repro.config import ParamsError, load_run_params, project_root
from repro.evaluation.store import save_json
from repro.report.manifest import dataset_record, environment, git_sha
from repro.report.notebook_exec import RunError, execute_notebook, notebook_json

if TYPE_CHECKING:
    import pandas as pd

NOTEBOOKS = (
    "00_cohort",
    "01_accuracy",
    "02_efficiency",
    "03_mpf",
    "04_long_sequences",
    "05_representations",
    "90_verdicts",
)
REPORT_FILES = ("report.qmd", "_quarto.yml", "report-header.typ")
# Notebooks that run at the same time when params.notebook_jobs > 1; each stage starts once the one before
# it has finished. 03 and 05 reuse the runs 01 trained; 02 and 04 time training steps, so they have the
# GPU to themselves; 90 reads every other notebook's results.
STAGES = (
    ("00_cohort", "01_accuracy"),
    ("03_mpf", "05_representations"),
    ("02_efficiency",),
    ("04_long_sequences",),
    ("90_verdicts",),
)


def select_notebooks(wanted: list[str]) -> tuple[str, ...]:
    """Notebook names from full names or unique prefixes, in run order.

    >>> select_notebooks(["04", "02_efficiency"])
    ('02_efficiency', '04_long_sequences')
    >>> select_notebooks(["7"])
    Traceback (most recent call last):
    repro.config.ParamsError: --notebooks: '7' names no notebook; choose from 00_cohort, 01_accuracy, 02_efficiency, 03_mpf, 04_long_sequences, 05_representations, 90_verdicts
    """
    chosen = set()
    for w in wanted:
        hits = [nb for nb in NOTEBOOKS if nb == w or nb.startswith(w)]
        if len(hits) != 1:
            why = "names no notebook" if not hits else f"is ambiguous ({', '.join(hits)})"
            raise ParamsError(f"--notebooks: {w!r} {why}; choose from {', '.join(NOTEBOOKS)}")
        chosen.add(hits[0])
    return tuple(nb for nb in NOTEBOOKS if nb in chosen)


def plan(notebooks: tuple[str, ...], jobs: int) -> list[tuple[str, ...]]:
    """The groups `repro run` executes one after another, the notebooks of a group at the same time.

    >>> plan(("00_cohort", "01_accuracy", "02_efficiency"), 1)
    [('00_cohort',), ('01_accuracy',), ('02_efficiency',)]
    >>> plan(NOTEBOOKS, 2)[:3]
    [('00_cohort', '01_accuracy'), ('03_mpf', '05_representations'), ('02_efficiency',)]
    """
    if jobs == 1:
        return [(nb,) for nb in notebooks]
    groups = []
    for stage in STAGES:
        chosen = [nb for nb in stage if nb in notebooks]
        groups += [tuple(chosen[i : i + jobs]) for i in range(0, len(chosen), jobs)]
    staged = {nb for stage in STAGES for nb in stage}
    return groups + [(nb,) for nb in notebooks if nb not in staged]


def _execute_group(
    group: tuple[str, ...], root: Path, staging: Path, parameters: dict
) -> tuple[dict[str, dict], dict, RunError | None]:
    """Run a group's notebooks, each in its own process when there are several (papermill changes the
    working directory of the process it runs in, and an interrupt must reach every notebook's kernel).

    Returns what finished, the group's manifest entry (wall time, GPU-busy share) and the first failure,
    so the manifest keeps the notebooks that did finish. A lone notebook's entry is its own record: only a
    group of several needs a GPU sampler of its own, as its notebooks' traces overlap.
    """

    def args(nb: str) -> tuple:
        return nb, root / "notebooks" / f"{nb}.py", staging / "notebooks" / f"{nb}.ipynb", parameters, root

    if len(group) == 1:
        try:
            info = execute_notebook(*args(group[0]))
        except RunError as exc:
            return {}, {}, exc
        return {group[0]: info}, {"notebooks": list(group)} | info, None
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from repro.profiling.gpu_monitor import GpuMonitor

    finished: dict[str, dict] = {}
    error: RunError | None = None
    t0 = time.perf_counter()
    with GpuMonitor() as monitor, ProcessPoolExecutor(len(group), mp_context=mp.get_context("spawn")) as pool:
        futures = {nb: pool.submit(execute_notebook, *args(nb)) for nb in group}
        for nb, future in futures.items():
            try:
                finished[nb] = future.result()
            except RunError as exc:
                error = error or exc
    entry = {"notebooks": list(group), "seconds": round(time.perf_counter() - t0, 1)} | (
        monitor.summary() or {}
    )
    return finished, entry, error


def _kernel_paths(results_dir: Path) -> list[str]:
    """Kernel paths the notebooks report having used (each notebook's results JSON may list them)."""
    import json

    paths: set[str] = set()
    for f in sorted(results_dir.glob("*.json")):
        paths.update(json.loads(f.read_text()).get("kernel_paths", []))
    return sorted(paths)


def check_data(data_dir: str | None) -> int:
    """Validate a user MEDS directory before anything is written (fail early, name the file).

    Every shard is read and checked in parallel worker processes (``stream.validate_dataset``), with the
    cross-shard rules (one shard per subject, split file agreement). Returns the number of events.
    """
    if not data_dir:
        return 0
    from repro.data.meds import load_meds
    from repro.data.stream import ShardRunner, default_workers, validate_dataset

    ds = load_meds(data_dir)
    with ShardRunner(default_workers(ds), progress=False) as runner:
        return validate_dataset(ds, runner).events


PARAMETERS = ("params_file", "run_dir", "data_dir")


def dry_run(
    params_file: str,
    data_dir: str | None = None,
    name: str | None = None,
    force: bool = False,
    notebooks: tuple[str, ...] = NOTEBOOKS,
) -> list[str]:
    """Check everything a run needs without training or writing a run: params, run name, data, device, and
    each notebook (converted and given its parameters by papermill's prepare-only mode, in a temp folder).
    Returns the lines to print; raises the same one-line errors a real run would."""
    import tempfile

    import papermill as pm

    root = project_root()
    params_path = Path(params_file).resolve()
    params = load_run_params(params_path, data_dir)
    name = _run_name(name, params_path)
    final = root / "outputs" / name
    lines = [f"params: {params_path} (hash {params.hash()}), run name {name!r}"]
    _check_target(final, force)
    lines.append(f"output: {final}" + (" (exists; --force will replace it)" if final.exists() else ""))
    _check_device(params, params_path, notebooks)
    lines.append(f"device: {params.device}")
    lines += _ready_data(params, data_dir)  # data validated, labels and tokens (cached): the run's first step
    table, summary = plan_run(params_file, data_dir)
    lines += [f"plan: {line}" for line in table.to_string(index=False).splitlines()] + summary
    if _trains_ahead(params, notebooks):
        lines.append(
            f"training: the runs of {', '.join(TRAINING_NOTEBOOKS)} in one pool of {params.train.workers} "
            "processes, before the notebooks"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for nb in notebooks:
            src, nb_in = root / "notebooks" / f"{nb}.py", Path(tmp) / f"{nb}.ipynb"
            notebook_json(src, nb_in)
            found = set(pm.inspect_notebook(str(nb_in)))
            missing = [k for k in PARAMETERS if k not in found]
            if missing:
                raise RunError(f"{src}: its parameters cell lacks {', '.join(missing)}")
            parameters = {"params_file": str(params_path), "run_dir": tmp, "data_dir": data_dir or ""}
            pm.execute_notebook(
                str(nb_in),
                str(Path(tmp) / f"{nb}.out.ipynb"),
                parameters=parameters,
                prepare_only=True,
                kernel_name="python3",
                language="python",
                progress_bar=False,
            )
            lines.append(f"notebook {nb}: parameters injected (papermill prepare-only)")
    lines.append("dry run passed: nothing was trained or written (the data cache is filled)")
    return lines


def _run_name(name: str | None, params_path: Path) -> str:
    name = name or params_path.stem
    if not name or "/" in name or name.startswith("."):
        raise ParamsError(f"--name must be a plain folder name, got {name!r}")
    return name


def _check_cohort(params, data_dir: str | None) -> list[str]:
    """Label and tokenize once, before any notebook (they reuse the cache); return the pre-flight lines
    (samples and positives per task and split) and stop on a task that cannot be trained or evaluated."""
    import gc

    from repro.training.prepare import check_cohort, label_counts, preflight_lines, prepare

    prep = prepare(params, data_dir)
    counts = label_counts(prep)
    lines = [f"pre-flight: {line}" for line in preflight_lines(counts)]
    lines += [
        f"pre-flight: {task}: label {row['label']} left out (fewer than eval.min_label_positives="
        f"{params.eval.min_label_positives} positives in a split)"
        for task, dropped in prep.dropped_labels.items()
        for row in dropped.to_dict(orient="records")
    ]
    lines += [
        f"pre-flight: task {task} dropped (eval.untrainable: drop): {why}"
        for task, why in prep.dropped_tasks.items()
    ]
    lines.append(f"cohort: {check_cohort(prep, counts)}")
    del prep
    gc.collect()
    return lines


def prepare_data(params_file: str, data_dir: str | None = None) -> list[str]:
    """Generate (synthetic) and tokenize everything the notebooks read, cached under outputs/.cache/.

    For batch jobs: run it on a CPU node, or beside the kernel build on the GPU node, and `repro run`
    finds every tokenization cached (the run's own and each representation variant of notebook 05).
    """
    from repro.training.variants import prepare_variants

    params = load_run_params(Path(params_file).resolve(), data_dir)
    lines = _ready_data(params, data_dir)
    return lines + prepare_variants(params, data_dir)


def train_grid(
    params_file: str,
    data_dir: str | None,
    work_dir: str,
    shard: tuple[int, int] = (0, 1),
    workers: int | None = None,
) -> list[str]:
    """`repro train`: slice ``shard`` of the runs notebooks 01, 03 and 05 train, into ``work_dir``, with the
    params and data exactly as `repro run` hands them to the notebooks (so the cached runs are theirs)."""
    from repro.training import mps
    from repro.training.shard import train_shard

    params_path = Path(params_file).resolve()
    params = load_run_params(params_path, data_dir)
    if data_dir:
        data_dir = str(Path(data_dir).resolve())
    _check_device(params, params_path, TRAINING_NOTEBOOKS)
    lines = _ready_data(params, data_dir)
    work = Path(work_dir).resolve()
    workers = workers or params.train.workers
    with mps.service(params.mps, params.device, workers) as mps_line:
        return lines + [f"MPS: {mps_line}"] + train_shard(params, data_dir, work, shard, workers)


def plan_run(
    params_file: str, data_dir: str | None = None, measured: str | None = None, gpus: int = 1
) -> tuple[pd.DataFrame, list[str]]:
    """The run's cost plan before any training (``repro.training.plan``): every training run with its
    steps and tokens, projected GPU-hours where ``measured`` (an earlier run folder) gives tokens/s."""
    from repro.evaluation.results import MODEL_LABELS
    from repro.training import plan
    from repro.training.prepare import check_cohort, prepare

    if gpus < 1:
        raise ParamsError(f"--gpus must be >= 1, got {gpus}")
    params = load_run_params(Path(params_file).resolve(), data_dir)
    prep = prepare(params, data_dir)
    check_cohort(prep)  # a task that cannot be trained stops here as it would stop the run
    table = plan.grid(prep)
    if measured:
        try:
            tps, share = plan.measured_throughput(measured), plan.measured_stops(measured)
            table = plan.project(table, tps, dict(MODEL_LABELS), plan.measured_sharing(measured), share)
        except FileNotFoundError as exc:
            raise RunError(f"--measured: {exc}") from None
    return table, plan.summary(table, gpus)


# the notebooks that train the grid `repro plan` lists
TRAINING_NOTEBOOKS = ("01_accuracy", "03_mpf", "05_representations")


def _manifest_plan(params_file: str, data_dir: str | None) -> dict:
    """The cost plan as the manifest keeps it, written before any training: each planned run (aggregates:
    samples, steps, tokens) and the summary lines. Seconds of a GPU run's time on its CPU (22 s for
    params/default.yaml on a 2-core CPU); the report's tbl-plan sets it beside what the run then used."""
    table, summary = plan_run(params_file, data_dir)
    return {"runs": table.to_dict(orient="records"), "summary": summary}


def _ready_data(params, data_dir: str | None) -> list[str]:
    """Validate user data, or generate the synthetic cohort once; then label and tokenize it (cached) and
    return the data line and the pre-flight lines (it stops on a task that cannot be trained, before any
    training)."""
    if not params.data.synthetic:  # load_run_params put --data there
        n = check_data(params.data.meds_dir)
        lines = [f"data: {params.data.meds_dir}: every shard valid, {n:,} events"]
    else:
        lines = [
            f"data: synthetic cohort of {params.data.n_subjects:,} subjects (generated or reused from cache)"
        ]
    if not data_dir and params.data.synthetic and not params.data.meds_dir:
        from repro.training.prepare import ensure_meds

        ensure_meds(params)  # generate the synthetic cohort once, with a progress bar in the terminal
    return lines + _check_cohort(params, data_dir)


def _check_target(final: Path, force: bool) -> None:
    if final.exists() and not force:
        raise RunError(f"{final} exists; pass --force to replace it or --name to write another run")


def _check_device(params, params_path: Path, notebooks: tuple[str, ...] = NOTEBOOKS) -> None:
    if params.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ParamsError(f"{params_path}: device is cuda but no CUDA device is available")
        _check_kernels(params, params_path, notebooks)


def mamba_models(params, notebooks: tuple[str, ...] = NOTEBOOKS) -> list[str]:
    """The models that ``notebooks`` train or time whose sequence mixer is mamba_ssm's kernel on CUDA."""
    eff, rep = params.efficiency, params.representations
    by_notebook = {
        "01_accuracy": params.models,
        "02_efficiency": eff.models,
        "03_mpf": params.mpf_models,
        "04_long_sequences": [*eff.models, *eff.long_models],
        "05_representations": rep.models if rep.variants else [],
    }
    wanted = [m for nb in notebooks for m in by_notebook.get(nb, [])]
    return sorted({m for m in wanted if m in ("ehrmamba", "hybrid", "mamba2")})


def _check_kernels(params, params_path: Path, notebooks: tuple[str, ...]) -> None:
    """Stop a CUDA run whose Mamba models would run the pure-PyTorch reference scan: on a GPU it is two
    orders of magnitude slower and runs out of memory at 2,048 tokens, so a run would train for hours and
    report those times. The timing notebooks already refuse such rows; training did not. It asks whether
    the kernels import, not what path a tiny forward takes (`repro doctor`): that would create a CUDA
    context in this process, which must hold no GPU memory while the timing notebooks run."""
    models = mamba_models(params, notebooks)
    if not models or params.efficiency.allow_reference_on_cuda:
        return
    from repro.models import ehrmamba, mamba2

    missing = [
        m
        for m in models
        if (mamba2.mamba_chunk_scan_combined if m == "mamba2" else ehrmamba.selective_scan_fn) is None
    ]
    if missing:
        raise ParamsError(
            f"{params_path}: device is cuda but mamba_ssm's kernels do not import, so {', '.join(missing)} "
            "would train and be timed on the slow reference path; build them for this GPU "
            "(`make kernels`, README: GPU nodes) or set efficiency.allow_reference_on_cuda: true"
        )


def _sharing(params, group: tuple[str, ...], trained: bool = False) -> AbstractContextManager[str | None]:
    """MPS for a group that trains (repro.training.mps); the timing notebooks run without it, and so do the
    training notebooks once the pool has ``trained`` their runs ahead of them (they then only evaluate)."""
    training = set(group) & set(TRAINING_NOTEBOOKS)
    if not training or trained:
        return nullcontext(None)
    from repro.training import mps

    return mps.service(params.mps, params.device, params.train.workers * len(training))


def _trains_ahead(params, notebooks: tuple[str, ...]) -> bool:
    """Whether `repro run` trains the training notebooks' runs in one pool before them: all three are to
    run and the params give two or more training processes (one process would train in `repro run`'s own,
    which must hold no GPU memory while the timing notebooks run)."""
    return set(TRAINING_NOTEBOOKS) <= set(notebooks) and params.train.workers > 1


def _train_ahead(params, data_dir: str | None, work: Path, results: Path, record: dict) -> None:
    """Train every run of notebooks 01, 03 and 05 in one pool of ``train.workers`` processes before the
    notebooks start; they then find each run cached and only evaluate. Why: notebook by notebook, the pool
    of 01 idles while its longest chains finish (on the default run, CEHR-BERT's MLM pretraining and the
    finetuning after it) and 03 and 05 wait; one pool hands those workers the other notebooks' runs.
    Fills ``record``, the manifest's record of it: wall time, GPU-busy share and peak memory, how processes
    shared the GPU. A pool cut off (an error, Ctrl-C, a batch job's time limit) still fills it and writes
    its GPU trace, so the failed run says how far its training got."""
    from repro.profiling.gpu_monitor import GpuMonitor
    from repro.training import mps
    from repro.training.shard import train_shard

    t0 = time.perf_counter()
    workers = params.train.workers
    record.update(notebooks=list(TRAINING_NOTEBOOKS), workers=workers)
    monitor = GpuMonitor()
    try:
        with monitor, mps.service(params.mps, params.device, workers) as mps_line:
            record["mps"] = mps_line
            lines = train_shard(params, data_dir, work, (0, 1), workers)
    finally:
        results.mkdir(parents=True, exist_ok=True)
        monitor.write_trace(results / "gpu-trace-training.csv")
        record.update({"seconds": round(time.perf_counter() - t0, 1)} | (monitor.summary() or {}))
    for line in lines:
        print(line, file=sys.stderr)


def run(
    params_file: str,
    data_dir: str | None = None,
    name: str | None = None,
    force: bool = False,
    render: bool = True,
    engine: str = "auto",
    notebooks: tuple[str, ...] = NOTEBOOKS,
    resume: bool = False,
    work_dir: str | None = None,
) -> Path:
    """Execute the notebooks for `params_file` into outputs/<name>/ and render the report there.

    ``resume``: continue ``outputs/<name>.failed/`` (same params and data), skipping the notebooks that
    finished there and reusing its training cache. ``work_dir``: the training cache to read and fill
    instead of the run's own ``work/`` (where ``repro train --shard`` trained the grid)."""
    root = project_root()
    params_path = Path(params_file)
    params_path = params_path if params_path.is_absolute() else (Path.cwd() / params_path).resolve()
    params = load_run_params(params_path, data_dir)
    if data_dir:
        data_dir = str(Path(data_dir).resolve())
    name = _run_name(name, params_path)
    outputs = root / "outputs"
    final = outputs / name
    failed = outputs / f"{name}.failed"
    _check_target(final, force)
    if resume and not (failed / "manifest.json").exists():
        raise RunError(f"--resume: no failed run to resume at {failed}")
    _check_device(params, params_path, notebooks)
    for line in _ready_data(params, data_dir):
        print(line, file=sys.stderr)

    staging = outputs / f".staging-{name}-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    done: dict[str, dict] = {}
    trained_ahead = None
    groups_done: list[dict] = []  # notebooks run together, with the group's wall time and GPU-busy share
    if resume:
        import json

        before = json.loads((failed / "manifest.json").read_text())
        if before.get("params_hash") != params.hash() or before.get("data_dir") != (data_dir or "synthetic"):
            raise RunError(
                f"--resume: {failed} was run with other parameters or data; rerun without --resume"
            )
        os.replace(failed, staging)  # finished notebooks, their results and the training cache come along
        done = {
            nb: info
            for nb, info in before.get("notebooks", {}).items()
            if (staging / "notebooks" / f"{nb}.ipynb").exists()
        }
        groups_done = [g for g in before.get("groups", []) if set(g["notebooks"]) <= set(done)]
        trained_ahead = before.get("training")  # its runs are in the training cache that came along
    (staging / "notebooks").mkdir(parents=True, exist_ok=True)
    from repro.training.prepare import meds_location

    manifest = {
        "run": name,
        "params_file": str(
            params_path.relative_to(root) if params_path.is_relative_to(root) else params_path
        ),
        "params_hash": params.hash(),
        "params": params.to_dict(),
        "data_dir": data_dir or "synthetic",
        "dataset": dataset_record(meds_location(params, data_dir)),  # _ready_data made sure it is there
        "git_sha": git_sha(root),
        "started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "environment": environment(),
        "notebooks": dict(done),
        "groups": groups_done,
    }
    if trained_ahead:
        manifest["training"] = trained_ahead
    if resume and before.get("git_sha") != manifest["git_sha"]:
        manifest["git_sha_before_resume"] = before.get("git_sha")  # the notebooks carried over ran there
    if work_dir:
        work_dir = str(Path(work_dir).resolve())
        manifest["work_dir"] = work_dir
    parameters = {
        "params_file": str(params_path),
        "run_dir": str(staging),
        "data_dir": data_dir or "",
        "work_dir": work_dir or "",
    }
    todo = tuple(nb for nb in notebooks if nb not in done)
    if resume and "plan" in before:
        manifest["plan"] = before["plan"]
    elif set(todo) & set(TRAINING_NOTEBOOKS):
        manifest["plan"] = _manifest_plan(str(params_path), data_dir)
        for line in manifest["plan"]["summary"]:
            print(line, file=sys.stderr)
    save_json(manifest, staging / "manifest.json")  # the commit and environment, as the notebooks start
    t_run = time.perf_counter()
    try:
        bar = tqdm(
            total=len(notebooks),
            initial=len(notebooks) - len(todo),
            desc=f"repro run {name}",
            unit="notebook",
            file=sys.stderr,
        )
        trained = _trains_ahead(params, todo)
        pooled = trained or bool(trained_ahead)  # a resumed run's pool trained its runs before it failed
        if trained:
            bar.set_postfix_str("training the runs of " + ", ".join(TRAINING_NOTEBOOKS))
            work = Path(work_dir) if work_dir else staging / "work"
            pool: dict = {}
            try:
                _train_ahead(params, data_dir, work, staging / "results", pool)
            except BaseException:
                # how long the pool ran and how busy the GPU was; the runs it finished are in the work folder,
                # and --resume trains the rest in a new pool
                manifest["training_cut"] = pool
                save_json(manifest, staging / "manifest.json")
                raise
            manifest["training"] = pool
            save_json(manifest, staging / "manifest.json")
        for group in plan(todo, params.notebook_jobs):
            bar.set_postfix_str(" + ".join(group))
            with _sharing(params, group, pooled) as mps_line:
                finished, entry, error = _execute_group(group, root, staging, parameters)
            if mps_line:
                entry["mps"] = mps_line
            manifest["notebooks"].update(finished)
            if not error:
                manifest["groups"].append(entry)
            save_json(manifest, staging / "manifest.json")  # what --resume may skip
            bar.update(len(finished))
            if error:
                raise error
        bar.close()
        manifest["seconds_notebooks"] = round(time.perf_counter() - t_run, 1)
        manifest["kernel_paths"] = _kernel_paths(staging / "results")
        save_json(manifest, staging / "manifest.json")
        for f in REPORT_FILES:
            shutil.copy2(root / f, staging / f)
    except BaseException as exc:
        shutil.rmtree(failed, ignore_errors=True)
        if staging.exists():
            os.replace(staging, failed)
        if isinstance(exc, RunError):  # point at where the partial notebook now lies
            raise RunError(str(exc).replace(str(staging), str(failed))) from None
        raise
    # Every notebook finished: from here on nothing moves the run aside. A render that fails leaves it in
    # place as a finished run (the manifest says why), to be rendered again with `repro render`.
    render_error = None
    try:
        render_error = _render(staging, engine, manifest) if render else None
    finally:  # an interrupt while rendering still leaves the finished run in place
        manifest["seconds_total"] = round(time.perf_counter() - t_run, 1)
        save_json(manifest, staging / "manifest.json")
        _install(staging, final, outputs, name)
    if render_error is not None:
        raise RunError(
            f"{name}: every notebook ran and the run is at {final}, but rendering failed: "
            f"{str(render_error).replace(str(staging), str(final))}\n"
            f"Once that is fixed, render it with: repro render {final}"
        )
    return final


def _render(staging: Path, engine: str, manifest: dict) -> Exception | None:
    """Render the staged run's report into it; the error, if any, is returned (and kept in the manifest)."""
    from repro.report.render import render_report

    t0 = time.perf_counter()
    try:
        written = render_report(staging / "report.qmd", staging, engine=engine)
    except Exception as exc:  # noqa: BLE001 - any renderer failure must leave the finished run in place
        manifest["render"] = {"error": f"{type(exc).__name__}: {exc}".replace(str(staging), "<run>")}
        return exc
    manifest["render"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "files": sorted(p.name for p in written.values()),
    }
    return None


def _install(staging: Path, final: Path, outputs: Path, name: str) -> None:
    """Move the finished run into outputs/<name>, replacing an earlier one, and drop an old failed run."""
    if final.exists():
        trash = outputs / f".trash-{name}-{os.getpid()}"
        os.replace(final, trash)
        os.replace(staging, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, final)
    shutil.rmtree(outputs / f"{name}.failed", ignore_errors=True)
