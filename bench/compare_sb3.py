"""trpo_ext vs sb3-contrib TRPO: learning curves, final evaluation and whole-run speed.

Trains trpo_ext.TRPO and sb3_contrib.TRPO on the same machine with matched hyperparameters (per-env
presets in bench/common.py, from rl-baselines3-zoo's hyperparams/trpo.yml), several seeds and a fixed step budget,
plus sb3-contrib's out-of-the-box set-up (`TRPO("MlpPolicy", env)`, one env) for reference.

    python bench/compare_sb3.py --env CartPole-v1                      # 3 seeds, all three libs
    python bench/compare_sb3.py --env Hopper-v5 --seeds 0 1 2 3 4
    python bench/compare_sb3.py --env CartPole-v1 --libs trpo_ext sb3 --timesteps 20000
    python bench/compare_sb3.py --summary-only                         # rebuild every summary / plot
    python bench/compare_sb3.py --env suite                            # the whole suite (hours)

Each finished run writes <out>/<env>/<lib>_seed<k>.csv (one row per policy update: timesteps,
wall-clock seconds, mean return of the last 100 training episodes, ...) and <lib>_seed<k>.json (final
deterministic evaluation, wall-clock, steps/s, time split, hyperparameters, versions, load average).
A run whose JSON exists is skipped, so an interrupted invocation can simply be started again. A
budget other than the preset's goes to <out>/<env>-<N>/ so that it never mixes with preset results.
Every invocation ends by rebuilding <out>/<env>/summary.md, return_vs_steps.png,
return_vs_wallclock.png and the cross-env <out>/summary.md.

Runs go seed by seed, the libraries alternating within each seed, each in a fresh Python process
(`--in-process` to disable), so that drift in machine load affects every library alike. Wall-clock is
measured around `learn()` only (construction and evaluation excluded) with
torch.set_num_threads(--threads) in both libraries.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import math
import os
import sys
import time
import warnings

from common import (NET, PRESETS, episode_return, learn_sb3, learn_trpo_ext, machine, mean_std, mean_std_text,
                    run_once, sb3_kl_scale, sb3_kwargs, trpo_ext_kwargs, versions, write_csv, write_json)

LIBS = ("trpo_ext", "trpo_ext-sb3kl", "sb3", "sb3-default")
LIB_LABELS = {"trpo_ext": "trpo_ext", "trpo_ext-sb3kl": "trpo_ext, sb3-contrib's trust region",
              "sb3": "sb3-contrib (matched)", "sb3-default": "sb3-contrib defaults, 1 env"}
LIB_COLORS = {"trpo_ext": "tab:blue", "trpo_ext-sb3kl": "tab:green", "sb3": "tab:orange", "sb3-default": "tab:gray"}
SUITE = ("CartPole-v1", "Acrobot-v1", "Pendulum-v1", "Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")


# ----------------------------------------------------------------------------- one run
def _run_dir(out: str, env_id: str, timesteps: int, reward_norm: bool = False) -> str:
    default = PRESETS[env_id]["timesteps"]
    name = env_id if timesteps == default else f"{env_id}-{timesteps}"
    return os.path.join(out, name + ("-reward-norm" if reward_norm else ""))


def preset(env_id: str, reward_norm: bool = False) -> dict:
    """The matched hyperparameters of env_id; with `reward_norm`, rewards normalized as the zoo's
    `normalize: true` says (ValueError for a preset whose zoo entry does not normalize)."""
    p = dict(PRESETS[env_id])
    if reward_norm:
        if not p.get("zoo_normalize"):
            raise ValueError(f"--reward-norm: the zoo's {env_id} entry does not normalize; presets that do: "
                             f"{[e for e, q in PRESETS.items() if q.get('zoo_normalize')]}")
        p["normalize_reward"] = True
    return p


def _paths(run_dir: str, lib: str, seed: int) -> tuple[str, str]:
    stem = os.path.join(run_dir, f"{lib}_seed{seed}")
    return stem + ".csv", stem + ".json"


def _eval_seed(seed: int) -> int:  # identical evaluation episodes for every library at one training seed
    return 1_000_003 + 1000 * seed


def _evaluate(env_id: str, act, seed: int, n_episodes: int) -> list[float]:
    """Returns of `n_episodes` episodes on a fresh gym.make(env_id), same reset seeds for every library;
    `act(raw_obs)` applies the library's own observation normalization and deterministic policy."""
    import gymnasium as gym

    env = gym.make(env_id)
    returns = [episode_return(env, act, _eval_seed(seed) + episode) for episode in range(n_episodes)]
    env.close()
    return returns


def run_trpo_ext(env_id: str, p: dict, seed: int, timesteps: int, eval_episodes: int, device: str,
                 kl_scale: int = 1):
    import trpo_ext

    kwargs = trpo_ext_kwargs(p, seed, device, kl_scale)
    agent = trpo_ext.TRPO(env_id, **kwargs)
    rows, wall, split = learn_trpo_ext(agent, timesteps, ("time_rollout", "time_cg", "time_line_search", "time_critic",
                                                          "kl", "line_search_failed", "cg_iterations"))
    n_steps = agent.num_timesteps
    returns = _evaluate(env_id, lambda obs: agent.predict(obs, deterministic=True)[0], seed, eval_episodes)
    agent.close()
    kwargs["policy_kwargs"] = dict(kwargs["policy_kwargs"], hidden=list(NET["hidden"]))
    return rows, wall, n_steps, returns, split, kwargs


def run_sb3(env_id: str, p: dict, seed: int, timesteps: int, eval_episodes: int, device: str, default: bool):
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import VecNormalize

    if default:  # TRPO("MlpPolicy", env) as documented: one env, all defaults, no normalization
        env = make_vec_env(env_id, n_envs=1, seed=seed)
        kwargs = dict(seed=seed, device=device)
        normalize = False
    else:
        env = make_vec_env(env_id, n_envs=p["n_envs"], seed=seed)
        kwargs = sb3_kwargs(p, seed, device)
        normalize = p["normalize_obs"] or p.get("normalize_reward", False)
        if normalize:
            env = VecNormalize(env, norm_obs=p["normalize_obs"], norm_reward=p.get("normalize_reward", False),
                               clip_obs=10.0, clip_reward=10.0, gamma=p["gamma"])
    model = TRPO("MlpPolicy", env, **kwargs)
    rows, wall, split = learn_sb3(model, timesteps)
    n_steps = model.num_timesteps

    vec_normalize = model.get_vec_normalize_env() if normalize else None
    if vec_normalize is not None:
        vec_normalize.training = False

    def act(obs):
        if vec_normalize is not None:
            obs = vec_normalize.normalize_obs(obs)
        return model.predict(obs, deterministic=True)[0]

    returns = _evaluate(env_id, act, seed, eval_episodes)
    env.close()
    if not default:
        kwargs["policy_kwargs"] = dict(kwargs["policy_kwargs"], activation_fn="Tanh")
        kwargs["n_envs"], kwargs["normalize_obs"] = p["n_envs"], p["normalize_obs"]
        kwargs["normalize_reward"] = p.get("normalize_reward", False)
    else:
        kwargs["n_envs"] = 1
    return rows, wall, n_steps, returns, split, kwargs


def run_one(args, env_id: str, lib: str, seed: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    p = preset(env_id, args.reward_norm)
    timesteps = args.timesteps or p["timesteps"]
    run_dir = _run_dir(args.out, env_id, timesteps, args.reward_norm)
    os.makedirs(run_dir, exist_ok=True)
    csv_path, json_path = _paths(run_dir, lib, seed)
    load_start = os.getloadavg()
    if lib in ("trpo_ext", "trpo_ext-sb3kl"):
        scale = sb3_kl_scale(env_id) if lib == "trpo_ext-sb3kl" else 1
        rows, wall, n_steps, returns, split, kwargs = run_trpo_ext(env_id, p, seed, timesteps, args.eval_episodes,
                                                                   args.device, scale)
    else:
        rows, wall, n_steps, returns, split, kwargs = run_sb3(env_id, p, seed, timesteps, args.eval_episodes,
                                                              args.device, default=lib == "sb3-default")
    write_csv(csv_path, rows)
    result = {
        "env": env_id, "lib": lib, "seed": seed, "budget": timesteps, "timesteps": n_steps,
        "n_envs": kwargs["n_envs"], "wall_clock_s": wall, "steps_per_sec": n_steps / wall,
        "eval_mean": float(np.mean(returns)), "eval_std": float(np.std(returns)), "eval_returns": returns,
        "eval_episodes": len(returns), "eval_seed": _eval_seed(seed),
        "final_train_return": rows[-1]["ep_return_mean"] if rows else float("nan"),
        "updates": len(rows), "time_split_s": split, "threads": args.threads, "device": args.device,
        "hyperparameters": kwargs, "versions": versions(), "machine": machine(load_start),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    write_json(json_path, result)
    print(f"  {lib} seed {seed}: {n_steps} steps in {wall:.1f} s ({n_steps / wall:.0f} steps/s), "
          f"eval {result['eval_mean']:.1f} +/- {result['eval_std']:.1f}", flush=True)


# ----------------------------------------------------------------------------- summaries and plots
def _load_runs(run_dir: str) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "*_seed*.json"))):
        with open(path) as f:
            r = json.load(f)
        csv_path = path[:-5] + ".csv"
        r["curve"] = []
        if os.path.exists(csv_path):
            with open(csv_path, newline="") as f:
                for row in csv.DictReader(f):
                    r["curve"].append((float(row["timesteps"]), float(row["wall_s"]), float(row["ep_return_mean"])))
        runs.setdefault(r["lib"], []).append(r)
    return {lib: sorted(runs[lib], key=lambda r: r["seed"]) for lib in sorted(runs, key=_lib_order)}


def _lib_order(lib: str) -> int:
    return LIBS.index(lib) if lib in LIBS else len(LIBS)


def _split_text(run_list: list[dict]) -> str:
    keys = list(run_list[0]["time_split_s"])
    total = sum(r["wall_clock_s"] for r in run_list)
    parts = [(k, sum(r["time_split_s"].get(k, 0.0) for r in run_list)) for k in keys]
    other = total - sum(v for _, v in parts)
    if abs(other) > 0.005 * total:
        parts.append(("other", other))
    return " / ".join(f"{k} {100 * v / total:.0f}%" for k, v in parts)


def _table_rows(env_label: str, runs: dict[str, list[dict]], with_env: bool) -> list[str]:
    base = runs.get("sb3")
    base_sps = mean_std([r["steps_per_sec"] for r in base])[0] if base else None
    lines = []
    for lib, run_list in runs.items():
        wall, _ = mean_std([r["wall_clock_s"] for r in run_list])
        sps = mean_std([r["steps_per_sec"] for r in run_list])[0]
        ratio = f"{sps / base_sps:.2f}x" if base_sps else "-"
        seeds = ",".join(str(r["seed"]) for r in run_list)
        cells = ([env_label] if with_env else []) + [
            LIB_LABELS.get(lib, lib), str(run_list[0]["n_envs"]), seeds, f"{int(run_list[0]['timesteps']):,}",
            mean_std_text([r["eval_mean"] for r in run_list], 1),
            mean_std_text([r["final_train_return"] for r in run_list], 1), f"{wall:.1f}",
            mean_std_text([r["steps_per_sec"] for r in run_list], 0), ratio]
        if not with_env:
            cells.append(_split_text(run_list))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


_HEADER = ["lib", "n_envs", "seeds", "steps/run", "final eval (mean ± std over seeds)",
           "final train return", "wall-clock s (mean)", "steps/s", "speed vs sb3 matched"]


def _plot(runs: dict[str, list[dict]], x_index: int, xlabel: str, title: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4), dpi=80)
    for lib, run_list in runs.items():
        curves = []
        for r in run_list:
            c = np.array([row for row in r["curve"] if math.isfinite(row[2])], dtype=float).reshape(-1, 3)
            if len(c):
                curves.append(c)
        if not curves:
            continue
        hi = max(c[-1, x_index] for c in curves)
        grid = np.linspace(min(c[0, x_index] for c in curves), hi, 200)
        ys = np.array([np.interp(grid, c[:, x_index], c[:, 2], left=np.nan, right=np.nan) for c in curves])
        ok = (~np.isnan(ys)).sum(0) > 0
        with warnings.catch_warnings():  # all-NaN columns (outside every seed's range) are masked by `ok`
            warnings.simplefilter("ignore", RuntimeWarning)
            mean, lo, up = np.nanmean(ys, 0), np.nanmin(ys, 0), np.nanmax(ys, 0)
        color = LIB_COLORS.get(lib)
        ax.plot(grid[ok], mean[ok], color=color, label=f"{LIB_LABELS.get(lib, lib)} ({len(curves)} seeds)")
        if len(curves) > 1:
            ax.fill_between(grid[ok], lo[ok], up[ok], color=color, alpha=0.2, linewidth=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean training episode return (last 100)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarize_env(run_dir: str) -> dict[str, list[dict]] | None:
    runs = _load_runs(run_dir)
    if not runs:
        return None
    env_label = os.path.basename(os.path.normpath(run_dir))
    _plot(runs, 0, "environment steps", f"{env_label}: return vs steps (mean, min-max over seeds)",
          os.path.join(run_dir, "return_vs_steps.png"))
    _plot(runs, 1, "wall-clock seconds (learn only)", f"{env_label}: return vs wall-clock (mean, min-max)",
          os.path.join(run_dir, "return_vs_wallclock.png"))
    any_run = next(iter(runs.values()))[0]
    lines = [f"# {env_label}: trpo_ext vs sb3-contrib TRPO", "",
             "Generated by `bench/compare_sb3.py`. Final eval: deterministic policy, "
             f"{any_run['eval_episodes']} episodes on a fresh env with the training observation statistics, "
             "same episode seeds for every library; mean over those episodes per seed, then mean ± std over "
             "seeds. Final train return: mean of the last 100 training episodes at the end. Wall-clock: "
             "`learn()` only. Time split: share of total wall-clock (trpo_ext: rollout incl. values and GAE / "
             "gradient + CG / line search / critic; sb3: collect_rollouts / train()).", "",
             "| " + " | ".join(_HEADER + ["time split"]) + " |", "|" + "---|" * (len(_HEADER) + 1)]
    lines += _table_rows(env_label, runs, with_env=False)
    lines += ["", "![return vs steps](return_vs_steps.png) ![return vs wall-clock](return_vs_wallclock.png)", "",
              "## Runs", "", "| lib | seed | eval | wall-clock s | steps/s | load avg (start → end) | finished |",
              "|---|---|---|---|---|---|---|"]
    for lib, run_list in runs.items():
        for r in run_list:
            m = r["machine"]
            lines.append(f"| {lib} | {r['seed']} | {r['eval_mean']:.1f} ± {r['eval_std']:.1f} | "
                         f"{r['wall_clock_s']:.1f} | {r['steps_per_sec']:.0f} | "
                         f"{m['loadavg_start'][0]:.2f} → {m['loadavg_end'][0]:.2f} | {r['finished']} |")
    lines += ["", "## Set-up", "", f"- threads: {any_run['threads']}, device: {any_run['device']}, "
              f"machine: {any_run['machine']['machine']}, {any_run['machine']['cpus']} CPUs",
              "- versions: " + ", ".join(f"{k} {v}" for k, v in any_run["versions"].items())]
    for lib, run_list in runs.items():
        hp = {k: v for k, v in run_list[0]["hyperparameters"].items() if k != "seed"}
        lines.append(f"- {lib}: `{json.dumps(hp, default=str)}`")
    with open(os.path.join(run_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return runs


def summarize_all(out: str) -> None:
    rows = []
    for run_dir in sorted(d for d in glob.glob(os.path.join(out, "*")) if os.path.isdir(d)):
        runs = _load_runs(run_dir)
        if runs:
            name = os.path.basename(run_dir)
            rows.append((SUITE.index(name) if name in SUITE else len(SUITE), name, runs))
    if not rows:
        return
    lines = ["# trpo_ext vs sb3-contrib TRPO: all environments", "",
             "Generated by `bench/compare_sb3.py`; per-env details, plots and hyperparameters in "
             "`<env>/summary.md`. Speed vs sb3 matched = steps/s ratio at the same number of envs and "
             "the same hyperparameters.", "",
             "| env | " + " | ".join(_HEADER) + " |", "|" + "---|" * (len(_HEADER) + 1)]
    for _, name, runs in sorted(rows):
        lines += _table_rows(f"[{name}]({name}/summary.md)", runs, with_env=True)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", nargs="+", help=f"env id(s) from {list(PRESETS)}, or 'suite' for all of them")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--timesteps", type=int, default=None,
                        help="steps per run (default: the preset's budget; another budget writes <out>/<env>-<N>/)")
    parser.add_argument("--libs", nargs="+", choices=LIBS, default=["trpo_ext", "sb3", "sb3-default"],
                        help="set-ups to run (default: trpo_ext sb3 sb3-default; trpo_ext-sb3kl only differs "
                             "from trpo_ext on Box action spaces with more than one dimension)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for every run")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--summary-only", action="store_true", help="only rebuild summaries and plots")
    parser.add_argument("--in-process", action="store_true", help="run everything in this process")
    parser.add_argument("--list-presets", action="store_true")
    parser.add_argument("--reward-norm", action="store_true",
                        help="normalize rewards on both sides where the zoo's entry says normalize: true "
                             "(writes <out>/<env>-reward-norm/)")
    parser.add_argument("--worker", nargs=2, metavar=("LIB", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.list_presets:
        for env_id, p in PRESETS.items():
            print(env_id, json.dumps(p))
        return 0
    envs = list(SUITE) if args.env and args.env == ["suite"] else (args.env or [])
    unknown = [e for e in envs if e not in PRESETS]
    if unknown:
        parser.error(f"no preset for {unknown}; presets: {list(PRESETS)}")
    if args.worker:
        run_one(args, envs[0], args.worker[0], int(args.worker[1]))
        return 0
    if not envs and not args.summary_only:
        parser.error("--env is required (or --summary-only)")
    if args.reward_norm:
        try:
            for env_id in envs:
                preset(env_id, True)
        except ValueError as e:
            parser.error(str(e))

    failures = []
    if not args.summary_only:
        for env_id in envs:
            timesteps = args.timesteps or PRESETS[env_id]["timesteps"]
            run_dir = _run_dir(args.out, env_id, timesteps, args.reward_norm)
            print(f"{env_id}: {timesteps} steps per run -> {run_dir}", flush=True)
            for seed in args.seeds:
                for lib in args.libs:  # libraries alternate within each seed
                    cmd = [sys.executable, os.path.abspath(__file__), "--env", env_id, "--worker", lib, str(seed),
                           "--out", args.out, "--threads", str(args.threads), "--device", args.device,
                           "--eval-episodes", str(args.eval_episodes)]
                    if args.timesteps:
                        cmd += ["--timesteps", str(args.timesteps)]
                    if args.reward_norm:
                        cmd.append("--reward-norm")
                    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
                    if not run_once(_paths(run_dir, lib, seed)[1], f"{lib} seed {seed}", args.in_process,
                                    lambda: run_one(args, env_id, lib, seed), cmd, env):
                        failures.append(f"{env_id} {lib} seed {seed}")
            summarize_env(run_dir)
    else:
        dirs = ([_run_dir(args.out, e, args.timesteps or PRESETS[e]["timesteps"], args.reward_norm) for e in envs]
                if envs
                else sorted(d for d in glob.glob(os.path.join(args.out, "*")) if os.path.isdir(d)))
        for run_dir in dirs:
            if summarize_env(run_dir) is not None:
                print(f"wrote {os.path.join(run_dir, 'summary.md')} and plots")
    summarize_all(args.out)
    if failures:
        print("failed runs: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
