"""Build a model by name; unknown names or keyword arguments raise (DESIGN.md section 11).

HF's ``MambaConfig(d_model=..., n_layer=...)`` silently ignored misspelled keys and built a different
model; here every key must be a real constructor argument.
"""

from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from repro.models.attention import CEHRBert
from repro.models.ehrmamba import EHRMamba
from repro.models.heads import EHRModel, count_params

__all__ = ["MODEL_NAMES", "backbone_kwargs", "build_model", "count_params"]

MODEL_NAMES = ("ehrmamba", "cehr_bert")
_BACKBONES: dict[str, type[nn.Module]] = {"ehrmamba": EHRMamba, "cehr_bert": CEHRBert}
_HEAD_KWARGS = ("n_out", "cls_dropout")


def backbone_kwargs(name: str) -> tuple[str, ...]:
    """Keyword arguments ``build_model`` accepts for ``name`` (backbone's plus the heads')."""
    if name not in _BACKBONES:
        raise ValueError(f"unknown model name {name!r}; expected one of {MODEL_NAMES}")
    params = inspect.signature(_BACKBONES[name]).parameters
    return tuple(k for k in params if k != "vocab_size") + _HEAD_KWARGS


def build_model(name: str, vocab_size: int, **kwargs: Any) -> EHRModel:
    """Backbone ``name`` wrapped in an ``EHRModel``; ``model.build_args`` rebuilds it from a checkpoint.

    >>> build_model("ehrmamba", 50, d_model=16, n_layers=1).causal
    True
    >>> build_model("ehrmamba", 50, n_layer=12)
    Traceback (most recent call last):
    ValueError: unknown argument 'n_layer' for model 'ehrmamba'; allowed: d_model, n_layers, d_state, \
d_conv, expand, n_types, max_visits, dropout, n_out, cls_dropout
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
