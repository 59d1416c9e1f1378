"""A synthetic MIMIC-IV-like MEDS cohort whose true risk is known.

Why: the report must run without credentialed data, and a planted truth lets it say which model
captured which mechanism and how far each is from the ceiling (the oracle AUROC). Results on this
cohort say nothing about MIMIC-IV itself.

Each subject is generated from its own RNG stream (seed, subject index), so any subset or shard is
reproducible on its own. Codes follow the MIMIC_IV_MEDS ETL vocabulary (DESIGN.md section 3).

Planted mechanisms, all acting on the risk at the subject's LAST admission (DESIGN.md section 4):

| mechanism | how it shows in the data | capability it rewards |
|---|---|---|
| chronic heart failure (25 %) | furosemide given in the FIRST admission only, many admissions back | long-range memory |
| creatinine drift | creatinine rising across the first 24 h of the last stay | order and value |
| treated hyperkalaemia | insulin after a high potassium lowers risk; insulin before it does not | event order |
| recent admissions | admissions in the 365 days before the last one | counts / recency |
| age | MEDS_BIRTH | nobody misses it |
| distractors | noise medications, procedures and stable labs with no effect | ignoring noise |

The number of admissions is drawn before any outcome, and deaths happen only at or after the last
admission, so selecting "the last admission" does not depend on the outcome. The last stay's length
depends on risk features but not on the outcome itself. Outcomes are Bernoulli draws from the planted
probabilities, so the oracle AUROC is high but below 1.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

GENERATOR_VERSION = 3  # bump when the generated data change, so cached cohorts are not reused
US_PER_HOUR = 3_600_000_000
US_PER_DAY = 24 * US_PER_HOUR
EPOCH_2130_US = int(np.datetime64("2130-01-01T00:00:00", "us").astype(np.int64))

LABS = {  # code: (normal mean, sd) -- itemids and units as MIMIC-IV hosp/labevents
    "creatinine": ("LAB//50912//mg/dL", 1.0, 0.25),
    "potassium": ("LAB//50971//mEq/L", 4.2, 0.4),
    "sodium": ("LAB//50983//mEq/L", 139.0, 3.0),
    "glucose": ("LAB//50931//mg/dL", 115.0, 25.0),
    "hemoglobin": ("LAB//51222//g/dL", 11.5, 1.6),
    "wbc": ("LAB//51301//K/uL", 8.5, 2.5),
    "platelets": ("LAB//51265//K/uL", 230.0, 60.0),
    "bicarbonate": ("LAB//50882//mEq/L", 25.0, 2.5),
}
# Reference ranges written to metadata/codes.parquet (ref_range_lower / ref_range_upper, as MIMIC-IV
# labevents names them) for the clinically anchored bins: the normal distribution's mean +- 2 sd.
REFERENCE_RANGES = {code: (round(m - 2 * sd, 2), round(m + 2 * sd, 2)) for code, m, sd in LABS.values()}
FUROSEMIDE = "MEDICATION//Furosemide//Administered//63323028002"
HEMOGLOBIN_DROP_ANEMIC = 3.0  # g/dL lower in an admission with anaemia (a readmission signal)
INSULIN = "MEDICATION//Insulin (Regular)//Administered//00002821501"
NOISE_MEDS = [
    "MEDICATION//Acetaminophen//Administered//00904198861",
    "MEDICATION//Heparin//Administered//63323026201",
    "MEDICATION//Pantoprazole//Administered//00008092355",
    "MEDICATION//Ondansetron//Administered//00409475503",
    "MEDICATION//Docusate Sodium//Administered//00904224461",
    "MEDICATION//Senna//Administered//00536355101",
    "MEDICATION//Metoprolol Tartrate//Administered//51079025520",
    "MEDICATION//Magnesium Sulfate//Administered//00409672903",
]
NOISE_PROCS = [
    "PROCEDURE//START//225792",  # invasive ventilation
    "PROCEDURE//START//224275",  # line insertion
    "PROCEDURE//START//225459",  # chest x-ray
    "PROCEDURE//START//229351",  # PICC line
    "INFUSION_START//225158",  # NaCl 0.9 %
]
# Chronic conditions (ICD-10 3-character groups): a latent per-subject state, diagnosed at an
# admission's discharge with probability 0.7 when present (0.03 otherwise) and treated during the stay
# by a marker medication with probability 0.6 (0.05 otherwise). Heart failure (I50) is special: its
# marker, furosemide, is given in the FIRST admission only, many admissions before the outcome.
CONDITIONS = [  # (group, full code, prevalence, marker drug)
    ("I50", "I509", 0.25, "Furosemide"),
    ("E11", "E119", 0.22, "Metformin"),
    ("I10", "I10", 0.35, "Amlodipine"),
    ("E78", "E785", 0.30, "Atorvastatin"),
    ("K21", "K219", 0.18, "Omeprazole"),
    ("F32", "F329", 0.15, "Sertraline"),
    ("J44", "J449", 0.12, "Tiotropium"),
    ("N39", "N390", 0.08, "Nitrofurantoin"),
    ("D64", "D649", 0.14, "Ferrous Sulfate"),
    ("E03", "E039", 0.10, "Levothyroxine"),
    ("I48", "I4891", 0.12, "Apixaban"),
    ("N18", "N189", 0.10, "Calcitriol"),
    ("I25", "I2510", 0.14, "Clopidogrel"),
    ("G47", "G4733", 0.09, "Melatonin"),
    ("F41", "F419", 0.11, "Buspirone"),
    ("M81", "M810", 0.06, "Alendronate"),
    ("J45", "J45909", 0.07, "Albuterol"),
    ("G89", "G8929", 0.09, "Gabapentin"),
    ("E87", "E871", 0.08, "Sodium Chloride Tab"),
    ("K59", "K5900", 0.10, "Polyethylene Glycol"),
    ("F17", "F17210", 0.13, "Nicotine Patch"),
    ("E66", "E6601", 0.09, "Orlistat"),
    ("M19", "M1990", 0.08, "Meloxicam"),
    ("R53", "R531", 0.05, "Modafinil"),
]
P_DX_PRESENT, P_DX_ABSENT = 0.7, 0.03
P_MARKER_PRESENT, P_MARKER_ABSENT = 0.6, 0.05
ADMISSION_TYPES = [
    "HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM",
    "HOSPITAL_ADMISSION//URGENT//TRANSFER FROM HOSPITAL",
    "HOSPITAL_ADMISSION//ELECTIVE//PHYSICIAN REFERRAL",
    "HOSPITAL_ADMISSION//OBSERVATION ADMIT//EMERGENCY ROOM",
]
DISCHARGE_ALIVE = [
    "HOSPITAL_DISCHARGE//HOME",
    "HOSPITAL_DISCHARGE//HOME HEALTH CARE",
    "HOSPITAL_DISCHARGE//SKILLED NURSING FACILITY",
    "HOSPITAL_DISCHARGE//REHAB",
]
DIED = "HOSPITAL_DISCHARGE//DIED"
STATIC = {
    "GENDER": ["GENDER//F", "GENDER//M"],
    "RACE": [
        "RACE//WHITE",
        "RACE//BLACK/AFRICAN AMERICAN",
        "RACE//HISPANIC/LATINO",
        "RACE//ASIAN",
        "RACE//OTHER",
    ],
    "INSURANCE": ["INSURANCE//Medicare", "INSURANCE//Medicaid", "INSURANCE//Private", "INSURANCE//Other"],
}

# Planted effects on the logit of death at the last admission. b0 is set so that mortality_1m
# prevalence is near 10 % (checked by tests/test_synthetic.py).
B0 = -5.5
EFFECTS = {
    "chronic_hf": 2.0,
    "creatinine_slope_per_day": 3.5,  # times max(slope, 0) in mg/dL per day
    "untreated_hyperkalemia": 2.2,
    "treated_after": -2.2,  # cancels the hyperkalaemia effect when insulin follows the high potassium
    "recent_admissions": 0.45,  # per admission in the 365 days before the last one (capped at 5)
    "age_per_year": 0.04,  # per year above 65
}
IN_HOSPITAL_SHIFT = -0.5  # logit shift for death during the stay vs. within 30 days after


@dataclass
class SubjectTruth:
    """The planted truth for one subject's last admission."""

    subject_id: int
    admit_us: int
    discharge_us: int
    p_in_hospital: float
    p_post_30d: float
    died_in_hospital: bool
    death_us: int | None
    features: dict[str, float]
    p_los_7d: float = float("nan")
    previous_discharge_us: int | None = None
    p_readmit_30d: float = float("nan")
    p_conditions: np.ndarray | None = None


def _sigmoid(x: float) -> float:
    return float(1.0 / (1.0 + np.exp(-x)))


def _subject_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, index]))


MARKERS = [FUROSEMIDE] + [
    f"MEDICATION//{drug}//Administered//{i:011d}"
    for i, (_, _, _, drug) in enumerate(CONDITIONS)
    if drug != "Furosemide"
]


def _normal_cdf(x: float) -> float:
    from math import erf, sqrt

    return 0.5 * (1.0 + erf(x / sqrt(2.0)))


def generate_subject(seed: int, index: int) -> tuple[dict[str, np.ndarray], SubjectTruth]:
    """Events of one subject (MEDS columns as numpy arrays, time-sorted) and its planted truth."""
    rng = _subject_rng(seed, index)
    sid = 10_000_000 + index
    times: list[int] = []
    codes: list[str] = []
    values: list[float] = []

    def add(t: int | None, code: str, value: float = np.nan) -> None:
        times.append(-1 if t is None else int(t))
        codes.append(code)
        values.append(value)

    def within(admit: int, discharge: int, n: int) -> np.ndarray:
        return np.sort(rng.uniform(admit + US_PER_HOUR / 2, discharge - US_PER_HOUR / 4, n)).astype(np.int64)

    # Static facts (time null) and birth.
    for options in STATIC.values():
        add(None, options[rng.integers(len(options))])
    age_at_first = float(rng.uniform(20, 85))
    first_admit = EPOCH_2130_US + int(rng.uniform(0, 20 * 365) * US_PER_DAY)
    birth = first_admit - int(age_at_first * 365.25 * US_PER_DAY)
    add(birth - birth % US_PER_DAY, meds.birth_code)

    # Latent state, all drawn before any outcome: number of admissions (long-tailed), chronic
    # conditions, frailty (shorter gaps and longer stays).
    n_adm = 1 + min(int(rng.lognormal(mean=0.6, sigma=1.1)), 300)
    conds = rng.random(len(CONDITIONS)) < np.array([c[2] for c in CONDITIONS])
    chronic = bool(conds[0])
    frail = float(rng.normal())
    p_conditions = np.where(conds, P_DX_PRESENT, P_DX_ABSENT)

    truth: SubjectTruth | None = None
    admit = first_admit
    admits: list[int] = []
    prev_discharge: int | None = None
    p_readmit = float("nan")
    for k in range(n_adm):
        last = k == n_adm - 1
        admits.append(admit)
        age = (admit - birth) / (365.25 * US_PER_DAY)
        anemic = bool(rng.random() < 0.2)
        feats: dict[str, float] = {}
        if last:
            slope = float(rng.normal(0.0, 0.35))  # creatinine, mg/dL per day
            hyperk = bool(rng.random() < 0.35)
            insulin = bool(rng.random() < 0.5)
            after = bool(hyperk and insulin and rng.random() < 0.5)
            # Length of stay: 24 h plus a log-normal excess whose mean depends on what is visible at 24 h.
            mu_los = np.log(60.0) + 0.25 * frail + 1.2 * max(slope, 0.0) + 0.5 * (hyperk and not after)
            los_h = 24.0 + float(rng.lognormal(mu_los, 0.9))
            p_los = 1.0 - _normal_cdf((np.log(168.0 - 24.0) - mu_los) / 0.9)
            recent = sum(a >= admit - 365 * US_PER_DAY for a in admits[:-1])
            feats = {
                "chronic_hf": float(chronic),
                "recent_admissions": float(min(recent, 5)),
                "age": age,
                "creatinine_slope": slope,
                "hyperkalemia": float(hyperk),
                "treated_after": float(after),
            }
        else:
            slope, hyperk, insulin, after = 0.0, False, False, False
            los_h = max(6.0, float(rng.lognormal(np.log(80.0) + 0.2 * frail, 0.8)))
        discharge = admit + int(los_h * US_PER_HOUR)
        add(admit, ADMISSION_TYPES[rng.integers(len(ADMISSION_TYPES))])
        add(admit, "TRANSFER_TO//admit//Emergency Department")
        if rng.random() < 0.3:
            add(
                admit + int(rng.uniform(1, 6) * US_PER_HOUR),
                "ICU_ADMISSION//Medical Intensive Care Unit (MICU)",
            )

        # Lab panels every 6-12 h. Creatinine drifts in the last stay; haemoglobin is low when anaemic.
        base_cr = float(rng.normal(1.0, 0.2))
        t = admit + int(rng.uniform(0.5, 2) * US_PER_HOUR)
        while t < discharge - US_PER_HOUR:
            days = (t - admit) / US_PER_DAY
            for name, (code, mean, sd) in LABS.items():
                if name != "creatinine" and rng.random() < 0.35:
                    continue
                if name == "creatinine":
                    v = base_cr + slope * days + rng.normal(0, 0.05)
                elif name == "hemoglobin":
                    v = rng.normal(mean - HEMOGLOBIN_DROP_ANEMIC * anemic, sd * 0.6)
                else:
                    v = rng.normal(mean, sd)
                add(t, code, float(np.round(max(v, 0.05 * mean), 2)))
            t += int(rng.uniform(6, 12) * US_PER_HOUR)

        # Distractor medications and procedures, then the condition markers.
        for tm in within(admit, discharge, rng.poisson(2.0 + los_h / 24.0)):
            add(int(tm), NOISE_MEDS[rng.integers(len(NOISE_MEDS))])
        for tm in within(admit, discharge, rng.poisson(1.0)):
            add(int(tm), NOISE_PROCS[rng.integers(len(NOISE_PROCS))])
        for j, present in enumerate(conds):
            if j == 0:  # heart failure: furosemide in the first admission only (long-range memory)
                if present and k == 0:
                    for tm in within(admit, discharge, 2):
                        add(int(tm), FUROSEMIDE)
                continue
            if rng.random() < (P_MARKER_PRESENT if present else P_MARKER_ABSENT):
                add(int(within(admit, discharge, 1)[0]), MARKERS[j])

        if last:
            # Keep the potassium story inside the first 20 h of the stay, order preserved.
            span_h = min(los_h - 0.5, 20.0)
            if hyperk:
                t_k = admit + int(rng.uniform(0.3, 0.6) * span_h * US_PER_HOUR)
                add(t_k, LABS["potassium"][0], float(np.round(rng.uniform(6.0, 7.2), 2)))
                if insulin:
                    room_h = (
                        (admit + span_h * US_PER_HOUR - t_k) / US_PER_HOUR
                        if after
                        else (t_k - admit) / US_PER_HOUR
                    )
                    dt_h = rng.uniform(0.2, 0.9) * room_h * (1 if after else -1)
                    add(t_k + int(dt_h * US_PER_HOUR), INSULIN)
            elif insulin:
                add(admit + int(rng.uniform(0.1, 1.0) * span_h * US_PER_HOUR), INSULIN)
            logit = (
                B0
                + EFFECTS["chronic_hf"] * feats["chronic_hf"]
                + EFFECTS["creatinine_slope_per_day"] * max(slope, 0.0)
                + EFFECTS["untreated_hyperkalemia"] * feats["hyperkalemia"]
                + EFFECTS["treated_after"] * feats["treated_after"]
                + EFFECTS["recent_admissions"] * feats["recent_admissions"]
                + EFFECTS["age_per_year"] * (age - 65.0)
            )
            p_in = _sigmoid(logit + IN_HOSPITAL_SHIFT)
            p_post = _sigmoid(logit)
            died_in = bool(rng.random() < p_in)
            death_us: int | None = None
            if died_in:
                death_us = discharge
            elif rng.random() < p_post:
                day = discharge + int(rng.uniform(1, 30) * US_PER_DAY)
                death_us = day - day % US_PER_DAY  # out-of-hospital deaths carry a date only
            elif rng.random() < 0.05:
                day = discharge + int(rng.uniform(35, 400) * US_PER_DAY)
                death_us = day - day % US_PER_DAY
            truth = SubjectTruth(
                sid,
                admit,
                discharge,
                p_in,
                p_post,
                died_in,
                death_us,
                feats,
                p_los_7d=p_los,
                previous_discharge_us=prev_discharge,
                p_readmit_30d=p_readmit,
                p_conditions=p_conditions,
            )

        # Stamped at discharge (leakage traps): diagnoses, DRG, disposition.
        dx_draw = rng.random(len(CONDITIONS)) < np.where(conds, P_DX_PRESENT, P_DX_ABSENT)
        for j in np.flatnonzero(dx_draw):
            add(discharge, f"DIAGNOSIS//ICD//10//{CONDITIONS[j][1]}")
        add(discharge, f"DRG//HCFA//{int(rng.integers(100, 999))}//DRG DESCRIPTION")
        if last and truth is not None and truth.died_in_hospital:
            add(discharge, DIED)
            add(discharge, meds.death_code)
        else:
            add(discharge, DISCHARGE_ALIVE[rng.integers(len(DISCHARGE_ALIVE))])
        if not last:
            # Readmission: the gap to the next admission is shorter for frail, heart-failure and anaemic stays.
            mean_gap = 200.0 * np.exp(-0.5 * frail - 0.8 * chronic - 0.9 * anemic)
            p_readmit = 1.0 - float(np.exp(-29.0 / mean_gap))
            prev_discharge = discharge
            admit = discharge + int((1.0 + rng.exponential(mean_gap)) * US_PER_DAY)
    assert truth is not None
    if truth.death_us is not None and not truth.died_in_hospital:
        add(truth.death_us, meds.death_code)

    t_arr = np.array(times, dtype=np.int64)
    static = t_arr < 0
    # MEDS order: static rows first (null time), then by time; stable keeps same-time order as written.
    order = np.lexsort((np.arange(len(t_arr)), np.where(static, np.iinfo(np.int64).min, t_arr)))
    cols = {
        "subject_id": np.full(len(t_arr), sid, dtype=np.int64),
        "time": t_arr[order],
        "code": np.array(codes, dtype=object)[order],
        "numeric_value": np.array(values, dtype=np.float32)[order],
    }
    return cols, truth


def _events_table(parts: list[dict[str, np.ndarray]]) -> pa.Table:
    sid = np.concatenate([p["subject_id"] for p in parts])
    t = np.concatenate([p["time"] for p in parts])
    code = np.concatenate([p["code"] for p in parts])
    val = np.concatenate([p["numeric_value"] for p in parts])
    time_arr = pa.array(t, type=pa.int64()).cast(pa.timestamp("us"))
    time_arr = pc.if_else(pa.array(t < 0), pa.nulls(len(t), pa.timestamp("us")), time_arr)
    return pa.table(
        {
            "subject_id": pa.array(sid, pa.int64()),
            "time": time_arr,
            "code": pa.array(code, pa.string()),
            "numeric_value": pa.array(val, pa.float32(), mask=np.isnan(val)),
        }
    )


def _atomic_write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def assign_splits(n: int, seed: int, fractions: list[float]) -> np.ndarray:
    """Per-subject split names (train / tuning / held_out) from a seeded permutation."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2**31 - 1]))
    perm = rng.permutation(n)
    n_train = int(round(fractions[0] * n))
    n_tune = int(round(fractions[1] * n))
    splits = np.empty(n, dtype=object)
    splits[perm[:n_train]] = meds.train_split
    splits[perm[n_train : n_train + n_tune]] = meds.tuning_split
    splits[perm[n_train + n_tune :]] = meds.held_out_split
    return splits


def _truth_table(truths: list[SubjectTruth]) -> pa.Table:
    """The planted truth of some subjects as a table (one row per subject, in the given order)."""
    return pa.table(
        {
            "subject_id": pa.array([r.subject_id for r in truths], pa.int64()),
            "admit_time": pa.array([r.admit_us for r in truths], pa.int64()).cast(pa.timestamp("us")),
            "discharge_time": pa.array([r.discharge_us for r in truths], pa.int64()).cast(pa.timestamp("us")),
            "p_in_hospital": pa.array([r.p_in_hospital for r in truths], pa.float64()),
            "p_post_30d": pa.array([r.p_post_30d for r in truths], pa.float64()),
            "p_los_7d": pa.array([r.p_los_7d for r in truths], pa.float64()),
            "previous_discharge_time": pa.array([r.previous_discharge_us for r in truths], pa.int64()).cast(
                pa.timestamp("us")
            ),
            "p_readmission_30d": pa.array([r.p_readmit_30d for r in truths], pa.float64()),
            **{
                f"p_condition_{g}": pa.array([float(r.p_conditions[j]) for r in truths], pa.float64())
                for j, (g, _, _, _) in enumerate(CONDITIONS)
            },
            **{
                f"feature_{k}": pa.array([r.features[k] for r in truths], pa.float64())
                for k in truths[0].features
            },
        }
    )


def _write_shard(seed: int, indices: np.ndarray, path: Path) -> tuple[set[str], pa.Table]:
    """Generate and write one shard (atomically); return its codes and its subjects' truth rows.

    A subject's events depend only on (seed, subject index), so shards can be written in any order or
    in parallel processes and the dataset is the same.
    """
    parts, truths, codes = [], [], set()
    for i in indices:
        cols, truth = generate_subject(seed, int(i))
        parts.append(cols)
        truths.append(truth)
        codes.update(cols["code"].tolist())
    table = _events_table(parts)
    meds.DataSchema.validate(table)
    _atomic_write_parquet(table, path)
    return codes, _truth_table(truths)


def write_synthetic_meds(
    out_dir: str | Path,
    n_subjects: int,
    seed: int = 7,
    shard_size: int = 250,
    split_fractions: list[float] | None = None,
    progress: bool = False,
    workers: int = 1,
) -> Path:
    """Write a MEDS v0.4 dataset of `n_subjects` synthetic subjects plus `truth/last_admission.parquet`.

    Shards are `data/{split}/{i}.parquet`; each subject lives in one shard. Shards are generated one at
    a time (in `workers` processes), so memory is bounded by the shard size and a 100M-event dataset
    can be written on a small machine; the output does not depend on `workers`. The directory is built
    in a temporary sibling and renamed into place, so a failure never leaves a half-written dataset.
    """
    from tqdm import tqdm

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another directory")
    fractions = split_fractions or [0.8, 0.1, 0.1]
    splits = assign_splits(n_subjects, seed, fractions)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    try:
        jobs = []
        for split in (meds.train_split, meds.tuning_split, meds.held_out_split):
            idx = np.flatnonzero(splits == split)
            for shard_no, start in enumerate(range(0, len(idx), shard_size)):
                path = tmp_root / meds.data_subdirectory / split / f"{shard_no}.parquet"
                jobs.append((idx[start : start + shard_size], path))
        bar = tqdm(total=n_subjects, desc="synthetic MEDS", unit="subject", disable=not progress)
        all_codes: set[str] = set()
        truth_parts: list[pa.Table] = []
        if workers > 1 and len(jobs) > 1:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_write_shard, seed, chunk, path) for chunk, path in jobs]
                for f, (chunk, _) in zip(futures, jobs):
                    codes, truth = f.result()
                    all_codes |= codes
                    truth_parts.append(truth)
                    bar.update(len(chunk))
        else:
            for chunk, path in jobs:
                codes, truth = _write_shard(seed, chunk, path)
                all_codes |= codes
                truth_parts.append(truth)
                bar.update(len(chunk))
        bar.close()
        split_table = pa.table(
            {
                "subject_id": pa.array(10_000_000 + np.arange(n_subjects), pa.int64()),
                "split": pa.array(splits.tolist(), pa.string()),
            }
        )
        meds.SubjectSplitSchema.validate(split_table)
        _atomic_write_parquet(split_table, tmp_root / meds.subject_splits_filepath)
        codes_sorted = sorted(all_codes)
        ranges = [REFERENCE_RANGES.get(c) for c in codes_sorted]
        code_table = pa.table(
            {
                "code": pa.array(codes_sorted, pa.string()),
                "description": pa.array([None] * len(codes_sorted), pa.string()),
                "parent_codes": pa.array([None] * len(codes_sorted), pa.list_(pa.string())),
                # Extra columns are allowed by CodeMetadataSchema; null for codes without a range.
                "ref_range_lower": pa.array([r and r[0] for r in ranges], pa.float64()),
                "ref_range_upper": pa.array([r and r[1] for r in ranges], pa.float64()),
            }
        )
        meds.CodeMetadataSchema.validate(code_table)
        _atomic_write_parquet(code_table, tmp_root / meds.code_metadata_filepath)
        meta = {
            "dataset_name": "repro-synthetic-mimic-iv-like",
            "dataset_version": f"seed{seed}-n{n_subjects}",
            "etl_name": "repro.data.synthetic",
            "etl_version": str(GENERATOR_VERSION),
            "meds_version": meds.__version__,
        }
        (tmp_root / meds.dataset_metadata_filepath).write_text(json.dumps(meta, indent=2))
        truth_table = pa.concat_tables(truth_parts).sort_by("subject_id").combine_chunks()
        del truth_parts
        _atomic_write_parquet(truth_table, tmp_root / "truth" / "last_admission.parquet")
        os.replace(tmp_root, out_dir)
    except BaseException:
        import shutil

        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    return out_dir


def true_probabilities(truth: pa.Table | object) -> dict[str, np.ndarray]:
    """True label probabilities per task from the truth table (aligned with its subject_id column).

    mortality_1m = P(die in stay) + P(survive stay) * P(die within 30 d after);
    inhospital_mortality_24h = P(die in stay); los_1w = P(stay > 7 days); readmission_1m = P(next
    admission within 30 days of the second-to-last discharge) (NaN with one admission);
    conditions = {group: P(group diagnosed in the last admission)}.
    """
    df = truth.to_pandas() if hasattr(truth, "to_pandas") else truth
    p_in = df["p_in_hospital"].to_numpy()
    p_post = df["p_post_30d"].to_numpy()
    return {
        "mortality_1m": p_in + (1.0 - p_in) * p_post,
        "inhospital_mortality_24h": p_in,
        "los_1w": df["p_los_7d"].to_numpy(),
        "readmission_1m": df["p_readmission_30d"].to_numpy(),
        "conditions": {g: df[f"p_condition_{g}"].to_numpy() for g, _, _, _ in CONDITIONS},
    }
