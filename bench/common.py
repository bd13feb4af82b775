"""What the bench scripts share: the settings both libraries get and their translation to
sb3-contrib's names (with the KL scale that turns sb3-contrib's trust region into trpo_ext's), the
matched per-env presets, the runners that train a library for a budget and record one row per
update, the result files, and mean ± std.

The scripts import it as `common` (a script's own directory is first on sys.path when it is run as
`python bench/x.py` or under torch.distributed.run). torch, gymnasium and sb3 are imported inside
the functions that need them, so that importing this module costs little (trpo_ext.sb3_names imports
gymnasium and torch).
"""
from __future__ import annotations

import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

import trpo_ext.sb3_names as _names

# ----------------------------------------------------------------------------- settings
# The translation between the libraries is trpo_ext.sb3_names's (names, defaults, the KL scale).
# sb3-contrib TRPO's defaults of the update's settings, in trpo_ext's keyword names (trpo_ext's own
# defaults differ, e.g. cg_iters 10): what every bench script gives both libraries unless it says otherwise.
SB3_TRPO_DEFAULTS = {_names.RENAMED[k]: _names.SB3_DEFAULTS[k] for k in (
    "learning_rate", "n_critic_updates", "batch_size", "cg_max_steps", "cg_damping", "target_kl",
    "line_search_shrinking_factor", "line_search_max_iter", "gamma", "gae_lambda")}


def sb3_names(settings: dict) -> dict:
    """`settings` (trpo_ext's names, sb3-contrib's KL meaning) under sb3-contrib's names; keys without
    an sb3 name (and seed, device: the scripts give them themselves) are left out."""
    return {k: v for k, v in _names.sb3_kwargs(settings).items() if k not in ("seed", "device")}


def sb3_kl_scale(env_id: str) -> int:
    """d: how many times larger sb3-contrib's trust region is than its target_kl says, for this env
    (trpo_ext.sb3_names explains it; bench/sb3_step_check.py checks it)."""
    import trpo_ext  # noqa: F401  (registers the trpo_ext/ toy env ids)

    return _names.env_kl_scale(env_id)


# Matched hyperparameters per env, from rl-baselines3-zoo hyperparams/trpo.yml (DLR-RM/rl-baselines3-zoo),
# in trpo_ext's names; what the zoo leaves out is sb3-contrib's default (SB3_TRPO_DEFAULTS). The zoo's
# MuJoCo entries are for -v4; the same values are used for -v5. Deviations from the zoo (trpo_ext has
# no equivalent, and both libraries must run the same thing):
#   * zoo `normalize: true` is VecNormalize(norm_obs=True, norm_reward=True) (`zoo_normalize` below);
#     by default only observations are normalized: VecNormalize(norm_reward=False), the set-up of the
#     results recorded before trpo_ext had reward normalization. compare_sb3.py's `--reward-norm` runs
#     those presets as the zoo does, rewards normalized on both sides (trpo_ext normalize_reward=True,
#     reward_clip=10; VecNormalize(norm_reward=True, clip_reward=10)), into <out>/<env>-reward-norm/.
#   * Pendulum-v1: the zoo uses gSDE (use_sde=True, sde_sample_freq=4); here a plain diagonal Gaussian.
#   * budgets are the (Pendulum 200k rather than the zoo's 100k).
_ZOO_BASE = dict(SB3_TRPO_DEFAULTS, n_steps=2048, normalize_obs=False)
_MUJOCO = dict(_ZOO_BASE, timesteps=1_000_000, n_envs=2, n_steps=1024, critic_batch_size=128, gamma=0.99,
               gae_lambda=0.95, cg_iters=25, damping=0.1, critic_epochs=20, critic_lr=1e-3, normalize_obs=True,
               zoo_normalize=True)
PRESETS = {
    "CartPole-v1": dict(_ZOO_BASE, timesteps=100_000, n_envs=2, n_steps=512, critic_batch_size=512, damping=1e-3,
                        gae_lambda=0.98, gamma=0.99, critic_lr=1e-3, critic_epochs=20),
    "Acrobot-v1": dict(_ZOO_BASE, timesteps=100_000, n_envs=2, n_steps=1024, normalize_obs=True, zoo_normalize=True),
    "Pendulum-v1": dict(_ZOO_BASE, timesteps=200_000, n_envs=2, n_steps=1024, gamma=0.9, critic_epochs=15),
    "Hopper-v5": dict(_MUJOCO),
    "HalfCheetah-v5": dict(_MUJOCO, max_kl=0.04),
    "Walker2d-v5": dict(_MUJOCO),
}
# Shared by both matched set-ups: separate 64-64 tanh actor and critic, log-std 0, orthogonal init
# (sb3's MlpPolicy default; trpo_ext's policies use the same scheme), advantage normalization,
# line search 0.8^k for k < 10, no FVP sub-sampling, obs clip 10.
NET = dict(hidden=(64, 64), activation="tanh", log_std_init=0.0)


def trpo_ext_kwargs(p: dict, seed: int, device: str, kl_scale: int = 1) -> dict:
    """trpo_ext.TRPO's arguments for the settings `p` (a preset); kl_scale = d gives sb3-contrib's
    effective trust region (see `sb3_kl_scale`)."""
    return dict(n_envs=p["n_envs"], n_steps=p["n_steps"], gamma=p["gamma"], gae_lambda=p["gae_lambda"],
                max_kl=p["max_kl"] * kl_scale, damping=p["damping"] * kl_scale, cg_iters=p["cg_iters"],
                backtrack_factor=p["backtrack_factor"], max_backtracks=p["max_backtracks"], fvp_fraction=1.0,
                normalize_advantage=True, normalize_obs=p["normalize_obs"], obs_clip=10.0,
                normalize_reward=p.get("normalize_reward", False), reward_clip=10.0, critic_lr=p["critic_lr"],
                critic_epochs=p["critic_epochs"], critic_batch_size=p["critic_batch_size"],
                policy_kwargs=dict(NET), stats_window=100, seed=seed, device=device)


def sb3_kwargs(p: dict, seed: int, device: str) -> dict:
    """sb3_contrib.TRPO's arguments for the same settings: trpo_ext_kwargs(p) under sb3's names, NET as
    sb3's policy_kwargs (fvp_fraction 1.0 is sub_sampling_factor 1)."""
    from trpo_ext.policies import ACTIVATIONS

    kwargs = sb3_names(trpo_ext_kwargs(p, seed, device))
    kwargs["sub_sampling_factor"] = 1
    kwargs["stats_window_size"] = kwargs.pop("stats_window_size")  # the key order of the recorded runs' JSON
    activation = ACTIVATIONS[NET["activation"]]
    return dict(kwargs, policy_kwargs=dict(net_arch=dict(pi=list(NET["hidden"]), vf=list(NET["hidden"])),
                                           activation_fn=activation, log_std_init=NET["log_std_init"],
                                           ortho_init=True),
                seed=seed, device=device)


# ----------------------------------------------------------------------------- runners
TRPO_EXT_SPLIT = ("rollout", "cg", "line_search", "critic")  # an update record's time_<part> keys


def learn_trpo_ext(agent, timesteps: int, columns=()) -> tuple[list[dict], float, dict]:
    """agent.learn(timesteps) with one row per update: update, timesteps, wall_s (since learn()
    started), ep_return_mean, ep_length_mean (last stats_window episodes), then `columns` of the
    update's record. Returns the rows, learn()'s wall-clock seconds and the summed time split."""
    rows, split = [], dict.fromkeys(TRPO_EXT_SPLIT, 0.0)
    t0 = time.perf_counter()

    def callback(_agent, record):
        wall = time.perf_counter() - t0
        for k in split:
            split[k] += record[f"time_{k}"]
        rows.append({"update": record["update"], "timesteps": record["timesteps"], "wall_s": wall,
                     "ep_return_mean": record["ep_return_mean"], "ep_length_mean": record["ep_length_mean"],
                     **{k: record.get(k) for k in columns}})

    agent.learn(timesteps, callback=callback, progress_bar=False)
    return rows, time.perf_counter() - t0, split


def _sb3_recorder():
    """An sb3 BaseCallback (sb3 is imported here, lazily) that writes one row per update once the
    update (train()) is done, like trpo_ext's callback: at the next rollout's start or at training end."""
    from stable_baselines3.common.callbacks import BaseCallback

    class Recorder(BaseCallback):
        def __init__(self):
            super().__init__()
            self.rows, self.pending, self.t0 = [], None, 0.0
            self.rollout_time = self.train_time = 0.0
            self.t_rollout_start = self.t_rollout_end = None

        def _flush(self, now):
            if self.pending is not None:
                self.train_time += now - self.t_rollout_end
                self.pending["time_train"] = now - self.t_rollout_end
                self.pending["wall_s"] = now - self.t0
                self.rows.append(self.pending)
                self.pending = None

        def _on_rollout_start(self):
            now = time.perf_counter()
            self._flush(now)
            self.t_rollout_start = now

        def _on_rollout_end(self):
            now = time.perf_counter()
            self.t_rollout_end = now
            self.rollout_time += now - self.t_rollout_start
            buf = self.model.ep_info_buffer
            ret = float(sum(e["r"] for e in buf) / len(buf)) if buf else float("nan")
            length = float(sum(e["l"] for e in buf) / len(buf)) if buf else float("nan")
            self.pending = {"update": len(self.rows) + 1, "timesteps": self.model.num_timesteps,
                            "wall_s": float("nan"), "ep_return_mean": ret, "ep_length_mean": length,
                            "time_rollout": now - self.t_rollout_start}

        def _on_training_end(self):
            self._flush(time.perf_counter())

        def _on_step(self):
            return True

    return Recorder()


def learn_sb3(model, timesteps: int) -> tuple[list[dict], float, dict]:
    """model.learn(timesteps) with one row per update, as `learn_trpo_ext` (plus time_rollout and
    time_train). Returns the rows, learn()'s wall-clock seconds and the split (rollout / train)."""
    recorder = _sb3_recorder()
    recorder.t0 = time.perf_counter()
    model.learn(timesteps, callback=recorder, progress_bar=False)
    wall = time.perf_counter() - recorder.t0
    return recorder.rows, wall, {"rollout": recorder.rollout_time, "train": recorder.train_time}


def episode_return(env, act, seed: int) -> float:
    """The return of one episode of `env` reset with `seed`, each action `act(obs)`."""
    obs, _ = env.reset(seed=seed)
    total, done = 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(act(obs))
        total += float(reward)
        done = terminated or truncated
    return total


def run_once(json_path: str, label: str, in_process: bool, run_here, cmd: list[str], env: dict) -> bool:
    """One finished run per JSON: skipped where its JSON exists (written last, it marks the run
    finished), else `run_here()` or `cmd` (a fresh Python process, so that no run inherits another's
    state). False where that process failed."""
    if os.path.exists(json_path):
        print(f"  {label}: done already, skipped", flush=True)
        return True
    if in_process:
        run_here()
        return True
    if subprocess.run(cmd, env=env).returncode != 0:
        print(f"  {label}: FAILED", flush=True)
        return False
    return True


# `trpo-ext train` in a subprocess: 1 torch thread per process (per rank).
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def train_command(env_id, nproc, envs_per_rank, n_steps, steps, seed, out, *extra) -> list[str]:
    """`trpo-ext train` with SB3_TRPO_DEFAULTS (max_kl as --max-kl, the rest as --set), 1 torch thread
    per rank, no progress bar."""
    sets = [x for k, v in SB3_TRPO_DEFAULTS.items() if k != "max_kl" for x in ("--set", f"{k}={v}")]
    return [sys.executable, "-m", "trpo_ext", "train", env_id, "--nproc", str(nproc), "--n-envs", str(envs_per_rank),
            "--n-steps", str(n_steps), "--timesteps", str(steps), "--seed", str(seed), "--threads", "1",
            "--max-kl", str(SB3_TRPO_DEFAULTS["max_kl"]), "--no-progress", "--out", out, *sets, *extra]


def trained_rate(stdout: str) -> float:
    """The training loop's steps/s from `trpo-ext train`'s output ("trained ... (N steps/s")."""
    return float(re.search(r"\(([\d.]+) steps/s", stdout).group(1))


def read_progress(run_dir: str) -> list[dict]:
    """The rows of a `trpo-ext train` run's progress.csv (one per update)."""
    with open(os.path.join(run_dir, "progress.csv"), newline="") as f:
        return list(csv.DictReader(f))


# ----------------------------------------------------------------------------- result files
def write_csv(path: str, rows: list[dict]) -> None:
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_json(path: str, result: dict) -> None:
    """Written whole or not at all: a run's JSON marks it finished (see `run_once`)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(tmp, path)


def versions() -> dict:
    import gymnasium
    import numpy
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "gymnasium": gymnasium.__version__,
         "numpy": numpy.__version__}
    for name in ("trpo_ext", "sb3_contrib", "stable_baselines3", "mujoco"):
        try:
            v[name] = __import__(name).__version__
        except Exception:  # not installed / no version attribute
            pass
    return v


def machine(loadavg_start) -> dict:
    """The machine and its 1/5/15-min load averages at a run's start and now (its end)."""
    return {"cpus": os.cpu_count(), "machine": platform.machine(), "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg()}


# ----------------------------------------------------------------------------- statistics
def mean_std(values, ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation (ddof 0: of the values themselves, as over seeds in the tables;
    1: the sample estimate)."""
    import numpy as np

    values = np.asarray(values, dtype=float)
    return float(values.mean()), float(values.std(ddof=ddof))


def mean_std_text(values, digits: int = 1, ddof: int = 0) -> str:
    """The text "mean ± std" of `values`, both with `digits` decimals."""
    mean, std = mean_std(values, ddof)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def median_p90_mean(times) -> tuple[float, float, float]:
    """Median, 90th percentile (the sorted sample's element at 0.9 n) and mean of timings."""
    times = sorted(times)
    return statistics.median(times), times[int(0.9 * len(times))], statistics.mean(times)
