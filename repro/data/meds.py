"""Read and validate a MEDS v0.4 dataset directory with pyarrow.

The `meds` package's schemas check columns and dtypes; this module adds what they do not check
(one subject per shard, time order within a subject, a non-empty train split) and turns every
failure into a `MedsError` naming the file and the problem, so a researcher pointing the report at
their own extraction sees one line that says what to fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import meds
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

SUBJECT = meds.DataSchema.subject_id_name
TIME = meds.DataSchema.time_name
CODE = meds.DataSchema.code_name
VALUE = meds.DataSchema.numeric_value_name
COLUMNS = [SUBJECT, TIME, CODE, VALUE]


class MedsError(ValueError):
    """The MEDS input is unusable; the message names the file and the problem."""


@dataclass
class MedsDataset:
    """A validated MEDS directory: its shards and the subject -> split map."""

    root: Path
    shards: list[Path]
    splits: pd.DataFrame  # subject_id, split

    def subjects(self, split: str) -> np.ndarray:
        """Subject ids of one split."""
        return self.splits.loc[self.splits["split"] == split, SUBJECT].to_numpy()


def _schema_error(path: Path, exc: Exception) -> MedsError:
    return MedsError(f"{path}: {exc}")


def load_meds(root: str | Path) -> MedsDataset:
    """Validate the directory layout, every shard's schema and the split file; read no event rows.

    >>> load_meds("/nonexistent")
    Traceback (most recent call last):
    ...
    repro.data.meds.MedsError: /nonexistent: MEDS directory not found
    """
    root = Path(root)
    if not root.is_dir():
        raise MedsError(f"{root}: MEDS directory not found")
    data_dir = root / meds.data_subdirectory
    shards = sorted(data_dir.rglob("*.parquet"))
    if not shards:
        raise MedsError(f"{data_dir}: no parquet shards (expected {meds.data_subdirectory}/**/*.parquet)")
    for shard in shards:
        try:
            schema = pq.read_schema(shard)
        except Exception as exc:  # noqa: BLE001 - any pyarrow failure means an unreadable file
            raise MedsError(f"{shard}: not a readable parquet file ({exc})") from exc
        try:
            meds.DataSchema.validate(_with_optional_value(schema))
        except Exception as exc:  # noqa: BLE001 - flexible_schema raises its own error types
            raise _schema_error(shard, exc) from exc
    split_path = root / meds.subject_splits_filepath
    if not split_path.is_file():
        raise MedsError(
            f"{split_path}: subject split file missing (MEDS needs {meds.subject_splits_filepath})"
        )
    try:
        split_table = pq.read_table(split_path)
    except Exception as exc:  # noqa: BLE001
        raise MedsError(f"{split_path}: not a readable parquet file ({exc})") from exc
    try:
        meds.SubjectSplitSchema.validate(split_table.schema)
    except Exception as exc:  # noqa: BLE001
        raise _schema_error(split_path, exc) from exc
    splits = split_table.to_pandas()
    if splits[SUBJECT].duplicated().any():
        dup = int(splits.loc[splits[SUBJECT].duplicated(), SUBJECT].iloc[0])
        raise MedsError(f"{split_path}: subject {dup} appears in more than one split row")
    counts = splits["split"].value_counts()
    if counts.get(meds.train_split, 0) == 0:
        raise MedsError(f"{split_path}: no subjects in the '{meds.train_split}' split; found {dict(counts)}")
    return MedsDataset(root=root, shards=shards, splits=splits)


def _with_optional_value(schema: pa.Schema) -> pa.Schema:
    """numeric_value may be omitted wholesale (MEDS allows it); validate as if it were present."""
    if VALUE not in schema.names:
        schema = schema.append(pa.field(VALUE, pa.float32()))
    return schema


@dataclass
class ShardArrays:
    """One validated shard as flat arrays; codes stay dictionary-encoded (an index into `dictionary`).

    Why: a shard of a million events holds a few thousand distinct codes, so code-level work (regular
    expressions, vocabulary look-ups) runs once per distinct code and is mapped to events by index.
    """

    path: Path
    subject_id: np.ndarray  # [N] int64
    time: np.ndarray  # [N] int64 microseconds, -1 for null (static)
    code: np.ndarray  # [N] int32 index into `dictionary`
    dictionary: list[str]
    numeric_value: np.ndarray  # [N] float32, NaN when null

    def __len__(self) -> int:
        return len(self.subject_id)

    def codes(self) -> np.ndarray:
        """The code strings as an object array (what `read_shard` returns)."""
        return np.asarray(self.dictionary, dtype=object)[self.code] if len(self) else np.empty(0, object)


def read_shard_arrays(path: Path) -> ShardArrays:
    """Read one shard's core columns and check what the schema cannot: nulls, order, contiguity.

    Vectorised over the shard (no per-event Python); `read_shard` is the DataFrame view of the same.
    """
    path = Path(path)
    try:
        names = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in COLUMNS if c in names], read_dictionary=[CODE])
    except Exception as exc:  # noqa: BLE001
        raise MedsError(f"{path}: not a readable parquet file ({exc})") from exc
    n = table.num_rows
    if table.column(SUBJECT).null_count:
        raise MedsError(f"{path}: column {SUBJECT} has {table.column(SUBJECT).null_count} null values")
    if table.column(CODE).null_count:
        raise MedsError(f"{path}: column {CODE} has {table.column(CODE).null_count} null values")
    table = table.unify_dictionaries().combine_chunks()
    code_col = table.column(CODE)
    if not pa.types.is_dictionary(code_col.type):
        code_col = pc.dictionary_encode(code_col)
    code_arr = (
        code_col.chunk(0) if code_col.num_chunks else pa.array([], pa.dictionary(pa.int32(), pa.string()))
    )
    codes = code_arr.indices.to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
    dictionary = [str(c) for c in code_arr.dictionary.to_pylist()]
    sid = table.column(SUBJECT).to_numpy().astype(np.int64, copy=False)
    time = pc.cast(table.column(TIME), pa.int64()).fill_null(-1).to_numpy().astype(np.int64, copy=False)
    if VALUE in table.column_names:
        value = table.column(VALUE).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    else:
        value = np.full(n, np.nan, dtype=np.float32)
    n_inf = int(np.isinf(value).sum())
    if n_inf:  # NaN is read as a missing value (MEDS null); an infinite lab value is a broken extraction
        raise MedsError(f"{path}: column {VALUE} has {n_inf} infinite values")
    if n:
        change = np.flatnonzero(sid[1:] != sid[:-1]) + 1
        starts = np.concatenate([[0], change])
        if len(np.unique(sid[starts])) != len(starts):
            seen, first_dup = set(), None
            for s in sid[starts]:
                if s in seen:
                    first_dup = s
                    break
                seen.add(s)
            raise MedsError(f"{path}: rows of subject {first_dup} are not contiguous")
        same = sid[1:] == sid[:-1]
        t_prev, t_next = time[:-1], time[1:]
        backwards = same & (t_next >= 0) & (t_prev > t_next)
        static_after = same & (t_next < 0) & (t_prev >= 0)
        bad = np.flatnonzero(backwards | static_after)
        if len(bad):
            i = int(bad[0]) + 1
            raise MedsError(
                f"{path}: times of subject {int(sid[i])} are not sorted (row {i}); MEDS needs each subject's "
                "rows sorted by time with null-time rows first"
            )
    return ShardArrays(path, sid, time, codes, dictionary, value)


def read_shard(path: Path) -> pd.DataFrame:
    """Read one shard's core columns and check what the schema cannot: nulls, order, contiguity.

    Returns a DataFrame with subject_id (int64), time (int64 microseconds, -1 for null/static),
    code (str) and numeric_value (float32, NaN when null).
    """
    sh = read_shard_arrays(path)
    return pd.DataFrame(
        {
            SUBJECT: sh.subject_id,
            TIME: sh.time,
            CODE: sh.codes(),
            VALUE: sh.numeric_value,
        }
    )


def read_events(dataset: MedsDataset, subjects: np.ndarray | None = None) -> pd.DataFrame:
    """All validated events of the dataset (optionally only some subjects), shard by shard.

    A subject found in two shards is an error: MEDS keeps each subject in one file.
    """
    frames, owner = [], {}
    wanted = None if subjects is None else set(int(s) for s in subjects)
    for shard in dataset.shards:
        df = read_shard(shard)
        for s in np.unique(df[SUBJECT].to_numpy()):
            s = int(s)
            if s in owner:
                raise MedsError(
                    f"{shard}: subject {s} also appears in {owner[s]}; MEDS keeps a subject in one shard"
                )
            owner[s] = shard
        if wanted is not None:
            df = df[df[SUBJECT].isin(wanted)]
        frames.append(df)
    events = pd.concat(frames, ignore_index=True)
    unknown = np.setdiff1d(events[SUBJECT].unique(), dataset.splits[SUBJECT].to_numpy())
    if len(unknown):
        raise MedsError(
            f"{dataset.root / meds.subject_splits_filepath}: {len(unknown)} subjects in the data have no split "
            f"(e.g. {int(unknown[0])})"
        )
    return events


REF_LOWER, REF_UPPER = "ref_range_lower", "ref_range_upper"  # MIMIC-IV hosp/labevents column names


def read_reference_ranges(root: str | Path) -> dict[str, tuple[float, float]]:
    """Clinical reference ranges per code from the optional columns of `metadata/codes.parquet`.

    The ranges come from the data's own code metadata (MIMIC-IV labevents' `ref_range_lower` /
    `ref_range_upper`; the synthetic generator writes them for its labs), not from any split, so
    using them leaks nothing. A missing file or missing columns mean no ranges; rows with a null,
    non-finite or inverted range are skipped; a code listed twice keeps its first usable row.

    >>> read_reference_ranges("/nonexistent")
    {}
    """
    path = Path(root) / meds.code_metadata_filepath
    if not path.is_file():
        return {}
    try:
        names = pq.read_schema(path).names
    except Exception as exc:  # noqa: BLE001
        raise MedsError(f"{path}: not a readable parquet file ({exc})") from exc
    if CODE not in names or REF_LOWER not in names or REF_UPPER not in names:
        return {}
    t = pq.read_table(path, columns=[CODE, REF_LOWER, REF_UPPER])
    codes = t.column(CODE).to_pylist()
    lo = pc.cast(t.column(REF_LOWER), pa.float64()).to_numpy(zero_copy_only=False)
    hi = pc.cast(t.column(REF_UPPER), pa.float64()).to_numpy(zero_copy_only=False)
    out: dict[str, tuple[float, float]] = {}
    for c, a, b in zip(codes, lo, hi):
        if c is None or c in out or not (np.isfinite(a) and np.isfinite(b) and a <= b):
            continue
        out[c] = (float(a), float(b))
    return out
