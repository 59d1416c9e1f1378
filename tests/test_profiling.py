"""Profiling (H2, H4) on the CPU: the timing helper, OOM rows, the reference-path refusal, slopes, verdicts,
the long-history runs on a tiny cohort, and the mamba_ssm benchmark's CPU behaviour."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from repro.config import ParamsError, load_params
from repro.data.synthetic import write_synthetic_meds
from repro.models.registry import build_model
from repro.profiling import bench_step, long_history, scaling, sweep, timing
from repro.training.prepare import prepare

CPU = torch.device("cpu")
VOCAB = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: tiny models, and no OpenMP barrier stalls on a shared 2-core CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(name: str = "ehrmamba"):
    kw = {"d_model": 16, "n_layers": 1}
    if name in ("cehr_bert", "transformer", "bigbird"):
        kw["n_heads"] = 2
    return lambda length: build_model(
        name, VOCAB, **kw, **({"max_len": length} if name != "ehrmamba" else {})
    )


def test_measure_times_a_real_step_on_cpu():
    row = sweep.measure("ehrmamba", tiny(), 32, 2, device=CPU, warmup=1, steps=2)
    assert list(row) == list(sweep.ROW_COLUMNS)
    assert row["status"] == "ok" and row["timer"] == "wall-clock" and row["dtype"] == "fp32"
    assert row["kernel_path"] == "reference-steps" and row["device"].startswith("cpu (")
    assert row["params"] > 0 and row["ms_per_step"] > 0
    assert row["tokens_per_s"] == pytest.approx(2 * 32 / (row["ms_per_step"] / 1000))
    assert np.isnan(row["peak_mem_gib"]) and row["mem_source"] == "not measured (CPU)"


@pytest.mark.parametrize("name", ["cehr_bert", "bigbird", "transformer"])
def test_encoders_and_decoders_take_their_pretraining_step(name):
    row = sweep.measure(name, tiny(name), 48, 2, device=CPU, warmup=1, steps=1)
    assert row["status"] == "ok", row["status"]
    assert row["kernel_path"] != "-"


def test_time_step_runs_warmup_then_timed_steps():
    calls = []
    t = timing.time_step(lambda: calls.append(1), CPU, warmup=2, steps=3)
    assert len(calls) == 5 and len(t.ms_steps) == 3 and t.ms_per_step == pytest.approx(np.median(t.ms_steps))


def _raising(exc_at: dict[int, BaseException]):
    """A step factory whose step raises the given error at the given lengths."""

    def factory(model, batch, device):
        L = batch["input_ids"].shape[1]

        def step():
            if L in exc_at:
                raise exc_at[L]

        return step

    return factory


@pytest.mark.parametrize(
    "exc,status",
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB"), "oom"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
        (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1e12 bytes"), "oom"),
        (ValueError("shapes do not match"), "error: ValueError: shapes do not match"),
    ],
)
def test_out_of_memory_is_a_data_point_and_the_sweep_goes_on(exc, status):
    rows = sweep.sweep(
        {"ehrmamba": tiny()},
        [32, 16, 64],
        [2],
        device=CPU,
        warmup=1,
        steps=1,
        step_factory=_raising({32: exc}),
        progress=False,
    )
    assert rows["length"].tolist() == [16, 32, 64]  # shortest first, each length attempted once
    assert rows["status"].tolist() == ["ok", status, "ok"]
    failed = rows.iloc[1]
    assert np.isnan(failed["ms_per_step"]) and failed["kernel_path"] == "reference-steps"


def test_time_budget_starts_after_each_models_first_row_and_skips_the_rest():
    rows = sweep.sweep(
        {"ehrmamba": tiny(), "transformer": tiny("transformer")},
        [16, 32],
        [1, 2],
        device=CPU,
        warmup=1,
        steps=1,
        time_budget_s=1e-9,
        progress=False,
    )
    first = (rows["length"] == 16) & (rows["batch"] == 1)
    assert (rows.loc[first, "status"] == timing.OK).all() and (rows.loc[first, "row_s"] > 0).all()
    assert rows.loc[~first, "status"].str.startswith(timing.SKIP_BUDGET).all()
    assert rows.loc[~first, "row_s"].isna().all()


class _FakeCudaModel(nn.Module):
    """Stands for a model on CUDA whose mixer fell back to the reference path (no GPU needed)."""

    vocab_size = VOCAB
    causal = True

    def __init__(self) -> None:
        super().__init__()
        self.kernel_path = "reference-chunked"

    def n_params(self) -> int:
        return 7


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(sweep, "device_name", lambda d: "cuda (fake)")
    monkeypatch.setattr(sweep, "free_memory", lambda d: None)
    monkeypatch.setattr(sweep, "probe_kernel_path", lambda m, d: m.kernel_path)
    monkeypatch.setattr(sweep, "synthetic_batch", lambda *a, **k: {})
    fixed = timing.Timing(12.0, [12.0], timing.TIMER_CUDA, 1.5, timing.MEM_CUDA)
    monkeypatch.setattr(sweep, "time_step", lambda *a, **k: fixed)


def test_reference_path_on_cuda_is_refused(fake_cuda):
    row = sweep.measure(
        "ehrmamba", lambda L: _FakeCudaModel(), 2048, 1, device="cuda", step_factory=lambda *a: lambda: None
    )
    assert row["status"] == "skipped: reference path on CUDA"
    assert row["kernel_path"] == "reference-chunked" and np.isnan(row["ms_per_step"])
    assert row["timer"] == "cuda-events" and row["dtype"] == "bf16 autocast"


def test_reference_path_on_cuda_is_labelled_when_allowed(fake_cuda):
    row = sweep.measure(
        "ehrmamba",
        lambda L: _FakeCudaModel(),
        2048,
        4,
        device="cuda",
        allow_reference=True,
        step_factory=lambda *a: lambda: None,
    )
    assert row["status"] == "ok" and row["kernel_path"] == "reference-chunked [reference (slow path)]"
    assert row["ms_per_step"] == 12.0 and row["tokens_per_s"] == pytest.approx(4 * 2048 / 0.012)
    assert row["peak_mem_gib"] == 1.5 and row["mem_source"] == "torch.cuda.max_memory_allocated"


def test_fused_path_on_cuda_is_timed(fake_cuda):
    model = _FakeCudaModel()
    model.kernel_path = "mamba_ssm.selective_scan_cuda"
    row = sweep.measure(
        "ehrmamba", lambda L: model, 2048, 1, device="cuda", step_factory=lambda *a: lambda: None
    )
    assert row["status"] == "ok" and row["kernel_path"] == "mamba_ssm.selective_scan_cuda"


def _rows(spec):
    """Rows from (model, length, batch, ms, gib, status) tuples."""
    cols = ["model", "length", "batch", "ms_per_step", "peak_mem_gib", "status"]
    df = pd.DataFrame(spec, columns=cols)
    df["kernel_path"] = "k"
    df["device"] = "cuda (fake)"
    df["timer"] = "cuda-events"
    df["tokens_per_s"] = df["batch"] * df["length"] / df["ms_per_step"] * 1000
    return df


def test_slopes_recover_power_laws():
    L = np.array([512, 1024, 2048, 4096, 8192, 16384])
    rng = np.random.default_rng(0)
    spec = [("ehrmamba", x, 1, 0.01 * x * rng.lognormal(0, 0.02), 1e-4 * x, "ok") for x in L]
    spec += [("transformer", x, 1, 1e-6 * x**2 * rng.lognormal(0, 0.02), 1e-4 * x, "ok") for x in L]
    spec += [("transformer", 32768, 1, np.nan, np.nan, "oom")]
    slopes = scaling.scaling_slopes(_rows(spec), last=4).set_index("model")
    assert slopes.loc["ehrmamba", "time slope"] == pytest.approx(1.0, abs=0.05)
    assert slopes.loc["transformer", "time slope"] == pytest.approx(2.0, abs=0.05)
    assert slopes.loc["transformer", "memory slope"] == pytest.approx(1.0, abs=1e-6)
    assert slopes.loc["ehrmamba", "lengths fitted"] == "2048-16384 (4)"


def test_h2_verdicts_follow_the_rule():
    spec = [
        ("ehrmamba", 1024, 1, 10.0, 1.0, "ok"),
        ("ehrmamba", 4096, 1, 40.0, 4.0, "ok"),
        ("cehr_bert", 1024, 1, 20.0, 8.0, "ok"),
        ("cehr_bert", 4096, 1, np.nan, np.nan, "oom"),
        ("transformer", 1024, 1, 8.0, 1.0, "ok"),
        ("transformer", 4096, 1, 60.0, 6.0, "ok"),
        ("bigbird", 1024, 1, 5.0, 1.0, "ok"),
        ("bigbird", 4096, 1, 20.0, 4.1, "ok"),
    ]
    cmp = scaling.h2_comparisons(_rows(spec)).set_index("baseline")
    assert cmp.loc["cehr_bert", "verdict"] == "supported" and cmp.loc["cehr_bert", "length"] == 4096
    assert cmp.loc["transformer", "verdict"] == "supported"
    assert cmp.loc["transformer", "time ratio"] == pytest.approx(40 / 60)
    assert cmp.loc["bigbird", "verdict"] == "not supported"  # twice as slow at 4096


def test_h2_reads_bigbird_and_h2_all_every_transformer():
    """H2 is the paper's claim (against MultiBird, BigBird's attention): two faster, smaller Transformers
    do not make it supported while BigBird is as fast; H2 (all) needs every Transformer beaten."""
    from repro.config import default_hypotheses
    from repro.evaluation import results

    rules = default_hypotheses()
    spec = (
        [("ehrmamba", 4096, b, 40.0, 4.0, "ok") for b in (1, 8)]
        + [("cehr_bert", 4096, b, 80.0, 8.0, "ok") for b in (1, 8)]
        + [("transformer", 4096, b, 60.0, 6.0, "ok") for b in (1, 8)]
        + [("bigbird", 4096, 1, 80.0, 8.0, "ok"), ("bigbird", 4096, 8, 40.0, 8.0, "ok")]
    )
    cmp = scaling.h2_comparisons(_rows(spec))
    assert set(cmp["new"]) == {"ehrmamba"}
    assert results.rule_verdict(cmp, rules["H2"]) == "inconclusive"  # as fast as BigBird at batch 8
    assert results.rule_verdict(cmp, rules["H2 (all)"]) == "inconclusive"
    faster = cmp[cmp["batch"] == 1]
    assert results.rule_verdict(faster, rules["H2"]) == "supported"
    assert results.rule_verdict(faster, rules["H2 (all)"]) == "supported"
    assert results.rule_verdict(cmp[cmp["baseline"] != "bigbird"], rules["H2"]) == results.NOT_RUN
    slower = cmp.assign(verdict=["supported"] * (len(cmp) - 1) + ["not supported"])
    assert results.rule_verdict(slower, rules["H2 (all)"]) == "not supported"


def test_h2_on_cpu_rests_on_time_alone():
    spec = [("ehrmamba", 256, 4, 10.0, np.nan, "ok"), ("transformer", 256, 4, 10.5, np.nan, "ok")]
    cmp = scaling.h2_comparisons(_rows(spec))
    assert cmp["verdict"].tolist() == ["inconclusive"] and "time only" in cmp["why"].iloc[0]


def test_h2_reference_scan_supports_but_never_refutes():
    """The smoke run's CPU sweep timed EHRMamba's pure-PyTorch scan 3x slower than BigBird and H2 read "not
    supported": a verdict on the fallback, not on the kernels the claim is about."""
    slow = _rows([("ehrmamba", 256, 4, 30.0, np.nan, "ok"), ("bigbird", 256, 4, 10.0, np.nan, "ok")])
    fast = _rows([("ehrmamba", 256, 4, 5.0, np.nan, "ok"), ("bigbird", 256, 4, 10.0, np.nan, "ok")])
    assert scaling.h2_comparisons(slow)["verdict"].tolist() == ["not supported"]  # on the kernels
    for rows in (slow, fast):
        rows.loc[rows["model"] == "ehrmamba", "kernel_path"] = "reference-chunked"
    cmp = scaling.h2_comparisons(slow)
    assert cmp["verdict"].tolist() == ["inconclusive"]
    assert "reference scan (reference-chunked)" in cmp["why"].iloc[0]
    assert scaling.h2_comparisons(fast)["verdict"].tolist() == ["supported"]


def test_oom_boundary_and_h4_memory_come_from_measured_rows():
    spec = [
        ("ehrmamba", 16384, 1, 10.0, 2.0, "ok"),
        ("ehrmamba", 65536, 1, 40.0, 8.0, "ok"),
        ("cehr_bert", 16384, 1, 30.0, 20.0, "ok"),
        ("cehr_bert", 65536, 1, np.nan, np.nan, "oom"),
        ("transformer", 16384, 1, 9.0, 2.0, "ok"),
        ("transformer", 65536, 1, 90.0, 8.0, "ok"),
    ]
    rows = _rows(spec)
    b = scaling.oom_boundary(rows).set_index("model")
    assert (
        b.loc["ehrmamba", "longest length trained"] == 65536
        and b.loc["ehrmamba", "failure"] == "no failure up to 65536"
    )
    assert b.loc["cehr_bert", "longest length trained"] == 16384
    assert b.loc["cehr_bert", "first length that failed"] == 65536 and b.loc["cehr_bert", "failure"] == "oom"
    mem = scaling.h4_memory_comparisons(rows).set_index("baseline")
    assert mem.loc["cehr_bert", "verdict"] == "supported"
    assert mem.loc["transformer", "verdict"] == "inconclusive"


def test_epoch_estimate_counts_steps():
    rows = _rows([("ehrmamba", 256, 16, 100.0, np.nan, "ok"), ("bigbird", 256, 16, np.nan, np.nan, "oom")])
    e = scaling.epoch_estimates(rows, n_samples=33, n_tokens=6000).set_index("model")
    assert e.loc["ehrmamba", "steps per epoch"] == 2  # the loop's whole batches, as training counts them
    assert e.loc["ehrmamba", "epoch seconds (steps only)"] == pytest.approx(0.2)
    assert e.loc["ehrmamba", "real tokens/s"] == pytest.approx(30000)
    assert np.isnan(e.loc["bigbird", "epoch seconds (steps only)"])


def test_efficiency_params_validate_and_name_the_parameter():
    p = load_params("params/smoke.yaml")
    assert p.efficiency.lengths == [64, 128, 256] and p.efficiency.cpu_threads == 1
    for key, value, match in [
        ("efficiency.models", ["mamba3"], "efficiency.models"),
        ("efficiency.lengths", [512, 512], "efficiency.lengths"),
        ("efficiency.warmup_steps", 0, "efficiency.warmup_steps"),
        ("efficiency.time_budget_s", 0, "efficiency.time_budget_s"),
        ("efficiency.allow_reference_on_cuda", "yes", "efficiency.allow_reference_on_cuda"),
        ("efficiency.long_task", "los_1w", "efficiency.long_task"),
    ]:
        overrides = {key: value} | ({"tasks": ["mortality_1m"]} if key == "efficiency.long_task" else {})
        with pytest.raises(ParamsError, match=match):
            load_params("params/smoke.yaml", overrides)
    eff = load_params("params/default.yaml").efficiency  # the GPU run reaches far past max_len
    assert eff.lengths[-1] >= 16384 and eff.boundary_lengths[-1] == 131072


# --------------------------------------------------------------------------------------------------------
# the notebook helpers on a tiny cohort
# --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    root = tmp_path_factory.mktemp("eff") / "meds"
    write_synthetic_meds(root, 150, seed=3, shard_size=150)
    params = load_params(
        "params/smoke.yaml",
        {
            "tasks": ["mortality_1m"],
            "model_sizes": {
                "ehrmamba": {"d_model": 16, "n_layers": 1},
                "transformer": {"n_layers": 1, "n_heads": 2},
            },
            "efficiency.long_models": ["ehrmamba", "transformer"],
            "efficiency.long_lengths": [16, 64],
            "efficiency.long_finetune_steps": 2,
            "efficiency.long_batch_size": 4,
            "efficiency.long_history_tokens": 32,
            "eval.n_bootstrap": 20,
        },
    )
    return prepare(params, data_dir=root)


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_efficiency_sweep_uses_matched_sizes(prep, keep_threads):
    torch.set_num_threads(2)
    rows = sweep.efficiency_sweep(prep, [16, 32], [2], ["ehrmamba", "transformer"], progress=False)
    assert (rows["status"] == "ok").all()
    n = rows.groupby("model")["params"].first()
    assert abs(n["transformer"] - n["ehrmamba"]) <= 0.1 * n["ehrmamba"]
    assert torch.get_num_threads() == 1  # efficiency.cpu_threads of the smoke params


def test_long_history_runs_score_every_length(prep, tmp_path, keep_threads):
    view = long_history.at_length(prep, 64)
    assert view.params.tokenizer.max_len == 64 and view.tokenizer.params.max_len == 64
    assert prep.params.tokenizer.max_len == 128  # the run's own view is untouched (smoke's max_len)
    runs = long_history.long_history_runs(prep, tmp_path)
    assert [(r.model, r.length, r.status) for r in runs] == [
        ("ehrmamba", 16, "ok"),
        ("transformer", 16, "ok"),
        ("ehrmamba", 64, "ok"),
        ("transformer", 64, "ok"),
    ]
    held_out = prep.labels["mortality_1m"]
    assert all(len(r.predictions) == (held_out["split"] == "held_out").sum() for r in runs)
    history = long_history.history_tokens(prep, "mortality_1m")
    table = long_history.long_history_auroc(runs, history, 32, 20, 0.95, "mortality_1m")
    assert table["key"].tolist() == [
        "EHRMamba @ 16",
        "Transformer (SDPA) @ 16",
        "EHRMamba @ 64",
        "Transformer (SDPA) @ 64",
    ]
    assert table["auroc_all"].between(0, 1).all()
    cmp = long_history.h4_accuracy_comparisons(runs, history, 32, 20, 0.95, "mortality_1m")
    assert cmp["comparison"].tolist() == ["EHRMamba @ 64 − Transformer (SDPA) @ 64"]
    assert long_history.headline(cmp, table) == "one seed"  # the long-history runs train one seed


# --------------------------------------------------------------------------------------------------------
# the mamba_ssm benchmark
# --------------------------------------------------------------------------------------------------------
def test_bench_step_says_why_it_cannot_run_on_cpu(capsys):
    assert bench_step.main([]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "needs a CUDA GPU" in err and "Traceback" not in err


def test_bench_step_names_missing_mamba_ssm(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    try:
        import mamba_ssm  # noqa: F401

        pytest.skip("mamba_ssm is installed here")
    except ImportError:
        pass
    assert "mamba_ssm" in bench_step.requirements()


def test_bench_step_sizes_come_from_params_and_flags():
    args = bench_step.parse_args(["--n-layers", "2", "--lengths", "64", "128"])
    expected = {"d_model": 256, "n_layers": 2, "d_state": 16, "d_conv": 4, "expand": 2, "recompute": False}
    assert bench_step.sizes(args) == expected
    assert bench_step.sizes(bench_step.parse_args(["--n-layers", "2", "--recompute"]))["recompute"] is True
    with pytest.raises(SystemExit):
        bench_step.parse_args(["--vocab", "1001"])


class _TinyLM(nn.Module):
    """Stands for MambaLMHeadModel: ``model(ids).logits``."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.head = nn.Linear(8, vocab)

    def forward(self, ids):
        return type("Out", (), {"logits": self.head(self.emb(ids))})()


def test_bench_step_run_and_summary_on_cpu(monkeypatch):
    monkeypatch.setattr(bench_step, "bare_model", lambda s, vocab, device: (_TinyLM(vocab), "fake"))
    args = bench_step.parse_args(
        [
            "--lengths",
            "32",
            "64",
            "--scaling-length",
            "128",
            "--long-length",
            "256",
            "--batch",
            "2",
            "--vocab",
            "48",
        ]
        + ["--d-model", "16", "--n-layers", "1", "--warmup", "1", "--steps", "1"]
    )
    rows = bench_step.run(args, device="cpu")
    assert (
        rows[["length", "batch"]].values.tolist()
        == [[32, 2]] * 2 + [[64, 2]] * 2 + [[128, 2]] * 2 + [[256, 1]] * 2
    )
    assert (rows["status"] == "ok").all() and set(rows["model"]) == {bench_step.OURS, bench_step.BARE}
    lines = bench_step.summary(rows, args.lengths, args.scaling_length, args.long_length, args.batch)
    assert [line.split(":")[0] for line in lines] == [
        "ours / bare tokens/s at L=32, batch 2",
        "ours / bare tokens/s at L=64, batch 2",
        "EHRMamba tokens/s at L=128 / at L=32, batch 2",
        "EHRMamba at L=256, batch 1",
    ]
    rows.loc[rows["model"] == bench_step.BARE, "status"] = "oom"
    assert (
        "n/a" in bench_step.summary(rows, [32], 0, 0, 2)[0]
        and "bare: oom" in bench_step.summary(rows, [32], 0, 0, 2)[0]
    )


def test_efficiency_sweep_takes_the_steps_it_is_given(prep, keep_threads, monkeypatch):
    """The boundary sweep asks for one warm-up and one timed step instead of the params' counts."""
    seen = []
    real = timing.time_step

    def counting(step, device, warmup=2, steps=5):
        seen.append((warmup, steps))
        return real(step, device, warmup, steps)

    monkeypatch.setattr(sweep, "time_step", counting)
    sweep.efficiency_sweep(prep, [16], [2], ["ehrmamba"], progress=False, steps=(1, 1))
    eff = prep.params.efficiency
    sweep.efficiency_sweep(prep, [16], [2], ["ehrmamba"], progress=False)
    assert seen == [(1, 1), (eff.warmup_steps, eff.timed_steps)]


def test_the_graphs_benchmark_trains_on_something_learnable():
    """bench graphs compares eager and graphed loss curves: on random tokens both sit at ln(vocab) and agree
    whatever the capture does. Its histories draw from one topic each, and the label is the topic's."""
    from repro.profiling.bench_graphs import _histories

    items, labels = _histories(400, 1024, 256, 0)
    assert 0.05 < labels.mean() < 0.2
    in_topic = [np.sort(np.bincount(e.input_ids[1:]))[-8:].sum() / (len(e) - 1) for e in items]
    assert np.median(in_topic) > 0.85  # 90 % of each history's codes come from its topic's 8
    topic_of = {tuple(np.argsort(np.bincount(e.input_ids[1:], minlength=1024))[-8:]) for e in items[:50]}
    assert len(topic_of) > 20  # and the topics differ: the context, not the marginal, predicts the next code


def test_efficiency_sweep_builds_ehrmamba_recomputing_when_asked(prep, keep_threads):
    """efficiency.ehrmamba_recompute: H2 / H4 rows of EHRMamba come from the recomputing mixer and say so;
    the epoch estimates (as_trained) and the other models are built as training builds them."""
    eff = dataclasses.replace(prep.params.efficiency, ehrmamba_recompute=True)
    lean = dataclasses.replace(prep, params=dataclasses.replace(prep.params, efficiency=eff))
    rows = sweep.efficiency_sweep(lean, [16], [2], ["ehrmamba", "transformer"], progress=False)
    paths = rows.set_index("model")["kernel_path"]
    assert (rows["status"] == "ok").all()
    assert paths["ehrmamba"].endswith(sweep.RECOMPUTE_LABEL)
    assert not paths["transformer"].endswith(sweep.RECOMPUTE_LABEL)
    as_trained = sweep.efficiency_sweep(lean, [16], [2], ["ehrmamba"], progress=False, as_trained=True)
    plain = sweep.efficiency_sweep(prep, [16], [2], ["ehrmamba"], progress=False)
    for r in (as_trained, plain):
        assert not r["kernel_path"].iloc[0].endswith(sweep.RECOMPUTE_LABEL)
        assert r["params"].iloc[0] == rows.set_index("model")["params"]["ehrmamba"]


def test_h4_setup_table_says_how_the_long_history_runs_were_trained():
    from repro.config import EfficiencyParams
    from repro.profiling.long_history import setup_table

    eff = EfficiencyParams(long_pretrain_steps=0, long_finetune_steps=12, long_lengths=[32, 128])
    t = setup_table(eff, {"threshold": 256, "n_subjects": 97, "n_positive": 12}, 200).set_index("setting")
    assert t.loc["subjects in the subgroup", "value"] == "97 of 200"
    assert t.loc["positives in the subgroup", "value"] == "12"
    assert t.loc["pretraining", "value"] == "none (finetuned from random weights)"
    assert t.loc["finetuning", "value"].startswith("12 steps at batch 8")
    assert (
        "256 tokens" in t.loc["subgroup", "value"]
        and t.loc["lengths each model may read", "value"] == "32, 128"
    )
    pre = setup_table(EfficiencyParams(long_pretrain_steps=50), {"threshold": 1, "n_subjects": 0}, 5)
    assert pre.set_index("setting").loc["pretraining", "value"] == "50 steps"
