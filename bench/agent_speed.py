"""Whole-run training speed: trpo_ext.TRPO vs sb3-contrib's TRPO, plus the bare env stepping rate.

For each env, in one process and interleaved over --repeats rounds (medians reported):
  bare-gym      gymnasium's SyncVectorEnv (SAME_STEP) of the same envs stepped with fixed actions
  bare-lean     trpo_ext's LeanSyncVectorEnv, the vector env its rollouts step, with fixed actions: the
                limit a trpo_ext rollout can reach (the rollout row is a percentage of it)
  trpo_ext      trpo_ext.TRPO(n_envs=E, n_steps=S).learn(budget)
  sb3-same      sb3-contrib TRPO("MlpPolicy", E envs, n_steps=S), the same settings
  sb3-default   sb3-contrib TRPO("MlpPolicy", env) with its defaults (one env, n_steps 2048)
Matched settings (sb3-contrib's defaults, common.SB3_TRPO_DEFAULTS): critic Adam lr 1e-3, 10 epochs
of minibatches of 128, 15 CG iterations, damping 0.1, max_kl 0.01, line search 10 x 0.8, gamma 0.99,
GAE 0.95, 64x64 tanh.

    python bench/agent_speed.py --env CartPole-v1 --env Hopper-v5 --timesteps 20000 --repeats 3
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import gymnasium as gym
import numpy as np
import torch

import trpo_ext
from trpo_ext.envs import LeanSyncVectorEnv

from common import SB3_TRPO_DEFAULTS, learn_sb3, learn_trpo_ext, sb3_names


def bare_rate(env_id: str, n_envs: int, steps: int, lean: bool) -> float:
    fns = [lambda: gym.make(env_id)] * n_envs
    if lean:  # the vector env trpo_ext's rollouts step (vectorization="sync")
        envs = LeanSyncVectorEnv(fns)
    else:
        envs = gym.vector.SyncVectorEnv(fns, autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)
    envs.reset(seed=0)
    action = np.stack([envs.single_action_space.sample() for _ in range(n_envs)])
    t = time.perf_counter()
    for _ in range(steps // n_envs):
        envs.step(action)
    rate = (steps // n_envs) * n_envs / (time.perf_counter() - t)
    envs.close()
    return rate


def run_trpo_ext(env_id, n_envs, n_steps, steps, seed, vectorization="sync"):
    agent = trpo_ext.TRPO(env_id, n_envs=n_envs, n_steps=n_steps, seed=seed, vectorization=vectorization,
                          **SB3_TRPO_DEFAULTS)
    rows, wall, split = learn_trpo_ext(agent, steps)
    ret = rows[-1]["ep_return_mean"] if rows else float("nan")
    agent.close()
    return agent.num_timesteps / wall, ret, split, agent.num_timesteps


def run_sb3(env_id, n_envs, n_steps, steps, seed):
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env

    if n_envs is None:  # sb3-contrib's default set-up
        model = TRPO("MlpPolicy", env_id, seed=seed, verbose=0)
    else:
        model = TRPO("MlpPolicy", make_vec_env(env_id, n_envs=n_envs, seed=seed),
                     **sb3_names(dict(SB3_TRPO_DEFAULTS, n_steps=n_steps)), seed=seed, verbose=0)
    rows, wall, _ = learn_sb3(model, steps)
    ret = rows[-1]["ep_return_mean"] if rows else float("nan")
    return model.num_timesteps / wall, ret


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", action="append", default=None)
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--n-steps", type=int, default=128)
    parser.add_argument("--timesteps", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--vectorization", default="sync", choices=["sync", "async"],
                        help="trpo_ext's vector env; async steps the envs in worker processes (both cores)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    envs = args.env or ["CartPole-v1", "Hopper-v5"]
    print(f"torch {torch.__version__} ({args.threads} thread), gymnasium {gym.__version__}, "
          f"python {platform.python_version()}, {platform.machine()}; {args.timesteps} steps per run, "
          f"{args.repeats} interleaved repeats, medians; E={args.n_envs} envs x S={args.n_steps} steps; "
          f"trpo_ext vectorization={args.vectorization} (bare and sb3: one process)\n")
    print("| env | setup | steps/s | trpo_ext speed-up | mean episode return at the end |")
    print("|---|---|---|---|---|")
    for env_id in envs:
        rates = {k: [] for k in ("bare-gym", "bare-lean", "trpo_ext", "sb3-same", "sb3-default")}
        rets = {k: [] for k in rates}
        rollout_rates = []
        for rep in range(args.repeats):
            rates["bare-gym"].append(bare_rate(env_id, args.n_envs, args.timesteps, lean=False))
            rates["bare-lean"].append(bare_rate(env_id, args.n_envs, args.timesteps, lean=True))
            sps, ret, split, steps = run_trpo_ext(env_id, args.n_envs, args.n_steps, args.timesteps, rep,
                                                  args.vectorization)
            rates["trpo_ext"].append(sps)
            rets["trpo_ext"].append(ret)
            rollout_rates.append(steps / split["rollout"])
            for key, n in (("sb3-same", args.n_envs), ("sb3-default", None)):
                sps, ret = run_sb3(env_id, n, args.n_steps, args.timesteps, rep)
                rates[key].append(sps)
                rets[key].append(ret)
        med = {k: statistics.median(v) for k, v in rates.items()}
        for key in ("trpo_ext", "sb3-same", "sb3-default"):
            ratio = med["trpo_ext"] / med[key]
            print(f"| {env_id} | {key} | {med[key]:,.0f} | {ratio:.2f}x | {statistics.median(rets[key]):.1f} |")
        rollout = statistics.median(rollout_rates)
        bare = "bare-lean" if args.vectorization == "sync" else "bare-gym"
        print(f"| {env_id} | bare gymnasium SyncVectorEnv, fixed actions | {med['bare-gym']:,.0f} | | |")
        print(f"| {env_id} | bare trpo_ext LeanSyncVectorEnv, fixed actions | {med['bare-lean']:,.0f} | | |")
        print(f"| {env_id} | trpo_ext rollout phase (incl. values, GAE) | {rollout:,.0f} "
              f"| {rollout / med[bare]:.0%} of {bare} | |")


if __name__ == "__main__":
    main()
