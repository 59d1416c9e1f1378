"""A pre-norm transformer on ``F.scaled_dot_product_attention`` (SDPA), causal or bidirectional.

SDPA dispatches to FlashAttention-2 on CUDA when it can (no explicit mask, fp16/bf16), to the
memory-efficient kernel when a mask is needed, and to a fused CPU kernel on CPU; so this is the "flash"
baseline without a flash-attn dependency. Masks, chosen so the flash kernel is used whenever possible:

- causal: ``is_causal=True`` and no mask. With right padding (CONTRACTS.md) a real token's past holds
  only real tokens, so real positions are exact; pad positions see garbage nobody reads.
- bidirectional: a key padding mask, dropped when the batch has no padding.

Positions are rotary (RoPE, Su et al. 2021) rather than a learned table: no parameters, so the parameter
count does not depend on ``max_len``, and lengths up to 65536 (the GPU sweep) need no 65536-row table.
``max_len`` only guards the input length. The pieces here (``Rotary``, ``SelfAttention``, ``MLP``,
``TransformerBlock``) are reused by BigBird and the hybrid.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.models.embeddings import CEHREmbedding, check_heads, check_length, check_sizes, init_normal


class Rotary(nn.Module):
    """RoPE tables in the rotate-half layout (GPT-NeoX / Llama); ``apply_rotary`` uses them."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary positions need an even head_dim, got {head_dim}")
        inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, L: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos, sin tables [L, head_dim] (float32) for positions 0..L-1."""
        freqs = torch.outer(torch.arange(L, device=device, dtype=torch.float32), self.inv_freq.to(device))
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate [B, H, L, hd] queries or keys by position (rotate-half RoPE)."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos.to(x.dtype) + torch.cat([-x2, x1], dim=-1) * sin.to(x.dtype)).to(x.dtype)


def key_padding_mask(attention_mask: Tensor) -> Tensor | None:
    """[B, L] -> bool [B, 1, 1, L] (True = attend), or None when nothing is padded (keeps flash usable).

    Position 0 ([CLS]) stays attendable so an all-pad row cannot turn the softmax into NaN. While a CUDA
    graph is being captured (repro.training.graphs) the mask is always returned: asking whether anything is
    padded would sync with the host, and a replayed step must mask whatever its batch pads.
    """
    keep = attention_mask.bool()
    if not (keep.is_cuda and torch.cuda.is_current_stream_capturing()) and bool(keep.all()):
        return None
    keep = keep.clone()
    keep[:, 0] = True
    return keep[:, None, None, :]


class SelfAttention(nn.Module):
    """Multi-head self-attention through SDPA; optional rotary positions.

    No dropout on the attention probabilities (as GPT-NeoX / Llama): SDPA with ``dropout_p`` leaves the
    fused CPU kernel for the math path and the mask sampling took 40 % of a smoke training step. Dropout
    stays on the residual branches and in the MLP.
    """

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def qkv_heads(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """[B, L, D] -> q, k, v [B, H, L, hd], rotary applied to q and k."""
        B, L, _ = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        return q, k, v

    def merge(self, y: Tensor) -> Tensor:
        """[B, H, L, hd] -> [B, L, D] through the output projection."""
        B, H, L, hd = y.shape
        return self.out_proj(y.transpose(1, 2).reshape(B, L, H * hd))

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        causal: bool = False,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        q, k, v = self.qkv_heads(x, rope)
        return self.merge(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal))


class MLP(nn.Module):
    """``fc2(dropout(gelu(fc1(x))))``."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class TransformerBlock(nn.Module):
    """Pre-norm ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor] | None = None,
        causal: bool = False,
        attn_mask: Tensor | None = None,
    ) -> Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), rope, causal, attn_mask))
        return x + self.dropout(self.mlp(self.norm2(x)))


def init_gpt(module: nn.Module, n_layers: int) -> None:
    """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 n_layers)."""
    init_normal(module)
    if isinstance(module, SelfAttention | MLP):
        out = module.out_proj if isinstance(module, SelfAttention) else module.fc2
        nn.init.normal_(out.weight, std=0.02 / math.sqrt(2 * n_layers))


class Transformer(nn.Module):
    """CEHR embeddings -> ``n_layers`` pre-norm SDPA blocks with rotary positions -> LayerNorm.

    ``causal=True``: a GPT-style decoder pretrained with CLM; ``causal=False``: a BERT-style encoder
    pretrained with MLM. ``kernel_path``: "sdpa-causal", "sdpa" (bidirectional, no padding: flash-eligible)
    or "sdpa-masked" (bidirectional with a key padding mask: memory-efficient kernel on CUDA).
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        causal: bool = True,
        max_len: int = 4096,
        n_types: int = 10,
        max_visits: int = 64,
        time_units: str = "weeks",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_sizes("Transformer", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
        check_heads("Transformer", d_model, n_heads)
        self.d_model, self.max_len, self.causal = d_model, max_len, bool(causal)
        self.pretrain_objective = "clm" if self.causal else "mlm"
        self.kernel_path: str | None = None
        self.embedding = CEHREmbedding(
            vocab_size, d_model, n_types, max_visits, dropout=dropout, time_units=time_units
        )
        self.rotary = Rotary(d_model // n_heads)
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff or 4 * d_model, dropout) for _ in range(n_layers)
        )
        self.norm_f = nn.LayerNorm(d_model)
        self.apply(lambda m: init_gpt(m, n_layers))

    # its CUDA training step is capturable (repro.training.graphs), causal or not: under capture the
    # encoder's key padding mask does not ask the host whether anything is padded
    graph_safe = True

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Batch dict (CONTRACTS.md) -> hidden states [B, L, D]."""
        L = batch["input_ids"].shape[1]
        check_length("Transformer", L, self.max_len)
        x = self.embedding(batch)
        rope = self.rotary(L, x.device)
        mask = None if self.causal else key_padding_mask(batch["attention_mask"])
        self.kernel_path = "sdpa-causal" if self.causal else ("sdpa" if mask is None else "sdpa-masked")
        for layer in self.layers:
            x = layer(x, rope, self.causal, mask)
        return self.norm_f(x)
