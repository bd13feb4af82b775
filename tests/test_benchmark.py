"""The benchmark's plumbing on tiny CPU configurations (the GPU run of bench/gpu_check.sh takes the
same table-building path, plus the graph-replay rows)."""
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
