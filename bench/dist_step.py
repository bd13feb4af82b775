"""The data-parallel policy step alone: a Hopper-v5-sized `trust_region_step` (11 -> 64x64 -> 3
Gaussian, 15 CG iterations) on 2 x 1,024 states through the process group, against one process on
1,024 and on 2,048 states, interleaved, the same start every time. What the reductions cost without
the rollouts' noise around them (docs/distributed.md, "gloo's event loop").

    python -m torch.distributed.run --nproc-per-node 2 bench/dist_step.py [--repeats 60]
    TRPO_EXT_GLOO_LOOP_PRIORITY=normal|low|idle python -m torch.distributed.run --nproc-per-node 2 bench/dist_step.py

Rank 0 prints the median, 90th percentile and mean of each (the first 5 calls of each dropped).
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import gymnasium as gym
import torch
import torch.distributed as dist

import trpo_ext
from trpo_ext import distributed

from common import median_p90_mean

SETTINGS = dict(max_kl=0.01, damping=0.1, cg_iters=15)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    group = distributed.resolve_group("auto")
    distributed.lower_gloo_event_loops(group)  # as an agent built with the group does
    rank = dist.get_rank()
    torch.manual_seed(0)
    policy = trpo_ext.MLPPolicy(11, gym.spaces.Box(-1, 1, (3,)), hidden=(64, 64), activation="tanh")
    start = [p.detach().clone() for p in policy.parameters()]
    g = torch.Generator().manual_seed(rank)
    obs = torch.randn(1024, 11, generator=g)
    with torch.no_grad():
        actions = policy(obs).sample()
    advantages = torch.randn(1024, generator=g)
    both = (torch.cat([obs, obs]), torch.cat([actions, actions]), torch.cat([advantages, advantages]))

    def step(process_group, o, a, adv) -> float:
        with torch.no_grad():
            for p, s in zip(policy.parameters(), start):
                p.copy_(s)
        t = time.perf_counter()
        trpo_ext.trust_region_step(policy, o, a, adv, process_group=process_group, **SETTINGS)
        return time.perf_counter() - t

    times = {"one process, 1,024 states": [], "2 ranks x 1,024 states": [], "one process, 2,048 states": []}
    for _ in range(args.repeats):
        times["one process, 1,024 states"].append(step(None, obs, actions, advantages))
        dist.barrier()
        times["2 ranks x 1,024 states"].append(step(group, obs, actions, advantages))
        times["one process, 2,048 states"].append(step(None, *both))
        dist.barrier()
    if rank == 0:
        print(f"torch {torch.__version__}, gloo, 2 ranks on one machine ({os.cpu_count()} cores), python "
              f"{platform.python_version()}; gloo event loops: {os.environ.get('TRPO_EXT_GLOO_LOOP_PRIORITY', 'low')}; "
              f"{args.repeats} interleaved calls each, 1 torch thread per rank\n")
        print("| step | median (ms) | p90 (ms) | mean (ms) |")
        print("|---|---|---|---|")
        for name, ts in times.items():
            median, p90, mean = median_p90_mean(ts[5:])
            print(f"| {name} | {median * 1e3:.2f} | {p90 * 1e3:.2f} | {mean * 1e3:.2f} |")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
