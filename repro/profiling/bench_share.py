"""Training processes sharing one GPU, by turns and through MPS: is the pool faster than one process?

`python -m repro.bench share --processes 6` starts one training process alone, then ``--processes`` at
once without MPS, then as many through a private MPS daemon (``repro.training.mps``), each eager and with
CUDA-graphed steps. Every process builds the backbone at the params' size, warms up (CUDA start-up and
graph captures outside the timing), waits for a common start time and trains ``--steps`` steps of
next-token pretraining with ``repro.training.loop.fit`` on long-tailed synthetic histories (as `bench
graphs`). It prints the aggregate tokens/s of each configuration (all processes' tokens over the time from
the common start to the last one's end) and its ratio to one eager process alone. `repro run` starts MPS
for its training notebooks (params ``mps``) on the strength of these numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from repro.config import write_text_atomic

PROG = "python -m repro.bench share"


def worker(params_file: str, model: str, steps: int, graphs: bool, start_at: float, out: str) -> None:
    """One training process: warm up, wait for ``start_at``, train, write tokens and times to ``out``."""
    import torch

    from repro.config import load_params
    from repro.data.dataset import SequenceDataset
    from repro.models.registry import build_model
    from repro.profiling.bench_graphs import _histories
    from repro.training.loop import fit
    from repro.training.prepare import sized_kwargs

    params = load_params(params_file)
    items, labels = _histories(4000, 1024, params.tokenizer.max_len, 0)  # lengths as the params cut them
    tp = dataclasses.replace(
        params.train.for_model(model), pretrain_steps=None, cuda_graphs=graphs, per_model={}
    )
    net = build_model(model, 1024, **sized_kwargs(params, model, 1024))
    # causal backbones pretrain; the others (the BiLSTM has no pretraining) train as they finetune
    objective = "clm" if net.causal else "classify"
    data = SequenceDataset(items, labels if objective == "classify" else None)
    warm = SequenceDataset(items[:256], labels[:256] if objective == "classify" else None)
    if objective == "classify":
        net.set_n_outputs(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # cpu: only to check the code
    lr = params.train.lr if objective == "clm" else params.train.finetune_lr
    fit(net, warm, tp, objective, 6, lr, 0, device, progress=False)
    early = start_at - time.time()
    time.sleep(max(0.0, early))
    begin = time.time()
    res = fit(net, data, tp, objective, steps, lr, 0, device, progress=False)
    write_text_atomic(
        out, json.dumps({"begin": begin, "end": time.time(), "tokens": res.tokens, "early": early})
    )


def _round(args: argparse.Namespace, n: int, graphs: bool, folder: Path) -> dict:
    """``n`` workers at once; their aggregate tokens/s."""
    start_at = time.time() + args.ready_s
    outs = [folder / f"w{i}-{n}-{int(graphs)}.json" for i in range(n)]
    cmd = [sys.executable, "-m", "repro.profiling.bench_share", "--worker"]
    procs = []
    try:
        for out in outs:
            argv = [args.params, args.model, str(args.steps), str(int(graphs)), str(start_at), str(out)]
            procs.append(subprocess.Popen(cmd + argv))
        codes = [p.wait() for p in procs]
    finally:  # an interrupt or a failed start leaves no worker on the GPU (nor attached to an MPS daemon)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if any(codes):
        raise SystemExit(f"{PROG}: a worker failed (its traceback is above)")
    runs = [json.loads(o.read_text()) for o in outs]
    late = [r for r in runs if r["early"] < 0]
    if late:
        print(
            f"{PROG}: {len(late)} worker(s) were not ready by the common start: raise --ready-s",
            file=sys.stderr,
        )
    span = max(r["end"] for r in runs) - start_at
    return {"tokens": sum(r["tokens"] for r in runs), "seconds": span}


def run(args: argparse.Namespace) -> int:
    import pandas as pd
    import torch

    from repro.training import mps

    if not torch.cuda.is_available():
        print(f"{PROG}: needs a CUDA GPU", file=sys.stderr)
        return 2
    from repro.config import load_params
    from repro.models.registry import build_model
    from repro.training.graphs import graph_safe
    from repro.training.prepare import sized_kwargs

    params = load_params(args.params)
    # a backbone whose step is not capturable trains eagerly either way: its graphed rounds would repeat
    steps = (
        (False, True)
        if graph_safe(build_model(args.model, 1024, **sized_kwargs(params, args.model, 1024)))
        else (False,)
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="repro-share-") as tmp:
        folder = Path(tmp)
        plan = [("alone", 1, g, False) for g in steps]
        plan += [("by turns", args.processes, g, False) for g in steps]
        plan += [("MPS", args.processes, g, True) for g in steps]
        for sharing, n, graphs, through_mps in plan:
            if through_mps:
                with mps.service("required", "cuda", n) as line:
                    got = _round(args, n, graphs, folder)
                sharing = f"MPS ({line})"
            else:
                got = _round(args, n, graphs, folder)
            rows.append(
                {
                    "sharing": sharing,
                    "processes": n,
                    "step": "graphed" if graphs else "eager",
                    "seconds": round(got["seconds"], 1),
                    "tokens/s": round(got["tokens"] / got["seconds"]),
                }
            )
            print(rows[-1], flush=True)
    table = pd.DataFrame(rows)
    table["x one eager alone"] = (table["tokens/s"] / table["tokens/s"].iloc[0]).round(2)
    print(table.to_string(index=False))
    if args.out:
        write_text_atomic(args.out, json.dumps(table.to_dict("records"), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        params_file, model, steps, graphs, start_at, out = argv[1:]
        worker(params_file, model, int(steps), graphs == "1", float(start_at), out)
        return 0
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params/default.yaml", help="sizes, batch and rates from here")
    p.add_argument("--model", default="ehrmamba")
    p.add_argument("--processes", type=int, default=6, help="as train.workers in params/default.yaml")
    p.add_argument("--steps", type=int, default=250, help="timed steps per process")
    p.add_argument("--ready-s", type=float, default=25.0, help="time every worker has to start and warm up")
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    a = p.parse_args(argv)
    if a.processes < 2:
        p.error("--processes must be at least 2")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
