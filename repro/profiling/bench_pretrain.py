"""`python -m repro.bench pretrain --model cehr_bert --variant base --variant lr2:train.per_model.cehr_bert.lr=0.002`:
one backbone's pretraining under variants of a params file, side by side, validation curves printed.

Why: whether a learning rate, a dropout or an input change shortens a model's MLM plateau (issue 20:
CEHR-BERT ran all 32 epochs of the default run still improving) is a question about its validation curve at
the run's own size and budget. The variants train as parallel processes, through MPS on a GPU as `repro run`
trains, so one node call compares them under one load; each in its own work folder, so none resumes
another's weights. Each variant is ``name`` or ``name:key=value,key=value`` with dotted params keys (the
values read as YAML): ``nodrop:model_sizes.cehr_bert.dropout=0``.
"""

from __future__ import annotations

import argparse
import json
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import yaml

from repro.config import write_text_atomic


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name[:key=value,...]`` -> (name, {dotted key: YAML value}).

    >>> parse_variant("lr2:train.per_model.cehr_bert.lr=0.002,model_sizes.cehr_bert.dropout=0")
    ('lr2', {'train.per_model.cehr_bert.lr': 0.002, 'model_sizes.cehr_bert.dropout': 0})
    """
    name, _, rest = text.partition(":")
    if not name:
        raise ValueError(f"--variant {text!r}: no name before ':'")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--variant {text!r}: {item!r} is not key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return name, overrides


def _pretrain(params_file: str, model: str, seed: int, overrides: dict[str, Any], work: str) -> dict:
    """One variant's pretraining (in its own process): the validation history and how it ended."""
    from repro.config import load_params
    from repro.training.prepare import prepare
    from repro.training.trainer import Trainer

    params = load_params(params_file, overrides)
    trainer = Trainer(prepare(params, progress=False), work, progress=False)
    _, res = trainer.pretrained(model, seed)
    if res is None:
        raise ValueError(f"{model} has no pretraining objective (or a budget of 0 steps)")
    return {
        "kwargs": {k: repr(v) for k, v in trainer.build_kwargs(model).items()},
        "val": res.val,
        "best_step": res.best_step,
        "budget": res.budget,
        "steps": len(res.losses),
        "epochs": res.epochs,
        "status": res.status,
        "seconds": res.seconds,
    }


def compare(
    params_file: str, model: str, seed: int, variants: list[str], work: str, out: str | None
) -> dict[str, dict]:
    """Pretrain ``model`` under each variant in parallel processes; print and return their curves."""
    from repro.config import load_params
    from repro.models.registry import backbone_kwargs
    from repro.training import mps
    from repro.training.prepare import prepare

    parsed = dict(parse_variant(v) for v in variants)
    if len(parsed) != len(variants):
        raise ValueError("--variant names must differ")
    params = load_params(params_file)
    for name, ov in parsed.items():  # fail before any training on a bad key or value
        variant = load_params(params_file, ov)
        own = variant.train.per_model.get(model, {})
        shadowed = [k for k in ov if k.startswith("train.") and k.removeprefix("train.") in own]
        if shadowed:
            leaf = shadowed[0].removeprefix("train.")
            raise ValueError(
                f"--variant {name}: {shadowed[0]} does not reach {model}, whose train.per_model.{model}.{leaf} "
                f"sets it; override train.per_model.{model}.{leaf} instead"
            )
        sizes = variant.model_sizes.get(model, {})
        bad = sorted(set(sizes) - set(backbone_kwargs(model)))
        if bad:
            raise ValueError(
                f"--variant {name}: model_sizes.{model} has keys {bad} that {model} does not take; "
                f"it takes {list(backbone_kwargs(model))}"
            )
    t0 = time.perf_counter()
    prepare(params)  # once, cached: the processes memory-map it
    print(f"data prepared in {time.perf_counter() - t0:.0f} s", flush=True)
    results: dict[str, dict] = {}
    with mps.service("auto", params.device, len(parsed)) as how:
        print(f"{len(parsed)} processes, MPS {how}", flush=True)
        with ProcessPoolExecutor(len(parsed), mp_context=get_context("spawn")) as pool:
            futures = {
                pool.submit(_pretrain, params_file, model, seed, ov, str(Path(work) / name)): name
                for name, ov in parsed.items()
            }
            for fut in as_completed(futures):  # each variant's curve printed and kept as soon as it ends
                name = futures[fut]
                results[name] = {"overrides": parsed[name], **fut.result()}
                results = {n: results[n] for n in parsed if n in results}  # the order asked for
                print(format_table({name: results[name]}), flush=True)
                if out:
                    write_text_atomic(out, json.dumps(results, indent=1))
    print(format_table(results))
    return results


def format_table(results: dict[str, dict]) -> str:
    """One line per variant, then the curves by validation. "kept" is the loss at the step whose weights
    pretraining keeps (the last that beat the best by ``train.min_delta``), "lowest" the lowest seen; the
    two differ by what later steps gained below ``min_delta``.

    >>> r = {"val": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.999}], "best_step": 1, "epochs": 1.0,
    ...      "seconds": 5.0, "status": "budget"}
    >>> print(format_table({"a": r}).splitlines()[1])
    a                  3.000   2.999        1     1.0        5  budget
    """
    lines = [f"{'variant':<16} {'kept':>7} {'lowest':>7} {'at step':>8} {'epochs':>7} {'seconds':>8}  ended"]
    for name, r in results.items():
        lowest = min((v["loss"] for v in r["val"]), default=float("nan"))
        kept = next((v["loss"] for v in r["val"] if v["step"] == r["best_step"]), float("nan"))
        lines.append(
            f"{name:<16} {kept:7.3f} {lowest:7.3f} {r['best_step'] or '-':>8} {r['epochs']:7.1f} "
            f"{r['seconds']:8.0f}  {r['status']}"
        )
    lines.append("validation loss by step:")
    for name, r in results.items():
        lines.append(f"  {name}: " + " ".join(f"{v['step']}:{v['loss']:.3f}" for v in r["val"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m repro.bench pretrain", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--params", default="params/default.yaml")
    parser.add_argument("--model", default="cehr_bert")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant", action="append", required=True, help="name[:key=value,...]; repeat")
    parser.add_argument(
        "--work", default="outputs/.bench-pretrain", help="one work folder per variant under it"
    )
    parser.add_argument("--out", help="also write the curves as JSON here")
    args = parser.parse_args(argv)
    compare(args.params, args.model, args.seed, args.variant, args.work, args.out)
    return 0
