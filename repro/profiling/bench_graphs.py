"""CUDA-graphed training steps against eager ones, through the training loop itself, on one GPU.

`python -m repro.bench graphs` trains the same backbone from the same weights twice with
``repro.training.loop.fit`` (batches of the params' size grouped by length, bf16, AdamW, clipping), once
eagerly and once with ``train.cuda_graphs`` (``repro.training.graphs``), for its own pretraining objective
(next-token, or masked tokens for the encoders) and for finetuning, on histories with a pattern to learn (``_histories``) whose lengths follow a long-tailed draw
like the default cohort's (mean about 330 tokens, at most ``--max-len``). It prints tokens/s, peak memory
and graphs captured for each, the ratio graphed / eager, and how far apart the two loss curves are (the same steps in bf16 differ by rounding: a
broken capture shows as a curve that departs). Whether `train.cuda_graphs` becomes a default rests on it.
``--capture`` captures a backbone that does not declare its step capturable (Mamba2, the hybrid, the
BiLSTM): the measurement that decides whether it may, since a step that syncs with the host fails to
capture here rather than in a run. It decided CEHR-BERT's and BigBird's (one H100, 2026-12-07: 2.18x and
2.62x tokens/s on MLM, 1.94x and 2.07x finetuning, loss curves within 0.6 %), now declared.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

import numpy as np
import pandas as pd
import torch

from repro.config import write_text_atomic

PROG = "python -m repro.bench graphs"


def _histories(n: int, vocab: int, max_len: int, seed: int) -> tuple[list, np.ndarray]:
    """``n`` histories with something to learn, and a label each.

    Each history draws its codes from one of 128 topics of 8 codes (one code in ten at random), so
    next-token loss falls from ln(vocab) towards ln(8) once a model reads the topic off the context, and
    the label (one of the first 13 topics, about one history in ten) can be learned too: loss curves that
    move make "eager and graphed agree" mean something. Lengths follow a long-tailed draw like the default
    cohort's (mean about 330 tokens, at most ``max_len``).
    """
    from repro.data.tokenizer import Encoded

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.5, 0.8, n).astype(int), 16, max_len)
    codes = rng.integers(16, vocab, (128, 8))
    topics = rng.integers(0, 128, n)
    items = []
    for L, topic in zip(lengths, topics, strict=True):
        ids = rng.choice(codes[topic], L)
        noise = rng.random(L) < 0.1
        ids[noise] = rng.integers(16, vocab, int(noise.sum()))
        ids[0] = 2  # [CLS]
        t = np.sort(rng.uniform(2600, 2700, L)).astype(np.float32)
        items.append(
            Encoded(
                ids,
                rng.integers(0, 8, L),
                np.full(L, 60.0, np.float32),
                t,
                np.ones(L, np.int64),
                np.minimum(np.arange(L) // 40, 30).astype(np.int64),
            )
        )
    return items, (topics < 13).astype(np.float32)


def allow_capture(net: torch.nn.Module) -> bool:
    """Let ``net``'s step be captured for this measurement although its backbone does not declare it (an
    attribute on this instance only); False where the backbone decides by a property of its own.

    >>> from repro.models.registry import build_model
    >>> net = build_model("lstm", 64)
    >>> from repro.training.graphs import graph_safe
    >>> graph_safe(net), allow_capture(net), graph_safe(net), graph_safe(build_model("lstm", 64))
    (False, True, True, False)
    """
    if isinstance(getattr(type(net.backbone), "graph_safe", None), property):
        return False
    net.backbone.graph_safe = True
    return True


def run(
    params_file: str,
    model: str,
    steps: int,
    n: int,
    max_len: int,
    vocab: int,
    out: str | None,
    capture: bool = False,
) -> int:
    from repro.config import load_params
    from repro.data.dataset import SequenceDataset
    from repro.models.registry import build_model, pretrain_objective
    from repro.training.graphs import graph_safe
    from repro.training.loop import fit
    from repro.training.prepare import sized_kwargs

    if not torch.cuda.is_available():
        print(f"{PROG}: needs a CUDA GPU", file=sys.stderr)
        return 2
    params = load_params(params_file)
    kw = sized_kwargs(params, model, vocab)  # the size its runs train at (matched to EHRMamba's count)
    items, labels = _histories(n, vocab, max_len, 0)
    device = torch.device("cuda")
    rows, curves, weights = [], {}, {}
    pre = pretrain_objective(model, kw.get("causal")) or "clm"  # the grid's objective; the LSTM has none
    warm = build_model(model, vocab, **kw)  # CUDA's lazy start-up and first kernel loads, outside the timings
    fit(
        warm,
        SequenceDataset(items[:512]),
        params.train,
        pre,
        20,
        params.train.lr,
        0,
        device,
        progress=False,
    )
    del warm
    tp_model = params.train.for_model(model)
    objectives = ((pre, tp_model.lr), ("classify", tp_model.finetune_lr))
    for objective, lr in objectives:
        data = SequenceDataset(items, labels if objective == "classify" else None)
        for graphs in (False, True):
            tp = dataclasses.replace(
                params.train.for_model(model), pretrain_steps=None, cuda_graphs=graphs, per_model={}
            )
            torch.manual_seed(0)
            net = build_model(model, vocab, **(kw | {"cls_dropout": 0.0}))  # no dropout: same math both ways
            if objective == "classify":
                net.set_n_outputs(1)
            start = {k: v.detach().float().cpu() for k, v in net.state_dict().items()}
            if graphs and not graph_safe(net):
                if capture and allow_capture(net):
                    how = "--capture tries"
                elif capture:
                    how = (
                        "it trains eagerly (its backbone decides by a property: --capture cannot override it)"
                    )
                else:
                    how = "it trains eagerly"
                print(f"{PROG}: {model} does not declare a capturable step; {how}", file=sys.stderr)
            torch.cuda.reset_peak_memory_stats()
            res = fit(net, data, tp, objective, steps, lr, 0, device, progress=False)
            curves[(objective, graphs)] = np.array(res.losses)
            weights[(objective, graphs)] = {k: v.detach().float().cpu() for k, v in net.state_dict().items()}
            weights[(objective, "start")] = start
            rows.append(
                {
                    "objective": objective,
                    "step": "graphed" if graphs else "eager",
                    "steps": res.steps_run,
                    "graphs": res.graphs,
                    "seconds": round(res.seconds, 2),
                    "tokens/s": round(res.tokens / res.seconds),
                    "peak GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2),
                    "reserved GiB": round(torch.cuda.max_memory_reserved() / 2**30, 2),
                    "last-50 loss": round(float(np.mean(res.losses[-50:])), 4),
                }
            )
            del net
            torch.cuda.empty_cache()
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    summary = {}
    for objective, _ in objectives:
        t = table[table["objective"] == objective].set_index("step")
        ratio = t.loc["graphed", "tokens/s"] / t.loc["eager", "tokens/s"]
        mem = t.loc["graphed", "peak GiB"] / max(t.loc["eager", "peak GiB"], 1e-9)
        a, b = curves[(objective, False)], curves[(objective, True)]
        window = 25  # running means: single bf16 steps differ more than the curves do
        sa = np.convolve(a, np.ones(window) / window, "valid")
        sb = np.convolve(b, np.ones(window) / window, "valid")
        apart = float(np.max(np.abs(sa - sb) / np.abs(sa)))
        w0, we, wg = (weights[(objective, k)] for k in ("start", False, True))
        keys = [k for k in w0 if k.startswith("backbone.")]
        moved = max(float((we[k] - w0[k]).abs().max()) for k in keys)
        drift = max(float((wg[k] - we[k]).abs().max()) for k in keys) / max(moved, 1e-12)
        summary[objective] = {
            "tokens/s ratio": ratio,
            "peak memory ratio": mem,
            "curves apart": apart,
            "weights apart / moved": drift,
        }
        print(
            f"{objective}: graphed / eager tokens/s {ratio:.2f}, peak memory {mem:.2f}; loss curves "
            f"(running mean of {window} steps) at most {apart:.1%} apart; final backbone weights apart "
            f"{drift:.1%} of how far eager ones moved"
        )
    if out:
        write_text_atomic(out, json.dumps({"rows": rows, "summary": summary}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--params", default="params/default.yaml", help="sizes, batch and rates from here")
    p.add_argument("--model", default="ehrmamba")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--n", type=int, default=8000, help="histories")
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--out", default=None, help="also write the numbers as JSON here")
    p.add_argument(
        "--capture",
        action="store_true",
        help="capture a backbone that does not declare its step capturable (whether it may is the question)",
    )
    a = p.parse_args(argv)
    return run(a.params, a.model, a.steps, a.n, a.max_len, a.vocab, a.out, a.capture)
