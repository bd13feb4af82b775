"""sb3-contrib's TRPO on rl-baselines3-zoo's preset for an env, one seed: the other side of
`trpo-ext train ENV --preset zoo --seed S` (docs/benchmarks.md, "gSDE: the zoo's Pendulum-v1 preset").

The preset is trpo_ext.presets.ZOO_TRPO's entry, in sb3's own names as the zoo writes them, given to
sb3_contrib.TRPO as they are (n_envs and normalize as the zoo's train.py applies them: make_vec_env and
VecNormalize). Prints the wall-clock of learn(), the mean return of the last 100 training episodes
and a 10-episode deterministic evaluation, the figures `trpo-ext train` prints.

    python bench/sb3_zoo.py Pendulum-v1 --seed 0
"""
import argparse
import time

import numpy as np
import torch
from sb3_contrib import TRPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import VecNormalize

from trpo_ext.presets import ZOO_TRPO, zoo_key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("env")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timesteps", type=int, default=None, help="default: the zoo's n_timesteps")
    args = parser.parse_args()
    torch.set_num_threads(1)
    entry = dict(ZOO_TRPO[zoo_key(args.env)])
    n_envs, normalize = entry.pop("n_envs", 1), entry.pop("normalize", False)
    budget, policy = args.timesteps or int(entry.pop("n_timesteps")), entry.pop("policy")
    entry.pop("n_timesteps", None)
    env = make_vec_env(args.env, n_envs=n_envs, seed=args.seed)
    eval_env = make_vec_env(args.env, n_envs=1, seed=args.seed + 1000)
    if normalize:
        env = VecNormalize(env, **({} if normalize is True else normalize))
        eval_env = VecNormalize(eval_env, training=False, norm_reward=False)
    model = TRPO(policy, env, seed=args.seed, device="cpu", **entry)
    start = time.perf_counter()
    model.learn(budget)
    wall = time.perf_counter() - start
    if normalize:
        eval_env.obs_rms = env.obs_rms
    train = float(np.mean([e["r"] for e in model.ep_info_buffer]))
    mean, std = evaluate_policy(model, eval_env, n_eval_episodes=10, deterministic=True)
    print(f"sb3-contrib {args.env} seed {args.seed}: {budget} steps in {wall:.1f} s; mean return of the last 100 "
          f"training episodes {train:.1f}; deterministic evaluation over 10 episodes {mean:.1f} +/- {std:.1f}")


if __name__ == "__main__":
    main()
