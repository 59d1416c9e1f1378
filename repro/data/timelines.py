"""Token timelines of many subjects as flat arrays with offsets, and their files.

A subject's full timeline is built once and stored as flat arrays with per-subject offsets (CSR layout);
the data path writes one file per shard (`save_timelines`) and assembles them into one memory-mapped
`Timelines` (`assemble_timelines`, `open_timelines`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from repro.config import atomic_path
from repro.data.vocab import (
    K_GAP,
    K_INTERVAL,
    K_VS,
    T_INTERVAL,
    gap_bin,
)


@dataclass
class TokenizerStats:
    """Counts a researcher should see: what was dropped or unknown, and why."""

    events_in: int = 0
    events_outside_visits: int = 0
    events_other_family: int = 0
    event_tokens: int = 0
    unk_tokens: int = 0
    subjects_without_visits: int = 0
    subjects_without_birth: int = 0

    def add(self, other: TokenizerStats) -> None:
        for k, v in asdict(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class Timelines:
    """Full token timelines of many subjects as flat arrays with per-subject offsets (CSR layout).

    The value arrays exist only in the modes that need them (memory: a timeline can hold tens of
    millions of tokens): `values` for xval, `mix_ids` / `mix_w` for soft; None otherwise.
    """

    subject_ids: np.ndarray  # [S]
    offsets: np.ndarray  # [S + 1]
    token_ids: np.ndarray  # [N] int32
    types: np.ndarray  # [N] int8
    kinds: np.ndarray  # [N] int8  (K_*)
    avail_us: np.ndarray  # [N] int64: the token is known from this time on
    ages: np.ndarray  # [N] float32 years
    stats: TokenizerStats = field(default_factory=TokenizerStats)
    values: np.ndarray | None = None  # [N] float32 xval z-score, NaN on tokens without a value
    mix_ids: np.ndarray | None = None  # [N] int32 soft: neighbouring bin's token (the token itself if none)
    mix_w: np.ndarray | None = None  # [N] float32 soft: its weight in [0, 0.5]

    def index(self) -> dict[int, int]:
        return {int(s): i for i, s in enumerate(self.subject_ids)}


VALUE_ARRAYS = ("values", "mix_ids", "mix_w")  # the optional per-token arrays of `Timelines`


def insert_gap_tokens(tl: Timelines, gap_ids: np.ndarray) -> Timelines:
    """fixed13: a `[GAP_k]` before every token 5 minutes or more after the previous token of its subject.

    Vectorised over the flat arrays. The gap token takes the availability time and age of the token
    after it (the gap is known only then), type interval, and kind `K_INTERVAL` before a `[VS]` (between
    visits, a truncation boundary) or `K_GAP` inside a visit. `gap_ids[k - 1]` is the id of `[GAP_k]`.
    """
    n = len(tl.token_ids)
    av = np.asarray(tl.avail_us)
    dt = np.zeros(n, np.int64)
    if n:
        dt[1:] = av[1:] - av[:-1]
    starts = np.asarray(tl.offsets[:-1])
    dt[starts[starts < n]] = 0  # a subject's first token has no previous token
    k = gap_bin(dt)
    new = k > 0
    ins = np.flatnonzero(new)
    before = np.concatenate([[0], np.cumsum(new)]).astype(np.int64)
    pos = np.arange(n, dtype=np.int64) + before[1:]  # new position of each old token
    gpos = pos[ins] - 1

    def spread(a: np.ndarray, fill) -> np.ndarray:
        a = np.asarray(a)
        out = np.empty(n + len(ins), dtype=a.dtype)
        out[pos] = a
        out[gpos] = fill
        return out

    gid = np.asarray(gap_ids, dtype=np.int32)[k[ins] - 1]
    kinds = np.asarray(tl.kinds)
    out = Timelines(
        subject_ids=tl.subject_ids,
        offsets=(np.asarray(tl.offsets) + before[np.asarray(tl.offsets)]).astype(np.int64),
        token_ids=spread(tl.token_ids, gid),
        types=spread(tl.types, T_INTERVAL),
        kinds=spread(kinds, np.where(kinds[ins] == K_VS, K_INTERVAL, K_GAP)),
        avail_us=spread(av, av[ins]),
        ages=spread(tl.ages, np.asarray(tl.ages)[ins]),
        stats=tl.stats,
    )
    if tl.values is not None:
        out.values = spread(tl.values, np.nan)
    if tl.mix_ids is not None:
        out.mix_ids = spread(tl.mix_ids, gid)
    if tl.mix_w is not None:
        out.mix_w = spread(tl.mix_w, 0.0)
    return out


TIMELINE_ARRAYS = ("token_ids", "types", "kinds", "avail_us", "ages")


ARRAY_DTYPES = {
    "token_ids": np.int32,
    "types": np.int8,
    "kinds": np.int8,
    "avail_us": np.int64,
    "ages": np.float32,
    "values": np.float32,  # xval only
    "mix_ids": np.int32,  # soft only
    "mix_w": np.float32,  # soft only
}


def save_timelines(tl: Timelines, path: Path) -> None:
    """One shard's timelines as an uncompressed .npz, written atomically (temp file + rename)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            subject_ids=tl.subject_ids,
            offsets=tl.offsets,
            stats=np.array([getattr(tl.stats, k.name) for k in fields(TokenizerStats)], np.int64),
            **{k: getattr(tl, k) for k in _arrays_of(tl)},
        )


def _arrays_of(tl: Timelines) -> list[str]:
    """The per-token arrays a timelines object holds: the core ones and the value arrays of its mode."""
    return [*TIMELINE_ARRAYS, *(k for k in VALUE_ARRAYS if getattr(tl, k) is not None)]


def load_timelines(path: Path) -> Timelines:
    """Read one shard's timelines file (see `save_timelines`)."""
    with np.load(path) as z:
        stats = TokenizerStats(*(int(x) for x in z["stats"]))
        return Timelines(
            subject_ids=z["subject_ids"],
            offsets=z["offsets"],
            stats=stats,
            **{k: z[k] for k in (*TIMELINE_ARRAYS, *VALUE_ARRAYS) if k in z.files},
        )


def assemble_timelines(files: list[Path], out_dir: Path | None = None) -> Timelines:
    """One `Timelines` from shard files, shard by shard; memory-mapped `.npy` files when `out_dir` is given.

    Written sequentially, one shard in memory at a time, so memory does not grow with the dataset.
    """
    heads = []
    optional: set[str] | None = None
    for f in files:
        with np.load(f) as z:
            heads.append((len(z["subject_ids"]), int(z["offsets"][-1])))
            present = {k for k in VALUE_ARRAYS if k in z.files}
        if optional is not None and present != optional:
            raise ValueError(
                f"{f}: value arrays {sorted(present)} differ from other shards' {sorted(optional)}"
            )
        optional = present
    n_subjects = sum(h[0] for h in heads)
    n_tokens = sum(h[1] for h in heads)
    names = [*TIMELINE_ARRAYS, *(k for k in VALUE_ARRAYS if k in (optional or set()))]
    dtypes = {k: ARRAY_DTYPES[k] for k in names}
    subject_ids = np.empty(n_subjects, np.int64)
    offsets = np.zeros(n_subjects + 1, np.int64)
    stats = TokenizerStats()
    if out_dir is None:
        arrays = {k: np.empty(n_tokens, d) for k, d in dtypes.items()}
        handles = None
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        handles = {}
        for k, d in dtypes.items():
            fh = open(out_dir / f"{k}.npy", "wb")
            np.lib.format.write_array_header_1_0(
                fh,
                {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(d)),
                    "fortran_order": False,
                    "shape": (n_tokens,),
                },
            )
            handles[k] = fh
    s0 = t0 = 0
    try:
        for f in files:
            tl = load_timelines(f)
            ns, nt = len(tl.subject_ids), int(tl.offsets[-1])
            subject_ids[s0 : s0 + ns] = tl.subject_ids
            offsets[s0 + 1 : s0 + ns + 1] = tl.offsets[1:] + t0
            stats.add(tl.stats)
            for k in dtypes:
                a = getattr(tl, k)
                if handles is None:
                    arrays[k][t0 : t0 + nt] = a
                else:
                    handles[k].write(np.ascontiguousarray(a).tobytes())
            s0, t0 = s0 + ns, t0 + nt
    finally:
        for fh in (handles or {}).values():
            fh.close()
    if out_dir is not None:
        np.save(out_dir / "subject_ids.npy", subject_ids)
        np.save(out_dir / "offsets.npy", offsets)
        (out_dir / "stats.json").write_text(json.dumps(asdict(stats)))
        return open_timelines(out_dir)
    return Timelines(subject_ids=subject_ids, offsets=offsets, stats=stats, **arrays)


def open_timelines(d: Path) -> Timelines:
    """Memory-map an assembled timelines directory (pages load on use; nothing is read up front)."""
    stats = TokenizerStats(**json.loads((d / "stats.json").read_text()))
    names = [*TIMELINE_ARRAYS, *(k for k in VALUE_ARRAYS if (d / f"{k}.npy").is_file())]
    return Timelines(
        subject_ids=np.load(d / "subject_ids.npy"),
        offsets=np.load(d / "offsets.npy"),
        stats=stats,
        **{k: np.load(d / f"{k}.npy", mmap_mode="r") for k in names},
    )
