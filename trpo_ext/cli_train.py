"""`trpo-ext train`: a fresh or resumed agent from the command line's options (trpo_ext.cli_options),
`learn` until the step count or a signal, then model.pt, the learning curve and a deterministic
evaluation; `--nproc N` launches N ranks of this same command (docs/guide.md, "The command line";
docs/distributed.md).

A signal (SIGINT, SIGTERM) does not lose the run: the ranks finish the update in progress, agree to
stop after it, save model.pt and the curve, and leave the process group together; one line says how
far the run got and how to continue it, and the exit status is 130. `--resume` continues the run in
`--out` from its model.pt, logging on in the same progress.csv and TensorBoard directory.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import warnings

import gymnasium as gym

from . import checkpoint, distributed
from .cli_options import UsageError, cli_setting, hyperparameter_options, hyperparameters
from .config import TRPOConfig
from .curves import plot_runs, read_progress
from .logger import RunLogger, check_log_dir
from .trpo import TRPO, _resolve_device

INTERRUPTED = 130
"""The exit status of a run stopped by a signal (128 + SIGINT, what a shell reports for Ctrl-C)."""

REPORT_ENV = "TRPO_EXT_INTERRUPT_REPORT"
"""`--nproc`: the file in which rank 0 writes the step count it saved at when a signal stopped the
ranks; the launcher, which received the signal and forwarded it, prints the one line from it."""


# ----------------------------------------------------------------------------- resume
def check_resume(args, options: dict, model_path: str) -> dict:
    """The checkpoint `--resume` continues (read and checked; nothing in it unpickled), if this
    command line agrees with it; UsageError naming what differs, or that there is none."""
    if not os.path.isfile(model_path):
        raise UsageError(f"--resume: {os.path.dirname(model_path) or '.'} holds no model.pt to continue; "
                         "drop --resume to start a run there")
    state = checkpoint.read(model_path)
    saved = state["hyperparameters"]
    asked = TRPOConfig.from_dict({**saved, **{k: v for k, v in options.items() if k in saved}}).to_dict()
    differs = [(key, asked[key], saved[key]) for key in options if key in saved and asked[key] != saved[key]]
    names = state["network_names"]
    for key, given in (("policy", args.policy), ("value_net", options.get("value_net", "auto"))):
        if given != "auto" and given != names[key]:
            differs.append((key, given, names[key]))
    if state["env_id"] is not None and args.env.split(":")[-1] != state["env_id"]:
        differs.append(("env", args.env, state["env_id"]))
    if differs:
        def say(key, value):
            return f"--set {key}={value}" if key == "value_net" else cli_setting(key, value, args.flags)
        raise UsageError(f"--resume: {model_path} was trained with {', '.join(say(k, s) for k, _, s in differs)}; "
                         f"this command says {', '.join(say(k, v) for k, v, _ in differs)}: leave them out to "
                         "continue the run as it was, or start a new run without --resume")
    return state


def resume(args, options: dict, out: str, model_path: str, world_size: int) -> tuple[TRPO, str]:
    """The agent of OUT/model.pt, logging on in OUT from its update, and how exactly it continues.

    Exact (bitwise the uninterrupted run) from N ranks to the same N: the saved envs, episodes and
    random streams are restored (every rank's: `train` saves with `every_rank=True`; the envs are
    unpickled from the file this command wrote). Where the file cannot give each rank its own (at
    another world size, or envs that were not saved), episodes and streams restart from seed +
    steps: the run continues statistically; on one rank, rank 0's envs and stream go on."""
    state = check_resume(args, options, model_path)
    saved_world = state["world_size"]
    problem = checkpoint.rank_states_problem(state, world_size) if world_size > 1 else None
    with warnings.catch_warnings():  # the note below says it
        warnings.filterwarnings("ignore", message=".*holds no env states")
        agent = TRPO.load(model_path, device=args.device, log_dir=out, continue_log=True,
                          restore_env_states=world_size == 1 or problem is None)
    agent.num_threads = args.num_threads or None
    def ranks(n):
        return f"{n} rank{'s' if n > 1 else ''}"

    per_update = agent.config.batch_size
    how = "" if world_size == saved_world else \
        f", saved by {ranks(saved_world)}, now {world_size} ({world_size * per_update} steps per update instead " \
        f"of {saved_world * per_update})"
    if world_size > 1 and problem is None:
        how = f" on {ranks(world_size)}, exactly where it stopped"
    elif world_size > 1:
        how += f"{' on ' + ranks(world_size) if world_size == saved_world else ''}; {problem}, so every rank " \
               "restarts its episodes and stream from seed + steps: it continues statistically, not bitwise"
    elif state["env_states"] is None:
        how += "; its envs were not saved (not picklable, async or EnvPool), so episodes restart: it continues " \
               "statistically"
    elif saved_world > 1:
        how += "; rank 0's envs and random stream go on, the other ranks' are gone: it continues statistically"
    else:
        how = ", exactly where it stopped"
    return agent, how


# ----------------------------------------------------------------------------- signals
class Interrupted(Exception):
    """A signal during the final evaluation, which it ends at once."""


class StopRequest:
    """SIGINT / SIGTERM while `train` runs. The first asks every rank to stop after the update in
    progress (`agreed`, called by every rank after each update); later ones change nothing then (a
    launcher forwards the user's Ctrl-C to ranks that may have had it already). Inside `immediate`
    (the final evaluation, on rank 0 alone) a signal ends the block at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signal: int | None = None
        self._immediate = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame):
        self.signal = self.signal or signum
        if self._immediate:
            raise Interrupted(signal.Signals(signum).name)

    def agreed(self, group) -> bool:
        """Whether a signal reached any rank: one collective, so every rank stops after the same update."""
        with distributed.collective_errors(group):
            return distributed.any_rank(self.signal is not None, group)

    @contextlib.contextmanager
    def immediate(self):
        self._immediate = True
        try:
            if self.signal is not None:
                raise Interrupted(signal.Signals(self.signal).name)
            yield
        finally:
            self._immediate = False

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def resume_command(argv: list[str], out: str, torchrun: bool = False) -> str:
    """The command that continues this run: `argv` with `--out OUT --resume`."""
    words = shlex.join([*[a for a in without_option(argv, "--out") if a != "--resume"], "--out", out, "--resume"])
    return f"torchrun <the same options> -m trpo_ext {words}" if torchrun else f"trpo-ext {words}"


def interrupted_line(steps: int, model_path: str, command: str, complete: bool = False) -> str:
    """The one line after a signal: where the run is saved and how to continue it (`complete`: the
    signal came during the final evaluation, after the last update)."""
    if complete:
        return (f"interrupted during the final evaluation; the run is complete: saved {model_path} ({steps} steps); "
                f"`trpo-ext eval {shlex.quote(model_path)}` evaluates it")
    return f"interrupted at {steps} steps; saved {model_path}; continue with `{command}`"


def interrupted_status() -> int:
    """A rank's exit status after a signal stopped the run: 130, but 0 under `--nproc`, whose
    launcher says it and returns 130 (a rank's non-zero status is a failure there, which its
    elastic agent answers by restarting the ranks when restarts are allowed)."""
    return 0 if os.environ.get(REPORT_ENV) else INTERRUPTED


def _report_interrupt(args, out: str, model_path: str, steps: int, world_size: int, complete: bool = False) -> int:
    """Rank 0 after a signal stopped the run and model.pt is saved: the one line (under `--nproc`,
    the step count for the launcher, which prints it)."""
    report = os.environ.get(REPORT_ENV)
    if report:
        with open(report + ".tmp", "w") as f:
            f.write(f"{steps} {'complete' if complete else 'stopped'}")
        os.replace(report + ".tmp", report)
    else:
        command = resume_command(args.argv, out, torchrun=world_size > 1)
        print(interrupted_line(steps, model_path, command, complete), flush=True)
    return interrupted_status()


# ----------------------------------------------------------------------------- train
def under_launcher() -> bool:
    """Whether this process is a worker that torchrun / torch.distributed.run started."""
    return "TORCHELASTIC_RUN_ID" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def without_option(argv: list[str], name: str) -> list[str]:
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


def run_dir(args) -> str:
    return args.log_dir or os.path.join("runs", f"{args.env}-seed{0 if args.seed is None else args.seed}")


def train(args) -> int:
    if not (math.isfinite(args.dist_timeout) and args.dist_timeout > 0):
        raise UsageError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
    options = hyperparameter_options(args)
    if args.nproc > 1 and not under_launcher():
        return launch_local(args, options)
    stop = StopRequest()  # before anything slow: a signal from here on stops the run after an update
    try:
        if under_launcher():
            distributed.init_from_env(None if args.backend == "auto" else args.backend, args.dist_timeout)
        return _train(args, options, stop)
    finally:
        distributed.leave_group(together=False)  # after a failure (or already left)
        stop.restore()


def _train(args, options: dict, stop: StopRequest) -> int:
    import torch.distributed as dist

    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    say = print if rank == 0 else (lambda *a, **k: None)
    out = run_dir(args)
    model_path = os.path.join(out, "model.pt")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
    elsewhere = ""
    if args.resume or (restart and os.path.isfile(model_path)):  # a restart continues its last checkpoint
        agent, how = resume(args, options, out, model_path, world_size)
        say(f"resuming {model_path} at {agent.num_timesteps} steps{how}")
    else:
        with warnings.catch_warnings():  # the line below says where the run goes instead
            warnings.filterwarnings("ignore", message="log_dir .* already holds a run")
            agent = TRPO(args.env, **{"seed": 0, **options}, device=args.device, log_dir=None if restart else out,
                         num_threads=args.num_threads or None, policy=args.policy)
        if restart and agent.rank == 0:  # a failed first attempt, before its first checkpoint: start over in out
            agent.log_dir, agent._logger = out, RunLogger(out, resume_from=(0, 0))
        elsewhere = f" ({out} already holds a run)" if agent.rank == 0 and agent.log_dir != out else ""
        out = agent.log_dir if agent.rank == 0 else out  # a fresh numbered directory when `out` holds a run
        model_path = os.path.join(out, "model.pt")
    try:
        return _learn_save_evaluate(args, agent, out, model_path, stop, say, elsewhere)
    finally:
        agent.close()


def _learn_save_evaluate(args, agent: TRPO, out: str, model_path: str, stop: StopRequest, say, elsewhere: str) -> int:
    envs = f"{agent.world_size} ranks x {agent.config.n_envs} envs, {agent.update_layout} update" \
        if agent.world_size > 1 else f"{agent.config.n_envs} envs"
    say(f"training {args.env} for {args.timesteps} steps (seed {agent.config.seed}, {envs}, "
        f"{agent.config.batch_size * agent.world_size} steps per update) -> {out}{elsewhere}", flush=True)
    # Periodic checkpoints by default only when a restart can use them (torchrun says how many it allows).
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", args.max_restarts))
    save_every = args.save_every if args.save_every is not None else (10 if restarts else 0)
    stopped = []

    def after_update(agent, record):
        if save_every and agent.n_updates % save_every == 0:
            agent.save(model_path, every_rank=True)  # rank 0 writes every rank's state; atomically (no torn file)
        if stop.agreed(agent.group):
            stopped.append(agent.n_updates)
            return False
        return True

    start, start_steps = time.perf_counter(), agent.num_timesteps
    agent.learn(max(0, args.timesteps - agent.num_timesteps), callback=after_update,
                progress_bar=not args.no_progress and agent.rank == 0)
    elapsed = time.perf_counter() - start
    agent.save(model_path, every_rank=True)
    distributed.leave_group(together=True)  # before rank 0's evaluation, which needs no other rank
    curve = os.path.join(out, "learning_curve.png")
    if agent.rank != 0:
        return interrupted_status() if stopped else 0  # a signal to this rank alone after the last update: nothing
    if stopped or stop.signal:
        plot_runs([out], curve, title=args.env)
        return _report_interrupt(args, out, model_path, agent.num_timesteps, agent.world_size)
    try:
        with stop.immediate():
            mean, std = agent.evaluate(args.eval_episodes)
    except Interrupted:
        plot_runs([out], curve, title=args.env)
        return _report_interrupt(args, out, model_path, agent.num_timesteps, agent.world_size, complete=True)
    plot_runs([out], curve, title=args.env, evaluation=(mean, std, args.eval_episodes))
    say(f"trained to {agent.num_timesteps} steps in {elapsed:.1f} s "
        f"({(agent.num_timesteps - start_steps) / elapsed:.0f} steps/s"
        f"{f', {agent.world_size} ranks' if agent.world_size > 1 else ''})")
    say(f"saved {model_path}, {os.path.join(out, 'progress.csv')}, {curve}")
    returns = read_progress(out)[1]
    last = f"last point, {returns[-1]:.1f}, is" if returns else "points are each"
    say(f"deterministic evaluation over {args.eval_episodes} episodes: {mean:.1f} +/- {std:.1f} (the policy's "
        f"mode; the learning curve's {last} the mean return of the last {agent.config.stats_window} training "
        "episodes, with sampled actions)")
    return 0


# ----------------------------------------------------------------------------- train --nproc N
@contextlib.contextmanager
def _quiet_signal_logs():
    """Drops torch.distributed.elastic's warnings about a signal it received and forwards to the
    ranks (one per rank and one for itself): the launcher's one line says what happened."""
    class NoSignalNews(logging.Filter):
        def filter(self, record):
            return "signal" not in record.getMessage()

    loggers = [logging.getLogger(f"torch.distributed.elastic.{name}.api") for name in ("agent.server", "multiprocessing")]
    quiet = NoSignalNews()
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


def _check_new_run(args, options: dict) -> None:
    """The checks a rank makes before its first update that can fail on the command line alone
    (hyperparameters, the layout at this world size, the env id, the device), made once here
    before N ranks make them N times."""
    known = hyperparameters()
    config = TRPOConfig.from_dict({"seed": 0, **{k: v for k, v in options.items() if k in known}})
    config.update_layout(args.nproc)
    if ":" not in args.env:  # "module:Env" ids are registered by importing the module, on the ranks
        gym.spec(args.env)
    _resolve_device(args.device)


def launch_local(args, options: dict) -> int:
    """`train --nproc N`: runs N local ranks of this same command through torch.distributed's
    launcher (torchrun's engine, with its elastic restarts), in one run directory they share: a
    fresh one, or with `--resume` the one given. 0 when every rank finished, 130 after a signal
    (the launcher forwards it to the ranks, which stop together and save), else 1."""
    import uuid

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    requested = run_dir(args)
    if args.resume:
        check_resume(args, options, os.path.join(requested, "model.pt"))
        out = requested
    else:
        _check_new_run(args, options)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="log_dir .* already holds a run")
            out = check_log_dir(requested)
        os.makedirs(out, exist_ok=True)
    model_path = os.path.join(out, "model.pt")
    worker_argv = without_option(without_option(args.argv, "--out"), "--nproc") + ["--out", out]
    # What `torchrun --standalone` configures: a rendezvous on a free local port.
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=args.nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=args.max_restarts,
                          monitor_interval=0.5, start_method="spawn")
    print(f"launching {args.nproc} ranks (torch.distributed launcher, max restarts {args.max_restarts}) -> {out}",
          flush=True)
    report_dir = tempfile.mkdtemp(prefix="trpo-ext-")
    report = os.path.join(report_dir, "interrupted")
    os.environ[REPORT_ENV] = report  # the ranks inherit it
    failed = signalled = None
    try:
        with _quiet_signal_logs():
            elastic_launch(config, entrypoint=sys.executable)("-m", "trpo_ext", *worker_argv)
    except SignalException:  # the launcher forwarded it to the ranks and waited for them to stop
        signalled = True
    except ChildFailedError as e:
        failed = "; ".join(f"rank {rank} exited with {f.exitcode}" for rank, f in e.failures.items())
    finally:
        del os.environ[REPORT_ENV]
        reported = None
        if os.path.isfile(report):
            with open(report) as f:
                reported = f.read().split()
        shutil.rmtree(report_dir, ignore_errors=True)
    command = resume_command(args.argv, out)
    if reported:  # the ranks stopped on a signal (the launcher's, or one sent to a rank) and saved
        print(interrupted_line(int(reported[0]), model_path, command, reported[1] == "complete"), flush=True)
        return INTERRUPTED
    if not signalled and failed is None:
        return 0
    if failed is not None:
        print(f"trpo-ext train: error: the data-parallel run failed ({failed}); logs and the last checkpoint "
              f"are in {out}", file=sys.stderr)
        return 1
    if os.path.isfile(model_path):
        print(f"interrupted; the ranks did not report a final save, so {model_path} holds the last checkpoint "
              f"({checkpoint.read(model_path)['num_timesteps']} steps); continue with `{command}`", flush=True)
    else:
        print(f"interrupted; the ranks did not report a save and {out} holds no checkpoint", flush=True)
    return INTERRUPTED
