"""A synthetic MIMIC-IV-like MEDS cohort whose true risk is known.

Why: the report must run without credentialed data, and a planted truth lets it say which model
captured which mechanism and how far each is from the ceiling (the oracle AUROC). Results on this
cohort say nothing about MIMIC-IV itself.

Each subject is generated from its own RNG stream (seed, subject index), so any subset or shard is
reproducible on its own. Codes follow the MIMIC_IV_MEDS ETL vocabulary (DESIGN.md section 3).

Mortality mechanisms, acting on the logit of death at the subject's LAST admission; each is a switch with a
strength (`data.mechanisms`; 0 turns it off). Their events sit in the first 20 h of the stay, so the 24-h
prediction sees them too, and each is drawn independently of the others:

| mechanism | what the data show | capability it rewards |
|---|---|---|
| count | admissions in the 365 days before the last one (0-5), x strength | presence / counts: everyone |
| long_range | heart failure (25 %): furosemide in the FIRST admission only, x strength | memory of the whole history |
| order | half the stays: a high potassium and insulin; insulin first (untreated) +strength, after (treated) -strength | event order |
| trend | creatinine at 2, 8, 14 and 20 h rising or falling (the same values either way), +strength per sd of slope | values in order |
| timing | lactate, then vancomycin 0.5-13.5 h later: +strength per sd of the delay | time between events |
| interaction | warfarin and ciprofloxacin, each in half the stays: both or neither +strength, one alone -strength | non-linear combination |

Only `count` and `long_range` change which codes a stay holds: the other four leave every code's count with
the same distribution whatever their effect (order swaps two events, the trend's values are the same set
rising or falling, the delay moves one event, and each drug alone has no average effect), so a model of code
counts can read at most those two. A model that reads order, values, times and the whole history can reach
the true probability.

Other tasks: `los_1w` (stay > 7 days) depends on frailty (a latent trait: shorter gaps, longer stays) and an
ICU transfer in the first hours; `readmission_1m` on frailty and anaemia (low haemoglobin in that stay);
`conditions` on latent chronic conditions, treated by a marker drug and diagnosed at discharge; `null_task` labels
are independent of everything (`repro.data.tasks.null_labels`).

No leak: every other event is independent of every label given the true probabilities. Distractor drugs and
procedures are Poisson processes at a constant rate over each stay and labs are drawn every 6-12 h until
discharge, so what lies before a prediction time does not depend on how long the stay goes on; condition
markers are given in the first 20 h; nothing depends on an outcome. The number of admissions is drawn before
any outcome, and deaths happen only at or after the last admission. Outcomes are Bernoulli draws from the
planted probabilities, so the oracle AUROC is high but below 1.

Events at the same time (a lab panel, the codes stamped at admission or discharge) come in a random order
per subject: MEDS gives such events no order, and one fixed order is a pattern no mechanism planted.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import meds
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from repro.config import MECHANISM_NAMES, SPLIT_FRACTIONS, CodePatterns, atomic_path
from repro.data.tasks import CONDITION_TASKS, NULL_RATE

GENERATOR_VERSION = 6  # bump when the generated data change, so cached cohorts are not reused
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
LACTATE = ("LAB//50813//mmol/L", 1.8, 0.6)
# Reference ranges written to metadata/codes.parquet (ref_range_lower / ref_range_upper, as MIMIC-IV
# labevents names them) for the clinically anchored bins: the normal distribution's mean +- 2 sd.
REFERENCE_RANGES = {
    code: (round(m - 2 * sd, 2), round(m + 2 * sd, 2)) for code, m, sd in [*LABS.values(), LACTATE]
}
FUROSEMIDE = "MEDICATION//Furosemide//Administered//63323028002"
HEMOGLOBIN_DROP_ANEMIC = 3.0  # g/dL lower in an admission with anaemia (a readmission signal)
INSULIN = "MEDICATION//Insulin (Regular)//Administered//00002821501"
VANCOMYCIN = "MEDICATION//Vancomycin//Administered//00409433201"
WARFARIN = "MEDICATION//Warfarin//Administered//00056017270"
CIPROFLOXACIN = "MEDICATION//Ciprofloxacin//Administered//00026885048"
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
NOISE_MEDS_PER_DAY = 2.5  # Poisson rates over each stay: constant, so a window's count ignores the stay's end
NOISE_PROCS_PER_DAY = 0.6
ICU = "ICU_ADMISSION//Medical Intensive Care Unit (MICU)"
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

# The mortality mechanisms and their default strengths (logit units; see the module docstring). B0 is set so
# that mortality_1m prevalence is near 10 % with the defaults (checked by tests/test_synthetic.py).
# count and long_range are what a model of code counts can read: at 0.7 and 2.0 counts + LR reached 0.495 of
# the oracle's lift on the default cohort (H200 run, 20,000 subjects), too close to the contract's half
MECHANISMS = dict(zip(MECHANISM_NAMES, (0.6, 1.6, 1.2, 1.0, 1.0, 1.0), strict=True))
B0 = -5.4
IN_HOSPITAL_SHIFT = -0.5  # logit shift for death during the stay vs. within 30 days after
TREND_TIMES_H = (2.0, 8.0, 14.0, 20.0)  # creatinine draws of the trend, symmetric around 11 h
TREND_SD_PER_DAY = 0.6  # sd of the creatinine slope, mg/dL per day
DELAY_H = (0.5, 13.5)  # lactate -> vancomycin delay, uniform
DELAY_MEAN, DELAY_SD = sum(DELAY_H) / 2, (DELAY_H[1] - DELAY_H[0]) / 12**0.5
P_HYPERKALEMIA = 0.5
# Length of stay (hours past the first 24): log-normal; its log-mean rises with frailty and an ICU transfer.
LOS_MU, LOS_SIGMA, LOS_FRAIL, LOS_ICU = float(np.log(60.0)), 0.9, 0.35, 0.8
P_ICU = 0.3


def check_mechanisms(strengths: dict[str, float] | None) -> dict[str, float]:
    """The default strengths updated with `strengths`; an unknown name is an error naming the known ones.

    >>> check_mechanisms({"order": 0.0})["order"]
    0.0
    >>> check_mechanisms({"orders": 1.0})
    Traceback (most recent call last):
    ...
    ValueError: unknown mechanism(s) ['orders']; known: count, long_range, order, trend, timing, interaction
    """
    out = dict(MECHANISMS)
    unknown = sorted(set(strengths or {}) - set(MECHANISMS))
    if unknown:
        raise ValueError(f"unknown mechanism(s) {unknown}; known: {', '.join(MECHANISMS)}")
    out.update({k: float(v) for k, v in (strengths or {}).items()})
    return out


@dataclass
class SubjectTruth:
    """The planted truth for one subject's last admission (and, for readmission, the one before)."""

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


def generate_subject(
    seed: int, index: int, mechanisms: dict[str, float] | None = None
) -> tuple[dict[str, np.ndarray], SubjectTruth]:
    """Events of one subject (MEDS columns as numpy arrays, time-sorted) and its planted truth.

    Every draw is made whatever the strengths, so a mechanism switched off leaves the events as they are
    and only takes its effect out of the truth (and so out of the outcome draws).
    """
    strength = check_mechanisms(mechanisms)
    rng = _subject_rng(seed, index)
    outcome_rng = np.random.default_rng(np.random.SeedSequence([seed, index, 1]))  # outcomes apart
    sid = 10_000_000 + index
    times: list[int] = []
    codes: list[str] = []
    values: list[float] = []

    def add(t: int | None, code: str, value: float = np.nan) -> None:
        times.append(-1 if t is None else int(t))
        codes.append(code)
        values.append(value)

    def at(admit: int, hours: float) -> int:
        return admit + int(hours * US_PER_HOUR)

    def poisson_times(admit: int, discharge: int, per_day: float) -> np.ndarray:
        """A Poisson process over the stay: a window's count does not depend on where the stay ends."""
        lo, hi = admit + US_PER_HOUR / 2, discharge - US_PER_HOUR / 4
        n = rng.poisson(per_day * max(hi - lo, 0) / US_PER_DAY)
        return np.sort(rng.uniform(lo, hi, n)).astype(np.int64)

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
    chronic_hf = bool(conds[0])
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
        anemic = bool(rng.random() < 0.2)
        icu = bool(rng.random() < P_ICU)
        mu_los = LOS_MU + LOS_FRAIL * frail + LOS_ICU * icu
        if last:
            los_h = 24.0 + float(rng.lognormal(mu_los, LOS_SIGMA))
        else:
            los_h = max(6.0, float(rng.lognormal(np.log(80.0) + 0.2 * frail, 0.8)))
        discharge = at(admit, los_h)
        add(admit, ADMISSION_TYPES[rng.integers(len(ADMISSION_TYPES))])
        add(admit, "TRANSFER_TO//admit//Emergency Department")
        if icu:
            add(at(admit, rng.uniform(1, 6)), ICU)

        # Lab panels every 6-12 h until discharge; haemoglobin is low when anaemic.
        base_cr = float(rng.normal(1.0, 0.2))
        t = at(admit, rng.uniform(0.5, 2))
        while t < discharge:
            for name, (code, mean, sd) in LABS.items():
                if name != "creatinine" and rng.random() < 0.35:
                    continue
                if name == "creatinine":
                    v = base_cr + rng.normal(0, 0.05)
                elif name == "hemoglobin":
                    v = rng.normal(mean - HEMOGLOBIN_DROP_ANEMIC * anemic, sd * 0.6)
                else:
                    v = rng.normal(mean, sd)
                add(t, code, float(np.round(max(v, 0.05 * mean), 2)))
            t += int(rng.uniform(6, 12) * US_PER_HOUR)

        # Distractor medications and procedures, then the condition markers (in the first 20 h).
        for tm in poisson_times(admit, discharge, NOISE_MEDS_PER_DAY):
            add(int(tm), NOISE_MEDS[rng.integers(len(NOISE_MEDS))])
        for tm in poisson_times(admit, discharge, NOISE_PROCS_PER_DAY):
            add(int(tm), NOISE_PROCS[rng.integers(len(NOISE_PROCS))])
        marker_end_h = min(20.0, los_h - 0.25)
        for j, present in enumerate(conds):
            if j == 0:  # heart failure: furosemide in the first admission only (long-range memory)
                if present and k == 0:
                    for h in np.sort(rng.uniform(0.5, marker_end_h, 2)):
                        add(at(admit, h), FUROSEMIDE)
                continue
            if rng.random() < (P_MARKER_PRESENT if present else P_MARKER_ABSENT):
                add(at(admit, rng.uniform(0.5, marker_end_h)), MARKERS[j])

        if last:
            feats = _last_stay_mechanisms(rng, admit, base_cr, add, at)
            recent = sum(a >= admit - 365 * US_PER_DAY for a in admits[:-1])
            feats |= {"recent_admissions": float(min(recent, 5)), "chronic_hf": float(chronic_hf)}
            feats |= {"frail": frail, "icu": float(icu)}
            z = mechanism_logits(feats, strength)
            feats |= {f"z_{m}": v for m, v in z.items()}
            logit = B0 + sum(z.values())
            p_in = _sigmoid(logit + IN_HOSPITAL_SHIFT)
            p_post = _sigmoid(logit)
            p_los = 1.0 - _normal_cdf((np.log(168.0 - 24.0) - mu_los) / LOS_SIGMA)
            died_in = bool(outcome_rng.random() < p_in)
            death_us: int | None = None
            if died_in:
                death_us = discharge
            elif outcome_rng.random() < p_post:
                day = discharge + int(outcome_rng.uniform(1, 30) * US_PER_DAY)
                death_us = day - day % US_PER_DAY  # out-of-hospital deaths carry a date only
            elif outcome_rng.random() < 0.05:
                day = discharge + int(outcome_rng.uniform(35, 400) * US_PER_DAY)
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
        dx_draw = rng.random(len(CONDITIONS)) < p_conditions
        for j in np.flatnonzero(dx_draw):
            add(discharge, f"DIAGNOSIS//ICD//10//{CONDITIONS[j][1]}")
        add(discharge, f"DRG//HCFA//{int(rng.integers(100, 999))}//DRG DESCRIPTION")
        if last and truth is not None and truth.died_in_hospital:
            add(discharge, DIED)
            add(discharge, meds.death_code)
        else:
            add(discharge, DISCHARGE_ALIVE[rng.integers(len(DISCHARGE_ALIVE))])
        if not last:
            # Readmission: the gap to the next admission is shorter for frail and anaemic stays.
            mean_gap = 200.0 * np.exp(-0.5 * frail - 0.9 * anemic)
            p_readmit = 1.0 - float(np.exp(-29.0 / mean_gap))
            prev_discharge = discharge
            admit = discharge + int((1.0 + rng.exponential(mean_gap)) * US_PER_DAY)
    assert truth is not None
    if truth.death_us is not None and not truth.died_in_hospital:
        add(truth.death_us, meds.death_code)

    t_arr = np.array(times, dtype=np.int64)
    static = t_arr < 0
    # MEDS order: static rows first (null time), then by time; same-time events in a random order. Written
    # order would give each lab panel one fixed sequence, a cue only position-aware masked models read:
    # BigBird's MLM loss sat 1.1 nats below CEHR-BERT's on it, and CEHR-BERT never plateaued (docs/measurements.md).
    ties = rng.permutation(len(t_arr))
    order = np.lexsort((ties, np.where(static, np.iinfo(np.int64).min, t_arr)))
    cols = {
        "subject_id": np.full(len(t_arr), sid, dtype=np.int64),
        "time": t_arr[order],
        "code": np.array(codes, dtype=object)[order],
        "numeric_value": np.array(values, dtype=np.float32)[order],
    }
    return cols, truth


def _last_stay_mechanisms(rng: np.random.Generator, admit: int, base_cr: float, add, at) -> dict[str, float]:
    """The events of the order, trend, timing and interaction mechanisms in the last stay's first 20 h.

    Returns the variables the truth needs: each is drawn independently of the others and of the stay's
    other events.
    """
    # order: a high potassium with insulin before (untreated) or after (treated) it; otherwise insulin in
    # half the stays and no high potassium, so neither code's presence tells anything on average
    hyperk = bool(rng.random() < P_HYPERKALEMIA)
    before = bool(rng.random() < 0.5)
    t_k = rng.uniform(4.0, 16.0)
    gap = rng.uniform(0.5, 3.5)
    insulin_alone = bool(rng.random() < 0.5)
    t_alone = rng.uniform(1.0, 19.0)
    if hyperk:
        add(at(admit, t_k), LABS["potassium"][0], float(np.round(rng.uniform(6.0, 7.2), 2)))
        add(at(admit, t_k - gap if before else t_k + gap), INSULIN)
    elif insulin_alone:
        add(at(admit, t_alone), INSULIN)
    # trend: creatinine at fixed hours around 11 h; the values for slope s and -s are the same set
    slope = float(rng.normal())  # in sd units
    for h in TREND_TIMES_H:
        v = base_cr + slope * TREND_SD_PER_DAY * (h - 11.0) / 24.0 + rng.normal(0, 0.05)
        add(at(admit, h + rng.uniform(-0.25, 0.25)), LABS["creatinine"][0], float(np.round(max(v, 0.05), 2)))
    # timing: lactate, then vancomycin after a uniform delay
    t_l = rng.uniform(1.0, 6.0)
    delay = rng.uniform(*DELAY_H)
    add(at(admit, t_l), LACTATE[0], float(np.round(max(rng.normal(LACTATE[1], LACTATE[2]), 0.3), 1)))
    add(at(admit, t_l + delay), VANCOMYCIN)
    # interaction: two drugs, each in half the stays
    drug_a, drug_b = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
    t_a, t_b = rng.uniform(1.0, 19.0, 2)
    if drug_a:
        add(at(admit, t_a), WARFARIN)
    if drug_b:
        add(at(admit, t_b), CIPROFLOXACIN)
    return {
        "hyperkalemia": float(hyperk),
        "insulin_before": float(hyperk and before),
        "creatinine_slope": slope,
        "antibiotic_delay_h": delay,
        "warfarin": float(drug_a),
        "ciprofloxacin": float(drug_b),
    }


def mechanism_logits(feats: dict[str, float], strength: dict[str, float]) -> dict[str, float]:
    """Each mechanism's term of the mortality logit from the truth's variables.

    >>> z = mechanism_logits({"recent_admissions": 2, "chronic_hf": 1, "hyperkalemia": 1, "insulin_before": 0,
    ...     "creatinine_slope": 0.5, "antibiotic_delay_h": 7.0, "warfarin": 1, "ciprofloxacin": 0}, MECHANISMS)
    >>> {k: round(v, 2) for k, v in z.items()}
    {'count': 1.2, 'long_range': 1.6, 'order': -1.2, 'trend': 0.5, 'timing': 0.0, 'interaction': -1.0}
    """
    order = 0.0
    if feats["hyperkalemia"]:
        order = 1.0 if feats["insulin_before"] else -1.0
    return {
        "count": strength["count"] * feats["recent_admissions"],
        "long_range": strength["long_range"] * feats["chronic_hf"],
        "order": strength["order"] * order,
        "trend": strength["trend"] * feats["creatinine_slope"],
        "timing": strength["timing"] * (feats["antibiotic_delay_h"] - DELAY_MEAN) / DELAY_SD,
        "interaction": strength["interaction"]
        * (1.0 if feats["warfarin"] == feats["ciprofloxacin"] else -1.0),
    }


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
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def split_counts(n: int, fractions: Sequence[float]) -> dict[str, int]:
    """Subjects per split (train / tuning / held_out) that `assign_splits` gives n subjects."""
    n_train = int(round(fractions[0] * n))
    n_tune = int(round(fractions[1] * n))
    return {meds.train_split: n_train, meds.tuning_split: n_tune, meds.held_out_split: n - n_train - n_tune}


def assign_splits(n: int, seed: int, fractions: Sequence[float]) -> np.ndarray:
    """Per-subject split names (train / tuning / held_out) from a seeded permutation."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 2**31 - 1]))
    perm = rng.permutation(n)
    counts = split_counts(n, fractions)
    n_train, n_tune = counts[meds.train_split], counts[meds.tuning_split]
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


def _write_shard(
    seed: int, indices: np.ndarray, path: Path, mechanisms: dict[str, float] | None = None
) -> tuple[set[str], pa.Table]:
    """Generate and write one shard (atomically); return its codes and its subjects' truth rows.

    A subject's events depend only on (seed, subject index), so shards can be written in any order or
    in parallel processes and the dataset is the same.
    """
    parts, truths, codes = [], [], set()
    for i in indices:
        cols, truth = generate_subject(seed, int(i), mechanisms)
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
    mechanisms: dict[str, float] | None = None,
) -> Path:
    """Write a MEDS v0.4 dataset of `n_subjects` synthetic subjects plus `truth/last_admission.parquet`.

    Shards are `data/{split}/{i}.parquet`; each subject lives in one shard. Shards are generated one at
    a time (in `workers` processes), so memory is bounded by the shard size and a 100M-event dataset
    can be written on a small machine; the output does not depend on `workers`. The directory is built
    in a temporary sibling and renamed into place, so a failure never leaves a half-written dataset.
    `mechanisms` sets the mortality mechanisms' strengths (the defaults: `MECHANISMS`).
    """
    from tqdm import tqdm

    strengths = check_mechanisms(mechanisms)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} exists; remove it or choose another directory")
    fractions = split_fractions or list(SPLIT_FRACTIONS)
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
                futures = [pool.submit(_write_shard, seed, chunk, path, strengths) for chunk, path in jobs]
                for f, (chunk, _) in zip(futures, jobs):
                    codes, truth = f.result()
                    all_codes |= codes
                    truth_parts.append(truth)
                    bar.update(len(chunk))
        else:
            for chunk, path in jobs:
                codes, truth = _write_shard(seed, chunk, path, strengths)
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
            "mechanisms": strengths,
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
    conditions = {group: P(group diagnosed in the last admission)}; null_task = its constant rate;
    mortality_32d = mortality_1m (no death falls 31-32 days after discharge); each paper condition task =
    P(any of its groups diagnosed in the last admission).
    """
    df = truth.to_pandas() if hasattr(truth, "to_pandas") else truth
    p_in = df["p_in_hospital"].to_numpy()
    p_post = df["p_post_30d"].to_numpy()
    patterns = CodePatterns()
    paper_conditions = {}
    for name in CONDITION_TASKS:  # P(any of the task's groups diagnosed in the last admission)
        groups = [g for g, _, _, _ in CONDITIONS if re.search(getattr(patterns, name), f"10//{g}")]
        p_none = np.prod([1.0 - df[f"p_condition_{g}"].to_numpy() for g in groups], axis=0)
        paper_conditions[name] = 1.0 - p_none
    mortality = p_in + (1.0 - p_in) * p_post
    return paper_conditions | {
        "mortality_1m": mortality,
        # deaths after discharge fall 1-30 days after it, or 35 days or later: the same 32-day probability
        "mortality_32d": mortality,
        "inhospital_mortality_24h": p_in,
        "los_1w": df["p_los_7d"].to_numpy(),
        "readmission_1m": df["p_readmission_30d"].to_numpy(),
        "conditions": {g: df[f"p_condition_{g}"].to_numpy() for g, _, _, _ in CONDITIONS},
        "null_task": np.full(len(df), NULL_RATE),
    }
