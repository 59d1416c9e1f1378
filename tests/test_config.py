"""Params: unknown keys and wrong types are rejected with the parameter's name."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from repro.config import ParamsError, atomic_path, from_dict, load_params


def test_smoke_params_load():
    p = load_params("params/smoke.yaml")
    assert p.name == "smoke" and p.tokenizer.max_len > 0
    assert len(p.hash()) == 16


@pytest.mark.parametrize("path", sorted(Path("params").glob("*.yaml")), ids=lambda p: p.name)
def test_every_params_file_loads(path):
    assert load_params(path).name == path.stem


def test_unknown_key_is_rejected():
    with pytest.raises(ParamsError, match=r"unknown parameter tokenizer\.maxlen"):
        from_dict({"tokenizer": {"maxlen": 10}})


def test_bool_is_not_read_from_a_string():
    # The original code's argparse type=bool read "False" as True (DESIGN.md section 11).
    with pytest.raises(ParamsError, match=r"data\.synthetic must be true or false"):
        from_dict({"data": {"synthetic": "False"}})


def test_impossible_values():
    with pytest.raises(ParamsError, match=r"tokenizer\.max_len must be >= 4, got -1"):
        from_dict({"tokenizer": {"max_len": -1}})
    with pytest.raises(ParamsError, match=r"models has unknown entries \['gpt'\]"):
        from_dict({"models": ["gpt"]})
    with pytest.raises(ParamsError, match=r"train\.batch_size must be an integer"):
        from_dict({"train": {"batch_size": 1.5}})


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seeds: [0]\nwhat: 1\n")
    with pytest.raises(ParamsError, match=r"bad\.yaml: unknown parameter what"):
        load_params(bad)
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "missing.yaml")


def test_representation_variants_are_checked_when_the_params_load(tmp_path):
    from repro.config import load_params

    p = load_params("params/smoke.yaml")
    assert p.representations.tokenizer(p.tokenizer, "default") == p.tokenizer
    assert p.representations.tokenizer(p.tokenizer, "soft bins").values == "soft"
    assert p.representations.tokenizer(p.tokenizer, "soft bins").max_len == p.tokenizer.max_len
    for bad, msg in (
        ({"x": {"values": "bogus"}}, "representations.variants.x: tokenizer.values"),
        ({"x": {"max_len": 9}}, "max_len is the shared token budget"),
        ({"default": {}}, "'default' is the run's own tokenizer"),
    ):
        with pytest.raises(ParamsError, match=re.escape(msg)):
            load_params("params/smoke.yaml", {"representations.variants": bad})
    with pytest.raises(ParamsError, match="must include ehrmamba"):
        load_params("params/smoke.yaml", {"representations.models": ["transformer"]})


def test_representation_pairs_compare_every_combination_with_ehrmamba_default():
    from repro.config import load_params
    from repro.evaluation import representations
    from repro.training import variants

    p = load_params(
        "params/smoke.yaml",
        {
            "representations.variants": {"xVal": {"values": "xval"}},
            "representations.models": ["ehrmamba", "transformer"],
        },
    )
    pairs = variants.pairs(p)
    assert all(base == "ehrmamba|default" for _, base in pairs)
    assert len(pairs) == len(variants.variants(p)) * len(p.representations.models) - 1
    assert representations.display("transformer|xVal") == "Transformer (SDPA) · xVal"
    xval = variants.variant_params(p, "xVal")
    from repro.training.prepare import model_kwargs

    assert model_kwargs(xval, "ehrmamba")["value_head"] is True
    assert "value_head" not in model_kwargs(p, "ehrmamba")


def test_atomic_path_replaces_whole_or_not_at_all(tmp_path):
    target = tmp_path / "sub" / "results.json"
    with atomic_path(target) as tmp:
        tmp.write_text("old")
        assert not target.exists()  # nothing at the real path until the block ends
    umask = os.umask(0o077)  # a private umask (real data): the file must stay the owner's
    try:
        with atomic_path(tmp_path / "private.pt") as tmp:
            tmp.write_bytes(b"weights")
    finally:
        os.umask(umask)
    assert ((tmp_path / "private.pt").stat().st_mode & 0o777) == 0o600
    assert target.read_text() == "old" and (target.stat().st_mode & 0o777) == 0o666 & ~umask
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half a new fi")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"  # the failed write left the old file, and no temporary behind
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]
    with atomic_path(target) as a, atomic_path(target) as b:
        assert a != b  # two writers of one file never share a temporary
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the last to finish wins, whole


def test_methods_table_states_each_phase_patience():
    from repro.evaluation.summary import run_table
    from repro.report.manifest import environment

    def rows(name):
        t = run_table(load_params(Path(__file__).parents[1] / "params" / f"{name}.yaml"), environment(), None)
        return dict(zip(t["item"], t["value"]))

    mimic, default = rows("mimic-iv"), rows("default")
    assert (
        "finetuning stops after 4 without a 0.1% improvement, pretraining never stops early"
        in mimic["validation / early stopping"]
    )
    assert "stop after 3 without" in default["validation / early stopping"]  # per model there, not run-wide
    assert "pretrain_patience 8" in default["cehr_bert: own settings"]
