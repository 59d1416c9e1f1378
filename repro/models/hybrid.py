"""A Mamba / self-attention hybrid after HyMaTE (Mottalib et al. 2025), causal, over the CEHR embeddings.

HyMaTE encodes the sequence with Mamba blocks and then applies self-attention to their output. Here the
two alternate: every ``attn_every``-th layer is a pre-norm causal SDPA transformer block (attention +
MLP), the others are EHRMamba's Mamba blocks, so the model stays causal and can be pretrained with CLM
like EHRMamba. The attention layers carry no positional encoding: the Mamba layers before them already
encode order (as in Jamba). ``kernel_path`` joins the two paths, e.g. "reference-chunked+sdpa-causal".
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn

from repro.models.ehrmamba import MambaBlock, MambaMixer, rescale_out_proj
from repro.models.embeddings import CEHREmbedding, check_heads
from repro.models.transformer import TransformerBlock, check_sizes, init_gpt


def _init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 init for attention / MLP / embeddings; Mamba mixers keep mamba_ssm's dt and A init."""
    if isinstance(module, MambaMixer):
        rescale_out_proj(module, n_layers)
    elif isinstance(module, TransformerBlock | CEHREmbedding):
        module.apply(lambda m: init_gpt(m, n_layers))


class Hybrid(nn.Module):
    """CEHR embeddings -> Mamba blocks with a causal attention block every ``attn_every`` layers -> RMSNorm."""

    causal = True
    pretrain_objective = "clm"

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        attn_every: int = 2,
        n_heads: int = 4,
        d_ff: int | None = None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        n_types: int = 10,
        max_visits: int = 64,
        time_units: str = "weeks",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_sizes(
            "Hybrid", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, attn_every=attn_every
        )
        check_heads("Hybrid", d_model, n_heads)
        if not 2 <= attn_every <= n_layers:
            raise ValueError(
                f"Hybrid needs 2 <= attn_every <= n_layers (a Mamba and an attention layer), got "
                f"attn_every={attn_every}, n_layers={n_layers}"
            )
        self.d_model = d_model
        self.embedding = CEHREmbedding(
            vocab_size, d_model, n_types, max_visits, dropout=dropout, time_units=time_units
        )
        self.is_attention = [(i + 1) % attn_every == 0 for i in range(n_layers)]
        self.layers = nn.ModuleList(
            TransformerBlock(d_model, n_heads, d_ff or 4 * d_model, dropout)
            if attn
            else MambaBlock(d_model, dropout=dropout, d_state=d_state, d_conv=d_conv, expand=expand)
            for attn in self.is_attention
        )
        self.norm_f = nn.RMSNorm(d_model, eps=1e-5)
        for module in self.modules():
            _init_weights(module, n_layers)

    @property
    def kernel_path(self) -> str | None:
        """Mamba scan + attention kernel of the last forward (None before the first)."""
        mamba = self.layers[0].mixer.kernel_path  # layer 0 is always a Mamba block
        return None if mamba is None else f"{mamba}+sdpa-causal"

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Batch dict (CONTRACTS.md) -> hidden states [B, L, D]; right padding keeps it exact for real tokens."""
        x = self.embedding(batch)
        for layer, attn in zip(self.layers, self.is_attention, strict=True):
            x = layer(x, causal=True) if attn else layer(x)
        return self.norm_f(x)
