"""The benchmark's plumbing on tiny CPU configurations (the GPU run of bench/gpu_check.sh takes the
same table-building path, plus the graph-replay rows)."""
import pytest
import torch

from trpo_ext import benchmark, benchmark_report


def _run(capsys, *extra):
    threads = torch.get_num_threads()
    rc = benchmark.main(["--device", "cpu", "--threads", "1", "--sizes", "64", "--hidden", "8",
                         "--rounds", "1", *extra])
    assert torch.get_num_threads() == threads  # main() restores the thread count
    return rc, capsys.readouterr()


def test_configurations_from_sizes_and_hidden():
    assert benchmark.configurations("cpu") == benchmark.CPU_CONFIGS
    assert {c.batch for c in benchmark.configurations("cuda")} == {2048, 65536, 1048576}
    configs = benchmark.configurations("cpu", sizes=[64, 128], hidden=[(8,)])
    assert {(c.kind, c.hidden, c.batch) for c in configs} == {
        (k, (8,), n) for k in ("gaussian", "categorical") for n in (64, 128)}


def test_tiny_cpu_run_prints_the_table_and_checks(capsys, tmp_path):
    out = tmp_path / "bench.md"
    rc, captured = _run(capsys, "--check", "--out", str(out))
    assert rc == 0, captured.err
    for row in ("| fvp | reference |", "| fvp | fused |", "| fvp | gemm floor |", "| fvp | generic |",
                "| cg x10 | reference |", "| cg x10 | fused |", "| cg x10 | generic |"):
        assert row in captured.out
    assert "fused+graph" not in captured.out  # CUDA only
    assert "rel. error vs reference" in captured.out and "exceeds" not in captured.out
    assert "| gaus 17->8->6 N=64 | 1 | fvp | fused |" in out.read_text()
    # The LayerNorm MLP (a plain module: no fused rows) comes along with --sizes/--hidden.
    for row in ("| ln gaus 17->8->6 N=64 | 1 | fvp | reference |", "| ln gaus 17->8->6 N=64 | 1 | cg x10 | generic |",
                "| ln gaus 17->8->6 N=64 | 1 | policy step | generic |"):
        assert row in captured.out
    assert "| ln gaus 17->8->6 N=64 | 1 | fvp | fused |" not in captured.out


def test_the_conv_configuration_runs_on_the_generic_path():
    cfg = benchmark.Config("categorical", 36, (8,), 3, 4, net="cnn", rounds=1)
    assert str(cfg) == "cnn cate 3x36x36->conv->8->3 N=4"
    res = benchmark.bench_config(cfg, "cpu", rounds=5, cg_iters=3, with_generic=True, check=True)
    assert not res.errors and res.rounds == 1
    assert set(res.times) == {(op, m) for op in ("fvp", "cg", "step") for m in ("reference", "generic")}
    assert res.rel_err[("fvp", "generic")] <= benchmark_report.CHECK_BOUNDS["fvp"]
    assert res.rel_err[("cg", "generic")] <= benchmark_report.CHECK_BOUNDS["cg"]


def test_a_failing_method_is_a_row_and_a_nonzero_exit(capsys, monkeypatch):
    methods = benchmark._methods

    def with_broken(*args, **kwargs):
        m = methods(*args, **kwargs)

        def broken():
            raise RuntimeError("CUDA out of memory (simulated)")
        m[("cg", "broken")] = broken
        return m

    monkeypatch.setattr(benchmark, "_methods", with_broken)
    rc, captured = _run(capsys, "--no-generic")
    assert rc == 1
    assert "| cg x10 | broken | failed | - |" in captured.out
    assert "RuntimeError: CUDA out of memory (simulated)" in captured.out


def test_exhausted_time_budget_skips_and_fails(capsys):
    rc, captured = _run(capsys, "--time-budget", "0")
    assert rc == 1
    assert "Skipped (time budget)" in captured.out


def _result(times, spread=None, rounds=5):
    res = benchmark_report.Result(order=list(times), times=times, spread=spread or {}, rounds=rounds)
    return [((benchmark.CPU_CONFIGS[0], 1), res)]


FUSED = {("fvp", "reference"): 0.016, ("fvp", "fused"): 0.004, ("fvp", "gemm floor"): 0.0017,
         ("cg", "reference"): 0.080, ("cg", "fused"): 0.022}


def test_a_trusted_measurement_is_printed_as_a_result():
    results = _result(FUSED)
    assert benchmark_report.unreliable(results, 10) == []
    text = benchmark_report.report(results, 10, "env", 5, False)
    assert "| cg x10 | fused | 22.000 | 3.64x |" in text and "UNRELIABLE" not in text


def test_a_high_spread_is_reported_as_unreliable_not_as_a_result():
    results = _result(FUSED, spread={("cg", "reference"): 0.6})
    text = benchmark_report.report(results, 10, "env", 5, False)
    assert "| cg x10 | reference | unreliable (spread 60% over 5 rounds) | - |" in text
    assert "| cg x10 | fused | 22.000 | - |" in text  # no ratio to an unreliable reference
    assert "UNRELIABLE" in text and "cg reference: spread 60% over 5 rounds" in text


@pytest.mark.parametrize("cg_fused, says", [(0.003, "a negative cost"), (0.0155, "faster than its own GEMM floor")])
def test_an_impossible_cost_split_is_reported_as_unreliable(cg_fused, says):
    results = _result({**FUSED, ("cg", "fused"): cg_fused})
    split = benchmark_report.cost_split(results, 10)
    assert "| unreliable | unreliable |" in split and says in split
    assert any(says in line for line in benchmark_report.unreliable(results, 10))


def test_quick_runs_one_thread(capsys):
    rc = benchmark.main(["--device", "cpu", "--quick", "--sizes", "64", "--hidden", "8", "--rounds", "1",
                         "--no-generic"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| gaus 17->8->6 N=64 |")]
    assert rc == 0 and rows and {line.split("|")[2].strip() for line in rows} == {"1"}


@pytest.mark.parametrize("net", ["lstm", "gru"])
def test_recurrent_rows(net):
    """The recurrent configurations' rows on a tiny policy: fused through time and the generic path
    agree with double backprop through time; every method runs."""
    cfg = benchmark.Config("gaussian", 3, (4,), 2, 2, net=net, steps=3, rnn=4)
    res = benchmark.bench_config(cfg, "cpu", 1, 2, with_generic=True, check=True)
    assert not res.errors
    assert {m for (_, m) in res.times} == {"reference", "fused", "generic"}
    assert all(err < 1e-3 for err in res.rel_err.values())
    assert str(cfg).startswith(f"{net} gaus 3->{net}4->4->2 T=3 B=2")
