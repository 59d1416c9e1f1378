"""Our EHRMamba training step against a bare mamba_ssm ``MambaLMHeadModel`` of the same size, on one GPU.

`python -m repro.bench step` builds both models in one process with
the same d_model, layers, d_state, d_conv, expand and vocabulary, and times the same next-token training
step on the same batch shape (bf16 autocast, AdamW, gradient clipping at 1.0) with
``repro.profiling.timing.time_step``: warm-up steps, then CUDA events. It prints tokens/s of both and the ratio
ours / bare at each length, EHRMamba's tokens/s at the scaling length against the first length (linear
scaling keeps it near 1), and whether EHRMamba trains at the long length with batch 1. Targets of the issue:
ratio >= 0.9 at 2048 and 16384, scaling ratio >= 0.9 at 32768, and 65536 with batch 1 trains.

Our step also runs what the bare model does not have: the CEHR embeddings (time, age, type, visit) and an
unfused residual and norm; the bare model uses mamba_ssm's fused ``mamba_inner_fn`` (when causal_conv1d is
installed) and Triton add+norm. Both rows name the kernel path they ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import sys
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F

from repro.config import write_text_atomic
from repro.profiling import sweep, timing

PROG = "python -m repro.bench step"
OURS = "EHRMamba (ours)"
BARE = "mamba_ssm MambaLMHeadModel"
TARGET = 0.9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; sizes default to the EHRMamba block of ``--params``.

    >>> a = parse_args([])
    >>> a.lengths, a.scaling_length, a.long_length, a.batch, a.vocab
    ([2048, 16384], 32768, 65536, 8, 1024)
    """
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 16384], help="lengths for the ratio")
    p.add_argument("--scaling-length", type=int, default=32768, help="EHRMamba tokens/s here vs lengths[0]")
    p.add_argument(
        "--long-length", type=int, default=65536, help="EHRMamba must train here at batch 1 (0: skip)"
    )
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--params", default="params/default.yaml", help="model_sizes.ehrmamba gives the sizes")
    p.add_argument("--d-model", type=int, default=None)
    p.add_argument("--n-layers", type=int, default=None)
    p.add_argument("--d-state", type=int, default=None)
    p.add_argument("--d-conv", type=int, default=None)
    p.add_argument("--expand", type=int, default=None)
    p.add_argument(
        "--recompute",
        action="store_true",
        help="our mixer keeps only what mamba_inner_fn keeps (model_sizes.ehrmamba.recompute; repro.models.mamba_inner)",
    )
    p.add_argument("--vocab", type=int, default=1024, help="vocabulary size (a multiple of 8)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the rows and ratios as JSON here")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="L",
        help="instead of timing: torch.profiler's top CUDA kernels of both models at length L",
    )
    args = p.parse_args(argv)
    if args.vocab % 8 or args.vocab <= 8:
        p.error(f"--vocab must be a multiple of 8 above 8 (mamba_ssm pads to 8), got {args.vocab}")
    if args.batch < 1 or args.warmup < 1 or args.steps < 1 or min(args.lengths) < 2:
        p.error("--batch, --warmup, --steps must be >= 1 and lengths >= 2")
    return args


def sizes(args: argparse.Namespace) -> dict[str, int]:
    """d_model, n_layers, d_state, d_conv, expand, recompute: flags win over the params file's
    ``model_sizes.ehrmamba``."""
    from repro.config import load_params, resolve
    from repro.models.ehrmamba import EHRMamba

    block: dict[str, Any] = {}
    if args.params:
        block = dict(load_params(resolve(args.params)).model_sizes.get("ehrmamba", {}))
    defaults = inspect.signature(EHRMamba).parameters
    out = {}
    for key in ("d_model", "n_layers", "d_state", "d_conv", "expand"):
        flag = getattr(args, key)
        out[key] = int(flag if flag is not None else block.get(key, defaults[key].default))
    # ours only; the bare model ignores it
    out["recompute"] = bool(args.recompute or block.get("recompute", False))
    return out


def requirements() -> str | None:
    """Why the benchmark cannot run here (one line), or None."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False); run it on the GPU machine"
    try:
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel  # noqa: F401
    except ImportError as exc:
        why = " ".join(str(exc).split())  # one line, whatever the import error says
        return f"needs mamba_ssm with its CUDA kernels (pip install mamba-ssm); importing it failed: {why}"
    from repro.models import ehrmamba

    if ehrmamba.selective_scan_fn is None:
        return "our EHRMamba would run the reference scan: mamba_ssm's selective_scan_fn did not import"
    return None


def bare_model(s: dict[str, int], vocab: int, device: torch.device) -> tuple[torch.nn.Module, str]:
    """mamba_ssm's LM of the same size (RMSNorm, residual in fp32, no MLP, tied head) and its kernel path."""
    from mamba_ssm.models import mixer_seq_simple
    from mamba_ssm.models.config_mamba import MambaConfig
    from mamba_ssm.modules import mamba_simple

    fields = {f.name for f in dataclasses.fields(MambaConfig)}
    fused_norm = getattr(mixer_seq_simple, "rms_norm_fn", None) is not None
    ssm_cfg: dict[str, Any] = {"d_state": s["d_state"], "d_conv": s["d_conv"], "expand": s["expand"]}
    cfg: dict[str, Any] = {
        "d_model": s["d_model"],
        "n_layer": s["n_layers"],
        "vocab_size": vocab,
        "ssm_cfg": ssm_cfg,
        "rms_norm": True,
        "residual_in_fp32": True,
        "fused_add_norm": fused_norm,
        "pad_vocab_size_multiple": 8,
    }
    if "d_intermediate" in fields:  # mamba_ssm >= 2: Mamba-1 mixers and no MLP, like ours
        cfg["d_intermediate"] = 0
        ssm_cfg["layer"] = "Mamba1"
    missing = set(cfg) - fields
    if missing:
        raise RuntimeError(
            f"this mamba_ssm's MambaConfig lacks {sorted(missing)}; cannot build the same model"
        )
    model = mixer_seq_simple.MambaLMHeadModel(MambaConfig(**cfg), device=device)
    mixer = model.backbone.layers[0].mixer
    inner = (
        getattr(mixer, "use_fast_path", False) and getattr(mamba_simple, "causal_conv1d_fn", None) is not None
    )
    path = "mamba_ssm.mamba_inner_fn (fused)" if inner else "mamba_ssm.selective_scan_cuda"
    return model, path + (" + triton add-norm" if fused_norm else "")


def bare_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: torch.device):
    """The same next-token step as ``sweep.pretrain_step``, on token ids only."""
    ids = batch["input_ids"]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def step() -> None:
        with timing.autocast(device):
            logits = model(ids).logits[:, :-1]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    return step


def bare_row(s: dict[str, int], vocab: int, length: int, batch: int, args, device) -> dict[str, Any]:
    """One timed row of the bare mamba_ssm model (OOM recorded like every other row)."""

    def body(row: dict[str, Any]) -> None:
        torch.manual_seed(0)
        model, path = bare_model(s, vocab, device)
        row["params"] = sum(p.numel() for p in model.parameters())
        row["kernel_path"] = path
        step = bare_step(model, sweep.synthetic_batch(vocab, batch, length, device), device)
        sweep.record_timing(row, timing.time_step(step, device, args.warmup, args.steps), path)

    return sweep.guarded(sweep.empty_row(BARE, device, length, batch), body, device)


def our_row(s: dict[str, int], vocab: int, length: int, batch: int, args, device) -> dict[str, Any]:
    """One timed row of our EHRMamba (the reference path on CUDA is refused, as in every sweep)."""
    from repro.models.registry import build_model

    return sweep.measure(
        OURS,
        lambda _length: build_model("ehrmamba", vocab, **s),
        length,
        batch,
        device=device,
        warmup=args.warmup,
        steps=args.steps,
    )


def _model_and_step(which: str, s: dict[str, int], vocab: int, length: int, batch: int, device):
    """(model, step) of ours or the bare model on the benchmark's batch."""
    if which == BARE:
        model, _ = bare_model(s, vocab, device)
        return model, bare_step(model, sweep.synthetic_batch(vocab, batch, length, device), device)
    from repro.models.registry import build_model

    model = build_model("ehrmamba", vocab, **s).to(device)
    return model, sweep.pretrain_step(model, sweep.synthetic_batch(vocab, batch, length, device), device)


def profile(args: argparse.Namespace, device: torch.device | str = "cuda", top: int = 25) -> list[str]:
    """Top CUDA kernels (self time per step) of ours and the bare model at ``args.profile`` tokens.

    Where the ratio falls short, this says which kernels take the difference.
    """
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    device = torch.device(device)
    s, length = sizes(args), args.profile
    out = []
    for which in (OURS, BARE):
        torch.manual_seed(0)
        model, step = _model_and_step(which, s, args.vocab, length, args.batch, device)
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize(device)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                step()
            torch.cuda.synchronize(device)
        events = prof.key_averages()
        key = (
            "self_device_time_total"
            if hasattr(events[0], "self_device_time_total")
            else "self_cuda_time_total"
        )
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # not their ops too
        total_ms = sum(getattr(e, key) for e in kernels) / 1000 / args.steps
        out.append(f"== {which}, L={length}, batch {args.batch}: {total_ms:.1f} ms of CUDA kernels per step")
        out.append(events.table(sort_by=key, row_limit=top, max_name_column_width=70))
        del model, step, prof
        timing.free_memory(device)
    return out


def _tps(rows: pd.DataFrame, model: str, length: int, batch: int) -> tuple[float, str]:
    r = rows[(rows["model"] == model) & (rows["length"] == length) & (rows["batch"] == batch)]
    if r.empty:
        return float("nan"), "not run"
    r = r.iloc[0]
    return (float(r["tokens_per_s"]), "ok") if r["status"] == timing.OK else (float("nan"), r["status"])


def _verdict(value: float, target: float = TARGET) -> str:
    return "n/a" if value != value else ("met" if value >= target else "NOT met")


def summary(
    rows: pd.DataFrame, lengths: list[int], scaling_length: int, long_length: int, batch: int
) -> list[str]:
    """The lines that decide the issue's targets, computed from the rows of this one run.

    >>> rows = pd.DataFrame({"model": [OURS, BARE, OURS], "length": [2048, 2048, 32768], "batch": [8, 8, 8],
    ...                      "tokens_per_s": [9e5, 1e6, 8.6e5], "status": ["ok", "ok", "ok"]})
    >>> for line in summary(rows, [2048], 32768, 0, 8): print(line)
    ours / bare tokens/s at L=2048, batch 8: 0.90 (target >= 0.9: met)
    EHRMamba tokens/s at L=32768 / at L=2048, batch 8: 0.96 (target >= 0.9: met)
    """
    lines = []
    for L in lengths:
        (ours, s1), (bare, s2) = _tps(rows, OURS, L, batch), _tps(rows, BARE, L, batch)
        ratio = ours / bare if bare == bare and bare > 0 else float("nan")
        why = "" if s1 == s2 == "ok" else f" [ours: {s1}; bare: {s2}]"
        lines.append(
            f"ours / bare tokens/s at L={L}, batch {batch}: {ratio:.2f} (target >= {TARGET}: {_verdict(ratio)}){why}"
        )
    if scaling_length:
        (far, s1), (near, s2) = _tps(rows, OURS, scaling_length, batch), _tps(rows, OURS, lengths[0], batch)
        ratio = far / near if near == near and near > 0 else float("nan")
        why = "" if s1 == s2 == "ok" else f" [{scaling_length}: {s1}; {lengths[0]}: {s2}]"
        lines.append(
            f"EHRMamba tokens/s at L={scaling_length} / at L={lengths[0]}, batch {batch}: {ratio:.2f} "
            f"(target >= {TARGET}: {_verdict(ratio)}){why}"
        )
    if long_length:
        r = rows[(rows["model"] == OURS) & (rows["length"] == long_length) & (rows["batch"] == 1)]
        status = r["status"].iloc[0] if len(r) else "not run"
        mem = f", peak {r['peak_mem_gib'].iloc[0]:.1f} GiB" if len(r) and status == timing.OK else ""
        met = "met" if status == timing.OK else "NOT met"
        lines.append(f"EHRMamba at L={long_length}, batch 1: {status}{mem} (target: trains: {met})")
    return lines


def run(args: argparse.Namespace, device: torch.device | str = "cuda") -> pd.DataFrame:
    """Time every row (on the GPU); ours and the bare model alternate at each (length, batch)."""
    device = torch.device(device)
    s = sizes(args)
    plan = [(L, args.batch) for L in args.lengths]
    if args.scaling_length and args.scaling_length not in args.lengths:
        plan.append((args.scaling_length, args.batch))
    if args.long_length:
        plan.append((args.long_length, 1))
    rows = []
    for L, B in plan:
        rows.append(our_row(s, args.vocab, L, B, args, device))
        rows.append(bare_row(s, args.vocab, L, B, args, device))
        print(
            f"  L={L} B={B}: ours {rows[-2]['status']}, bare {rows[-1]['status']}",
            file=sys.stderr,
            flush=True,
        )
    return pd.DataFrame(rows, columns=list(sweep.ROW_COLUMNS))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    problem = requirements()
    if problem:
        print(f"{PROG}: {problem}", file=sys.stderr)
        return 2
    import mamba_ssm

    s = sizes(args)
    print(
        f"{torch.cuda.get_device_name(0)} | torch {torch.__version__} | mamba_ssm {mamba_ssm.__version__} | "
        f"bf16 autocast | sizes {s} | vocab {args.vocab} | warm-up {args.warmup}, timed {args.steps} steps "
        f"(median, CUDA events)",
        flush=True,
    )
    if args.profile:
        print("\n".join(profile(args)))
        return 0
    rows = run(args)
    show = rows[
        [
            "model",
            "kernel_path",
            "length",
            "batch",
            "params",
            "ms_per_step",
            "tokens_per_s",
            "peak_mem_gib",
            "status",
        ]
    ]
    print(show.to_string(index=False, float_format=lambda x: f"{x:,.1f}"))
    lines = summary(rows, args.lengths, args.scaling_length, args.long_length, args.batch)
    print("\n".join(lines))
    if args.json:
        out = {"device": torch.cuda.get_device_name(0), "sizes": s, "vocab": args.vocab, "summary": lines}
        out["rows"] = rows.to_dict(orient="records")
        write_text_atomic(args.json, json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
