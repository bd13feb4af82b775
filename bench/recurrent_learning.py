"""trpo_ext's recurrent TRPO vs sb3-contrib's RecurrentPPO on partially observed tasks, side by side.

Both libraries train "MlpLstmPolicy" on the same env for the same number of env steps, seed by seed,
and are evaluated the same way. Tasks (trpo_ext/toy_envs.py):

    CueRecall            trpo_ext/CueRecall-v0: a cue (1 of 4) shown once, recalled 9 steps later;
                         Discrete(4) actions; best 1, best memoryless 0.25
    CueRecallContinuous  trpo_ext/CueRecallContinuous-v0: a cue ±1 shown once, recalled 9 steps later
                         with a Box(1) action paying -|a - cue|; best 0, best memoryless -1
    CueRecallK3D12       CueRecallK3D12-v0 (HELD_OUT_ENVS, registered here): CueRecall with k=3, delay=12,
                         a cue (1 of 3) recalled 13 steps later; held out (nothing tuned on it); best 1,
                         best memoryless 1/3
    CartPoleNoVel        trpo_ext/CartPoleNoVel-v1, rl-baselines3-zoo's CartPoleNoVel-v1
    PendulumNoVel        trpo_ext/PendulumNoVel-v1, rl-baselines3-zoo's PendulumNoVel-v1

    python bench/recurrent_learning.py                                  # every task, seeds 0 1 2, both libs
    python bench/recurrent_learning.py --tasks CueRecall --libs sb3     # one side only
    python bench/recurrent_learning.py --tasks CueRecall --timesteps 20000 --seeds 0
    python bench/recurrent_learning.py --tasks CueRecall --libs trpo_ext --tag kl03 --trpo-set max_kl=0.03
    python bench/recurrent_learning.py --summary-only                   # rebuild the markdown

RecurrentPPO's settings are rl-baselines3-zoo's hyperparams/ppo_lstm.yml entries for the NoVel envs
(PendulumNoVel-v1 without the zoo's gSDE: a plain diagonal Gaussian on both sides) and, for the memory
tasks, which the zoo does not have, the settings in MEMORY_PPO below. trpo_ext gets the same n_envs,
n_steps, gamma, gae_lambda and network (LSTM size, 64-64 tanh heads, the critic's own LSTM), and its own
trust-region and critic settings: the library's defaults for a recurrent policy (TASKS[...]["trpo"] is
empty; `--trpo-set key=value` overrides one for a hyperparameter search, with `--tag` naming the variant,
which is then the run's lib "trpo_ext-<tag>").

Evaluation, both libraries alike: RecurrentPPO's predict protocol, `action, state = model.predict(obs,
state=state, episode_start=episode_start, deterministic=True)` with a batch of one observation, the state
carried from step to step and episode_start True at each episode's first step only, on a fresh
gym.make(env_id) with reset seeds 1_000_003 + 1000 * seed + i.

Each run is its own Python process with torch.set_num_threads(--threads) (and OMP/MKL threads alike),
runs one at a time, interleaved (seed 0 sb3, seed 0 trpo_ext, seed 1 ...). A finished run writes
<out>/<task>-<budget>/<lib>_seed<k>.json (and .csv, one row per update); a run whose JSON exists is
skipped. Every invocation ends by rebuilding --summary (bench/results/recurrent_learning.md).
Wall-clock: the whole `learn()` (construction and evaluation excluded).
"""
from __future__ import annotations

import argparse
import ast
import glob
import json
import os
import platform
import shlex
import sys
import time

from common import (episode_return, learn_sb3, learn_trpo_ext, machine, mean_std, mean_std_text, run_once,
                    versions, write_csv, write_json)

HERE = os.path.dirname(os.path.abspath(__file__))

# RecurrentPPO on the memory tasks (no zoo entry): small LSTM, 512-step updates, 10 epochs of 128-step
# minibatches at lr 1e-3, no entropy bonus. Budgets: the smallest tried at which it solved 3 seeds of 3
# (bench/results/recurrent_learning.md: CueRecall 2 of 3 at 10,240, 3 of 3 at 20,480; CueRecallContinuous 3 of 3 at 10,240).
MEMORY_PPO = dict(n_envs=8, n_steps=64, batch_size=128, n_epochs=10, learning_rate=1e-3, gamma=0.99,
                  gae_lambda=0.95, ent_coef=0.0, clip_range=0.2, policy_kwargs=dict(lstm_hidden_size=64))
# trpo_ext's own settings: none. The shared ones come from the task's "ppo" entry (`_trpo_kwargs`); the
# trust region and critic are the library's recurrent defaults (trpo_ext.config.RECURRENT_DEFAULTS: max_kl
# 0.02, damping 0.001, critic minibatches of 256 rows, applied when TRPO's arguments are left None; 10
# critic epochs and critic_lr 1e-3 as for any policy). Those defaults were found on the memory tasks
# (bench/results/recurrent/older/ and the tagged runs, summarised in bench/results/recurrent_learning.md's
# notes): the feed-forward defaults (max_kl 0.01, damping 0.1) take steps but learn nothing of the cue 9
# steps back in 20k steps; damping 0.001 (the BPTT gradient's small-curvature directions, where the memory
# is, are no longer damped away) with max_kl 0.05 solved both on most seeds, and a 10-seed sweep of
# one-setting variations (the "--tag" runs) found max_kl 0.02 solving CueRecall on every seed. An
# interleaved rerun with 3 critic epochs (commits 3d39d7c..7c2e955) solved CueRecall on 0 of 3 seeds (eval
# 0.69-0.80); 10 epochs are the default since. Not tuned on the NoVel envs or the held-out task.
TRPO_BASE: dict = {}
TASKS = {
    "CueRecall": dict(env_id="trpo_ext/CueRecall-v0", timesteps=20_480, eval_episodes=100, solved=0.95,
                      memoryless=0.25, best=1.0, space="Discrete(4) actions, cue shown once, 9 steps before recall",
                      ppo=MEMORY_PPO, trpo=dict(TRPO_BASE)),
    "CueRecallContinuous": dict(env_id="trpo_ext/CueRecallContinuous-v0", timesteps=10_240, eval_episodes=100,
                                solved=-0.1, memoryless=-1.0, best=0.0,
                                space="Box(1) actions, cue ±1 shown once, 9 steps before recall",
                                ppo=MEMORY_PPO, trpo=dict(TRPO_BASE)),
    # rl-baselines3-zoo hyperparams/ppo_lstm.yml, CartPoleNoVel-v1 (n_timesteps 1e5)
    "CartPoleNoVel": dict(env_id="trpo_ext/CartPoleNoVel-v1", timesteps=100_000, eval_episodes=10, solved=475.0,
                          memoryless=None, best=500.0, space="CartPole-v1, velocities zeroed (Discrete(2))",
                          ppo=dict(n_envs=8, n_steps=32, batch_size=256, gae_lambda=0.8, gamma=0.98, n_epochs=20,
                                   ent_coef=0.0, learning_rate="lin_0.001", clip_range="lin_0.2"),
                          trpo=dict(TRPO_BASE)),
    # rl-baselines3-zoo hyperparams/ppo_lstm.yml, PendulumNoVel-v1 (n_timesteps 1e5), without use_sde /
    # sde_sample_freq 4
    "PendulumNoVel": dict(env_id="trpo_ext/PendulumNoVel-v1", timesteps=100_000, eval_episodes=10, solved=-200.0,
                          memoryless=None, best=0.0, space="Pendulum-v1, angular velocity zeroed (Box(1))",
                          ppo=dict(n_envs=4, n_steps=1024, gae_lambda=0.95, gamma=0.9, n_epochs=10, ent_coef=0.0,
                                   learning_rate=1e-3, clip_range=0.2),
                          trpo=dict(TRPO_BASE)),
}
# Held-out memory tasks: trpo_ext.toy_envs.CueRecall with other constructor arguments, registered by
# _register_held_out in each run's process (no trpo_ext/ id of their own).
HELD_OUT_ENVS = {"CueRecallK3D12-v0": dict(k=3, delay=12)}
TASKS["CueRecallK3D12"] = dict(env_id="CueRecallK3D12-v0", timesteps=20_480, eval_episodes=100, solved=0.95,
                               memoryless=0.333, best=1.0,
                               space="Discrete(3) actions, cue shown once, 13 steps before recall (held out)",
                               ppo=MEMORY_PPO, trpo=dict(TRPO_BASE))
LIBS = ("sb3", "trpo_ext")
EVAL_SEED = 1_000_003


def _schedule(value):
    """The zoo's "lin_<x>" (x times the remaining progress, 1 -> 0) as sb3's schedule; numbers as they are."""
    if isinstance(value, str) and value.startswith("lin_"):
        x = float(value[4:])
        return lambda progress_remaining: progress_remaining * x
    return value


def _trpo_kwargs(task: dict, seed: int, device: str, overrides: dict) -> dict:
    ppo = task["ppo"]
    policy_kwargs = dict(ppo.get("policy_kwargs", {}))
    kwargs = dict(n_envs=ppo["n_envs"], n_steps=ppo["n_steps"], gamma=ppo["gamma"], gae_lambda=ppo["gae_lambda"],
                  **task["trpo"], policy="MlpLstmPolicy", seed=seed, device=device)
    for key, value in overrides.items():
        if key in ("lstm_hidden_size", "n_lstm_layers", "enable_critic_lstm"):
            policy_kwargs[key] = value
        else:
            kwargs[key] = value
    kwargs["policy_kwargs"] = policy_kwargs
    return kwargs


class RecurrentActor:
    """`act(obs)` for common.episode_return with RecurrentPPO's predict protocol: a batch of one
    observation, the state carried between calls, episode_start True on the first call after `start()`."""

    def __init__(self, model):
        self.model, self.state, self.first = model, None, True

    def start(self):
        self.first = True
        return self

    def __call__(self, obs):
        import numpy as np

        action, self.state = self.model.predict(np.asarray(obs)[None], state=self.state,
                                                episode_start=np.array([self.first]), deterministic=True)
        self.first = False
        return np.asarray(action)[0]


def _register_held_out() -> None:
    """Registers HELD_OUT_ENVS with gymnasium in this process (once)."""
    import gymnasium as gym

    for env_id, kwargs in HELD_OUT_ENVS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point="trpo_ext.toy_envs:CueRecall", kwargs=kwargs)


def evaluate(model, env_id: str, seed: int, episodes: int) -> list[float]:
    import gymnasium as gym

    import trpo_ext  # noqa: F401  (the trpo_ext/ ids)

    env, actor = gym.make(env_id), RecurrentActor(model)
    returns = [episode_return(env, actor.start(), EVAL_SEED + 1000 * seed + i) for i in range(episodes)]
    env.close()
    return returns


def run_sb3(task: dict, seed: int, timesteps: int, device: str):
    from sb3_contrib import RecurrentPPO
    from stable_baselines3.common.env_util import make_vec_env

    import trpo_ext  # noqa: F401

    kwargs = {k: _schedule(v) for k, v in task["ppo"].items() if k != "n_envs"}
    env = make_vec_env(task["env_id"], n_envs=task["ppo"]["n_envs"], seed=seed)
    model = RecurrentPPO("MlpLstmPolicy", env, seed=seed, device=device, **kwargs)
    rows, wall, split = learn_sb3(model, timesteps)
    returns = evaluate(model, task["env_id"], seed, task["eval_episodes"])
    env.close()
    return rows, wall, model.num_timesteps, returns, split, dict(task["ppo"])


def run_trpo_ext(task: dict, seed: int, timesteps: int, device: str, overrides: dict):
    import trpo_ext

    kwargs = _trpo_kwargs(task, seed, device, overrides)
    agent = trpo_ext.TRPO(task["env_id"], **kwargs)
    config = agent.config  # the settings in effect (the recurrent defaults filled in), kept in the run's JSON
    effective = {key: getattr(config.trust_region, key, getattr(config, key, None))
                 for key in ("max_kl", "damping", "cg_iters", "critic_lr", "critic_epochs", "critic_batch_size")}
    kwargs = {**kwargs, **{k: v for k, v in effective.items() if kwargs.get(k) is None}}
    rows, wall, split = learn_trpo_ext(agent, timesteps, ("kl", "line_search_failed", "cg_iterations"))
    returns = evaluate(agent, task["env_id"], seed, task["eval_episodes"])
    n_steps = agent.num_timesteps
    agent.close()
    return rows, wall, n_steps, returns, split, kwargs


def _lib(tag: str | None) -> str:
    return "trpo_ext" + (f"-{tag}" if tag else "")


def _paths(out: str, task_name: str, timesteps: int, lib: str, seed: int) -> tuple[str, str]:
    stem = os.path.join(out, f"{task_name}-{timesteps}", f"{lib}_seed{seed}")
    return stem + ".csv", stem + ".json"


def run_one(args, task_name: str, lib: str, seed: int) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    _register_held_out()
    task = TASKS[task_name]
    timesteps = args.timesteps or task["timesteps"]
    csv_path, json_path = _paths(args.out, task_name, timesteps, lib, seed)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    load_start, git_state = os.getloadavg(), _git_state()
    if lib == "sb3":
        out = run_sb3(task, seed, timesteps, args.device)
    else:
        out = run_trpo_ext(task, seed, timesteps, args.device, dict(args.trpo_set))
    rows, wall, n_steps, returns, split, kwargs = out
    write_csv(csv_path, rows)
    result = {
        "task": task_name, "env_id": task["env_id"], "lib": lib, "seed": seed, "budget": timesteps,
        "timesteps": n_steps, "updates": len(rows), "wall_clock_s": wall, "steps_per_sec": n_steps / wall,
        "eval_mean": float(np.mean(returns)), "eval_std": float(np.std(returns)),
        "eval_returns": [float(r) for r in returns], "eval_episodes": len(returns),
        "final_train_return": rows[-1]["ep_return_mean"] if rows else float("nan"), "time_split_s": split,
        "threads": args.threads, "torch_threads": torch.get_num_threads(), "device": args.device,
        "hyperparameters": kwargs, "versions": versions(), "machine": dict(machine(load_start), cpu=_cpu_model()),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "git": git_state,
        "command": os.environ.get("RECURRENT_LEARNING_COMMAND", "python " + " ".join(sys.argv)),
    }
    write_json(json_path, result)
    print(f"  {task_name} {lib} seed {seed}: {n_steps} steps in {wall:.1f} s ({n_steps / wall:.0f} steps/s), "
          f"eval {result['eval_mean']:.3f} +/- {result['eval_std']:.3f}, last train "
          f"{result['final_train_return']:.3f}", flush=True)


def _git_state() -> str:
    """The repository's commit, "+dirty" where trpo_ext/ or csrc/ has uncommitted changes (the recurrent
    agent was being written while these runs were made)."""
    import subprocess

    root = os.path.dirname(HERE)
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "trpo_ext", "csrc"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"
    return head + ("+dirty" if dirty else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ----------------------------------------------------------------------------- summary
def write_summary(out: str, path: str) -> str:
    groups: dict[tuple[str, int], dict[str, list[dict]]] = {}
    for json_path in sorted(glob.glob(os.path.join(out, "*", "*_seed*.json"))):
        with open(json_path) as f:
            r = json.load(f)
        groups.setdefault((r["task"], r["budget"]), {}).setdefault(r["lib"], []).append(r)
    all_runs = [r for libs in groups.values() for rs in libs.values() for r in rs]
    any_run = all_runs[0] if all_runs else None
    v = any_run["versions"] if any_run else versions()
    m = any_run["machine"] if any_run else {"cpus": os.cpu_count(), "cpu": _cpu_model()}
    commands = sorted({r.get("command", "?") for r in all_runs})
    dates = sorted({r["finished"][:10] for r in all_runs})
    threads = sorted({(r["threads"], r.get("torch_threads", r["threads"])) for r in all_runs})
    lines = [
        "# Recurrent TRPO (trpo_ext) vs sb3-contrib RecurrentPPO, side by side", "",
        "Generated by `bench/recurrent_learning.py` (its docstring: tasks, settings, evaluation protocol); "
        "`python bench/recurrent_learning.py --summary-only` rebuilds this file from the runs' JSON under "
        "`bench/results/recurrent/`.", "",
        "Commands: " + (", ".join(f"`{c}`" for c in commands) or "-") + ".", "",
        f"Runs finished: {', '.join(dates) or '-'}. Machine: {m.get('cpu')}, {m.get('cpus')} CPUs shared with other "
        f"work (1-min load average per run below), CPU only; runs one at a time, interleaved by seed; "
        f"threads per run (OMP/MKL, torch.get_num_threads()): {', '.join(f'{a}/{b}' for a, b in threads) or '-'}. "
        f"Versions: torch {v.get('torch')}, sb3-contrib {v.get('sb3_contrib')}, stable-baselines3 "
        f"{v.get('stable_baselines3')}, gymnasium {v.get('gymnasium')}, trpo_ext {v.get('trpo_ext')}, "
        f"python {v.get('python')}.", "",
        "Eval: deterministic, RecurrentPPO's predict protocol (state carried, episode_start at each episode's "
        "first step), the same reset seeds for both libraries; per run the mean over its eval episodes, then "
        "mean ± std over seeds. Solved: seeds whose eval mean reached the task's threshold. Last train: the "
        "mean return of the last 100 training episodes (stochastic policy) at the end. Wall-clock: the whole "
        "`learn()`, mean over seeds; speed-up: RecurrentPPO's mean wall-clock / this lib's at the same budget.", "",
        "| task | budget | lib | seeds | eval | solved (threshold) | best memoryless / best | last train "
        "| wall-clock s | steps/s | speed-up vs RecurrentPPO |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(TASKS)}
    for (name, budget) in sorted(groups, key=lambda k: (order.get(k[0], 99), k[1])):
        libs = groups[(name, budget)]
        task = TASKS.get(name, {})
        base = libs.get("sb3")
        base_wall = mean_std([r["wall_clock_s"] for r in base])[0] if base else None
        for lib in sorted(libs, key=lambda x: (x != "sb3", x)):
            rs = sorted(libs[lib], key=lambda r: r["seed"])
            wall = mean_std([r["wall_clock_s"] for r in rs])[0]
            solved = sum(r["eval_mean"] >= task.get("solved", float("inf")) for r in rs)
            bound = task.get("memoryless")
            lines.append("| " + " | ".join([
                name, f"{budget:,}", "RecurrentPPO" if lib == "sb3" else lib, ",".join(str(r["seed"]) for r in rs),
                mean_std_text([r["eval_mean"] for r in rs], 3), f"{solved}/{len(rs)} (≥ {task.get('solved')})",
                f"{'-' if bound is None else bound} / {task.get('best')}",
                mean_std_text([r["final_train_return"] for r in rs], 3), f"{wall:.1f}",
                f"{mean_std([r['steps_per_sec'] for r in rs])[0]:.0f}",
                f"{base_wall / wall:.2f}x" if base_wall and lib != "sb3" else "-"]) + " |")
    lines += ["", "## Per run", "", "| task | budget | lib | seed | steps | eval mean ± std | last train | wall s "
              "| steps/s | load avg start → end | finished | git |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (name, budget) in sorted(groups, key=lambda k: (order.get(k[0], 99), k[1])):
        for lib, rs in sorted(groups[(name, budget)].items(), key=lambda x: (x[0] != "sb3", x[0])):
            for r in sorted(rs, key=lambda r: r["seed"]):
                mm = r["machine"]
                lines.append(f"| {name} | {budget:,} | {lib} | {r['seed']} | {r['timesteps']:,} | {r['eval_mean']:.3f} ± "
                             f"{r['eval_std']:.3f} | {r['final_train_return']:.3f} | {r['wall_clock_s']:.1f} | "
                             f"{r['steps_per_sec']:.0f} | {mm['loadavg_start'][0]:.2f} → {mm['loadavg_end'][0]:.2f} | "
                             f"{r['finished']} | {r.get('git', '?')} |")
    lines += ["", "## Settings", ""]
    seen = set()
    for (name, budget), libs in groups.items():
        for lib, rs in sorted(libs.items()):
            hp = json.dumps({k: x for k, x in rs[0]["hyperparameters"].items() if k not in ("seed", "device")},
                            default=str)
            if (name, lib, hp) not in seen:
                seen.add((name, lib, hp))
                lines.append(f"- {name}, {'RecurrentPPO' if lib == 'sb3' else lib}: `{hp}`")
    notes = ""
    if os.path.exists(path):  # a hand-written "## Notes" section at the end is kept
        with open(path) as f:
            old = f.read()
        if "\n## Notes" in old:
            notes = "\n" + old[old.index("\n## Notes") + 1:]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + notes)
    return path


# ----------------------------------------------------------------------------- main
def _setting(text: str):
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS),
                        help="sb3 (RecurrentPPO) and/or trpo_ext; one side only runs that side")
    parser.add_argument("--only", choices=list(LIBS), help="the same as --libs <one>")
    parser.add_argument("--timesteps", type=int, help="the budget per run (default: the task's)")
    parser.add_argument("--tag", help="names a trpo_ext variant: its runs are lib trpo_ext-<tag>")
    parser.add_argument("--trpo-set", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                        help="override one trpo_ext setting (TRPO keyword, or lstm_hidden_size / n_lstm_layers / "
                             "enable_critic_lstm); needs --tag")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "recurrent"))
    parser.add_argument("--summary", default=os.path.join(HERE, "results", "recurrent_learning.md"))
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("TASK", "LIB", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.trpo_set and not args.tag:
        parser.error("--trpo-set needs --tag (the variant's runs must not mix with the default's)")
    if args.worker:
        task_name, lib, seed = args.worker
        run_one(args, task_name, lib, int(seed))
        return 0
    libs = [args.only] if args.only else args.libs
    if not args.summary_only:
        given = sys.argv[1:] if argv is None else argv
        os.environ["RECURRENT_LEARNING_COMMAND"] = "python bench/recurrent_learning.py" + (
            " " + shlex.join(given) if given else "")
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        for name in args.tasks:
            timesteps = args.timesteps or TASKS[name]["timesteps"]
            print(f"{name} ({timesteps:,} steps per run)", flush=True)
            for seed in args.seeds:
                for lib in libs:
                    lib_name = "sb3" if lib == "sb3" else _lib(args.tag)
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, lib_name, str(seed),
                           "--threads", str(args.threads), "--device", args.device, "--out", args.out]
                    if args.timesteps:
                        cmd += ["--timesteps", str(args.timesteps)]
                    for key, value in args.trpo_set:
                        cmd += ["--trpo-set", f"{key}={value!r}"]
                    if args.tag:
                        cmd += ["--tag", args.tag]
                    run_once(_paths(args.out, name, timesteps, lib_name, seed)[1], f"{name} {lib_name} seed {seed}",
                             args.in_process, lambda: run_one(args, name, lib_name, seed), cmd, dict(os.environ))
    print("wrote", write_summary(args.out, args.summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
