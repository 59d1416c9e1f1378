"""Neural backbones sharing the CEHR embeddings and heads; ``build_model`` by name, ``match_params`` to size.

EHRMamba and Mamba2 (state space), CEHR-BERT, BigBird and an SDPA transformer (attention), a Mamba /
attention hybrid, and a bidirectional LSTM (DESIGN.md section 7).
"""

from __future__ import annotations

import os

# mamba_ssm's Triton kernels (Mamba2's SSD, the fused add-norm) are autotuned per process: without a disk
# cache each training worker of a run benchmarks every config again (a Mamba2 pretraining took ~150 s on
# an H200, the others ~10 s). Triton >= 3.2 reads this when the kernels are defined, i.e. when any
# mamba_ssm module is first imported, which happens below. Not yet measured on a GPU.
os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")

from repro.models.attention import CEHRBert  # noqa: E402
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
