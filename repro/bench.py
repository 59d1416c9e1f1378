"""Benchmarks that print what they measured in one run (their code is in `repro.profiling`).

- `python -m repro.bench data --events 20000000 --workers 2`: the MEDS data path (validation, labelling,
  tokenizer fit, tokenization) with events/s per worker, wall time, peak RSS and an extrapolation to
  500M events (repro.profiling.bench_data).
- `python -m repro.bench step --lengths 2048 16384`: our EHRMamba train step against a bare mamba_ssm
  MambaLMHeadModel of the same size, as a ratio, on one GPU (repro.profiling.bench_step).
- `python -m repro.bench zoo --params params/default.yaml --steps 300`: every backbone of a params file
  trained a few hundred steps at its size, losses printed: does every model learn on this device
  (repro.profiling.bench_zoo)?
- `python -m repro.bench learn --params params/default.yaml --steps 1500`: our EHRMamba against mamba_ssm's
  MambaLMHeadModel of the same size, same stream, loop and steps, two seeds: validation CLM loss side by
  side (repro.profiling.bench_learn).
- `python -m repro.bench paper --out bench-paper.json`: the paper's efficiency claim measured its way,
  EHRMamba against MultiBird at the paper's sizes and 2048 tokens: tokens/s at the paper's batch sizes, the
  largest batch that fits, and time per epoch extrapolated to the paper's data beside its numbers, with the
  EHRMamba / MultiBird ratios (repro.profiling.bench_paper).
- `python -m repro.bench graphs`: the training loop's steps captured in CUDA graphs against eager ones,
  same weights and batches: tokens/s, peak memory, how far the loss curves part (repro.profiling.bench_graphs).
- `python -m repro.bench mechanisms --work outputs/default/work`: each pretrained backbone of a run finetuned
  on one planted mechanism's own label at a time, held-out AUROC beside counts + LR's: what pretraining put
  within reach of finetuning (synthetic cohort; repro.profiling.bench_mechanisms).
- `python -m repro.bench pretrain --model cehr_bert --variant base --variant lr2:train.per_model.cehr_bert.lr=0.002`:
  one backbone's pretraining under variants of a params file, in parallel processes: validation curves
  side by side (repro.profiling.bench_pretrain).
- `python -m repro.bench share --processes 6`: that many training processes on one GPU at once, by turns
  and through MPS, eager and graphed: aggregate tokens/s against one process alone (repro.profiling.bench_share).
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "data":
        from repro.profiling.bench_data import main as data_main

        return data_main(argv[1:])
    if argv and argv[0] == "step":
        from repro.profiling.bench_step import main as step_main

        return step_main(argv[1:])
    if argv and argv[0] == "graphs":
        from repro.profiling.bench_graphs import main as graphs_main

        return graphs_main(argv[1:])
    if argv and argv[0] == "share":
        from repro.profiling.bench_share import main as share_main

        return share_main(argv[1:])
    if argv and argv[0] == "mechanisms":
        from repro.profiling.bench_mechanisms import main as mechanisms_main

        return mechanisms_main(argv[1:])
    if argv and argv[0] == "pretrain":
        from repro.profiling.bench_pretrain import main as pretrain_main

        return pretrain_main(argv[1:])
    if argv and argv[0] == "paper":
        from repro.profiling.bench_paper import main as paper_main

        return paper_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m repro.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("data", help="the MEDS data path at scale (see python -m repro.bench data --help)")
    sub.add_parser("step", help="EHRMamba vs bare mamba_ssm train step on one GPU (see ... step --help)")
    sub.add_parser("graphs", help="CUDA-graphed training steps against eager ones (... graphs --help)")
    sub.add_parser(
        "share", help="training processes sharing a GPU, by turns and through MPS (... share --help)"
    )
    sub.add_parser(
        "paper", help="the paper's epoch time and largest batch, EHRMamba vs MultiBird (... paper --help)"
    )
    sub.add_parser(
        "pretrain", help="one backbone's pretraining under variants, side by side (... pretrain --help)"
    )
    sub.add_parser(
        "mechanisms",
        help="each pretrained backbone finetuned on one planted mechanism (... mechanisms --help)",
    )
    p = sub.add_parser("zoo", help="train every backbone a few hundred steps and print its losses")
    p.add_argument("--params", default="params/default.yaml")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--task", default="mortality_1m")
    p.add_argument("--every", type=int, default=50, help="loss window (steps)")
    p.add_argument("--n-subjects", type=int, default=None, help="override data.n_subjects")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    q = sub.add_parser("learn", help="our EHRMamba against the reference Mamba: validation CLM loss per step")
    q.add_argument("--params", default="params/default.yaml")
    q.add_argument("--steps", type=int, default=1500)
    q.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    q.add_argument("--every", type=int, default=100, help="validate every this many steps")
    q.add_argument("--n-subjects", type=int, default=None, help="override data.n_subjects")
    q.add_argument("--out", default=None, help="also write the numbers as JSON here")
    q.add_argument(
        "--arms", nargs="+", default=["ours", "reference"], help="add ablations: untied tokens-only"
    )
    args = parser.parse_args(argv)
    if args.command == "learn":
        from repro.profiling.bench_learn import learn

        return learn(
            args.params, args.steps, args.seeds, args.every, args.n_subjects, args.out, tuple(args.arms)
        )
    if args.command == "zoo":
        from repro.profiling.bench_zoo import zoo

        return zoo(args.params, args.steps, args.task, args.every, args.n_subjects, args.out)
    return 2


if __name__ == "__main__":
    sys.exit(main())
