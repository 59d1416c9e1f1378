"""Build a model by name; unknown names or keyword arguments raise (DESIGN.md section 11).

HF's ``MambaConfig(d_model=..., n_layer=...)`` silently ignored misspelled keys and built a different
model; here every key must be a real constructor argument, ``describe`` prints the parameter count that
was actually built, and ``match_params`` sizes a model to a parameter budget (the comparison presets
match every neural model to EHRMamba's count within 10 %).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from repro.models.attention import CEHRBert
from repro.models.bigbird import BigBird
from repro.models.ehrmamba import EHRMamba
from repro.models.heads import EHRModel, count_params
from repro.models.hybrid import Hybrid
from repro.models.lstm import BiLSTM
from repro.models.mamba2 import EHRMamba2
from repro.models.transformer import Transformer

__all__ = [
    "MODEL_NAMES",
    "backbone_kwargs",
    "build_model",
    "count_params",
    "describe",
    "match_params",
    "pretrain_objective",
    "pretrains",
]

MODEL_NAMES = ("ehrmamba", "cehr_bert", "bigbird", "transformer", "mamba2", "hybrid", "lstm")
_BACKBONES: dict[str, type[nn.Module]] = {
    "ehrmamba": EHRMamba,
    "cehr_bert": CEHRBert,
    "bigbird": BigBird,
    "transformer": Transformer,
    "mamba2": EHRMamba2,
    "hybrid": Hybrid,
    "lstm": BiLSTM,
}
_HEAD_KWARGS = ("n_out", "cls_dropout", "value_head", "pool")
MAX_D_MODEL = 16384


def backbone_kwargs(name: str) -> tuple[str, ...]:
    """Keyword arguments ``build_model`` accepts for ``name`` (backbone's plus the heads')."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown model name {name!r}; expected one of {MODEL_NAMES}")
    params = inspect.signature(_BACKBONES[name]).parameters
    return tuple(k for k in params if k != "vocab_size") + _HEAD_KWARGS


def pretrain_objective(name: str, causal: bool | None = None) -> str | None:
    """What backbone ``name`` pretrains on ("clm", "mlm", or None for the LSTM), read off its class so the
    training pool can plan stages without building a model; ``causal`` overrides the constructor's default
    where the class takes one (the transformer).

    >>> pretrain_objective("ehrmamba"), pretrain_objective("lstm"), pretrain_objective("transformer", False)
    ('clm', None, 'mlm')
    """
    if name not in _BACKBONES:
        raise ValueError(f"unknown model name {name!r}; expected one of {MODEL_NAMES}")
    cls = _BACKBONES[name]
    if "pretrain_objective" in vars(cls):
        return cls.pretrain_objective
    if causal is None:
        causal = inspect.signature(cls).parameters["causal"].default
    return "clm" if causal else "mlm"


def pretrains(name: str) -> bool:
    """Whether backbone ``name`` has a pretraining objective (all but the LSTM).

    >>> pretrains("ehrmamba"), pretrains("lstm")
    (True, False)
    """
    return pretrain_objective(name) is not None


def build_model(name: str, vocab_size: int, **kwargs: Any) -> EHRModel:
    """Backbone ``name`` wrapped in an ``EHRModel``; ``model.build_args`` rebuilds it from a checkpoint.

    >>> build_model("ehrmamba", 50, d_model=16, n_layers=1).causal
    True
    >>> build_model("ehrmamba", 50, n_layer=12)
    Traceback (most recent call last):
    ValueError: unknown argument 'n_layer' for model 'ehrmamba'; allowed: d_model, n_layers, d_state, \
d_conv, expand, n_types, max_visits, time_units, dropout, recompute, n_out, cls_dropout, value_head, pool
    """
    allowed = backbone_kwargs(name)
    for key in kwargs:
        if key not in allowed:
            raise ValueError(f"unknown argument {key!r} for model {name!r}; allowed: {', '.join(allowed)}")
    head = {k: kwargs[k] for k in _HEAD_KWARGS if k in kwargs}
    backbone = _BACKBONES[name](vocab_size, **{k: v for k, v in kwargs.items() if k not in head})
    model = EHRModel(backbone, vocab_size, **head)
    model.build_args = {"name": name, "vocab_size": vocab_size, **kwargs}
    return model


def describe(model: EHRModel) -> str:
    """One line for logs: "name: N parameters (kernel path)".

    >>> describe(build_model("lstm", 50, d_model=16, n_layers=1))
    'lstm: 4,675 parameters (kernel path chosen on first forward)'
    """
    name = (model.build_args or {}).get("name", type(model.backbone).__name__)
    return f"{name}: {model.n_params():,} parameters ({model.kernel_path or 'kernel path chosen on first forward'})"


def _default(name: str, key: str) -> Any:
    return inspect.signature(_BACKBONES[name]).parameters[key].default


def _nearest_divisor(total: int, want: int, ok=lambda q: True) -> int:
    """The divisor h of ``total`` closest to ``want`` (ties: the larger) with ``ok(total // h)``."""
    cands = [h for h in range(1, total + 1) if total % h == 0 and ok(total // h)]
    if not cands:
        raise ValueError(f"no divisor of {total} fits")
    return min(cands, key=lambda h: (abs(h - want), -h))


def _sized(name: str, d_model: int, kwargs: dict[str, Any]) -> dict[str, Any]:
    """kwargs with ``d_model`` and the head layout that goes with it."""
    out = {**kwargs, "d_model": d_model}
    if "n_heads" in backbone_kwargs(name):  # even head_dim: rotary positions need it
        want = kwargs.get("n_heads", _default(name, "n_heads"))
        out["n_heads"] = _nearest_divisor(d_model, want, ok=lambda hd: hd % 2 == 0)
    if name == "mamba2":  # expand * d_model must split into heads of headdim; prefer multiples of 8
        want = kwargs.get("headdim", _default(name, "headdim"))
        d_inner = kwargs.get("expand", _default(name, "expand")) * d_model
        heads = _nearest_divisor(d_inner, d_inner // want if d_inner >= want else 1, ok=lambda p: p <= want)
        if (d_inner // heads) % 8 and d_inner % 8 == 0:
            heads = _nearest_divisor(d_inner, heads, ok=lambda p: p <= want and p % 8 == 0)
        out["headdim"] = d_inner // heads
    if name == "lstm" and d_model % 2:
        raise ValueError(f"lstm needs an even d_model, got {d_model}")
    return out


def _count(name: str, vocab_size: int, kwargs: dict[str, Any]) -> int:
    with torch.device("meta"):  # shapes only: no memory, no init work
        return build_model(name, vocab_size, **kwargs).n_params()


def _search(name: str, target: int, vocab_size: int, step: int, kwargs: dict[str, Any]) -> tuple[int, int]:
    """(d_model, n_params) of the multiple of ``step`` whose model is nearest ``target`` in size."""

    def count(units: int) -> int:
        return _count(name, vocab_size, _sized(name, units * step, kwargs))

    hi = 1
    while count(hi) < target:
        hi *= 2
        if hi * step > MAX_D_MODEL:
            raise ValueError(f"{name} needs d_model > {MAX_D_MODEL} for {target} parameters")
    lo = hi // 2  # count(lo) < target (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if count(mid) < target else (lo, mid)
    counts = {u: count(u) for u in (hi - 1, hi, hi + 1) if u >= 1}
    best = min(counts, key=lambda u: abs(counts[u] - target))
    return best * step, counts[best]


def match_params(
    name: str, target_params: int, vocab_size: int, *, step: int = 8, tolerance: float = 0.10, **kwargs: Any
) -> dict[str, Any]:
    """Build kwargs for ``name`` whose model has ``target_params`` parameters within ``tolerance``.

    ``d_model`` is searched over multiples of ``step`` (pass e.g. ``step=n_heads * 8`` for GPU-friendly
    head sizes); at small widths, where one step of 8 changes the count by more than the tolerance
    window, the search falls back to steps of 4 and then 2. ``n_layers`` and every other given kwarg are
    kept; ``d_ff`` stays 4 * d_model; the number of attention heads (Mamba2: ``headdim``) becomes the
    divisor nearest to the one asked for. Raises ValueError when nothing comes within tolerance.

    >>> kw = match_params("transformer", 100_000, 100, n_layers=2)
    >>> kw["d_model"], kw["n_heads"], round(build_model("transformer", 100, **kw).n_params() / 1e5, 2)
    (56, 4, 0.92)
    >>> match_params("transformer", 100_000, 100, d_model=64)
    Traceback (most recent call last):
    ValueError: match_params chooses d_model; do not pass it
    """
    for key in ("d_model", "d_ff"):
        if key in kwargs:
            raise ValueError(f"match_params chooses {key}; do not pass it")
    if target_params < 1 or step < 2 or step % 2:
        raise ValueError(f"need target_params >= 1 and an even step >= 2, got {target_params}, {step}")
    backbone_kwargs(name)
    tried = []
    while step >= 2:
        d_model, n = _search(name, target_params, vocab_size, step, kwargs)
        if abs(n - target_params) <= tolerance * target_params:
            return _sized(name, d_model, kwargs)
        tried.append(f"d_model={d_model} gives {n}")
        step = step // 2 if step // 2 % 2 == 0 else 0
    raise ValueError(
        f"no even d_model gives {name} {target_params} parameters within {tolerance:.0%}: {'; '.join(tried)}"
    )
