"""Whole-run training speed: trpo_ext.TRPO vs sb3-contrib's TRPO, plus the bare env stepping rate.

For each env, in one process and interleaved over --repeats rounds (medians reported):
  bare-gym      gymnasium's SyncVectorEnv (SAME_STEP) of the same envs stepped with fixed actions
  bare-lean     trpo_ext's LeanSyncVectorEnv, the vector env its rollouts step, with fixed actions: the
                limit a trpo_ext rollout can reach (the rollout row is a percentage of it)
  trpo_ext      trpo_ext.TRPO(n_envs=E, n_steps=S).learn(budget)
  sb3-same      sb3-contrib TRPO("MlpPolicy", E envs, n_steps=S), the same settings (sb3's make_vec_env:
                a DummyVecEnv, one process)
  sb3-default   sb3-contrib TRPO("MlpPolicy", env) with its defaults (one env, n_steps 2048)
With --envpool (EnvPool installed: pip install ".[envpool]"), also:
  bare-envpool  EnvPool's own pool (NEXT_STEP autoreset) of the same E envs, stepped with random actions
                (64 pre-drawn batches, cycled), its threads as trpo_ext gives them (envpool_env.default_threads)
  bare-envpool-same-step  trpo_ext's EnvPoolVectorEnv (its SAME_STEP form, partial resets included), the
                same actions: the limit a trpo_ext rollout on EnvPool can reach; the two bare EnvPool rates
                are measured in alternating chunks, so that both see the same machine
  trpo_ext-envpool  trpo_ext.TRPO(..., vectorization="envpool").learn(budget)
and a second table: the time split of one update (medians, ms): the rollout (of which the envs' step
calls, timed where the collector makes them; the rest is policy inference, the checks, the statistics,
the value pass and GAE), the gradient + CG solve, the line search, the critic, and what is outside them
(the record, the callback).
Matched settings (sb3-contrib's defaults, common.SB3_TRPO_DEFAULTS): critic Adam lr 1e-3, 10 epochs
of minibatches of 128, 15 CG iterations, damping 0.1, max_kl 0.01, line search 10 x 0.8, gamma 0.99,
GAE 0.95, 64x64 tanh.

    python bench/agent_speed.py --env CartPole-v1 --env Hopper-v5 --timesteps 20000 --repeats 3
    python bench/agent_speed.py --env Hopper-v5 --envpool --timesteps 20480 --repeats 5
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
from trpo_ext.envpool_env import EnvPoolVectorEnv, default_threads
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


def envpool_rates(env_id: str, n_envs: int, steps: int, chunks: int = 4) -> tuple[float, float]:
    """Steps/s of EnvPool's own pool and of trpo_ext's EnvPoolVectorEnv, random actions, measured in
    `chunks` alternating chunks of steps / chunks each (the two see the same machine)."""
    import envpool

    seconds, per_chunk = [0.0, 0.0], steps // chunks // n_envs
    for chunk in range(chunks):
        for k, same_step in enumerate((False, True)):
            if same_step:
                envs = EnvPoolVectorEnv(env_id, n_envs)
                envs.reset(seed=chunk)
            else:
                envs = envpool.make(env_id, "gymnasium", num_envs=n_envs, seed=chunk,
                                    num_threads=default_threads(n_envs))
                envs.reset()
            space = envs.single_action_space
            space.seed(chunk)
            actions = [np.stack([space.sample() for _ in range(n_envs)]) for _ in range(64)]
            t = time.perf_counter()
            for i in range(per_chunk):
                envs.step(actions[i % 64])
            seconds[k] += time.perf_counter() - t
            envs.close()
    return per_chunk * chunks * n_envs / seconds[0], per_chunk * chunks * n_envs / seconds[1]


def run_trpo_ext(env_id, n_envs, n_steps, steps, seed, vectorization="sync"):
    """learn()'s steps/s, the last mean return, the time split per update (s: the record's parts,
    "wall": learn()'s wall-clock, "env": the envs' step calls inside the rollouts) and the steps taken."""
    agent = trpo_ext.TRPO(env_id, n_envs=n_envs, n_steps=n_steps, seed=seed, vectorization=vectorization,
                          **SB3_TRPO_DEFAULTS)
    env_seconds, step = [0.0], agent.envs.step

    def timed_step(actions):  # the rollout's env stepping, timed where the collector calls it
        t = time.perf_counter()
        out = step(actions)
        env_seconds[0] += time.perf_counter() - t
        return out

    agent.envs.step = timed_step
    rows, wall, split = learn_trpo_ext(agent, steps)
    ret = rows[-1]["ep_return_mean"] if rows else float("nan")
    agent.close()
    per_update = {k: v / len(rows) for k, v in dict(split, wall=wall, env=env_seconds[0]).items()}
    return agent.num_timesteps / wall, ret, per_update, agent.num_timesteps


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


def split_table(env_id, n_envs, n_steps, splits: dict) -> None:
    """The time split of one update per trpo_ext set-up (medians over the repeats, ms); the rollout's
    env stepping is the time in its envs' step calls."""
    print(f"\nTime split of one update ({n_envs * n_steps} steps), medians over the repeats, ms:\n")
    print("| env | setup | update | rollout | of which env steps | of which the rest (inference, checks, "
          "statistics, values, GAE) | gradient + CG | line search | critic | outside these |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, per_update in splits.items():
        med = {k: 1e3 * statistics.median(u[k] for u in per_update) for k in per_update[0]}
        rest = 1e3 * statistics.median(u["rollout"] - u["env"] for u in per_update)
        outside = 1e3 * statistics.median(u["wall"] - u["rollout"] - u["cg"] - u["line_search"] - u["critic"]
                                          for u in per_update)
        print(f"| {env_id} | {key} | {med['wall']:.1f} | {med['rollout']:.1f} | {med['env']:.1f} | {rest:.1f} | "
              f"{med['cg']:.1f} | {med['line_search']:.1f} | {med['critic']:.1f} | {outside:.1f} |")


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
    parser.add_argument("--envpool", action="store_true",
                        help="also EnvPool: its bare stepping and learn() with vectorization='envpool'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    envs = args.env or ["CartPole-v1", "Hopper-v5"]
    pool = ""
    if args.envpool:
        import envpool

        pool = f", envpool {envpool.__version__} ({default_threads(args.n_envs)} threads)"
    print(f"torch {torch.__version__} ({args.threads} thread), gymnasium {gym.__version__}{pool}, "
          f"python {platform.python_version()}, {platform.machine()}; {args.timesteps} steps per run, "
          f"{args.repeats} interleaved repeats, medians; E={args.n_envs} envs x S={args.n_steps} steps; "
          f"trpo_ext vectorization={args.vectorization} (bare and sb3: one process)\n")
    print("| env | setup | steps/s | trpo_ext speed-up | mean episode return at the end |")
    print("|---|---|---|---|---|")
    learners = ["trpo_ext", *(["trpo_ext-envpool"] if args.envpool else [])]
    for env_id in envs:
        bares = ["bare-gym", "bare-lean", *(["bare-envpool", "bare-envpool-same-step"] if args.envpool else [])]
        rates = {k: [] for k in (*bares, *learners, "sb3-same", "sb3-default")}
        rets = {k: [] for k in rates}
        splits = {k: [] for k in learners}
        rollout_rates = []
        for rep in range(args.repeats):
            rates["bare-gym"].append(bare_rate(env_id, args.n_envs, args.timesteps, lean=False))
            rates["bare-lean"].append(bare_rate(env_id, args.n_envs, args.timesteps, lean=True))
            if args.envpool:
                own, ours = envpool_rates(env_id, args.n_envs, args.timesteps)
                rates["bare-envpool"].append(own)
                rates["bare-envpool-same-step"].append(ours)
            for key in learners:
                vectorization = "envpool" if key == "trpo_ext-envpool" else args.vectorization
                sps, ret, per_update, steps = run_trpo_ext(env_id, args.n_envs, args.n_steps, args.timesteps, rep,
                                                           vectorization)
                rates[key].append(sps)
                rets[key].append(ret)
                splits[key].append(per_update)
                if key == "trpo_ext":
                    rollout_rates.append(args.n_envs * args.n_steps / per_update["rollout"])
            for key, n in (("sb3-same", args.n_envs), ("sb3-default", None)):
                sps, ret = run_sb3(env_id, n, args.n_steps, args.timesteps, rep)
                rates[key].append(sps)
                rets[key].append(ret)
        med = {k: statistics.median(v) for k, v in rates.items()}
        for key in (*learners, "sb3-same", "sb3-default"):
            ratio = med["trpo_ext"] / med[key]
            print(f"| {env_id} | {key} | {med[key]:,.0f} | {ratio:.2f}x | {statistics.median(rets[key]):.1f} |")
        rollout = statistics.median(rollout_rates)
        bare = "bare-lean" if args.vectorization == "sync" else "bare-gym"
        print(f"| {env_id} | bare gymnasium SyncVectorEnv, fixed actions | {med['bare-gym']:,.0f} | | |")
        print(f"| {env_id} | bare trpo_ext LeanSyncVectorEnv, fixed actions | {med['bare-lean']:,.0f} | | |")
        print(f"| {env_id} | trpo_ext rollout phase (incl. values, GAE) | {rollout:,.0f} "
              f"| {rollout / med[bare]:.0%} of {bare} | |")
        if args.envpool:
            print(f"| {env_id} | bare EnvPool pool, random actions | {med['bare-envpool']:,.0f} | | |")
            print(f"| {env_id} | bare trpo_ext EnvPoolVectorEnv (SAME_STEP), random actions "
                  f"| {med['bare-envpool-same-step']:,.0f} | | |")
            ours = med["trpo_ext-envpool"]
            print(f"\nlearn() with EnvPool: {ours / med['bare-envpool']:.0%} of bare EnvPool stepping "
                  f"({ours / med['bare-envpool-same-step']:.0%} of its SAME_STEP form), "
                  f"{ours / med['sb3-same']:.2f}x sb3-contrib with DummyVecEnv ({args.n_envs} envs), "
                  f"{ours / med['trpo_ext']:.2f}x learn() with gymnasium's envs ({args.vectorization})")
        print("\nEvery run's steps/s, in run order:\n")
        for key, values in rates.items():
            print(f"- {env_id} {key}: {', '.join(f'{v:,.0f}' for v in values)}")
        split_table(env_id, args.n_envs, args.n_steps, splits)


if __name__ == "__main__":
    main()
