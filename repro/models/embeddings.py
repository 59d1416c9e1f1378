"""CEHR embeddings shared by every backbone: concept + time + age + type + visit order + segment.

One embedding module for all models keeps the comparison about the sequence mixer, not the input layer
(DESIGN.md section 7).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

N_SEGMENTS = 3  # 0 outside visits, 1/2 alternating per visit
# What Time2Vec's linear feature reads, as factors on (dt in weeks, age in years). "weeks": as the tokenizer
# gives them. "years": dt in years and age in decades, so that at initialisation (weights from +-0.25) the
# feature stays within a few units; in weeks it reached about +-120 for a long history's last tokens on the
# default cohort (dt's 99th percentile 482 weeks) beside concept embeddings of scale 0.02, all mixed into one
# tanh (docs/measurements.md). The sinusoids read the same values either way.
TIME_UNITS = {"weeks": (1.0, 1.0), "years": (1 / 52.1775, 0.1)}


class Time2Vec(nn.Module):
    """Time2Vec (Kazemi et al. 2019): one linear feature plus ``out_dim - 1`` learned sinusoids.

    The linear feature keeps monotone time information that pure sinusoids alias away; the periodic
    features let the model pick up weekly / yearly rhythms.
    """

    def __init__(self, out_dim: int, linear_scale: float = 1.0) -> None:
        super().__init__()
        if out_dim < 2:
            raise ValueError(f"Time2Vec out_dim must be >= 2, got {out_dim}")
        self.out_dim, self.linear_scale = out_dim, linear_scale
        self.weight = nn.Parameter(torch.empty(out_dim))
        self.bias = nn.Parameter(torch.empty(out_dim))
        bound = 1.0 / math.sqrt(out_dim)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, t: Tensor) -> Tensor:
        """[...] float -> [..., out_dim]; the linear feature reads ``t * linear_scale``."""
        z = t.unsqueeze(-1) * self.weight + self.bias
        linear = z[..., :1]
        if self.linear_scale != 1.0:
            linear = (t * self.linear_scale).unsqueeze(-1) * self.weight[:1] + self.bias[:1]
        return torch.cat([linear, torch.sin(z[..., 1:])], dim=-1)


def sinusoid_table(length: int, dim: int) -> Tensor:
    """[length, dim] sin / cos of position at geometric frequencies (Vaswani et al. 2017), as CEHR-BERT's
    reference ``PositionalEncodingLayer`` builds it; [0, dim] for length 0.

    >>> t = sinusoid_table(4, 6); t.shape, t[0].tolist()
    (torch.Size([4, 6]), [0.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    """
    pos = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table


class CEHREmbedding(nn.Module):
    """``LayerNorm(tanh(Linear([concept | t2v(dt) | t2v(age)])) + type + visit_order + segment [+ position])``.

    ``dt`` is weeks since the sequence's first token; pad positions get ``dt = age = 0`` so their
    (ignored) activations stay small. ``.concept`` is the token embedding an LM head ties to.
    ``time_units`` (``TIME_UNITS``, set per model in ``model_sizes``) is what Time2Vec's linear features read.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        n_types: int,
        max_visits: int,
        time_dim: int = 16,
        dropout: float = 0.0,
        time_units: str = "weeks",
        sinusoid_len: int = 0,
    ) -> None:
        super().__init__()
        if time_units not in TIME_UNITS:
            raise ValueError(
                f"model_sizes.<model>.time_units must be one of {list(TIME_UNITS)}, got {time_units!r}"
            )
        self.max_visits = max_visits
        self.concept = nn.Embedding(vocab_size, d_model, padding_idx=0)
        dt_scale, age_scale = TIME_UNITS[time_units]
        self.time2vec = Time2Vec(time_dim, dt_scale)
        self.age2vec = Time2Vec(time_dim, age_scale)
        # token positions as fixed sinusoids of width time_dim, one more input of the mix (CEHR-BERT's
        # reference feeds its positions this way); none where sinusoid_len is 0 (every backbone but CEHR-BERT
        # with positions="sinusoidal"), so their weights and checkpoints are unchanged
        self.register_buffer("sinusoids", sinusoid_table(sinusoid_len, time_dim), persistent=False)
        self.mix = nn.Linear(d_model + (3 if sinusoid_len else 2) * time_dim, d_model)
        self.type_emb = nn.Embedding(n_types, d_model)
        self.visit_emb = nn.Embedding(max_visits, d_model)
        self.segment_emb = nn.Embedding(N_SEGMENTS, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)

    def token_vectors(self, batch: dict[str, Tensor]) -> Tensor:
        """Concept embeddings [B, L, D], with the numeric-value representations of the tokenizer:

        - soft discretization: ``(1 - mix_w) * E[id] + mix_w * E[mix_id]`` (the neighbouring bin the value
          leans toward, weight 0 to 0.5);
        - xVal: ``E[id] * value`` where ``value_mask`` is 1 (the value's train z-score, clipped to +-5).

        Other tokenizers give ``mix_w = 0`` and ``value_mask = 0`` (or no such keys), where both are the
        identity: the result is exactly ``E[id]``.
        """
        e = self.concept(batch["input_ids"])
        if "mix_w" in batch:
            w = batch["mix_w"].to(e.dtype).unsqueeze(-1)
            e = e + w * (self.concept(batch["mix_ids"]) - e)
        if "value_mask" in batch:
            m = batch["value_mask"].to(e.dtype)
            scale = 1.0 + m * (batch["values"].to(e.dtype) - 1.0)
            e = e * scale.unsqueeze(-1)
        return e

    def forward(self, batch: dict[str, Tensor], positions: Tensor | None = None) -> Tensor:
        """Batch dict (CONTRACTS.md) -> [B, L, D]; ``positions`` ([L, D], a backbone's learned absolute
        positions) join the sum before the LayerNorm, as BERT's do: added after it, at N(0, 0.02) beside the
        normalised unit-scale features, they carried about 2 % of the vector's norm and stayed inert."""
        mask = batch["attention_mask"].to(torch.float32)
        times = batch["times"].to(torch.float32)
        dt = (times - times[:, :1]) * mask
        age = batch["ages"].to(torch.float32) * mask
        parts = [self.token_vectors(batch), self.time2vec(dt), self.age2vec(age)]
        if len(self.sinusoids):
            B, L = mask.shape
            parts.append(self.sinusoids[:L].to(parts[0].dtype).expand(B, L, -1))
        x = torch.cat(parts, dim=-1)
        x = torch.tanh(self.mix(x))
        x = (
            x
            + self.type_emb(batch["type_ids"])
            + self.visit_emb(batch["visit_orders"].clamp(0, self.max_visits - 1))
            + self.segment_emb(batch["segments"])
        )
        if positions is not None:
            x = x + positions
        return self.dropout(self.norm(x))


def check_sizes(owner: str, **sizes: int) -> None:
    """Raise ValueError naming the first size below 1 (every backbone's constructor checks its sizes)."""
    for key, val in sizes.items():
        if val < 1:
            raise ValueError(f"{owner} {key} must be >= 1, got {val}")


def check_heads(owner: str, d_model: int, n_heads: int) -> None:
    """Raise ValueError when attention heads cannot split the width evenly."""
    if d_model % n_heads:
        raise ValueError(f"{owner} d_model={d_model} is not divisible by n_heads={n_heads}")


def check_length(owner: str, length: int, max_len: int) -> None:
    """Raise ValueError for a sequence longer than a length-bound backbone was built for."""
    if length > max_len:
        raise ValueError(f"{owner} got sequence length {length} > max_len={max_len}")


def init_normal(module: nn.Module) -> None:
    """N(0, 0.02) Linear weights with zero biases and N(0, 0.02) embeddings with a zero pad row (BERT / GPT-2)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
