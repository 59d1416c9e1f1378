"""Synthetic MEDS written back as raw MIMIC-IV tables: MIMIC-IV's columns, consistent ids and times.

The e2e test runs the real ETL (mimic-iv-meds 0.2.0) when `.venv-etl` exists (`etl/run_mimic_etl.sh`
creates it); the rest needs no ETL.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import write_meds

from repro.config import CodePatterns
from repro.data.meds import load_meds, read_events
from repro.data.mimic_raw import write_mimic_raw
from repro.data.synthetic import write_synthetic_meds
from repro.data.tasks import build_task

ROOT = Path(__file__).resolve().parents[1]
ETL = ROOT / ".venv-etl" / "bin" / "meds-extract-run"
# What the ETL's event config reads from each table (MIMIC-IV 3.1 column names).
NEEDED = {
    "hosp/patients": {"subject_id", "gender", "anchor_age", "anchor_year", "dod"},
    "hosp/admissions": {
        "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
        "admission_location", "discharge_location", "insurance", "language", "marital_status", "race",
        "edregtime", "edouttime",
    },
    "hosp/transfers": {"subject_id", "hadm_id", "eventtype", "careunit", "intime"},
    "icu/icustays": {"subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime"},
    "hosp/labevents": {
        "subject_id", "hadm_id", "itemid", "charttime", "storetime", "value", "valuenum", "valueuom", "priority",
    },
    "hosp/emar": {"subject_id", "hadm_id", "emar_id", "emar_seq", "pharmacy_id", "charttime", "medication", "event_txt"},
    "hosp/pharmacy": {
        "subject_id", "hadm_id", "pharmacy_id", "poe_id", "starttime", "stoptime", "medication", "route",
        "frequency", "doses_per_24_hrs",
    },
    "hosp/prescriptions": {"pharmacy_id", "drug_type", "ndc"},
    "hosp/diagnoses_icd": {"subject_id", "hadm_id", "icd_code", "icd_version"},
    "hosp/drgcodes": {"subject_id", "hadm_id", "drg_type", "drg_code", "description", "drg_severity", "drg_mortality"},
    "icu/procedureevents": {"subject_id", "hadm_id", "stay_id", "starttime", "endtime", "itemid"},
    "icu/inputevents": {
        "subject_id", "hadm_id", "stay_id", "starttime", "endtime", "itemid", "amount", "amountuom", "rate",
        "rateuom", "orderid", "linkorderid", "ordercategorydescription", "statusdescription",
    },
    "hosp/d_icd_diagnoses": {"icd_code", "icd_version", "long_title"},
    "icu/d_items": {"itemid", "label"},
    "d_labitems_to_loinc": {"itemid (omop_source_code)", "label", "omop_concept_name", "omop_vocabulary_id", "omop_concept_code"},
}  # fmt: skip


def _read(raw: Path, name: str) -> pd.DataFrame:
    for suffix in (".csv.gz", ".csv"):
        if (raw / f"{name}{suffix}").exists():
            return pd.read_csv(raw / f"{name}{suffix}", dtype={"ndc": str})
    return pd.read_parquet(raw / f"{name}.parquet")


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("mimic")
    meds_dir = write_synthetic_meds(root / "meds", 30, seed=7)
    counts = write_mimic_raw(meds_dir, root / "raw")
    return meds_dir, root / "raw", counts


def test_tables_have_mimic_columns(chain):
    _, raw, counts = chain
    for name, cols in NEEDED.items():
        df = _read(raw, name)
        assert cols <= set(df.columns), (name, cols - set(df.columns))
        assert len(df) == counts[name] > 0, name
    assert counts["hosp/procedures_icd"] == 0  # our generator writes no ICD procedures
    assert (raw / "hosp" / "procedures_icd.parquet").exists()  # typed empty table, not a header-only CSV


def test_hadm_ids_consistent(chain):
    _, raw, _ = chain
    adm = _read(raw, "hosp/admissions")
    assert adm["hadm_id"].is_unique
    owner = adm.set_index("hadm_id")["subject_id"]
    for name in ["hosp/transfers", "icu/icustays", "hosp/labevents", "hosp/emar", "hosp/pharmacy",
                 "hosp/prescriptions", "hosp/diagnoses_icd", "hosp/drgcodes", "icu/procedureevents",
                 "icu/inputevents"]:  # fmt: skip
        df = _read(raw, name)
        assert df["hadm_id"].notna().all(), name
        assert (df["hadm_id"].map(owner) == df["subject_id"]).all(), name
    emar, pharmacy = _read(raw, "hosp/emar"), _read(raw, "hosp/pharmacy")
    assert set(emar["pharmacy_id"]) == set(pharmacy["pharmacy_id"])
    stays = _read(raw, "icu/icustays").set_index("stay_id")["hadm_id"]
    proc = _read(raw, "icu/procedureevents").dropna(subset=["stay_id"])
    assert (proc["stay_id"].map(stays) == proc["hadm_id"]).all()


def test_admission_times_and_births(chain):
    meds_dir, raw, _ = chain
    adm = _read(raw, "hosp/admissions")
    assert (pd.to_datetime(adm["admittime"]) < pd.to_datetime(adm["dischtime"])).all()
    ev = read_events(load_meds(meds_dir))
    birth = ev[ev["code"] == "MEDS_BIRTH"].set_index("subject_id")["time"]
    birth_year = birth.to_numpy().astype("datetime64[us]").astype("datetime64[Y]").astype(int) + 1970
    pat = _read(raw, "hosp/patients").set_index("subject_id").loc[birth.index]
    np.testing.assert_array_equal(pat["anchor_year"] - pat["anchor_age"], birth_year)
    assert len(pat) == ev["subject_id"].nunique()


def test_in_hospital_death(chain):
    _, raw, _ = chain
    adm = _read(raw, "hosp/admissions")
    died = adm[adm["discharge_location"] == "DIED"]
    assert len(died) >= 1
    assert (died["deathtime"] == died["dischtime"]).all()
    assert (died["hospital_expire_flag"] == 1).all()
    dod = _read(raw, "hosp/patients").set_index("subject_id")["dod"]
    assert (died["subject_id"].map(dod) == died["dischtime"].str[:10]).all()
    assert adm.loc[adm["discharge_location"] != "DIED", "deathtime"].isna().all()


def test_lab_values_and_times_match(chain):
    meds_dir, raw, _ = chain
    ev = read_events(load_meds(meds_dir))
    labs = ev[ev["code"].str.startswith("LAB//")].sort_values(["subject_id", "time"], kind="stable")
    le = _read(raw, "hosp/labevents")
    assert len(le) == len(labs)
    np.testing.assert_array_equal(le["subject_id"], labs["subject_id"])
    np.testing.assert_array_equal(le["valuenum"].to_numpy(np.float32), labs["numeric_value"].to_numpy())
    np.testing.assert_array_equal(le["itemid"].astype(str), labs["code"].str.split("//").str[1])
    secs = labs["time"].to_numpy() // 1_000_000
    np.testing.assert_array_equal(
        pd.to_datetime(le["storetime"]).to_numpy().astype("datetime64[s]").astype(np.int64), secs
    )
    assert (le["charttime"] == le["storetime"]).all()


def test_deterministic_and_never_overwrites(chain, tmp_path):
    meds_dir, raw, _ = chain
    write_mimic_raw(meds_dir, tmp_path / "again")
    files = sorted(p.relative_to(raw) for p in raw.rglob("*") if p.is_file())
    assert files == sorted(
        p.relative_to(tmp_path / "again") for p in (tmp_path / "again").rglob("*") if p.is_file()
    )
    for f in files:
        assert (raw / f).read_bytes() == (tmp_path / "again" / f).read_bytes(), f
    with pytest.raises(FileExistsError):
        write_mimic_raw(meds_dir, raw)


def test_unknown_code_family_raises(chain, tmp_path):
    meds_dir, _, _ = chain
    ds = load_meds(meds_dir)
    ev = read_events(ds)
    sid = int(ev["subject_id"].iloc[0])
    t = int(ev.loc[ev["time"] >= 0, "time"].iloc[0])
    extra = pd.DataFrame({"subject_id": [sid], "time": [t], "code": ["VITAL//HR"], "numeric_value": [np.nan]})
    ev = pd.concat([ev, extra]).sort_values(["subject_id", "time"], kind="stable")
    ev["numeric_value"] = ev["numeric_value"].astype(np.float64)
    write_meds(tmp_path / "meds", ev, dict(zip(ds.splits["subject_id"], ds.splits["split"])))
    with pytest.raises(ValueError, match=r"'VITAL//HR' belongs to no family"):
        write_mimic_raw(tmp_path / "meds", tmp_path / "raw")
    assert not (tmp_path / "raw").exists()


@pytest.mark.e2e
@pytest.mark.skipif(not ETL.exists(), reason="needs .venv-etl (created by etl/run_mimic_etl.sh)")
def test_etl_round_trip(tmp_path):
    meds_dir = write_synthetic_meds(tmp_path / "meds", 40, seed=7)
    write_mimic_raw(meds_dir, tmp_path / "raw")
    subprocess.run(
        [str(ROOT / "etl" / "run_mimic_etl.sh"), str(tmp_path / "raw"), str(tmp_path / "out")],
        check=True,
        capture_output=True,
    )
    out = load_meds(tmp_path / "out")
    patterns = CodePatterns()
    a = build_task("inhospital_mortality_24h", read_events(load_meds(meds_dir)), patterns)
    b = build_task("inhospital_mortality_24h", read_events(out), patterns)
    both = a.merge(b, on="subject_id", suffixes=("_orig", "_etl"))
    assert len(both) == len(a) == len(b)
    assert (both["label_orig"] == both["label_etl"]).all()
    assert both["label_orig"].sum() >= 1
