"""BigBird (Zaheer et al. 2020): an encoder whose attention is block-sparse, over the CEHR embeddings.

Block-sparse attention is our own, ~100 lines of PyTorch, not transformers' ``BigBirdModel``. The HF
module would bring a transformers>=5 dependency into the package for one layer, builds its own
word/position/token-type embeddings (ours are CEHR embeddings), redraws the random blocks with numpy on the
CPU at every training step, and rejects lengths that are not a multiple of the block. What is computed is
BigBird's ITC pattern: the sequence is cut into ``nb`` blocks of ``block_size``;

- the first and the last block are global: their queries attend to every key, and every query attends to
  their keys;
- every other query block ``i`` attends to its window ``i-1, i, i+1`` and to ``num_random_blocks``
  random blocks (blocks 1 and nb-2, whose window overlaps a global block, get one random block more, so
  every row has the same ``5 + r`` distinct key blocks).

Keys and values of those blocks are gathered (``[B, H, nb-2, 5 + r, block, hd]``) and attended with
one SDPA call, so memory and time grow linearly in L; no dense L x L mask is ever built. The random
blocks are fixed per layer and head (drawn once from a seeded generator, as the original BigBird code
seeds numpy with the layer index), so evaluation is deterministic. Sequences too short for the pattern
to save anything (``nb < 6 + 2r``, the HF rule) use full attention; ``kernel_path`` says which ran:
"bigbird-block-sparse" or "bigbird-full". Positions are rotary, as in ``transformer.py``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repro.models.embeddings import CEHREmbedding, check_heads, check_length
from repro.models.transformer import MLP, Rotary, SelfAttention, check_sizes, init_gpt, key_padding_mask

N_FIXED = 5  # key blocks every middle query block gets besides the random ones: first, last, i-1, i, i+1


def min_sparse_blocks(num_random_blocks: int) -> int:
    """Fewest blocks for which the sparse pattern is used (HF: seq_len > (5 + 2r) * block_size)."""
    return 6 + 2 * num_random_blocks


def _sample_distinct(g: torch.Generator, n_rows: int, k: int, high: Tensor) -> Tensor:
    """[n_rows, k] distinct integers per row, uniform in [0, high[row]) (needs high >= k)."""
    out = torch.empty(n_rows, 0, dtype=torch.long)
    for j in range(k):
        x = (torch.rand(n_rows, generator=g) * (high - j)).long()
        for col in range(j):  # shift past the already chosen values, smallest first
            x += (x >= out[:, col]).long()
        out = torch.cat([out, x[:, None]], 1).sort(1).values
    return out[:, torch.randperm(k, generator=g)]


def block_pattern(nb: int, n_heads: int, num_random_blocks: int, seed: int) -> Tensor:
    """Key-block indices [n_heads, nb - 2, 5 + r] of the middle query blocks 1..nb-2 (all distinct per row).

    >>> p = block_pattern(10, 1, 2, seed=0)
    >>> p.shape, p[0, 3, :5].tolist()  # query block 4: first, last, window 3-5, then 2 random
    (torch.Size([1, 8, 7]), [0, 9, 3, 4, 5])
    """
    r = num_random_blocks
    if nb < min_sparse_blocks(r):
        raise ValueError(f"block-sparse attention needs >= {min_sparse_blocks(r)} blocks, got {nb}")
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(1, nb - 1).repeat(n_heads)  # query block per row, rows = heads x middle blocks
    lo, hi = (i - 1).clamp(min=1), (i + 1).clamp(max=nb - 2)  # window inside the middle blocks
    n_cand = (nb - 2) - (hi - lo + 1)  # middle blocks outside the window
    rand = _sample_distinct(g, len(i), r + 1, n_cand)
    rand = 1 + rand + (1 + rand >= lo[:, None]).long() * (hi - lo + 1)[:, None]  # skip the window
    left = torch.where(i == 1, rand[:, r], i - 1)  # block 1's left neighbour is global: take a random one
    right = torch.where(i == nb - 2, rand[:, r], i + 1)
    fixed = torch.stack([torch.zeros_like(i), torch.full_like(i, nb - 1), left, i, right], 1)
    return torch.cat([fixed, rand[:, :r]], 1).view(n_heads, nb - 2, N_FIXED + r)


def block_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, keep: Tensor | None, block_size: int, pattern: Tensor
) -> Tensor:
    """BigBird attention of q, k, v [B, H, L, hd] (L = nb * block_size) with key-block ``pattern``.

    ``keep``: bool [B, L], True for keys that may be attended (None: all). Returns [B, H, L, hd].
    """
    B, H, L, hd = q.shape
    bs, nb = block_size, L // block_size
    full_mask = None if keep is None else keep[:, None, None, :]
    # global query blocks (first, last) attend to everything
    q_glob = torch.cat([q[:, :, :bs], q[:, :, -bs:]], dim=2)
    out_glob = F.scaled_dot_product_attention(q_glob, k, v, attn_mask=full_mask)
    # middle query blocks attend to their gathered key blocks
    heads = torch.arange(H, device=q.device)[:, None, None]
    n_keys = pattern.shape[-1] * bs
    k_mid = k.reshape(B, H, nb, bs, hd)[:, heads, pattern].reshape(B, H * (nb - 2), n_keys, hd)
    v_mid = v.reshape(B, H, nb, bs, hd)[:, heads, pattern].reshape(B, H * (nb - 2), n_keys, hd)
    q_mid = q[:, :, bs:-bs].reshape(B, H * (nb - 2), bs, hd)
    mid_mask = None
    if keep is not None:
        mid_mask = keep.reshape(B, nb, bs)[:, pattern].reshape(B, H * (nb - 2), 1, n_keys)
    out_mid = F.scaled_dot_product_attention(q_mid, k_mid, v_mid, attn_mask=mid_mask)
    out_mid = out_mid.reshape(B, H, (nb - 2) * bs, hd)  # SDPA on CUDA may return a non-contiguous layout
    return torch.cat([out_glob[:, :, :bs], out_mid, out_glob[:, :, bs:]], dim=2)


class BlockSparseSelfAttention(SelfAttention):
    """``SelfAttention`` (same parameters) whose core is ``block_sparse_attention`` when L allows it."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        block_size: int,
        num_random_blocks: int,
        seed: int,
    ) -> None:
        super().__init__(d_model, n_heads)
        self.block_size, self.num_random_blocks, self.seed = block_size, num_random_blocks, seed
        self._patterns: dict[tuple[int, str], Tensor] = {}

    def pattern(self, nb: int, device: torch.device) -> Tensor:
        key = (nb, str(device))
        if key not in self._patterns:
            self._patterns[key] = block_pattern(nb, self.n_heads, self.num_random_blocks, self.seed).to(
                device
            )
        return self._patterns[key]

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], keep: Tensor | None, sparse: bool) -> Tensor:
        """x [B, L, D] with L a multiple of block_size when ``sparse``; keep bool [B, L] or None."""
        q, k, v = self.qkv_heads(x, rope)
        if sparse:
            nb = x.shape[1] // self.block_size
            y = block_sparse_attention(q, k, v, keep, self.block_size, self.pattern(nb, x.device))
        else:
            mask = None if keep is None else keep[:, None, None, :]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.merge(y)


class BigBirdLayer(nn.Module):
    """Pre-norm ``x + attn(ln(x))``, ``x + mlp(ln(x))`` with block-sparse attention."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        d_ff: int,
        block_size: int,
        num_random_blocks: int,
        seed: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = BlockSparseSelfAttention(d_model, n_heads, block_size, num_random_blocks, seed)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, d_ff, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], keep: Tensor | None, sparse: bool) -> Tensor:
        x = x + self.dropout(self.attn(self.norm1(x), rope, keep, sparse))
        return x + self.dropout(self.mlp(self.norm2(x)))


class BigBird(nn.Module):
    """CEHR embeddings -> ``n_layers`` block-sparse encoder layers (rotary positions) -> LayerNorm.

    Bidirectional, pretrained with MLM; MultiBird is this backbone finetuned with MPF (the lead's
    mapping). Inputs are padded internally to a multiple of ``block_size``.
    """

    causal = False
    pretrain_objective = "mlm"
    # its CUDA training step is capturable (repro.training.graphs): the block patterns are built in the
    # eager warm-up steps of each shape, and under capture the key padding mask skips its host check
    graph_safe = True

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        block_size: int = 16,
        num_random_blocks: int = 2,
        max_len: int = 4096,
        n_types: int = 10,
        max_visits: int = 64,
        time_units: str = "weeks",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_sizes("BigBird", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads)
        check_sizes("BigBird", block_size=block_size, num_random_blocks=num_random_blocks + 1)
        check_heads("BigBird", d_model, n_heads)
        self.d_model, self.max_len = d_model, max_len
        self.block_size, self.num_random_blocks = block_size, num_random_blocks
        self.kernel_path: str | None = None
        self.embedding = CEHREmbedding(
            vocab_size, d_model, n_types, max_visits, dropout=dropout, time_units=time_units
        )
        self.rotary = Rotary(d_model // n_heads)
        self.layers = nn.ModuleList(
            BigBirdLayer(d_model, n_heads, d_ff or 4 * d_model, block_size, num_random_blocks, seed, dropout)
            for seed in range(n_layers)
        )
        self.norm_f = nn.LayerNorm(d_model)
        self.apply(lambda m: init_gpt(m, n_layers))

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Batch dict (CONTRACTS.md) -> hidden states [B, L, D]; pad keys are never attended."""
        L = batch["input_ids"].shape[1]
        check_length("BigBird", L, self.max_len)
        x = self.embedding(batch)
        pad = -L % self.block_size
        mask = batch["attention_mask"]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
            mask = F.pad(mask, (0, pad))
        keep = key_padding_mask(mask)
        keep = None if keep is None else keep[:, 0, 0]
        sparse = (L + pad) // self.block_size >= min_sparse_blocks(self.num_random_blocks)
        self.kernel_path = "bigbird-block-sparse" if sparse else "bigbird-full"
        rope = self.rotary(L + pad, x.device)
        for layer in self.layers:
            x = layer(x, rope, keep, sparse)
        return self.norm_f(x[:, :L])
