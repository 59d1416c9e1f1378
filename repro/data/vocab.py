"""The vocabulary's fixed part and the units of time: special, interval, task and gap tokens, token types
and kinds (DESIGN.md section 6). Reserved ids come first in every vocabulary, so they never move."""

from __future__ import annotations

import numpy as np

from repro.config import TASK_NAMES

PAD, UNK, CLS, VS, VE, REG, MASK = 0, 1, 2, 3, 4, 5, 6


SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[VS]", "[VE]", "[REG]", "[MASK]"]


INTERVALS = [f"[W_{k}]" for k in range(4)] + [f"[M_{k}]" for k in range(13)] + ["[LT]"]


TASK_TOKENS = [f"[TASK_{t}]" for t in TASK_NAMES]  # MPF prompts, one per task a run may have


RESERVED = SPECIALS + INTERVALS + TASK_TOKENS


GAP_TOKENS = [f"[GAP_{k}]" for k in range(1, 14)]  # fixed13 only: right after RESERVED in the vocabulary


# Token types (CONTRACTS: 0 pad, 1 special, 2 visit, 3 interval, 4 lab, 5 med, 6 proc, 7 dx, 8 other, 9 demo)
T_PAD, T_SPECIAL, T_VISIT, T_INTERVAL, T_LAB, T_MED, T_PROC, T_DX, T_OTHER, T_DEMO = range(10)


N_TOKEN_TYPES = 10


FAMILY_TYPE = {
    "lab": T_LAB,
    "medication": T_MED,
    "procedure": T_PROC,
    "diagnosis": T_DX,
    "demographic": T_DEMO,
}


# Token kinds inside a stored timeline (K_GAP: a fixed13 gap token inside a visit).
K_EVENT, K_INTERVAL, K_VS, K_VE, K_REG, K_GAP = 0, 1, 2, 3, 4, 5


US_PER_MINUTE = 60_000_000


US_PER_HOUR = 60 * US_PER_MINUTE


US_PER_DAY = 86_400_000_000


US_PER_WEEK = 7 * US_PER_DAY


US_PER_YEAR = 365.25 * US_PER_DAY


# Lower edges of the 13 ETHOS gap bins: [5 min, 15 min), [15 min, 1 h), ..., [3 months, 6 months), >= 6 months
# (a month is 30 days). A gap below 5 minutes gives no token.
GAP_EDGES_US = np.array(
    [
        5 * US_PER_MINUTE,
        15 * US_PER_MINUTE,
        US_PER_HOUR,
        2 * US_PER_HOUR,
        6 * US_PER_HOUR,
        12 * US_PER_HOUR,
        US_PER_DAY,
        3 * US_PER_DAY,
        7 * US_PER_DAY,
        14 * US_PER_DAY,
        30 * US_PER_DAY,
        90 * US_PER_DAY,
        180 * US_PER_DAY,
    ],
    dtype=np.int64,
)


def gap_bin(gap_us: np.ndarray) -> np.ndarray:
    """1-based fixed13 gap bin of each gap in microseconds; 0 for a gap under 5 minutes (no token).

    >>> m = 60_000_000
    >>> gap_bin(np.array([5 * m - 1, 5 * m, 15 * m, 180 * 24 * 60 * m - 1, 180 * 24 * 60 * m])).tolist()
    [0, 1, 2, 12, 13]
    """
    return np.searchsorted(GAP_EDGES_US, np.asarray(gap_us, dtype=np.int64), side="right")


def bin_token(k: int) -> str:
    """The shared bin token of an unfused value (1-based bin).

    >>> bin_token(3)
    '[Q3]'
    """
    return f"[Q{k}]"


def interval_token(days: float) -> str:
    """Interval token for a gap in days between a discharge and the next admission.

    >>> [interval_token(d) for d in (0, 6.9, 7, 27.9, 28, 364, 365)]
    ['[W_0]', '[W_0]', '[W_1]', '[W_3]', '[M_0]', '[M_12]', '[LT]']
    """
    if days < 28:
        return f"[W_{int(max(days, 0) // 7)}]"
    if days < 365:
        return f"[M_{int(days // 30)}]"
    return "[LT]"
