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
import pyarrow.parquet as pq
import pytest
from conftest import HAND_SPLITS, hand_events, write_meds
from hypothesis import given, settings
from hypothesis import strategies as st

from repro.config import TASK_NAMES, CodePatterns, TokenizerParams, load_params
from repro.data import stream
from repro.data.meds import MedsError, load_meds, read_events
from repro.data.synthetic import write_synthetic_meds
from repro.data.tasks import build_task, find_visits
from repro.data.tokenizer import Tokenizer, quantile_edges, quantile_edges_from_counts

P = CodePatterns()
ARRAYS = ("token_ids", "types", "kinds", "avail_us", "ages")


def reference(root, params: TokenizerParams, tasks=TASK_NAMES):
    """The non-streaming path on all events at once."""
    ds = load_meds(root)
    ev = read_events(ds)
    train = ds.subjects("train")
    tok = Tokenizer.fit(ev[ev["subject_id"].isin(train)], params, P)
    visits = find_visits(ev, P)
    labels = {t: build_task(t, ev, P, visits, train_subjects=train) for t in tasks}
    return tok, tok.timelines(ev), labels, visits.groupby("subject_id").size()


def assert_same(ref, got: stream.PreparedData) -> None:
    tok, tl, labels, n_visits = ref
    assert got.tokenizer.itos == tok.itos
    assert list(got.tokenizer.bins) == list(tok.bins)
    for code, edges in tok.bins.items():
        np.testing.assert_array_equal(got.tokenizer.bins[code], edges)
    assert got.timelines.stats == tl.stats
    a, b = tl.index(), got.timelines.index()
    assert set(a) == set(b)
    for s, i in a.items():
        j = b[s]
        for k in ARRAYS:
            x = getattr(tl, k)[tl.offsets[i] : tl.offsets[i + 1]]
            y = getattr(got.timelines, k)[got.timelines.offsets[j] : got.timelines.offsets[j + 1]]
            assert x.dtype == y.dtype and np.array_equal(x, y), (s, k)
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
    ],
)
def test_hand_events_in_two_shards_equal_the_reference(tmp_path, kw):
    root = two_shards(tmp_path)
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_edge_cases_equal_the_reference(tmp_path, seed):
    ev, splits = random_events(seed)
    root = tmp_path / "meds"
    write_meds(root, ev, splits, shard_of=lambda s: str(s % 3))
    params = TokenizerParams(n_bins=3)
    got = stream.prepare_data(load_meds(root), params, P, list(TASK_NAMES), progress=False)
    assert_same(reference(root, params), got)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """A smoke-parameter cohort (fewer subjects than params/smoke.yaml, so the test stays fast)."""
    root = tmp_path_factory.mktemp("smoke") / "meds"
    params = load_params("params/smoke.yaml", {"data.n_subjects": 500, "data.shard_size": 100})
    write_synthetic_meds(root, 500, params.data.generator_seed, 100)
    return root, params


def test_smoke_cohort_every_sample_encodes_token_for_token(smoke):
    """Every task sample's model input (all side arrays) from `prepare` equals the non-streaming path's."""
    from repro.experiment import encode_samples, prepare

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

    from repro.bench_data import main

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
