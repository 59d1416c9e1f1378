"""repro: the EHRMamba reproducibility report's package (data, tokenizer, models, training, statistics)."""

__version__ = "0.1.0"
