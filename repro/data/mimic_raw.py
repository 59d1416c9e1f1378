"""Write a MEDS cohort from `repro.data.synthetic` back as raw MIMIC-IV tables.

Why: the real-data path (raw MIMIC-IV -> the MIMIC_IV_MEDS ETL -> MEDS -> `repro run`) needs
credentials to exercise. Writing our synthetic cohort in MIMIC-IV's own table and column names lets
the PyPI ETL `mimic-iv-meds` 0.2.0 convert it (`etl/run_mimic_etl.sh` with
`etl/mimic_iv_meds_subset.yaml`), so that path can be run and tested without PhysioNet access.

Each MEDS code family goes back to the table whose ETL template produced it; the ETL then re-derives
(almost) the same codes. Families handled (anything else raises `ValueError`):

| MEDS code | raw table: columns |
|---|---|
| `GENDER//{gender}` | hosp/patients: gender |
| `MEDS_BIRTH` | hosp/patients: anchor_year - anchor_age = birth year |
| `MEDS_DEATH` | hosp/patients: dod (date); hosp/admissions: deathtime when inside a stay |
| `RACE//`, `INSURANCE//`, `LANGUAGE//`, `MARITAL_STATUS//` | hosp/admissions: same-named column |
| `HOSPITAL_ADMISSION//{type}//{location}` | hosp/admissions: admittime, admission_type, admission_location |
| `HOSPITAL_DISCHARGE//{location}` | hosp/admissions: dischtime, discharge_location |
| `TRANSFER_TO//{eventtype}//{careunit}` | hosp/transfers: intime |
| `ICU_ADMISSION//{careunit}` | icu/icustays: intime, first_careunit |
| `LAB//{itemid}//{unit}` + value | hosp/labevents: charttime = storetime, valuenum, valueuom |
| `MEDICATION//{name}//{event_txt}//{ndc}` | hosp/emar: charttime; hosp/pharmacy + hosp/prescriptions: the order and its ndc |
| `DIAGNOSIS//ICD//{v}//{code}` | hosp/diagnoses_icd (the ETL stamps it at dischtime) |
| `PROCEDURE//ICD//{v}//{code}` | hosp/procedures_icd (stamped at dischtime) |
| `DRG//{type}//{code}[//{description}]` | hosp/drgcodes (stamped at dischtime; description -> text_value) |
| `PROCEDURE//START//{itemid}` | icu/procedureevents: starttime |
| `INFUSION_START//{itemid}` | icu/inputevents: starttime |

Our events are points, so every end column (pharmacy.stoptime, icustays.outtime,
procedureevents.endtime, inputevents.endtime) and every column we have no value for (language,
marital_status, edregtime, ...) is left empty: the ETL drops a row whose time or whose un-coalesced
code part is null, so no invented STOP/END/ED/LANGUAGE events appear. Lookup tables carry
placeholder titles (the generator records none). Times are written to the second.

What the ETL gives back differs from our input in known ways (task labels do not change): each lab
becomes `LAB//RESULT//{itemid}//{unit}` plus `LAB//SPECIMEN_COLLECTED//{itemid}//ROUTINE`; each
pharmacy order adds `MEDICATION//START//{name}//{ndc}`; RACE / INSURANCE are stamped at every
admission instead of being static; MEDS_BIRTH moves to 1 January; a DRG description moves to
text_value; NDCs lose leading zeros (the ETL reads the column as an integer); subjects are re-split.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from repro.data.meds import CODE, SUBJECT, TIME, VALUE, load_meds, read_events

HADM_BASE = 20_000_000
STAY_BASE = 30_000_000
# Order matters: the first family whose pattern matches a code claims it.
FAMILIES: dict[str, str] = {
    "gender": r"^GENDER//(?P<gender>.+)$",
    "race": r"^RACE//(?P<race>.+)$",
    "insurance": r"^INSURANCE//(?P<insurance>.+)$",
    "language": r"^LANGUAGE//(?P<language>.+)$",
    "marital_status": r"^MARITAL_STATUS//(?P<marital_status>.+)$",
    "birth": r"^MEDS_BIRTH$",
    "death": r"^MEDS_DEATH$",
    "admission": r"^HOSPITAL_ADMISSION//(?P<admission_type>.+?)//(?P<admission_location>.+)$",
    "discharge": r"^HOSPITAL_DISCHARGE//(?P<discharge_location>.+)$",
    "transfer": r"^TRANSFER_TO//(?P<eventtype>[^/]+)//(?P<careunit>.+)$",
    "icu": r"^ICU_ADMISSION//(?P<first_careunit>.+)$",
    "lab": r"^LAB//(?P<itemid>\d+)//(?P<valueuom>.+)$",
    "medication": r"^MEDICATION//(?!START//|STOP//)(?P<medication>.+)//(?P<event_txt>[^/]+)//(?P<ndc>[^/]+)$",
    "diagnosis": r"^DIAGNOSIS//ICD//(?P<icd_version>9|10)//(?P<icd_code>[A-Z0-9]+)$",
    "procedure_icd": r"^PROCEDURE//ICD//(?P<icd_version>9|10)//(?P<icd_code>[A-Z0-9]+)$",
    "drg": r"^DRG//(?P<drg_type>[^/]+)//(?P<drg_code>\d+)(?://(?P<description>.+))?$",
    "procedure_event": r"^PROCEDURE//START//(?P<itemid>\d+)$",
    "infusion": r"^INFUSION_START//(?P<itemid>\d+)$",
}
DEMOGRAPHICS = ["race", "insurance", "language", "marital_status"]

# Table columns as in MIMIC-IV 3.1 (hosp/, icu/) and mimic-code's concept maps (top level). Columns the
# ETL does not read are kept where cheap, so the files look like the real ones.
COLUMNS: dict[str, list[str]] = {
    "hosp/patients": ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
    "hosp/admissions": [
        "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
        "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
        "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag",
    ],
    "hosp/transfers": ["subject_id", "hadm_id", "transfer_id", "eventtype", "careunit", "intime", "outtime"],
    "icu/icustays": [
        "subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime", "los",
    ],
    "hosp/labevents": [
        "labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id", "charttime",
        "storetime", "value", "valuenum", "valueuom", "ref_range_lower", "ref_range_upper", "flag",
        "priority", "comments",
    ],
    "hosp/emar": [
        "subject_id", "hadm_id", "emar_id", "emar_seq", "poe_id", "pharmacy_id", "enter_provider_id",
        "charttime", "medication", "event_txt", "scheduletime", "storetime",
    ],
    "hosp/pharmacy": [
        "subject_id", "hadm_id", "pharmacy_id", "poe_id", "starttime", "stoptime", "medication",
        "proc_type", "status", "route", "frequency", "doses_per_24_hrs",
    ],
    "hosp/prescriptions": [
        "subject_id", "hadm_id", "pharmacy_id", "poe_id", "starttime", "stoptime", "drug_type", "drug", "ndc",
    ],
    "hosp/diagnoses_icd": ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
    "hosp/procedures_icd": ["subject_id", "hadm_id", "seq_num", "chartdate", "icd_code", "icd_version"],
    "hosp/drgcodes": [
        "subject_id", "hadm_id", "drg_type", "drg_code", "description", "drg_severity", "drg_mortality",
    ],
    "icu/procedureevents": [
        "subject_id", "hadm_id", "stay_id", "starttime", "endtime", "storetime", "itemid", "value",
        "valueuom", "orderid", "statusdescription",
    ],
    "icu/inputevents": [
        "subject_id", "hadm_id", "stay_id", "starttime", "endtime", "storetime", "itemid", "amount",
        "amountuom", "rate", "rateuom", "orderid", "linkorderid", "ordercategorydescription",
        "statusdescription", "patientweight",
    ],
    "hosp/d_icd_diagnoses": ["icd_code", "icd_version", "long_title"],
    "hosp/d_icd_procedures": ["icd_code", "icd_version", "long_title"],
    "icu/d_items": [
        "itemid", "label", "abbreviation", "linksto", "category", "unitname", "param_type",
        "lownormalvalue", "highnormalvalue",
    ],
}  # fmt: skip
CONCEPT_MAP = [
    "itemid (omop_source_code)",
    "label",
    "omop_concept_name",
    "omop_vocabulary_id",
    "omop_concept_code",
]
CONCEPT_MAPS = ["d_labitems_to_loinc", "proc_datetimeevents", "proc_itemid", "inputevents_to_rxnorm"]
LOOKUPS = {"hosp/d_icd_diagnoses", "hosp/d_icd_procedures", "icu/d_items", *CONCEPT_MAPS}
INT_COLUMNS = {
    "subject_id", "hadm_id", "stay_id", "seq_num", "icd_version", "itemid", "drg_code", "labevent_id",
    "specimen_id", "pharmacy_id", "emar_seq", "transfer_id", "orderid", "linkorderid", "anchor_age",
    "anchor_year", "hospital_expire_flag",
}  # fmt: skip


def _fmt_time(us: np.ndarray | pd.Series) -> np.ndarray:
    """int64 microseconds -> "%Y-%m-%d %H:%M:%S" strings (truncated to the second); -1 -> empty."""
    us = np.asarray(us, dtype=np.int64)
    s = np.datetime_as_string(us.astype("datetime64[us]").astype("datetime64[s]"), unit="s")
    s = np.char.replace(s.astype(str), "T", " ")
    return np.where(us >= 0, s, "")


def _fmt_date(us: np.ndarray | pd.Series) -> np.ndarray:
    us = np.asarray(us, dtype=np.int64)
    return np.where(us >= 0, np.datetime_as_string(us.astype("datetime64[us]").astype("datetime64[D]")), "")


def _year(us: pd.Series) -> pd.Series:
    """Calendar year of int64-microsecond times (NaN -> <NA>)."""
    t = us.fillna(0).to_numpy(dtype=np.int64).astype("datetime64[us]").astype("datetime64[Y]")
    return pd.Series(t.astype(np.int64) + 1970, index=us.index, dtype="Int64").where(us.notna())


def _parse_codes(codes: np.ndarray, where: Path) -> pd.DataFrame:
    """One row per distinct code: its family and the parts its pattern captures."""
    compiled = {name: re.compile(p) for name, p in FAMILIES.items()}
    rows = []
    for code in codes:
        for name, rx in compiled.items():
            m = rx.match(code)
            if m:
                rows.append({CODE: code, "family": name, **m.groupdict()})
                break
        else:
            raise ValueError(
                f"{where}: MEDS code {code!r} belongs to no family that write_mimic_raw can write back to a "
                f"MIMIC-IV table; known families: {', '.join(FAMILIES)}"
            )
    return pd.DataFrame(rows).set_index(CODE)


def _pair_admissions(events: pd.DataFrame, where: Path) -> pd.DataFrame:
    """Pair the k-th admission code of a subject with its k-th discharge code; check they nest."""
    cols = [SUBJECT, TIME, CODE]
    starts = events.loc[events["family"] == "admission", cols].sort_values([SUBJECT, TIME], kind="stable")
    ends = events.loc[events["family"] == "discharge", cols].sort_values([SUBJECT, TIME], kind="stable")
    starts["k"] = starts.groupby(SUBJECT).cumcount()
    ends["k"] = ends.groupby(SUBJECT).cumcount()
    adm = starts.merge(ends, on=[SUBJECT, "k"], how="outer", suffixes=("_admit", "_disch"))
    bad = adm[TIME + "_admit"].isna() | adm[TIME + "_disch"].isna()
    if bad.any():
        s = int(adm.loc[bad, SUBJECT].iloc[0])
        raise ValueError(f"{where}: subject {s} has unequal numbers of admission and discharge codes")
    adm = adm.astype({TIME + "_admit": np.int64, TIME + "_disch": np.int64})
    adm = adm.rename(columns={TIME + "_admit": "admit", TIME + "_disch": "disch"})
    next_admit = adm.groupby(SUBJECT)["admit"].shift(-1)
    bad = (adm["disch"] <= adm["admit"]) | (next_admit.notna() & (adm["disch"] >= next_admit))
    if bad.any():
        s = int(adm.loc[bad, SUBJECT].iloc[0])
        raise ValueError(
            f"{where}: subject {s} has an admission that does not end before the next one starts"
        )
    adm["hadm_id"] = HADM_BASE + np.arange(len(adm), dtype=np.int64)
    return adm


def _with_hadm(
    df: pd.DataFrame, adm: pd.DataFrame, family: str, where: Path, required: bool = True
) -> pd.DataFrame:
    """Attach the hadm_id of the admission whose [admit, discharge] holds each event's time."""
    df = df.sort_values(TIME, kind="stable")
    right = adm[[SUBJECT, "admit", "disch", "hadm_id"]].sort_values("admit", kind="stable")
    out = pd.merge_asof(df, right, left_on=TIME, right_on="admit", by=SUBJECT, direction="backward")
    inside = out["hadm_id"].notna() & (out[TIME] <= out["disch"])
    if required and not inside.all():
        row = out[~inside].iloc[0]
        raise ValueError(
            f"{where}: {family} event {row[CODE]!r} of subject {int(row[SUBJECT])} lies outside every admission"
        )
    out["hadm_id"] = out["hadm_id"].where(inside).astype("Int64")
    return out.sort_values([SUBJECT, TIME], kind="stable").reset_index(drop=True)


def _stays(icu_events: pd.DataFrame, adm: pd.DataFrame, where: Path) -> pd.DataFrame:
    """ICU admissions with their hadm_id and a new stay_id."""
    icu = _with_hadm(icu_events, adm, "icu", where)
    icu["stay_id"] = STAY_BASE + np.arange(len(icu), dtype=np.int64)
    return icu


def _stay_of(df: pd.DataFrame, icu: pd.DataFrame) -> pd.Series:
    """The first ICU stay of the event's admission (MIMIC links ICU events to a stay), else empty."""
    first = icu.drop_duplicates("hadm_id").set_index("hadm_id")["stay_id"]
    return df["hadm_id"].map(first).astype("Int64")


def write_mimic_raw(meds_dir: str | Path, raw_dir: str | Path) -> dict[str, int]:
    """Write the MEDS cohort at `meds_dir` as raw MIMIC-IV CSV tables under `raw_dir`; return rows per table.

    The layout is what the ETL's `input_dir` expects: `hosp/*.csv.gz`, `icu/*.csv.gz` and mimic-code's
    concept maps as top-level `.csv`. Built in a temporary sibling and renamed into place, so a failure
    leaves no half-written directory; an existing `raw_dir` is never overwritten.
    """
    meds_dir, raw_dir = Path(meds_dir), Path(raw_dir)
    if raw_dir.exists():
        raise FileExistsError(f"{raw_dir} exists; remove it or choose another directory")
    ds = load_meds(meds_dir)
    events = read_events(ds)
    where = ds.root
    info = _parse_codes(events[CODE].unique(), where)
    events["family"] = events[CODE].map(info["family"])
    tables = _build_tables(events, info, ds.splits[SUBJECT].to_numpy(), where)

    raw_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=raw_dir.parent, prefix=f".{raw_dir.name}."))
    try:
        for name, df in tables.items():
            _write_table(tmp, name, df)
        os.replace(tmp, raw_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {name: len(df) for name, df in tables.items()}


def _write_table(root: Path, name: str, df: pd.DataFrame) -> None:
    """hosp/ and icu/ tables as .csv.gz (as PhysioNet ships them), concept maps as .csv.

    A table with no rows becomes a typed, empty .parquet (the ETL reads either): a header-only CSV has
    no column types, and the ETL's joins then fail (`hadm_id: str ... does not match i64`). Lookups are
    typed all-string, as the ETL reads lookup CSVs (`$icd_version == "9"` fails on an integer).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if df.empty:
        schema = pa.schema(
            [(c, pa.int64() if c in INT_COLUMNS and name not in LOOKUPS else pa.string()) for c in df.columns]
        )
        pq.write_table(schema.empty_table(), path.with_name(path.name + ".parquet"))
    elif name.startswith(("hosp/", "icu/")):  # mtime 0: the same bytes on every run
        df.to_csv(
            path.with_name(path.name + ".csv.gz"), index=False, compression={"method": "gzip", "mtime": 0}
        )
    else:
        df.to_csv(path.with_name(path.name + ".csv"), index=False)


def _build_tables(
    events: pd.DataFrame, info: pd.DataFrame, subjects: np.ndarray, where: Path
) -> dict[str, pd.DataFrame]:
    def fam(name: str) -> pd.DataFrame:
        """The events of one family with the parts its pattern captures as columns."""
        df = events[events["family"] == name].reset_index(drop=True)
        groups = list(re.compile(FAMILIES[name]).groupindex)
        parts = info.reindex(columns=groups).loc[df[CODE].to_numpy()].reset_index(drop=True)
        return pd.concat([df, parts], axis=1)

    def per_subject(name: str, col: str) -> pd.Series:
        return fam(name).drop_duplicates(SUBJECT).set_index(SUBJECT)[col]

    adm = _pair_admissions(events, where)
    a_parts = info.loc[adm[CODE + "_admit"].to_numpy()]
    d_parts = info.loc[adm[CODE + "_disch"].to_numpy()]
    death = events[events["family"] == "death"].groupby(SUBJECT)[TIME].min()
    birth = events[events["family"] == "birth"].groupby(SUBJECT)[TIME].min()
    adm_death = adm[SUBJECT].map(death)
    died_in_stay = adm_death.notna() & (adm_death >= adm["admit"]) & (adm_death <= adm["disch"])
    expired = d_parts["discharge_location"].to_numpy() == "DIED"
    deathtime = adm_death.where(died_in_stay, np.where(expired, adm["disch"], -1)).astype(np.int64)
    out: dict[str, pd.DataFrame] = {}
    out["hosp/admissions"] = pd.DataFrame(
        {
            "subject_id": adm[SUBJECT],
            "hadm_id": adm["hadm_id"],
            "admittime": _fmt_time(adm["admit"]),
            "dischtime": _fmt_time(adm["disch"]),
            "deathtime": _fmt_time(deathtime),
            "admission_type": a_parts["admission_type"].to_numpy(),
            "admission_location": a_parts["admission_location"].to_numpy(),
            "discharge_location": d_parts["discharge_location"].to_numpy(),
            **{c: adm[SUBJECT].map(per_subject(c, c)).to_numpy() for c in DEMOGRAPHICS},
            "hospital_expire_flag": (died_in_stay.to_numpy() | expired).astype(np.int64),
        }
    ).reindex(columns=COLUMNS["hosp/admissions"])

    # anchor_year: the year of the subject's first admission (else of birth); anchor_age: age then.
    subj = pd.Series(np.sort(subjects), name=SUBJECT)
    birth_year = _year(subj.map(birth))
    anchor_year = _year(subj.map(adm.groupby(SUBJECT)["admit"].min())).fillna(birth_year)
    out["hosp/patients"] = pd.DataFrame(
        {
            "subject_id": subj,
            "gender": subj.map(per_subject("gender", "gender")),
            "anchor_age": (anchor_year - birth_year).astype("Int64"),
            "anchor_year": anchor_year,
            "anchor_year_group": "2014 - 2016",
            "dod": _fmt_date(subj.map(death).fillna(-1)),
        }
    )

    tr = _with_hadm(fam("transfer"), adm, "transfer", where)
    out["hosp/transfers"] = pd.DataFrame(
        {
            "subject_id": tr[SUBJECT],
            "hadm_id": tr["hadm_id"],
            "transfer_id": 40_000_000 + np.arange(len(tr), dtype=np.int64),
            "eventtype": tr["eventtype"],
            "careunit": tr["careunit"],
            "intime": _fmt_time(tr[TIME]),
        }
    ).reindex(columns=COLUMNS["hosp/transfers"])

    icu = _stays(fam("icu"), adm, where)
    out["icu/icustays"] = pd.DataFrame(
        {
            "subject_id": icu[SUBJECT],
            "hadm_id": icu["hadm_id"],
            "stay_id": icu["stay_id"],
            "first_careunit": icu["first_careunit"],
            "last_careunit": icu["first_careunit"],
            "intime": _fmt_time(icu[TIME]),
        }
    ).reindex(columns=COLUMNS["icu/icustays"])

    lab = _with_hadm(fam("lab"), adm, "lab", where, required=False)  # MIMIC has outpatient labs too
    lab_t = _fmt_time(lab[TIME])
    value = lab[VALUE].to_numpy(dtype=np.float32)
    value_s = np.where(
        np.isnan(value), "", value.astype(str)
    )  # float32 shortest repr: 1.23, not 1.2300000190734863
    out["hosp/labevents"] = pd.DataFrame(
        {
            "labevent_id": np.arange(1, len(lab) + 1, dtype=np.int64),
            "subject_id": lab[SUBJECT],
            "hadm_id": lab["hadm_id"],
            "specimen_id": 50_000_000 + lab.groupby([SUBJECT, TIME], sort=False).ngroup().to_numpy(),
            "itemid": lab["itemid"].astype(np.int64),
            "charttime": lab_t,
            "storetime": lab_t,
            "value": value_s,
            "valuenum": value_s,
            "valueuom": lab["valueuom"],
            "priority": "ROUTINE",
        }
    ).reindex(columns=COLUMNS["hosp/labevents"])

    med = _with_hadm(fam("medication"), adm, "medication", where)
    # One pharmacy order (and its MAIN prescriptions row, which carries the ndc) per admission and drug.
    order_key = ["hadm_id", "medication", "ndc"]
    med["pharmacy_id"] = 60_000_000 + med.groupby(order_key, sort=True).ngroup().to_numpy()
    med["poe_id"] = med[SUBJECT].astype(str) + "-" + (med["pharmacy_id"] - 60_000_000).astype(str)
    med_t = _fmt_time(med[TIME])
    out["hosp/emar"] = pd.DataFrame(
        {
            "subject_id": med[SUBJECT],
            "hadm_id": med["hadm_id"],
            "emar_id": med[SUBJECT].astype(str) + "-" + (med.groupby(SUBJECT).cumcount() + 1).astype(str),
            "emar_seq": med.groupby(SUBJECT).cumcount() + 1,
            "poe_id": med["poe_id"],
            "pharmacy_id": med["pharmacy_id"],
            "charttime": med_t,
            "medication": med["medication"],
            "event_txt": med["event_txt"],
            "scheduletime": med_t,
            "storetime": med_t,
        }
    ).reindex(columns=COLUMNS["hosp/emar"])
    orders = med.groupby("pharmacy_id", sort=True).agg(
        subject_id=(SUBJECT, "first"),
        hadm_id=("hadm_id", "first"),
        poe_id=("poe_id", "first"),
        start=(TIME, "min"),
        medication=("medication", "first"),
        ndc=("ndc", "first"),
    )
    orders = orders.reset_index()
    out["hosp/pharmacy"] = pd.DataFrame(
        {
            "subject_id": orders["subject_id"],
            "hadm_id": orders["hadm_id"],
            "pharmacy_id": orders["pharmacy_id"],
            "poe_id": orders["poe_id"],
            "starttime": _fmt_time(orders["start"]),
            "medication": orders["medication"],
            "proc_type": "Unit Dose",
            "status": "Discontinued",
        }
    ).reindex(columns=COLUMNS["hosp/pharmacy"])
    out["hosp/prescriptions"] = pd.DataFrame(
        {
            "subject_id": orders["subject_id"],
            "hadm_id": orders["hadm_id"],
            "pharmacy_id": orders["pharmacy_id"],
            "poe_id": orders["poe_id"],
            "starttime": _fmt_time(orders["start"]),
            "drug_type": "MAIN",
            "drug": orders["medication"],
            "ndc": orders["ndc"],
        }
    ).reindex(columns=COLUMNS["hosp/prescriptions"])

    for family, table, lookup in (
        ("diagnosis", "hosp/diagnoses_icd", "hosp/d_icd_diagnoses"),
        ("procedure_icd", "hosp/procedures_icd", "hosp/d_icd_procedures"),
    ):
        dx = _with_hadm(fam(family), adm, family, where)
        out[table] = pd.DataFrame(
            {
                "subject_id": dx[SUBJECT],
                "hadm_id": dx["hadm_id"],
                "seq_num": dx.groupby("hadm_id").cumcount() + 1,
                "chartdate": _fmt_date(dx[TIME]),
                "icd_code": dx["icd_code"],
                "icd_version": dx["icd_version"].astype("Int64"),
            }
        ).reindex(columns=COLUMNS[table])
        d = out[table][["icd_code", "icd_version"]].drop_duplicates().sort_values(["icd_version", "icd_code"])
        out[lookup] = d.assign(long_title=lambda x: "synthetic ICD-" + x["icd_version"].astype(str) + " code")

    drg = _with_hadm(fam("drg"), adm, "drg", where)
    out["hosp/drgcodes"] = pd.DataFrame(
        {
            "subject_id": drg[SUBJECT],
            "hadm_id": drg["hadm_id"],
            "drg_type": drg["drg_type"],
            "drg_code": drg["drg_code"].astype(np.int64),
            "description": drg.get("description"),
        }
    ).reindex(columns=COLUMNS["hosp/drgcodes"])

    pe = _with_hadm(fam("procedure_event"), adm, "procedure_event", where)
    pe_t = _fmt_time(pe[TIME])
    out["icu/procedureevents"] = pd.DataFrame(
        {
            "subject_id": pe[SUBJECT],
            "hadm_id": pe["hadm_id"],
            "stay_id": _stay_of(pe, icu),
            "starttime": pe_t,
            "storetime": pe_t,
            "itemid": pe["itemid"].astype(np.int64),
            "orderid": 70_000_000 + np.arange(len(pe), dtype=np.int64),
            "statusdescription": "FinishedRunning",
        }
    ).reindex(columns=COLUMNS["icu/procedureevents"])

    inf = _with_hadm(fam("infusion"), adm, "infusion", where)
    inf_t = _fmt_time(inf[TIME])
    order = 80_000_000 + np.arange(len(inf), dtype=np.int64)
    out["icu/inputevents"] = pd.DataFrame(
        {
            "subject_id": inf[SUBJECT],
            "hadm_id": inf["hadm_id"],
            "stay_id": _stay_of(inf, icu),
            "starttime": inf_t,
            "storetime": inf_t,
            "itemid": inf["itemid"].astype(np.int64),
            "orderid": order,
            "linkorderid": order,
            "ordercategorydescription": "Continuous IV",
            "statusdescription": "FinishedRunning",
        }
    ).reindex(columns=COLUMNS["icu/inputevents"])

    icu_items = np.unique(np.concatenate([pe["itemid"].astype(np.int64), inf["itemid"].astype(np.int64)]))
    linksto = np.where(np.isin(icu_items, inf["itemid"].astype(np.int64)), "inputevents", "procedureevents")
    out["icu/d_items"] = pd.DataFrame(
        {"itemid": icu_items, "label": [f"synthetic item {i}" for i in icu_items], "linksto": linksto}
    ).reindex(columns=COLUMNS["icu/d_items"])

    # mimic-code concept maps: one row per itemid we use, with no OMOP concept (so no parent codes).
    lab_items = np.unique(lab["itemid"].astype(np.int64))
    for name, items in zip(
        CONCEPT_MAPS,
        (lab_items, pe["itemid"].astype(np.int64).unique(), pe["itemid"].astype(np.int64).unique(),
         inf["itemid"].astype(np.int64).unique()),
    ):  # fmt: skip
        items = np.sort(np.asarray(items, dtype=np.int64))
        out[name] = pd.DataFrame(
            {CONCEPT_MAP[0]: items, "label": [f"synthetic item {i}" for i in items]}
        ).reindex(columns=CONCEPT_MAP)
    return out
