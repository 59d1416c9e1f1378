"""MEDS reading and validation: every bad input names the file and the problem."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import HAND_SPLITS, hand_events, ts, write_meds

from repro.data.meds import MedsError, load_meds, read_events, read_shard


def test_valid_directory_reads(meds_dir):
    ds = load_meds(meds_dir)
    ev = read_events(ds)
    assert len(ev) == len(hand_events())
    assert set(ds.subjects("train")) == {1, 2}
    assert (ev.loc[ev["code"] == "GENDER//F", "time"] == -1).all()  # static row: null time kept as -1


def _rewrite(path, fn):
    t = pq.read_table(path)
    pq.write_table(fn(t), path)


def test_missing_column(meds_dir):
    shard = meds_dir / "data" / "0.parquet"
    _rewrite(shard, lambda t: t.drop_columns(["code"]))
    with pytest.raises(MedsError, match=r"0\.parquet: .*Missing required columns: code"):
        load_meds(meds_dir)


def test_wrong_dtype(meds_dir):
    shard = meds_dir / "data" / "0.parquet"
    _rewrite(shard, lambda t: t.set_column(0, "subject_id", t.column("subject_id").cast(pa.int32())))
    with pytest.raises(MedsError, match=r"0\.parquet: .*subject_id \(want int64, got int32\)"):
        load_meds(meds_dir)


def test_no_train_split(tmp_path):
    root = tmp_path / "m"
    write_meds(root, hand_events(), {1: "tuning", 2: "tuning", 3: "held_out"})
    with pytest.raises(MedsError, match=r"subject_splits\.parquet: no subjects in the 'train' split"):
        load_meds(root)


def test_missing_split_file(meds_dir):
    (meds_dir / "metadata" / "subject_splits.parquet").unlink()
    with pytest.raises(MedsError, match="subject split file missing"):
        load_meds(meds_dir)


def test_unreadable_parquet(meds_dir):
    (meds_dir / "data" / "0.parquet").write_bytes(b"not parquet")
    with pytest.raises(MedsError, match="not a readable parquet file"):
        load_meds(meds_dir)


def test_unsorted_times(tmp_path):
    ev = hand_events()
    ev.loc[3, "time"] = ts("2149-12-31T00:00")  # a lab row placed after a later admission row
    root = tmp_path / "m"
    write_meds(root, ev, HAND_SPLITS)
    with pytest.raises(MedsError, match=r"times of subject 1 are not sorted \(row 3\)"):
        read_shard(root / "data" / "0.parquet")


def test_subject_in_two_shards(tmp_path):
    ev = hand_events()
    root = tmp_path / "m"
    # Subject 1's static rows in shard "a", the rest in shard "b": one subject across two files.
    write_meds(root, ev[ev["subject_id"] != 1], HAND_SPLITS)
    one = ev[ev["subject_id"] == 1]
    other = tmp_path / "other"
    write_meds(other, one.iloc[:5], HAND_SPLITS)
    write_meds(tmp_path / "other2", one.iloc[5:], HAND_SPLITS)
    (other / "data" / "0.parquet").rename(root / "data" / "a.parquet")
    (tmp_path / "other2" / "data" / "0.parquet").rename(root / "data" / "b.parquet")
    with pytest.raises(MedsError, match="subject 1 also appears in"):
        read_events(load_meds(root))


def test_subject_without_split(tmp_path):
    root = tmp_path / "m"
    write_meds(root, hand_events(), {1: "train", 2: "train"})
    with pytest.raises(MedsError, match="1 subjects in the data have no split"):
        read_events(load_meds(root))


def test_infinite_value_is_an_error_and_nan_reads_as_missing(tmp_path):
    ev = hand_events()
    lab = ev.index[ev["numeric_value"].notna()][0]
    ev.loc[lab, "numeric_value"] = float("nan")
    root = tmp_path / "nan"
    write_meds(root, ev, HAND_SPLITS)
    shard = root / "data" / "0.parquet"
    t = pq.read_table(shard)
    i = t.schema.get_field_index("numeric_value")
    values = t.column(i).to_numpy(zero_copy_only=False)
    pq.write_table(t.set_column(i, t.schema.field(i), pa.array(values, pa.float32())), shard)  # NaN, not null
    assert pq.read_table(shard).column("numeric_value").null_count == 0
    df = read_shard(shard)
    assert df["numeric_value"].isna().sum() == ev["numeric_value"].isna().sum()  # NaN reads as MEDS null
    ev.loc[lab, "numeric_value"] = float("inf")
    root = tmp_path / "inf"
    write_meds(root, ev, HAND_SPLITS)
    with pytest.raises(MedsError, match=r"0.parquet: column numeric_value has 1 infinite values"):
        read_shard(root / "data" / "0.parquet")
