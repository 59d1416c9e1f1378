"""Count baseline: logistic regression on bag-of-token counts, the paper's XGBoost/LR family.

It reads the same tokens as the neural models (shared tokenizer and vocabulary) in the same `max_len`
window before the prediction time, so every model sees the same view (DESIGN.md section 7). It is blind to
order by construction and linear in the counts, which the synthetic cohort's order, trend, timing and
interaction mechanisms test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import MaxAbsScaler, StandardScaler

from repro.data.tokenizer import Encoded
from repro.data.vocab import SPECIALS


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


def tuned_logistic(make, grid: Sequence[float], x_tr, y_tr: np.ndarray, x_tu, y_tu: np.ndarray, who: str):
    """(the fit at the C of ``grid`` with the best tuning AUROC, that C): ``make(C)`` builds an unfitted
    pipeline, fitted on train only (its scaler too); ties go to the larger C; a tuning split with one class
    keeps the first C. The model kept is the grid's own fit: refitting on the same rows would give it again.
    """
    if len(np.unique(y_tr)) < 2:
        raise ValueError(f"{who}: the train labels have a single class; the task cannot be fitted")
    grid = sorted(grid)  # ties go to the larger C whatever order the params list
    best, fitted = (-np.inf, 0), []
    for k, C in enumerate(grid):
        fitted.append(make(C).fit(x_tr, y_tr))
        if len(np.unique(y_tu)) < 2:
            break
        best = max(best, (roc_auc_score(y_tu, fitted[-1].predict_proba(x_tu)[:, 1]), k))
    return fitted[best[1]], grid[best[1]]


def probe(
    x_tr: np.ndarray,
    y_tr: np.ndarray,
    x_tu: np.ndarray,
    y_tu: np.ndarray,
    grid: Sequence[float],
    seed: int = 0,
):
    """A logistic-regression probe on frozen features: standardised on train, C chosen on tuning."""

    def make(C: float):
        return make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))

    return tuned_logistic(make, grid, x_tr, y_tr, x_tu, y_tu, "probe")


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
        return self.fit_counts(
            count_matrix(train, self.vocab_size), y_train, count_matrix(tune, self.vocab_size), y_tune
        )

    def fit_counts(
        self, x_tr: sp.csr_matrix, y_train: np.ndarray, x_tu: sp.csr_matrix, y_tune: np.ndarray
    ) -> CountLogistic:
        """`fit` on count matrices already built (one per split serves every label of a multilabel task).

        The model kept is the grid's fit at the chosen C: refitting it on the same rows would give it again.
        """
        self.model, self.C = tuned_logistic(self._new, self.grid, x_tr, y_train, x_tu, y_tune, "count_lr")
        return self

    def predict(self, items: Sequence[Encoded]) -> np.ndarray:
        return self.predict_counts(count_matrix(items, self.vocab_size))

    def predict_counts(self, x: sp.csr_matrix) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("count_lr: fit before predict")
        return self.model.predict_proba(x)[:, 1]

    def n_params(self) -> int:
        return self.vocab_size + 2
