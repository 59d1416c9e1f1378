"""A bidirectional LSTM over the CEHR embeddings: the paper's recurrent baseline, trained from scratch.

Padding never enters either direction's state, so a batch's extra length changes nothing: each layer is
two unidirectional ``nn.LSTM`` runs, the backward one over every row reversed within its own length
(pads stay at the end, after the real tokens). That is what ``pack_padded_sequence`` guarantees, but
packed sequences take PyTorch's per-step CPU path, whose backward zero-fills a full-size gradient per step:
217 ms against 43 ms per forward+backward at the smoke size (2 layers, width 72, 256 tokens, batch 16, 2
CPU cores). On CUDA one packed bidirectional cuDNN call lost too: 61.3 against 7.4 ms per
forward+backward of both layers at 32 x 384 tokens in bf16 on one H100 (2026-12-06; 46.6 against 5.6 ms
at 32 x 256, 147.5 against 19.0 ms at 32 x 1024; outputs equal to 2.4e-4). Parameters are exactly those
of a bidirectional ``nn.LSTM``. The backward direction reads the future, so the model is an encoder
(``causal = False``); its classification input is the masked mean over real tokens (``pool = "mean"``),
since position 0 holds only the forward direction's first step and the backward direction's last. No pretraining objective: like the published LSTM baseline it
is finetuned directly. cuDNN runs it on CUDA ("cudnn-lstm"), PyTorch's native kernel on CPU
("torch-lstm").
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from repro.models.embeddings import CEHREmbedding
from repro.models.transformer import check_sizes


class BiLSTM(nn.Module):
    """CEHR embeddings -> ``n_layers`` bidirectional LSTM layers of d_model/2 per direction -> LayerNorm."""

    causal = False
    pretrain_objective = None
    pool = "mean"

    def __init__(
        self,
        vocab_size: int,
        d_model: int = 64,
        n_layers: int = 2,
        n_types: int = 10,
        max_visits: int = 64,
        time_units: str = "weeks",
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        check_sizes("BiLSTM", vocab_size=vocab_size, d_model=d_model, n_layers=n_layers)
        if d_model % 2:
            raise ValueError(f"BiLSTM d_model must be even (two directions of d_model/2), got {d_model}")
        self.d_model = d_model
        self.kernel_path: str | None = None
        self.embedding = CEHREmbedding(
            vocab_size, d_model, n_types, max_visits, dropout=dropout, time_units=time_units
        )
        h = d_model // 2
        self.forward_lstm = nn.ModuleList(nn.LSTM(d_model, h, batch_first=True) for _ in range(n_layers))
        self.backward_lstm = nn.ModuleList(nn.LSTM(d_model, h, batch_first=True) for _ in range(n_layers))
        self.dropout = nn.Dropout(dropout)
        self.norm_f = nn.LayerNorm(d_model)
        nn.init.normal_(self.embedding.concept.weight, std=0.02)
        with torch.no_grad():
            self.embedding.concept.weight[0].zero_()
        for name, p in [*self.forward_lstm.named_parameters(), *self.backward_lstm.named_parameters()]:
            if ".bias" in name:  # forget-gate bias 1 (Jozefowicz et al. 2015), others 0
                nn.init.zeros_(p)
                with torch.no_grad():
                    p[h : 2 * h].fill_(0.5)  # bias_ih + bias_hh = 1

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """Batch dict (CONTRACTS.md) -> hidden states [B, L, D]; pad positions are zeroed before the norm."""
        x = self.embedding(batch)
        mask = batch["attention_mask"]
        lengths = mask.sum(1, keepdim=True)
        t = torch.arange(x.shape[1], device=x.device)[None]
        order = torch.where(t < lengths, lengths - 1 - t, t)[..., None]  # its own inverse

        def reverse(z: Tensor) -> Tensor:
            return z.gather(1, order.expand_as(z))

        for i, (fwd, bwd) in enumerate(zip(self.forward_lstm, self.backward_lstm, strict=True)):
            if i:
                x = self.dropout(x)
            x = torch.cat([fwd(x)[0], reverse(bwd(reverse(x))[0])], dim=-1)
        use_cudnn = x.is_cuda and torch.backends.cudnn.enabled
        self.kernel_path = "cudnn-lstm" if use_cudnn else "torch-lstm"
        return self.norm_f(self.dropout(x) * mask.unsqueeze(-1).to(x.dtype))
