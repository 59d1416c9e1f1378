"""Neural backbones (EHRMamba, CEHR-BERT), shared CEHR embeddings and heads; ``build_model`` by name."""

from __future__ import annotations

from repro.models.attention import CEHRBert
from repro.models.ehrmamba import EHRMamba, MambaMixer, selective_scan_ref_chunked
from repro.models.embeddings import CEHREmbedding, Time2Vec
from repro.models.heads import ClassificationHead, EHRModel, LMHead, pool
from repro.models.registry import MODEL_NAMES, build_model, count_params

__all__ = [
    "MODEL_NAMES",
    "CEHRBert",
    "CEHREmbedding",
    "ClassificationHead",
    "EHRMamba",
    "EHRModel",
    "LMHead",
    "MambaMixer",
    "Time2Vec",
    "build_model",
    "count_params",
    "pool",
    "selective_scan_ref_chunked",
]
