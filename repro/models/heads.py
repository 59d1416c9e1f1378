"""Heads shared by every backbone (DESIGN.md section 7) and ``EHRModel``, the one object training sees.

A backbone is any module with ``embedding`` (a ``CEHREmbedding``), ``d_model``, ``causal``,
``kernel_path``, ``pretrain_objective`` ("clm", "mlm" or None) and ``forward(batch) -> [B, L, D]``;
optionally ``pool = "mean"`` for masked-mean classification pooling.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn


def count_params(module: nn.Module) -> int:
    """Trainable parameters, shared (tied) tensors counted once."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


class LMHead(nn.Module):
    """Hidden states -> vocabulary logits; ties its weight to the token embedding when given one."""

    def __init__(self, d_model: int, vocab_size: int, tie_to: nn.Embedding | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, vocab_size)
        nn.init.zeros_(self.proj.bias)
        if tie_to is not None:
            if tuple(tie_to.weight.shape) != (vocab_size, d_model):
                raise ValueError(
                    f"cannot tie LM head ({vocab_size}, {d_model}) to embedding {tuple(tie_to.weight.shape)}"
                )
            self.proj.weight = tie_to.weight

    def forward(self, hidden: Tensor) -> Tensor:
        """[B, L, D] -> [B, L, V]."""
        return self.proj(hidden)


POOL_MODES = (None, "mean")


def pool(hidden: Tensor, attention_mask: Tensor, causal: bool, mode: str | None = None) -> Tensor:
    """One vector per sequence: the last real token for causal models, position 0 ([CLS]) for encoders.

    ``mode="mean"`` (a backbone's ``pool`` attribute, e.g. the BiLSTM's) takes the mean over real tokens
    instead. Assumes right padding (CONTRACTS.md).

    >>> h = torch.arange(6.0).view(1, 3, 2)
    >>> pool(h, torch.tensor([[1, 1, 0]]), causal=True).tolist()
    [[2.0, 3.0]]
    >>> pool(h, torch.tensor([[1, 1, 0]]), causal=False).tolist()
    [[0.0, 1.0]]
    >>> pool(h, torch.tensor([[1, 1, 0]]), causal=False, mode="mean").tolist()
    [[1.0, 2.0]]
    """
    if mode == "mean":
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if mode is not None:
        raise ValueError(f"unknown pool mode {mode!r}; expected None or 'mean'")
    if not causal:
        return hidden[:, 0]
    last = (attention_mask.sum(1) - 1).clamp(min=0)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class ClassificationHead(nn.Module):
    """Dropout + linear on the pooled vector -> [B, n_out] logits."""

    def __init__(self, d_model: int, n_out: int = 1, dropout: float = 0.1) -> None:
        super().__init__()
        if n_out < 1:
            raise ValueError(f"ClassificationHead n_out must be >= 1, got {n_out}")
        self.n_out = n_out
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(d_model, n_out)

    def forward(self, pooled: Tensor) -> Tensor:
        return self.proj(self.dropout(pooled))


class EHRModel(nn.Module):
    """Backbone + tied LM head + classification head.

    ``forward(batch, head)`` dispatches to ``classify`` / ``lm_logits`` / ``hidden`` so DDP, which only
    wraps ``forward``, can train either objective.
    """

    HEADS = ("cls", "lm", "lm+value", "hidden")

    def __init__(
        self,
        backbone: nn.Module,
        vocab_size: int,
        n_out: int = 1,
        cls_dropout: float = 0.1,
        value_head: bool = False,
        pool: str | None = None,
    ) -> None:
        super().__init__()
        if pool not in POOL_MODES:
            raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
        concept = backbone.embedding.concept
        if concept.num_embeddings != vocab_size:
            raise ValueError(f"backbone vocabulary is {concept.num_embeddings}, EHRModel got {vocab_size}")
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.cls_dropout = cls_dropout
        self.lm_head = LMHead(backbone.d_model, vocab_size, tie_to=concept)
        self.cls_head = ClassificationHead(backbone.d_model, n_out, cls_dropout)
        # xVal's numeric head: the value (train z-score) of the next (CLM) or masked (MLM) numeric token
        self.value_head = nn.Linear(backbone.d_model, 1) if value_head else None
        self.pool = pool  # None: the backbone's own pooling (its `pool` attribute, else last token / [CLS])
        self.build_args: dict | None = None  # set by registry.build_model; checkpoints carry it

    @property
    def causal(self) -> bool:
        return bool(self.backbone.causal)

    @property
    def pool_mode(self) -> str | None:
        """The classification pooling: the model's ``pool`` argument, else the backbone's ``pool`` attribute;
        None is the last token (causal) or [CLS] (encoders), "mean" the mean over real tokens."""
        return self.pool or getattr(self.backbone, "pool", None)

    @property
    def pretrain_objective(self) -> str | None:
        """The backbone's pretraining objective: "clm", "mlm", or None when trained from scratch (BiLSTM)."""
        return self.backbone.pretrain_objective

    @property
    def kernel_path(self) -> str | None:
        """Sequence-mixing kernel the last forward used (recorded per run, DESIGN.md section 9)."""
        return self.backbone.kernel_path

    @property
    def n_outputs(self) -> int:
        return self.cls_head.n_out

    def set_n_outputs(self, n: int) -> None:
        """Replace the classification head with a fresh one of ``n`` outputs (finetuning after pretraining)."""
        old = self.cls_head.proj.weight
        self.cls_head = ClassificationHead(self.backbone.d_model, n, self.cls_dropout).to(
            old.device, old.dtype
        )
        if self.build_args is not None:
            self.build_args["n_out"] = n

    def n_params(self) -> int:
        """Trainable parameters, tied weights counted once."""
        return count_params(self)

    def hidden(self, batch: Mapping[str, Tensor]) -> Tensor:
        return self.backbone(batch)

    def lm_logits(self, batch: Mapping[str, Tensor]) -> Tensor:
        """[B, L, V] logits for CLM (causal backbones) or MLM (encoders)."""
        return self.lm_head(self.backbone(batch))

    def lm_and_values(self, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
        """[B, L, V] token logits and [B, L] predicted values (xVal), from one backbone pass."""
        if self.value_head is None:
            raise ValueError("this model was built without value_head (only the xval tokenizer needs it)")
        hidden = self.backbone(batch)
        return self.lm_head(hidden), self.value_head(hidden).squeeze(-1)

    def classify(self, batch: Mapping[str, Tensor]) -> Tensor:
        """[B, n_out] logits from the pooled hidden state."""
        hidden = self.backbone(batch)
        return self.cls_head(pool(hidden, batch["attention_mask"], self.causal, self.pool_mode))

    def forward(self, batch: Mapping[str, Tensor], head: str = "cls") -> Tensor:
        if head == "cls":
            return self.classify(batch)
        if head == "lm":
            return self.lm_logits(batch)
        if head == "lm+value":
            return self.lm_and_values(batch)
        if head == "hidden":
            return self.hidden(batch)
        raise ValueError(f"unknown head {head!r}; expected one of {self.HEADS}")
