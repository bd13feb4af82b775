"""CUDA-only behaviour: the solve never synchronises with the host, and graph replay equals the
uncaptured op. Correctness on CUDA against the CPU and the reference is covered by the `device`
parametrisation of test_fisher.py / test_ops.py, which includes "cuda" whenever a GPU is present."""
import pytest
import torch

import trpo_ext
from trpo_ext import cuda_graphs

from helpers import DEVICES, make_policy, n_params, rel_err

pytestmark = pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU and a CUDA build of trpo_ext")


def _problem(kind, dtype=torch.float32, n=4096):
    policy = make_policy(kind, 17, 6, (64, 64), "tanh", dtype, "cuda")
    obs = torch.randn(n, 17, dtype=dtype, device="cuda")
    b = torch.randn(n_params(policy), dtype=dtype, device="cuda")
    return policy, obs, b


@pytest.mark.parametrize("cuda_graph", [False, True])
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_cg_solve_never_syncs(kind, cuda_graph):
    policy, obs, b = _problem(kind)
    trpo_ext.cg_solve(policy, obs, b, check_finite=False, cuda_graph=cuda_graph)  # capture, warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, info = trpo_ext.cg_solve(policy, obs, b, iters=10, check_finite=False, cuda_graph=cuda_graph)
        y = trpo_ext.fvp(policy, obs, b, check_finite=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(x).all() and torch.isfinite(y).all() and int(info.iterations) >= 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_graph_replay_equals_uncaptured(kind, dtype):
    cuda_graphs.clear_graphs()
    policy, obs, b = _problem(kind, dtype)
    for step in range(3):  # the first call captures; later calls replay with new inputs
        with torch.no_grad():
            for p in policy.parameters():
                p.add_(0.01 * torch.randn_like(p))
        obs.normal_()
        b.normal_()
        x_graph, info_graph = trpo_ext.cg_solve(policy, obs, b, iters=10, rtol=1e-6, cuda_graph=True)
        x_eager, info_eager = trpo_ext.cg_solve(policy, obs, b, iters=10, rtol=1e-6, cuda_graph=False)
        assert rel_err(x_graph, x_eager) <= (1e-12 if dtype == torch.float64 else 1e-5), step
        assert int(info_graph.iterations) == int(info_eager.iterations)
        assert float(info_graph.xAx) == pytest.approx(float(info_eager.xAx), rel=1e-5)


def test_converged_solve_is_frozen_on_device():
    # A problem that converges in a few steps: the masked iterations after convergence must leave
    # x unchanged, so 50 requested iterations equal the CPU answer, which stops early.
    policy = make_policy("gaussian", 3, 1, (2,), "tanh", torch.float64, "cuda")
    obs = torch.randn(8, 3, dtype=torch.float64, device="cuda")
    b = torch.randn(n_params(policy), dtype=torch.float64, device="cuda")
    x_gpu, info_gpu = trpo_ext.cg_solve(policy, obs, b, iters=50, rtol=1e-10)
    x_cpu, info_cpu = trpo_ext.cg_solve(policy.cpu(), obs.cpu(), b.cpu(), iters=50, rtol=1e-10)
    assert int(info_gpu.iterations) == int(info_cpu.iterations) < 50
    assert rel_err(x_gpu.cpu(), x_cpu) <= 1e-10
