"""Data-parallel training speed: `trpo-ext train --nproc 1` vs `--nproc 2` vs sb3-contrib's TRPO with
DummyVecEnv and with SubprocVecEnv, at the same total envs and batch per update; optionally the
ceiling of two ranks on this machine (two unconnected half-size runs at once, rates summed).

Every run is its own process, started in turn round by round (interleaved over --repeats rounds;
medians reported); 1 torch thread per process (per rank). trpo_ext's rate is the one its CLI prints
("trained ... steps/s": the training loop, without start-up, the final save and evaluation); sb3's is
model.learn's steps over its wall time. trpo_ext at --nproc N runs E/N envs per rank.

    python bench/dist_speed.py --env Hopper-v5 --env CartPole-v1 --timesteps 40000 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

from common import (ONE_THREAD_ENV, SB3_TRPO_DEFAULTS, TRPO_EXT_SPLIT, read_progress, sb3_names, train_command,
                    trained_rate)

SPLIT = tuple(f"time_{k}" for k in TRPO_EXT_SPLIT)  # progress.csv's columns


def read_split(out) -> dict:
    """Mean seconds per update of each part (rollout / cg / line search / critic) from a run's progress.csv."""
    rows = read_progress(out)
    return {k: sum(float(r[k]) for r in rows) / len(rows) for k in SPLIT}


def run_trpo_ext(env_id, nproc, n_envs, n_steps, steps, seed, out, env=ONE_THREAD_ENV, extra=()):
    cmd = train_command(env_id, nproc, n_envs // nproc, n_steps, steps, seed, out, "--eval-episodes", "1", *extra)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return trained_rate(proc.stdout), read_split(out)


def run_independent(env_id, n_envs, n_steps, steps, seed, tmp):
    """Two one-process runs with half the envs each, at the same time and with no communication: the
    most two data-parallel ranks could reach on this machine. Returns the sum of their rates and
    their mean split (each half's rollout is what one rank's rollout costs while the other runs)."""
    procs, outs = [], []
    for half in range(2):
        outs.append(os.path.join(tmp, f"half{half}"))
        cmd = train_command(env_id, 1, n_envs // 2, n_steps, steps // 2, seed + half, outs[-1], "--eval-episodes", "1")
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=ONE_THREAD_ENV))
    total = 0.0
    for proc in procs:
        out, err = proc.communicate(timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(err[-2000:])
        total += trained_rate(out)
    halves = [read_split(out) for out in outs]
    return total, {k: statistics.mean(h[k] for h in halves) for k in SPLIT}


def run_sb3(env_id, n_envs, n_steps, steps, seed, vec_env):
    code = f"""
import json, time, torch
torch.set_num_threads(1)
from sb3_contrib import TRPO
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv
envs = make_vec_env({env_id!r}, n_envs={n_envs}, seed={seed}, vec_env_cls={vec_env})
model = TRPO("MlpPolicy", envs, **{sb3_names(dict(SB3_TRPO_DEFAULTS, n_steps=n_steps))!r}, seed={seed}, verbose=0)
t = time.perf_counter(); model.learn({steps}); wall = time.perf_counter() - t
print(json.dumps(model.num_timesteps / wall)); envs.close()
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ONE_THREAD_ENV,
                          timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", action="append", default=None)
    parser.add_argument("--n-envs", type=int, default=16, help="total envs (trpo_ext: split over the ranks)")
    parser.add_argument("--n-steps", type=int, default=128)
    parser.add_argument("--timesteps", type=int, default=40_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--setups", default="nproc1,nproc2,sb3-dummy,sb3-subproc",
                        help="also: 2x-independent (two unconnected half-size runs at once: the ceiling for 2 ranks); "
                             "nprocN-normal-loop / nprocN-idle-loop: gloo's event loops at normal priority / at "
                             "SCHED_IDLE instead of nice 19 (TRPO_EXT_GLOO_LOOP_PRIORITY=normal / idle); "
                             "nprocN-split / nprocN-data: update_parallel='split' / 'data' instead of 'auto'")
    args = parser.parse_args()
    import gymnasium
    import torch

    setups = args.setups.split(",")
    print(f"torch {torch.__version__}, gymnasium {gymnasium.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, {os.cpu_count()} cores; {args.timesteps} steps per run, {args.repeats} interleaved "
          f"rounds, medians; {args.n_envs} envs x {args.n_steps} steps per update in total; 1 torch thread per "
          f"process; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| env | setup | steps/s (median) | runs | nproc 2 speed-up | update split (rollout / cg / line search / critic, ms) |")
    print("|---|---|---|---|---|---|")
    for env_id in args.env or ["Hopper-v5", "CartPole-v1"]:
        rates = {k: [] for k in setups}
        splits = {k: [] for k in setups}
        for rep in range(args.repeats):
            for setup in setups:
                with tempfile.TemporaryDirectory() as tmp:
                    if setup == "2x-independent":
                        rate, split = run_independent(env_id, args.n_envs, args.n_steps, args.timesteps, rep, tmp)
                        splits[setup].append(split)
                    elif setup.startswith("nproc"):
                        nproc, _, variant = setup[5:].partition("-")
                        env, extra = ONE_THREAD_ENV, ()
                        if variant.endswith("-loop"):
                            env = {**ONE_THREAD_ENV, "TRPO_EXT_GLOO_LOOP_PRIORITY": variant.removesuffix("-loop")}
                        elif variant:
                            extra = ("--set", f"update_parallel={variant}")
                        rate, split = run_trpo_ext(env_id, int(nproc), args.n_envs, args.n_steps, args.timesteps,
                                                   rep, os.path.join(tmp, "run"), env, extra)
                        splits[setup].append(split)
                    else:
                        vec = "SubprocVecEnv" if setup == "sb3-subproc" else "DummyVecEnv"
                        rate = run_sb3(env_id, args.n_envs, args.n_steps, args.timesteps, rep, vec)
                rates[setup].append(rate)
                print(f"<!-- {env_id} round {rep} {setup}: {rate:,.0f} steps/s -->", flush=True)
        med = {k: statistics.median(v) for k, v in rates.items()}
        for setup in setups:
            ratio = f"{med['nproc2'] / med[setup]:.2f}x" if "nproc2" in med else ""
            split = ""
            if splits[setup]:
                split = " / ".join(f"{statistics.median(s[k] for s in splits[setup]) * 1e3:.1f}" for k in SPLIT)
            runs = ", ".join(f"{r:,.0f}" for r in rates[setup])
            print(f"| {env_id} | {setup} | {med[setup]:,.0f} | {runs} | {ratio} | {split} |", flush=True)


if __name__ == "__main__":
    main()
