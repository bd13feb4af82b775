"""trpo_ext vs sb3-contrib TRPO on the toy tasks of the newer spaces (trpo_ext/toy_envs.py).

One small matching task per kind of space: MultiDiscrete / MultiBinary / masked Discrete actions,
Dict / image / Dict-with-image observations. Each episode is 16 steps (truncated), a step pays the
fraction of the action that matches the target the observation shows, so the best return is 16 and
a random policy's return is known.

    python bench/space_learning.py                                   # every task, seeds 0 1 2
    python bench/space_learning.py --tasks ImageSide --seeds 0       # one task, one seed
    python bench/space_learning.py --summary-only                    # rebuild learning.md

Both libraries get the same policy type name ("MlpPolicy" / "CnnPolicy" / "MultiInputPolicy"), the
same n_envs, rollout length, budget, gamma, gae_lambda, target KL, CG iterations, damping and critic
settings: the mapping is bench/common.py's `trpo_ext_kwargs` / `sb3_kwargs`, as in compare_sb3.py.
Architecture: "MlpPolicy" and "MultiInputPolicy" a 64-64 tanh MLP (after sb3's
CombinedExtractor / trpo_ext's equivalent for a Dict), "CnnPolicy" a NatureCNN (512 features) and a
linear head (sb3's default net_arch=[] for a NatureCNN). sb3's CnnPolicy / MultiInputPolicy are given
`share_features_extractor=False`, because trpo_ext's critic has its own extractor (sb3's default
shares it, and its TRPO then trains the shared extractor in the policy step only).

Masked task: sb3-contrib has no maskable TRPO. trpo_ext trains on "trpo_ext/MaskedChoice-v0" (an
invalid action raises) with the masks from its `action_masks()`; sb3-contrib's TRPO on the same env
made with `invalid_reward=0.0` (an invalid action pays 0, like a wrong valid one), so it must learn
to avoid invalid actions itself. Its evaluation also counts the invalid actions it takes.

Each run is its own Python process (`--in-process` to turn that off), tasks one after the other,
within a task seed by seed, within a seed trpo_ext then sb3. A finished run writes
<out>/<task>/<lib>_seed<k>.json (and .csv, one row per update); a run whose JSON exists is skipped,
so an interrupted invocation is simply started again. Every invocation ends by rebuilding
<out>/learning.md. Wall-clock and steps/s cover learn() only. Evaluation: 20 deterministic
episodes, trpo_ext's `agent.evaluate(20)` (a fresh env, reset seeds seed + 1000003 + i, masks
applied), sb3's `evaluate_policy(model, make_vec_env(env, 1, seed=seed + 1000003), 20,
deterministic=True)`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time

from common import (NET, SB3_TRPO_DEFAULTS, episode_return, learn_sb3, learn_trpo_ext, machine, mean_std,
                    mean_std_text, run_once, sb3_kl_scale, sb3_kwargs, trpo_ext_kwargs, versions, write_csv,
                    write_json)

HORIZON = 16
# The settings both libraries get (trpo_ext's names, as common.PRESETS): sb3-contrib's defaults.
HP = dict(SB3_TRPO_DEFAULTS, n_envs=4, n_steps=128, normalize_obs=False)
TASKS = {
    "MultiDiscreteMatch": dict(env_id="trpo_ext/MultiDiscreteMatch-v0", policy="MlpPolicy", timesteps=20_000,
                               space="MultiDiscrete([3, 4, 5]) actions"),
    "MultiBinaryMatch": dict(env_id="trpo_ext/MultiBinaryMatch-v0", policy="MlpPolicy", timesteps=20_000,
                             space="MultiBinary(6) actions"),
    "MaskedChoice": dict(env_id="trpo_ext/MaskedChoice-v0", policy="MlpPolicy", timesteps=20_000,
                         sb3_env_kwargs=dict(invalid_reward=0.0), space="Discrete(6) actions, masked"),
    "DictMatch": dict(env_id="trpo_ext/DictMatch-v0", policy="MultiInputPolicy", timesteps=20_000,
                      space="Dict obs (Discrete + Box)"),
    "ImageSide": dict(env_id="trpo_ext/ImageSide-v0", policy="CnnPolicy", timesteps=10_000,
                      space="uint8 image obs 40x40x3 HWC"),
    "DictImageSide": dict(env_id="trpo_ext/DictImageSide-v0", policy="MultiInputPolicy", timesteps=10_000,
                          space="Dict obs (1x40x40 uint8 CHW image + Box)"),
}
LIBS = ("trpo_ext", "sb3")
# trpo_ext at sb3-contrib's effective trust region, where that differs: sb3's Bernoulli KL is a (batch, k)
# tensor that TRPO averages (`.mean()`), i.e. the summed KL / k, so on MultiBinary(k) its target_kl and
# cg_damping act as k times larger ones do in trpo_ext (compare_sb3.py's "trpo_ext-sb3kl" for Box actions).
EXTRA_LIBS = ("trpo_ext-sb3kl",)
EVAL_SEED_OFFSET = 1_000_003


def _trpo_kwargs(task: dict, seed: int, device: str, kl_scale: int = 1) -> dict:
    kwargs = trpo_ext_kwargs(HP, seed, device, kl_scale)
    kwargs["policy"] = task["policy"]
    return kwargs


def _sb3_kwargs(task: dict, seed: int, device: str) -> dict:
    kwargs = sb3_kwargs(HP, seed, device)
    pk = dict(kwargs["policy_kwargs"])
    if task["policy"] == "CnnPolicy":
        del pk["net_arch"]  # sb3's default for a NatureCNN: no hidden layers (trpo_ext's CnnPolicy likewise)
    if task["policy"] != "MlpPolicy":
        pk["share_features_extractor"] = False  # trpo_ext's critic has its own extractor
    kwargs["policy_kwargs"] = pk
    return kwargs


# ----------------------------------------------------------------------------- one run
def run_trpo_ext(task: dict, seed: int, eval_episodes: int, device: str, kl_scale: int = 1):
    import trpo_ext

    kwargs = _trpo_kwargs(task, seed, device, kl_scale)
    agent = trpo_ext.TRPO(task["env_id"], **kwargs)
    rows, wall, _ = learn_trpo_ext(agent, task["timesteps"], ("kl", "line_search_failed", "cg_iterations", "entropy"))
    n_steps = agent.num_timesteps
    eval_mean, eval_std = agent.evaluate(eval_episodes)
    agent.close()
    kwargs["policy_kwargs"] = dict(kwargs["policy_kwargs"], hidden=list(NET["hidden"]))
    return rows, wall, n_steps, eval_mean, eval_std, {}, kwargs


def _invalid_counter():
    import gymnasium as gym

    class CountInvalid(gym.Wrapper):
        """Counts the actions the MaskedChoice env underneath would refuse (for the eval of an agent
        that cannot mask)."""

        invalid = steps = 0

        def step(self, action):
            CountInvalid.steps += 1
            CountInvalid.invalid += int(not self.env.unwrapped.valid[int(action)])
            return self.env.step(action)

    return CountInvalid


def run_sb3(task: dict, seed: int, eval_episodes: int, device: str):
    from sb3_contrib import TRPO
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy

    import trpo_ext  # noqa: F401  (registers the trpo_ext/ ids)

    env_kwargs = task.get("sb3_env_kwargs")
    env = make_vec_env(task["env_id"], n_envs=HP["n_envs"], seed=seed, env_kwargs=env_kwargs)
    kwargs = _sb3_kwargs(task, seed, device)
    model = TRPO(task["policy"], env, **kwargs)
    rows, wall, _ = learn_sb3(model, task["timesteps"])
    n_steps = model.num_timesteps
    counter = _invalid_counter() if env_kwargs and "invalid_reward" in env_kwargs else None
    eval_env = make_vec_env(task["env_id"], n_envs=1, seed=seed + EVAL_SEED_OFFSET, env_kwargs=env_kwargs,
                            wrapper_class=counter)
    returns, _ = evaluate_policy(model, eval_env, n_eval_episodes=eval_episodes, deterministic=True,
                                 return_episode_rewards=True)
    import numpy as np

    extra = {"eval_returns": [float(r) for r in returns]}
    if counter is not None:
        extra["eval_invalid_actions"] = counter.invalid
        extra["eval_actions"] = counter.steps
    eval_env.close()
    env.close()
    kwargs["policy_kwargs"] = dict(kwargs["policy_kwargs"], activation_fn="Tanh")
    kwargs["n_envs"], kwargs["env_kwargs"] = HP["n_envs"], env_kwargs
    return rows, wall, n_steps, float(np.mean(returns)), float(np.std(returns)), extra, kwargs


def _paths(out: str, task_name: str, lib: str, seed: int) -> tuple[str, str]:
    stem = os.path.join(out, task_name, f"{lib}_seed{seed}")
    return stem + ".csv", stem + ".json"


def run_one(args, task_name: str, lib: str, seed: int) -> None:
    import torch

    torch.set_num_threads(args.threads)
    task = TASKS[task_name]
    csv_path, json_path = _paths(args.out, task_name, lib, seed)
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    load_start = os.getloadavg()
    if lib == "sb3":
        out = run_sb3(task, seed, args.eval_episodes, args.device)
    else:
        out = run_trpo_ext(task, seed, args.eval_episodes, args.device,
                           sb3_kl_scale(task["env_id"]) if lib == "trpo_ext-sb3kl" else 1)
    rows, wall, n_steps, eval_mean, eval_std, extra, kwargs = out
    write_csv(csv_path, rows)
    result = {
        "task": task_name, "env_id": task["env_id"], "policy": task["policy"], "lib": lib, "seed": seed,
        "budget": task["timesteps"], "timesteps": n_steps, "updates": len(rows), "wall_clock_s": wall,
        "steps_per_sec": n_steps / wall, "eval_mean": eval_mean, "eval_std": eval_std,
        "eval_episodes": args.eval_episodes, **extra,
        "final_train_return": rows[-1]["ep_return_mean"] if rows else float("nan"),
        "threads": args.threads, "device": args.device, "hyperparameters": kwargs, "versions": versions(),
        "machine": machine(load_start), "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": os.environ.get("SPACE_LEARNING_COMMAND", "python " + " ".join(sys.argv)),
    }
    write_json(json_path, result)
    print(f"  {task_name} {lib} seed {seed}: {n_steps} steps in {wall:.1f} s ({n_steps / wall:.0f} steps/s), "
          f"eval {eval_mean:.2f} +/- {eval_std:.2f}, last train return {result['final_train_return']:.2f}",
          flush=True)


# ----------------------------------------------------------------------------- random policy
def random_returns(task_name: str, episodes: int, seed: int = 12345) -> dict:
    """Returns of a uniformly random policy: over the valid actions (masks applied) and, for the
    masked task, also over all actions on sb3's invalid_reward=0 env."""
    import gymnasium as gym
    import numpy as np

    import trpo_ext  # noqa: F401

    task = TASKS[task_name]
    rng = np.random.default_rng(seed)

    def play(env, masked: bool) -> list[float]:
        env.action_space.seed(int(rng.integers(2**31)))
        if masked:
            def act(_obs):
                return int(rng.choice(np.flatnonzero(env.unwrapped.action_masks())))
        else:
            def act(_obs):
                return env.action_space.sample()
        out = [episode_return(env, act, seed + i) for i in range(episodes)]
        env.close()
        return out

    masked = hasattr(gym.make(task["env_id"]).unwrapped, "action_masks")
    result = {"valid": play(gym.make(task["env_id"]), masked)}
    if "sb3_env_kwargs" in task:
        result["all_actions_sb3_env"] = play(gym.make(task["env_id"], **task["sb3_env_kwargs"]), False)
    return result


def expected_random(task_name: str) -> dict:
    """The exact expected return of a uniformly random (valid) policy, from the env's definition."""
    from trpo_ext.toy_envs import MaskedChoice, MultiDiscreteMatch

    if task_name == "MultiDiscreteMatch":
        per_step = sum(1.0 / n for n in MultiDiscreteMatch.nvec) / len(MultiDiscreteMatch.nvec)
        return {"valid": HORIZON * per_step}
    if task_name == "MultiBinaryMatch":
        return {"valid": HORIZON * 0.5}
    if task_name == "MaskedChoice":
        n = MaskedChoice.n
        sizes = range(2, n + 1)  # the valid set's size, uniform on 2..n
        return {"valid": HORIZON * sum(1.0 / k for k in sizes) / len(sizes), "all_actions_sb3_env": HORIZON / n}
    if task_name == "DictMatch":
        return {"valid": HORIZON / 4}
    return {"valid": HORIZON / 2}  # the two image tasks: Discrete(2)


# ----------------------------------------------------------------------------- summary
THRESHOLD = 14.0  # training return (of 16) for the "steps to" column


def _steps_to(csv_path: str, threshold: float) -> float:
    """The timesteps of the first update whose training return (last 100 episodes) reached `threshold`;
    nan when none did or the CSV is missing."""
    import csv

    if not os.path.exists(csv_path):
        return float("nan")
    with open(csv_path, newline="") as f:
        for row in csv.DictReader(f):
            value = float(row["ep_return_mean"])
            if value == value and value >= threshold:
                return float(row["timesteps"])
    return float("nan")


def _fmt_steps(value: float) -> str:
    return f"{value:,.0f}" if value == value else "never"


def write_summary(args) -> str:
    import glob

    runs: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(glob.glob(os.path.join(args.out, "*", "*_seed*.json"))):
        with open(path) as f:
            r = json.load(f)
        r["to_threshold"] = _steps_to(path[:-5] + ".csv", THRESHOLD)
        runs.setdefault(r["task"], {}).setdefault(r["lib"], []).append(r)
    random_path = os.path.join(args.out, "random_policy.json")
    randoms = {}
    if os.path.exists(random_path):
        with open(random_path) as f:
            randoms = json.load(f)
    any_run = next((r for libs in runs.values() for rs in libs.values() for r in rs), None)
    run_versions = any_run["versions"] if any_run else versions()
    all_runs = [r for libs in runs.values() for rs in libs.values() for r in rs]
    commands = sorted({r.get("command", "?") for r in all_runs}) or ["python bench/space_learning.py"]
    dates = sorted({r["finished"][:10] for r in all_runs}) or [time.strftime("%Y-%m-%d")]
    lines = [
        "# trpo_ext vs sb3-contrib TRPO on the toy tasks of the newer spaces", "",
        "Command" + ("s" if len(commands) > 1 else "") + ": " + ", ".join(f"`{c}`" for c in commands)
        + " (from the repository root; `python bench/space_learning.py --summary-only` rebuilds this file).", "",
        f"Date of the runs: {', '.join(dates)}. Machine: 2-core VM ({platform.machine()}, {os.cpu_count()} CPUs), "
        f"CPU only, 1 torch thread per process, runs one at a time (another engineer's tests were running "
        f"on the same machine at the time). Versions: torch {run_versions.get('torch')}, "
        f"stable-baselines3 {run_versions.get('stable_baselines3')}, sb3-contrib {run_versions.get('sb3_contrib')}, "
        f"gymnasium {run_versions.get('gymnasium')}, trpo_ext {run_versions.get('trpo_ext')}, python {run_versions.get('python')}.",
        "",
        "Tasks: trpo_ext/toy_envs.py; 16-step episodes, best return 16. Settings, both libraries: "
        f"n_envs {HP['n_envs']}, n_steps {HP['n_steps']} per env ({HP['n_envs'] * HP['n_steps']} steps per update), "
        f"gamma {HP['gamma']}, gae_lambda {HP['gae_lambda']}, max_kl = target_kl {HP['max_kl']}, "
        f"cg_iters = cg_max_steps {HP['cg_iters']}, damping = cg_damping {HP['damping']}, critic lr {HP['critic_lr']}, "
        f"{HP['critic_epochs']} critic epochs, critic batch {HP['critic_batch_size']}, line search 0.8^k (k < 10), advantage "
        "normalization, no observation normalization; 64-64 tanh MLP for MlpPolicy / MultiInputPolicy, NatureCNN "
        "(512) + linear head for CnnPolicy (256 per image for MultiInputPolicy); sb3's CNN / multi-input policies "
        "with `share_features_extractor=False` (trpo_ext's critic has its own extractor). Budgets are rounded up "
        "to whole updates by both libraries.", "",
        "Evaluation: 20 deterministic episodes per trained model (trpo_ext `agent.evaluate(20)`, sb3 "
        "`evaluate_policy(..., deterministic=True)`); the table gives the mean ± std over seeds of each run's "
        "20-episode mean. \"Last train\": the last update's mean return of the last 100 training episodes "
        "(stochastic policy). \"Steps to train ≥ 14\": the mean over seeds of the first update's step count at "
        "which that training return reached 14 (it lags, being over the last 100 episodes = 1,600 steps). "
        "Random policy: the exact expectation of a uniformly random (valid) action, and in "
        "brackets the mean of that many played episodes. steps/s: learn() only, mean over seeds.", "",
        "| task | action / obs space | policy | budget | seeds | trpo_ext eval | sb3-contrib eval | trpo_ext last train "
        f"| sb3 last train | trpo_ext steps to train ≥ {THRESHOLD:g} | sb3 steps to train ≥ {THRESHOLD:g} | random policy | trpo_ext steps/s | sb3 steps/s | trpo_ext wall s | sb3 wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, task in TASKS.items():
        if name not in runs:
            continue
        libs = runs[name]
        cells = [name, task["space"], f"`{task['policy']}`"]
        any_lib = next(iter(libs.values()))
        cells.append(f"{int(any_lib[0]['timesteps']):,}")
        cells.append(",".join(sorted({str(r["seed"]) for rs in libs.values() for r in rs})))

        def stat(lib, key, digits=2):
            rs = libs.get(lib)
            return mean_std_text([r[key] for r in rs], digits) if rs else "-"

        def steps_to(lib):
            rs = libs.get(lib)
            if not rs:
                return "-"
            hit = [r["to_threshold"] for r in rs if r["to_threshold"] == r["to_threshold"]]
            text = f"{mean_std(hit)[0]:,.0f}" if hit else "never"
            return text + (f" ({len(hit)}/{len(rs)} seeds)" if len(hit) != len(rs) else "")

        cells += [stat("trpo_ext", "eval_mean"), stat("sb3", "eval_mean"),
                  stat("trpo_ext", "final_train_return"), stat("sb3", "final_train_return"),
                  steps_to("trpo_ext"), steps_to("sb3")]
        exp = expected_random(name)
        played = randoms.get(name, {})
        rand = f"{exp['valid']:.2f}"
        if "valid" in played:
            rand += f" ({mean_std(played['valid'])[0]:.2f}, {len(played['valid'])} ep)"
        if "all_actions_sb3_env" in exp:
            rand += f"; any action on sb3's env: {exp['all_actions_sb3_env']:.2f}"
            if "all_actions_sb3_env" in played:
                rand += f" ({mean_std(played['all_actions_sb3_env'])[0]:.2f})"
        cells.append(rand)
        cells += [stat("trpo_ext", "steps_per_sec", 0), stat("sb3", "steps_per_sec", 0),
                  stat("trpo_ext", "wall_clock_s", 1), stat("sb3", "wall_clock_s", 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Per run", "",
              f"| task | lib | seed | steps | eval mean ± std (20 ep) | last train | steps to train ≥ {THRESHOLD:g} "
              "| wall s | steps/s | 1-min load avg start / end | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in TASKS:
        for lib in LIBS + EXTRA_LIBS:
            for r in sorted(runs.get(name, {}).get(lib, []), key=lambda r: r["seed"]):
                note = ""
                if "eval_invalid_actions" in r:
                    note = f"invalid actions in eval: {r['eval_invalid_actions']} / {r['eval_actions']}"
                lines.append(f"| {name} | {lib} | {r['seed']} | {r['timesteps']:,} | {r['eval_mean']:.2f} ± "
                             f"{r['eval_std']:.2f} | {r['final_train_return']:.2f} | {_fmt_steps(r['to_threshold'])} | {r['wall_clock_s']:.1f} | "
                             f"{r['steps_per_sec']:.0f} | {r['machine']['loadavg_start'][0]:.1f} / "
                             f"{r['machine']['loadavg_end'][0]:.1f} | {note} |")
    lines += ["", "## MultiBinary: sb3-contrib's trust region is k times larger", "",
              "sb3-contrib's TRPO takes `kl_divergence(new, old).mean()`; for MultiBinary(k) its Bernoulli KL is a "
              "(batch, k) tensor (torch's plain `Bernoulli`), so the mean is the per-bit KL, the summed KL / k, and "
              "its Fisher matrix likewise (MultiCategorical's KL it sums over sub-actions, as trpo_ext does; Discrete "
              "is one term). With the same target_kl = max_kl and cg_damping = damping, sb3 thus takes (from its code; "
              "not checked step by step here, as bench/sb3_step_check.py does for Box actions) trpo_ext's step at k "
              "times both (the Box-action difference of bench/README.md, \"The KL difference\"). On "
              "MultiBinaryMatch (k = 6) `trpo_ext-sb3kl` is trpo_ext at max_kl 6 x 0.01 and damping 6 x 0.1 "
              "(`--libs trpo_ext-sb3kl`):", "",
              "| lib | seeds | eval | last train | steps to train ≥ 14 |", "|---|---|---|---|---|"]
    for lib in LIBS + EXTRA_LIBS:
        rs = runs.get("MultiBinaryMatch", {}).get(lib)
        if rs:
            hit = [r["to_threshold"] for r in rs if r["to_threshold"] == r["to_threshold"]]
            lines.append(f"| {lib} | {','.join(str(r['seed']) for r in rs)} | "
                         f"{mean_std_text([r['eval_mean'] for r in rs], 2)} | "
                         f"{mean_std_text([r['final_train_return'] for r in rs], 2)} | "
                         f"{_fmt_steps(mean_std(hit)[0]) if hit else 'never'} ({len(hit)}/{len(rs)} seeds) |")
    lines += ["", "## The masked task's asymmetry", "",
              "sb3-contrib has no maskable TRPO. trpo_ext trains and is evaluated on `trpo_ext/MaskedChoice-v0`, "
              "whose invalid actions raise, with the masks of its `action_masks()` method (never sampled, no part "
              "in the update). sb3-contrib's TRPO trains and is evaluated on "
              "`gymnasium.make(\"trpo_ext/MaskedChoice-v0\", invalid_reward=0.0)`: it sees the same observation "
              "(which includes the valid set) but may take invalid actions, which pay 0 like a wrong valid one. "
              "Its evaluation counts the invalid actions (the \"note\" column). The random-policy column gives "
              "both baselines: random valid actions (what trpo_ext's masking gives for free) and random actions "
              "among all 6 on sb3's env.", ""]
    text = "\n".join(lines)
    path = os.path.join(args.out, "learning.md")
    with open(path, "w") as f:
        f.write(text)
    return path


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--libs", nargs="+", default=list(LIBS), choices=list(LIBS + EXTRA_LIBS),
                        help="trpo_ext-sb3kl: trpo_ext at sb3's effective trust region (runs only where it differs)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--random-episodes", type=int, default=1000)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "spaces"))
    parser.add_argument("--in-process", action="store_true")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("TASK", "LIB", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        task_name, lib, seed = args.worker
        run_one(args, task_name, lib, int(seed))
        return 0
    if not args.summary_only:
        os.environ["SPACE_LEARNING_COMMAND"] = "python bench/space_learning.py" + (
            " " + shlex.join(sys.argv[1:] if argv is None else argv) if (sys.argv[1:] if argv is None else argv) else "")
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        os.makedirs(args.out, exist_ok=True)
        random_path = os.path.join(args.out, "random_policy.json")
        randoms = {}
        if os.path.exists(random_path):
            with open(random_path) as f:
                randoms = json.load(f)
        for name in args.tasks:
            if name not in randoms:
                randoms[name] = random_returns(name, args.random_episodes)
        with open(random_path, "w") as f:
            json.dump(randoms, f, indent=1)
        for name in args.tasks:
            print(f"{name} ({TASKS[name]['policy']}, {TASKS[name]['timesteps']:,} steps)", flush=True)
            for seed in args.seeds:
                for lib in args.libs:
                    if lib == "trpo_ext-sb3kl" and sb3_kl_scale(TASKS[name]["env_id"]) == 1:
                        continue  # identical to trpo_ext there
                    cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, lib, str(seed),
                           "--threads", str(args.threads), "--device", args.device,
                           "--eval-episodes", str(args.eval_episodes), "--out", args.out]
                    run_once(_paths(args.out, name, lib, seed)[1], f"{name} {lib} seed {seed}", args.in_process,
                             lambda: run_one(args, name, lib, seed), cmd, dict(os.environ))
    print("wrote", write_summary(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
