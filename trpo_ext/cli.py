"""Command line: `trpo-ext train | eval | plot | bench`.

    trpo-ext train CartPole-v1 --out runs/cartpole      # logs, model.pt, learning_curve.png, final eval
    trpo-ext train CartPole-v1 --out runs/cartpole --resume   # continue it (after Ctrl-C, say)
    trpo-ext train Hopper-v5 --nproc 2                  # data-parallel on 2 local ranks (torch.distributed.run)
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        -m trpo_ext train Hopper-v5 --out /shared/runs/hopper   # across machines
    trpo-ext eval runs/cartpole/model.pt
    trpo-ext plot runs/cartpole runs/other --out curves.png

The train command itself: trpo_ext.cli_train. Errors are one line naming the flag (an agent's error
that names a keyword argument is said in flags: `in_cli_words`), exit status 2.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import math
import os
import re
import shutil
import sys
import textwrap

from . import __version__
from .cli_options import DEFAULT_TIMESTEPS, UsageError, flags_of, set_keys, training_budget
from .cli_train import INTERRUPTED, train
from .config import RECURRENT_DEFAULTS, VECTORIZATIONS, check_num_threads, default_settings
from .curves import plot_runs
from .distributed import DEFAULT_TIMEOUT_S
from .policies import BUILT_IN
from .trpo import TRPO


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

    def _fill_text(self, text, width, indent):  # the epilog's table keeps its lines
        return "\n".join(indent + line for line in text.splitlines())


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


def _thread_count(text: str) -> int:
    """--threads: 0 (torch's own choice) or a count config.check_num_threads accepts."""
    value = _int_at_least(0)(text)
    try:
        return value and check_num_threads(value, "the thread count")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _trpo_defaults() -> dict:
    """TRPO's keyword arguments and their defaults."""
    found = {name: p.default for name, p in inspect.signature(TRPO.__init__).parameters.items()
             if p.kind is inspect.Parameter.KEYWORD_ONLY}
    return {**found, **default_settings(recurrent=False)}  # None there: a feed-forward policy's default


def _hyperparameter(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE a Python literal (numbers, True/False, tuples, dicts) or a bare string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


# ----------------------------------------------------------------------------- errors in flags
AGENT_KEYWORDS = frozenset(name for method in (TRPO.__init__, TRPO.load, TRPO.evaluate)
                           for name in inspect.signature(method).parameters if name not in ("self", "cls"))
"""The keyword arguments an agent's error message may name (and the command line say as a flag)."""

_PYTHON_ONLY = (
    (re.compile(r"pass (\w+)= \([^)]*\) to TRPO\.load"),
     r"the command line cannot rebuild it: load the model in Python, `TRPO.load(path, \1=...)`"),
    (re.compile(r"pass your own policy= / value_net= for smaller ones"),
     "smaller ones need networks of your own, in Python: `TRPO(env, policy=..., value_net=...)`"),
    (re.compile(r", 'auto' or a torch\.device"), " or 'auto'"),
)
"""Advice in an agent's error that only Python can follow, said for the command line (code in backquotes
is left as it is)."""


def in_cli_words(message: str, flags: dict, settable=()) -> str:
    """An agent's error message in the command line's words (the checks stay the agent's): a keyword
    argument it names becomes the flag that sets it (`n_envs must be` -> `--n-envs must be`,
    `device='cuda'` -> `--device cuda`, `pass env=` -> `pass --env`), a hyperparameter without a flag
    `--set KEY`; `flags` as `cli_train.flags_of` gives them, `settable` the --set keys."""
    for pattern, replacement in _PYTHON_ONLY:
        message = pattern.sub(replacement, message)

    def said(key, value=None):
        if key not in AGENT_KEYWORDS:
            return None
        if key in flags:
            flag, takes_value, _ = flags[key]
            if value is None:
                return flag
            return f"{flag} {value}" if takes_value else (flag if value == "True" else f"no {flag}")
        if key in settable:
            return f"--set {key}" if value is None else f"--set {key}={value}"
        return None

    def keyword(match):
        value = match["value"].strip("'\"") if match["value"] else None
        return said(match["key"], value) or match[0]

    parts = re.split(r"(`[^`]*`)", message)
    for i in range(0, len(parts), 2):  # outside backquotes
        parts[i] = re.sub(r"(?<![\w.'\"-])(?P<key>[a-z_]+)=(?P<value>'[^']*'|\"[^\"]*\"|[\w-]+(?:[.:][\w-]+)*)?",
                          keyword, parts[i])
    message = "".join(parts)
    lead = re.match(r"(?P<key>[a-z_]+)(?=[ \[])", message)
    if lead and said(lead["key"]):
        message = said(lead["key"]) + message[lead.end():]
    return message


# ----------------------------------------------------------------------------- eval
def evaluate(args) -> int:
    if not os.path.isfile(args.model_path):
        raise UsageError(f"{args.model_path}: no such file")
    agent = TRPO.load(args.model_path, env=args.env, device=args.device)
    try:
        mean, std = agent.evaluate(args.n_episodes, deterministic=not args.stochastic, seed=args.seed)
    finally:
        agent.close()
    kind = "stochastic" if args.stochastic else "deterministic"
    print(f"{kind} evaluation over {args.n_episodes} episodes: {mean:.1f} +/- {std:.1f}")
    return 0


# ----------------------------------------------------------------------------- plot
def plot(args) -> int:
    out = args.out or os.path.join(args.run_dirs[0], "learning_curve.png")
    plot_runs(args.run_dirs, out, title=args.title)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------- entry point
def _set_keys_help(flags: dict) -> str:
    """The train command's epilog: every --set key with its default and its docstring (TRPOConfig's)."""
    width = max(60, min(120, shutil.get_terminal_size().columns - 2))
    lines = textwrap.wrap("hyperparameters for --set KEY=VALUE (VALUE a Python literal or a bare string; those with "
                          "a flag of their own are above; trpo_ext.config.TRPOConfig documents them all):", width)
    for key, (default, doc) in set_keys(flags).items():
        head = f"  {key}={default!r}"
        body = textwrap.wrap(doc, width - 30, break_on_hyphens=False) or [""]
        if len(head) > 28:
            lines.append(head)
            head = ""
        lines += [f"{head:<30}{body[0]}", *(" " * 30 + line for line in body[1:])]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    defaults = _trpo_defaults()
    parser = _Parser(prog="trpo-ext", description="TRPO with a fused Fisher-vector-product CG solve")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    parser.commands = commands.choices
    add = lambda *a, **k: commands.add_parser(*a, formatter_class=_DefaultsHelp, **k)  # noqa: E731

    p = add("train", help="train an agent; write logs, the model and a learning curve")
    p.add_argument("env", metavar="ENV_ID", help="gymnasium environment id, e.g. CartPole-v1")
    p.add_argument("--timesteps", type=_int_at_least(0), default=None,
                   help=f"environment steps in all (a resumed run trains up to this count) (default: "
                        f"{DEFAULT_TIMESTEPS}; with --preset zoo the zoo's n_timesteps for ENV_ID)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the networks, the envs and the sampling (default: 0)")
    p.add_argument("--n-envs", type=int, default=None, help=f"parallel env copies (default: {defaults['n_envs']})")
    p.add_argument("--n-steps", type=int, default=None,
                   help=f"steps per env per update (default: {defaults['n_steps']})")
    p.add_argument("--max-kl", type=float, default=None, help=f"trust-region radius (default: {defaults['max_kl']}; "
                        f"{RECURRENT_DEFAULTS['max_kl']} with a recurrent --policy)")
    p.add_argument("--normalize-obs", action="store_true", default=None,
                   help=f"running observation normalization (default: {defaults['normalize_obs']})")
    p.add_argument("--normalize-reward", action="store_true", default=None,
                   help="scale rewards by the running std of the discounted return, as sb3's VecNormalize "
                        f"(default: {defaults['normalize_reward']})")
    p.add_argument("--vectorization", default=None, choices=VECTORIZATIONS,
                   help="how the envs are stepped: sync (one process), async (a subprocess per env) or envpool "
                        "(EnvPool's C++ thread pool: pip install \".[envpool]\") "
                        f"(default: {defaults['vectorization']})")
    p.add_argument("--policy", default="auto", choices=["auto", *BUILT_IN],
                   help="the built-in network (default: auto, the one that fits the observation space)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--threads", dest="num_threads", metavar="T", type=_thread_count, default=1,
                   help="torch threads while training (TRPO's num_threads); 0: torch's own choice (default: 1)")
    p.add_argument("--out", dest="log_dir", metavar="DIR", default=None,
                   help="run directory (default: runs/ENV_ID-seedSEED; a numbered one when it holds a run)")
    p.add_argument("--eval-episodes", type=_int_at_least(1), default=10, help="episodes of the final evaluation")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--preset", choices=["zoo"], default=None,
                   help="zoo: rl-baselines3-zoo's TRPO hyperparameters for ENV_ID with sb3-contrib's meaning "
                        "(trpo_ext.presets.zoo, docs/sb3.md); the flags and --set given override them")
    p.add_argument("--set", type=_hyperparameter, action="append", default=[], metavar="KEY=VALUE",
                   help="a hyperparameter without a flag of its own (repeatable; the keys below), e.g. --set "
                        "cg_iters=15 --set 'policy_kwargs={\"hidden\": (32, 32)}'")
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
                   help="continue the run in --out from its model.pt (refused without one), logging on in its "
                        "progress.csv and tb/; bitwise as if never stopped on one rank, statistically on several "
                        "(docs/guide.md). Ctrl-C / SIGTERM stop a run after the update in progress and save it")
    p.set_defaults(func=train)
    p.epilog = _set_keys_help(flags_of(p))

    p = add("eval", help="evaluate a saved model")
    p.add_argument("model_path")
    p.add_argument("--episodes", dest="n_episodes", metavar="N", type=_int_at_least(1), default=10,
                   help="episodes to run")
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
    """The command line; returns the exit status: 0, 2 for a user error (one line on stderr), 130
    after a signal (train: the run saved, one line says how to continue it)."""
    import gymnasium as gym

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from .benchmark import main as bench_main

        return bench_main(argv[1:])
    command = argv[0] if argv and argv[0] in ("train", "eval", "plot") else None
    prog = "trpo-ext" if command is None else f"trpo-ext {command}"
    flags, settable = {}, ()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        args.argv = argv  # what `train --nproc` hands on to its ranks, and the resume command repeats
        args.flags = flags = flags_of(parser.commands[args.command])
        settable = set_keys(flags) if args.command == "train" else ()
        if args.command == "train" and args.timesteps is None:
            args.timesteps = training_budget(args)
        return args.func(args)
    except UsageError as e:
        print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, gym.error.Error, OSError) as e:
        # A wrong id, device, file or hyperparameter: one line naming it, in flags, no traceback.
        print(f"{prog}: error: {in_cli_words(_one_line(e), flags, settable)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before train's own handling starts, or in eval / plot
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
