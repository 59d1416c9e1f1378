"""Neural backbones sharing the CEHR embeddings and heads; ``build_model`` by name, ``match_params`` to size.

EHRMamba and Mamba2 (state space), CEHR-BERT, BigBird and an SDPA transformer (attention), a Mamba /
attention hybrid, and a bidirectional LSTM (DESIGN.md section 7).
"""

from __future__ import annotations

from repro.models.attention import CEHRBert
from repro.models.bigbird import BigBird, block_pattern, block_sparse_attention
from repro.models.ehrmamba import EHRMamba, MambaMixer, selective_scan_ref_chunked
from repro.models.embeddings import CEHREmbedding, Time2Vec
from repro.models.heads import ClassificationHead, EHRModel, LMHead, pool
from repro.models.hybrid import Hybrid
from repro.models.lstm import BiLSTM
from repro.models.mamba2 import EHRMamba2, Mamba2Mixer, ssd_chunked_ref
from repro.models.registry import MODEL_NAMES, build_model, count_params, describe, match_params
from repro.models.transformer import Transformer

__all__ = [
    "MODEL_NAMES",
    "BiLSTM",
    "BigBird",
    "CEHRBert",
    "CEHREmbedding",
    "ClassificationHead",
    "EHRMamba",
    "EHRMamba2",
    "EHRModel",
    "Hybrid",
    "LMHead",
    "Mamba2Mixer",
    "MambaMixer",
    "Time2Vec",
    "Transformer",
    "block_pattern",
    "block_sparse_attention",
    "build_model",
    "count_params",
    "describe",
    "match_params",
    "pool",
    "selective_scan_ref_chunked",
    "ssd_chunked_ref",
]
