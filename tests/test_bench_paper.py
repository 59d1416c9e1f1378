"""`python -m repro.bench paper` on the CPU with tiny models: every row, the ratios, the extrapolated epochs,
the JSON it writes, the refusals, and the largest-batch search against planted limits."""

from __future__ import annotations

import json
import math

import pytest
import torch

from repro.config import load_params, resolve
from repro.profiling import bench_paper as bp

TINY = {
    "ehrmamba": {"d_model": 16, "n_layers": 1},
    "multibird": {"d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "block_size": 8},
}
LENGTH, CAP = 32, 8


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One CLI run (both models, both phases) and the JSON it wrote."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on two busy cores stall each other (sweep.cpu_threads)
    out = tmp_path_factory.mktemp("bench") / "paper.json"
    try:
        argv = ["--device", "cpu", "--length", str(LENGTH), "--warmup", "1", "--steps", "1"]
        argv += ["--max-batch", str(CAP), "--vocab", "64", "--sizes", json.dumps(TINY), "--out", str(out)]
        assert bp.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    return json.loads(out.read_text())


def test_every_model_and_phase_is_timed(written):
    rows = written["rows"]
    assert {(r["model"], r["phase"]) for r in rows} == {
        (m, p) for m in ("EHRMamba", "MultiBird") for p in ("pretrain", "finetune")
    }
    for r in rows:
        assert r["status"] == "ok" and r["timed_batch"] == r["paper_batch"]
        assert r["tokens_per_s"] > 0 and r["length"] == LENGTH
        assert r["objective"] == {"pretrain": {"EHRMamba": "clm", "MultiBird": "mlm"}}.get(
            r["phase"], {}
        ).get(r["model"], "classify")
        # nothing runs out of memory on the CPU at these sizes: the search stops at the cap
        assert r["largest_batch"] == CAP and r["largest_capped"]
        assert [b for b, _ in r["search"]] == [1, 2, 4, 8]
    paper = {(r["model"], r["phase"]): r["paper_batch"] for r in rows}
    assert paper == {("EHRMamba", "pretrain"): 44, ("MultiBird", "pretrain"): 32,
                     ("EHRMamba", "finetune"): 64, ("MultiBird", "finetune"): 26}  # fmt: skip


def test_epochs_are_extrapolated_from_tokens_per_second(written):
    patients = {"pretrain": 93_787, "finetune": 47_447}
    for r in written["rows"]:
        assert r["epoch_rows"] == patients[r["phase"]]
        assert r["epoch_s"] == pytest.approx(r["epoch_rows"] * LENGTH / r["tokens_per_s"], rel=1e-12)
    paper = {(r["model"], r["phase"]): r["paper_epoch_s"] for r in written["rows"]}
    assert paper[("EHRMamba", "pretrain")] == 14 * 60 + 29
    assert paper[("MultiBird", "finetune")] == 4 * 3600 + 37 * 60
    assert "EXTRAPOLATED" in written["note"] and "one 32-token row per patient" in written["note"]


def test_ratios_come_from_the_rows(written):
    by = {(r["model"], r["phase"]): r for r in written["rows"]}
    for phase in ("pretrain", "finetune"):
        e, m = by[("EHRMamba", phase)], by[("MultiBird", phase)]
        q = written["ratios"][phase]
        assert q["epoch_s"] == pytest.approx(e["epoch_s"] / m["epoch_s"])
        assert q["paper_epoch_s"] == pytest.approx(e["paper_epoch_s"] / m["paper_epoch_s"])
        assert q["tokens_per_s"] == pytest.approx(e["tokens_per_s"] / m["tokens_per_s"])
        assert (
            q["largest_batch"] == pytest.approx(1.0) and q["largest_batch_bound"] == "unknown (both capped)"
        )
        assert q["paper_batch"] == pytest.approx(e["paper_batch"] / m["paper_batch"])
    assert written["ratios"]["pretrain"]["paper_epoch_s"] == pytest.approx(869 / 1445)


def test_table_shows_both_models_the_ratio_and_the_paper(written, capsys):
    table = bp.paper_table(written)
    assert list(table["model"]) == ["EHRMamba", "MultiBird", bp.RATIO] * 2
    assert list(table["phase"]) == ["pretrain"] * 3 + ["finetune"] * 3
    paper = table.columns[-1]
    assert paper.startswith("epoch, paper")
    assert list(table[paper][:2]) == ["14 min 29 s", "24 min 05 s"]
    assert list(table[paper][3:5]) == ["1 h 17 min", "4 h 37 min"]
    assert table[paper].iloc[2] == "0.60" and table["largest batch"].iloc[0] == f">= {CAP}"
    assert table["largest batch"].iloc[2] == "- (both capped)"
    assert "EXTRAPOLATED" in table.attrs["note"]


@pytest.mark.parametrize("limit", [1, 2, 3, 26, 37, 44, 64, 100, 513, 1023, 1024])
def test_search_finds_a_planted_limit_exactly(limit):
    tried = []

    def fits(b: int) -> bool:
        tried.append(b)
        return b <= limit

    largest, capped, tries = bp.largest_batch(fits, cap=1024)
    assert largest == limit and capped == (limit == 1024)
    assert [b for b, _ in tries] == tried and all(ok == (b <= limit) for b, ok in tries)
    assert len(tries) <= 2 * math.log2(1024) + 1


def test_search_edges():
    assert bp.largest_batch(lambda b: False)[:2] == (0, False)
    assert bp.largest_batch(lambda b: b <= 5000, cap=1024)[:2] == (1024, True)
    assert bp.largest_batch(lambda b: b <= 99, cap=100)[:2] == (99, False)  # a cap that is no power of two
    assert bp.largest_batch(lambda b: b <= 100, cap=100)[:2] == (100, True)
    with pytest.raises(ValueError, match="cap"):
        bp.largest_batch(lambda b: True, cap=0)


def test_refuses_the_paper_sizes_on_the_cpu(capsys):
    assert bp.main(["--device", "cpu"]) == 2
    assert "reference (slow path)" in capsys.readouterr().err
    only_multibird = json.dumps({"multibird": TINY["multibird"]})  # EHRMamba would stay 768 x 32
    assert bp.main(["--device", "cpu", "--sizes", only_multibird]) == 2
    assert bp.main(["--device", "cpu", "--sizes", '{"bigbird": {}}']) == 2
    assert "unknown models ['bigbird']" in capsys.readouterr().err


def test_refuses_cuda_without_the_fused_scan(monkeypatch):
    from repro.models import ehrmamba

    monkeypatch.setattr(ehrmamba, "selective_scan_fn", None)
    why = bp.refusal(torch.device("cuda"), TINY)
    assert "reference (slow path)" in why and "mamba" in why


def test_paper_sizes_agree_with_the_mimic_iv_preset():
    """The preset training builds from (params/mimic-iv.yaml) is the paper's size, so the benchmark times it."""
    sizes = load_params(resolve("params/mimic-iv.yaml")).model_sizes
    for model, backbone in bp.BACKBONE.items():
        for key, value in sizes[backbone].items():
            assert bp.PAPER_SIZES[model].get(key) == value, (model, key)


def test_a_paper_batch_out_of_memory_is_recorded_and_timed_at_the_largest(monkeypatch):
    """Plant an allocator limit of 20 rows: the paper's 32 is "out of memory", the search finds 20, the
    step is timed there and the epoch comes from that."""
    real = bp.make_batch

    def limited(vocab, batch, *args, **kwargs):
        if batch > 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB (planted)")
        return real(vocab, batch, *args, **kwargs)

    monkeypatch.setattr(bp, "make_batch", limited)
    params = load_params(resolve("params/mimic-iv.yaml"))
    sizes = bp.merged_sizes(TINY)["multibird"]
    row = bp.measure(
        "multibird", "pretrain", params=params, sizes=sizes, vocab=64, length=LENGTH,
        device=torch.device("cpu"), warmup=0, steps=1, max_batch=64,
    )  # fmt: skip
    assert row["status"] == bp.OUT_OF_MEMORY and row["paper_batch"] == 32
    assert row["largest_batch"] == 20 and not row["largest_capped"] and row["timed_batch"] == 20
    assert row["epoch_s"] == pytest.approx(row["epoch_rows"] * LENGTH / row["tokens_per_s"])
    table = bp.paper_table({"rows": [row], "length": LENGTH, "max_batch": 64, "device": "cpu", "vocab": 64})
    assert table["at paper batch"].iloc[0] == "out of memory" and "(batch 20)" in table["tokens/s"].iloc[0]


def test_paper_batches_agree_with_the_mimic_iv_preset():
    train = load_params(resolve("params/mimic-iv.yaml")).train
    assert train.for_model("ehrmamba").batch_size == bp.PAPER_BATCH[("ehrmamba", "pretrain")]
    assert train.for_model("bigbird").batch_size == bp.PAPER_BATCH[("multibird", "pretrain")]
    assert train.for_model("ehrmamba").finetuning().batch_size == bp.PAPER_BATCH[("ehrmamba", "finetune")]
    mpf = train.for_model("bigbird", "multibird").finetuning()
    assert mpf.batch_size == bp.PAPER_BATCH[("multibird", "finetune")]


def test_notebook_table_says_why_it_was_not_measured():
    """Notebook 02's table: off in params, or on but on a CPU, gives one row naming the reason, no run."""
    smoke = load_params(resolve("params/smoke.yaml"))
    off, res = bp.for_run(smoke, 100)
    assert res is None and "efficiency.paper_bench is off" in off.iloc[0, 0]
    on = load_params(resolve("params/smoke.yaml"), {"efficiency.paper_bench": True})
    cpu, res = bp.for_run(on, 100)
    assert res is None and cpu.iloc[0, 0].startswith("not measured: the run is on cpu")
    with pytest.raises(Exception, match="efficiency.paper_bench_max_batch"):
        load_params(resolve("params/smoke.yaml"), {"efficiency.paper_bench_max_batch": 0})
