"""The fused policy step with segments and masks, data parallel: each of two ranks passes its shard
(with its rows of the mask) and gets what one process gets on the whole batch.

Only this test is left here until it joins tests/test_distributed.py; the ops on every action case
are tested in test_ops.py, test_act.py and test_errors.py, the products in test_fisher.py.

Run as a script under torch.distributed.run, this file is the worker of the data-parallel test:
    python -m torch.distributed.run --nproc-per-node 2 tests/test_action_spaces_ops.py OUT_DIR
"""
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from trpo_ext import _ops  # noqa: E402
from trpo_ext.policies import fused_spec  # noqa: E402

from helpers import RTOL, action_problem, random_mask, rel_err, sample_batch  # noqa: E402

DIST_CASES = ["multicategorical-masked", "bernoulli"]


def _dist_worker(out_dir):
    """Each rank: its shard of the batch through the ops with `group`; rank 0 also the whole batch alone."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD.group_name
    results = {}
    for case in DIST_CASES:
        policy, obs, _, mask = action_problem(case, torch.float64, n=13)
        actions, advantages = sample_batch(policy, obs, mask)
        params = [p.detach() for p in policy.parameters()]
        g = torch.Generator().manual_seed(11)
        fvp_obs = torch.randn(7, obs.shape[1], generator=g, dtype=torch.float64)
        fvp_mask = random_mask(policy.action_spec, 7, g) if mask is not None else None
        trial = [p + 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
        spec = fused_spec(policy)

        def run(rows, fvp_rows, group):
            masks = dict(action_mask=None if mask is None else mask[rows])
            direction = _ops.mlp_policy_direction(
                obs[rows], params, actions[rows], advantages[rows], damping=0.1, iters=10, rtol=0.0,
                fvp_obs=fvp_obs[fvp_rows], group=group,
                **spec.op_kwargs(**masks, fvp_action_mask=None if fvp_mask is None else fvp_mask[fvp_rows]))
            kl, improvement = _ops.mlp_policy_trial(obs[rows], trial, actions[rows], advantages[rows],
                                                    old_dist_params=direction.dist_params, old_log_std=None,
                                                    group=group, **spec.op_kwargs(**masks))
            return dict(g=direction.gradient, x=direction.x, dist_params=direction.dist_params, kl=kl,
                        improvement=improvement)

        # Uneven shards: ranks hold different numbers of states.
        bounds, fvp_bounds = [0, 5, 13], [0, 4, 7]
        results[case] = dict(shard=run(slice(bounds[rank], bounds[rank + 1]),
                                       slice(fvp_bounds[rank], fvp_bounds[rank + 1]), group))
        if rank == 0:
            results[case]["whole"] = run(slice(None), slice(None), None)
            results[case]["bounds"] = bounds
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()
    assert world == 2


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("action_spaces_dist")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--monitor-interval=0.2",
           os.path.abspath(__file__), str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", DIST_CASES)
def test_data_parallel_step_equals_one_process_on_the_whole_batch(dist_results, case):
    whole = dist_results[0][case]["whole"]
    bounds = dist_results[0][case]["bounds"]
    for rank, results in enumerate(dist_results):
        shard = results[case]["shard"]
        for key in ("g", "kl", "improvement"):
            torch.testing.assert_close(shard[key], whole[key], rtol=1e-10, atol=1e-12, msg=f"{key} on rank {rank}")
        # The CG direction relative to its norm, as tests/test_distributed.py compares it: ten CG
        # iterations amplify the shards' different summation order, and an elementwise bound fails
        # on the direction's small entries (seen: 4e-11 off in an entry, 2e-11 in norm, on an AVX2 host).
        assert rel_err(shard["x"], whole["x"]) <= RTOL[torch.float64], f"x on rank {rank}"
        torch.testing.assert_close(shard["dist_params"], whole["dist_params"][bounds[rank]:bounds[rank + 1]])


if __name__ == "__main__":
    _dist_worker(sys.argv[1])
