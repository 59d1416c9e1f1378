"""Count baseline: logistic regression on bag-of-token counts, the paper's XGBoost/LR family.

It reads the same tokens as the neural models (shared tokenizer and vocabulary) but the whole history
before the prediction time, untruncated: that is how count baselines are built in the literature, and
it is blind to order by construction, which the synthetic cohort's event-order mechanism tests.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler

from repro.data.tokenizer import SPECIALS, Encoded


def count_matrix(items: Sequence[Encoded], vocab_size: int) -> sp.csr_matrix:
    """log1p token counts per sample (specials excluded), plus the last token's age as one column."""
    rows, cols = [], []
    ages = np.zeros(len(items), dtype=np.float64)
    for i, e in enumerate(items):
        ids = e.input_ids[e.input_ids >= len(SPECIALS)]
        rows.append(np.full(len(ids), i))
        cols.append(ids)
        ages[i] = float(e.ages[-1]) if len(e.ages) else 0.0
    r = np.concatenate(rows) if rows else np.empty(0, int)
    c = np.concatenate(cols) if cols else np.empty(0, int)
    counts = sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(items), vocab_size))
    counts.data = np.log1p(counts.data)
    return sp.hstack([counts, sp.csr_matrix(ages[:, None] / 100.0)], format="csr")


class CountLogistic:
    """L2 logistic regression; C picked on the tuning split by AUROC (train-only fit, no leakage)."""

    name = "count_lr"

    def __init__(self, vocab_size: int, grid: Sequence[float] = (0.01, 0.1, 1.0), seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.grid = tuple(grid)
        self.seed = seed
        self.model = None
        self.C: float | None = None

    def _new(self, C: float):
        return make_pipeline(MaxAbsScaler(), LogisticRegression(C=C, max_iter=2000, random_state=self.seed))

    def fit(
        self, train: Sequence[Encoded], y_train: np.ndarray, tune: Sequence[Encoded], y_tune: np.ndarray
    ) -> CountLogistic:
        if len(np.unique(y_train)) < 2:
            raise ValueError("count_lr: the train labels have a single class; the task cannot be fitted")
        x_tr = count_matrix(train, self.vocab_size)
        x_tu = count_matrix(tune, self.vocab_size)
        best = (-np.inf, self.grid[0])
        for C in self.grid:
            m = self._new(C).fit(x_tr, y_train)
            if len(np.unique(y_tune)) < 2:
                break
            auc = roc_auc_score(y_tune, m.predict_proba(x_tu)[:, 1])
            best = max(best, (auc, C))
        self.C = best[1]
        self.model = self._new(self.C).fit(x_tr, y_train)
        return self

    def predict(self, items: Sequence[Encoded]) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("count_lr: fit before predict")
        return self.model.predict_proba(count_matrix(items, self.vocab_size))[:, 1]

    def n_params(self) -> int:
        return self.vocab_size + 2
