"""How often does the whole comparison procedure call a difference that is not there? Null pairs of models
(equal true AUROC, correlated scores, several rows per patient, several training seeds) go through the same
`paired_comparisons` the notebooks use, at the report's thresholds; the share of "supported" verdicts is
the procedure's false-positive rate, reported with a Wilson interval.

Written here because no library simulates this pipeline: the rate belongs to our rules (two-level
bootstrap CI, permutation p, Benjamini-Hochberg, labels), not to any one test.
"""

from __future__ import annotations

import os
from concurrent.futures import Executor, ProcessPoolExecutor
from contextlib import nullcontext
from functools import partial
from multiprocessing import get_context

import numpy as np
import pandas as pd
from scipy.stats import binomtest

# processes for the report's table: at most this many, each with at least this many pairs (a spawned
# process imports pandas and scipy first: about 2 s)
_WORKERS_CAP, _SIMS_PER_WORKER = 16, 25


def null_pair(
    rng: np.random.Generator,
    n_patients: int = 200,
    n_labels: int = 1,
    prevalence: float = 0.2,
    n_seeds: int = 3,
    model_corr: float = 0.6,
    seed_sd: float = 0.5,
    seed_quality_sd: float = 0.0,
) -> pd.DataFrame:
    """Held-out predictions of two models that are equally good by construction.

    Each patient has a latent risk shared by its `n_labels` rows (a multi-label task's rows cluster by
    patient, as the pipeline's one sample per patient and label); both models score each row's risk plus
    noise correlated between the models (`model_corr`) plus per-seed noise (`seed_sd`, training randomness).
    `seed_quality_sd` also lets each training seed weigh the risk by its own factor 1 + q, q ~ N(0, sd): a
    seed that learned more or less of the signal as a whole, which moves that seed's AUROC on every patient
    (as a BigBird seed that did or did not pick up the planted interaction). The models differ only in
    their noise draws, so their true AUROC is equal.
    """
    patient_risk = rng.normal(0, 1, n_patients)
    subjects = np.tile(np.arange(n_patients), n_labels)
    targets = np.repeat([f"l{j}" for j in range(n_labels)] if n_labels > 1 else ["label"], n_patients)
    risk = patient_risk[subjects] + rng.normal(0, 0.5, len(subjects))
    logit = risk + np.log(prevalence / (1 - prevalence))
    y = (rng.random(len(subjects)) < 1 / (1 + np.exp(-logit))).astype(int)
    shared = rng.normal(0, 1, len(subjects))
    frames = []
    for model in ("a", "b"):
        own = model_corr**0.5 * shared + (1 - model_corr) ** 0.5 * rng.normal(0, 1, len(subjects))
        for seed in range(n_seeds):
            quality = 1 + seed_quality_sd * rng.normal() if seed_quality_sd else 1.0
            score = quality * risk + own + seed_sd * rng.normal(0, 1, len(subjects))
            frames.append(
                pd.DataFrame(
                    {
                        "subject_id": subjects,
                        "split": "held_out",
                        "target": targets,
                        "label": y,
                        "score": 1 / (1 + np.exp(-score)),
                        "model": model,
                        "task": "null",
                        "seed": seed,
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)


def _verdicts(
    pairs: list[pd.DataFrame], n_boot: int, n_perm: int, alpha: float, effect: float, ci: float
) -> list[str]:
    """The procedure's verdict on each null pair (a against b), in order."""
    from repro.evaluation.results import paired_comparisons

    return [
        paired_comparisons(p, [("a", "b")], n_boot, ci, alpha=alpha, n_perm=n_perm, effect=effect)[
            "verdict"
        ].iloc[0]
        for p in pairs
    ]


def false_positive_rate(
    n_sims: int,
    n_boot: int,
    n_perm: int,
    alpha: float = 0.05,
    effect: float = 0.02,
    seed: int = 0,
    ci: float = 0.95,
    pool: Executor | None = None,
    **pair_kw: float,
) -> dict[str, float]:
    """Share of null pairs the procedure calls "supported" (a beats b), with its Wilson 95 % interval; also the
    share of any claim ("supported" or "not supported").

    The pairs are drawn here, in order, from one generator; with ``pool`` their verdicts are computed in its
    processes, a slice each, so the result does not depend on how many there are.
    """
    rng = np.random.default_rng(seed)
    pairs = [null_pair(rng, **pair_kw) for _ in range(n_sims)]
    judge = partial(_verdicts, n_boot=n_boot, n_perm=n_perm, alpha=alpha, effect=effect, ci=ci)
    if pool is None:
        verdicts = judge(pairs)
    else:
        step = max(1, -(-n_sims // (4 * _WORKERS_CAP)))
        slices = [pairs[i : i + step] for i in range(0, n_sims, step)]
        verdicts = [v for part in pool.map(judge, slices) for v in part]
    supported = sum(v == "supported" for v in verdicts)
    claims = sum(v in ("supported", "not supported") for v in verdicts)
    interval = binomtest(supported, n_sims).proportion_ci(0.95, method="wilson")
    lo, hi = float(interval.low), float(interval.high)
    return {
        "simulations": n_sims,
        "supported": supported,
        "rate": supported / n_sims,
        "lo": lo,
        "hi": hi,
        "any claim": claims / n_sims,
    }


# the kinds of null pairs the report simulates: (name, null_pair arguments). The third has the default
# run's size (2,000 held-out patients at 10 % prevalence) and seeds whose AUROC spreads with sd about 0.02,
# as BigBird's and CEHR-BERT's did there (0.029-0.042): the case a bootstrap over three seeds understates.
KINDS = (
    ("one label", {"n_labels": 1}),
    ("three labels, clustered", {"n_labels": 3}),
    ("seeds differ in quality", {"n_patients": 2000, "prevalence": 0.1, "seed_quality_sd": 0.25}),
)


def rate_shown(lo: float, hi: float, alpha: float) -> str:
    """Whether a false-positive rate's interval shows it at most ``alpha``: a few simulations cannot.

    >>> rate_shown(0.0, 0.03, 0.05), rate_shown(0.0, 0.23, 0.05), rate_shown(0.08, 0.2, 0.05)
    ('yes', 'not shown: too few simulations', 'no: above it')
    """
    if hi <= alpha:
        return "yes"
    return "no: above it" if lo > alpha else "not shown: too few simulations"


def false_positive_table(n_sims: int, n_resamples: int, alpha: float, effect: float) -> pd.DataFrame:
    """The report's table: `n_sims` null pairs split over KINDS, each through the procedure with
    `n_resamples` bootstrap resamples and permutations; the rate called supported with its interval.

    Why processes: 400 pairs took 79 s in one process on a 2-core CPU and about 50 s on a GPU node, the
    longest part of the verdicts notebook, which runs after every GPU notebook; the node's cores split it.
    """
    shown = f"at most {alpha:g}?"
    if n_sims < len(KINDS):
        return pd.DataFrame(columns=["null pairs", "simulations", "supported (95 % CI)", "any claim", shown])
    workers = min(os.cpu_count() or 1, _WORKERS_CAP, n_sims // _SIMS_PER_WORKER)
    with (
        ProcessPoolExecutor(workers, mp_context=get_context("spawn")) if workers > 1 else nullcontext()
    ) as pool:
        rates = [
            false_positive_rate(
                n_sims // len(KINDS),
                n_resamples,
                n_resamples,
                alpha,
                effect,
                seed=i + 1,
                pool=pool,
                **pair_kw,
            )
            for i, (_, pair_kw) in enumerate(KINDS)
        ]
    rows = [
        {
            "null pairs": kind,
            "simulations": fp["simulations"],
            "supported (95 % CI)": f"{fp['rate']:.3f} [{fp['lo']:.3f}, {fp['hi']:.3f}]",
            "any claim": f"{fp['any claim']:.3f}",
            shown: rate_shown(fp["lo"], fp["hi"], alpha),
        }
        for (kind, _), fp in zip(KINDS, rates, strict=True)
    ]
    return pd.DataFrame(rows)
