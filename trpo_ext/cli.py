"""Command line: `trpo-ext train | eval | plot`.

    trpo-ext train CartPole-v1 --out runs/cartpole      # logs, model.pt, learning_curve.png, final eval
    trpo-ext train Hopper-v5 --nproc 2                  # data-parallel on 2 local ranks (torch.distributed.run)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        -m trpo_ext train Hopper-v5 --out /shared/runs/hopper   # across machines
    trpo-ext eval runs/cartpole/model.pt
    trpo-ext plot runs/cartpole runs/other --out curves.png
"""
from __future__ import annotations

import argparse
import ast
import csv
import inspect
import math
import os
import sys
import time
import warnings


class UsageError(Exception):
    """A mistake in the command line: main() prints its one-line message and returns 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors reach main() as UsageError (one line, return code 2) instead
    of printing the usage and exiting."""

    def error(self, message):
        raise UsageError(message)


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help where X says something (not None / False / [])."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == [] or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            try:  # an integral float, as in --timesteps 1e5
                number = float(text)
            except ValueError:
                number = math.nan
            if not number.is_integer():
                raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
            value = int(number)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


def _trpo_defaults() -> dict:
    """TRPO's keyword arguments and their defaults."""
    from .trpo import TRPO

    return {name: p.default for name, p in inspect.signature(TRPO.__init__).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _hyperparameter(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE a Python literal (numbers, True/False, tuples, dicts) or a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


# ----------------------------------------------------------------------------- train
def _under_launcher() -> bool:
    """Whether this process is a worker that torchrun / torch.distributed.run started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launch_local(args, argv: list[str]) -> int:
    """`train --nproc N`: runs N local ranks of this same command through torch.distributed's
    launcher (torchrun's engine, with its elastic restarts), in one fresh run directory they share;
    0 when every rank finished, else 1."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .logger import check_log_dir

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="log_dir .* already holds a run")
        out = check_log_dir(args.out or os.path.join("runs", f"{args.env_id}-seed{args.seed}"))
    os.makedirs(out, exist_ok=True)
    worker_argv = _without_option(_without_option(argv, "--out"), "--nproc") + ["--out", out, "--resume"]
    # What `torchrun --standalone` configures: a rendezvous on a free local port.
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=args.max_restarts,
                          monitor_interval=0.5, start_method="spawn")
    print(f"launching {args.nproc} ranks (torch.distributed launcher, max restarts {args.max_restarts}) -> {out}",
          flush=True)
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "trpo_ext", *worker_argv)
    except ChildFailedError as e:
        failures = "; ".join(f"rank {rank} exited with {f.exitcode}" for rank, f in e.failures.items())
        print(f"trpo-ext train: error: the data-parallel run failed ({failures}); logs and the last checkpoint "
              f"are in {out}", file=sys.stderr)
        return 1
    return 0


def _without_option(argv: list[str], name: str) -> list[str]:
    """argv without `name VALUE` / `name=VALUE`."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == name:
            skip = True
        elif not item.startswith(name + "="):
            out.append(item)
    return out


def train(args) -> int:
    from .trpo import TRPO

    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise UsageError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    if args.nproc > 1 and not _under_launcher():
        return launch_local(args, list(args.argv))
    if _under_launcher():
        from .distributed import init_from_env

        init_from_env(None if args.backend == "auto" else args.backend, args.dist_timeout)
    try:
        return _train(args, TRPO)
    finally:
        from .distributed import leave_group

        leave_group(together=False)  # after a failure (or already left)


def _train(args, TRPO) -> int:
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    say = print if rank == 0 else (lambda *a, **k: None)
    out = args.out or os.path.join("runs", f"{args.env_id}-seed{args.seed}")
    model_path = os.path.join(out, "model.pt")
    resume = args.resume or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    options = dict(args.set)
    known = _trpo_defaults()
    for key in options:
        own = {"seed": "--seed", "device": "--device", "log_dir": "--out", "num_threads": "--threads"}.get(key)
        if own:
            raise UsageError(f"--set {key}=...: use {own}")
        if key not in known:
            raise UsageError(f"--set: unknown hyperparameter {key!r} (known: {', '.join(sorted(set(known) - {'seed', 'device', 'log_dir', 'num_threads'}))})")
    for name in ("n_envs", "n_steps", "max_kl", "normalize_obs", "normalize_reward"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    elsewhere = ""
    if resume and os.path.isfile(model_path):
        # A restart: continue the run from its last checkpoint, logging on in the same directory.
        agent = TRPO.load(model_path, device=args.device, log_dir=out, continue_log=True)
        agent.num_threads = args.threads or None
        say(f"resuming {model_path} at {agent.num_timesteps} steps (world size {agent.world_size})")
    else:
        with warnings.catch_warnings():  # the line below says where the run goes instead
            warnings.filterwarnings("ignore", message="log_dir .* already holds a run")
            agent = TRPO(args.env_id, seed=args.seed, device=args.device, log_dir=None if resume else out,
                         num_threads=args.threads or None, policy=args.policy, **options)
        if resume and agent.rank == 0:  # the launcher made this directory for this run (no checkpoint yet)
            from .logger import RunLogger

            agent.log_dir, agent._logger = out, RunLogger(out, resume_from=(0, 0))
        elsewhere = f" ({out} already holds a run)" if agent.rank == 0 and agent.log_dir != out else ""
        out = agent.log_dir if agent.rank == 0 else out  # a fresh numbered directory when `out` holds a run
        model_path = os.path.join(out, "model.pt")
    envs = f"{agent.world_size} ranks x {agent.config.n_envs} envs, {agent.update_layout} update" \
        if agent.world_size > 1 else f"{agent.config.n_envs} envs"
    say(f"training {args.env_id} for {args.timesteps} steps (seed {args.seed}, {envs}, "
        f"{agent.config.batch_size * agent.world_size} steps per update) -> {out}{elsewhere}", flush=True)
    # Periodic checkpoints by default only when a restart can use them (torchrun says how many it allows).
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", args.max_restarts))
    save_every = args.save_every if args.save_every is not None else (10 if restarts else 0)

    def checkpoint(agent, record):
        if save_every and agent.n_updates % save_every == 0:
            agent.save(model_path)  # rank 0 writes; atomically, so a kill never leaves a torn file

    start, start_steps = time.perf_counter(), agent.num_timesteps
    agent.learn(max(0, args.timesteps - agent.num_timesteps), callback=checkpoint,
                progress_bar=not args.no_progress and rank == 0)
    elapsed = time.perf_counter() - start
    agent.save(model_path)
    from .distributed import leave_group

    leave_group(together=True)  # before rank 0's evaluation, which needs no other rank
    if rank == 0:
        plot_runs([out], os.path.join(out, "learning_curve.png"), title=args.env_id)
        mean, std = agent.evaluate(args.eval_episodes)
    agent.close()
    say(f"trained to {agent.num_timesteps} steps in {elapsed:.1f} s "
        f"({(agent.num_timesteps - start_steps) / elapsed:.0f} steps/s"
        f"{f', {agent.world_size} ranks' if agent.world_size > 1 else ''})")
    say(f"saved {model_path}, {os.path.join(out, 'progress.csv')}, {os.path.join(out, 'learning_curve.png')}")
    if rank == 0:
        say(f"deterministic evaluation over {args.eval_episodes} episodes: {mean:.1f} +/- {std:.1f}")
    return 0


# ----------------------------------------------------------------------------- eval
def evaluate(args) -> int:
    from .trpo import TRPO

    if not os.path.isfile(args.model_path):
        raise UsageError(f"{args.model_path}: no such file")
    agent = TRPO.load(args.model_path, env=args.env, device=args.device)
    mean, std = agent.evaluate(args.episodes, deterministic=not args.stochastic, seed=args.seed)
    agent.close()
    kind = "stochastic" if args.stochastic else "deterministic"
    print(f"{kind} evaluation over {args.episodes} episodes: {mean:.1f} +/- {std:.1f}")
    return 0


# ----------------------------------------------------------------------------- plot
def read_progress(run_dir: str) -> tuple[list[float], list[float]]:
    """(timesteps, mean episode return) from a run directory's progress.csv."""
    steps, returns = [], []
    with open(os.path.join(run_dir, "progress.csv"), newline="") as f:
        for row in csv.DictReader(f):
            value = float(row["ep_return_mean"])
            if math.isfinite(value):
                steps.append(float(row["timesteps"]))
                returns.append(value)
    return steps, returns


def plot_runs(run_dirs, out_path: str, title: str | None = None) -> None:
    """Overlays the learning curves (mean episode return vs. steps) of several runs in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for run_dir in run_dirs:
        steps, returns = read_progress(run_dir)
        ax.plot(steps, returns, label=os.path.basename(os.path.normpath(run_dir)))
    ax.set_xlabel("environment steps")
    ax.set_ylabel("mean episode return")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def plot(args) -> int:
    out = args.out or os.path.join(args.run_dirs[0], "learning_curve.png")
    plot_runs(args.run_dirs, out, title=args.title)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    from .distributed import DEFAULT_TIMEOUT_S
    from .policies import BUILT_IN

    defaults = _trpo_defaults()
    parser = _Parser(prog="trpo-ext", description="TRPO with a fused Fisher-vector-product CG solve")
    commands = parser.add_subparsers(dest="command", required=True)
    add = lambda *a, **k: commands.add_parser(*a, formatter_class=_DefaultsHelp, **k)  # noqa: E731

    p = add("train", help="train an agent; write logs, the model and a learning curve")
    p.add_argument("env_id", help="gymnasium environment id, e.g. CartPole-v1")
    p.add_argument("--timesteps", type=_int_at_least(0), default=100_000, help="environment steps")
    p.add_argument("--seed", type=int, default=0, help="seed of the networks, the envs and the sampling")
    p.add_argument("--n-envs", type=int, default=None, help=f"parallel env copies (default: {defaults['n_envs']})")
    p.add_argument("--n-steps", type=int, default=None,
                   help=f"steps per env per update (default: {defaults['n_steps']})")
    p.add_argument("--max-kl", type=float, default=None, help=f"trust-region radius (default: {defaults['max_kl']})")
    p.add_argument("--normalize-obs", action="store_true", default=None,
                   help=f"running observation normalization (default: {defaults['normalize_obs']})")
    p.add_argument("--normalize-reward", action="store_true", default=None,
                   help="scale rewards by the running std of the discounted return, as sb3's VecNormalize "
                        f"(default: {defaults['normalize_reward']})")
    p.add_argument("--policy", default="auto", choices=["auto", *BUILT_IN],
                   help="the built-in network (default: auto, the one that fits the observation space)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", type=_int_at_least(0), default=1,
                   help="torch threads while training (TRPO's num_threads); 0: torch's own choice (default: 1)")
    p.add_argument("--out", default=None, help="run directory (default: runs/ENV_ID-seedSEED)")
    p.add_argument("--eval-episodes", type=_int_at_least(1), default=10, help="episodes of the final evaluation")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--set", type=_hyperparameter, action="append", default=[], metavar="KEY=VALUE",
                   help="any other TRPO hyperparameter (repeatable), e.g. --set cg_iters=15 "
                        "--set 'policy_kwargs={\"hidden\": (32, 32)}'")
    p.add_argument("--nproc", type=_int_at_least(1), default=1,
                   help="data-parallel ranks on this machine (torch.distributed.run; --n-envs is per rank)")
    p.add_argument("--max-restarts", type=_int_at_least(0), default=0,
                   help="with --nproc: restart the ranks this many times after a failure, resuming from the last "
                        "checkpoint")
    p.add_argument("--save-every", type=_int_at_least(0), default=None,
                   help="write OUT/model.pt every this many updates; 0: only at the end (default: 10 when restarts "
                        "are allowed, else 0)")
    p.add_argument("--dist-timeout", type=float, default=DEFAULT_TIMEOUT_S,
                   help="data-parallel: seconds a rank waits for the others before it fails")
    p.add_argument("--backend", default="auto", choices=["auto", "gloo", "nccl"],
                   help="data-parallel: torch.distributed backend; auto: NCCL with a GPU, else gloo")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its model.pt when there is one (restarts do this)")
    p.set_defaults(func=train)

    p = add("eval", help="evaluate a saved model")
    p.add_argument("model_path")
    p.add_argument("--episodes", type=_int_at_least(1), default=10, help="episodes to run")
    p.add_argument("--seed", type=int, default=None, help="first episode's seed (default: the model's seed + 1000003)")
    p.add_argument("--env", default=None, help="env id to evaluate on (default: the one it was trained on)")
    p.add_argument("--stochastic", action="store_true", help="sample actions instead of taking the mode")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(func=evaluate)

    p = add("plot", help="overlay the learning curves of run directories")
    p.add_argument("run_dirs", nargs="+")
    p.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/learning_curve.png of the first run)")
    p.add_argument("--title", default=None)
    p.set_defaults(func=plot)

    # Listed here for --help; main() hands its arguments to trpo_ext.benchmark unparsed.
    commands.add_parser("bench", add_help=False,
                        help="FVP/CG microbenchmarks (fused vs double-backprop reference); bench --help")
    return parser


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv=None) -> int:
    """The command line; returns the exit status: 0, or 2 for a user error (one line on stderr)."""
    import gymnasium as gym

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .benchmark import main as bench_main

        return bench_main(argv[1:])
    command = argv[0] if argv and argv[0] in ("train", "eval", "plot") else None
    prog = "trpo-ext" if command is None else f"trpo-ext {command}"
    try:
        args = build_parser().parse_args(argv)
        args.argv = argv  # what `train --nproc` hands on to its ranks
        return args.func(args)
    except (UsageError, ValueError, TypeError, gym.error.Error, OSError) as e:
        # A wrong id, device, file or hyperparameter: one line naming it, no traceback.
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
