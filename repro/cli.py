"""Command line: `repro run PARAMS`, `repro plan PARAMS`, `repro render RUN_DIR`, `repro doctor`, `repro synth OUT_DIR`.

A user's mistake (bad params, bad MEDS input, an existing run) prints one line naming the file,
column or parameter and exits with status 2; a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
from pathlib import Path


def _user_errors() -> tuple[type[BaseException], ...]:
    from repro.config import ParamsError
    from repro.data.meds import MedsError
    from repro.evaluation.replication import ReplicationError
    from repro.report.notebook_exec import RunError
    from repro.training.mps import MpsError

    errors: list[type[BaseException]] = [
        ParamsError,
        MedsError,
        RunError,
        MpsError,
        ReplicationError,
        FileExistsError,
    ]
    try:
        from repro.report.pandoc import RenderError

        errors.append(RenderError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)


def _terminated(signum: int, frame) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="repro", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p_run = sub.add_parser("run", help="execute every notebook for a params file and render the report")
    p_run.add_argument("params", help="params/*.yaml")
    p_run.add_argument("--data", help="a MEDS directory (default: the synthetic cohort the params describe)")
    p_run.add_argument("--name", help="run name, the folder under outputs/ (default: the params file's name)")
    p_run.add_argument("--force", action="store_true", help="replace an existing run of the same name")
    p_run.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        metavar="SEED",
        help="other training seeds: runs a copy of the params with these (outputs/params/<stem>-seeds-...yaml, "
        "also the default run name), to `repro compare` with the first run",
    )
    p_run.add_argument("--no-render", action="store_true", help="execute notebooks only")
    p_run.add_argument(
        "--resume",
        action="store_true",
        help="continue outputs/<name>.failed/, re-running only unfinished notebooks",
    )
    p_run.add_argument(
        "--dry-run",
        action="store_true",
        help="check params, data and notebooks in seconds; train and write nothing",
    )
    p_run.add_argument(
        "--notebooks",
        nargs="+",
        metavar="NB",
        help="run only these notebooks (names or number prefixes, e.g. 02 04); implies --no-render",
    )
    p_run.add_argument(
        "--engine",
        choices=["auto", "quarto", "offline"],
        default="auto",
        help="renderer: Quarto when on PATH (auto), or the built-in offline renderer",
    )

    p_run.add_argument(
        "--work",
        metavar="DIR",
        help="training cache to read and fill (where `repro train --shard` trained the grid; default: the run's own)",
    )

    p_train = sub.add_parser(
        "train",
        help="train a slice of the run's grid into a shared work folder (several nodes, SLURM arrays)",
    )
    p_train.add_argument("params", help="params/*.yaml")
    p_train.add_argument(
        "--data", help="a MEDS directory (default: the synthetic cohort the params describe)"
    )
    p_train.add_argument("--work", required=True, metavar="DIR", help="the shared training cache")
    p_train.add_argument(
        "--shard",
        default="0/1",
        help="i/n: train the i-th of n disjoint slices of the grid (default 0/1: all)",
    )
    p_train.add_argument("--workers", type=int, help="training processes (default: train.workers)")

    p_prep = sub.add_parser(
        "prepare", help="generate and tokenize the data a run needs (cached), without training"
    )
    p_prep.add_argument("params", help="params/*.yaml")
    p_prep.add_argument("--data", help="a MEDS directory (default: the synthetic cohort the params describe)")

    p_plan = sub.add_parser(
        "plan", help="every training run of the grid with its steps and tokens, before training"
    )
    p_plan.add_argument("params", help="params/*.yaml")
    p_plan.add_argument("--data", help="a MEDS directory (default: the synthetic cohort the params describe)")
    p_plan.add_argument(
        "--measured", metavar="RUN_DIR", help="an earlier run on this kind of node: its tokens/s"
    )
    p_plan.add_argument("--gpus", type=int, default=1, help="GPUs to spread the runs over (wall-time bound)")
    p_plan.add_argument("--out", help="also write the plan as CSV here")

    p_cmp = sub.add_parser(
        "compare",
        help="runs of the same question side by side: which estimates and verdicts replicated, and every "
        "run's training seeds pooled",
    )
    p_cmp.add_argument(
        "runs", nargs="+", metavar="RUN", help="run folders; the first is compared with each other"
    )
    p_cmp.add_argument("--task", default="mortality_1m", help="task whose seeds are pooled")
    p_cmp.add_argument("--out", help="also write the side-by-side table(s) as CSV here")

    p_render = sub.add_parser("render", help="render report.qmd of an executed run")
    p_render.add_argument("run_dir")
    p_render.add_argument("--engine", choices=["auto", "quarto", "offline"], default="auto")

    p_doc = sub.add_parser("doctor", help="report CUDA, mamba_ssm kernels and each model's kernel path")
    p_doc.add_argument(
        "--params", default="params/default.yaml", help="params whose models and device to check"
    )
    p_doc.add_argument("--device", choices=["cpu", "cuda"], help="override the params' device")

    p_synth = sub.add_parser("synth", help="write the synthetic MEDS cohort to a directory")
    p_synth.add_argument("out_dir")
    p_synth.add_argument("--n", type=int, default=1000, help="subjects")
    p_synth.add_argument("--seed", type=int, default=7)
    p_synth.add_argument("--shard-size", type=int, default=1000)
    p_synth.add_argument(
        "--mimic-raw",
        metavar="RAW_DIR",
        help="also write the cohort as raw MIMIC-IV tables (hosp/, icu/) for the MIMIC_IV_MEDS ETL",
    )

    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from repro.report.pipeline import NOTEBOOKS, run, select_notebooks

            notebooks = select_notebooks(args.notebooks) if args.notebooks else NOTEBOOKS
            if args.seeds:
                import tempfile

                from repro.config import project_root, with_seeds

                where = tempfile.mkdtemp() if args.dry_run else project_root() / "outputs" / "params"
                args.params = str(with_seeds(args.params, args.seeds, where))
                print(f"params with seeds {args.seeds}: {args.params}")
            if args.dry_run:
                from repro.report.pipeline import dry_run

                for line in dry_run(args.params, args.data, args.name, args.force, notebooks):
                    print(line)
                return 0
            signal.signal(signal.SIGTERM, _terminated)  # a killed batch job still leaves <name>.failed/
            out = run(
                args.params,
                data_dir=args.data,
                name=args.name,
                force=args.force,
                render=not args.no_render and notebooks == NOTEBOOKS,
                engine=args.engine,
                notebooks=notebooks,
                resume=args.resume,
                work_dir=args.work,
            )
            print(f"run written to {out}")
            for f in ("report.html", "report.pdf"):
                if (out / f).exists():
                    print(f"  {out / f}")
        elif args.command == "train":
            from repro.report.pipeline import train_grid
            from repro.training.shard import parse_shard

            try:
                shard = parse_shard(args.shard)
            except ValueError as exc:
                parser.error(str(exc))
            for line in train_grid(args.params, args.data, args.work, shard, args.workers):
                print(line)
        elif args.command == "prepare":
            from repro.report.pipeline import prepare_data

            for line in prepare_data(args.params, args.data):
                print(line)
        elif args.command == "plan":
            from repro.report.pipeline import plan_run

            table, lines = plan_run(args.params, args.data, args.measured, args.gpus)
            print(table.to_string(index=False))
            for line in lines:
                print(line)
            if args.out:
                from repro.evaluation.store import save_csv

                print(save_csv(table, args.out))
        elif args.command == "compare":
            from repro.evaluation.replication import (
                ReplicationError,
                compare_runs,
                load_run,
                pooled_lines,
                summary_lines,
            )

            if len(args.runs) < 2:
                raise ReplicationError(f"compare needs two runs or more, got {args.runs}")
            runs = [load_run(r) for r in args.runs]
            tables = []
            for other in runs[1:]:
                table = compare_runs(runs[0], other)
                print(table.to_string(index=False))
                for line in summary_lines(runs[0], other, table):
                    print(line)
                print()
                tables.append(table.assign(**{"run B folder": other["dir"]}) if len(runs) > 2 else table)
            for line in pooled_lines(runs, args.task):
                print(line)
            if args.out:
                import pandas as pd

                from repro.evaluation.store import save_csv

                print(save_csv(pd.concat(tables, ignore_index=True), args.out))
        elif args.command == "render":
            from repro.config import project_root
            from repro.report.pipeline import REPORT_FILES
            from repro.report.render import render_report

            run_dir = Path(args.run_dir)
            if (run_dir / "report.qmd").is_file():  # a run made before a report file existed gets today's
                for f in REPORT_FILES:
                    if not (run_dir / f).exists():
                        shutil.copy2(project_root() / f, run_dir / f)
            written = render_report(run_dir / "report.qmd", run_dir, engine=args.engine)
            for p in written.values():
                print(p)
        elif args.command == "doctor":
            from repro.report.doctor import main as doctor

            return doctor(args.params, args.device)
        elif args.command == "synth":
            from repro.config import ParamsError
            from repro.data.synthetic import write_synthetic_meds

            if args.n < 1:
                raise ParamsError(f"--n must be >= 1, got {args.n}")
            out = write_synthetic_meds(args.out_dir, args.n, args.seed, args.shard_size, progress=True)
            print(out)
            if args.mimic_raw:
                from repro.data.mimic_raw import write_mimic_raw

                rows = write_mimic_raw(out, args.mimic_raw)
                print(f"{args.mimic_raw}: {len(rows)} MIMIC-IV tables, {sum(rows.values()):,} rows")
    except _user_errors() as exc:
        print(f"repro: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
