"""The streaming data path equals the in-memory reference, token for token and label for label.

The reference is the non-streaming path: `read_events` + `Tokenizer.fit` / `Tokenizer.timelines` +
`build_task` on all events at once. The streaming path (`repro.data.stream`) reads shard by shard,
fits from merged per-shard summaries and tokenizes each shard on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HAND_SPLITS, hand_events, write_meds
from hypothesis import given, settings
from hypothesis import strategies as st

from repro.config import TASK_NAMES, CodePatterns, TokenizerParams, load_params
from repro.data import stream
from repro.data.meds import MedsError, load_meds, read_events, read_reference_ranges
from repro.data.synthetic import write_synthetic_meds
from repro.data.tasks import build_task, find_visits
from repro.data.tokenizer import Tokenizer
from repro.data.values import quantile_edges, quantile_edges_from_counts

P = CodePatterns()
ARRAYS = ("token_ids", "types", "kinds", "avail_us", "ages")
VALUE_ARRAYS = ("values", "mix_ids", "mix_w")
# One parameter set per representation option (and a few combinations), for the equality tests.
REPRESENTATIONS = [
    {"values": "unfused"},
    {"values": "soft"},
    {"values": "soft", "min_count": 2},
    {"values": "xval"},
    {"bins": "clinical"},
    {"bins": "clinical", "values": "unfused"},
    {"bins": "clinical", "values": "soft"},
    {"time_tokens": "fixed13"},
    {"time_tokens": "fixed13", "values": "unfused", "bins": "clinical"},
    {"time_tokens": "fixed13", "values": "xval", "include_diagnoses": True},
]


def write_ranges(root, ranges: dict[str, tuple[float, float]]) -> None:
    """A MEDS code metadata file whose reference-range columns hold `ranges` (other codes: null)."""
    codes = [*ranges, "MEDICATION//X//Administered//1"]
    pq.write_table(
        pa.table(
            {
                "code": pa.array(codes, pa.string()),
                "description": pa.array([None] * len(codes), pa.string()),
                "parent_codes": pa.array([None] * len(codes), pa.list_(pa.string())),
                "ref_range_lower": pa.array([ranges.get(c, (None,))[0] for c in codes], pa.float64()),
                "ref_range_upper": pa.array([ranges.get(c, (None, None))[1] for c in codes], pa.float64()),
            }
        ),
        root / "metadata" / "codes.parquet",
    )


def reference(root, params: TokenizerParams, tasks=TASK_NAMES):
    """The non-streaming path on all events at once."""
    ds = load_meds(root)
    ev = read_events(ds)
    train = ds.subjects("train")
    tok = Tokenizer.fit(ev[ev["subject_id"].isin(train)], params, P, read_reference_ranges(root))
    visits = find_visits(ev, P)
    labels = {t: build_task(t, ev, P, visits, train_subjects=train) for t in tasks}
    return tok, tok.timelines(ev), labels, visits.groupby("subject_id").size()


def assert_same(ref, got: stream.PreparedData) -> None:
    tok, tl, labels, n_visits = ref
    assert got.tokenizer.itos == tok.itos
    for state in ("bins", "limits", "moments"):
        want, have = getattr(tok, state), getattr(got.tokenizer, state)
        assert list(have) == list(want), state
        for code, x in want.items():
            np.testing.assert_array_equal(have[code], x)
    assert got.tokenizer.clinical == tok.clinical
    assert got.timelines.stats == tl.stats
    a, b = tl.index(), got.timelines.index()
    assert set(a) == set(b)
    present = [k for k in VALUE_ARRAYS if getattr(tl, k) is not None]
    assert present == [k for k in VALUE_ARRAYS if getattr(got.timelines, k) is not None]
    for s, i in a.items():
        j = b[s]
        for k in (*ARRAYS, *present):
            x = getattr(tl, k)[tl.offsets[i] : tl.offsets[i + 1]]
            y = getattr(got.timelines, k)[got.timelines.offsets[j] : got.timelines.offsets[j + 1]]
            assert x.dtype == y.dtype and np.array_equal(x, y, equal_nan=k == "values"), (s, k)
    for t, df in labels.items():
        pd.testing.assert_frame_equal(got.labels[t], df, check_index_type=False)
    pd.testing.assert_series_equal(got.n_visits, n_visits)


def two_shards(tmp_path, events=None, splits=HAND_SPLITS):
    root = tmp_path / "meds"
    write_meds(
        root, hand_events() if events is None else events, splits, shard_of=lambda s: "a" if s == 1 else "b"
    )
    return root


@pytest.mark.parametrize(
    "kw",
    [
        {"n_bins": 2},
        {"n_bins": 2, "include_diagnoses": True},
        {"n_bins": 1},
        {"n_bins": 3, "min_count": 2},
        {"n_bins": 2, "families": ["lab", "medication", "procedure", "demographic"]},
        {"n_bins": 10},
        {"n_bins": 20},
        *({"n_bins": 2, **r} for r in REPRESENTATIONS),
        {"n_bins": 20, "values": "soft", "bins": "clinical", "time_tokens": "fixed13"},
    ],
)
def test_hand_events_in_two_shards_equal_the_reference(tmp_path, kw):
    root = two_shards(tmp_path)
    write_ranges(root, {"LAB//A//u": (2.0, 5.0)})  # train values 1..6 sit on both limits
    params = TokenizerParams(**kw)
    got = stream.prepare_data(load_meds(root), params, P, list(TASK_NAMES), progress=False)
    assert_same(reference(root, params), got)
    assert got.timelines.stats.events_outside_visits == 1 and got.timelines.stats.unk_tokens >= 1


def random_events(seed: int, n_subjects: int = 60) -> tuple[pd.DataFrame, dict[int, str]]:
    """Subjects with the awkward cases: ties, same-time discharge and admission, unclosed or doubled
    admissions, discharges without admission, events outside visits, missing birth, NaN and repeated values.
    """
    rng = np.random.default_rng(seed)
    pool = [
        ("HOSPITAL_ADMISSION//EW EMER.//EMERGENCY ROOM", 0.14),
        ("HOSPITAL_DISCHARGE//HOME", 0.12),
        ("HOSPITAL_DISCHARGE//DIED", 0.02),
        ("LAB//A//u", 0.2),
        ("LAB//B//mg", 0.12),
        ("MEDICATION//X//Administered//1", 0.1),
        ("MEDICATION//Y//Administered//2", 0.05),
        ("PROCEDURE//START//1", 0.05),
        ("DIAGNOSIS//ICD//10//I10", 0.06),
        ("DIAGNOSIS//ICD//10//J449", 0.04),
        ("DIAGNOSIS//ICD//9//4280", 0.03),
        ("DRG//HCFA//100//X", 0.03),
        ("TRANSFER_TO//admit//ED", 0.02),
        ("MEDS_DEATH", 0.02),
        ("MEDICATION//RARE//Administered//3", 0.01),  # sometimes only outside train: [UNK]
    ]
    codes = [c for c, _ in pool]
    probs = np.array([p for _, p in pool])
    probs /= probs.sum()
    rows = []
    day = 86_400_000_000
    for s in rng.permutation(n_subjects) + 100:
        rows.append((s, -1, ["GENDER//F", "GENDER//M"][rng.integers(2)], np.nan))
        if rng.random() < 0.85:
            rows.append((s, 50 * 365 * day + int(rng.integers(0, 1000)) * day, "MEDS_BIRTH", np.nan))
        n = int(rng.integers(0, 40))
        times = np.sort(120 * 365 * day + rng.integers(0, 60, n) * (day // 2))  # many ties
        for t in times:
            c = codes[rng.choice(len(codes), p=probs)]
            v = np.nan
            if c.startswith("LAB//") and rng.random() < 0.8:
                v = float(rng.choice([1.0, 2.0, 2.5, 3.0, 10.0, -0.0, 0.0]))
            rows.append((s, int(t), c, v))
    ev = pd.DataFrame(
        {
            "subject_id": np.array([r[0] for r in rows], np.int64),
            "time": np.array([r[1] for r in rows], np.int64),
            "code": np.array([r[2] for r in rows], dtype=object),
            "numeric_value": np.array([r[3] for r in rows], np.float32),
        }
    )
    # MEDS order within a subject: static first, then by time (births may fall anywhere).
    ev = ev.assign(_k=np.where(ev["time"] < 0, np.iinfo(np.int64).min, ev["time"]))
    order = {s: i for i, s in enumerate(pd.unique(ev["subject_id"]))}
    ev = ev.assign(_s=ev["subject_id"].map(order)).sort_values(["_s", "_k"], kind="stable")
    ev = ev.drop(columns=["_k", "_s"]).reset_index(drop=True)
    ids = sorted(order)
    split = rng.choice(["train", "tuning", "held_out"], len(ids), p=[0.6, 0.2, 0.2])
    split[0] = "train"
    return ev, dict(zip(ids, split.tolist()))


@pytest.mark.parametrize("kw", [{}, {"n_bins": 10}, *REPRESENTATIONS])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_edge_cases_equal_the_reference(tmp_path, seed, kw):
    ev, splits = random_events(seed)
    root = tmp_path / "meds"
    write_meds(root, ev, splits, shard_of=lambda s: str(s % 3))
    write_ranges(root, {"LAB//A//u": (2.0, 3.0)})  # LAB//B//mg has no range: quantile bins
    params = TokenizerParams(**{"n_bins": 3, **kw})
    got = stream.prepare_data(load_meds(root), params, P, list(TASK_NAMES), progress=False)
    assert_same(reference(root, params), got)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A smoke-parameter cohort (fewer subjects than params/smoke.yaml, so the test stays fast)."""
    root = tmp_path_factory.mktemp("smoke") / "meds"
    params = load_params(
        "params/smoke.yaml", {"data.n_subjects": 500, "data.shard_size": 100, "eval.min_label_positives": 1}
    )
    write_synthetic_meds(root, 500, params.data.generator_seed, 100)
    return root, params


def test_smoke_cohort_every_sample_encodes_token_for_token(smoke):
    """Every task sample's model input (all side arrays) from `prepare` equals the non-streaming path's."""
    from repro.training.prepare import encode_samples, prepare

    root, params = smoke
    prep = prepare(params, data_dir=root, cache=False, progress=False)
    tok, tl, labels, n_visits = reference(root, params.tokenizer, params.tasks)
    index = tl.index()
    n = 0
    for task in params.tasks:
        cols = [c for c in labels[task].columns]
        pd.testing.assert_frame_equal(prep.labels[task][cols], labels[task])
        for split in ("train", "tuning", "held_out"):
            items, df = encode_samples(prep, task, split)
            for e, s, t in zip(items, df["subject_id"], df["prediction_time"]):
                ref = tok.encode(tl, index[int(s)], int(t))
                for f in dataclasses.fields(ref):
                    x, y = getattr(ref, f.name), getattr(e, f.name)
                    assert x.dtype == y.dtype and np.array_equal(x, y), (task, s, f.name)
                n += 1
    assert n > 1000
    pd.testing.assert_series_equal(prep.n_visits, n_visits)
    assert prep.n_events == sum(pq.ParquetFile(p).metadata.num_rows for p in prep.dataset.shards)


def test_cache_is_reused_and_an_interrupted_run_resumes(smoke, tmp_path):
    root, params = smoke
    ds = load_meds(root)
    tasks = list(params.tasks)
    first = stream.prepare_data(ds, params.tokenizer, P, tasks, tmp_path, workers=1, progress=False)
    assert not first.cache_hit and first.cache_dir.parent == tmp_path
    assert isinstance(first.timelines.token_ids, np.memmap)  # assembled on disk, mapped on use
    again = stream.prepare_data(ds, params.tokenizer, P, tasks, tmp_path, workers=1, progress=False)
    assert again.cache_hit and again.cache_dir == first.cache_dir
    for k in ARRAYS:
        np.testing.assert_array_equal(getattr(again.timelines, k), getattr(first.timelines, k))
    for t in tasks:
        pd.testing.assert_frame_equal(again.labels[t], first.labels[t])
    assert again.tokenizer.itos == first.tokenizer.itos
    # The encode-time parameters come from the caller, not from the cache.
    short = dataclasses.replace(params.tokenizer, max_len=32)
    assert stream.prepare_data(ds, short, P, tasks, tmp_path, progress=False).tokenizer.params.max_len == 32
    # Interrupted after some shards: only the missing shard is tokenized again.
    d = first.cache_dir
    (d / "done.json").unlink()
    shards = sorted((d / "shards").glob("*.npz"))
    mtimes = {p: p.stat().st_mtime_ns for p in shards}
    shards[0].unlink()
    resumed = stream.prepare_data(ds, params.tokenizer, P, tasks, tmp_path, workers=1, progress=False)
    assert not resumed.cache_hit and shards[0].is_file()
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items() if p != shards[0])
    np.testing.assert_array_equal(resumed.timelines.token_ids, first.timelines.token_ids)
    # Another fit parameter is another cache entry.
    other = stream.prepare_data(
        ds, dataclasses.replace(params.tokenizer, n_bins=3), P, tasks, tmp_path, progress=False
    )
    assert other.cache_dir != first.cache_dir and not other.cache_hit


@pytest.mark.parametrize(
    "kw",
    [
        {"values": "soft", "bins": "clinical", "time_tokens": "fixed13"},
        {"values": "xval", "time_tokens": "fixed13", "n_bins": 10},
        {"values": "unfused", "bins": "clinical", "n_bins": 20},
    ],
)
def test_smoke_cohort_representations_equal_the_reference(smoke, kw):
    """The synthetic cohort (reference ranges in its code metadata) under combined representation options."""
    root, params = smoke
    tp = dataclasses.replace(params.tokenizer, **kw)
    got = stream.prepare_data(load_meds(root), tp, P, ["mortality_1m"], workers=1, progress=False)
    ref = reference(root, tp, ["mortality_1m"])
    assert_same(ref, got)
    tok = ref[0]
    if tp.bins == "clinical":
        assert len(tok.clinical) == 9  # every synthetic lab has a range (8 panel labs and lactate)
    if tp.values == "soft":
        assert (got.timelines.mix_w > 0).mean() > 0.1
    if tp.values == "xval":
        assert np.isfinite(got.timelines.values).sum() > 1000


@pytest.mark.parametrize("kw", [{"values": "soft", "time_tokens": "fixed13"}, {"values": "xval"}, {}])
def test_cache_round_trips_the_value_arrays(tmp_path, kw):
    root = two_shards(tmp_path)
    ds = load_meds(root)
    params = TokenizerParams(n_bins=2, **kw)
    first = stream.prepare_data(ds, params, P, ["mortality_1m"], tmp_path / "cache", progress=False)
    again = stream.prepare_data(ds, params, P, ["mortality_1m"], tmp_path / "cache", progress=False)
    assert again.cache_hit and not first.cache_hit
    for k in (*ARRAYS, *VALUE_ARRAYS):
        x, y = getattr(first.timelines, k), getattr(again.timelines, k)
        assert (x is None) == (y is None) == (not _mode_has(params, k)), k
        if x is not None:
            assert isinstance(y, np.memmap) and np.array_equal(x, y, equal_nan=True), k
    for state in ("itos", "clinical"):
        assert getattr(again.tokenizer, state) == getattr(first.tokenizer, state)
    for state in ("bins", "limits", "moments"):
        a, b = getattr(again.tokenizer, state), getattr(first.tokenizer, state)
        assert list(a) == list(b) and all(np.array_equal(a[c], b[c]) for c in a)
    other = dataclasses.replace(
        params, time_tokens="fixed13" if params.time_tokens == "ehrmamba" else "ehrmamba"
    )
    assert stream.cache_key(ds, other, P, ["mortality_1m"]) != stream.cache_key(
        ds, params, P, ["mortality_1m"]
    )


def _mode_has(params: TokenizerParams, k: str) -> bool:
    return (
        k in ARRAYS
        or (k == "values" and params.values == "xval")
        or (k in ("mix_ids", "mix_w") and params.values == "soft")
    )


def test_two_workers_give_the_same_result(smoke):
    root, params = smoke
    ds = load_meds(root)
    one = stream.prepare_data(
        ds, params.tokenizer, P, ["mortality_1m", "conditions"], workers=1, progress=False
    )
    two = stream.prepare_data(
        ds, params.tokenizer, P, ["mortality_1m", "conditions"], workers=2, progress=False
    )
    assert one.tokenizer.itos == two.tokenizer.itos
    for k in ("subject_ids", "offsets", *ARRAYS):
        np.testing.assert_array_equal(getattr(one.timelines, k), getattr(two.timelines, k))
    for t in one.labels:
        pd.testing.assert_frame_equal(one.labels[t], two.labels[t])


def _digest(root) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.parquet")):
        h.update(str(p.relative_to(root)).encode())
        h.update(pq.read_table(p).to_pandas().to_csv().encode())
    return h.hexdigest()


def test_synthetic_writer_in_parallel_writes_the_same_dataset(tmp_path):
    a = write_synthetic_meds(tmp_path / "a", 90, seed=4, shard_size=20)
    b = write_synthetic_meds(tmp_path / "b", 90, seed=4, shard_size=20, workers=2)
    assert _digest(a) == _digest(b)  # data, splits, codes and truth


def test_a_subject_in_two_shards_is_an_error_naming_both(tmp_path):
    ev = hand_events()
    root = tmp_path / "m"
    # Subject 1's first rows in shard "a", the rest in shard "b".
    write_meds(root, ev, HAND_SPLITS, shard_of=lambda s: "b" if s != 1 else "a")
    extra = tmp_path / "x"
    write_meds(extra, ev[ev["subject_id"] == 1].iloc[5:], HAND_SPLITS)
    (extra / "data" / "0.parquet").rename(root / "data" / "c.parquet")
    ds = load_meds(root)
    with pytest.raises(MedsError, match=r"c\.parquet: subject 1 also appears in .*a\.parquet"):
        with stream.ShardRunner(1, progress=False) as rn:
            stream.validate_dataset(ds, rn)


def test_a_subject_without_split_is_an_error(tmp_path):
    root = two_shards(tmp_path, splits={1: "train", 2: "train"})
    with pytest.raises(MedsError, match="1 subjects in the data have no split"):
        stream.prepare_data(load_meds(root), TokenizerParams(), P, ["mortality_1m"], progress=False)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(-30, 30), min_size=1, max_size=60),
    st.integers(1, 12),
    st.sampled_from([1.0, 0.5, 0.1, 0.01]),
)
def test_quantile_edges_from_counts_is_np_quantile(values, n_bins, step):
    v = (np.array(values, dtype=np.float64) * step).astype(np.float32)
    u, c = np.unique(v, return_counts=True)
    got = quantile_edges_from_counts(u.astype(np.float64), c, n_bins)
    np.testing.assert_array_equal(got, quantile_edges(v, n_bins))


def test_benchmark_prints_every_stage_and_the_extrapolation(smoke, tmp_path, capsys):
    import json

    from repro.profiling.bench_data import main

    root, _ = smoke
    out = tmp_path / "bench.json"
    args = ["--data", str(root), "--workers", "1", "--quiet", "--cache", str(tmp_path), "--out", str(out)]
    args += ["--probe-seconds", "0.05"]
    main([*args, "--extrapolate", "500000000"])
    res = json.loads(out.read_text())
    stages = [r["stage"] for r in res["rows"]]
    assert stages == [
        "validate",
        "label",
        "fit (train shards)",
        "tokenize",
        "assemble",
        "prepare_data (cold)",
        "prepare_data (cached)",
    ]
    tok = res["rows"][3]
    assert tok["events"] == res["events"] and tok["quarter"]["events"] < tok["events"]
    assert tok["extrapolated_wall_s"] > tok["wall_s"]
    printed = capsys.readouterr().out
    assert "| tokenize |" in printed and "wall at 500M" in printed and "peak RSS" in printed
