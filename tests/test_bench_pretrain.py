"""`python -m repro.bench pretrain`: variants of one backbone's pretraining, side by side."""

from __future__ import annotations

import json

import pytest

from repro.config import ParamsError
from repro.profiling import bench_pretrain


def test_variant_text_parses_to_dotted_overrides_and_rejects_malformed_items():
    assert bench_pretrain.parse_variant("base") == ("base", {})
    assert bench_pretrain.parse_variant("nopos:model_sizes.cehr_bert.positions=none") == (
        "nopos",
        {"model_sizes.cehr_bert.positions": "none"},
    )
    with pytest.raises(ValueError, match="not key=value"):
        bench_pretrain.parse_variant("lr2:train.lr")
    with pytest.raises(ValueError, match="no name"):
        bench_pretrain.parse_variant(":train.lr=1")


def test_a_bad_variant_key_fails_before_any_training(tmp_path):
    with pytest.raises(ParamsError, match="batch_size"):
        bench_pretrain.compare(
            "params/smoke.yaml", "cehr_bert", 0, ["base", "bad:train.batch_size=0"], str(tmp_path), None
        )
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="train.per_model.bigbird.pretrain_epochs"):  # would not apply
        bench_pretrain.compare(
            "params/default.yaml", "bigbird", 0, ["short:train.pretrain_epochs=16"], str(tmp_path), None
        )
    with pytest.raises(ValueError, match=r"model_sizes.cehr_bert has keys \['dropuot'\]"):
        bench_pretrain.compare(
            "params/smoke.yaml", "cehr_bert", 0, ["typo:model_sizes.cehr_bert.dropuot=0"], str(tmp_path), None
        )
    assert not any(tmp_path.iterdir())


@pytest.mark.slow  # spawns one training process per variant
def test_variants_train_in_their_own_folders_and_their_curves_differ(tmp_path):
    steps = "train.pretrain_steps=6,train.checkpoint_every=3"
    out = tmp_path / "curves.json"
    res = bench_pretrain.compare(
        "params/smoke.yaml",
        "cehr_bert",
        0,
        [f"slow:{steps},train.lr=0.0001", f"fast:{steps},train.lr=0.003"],
        str(tmp_path / "work"),
        str(out),
    )
    assert list(res) == ["slow", "fast"] == list(json.loads(out.read_text()))  # the order asked for
    for name, r in res.items():
        assert r["steps"] == 6 and r["val"], name  # validated at its end
        assert (tmp_path / "work" / name / "cehr_bert-seed0-pretrain.pt").is_file()
    assert res["slow"]["val"][-1]["loss"] != res["fast"]["val"][-1]["loss"]
