"""The command line: user errors are one line naming the flag (exit status 2); `--help` lists the
--set keys; a signal stops `train` after an update with the run saved (exit status 130); `--resume`
continues a run exactly (one rank; the ranks' case: test_distributed_cli.py)."""
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import trpo_ext
from trpo_ext import TRPO, checkpoint
from trpo_ext.cli import main
from trpo_ext.cli_options import hyperparameters

from helpers import assert_same_run, progress_rows

TRAIN = ["--timesteps", "64", "--n-envs", "1", "--n-steps", "64", "--no-progress", "--eval-episodes", "1",
         "--set", "critic_epochs=1"]


@pytest.fixture(scope="module")
def cartpole_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    TRPO("CartPole-v1", n_envs=1, n_steps=32, critic_epochs=1, seed=0).save(path)
    return path


def error_line(capsys, argv, tmp_path) -> str:
    """main(argv)'s one-line stderr message, checking the status is 2 and nothing was written."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert not list(tmp_path.iterdir())  # refused before any run directory or file was made
    return lines[0]


@pytest.mark.parametrize("argv, message", [
    (["train", "NoSuchEnv-v0"], "trpo-ext train: error: .*NoSuchEnv"),
    (["train", "CartPole-v1", "--timesteps", "-5"], "argument --timesteps: must be >= 0, got -5"),
    (["train", "CartPole-v1", "--timesteps", "lots"], "argument --timesteps: expected an integer, got 'lots'"),
    (["train", "CartPole-v1", "--set", "no_such_key=3"], "--set: unknown hyperparameter 'no_such_key' \\(known: .*cg_iters"),
    (["train", "CartPole-v1", "--set", "gamma=1.5"], "error: --set gamma must be a finite number in"),
    (["train", "CartPole-v1", "--n-envs", "0"], "error: --n-envs must be an int >= 1"),
    (["train", "CartPole-v1", "--seed", "-1"], "error: --seed must be an int .*got -1$"),
    (["train", "CartPole-v1", "--eval-episodes", "0"], "argument --eval-episodes: must be >= 1"),
    (["train", "CartPole-v1", "--threads", "1000000000"], "argument --threads: the thread count must be an int >= 1 "
                                                          "and <= [0-9]+, got 1000000000$"),
    (["train", "CartPole-v1", "--n-steps", "1000000000"], "error: --n-steps must be an int >= 1 and <= 16777216"),
    (["train", "CartPole-v1", "--device", "gpu"], "error: --device must be 'cpu', 'cuda', 'cuda:N' or 'auto', got 'gpu'$"),
    (["train", "CartPole-v1", "--policy", "CnnPolicy"], "error: --policy CnnPolicy needs image .*: use --policy MlpPolicy$"),
    (["train", "CartPole-v1", "--set", "policy_kwargs={'hidden': 3}"],
     r"error: --set policy_kwargs\['hidden'\] must be a sequence of positive ints"),
    # --set: keys with a flag of their own, keys that make no sense there, a key twice, a conflict with a flag
    (["train", "CartPole-v1", "--set", "seed=3"], "error: --set seed=...: seed has its own flag: use --seed 3$"),
    (["train", "CartPole-v1", "--set", "policy=CnnPolicy"], "--set policy=...: policy has its own flag: use --policy CnnPolicy$"),
    (["train", "CartPole-v1", "--set", "log_dir=elsewhere"], "--set log_dir=...: log_dir has its own flag: use --out elsewhere$"),
    (["train", "CartPole-v1", "--set", "device=cpu"], "use --device cpu$"),
    (["train", "CartPole-v1", "--set", "num_threads=2"], "use --threads 2$"),
    (["train", "CartPole-v1", "--set", "normalize_obs=True"], "use --normalize-obs$"),
    (["train", "CartPole-v1", "--set", "vectorization=async"], "use --vectorization async$"),
    pytest.param(["train", "Hoper-v5", "--vectorization", "envpool"], "error: env: EnvPool .* has no task 'Hoper-v5' "
                 r"\(close: Hopper-v5.*; --vectorization sync runs gymnasium's envs$",
                 marks=pytest.mark.skipif(importlib.util.find_spec("envpool") is None, reason="EnvPool is not installed")),
    (["train", "CartPole-v1", "--set", "env=Pendulum-v1"], "--set env='Pendulum-v1' conflicts with ENV_ID CartPole-v1"),
    (["train", "CartPole-v1", "--set", "process_group=None"], "the command line makes the process group"),
    (["train", "CartPole-v1", "--set", "value_net=my.Critic"], "--set value_net='my.Critic': the command line builds "
                                                               "the built-in critics only"),
    (["train", "CartPole-v1", "--set", "gamma=0.9", "--set", "gamma=0.95"],
     r"--set gamma given twice \(gamma=0.9, gamma=0.95\): give it once$"),
    (["train", "CartPole-v1", "--n-steps", "32", "--set", "n_steps=16"],
     "--set n_steps=16 conflicts with --n-steps 32: give it once, as --n-steps$"),
    (["eval", "no/such/model.pt"], "trpo-ext eval: error: no/such/model.pt: no such file"),
    (["frobnicate"], "trpo-ext: error: argument command: invalid choice"),
])
def test_user_errors_are_one_line_and_exit_2(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    if argv[0] == "train":  # the case's own options last, so that they win
        argv = argv[:2] + TRAIN + argv[2:]
    line = error_line(capsys, argv, tmp_path)
    assert re.search(message, line), line


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu(capsys, tmp_path, monkeypatch, cartpole_model):
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, ["train", "CartPole-v1", "--device", "cuda"] + TRAIN, tmp_path)
    assert "error: --device cuda: " in line and ("without CUDA" in line or "not available" in line)
    assert line.endswith("use --device cpu")
    line = error_line(capsys, ["eval", str(cartpole_model), "--device", "cuda"], tmp_path)
    assert line.startswith("trpo-ext eval: error: --device cuda: ")
    with pytest.raises(ValueError, match="device='cuda'.*use device='cpu'"):
        TRPO("CartPole-v1", device="cuda")


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b""), lambda p: p.write_text("not a model"), lambda p: torch.save({"a": 1}, p)])
def test_eval_on_a_bad_file(capsys, tmp_path, make):
    path = tmp_path / "model.pt"
    make(path)
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"trpo-ext eval: error: {path} is not a trpo_ext checkpoint") and "\n" not in err


def test_eval_on_an_env_the_model_does_not_fit(capsys, cartpole_model):
    assert main(["eval", str(cartpole_model), "--env", "Pendulum-v1", "--episodes", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "does not fit this env" in err
    assert "the model was trained on observation space Box(" in err and "action space Discrete(2)" in err
    assert "the env has observation space Box(" in err and "action space Box(-2.0, 2.0, (1,), float32)" in err


def test_help_shows_the_real_defaults(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for default in ("this count) (default: 100000; with --preset zoo", "(default: 8)", "(default: 128)", "(default: 0.01; 0.02 with a recurrent --policy)",
                    "(default: runs/ENV_ID-seedSEED;", "sampling (default: 0)", "final evaluation (default: 10)", "(default: cpu)"):
        assert default in text, default


def test_timesteps_default_to_the_presets_budget(monkeypatch):
    import trpo_ext.cli as cli
    seen = []
    monkeypatch.setattr(cli, "train", lambda args: seen.append(args.timesteps) or 0)  # the budget train gets
    for argv, steps in ((["train", "CartPole-v1"], cli.DEFAULT_TIMESTEPS),
                        (["train", "CartPole-v1", "--preset", "zoo"], trpo_ext.presets.zoo_timesteps("CartPole-v1")),
                        (["train", "CartPole-v1", "--preset", "zoo", "--timesteps", "64"], 64)):
        assert cli.main(argv) == 0 and seen.pop() == steps


def test_timesteps_take_integral_floats():
    from trpo_ext.cli import build_parser

    assert build_parser().parse_args(["train", "CartPole-v1", "--timesteps", "1e5"]).timesteps == 100_000
    assert main(["train", "CartPole-v1", "--timesteps", "1.5"]) == 2


def test_train_policy_option_takes_the_built_in_names():
    from trpo_ext.cli import UsageError, build_parser

    parser = build_parser()
    assert parser.parse_args(["train", "CartPole-v1"]).policy == "auto"
    assert parser.parse_args(["train", "X-v0", "--policy", "MultiInputPolicy"]).policy == "MultiInputPolicy"
    with pytest.raises(UsageError, match="invalid choice: 'RnnPolicy'"):
        parser.parse_args(["train", "X-v0", "--policy", "RnnPolicy"])


def test_a_model_with_a_custom_policy_is_named_as_needing_python(capsys, tmp_path):
    class Linear(torch.nn.Module):
        def __init__(self, observation_space, action_space):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def forward(self, obs):
            return torch.distributions.Categorical(logits=self.layer(obs))

    TRPO("CartPole-v1", n_envs=1, n_steps=32, policy=Linear, seed=0).save(tmp_path / "custom.pt")
    assert main(["eval", str(tmp_path / "custom.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "policy=" not in err.replace("`TRPO.load(path, policy=...)`", "")
    assert err.endswith("the command line cannot rebuild it: load the model in Python, `TRPO.load(path, policy=...)`")


def test_help_lists_the_set_keys_with_their_defaults_and_docstrings(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    epilog = capsys.readouterr().out.split("hyperparameters for --set KEY=VALUE")[1]
    text = " ".join(epilog.split())
    flagged = {"n_envs", "n_steps", "max_kl", "normalize_obs", "normalize_reward", "seed", "vectorization"}
    for key, (default, doc) in hyperparameters().items():  # trpo_ext.config's fields and docstrings
        if key in flagged:
            assert f" {key}=" not in text, key
        else:
            assert f"{key}={default!r} {' '.join(doc.split()[:4])}" in text, key
    assert "value_net='auto' The built-in critic" in text


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"trpo-ext {trpo_ext.__version__}"


# ----------------------------------------------------------------------------- signals and --resume
def last_line(capsys) -> str:
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    return captured.out.strip().splitlines()[-1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_train_after_the_update_in_progress_and_saves(capsys, tmp_path, monkeypatch, signum):
    real_update = TRPO._update

    def update(agent):  # the signal arrives during the second update
        if agent.n_updates == 1:
            os.kill(os.getpid(), signum)
        return real_update(agent)

    monkeypatch.setattr(TRPO, "_update", update)
    out = tmp_path / "run"
    argv = ["train", "CartPole-v1", *TRAIN, "--timesteps", "640", "--out", str(out)]
    assert main(argv) == 130
    assert last_line(capsys) == (f"interrupted at 128 steps; saved {out}/model.pt; continue with `trpo-ext train "
                                 f"CartPole-v1 {' '.join(TRAIN)} --timesteps 640 --out {out} --resume`")
    assert checkpoint.read(out / "model.pt")["num_timesteps"] == 128 and len(progress_rows(out)) == 2
    assert (out / "learning_curve.png").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # train put the handlers back


def test_a_signal_during_the_final_evaluation_ends_it(capsys, tmp_path, monkeypatch):
    def evaluate(agent, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # the handler raises in here
        raise AssertionError("the evaluation was not interrupted")

    monkeypatch.setattr(TRPO, "evaluate", evaluate)
    out = tmp_path / "run"
    assert main(["train", "CartPole-v1", *TRAIN, "--out", str(out)]) == 130
    assert last_line(capsys) == (f"interrupted during the final evaluation; the run is complete: saved {out}/model.pt "
                                 f"(64 steps); `trpo-ext eval {out}/model.pt` evaluates it")
    assert (out / "learning_curve.png").is_file()

    monkeypatch.setattr(TRPO, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(["eval", str(out / "model.pt")]) == 130
    assert capsys.readouterr().err.strip() == "trpo-ext eval: interrupted"


def test_resume_refuses_a_directory_without_a_model_or_other_settings(capsys, tmp_path, monkeypatch, cartpole_model):
    monkeypatch.chdir(tmp_path)
    line = error_line(capsys, ["train", "CartPole-v1", *TRAIN, "--out", "run", "--resume"], tmp_path)
    assert line == "trpo-ext train: error: --resume: run holds no model.pt to continue; drop --resume to start a run there"
    (tmp_path / "run").mkdir()
    model = tmp_path / "run" / "model.pt"
    model.write_bytes(cartpole_model.read_bytes())  # n_envs=1, n_steps=32, critic_epochs=1, seed 0, CartPole-v1
    for argv, said in [(["--n-steps", "64"], "--n-steps 32; this command says --n-steps 64"),
                       (["--seed", "1"], "--seed 0; this command says --seed 1"),
                       (["--set", "gamma=0.9"], "--set gamma=0.99; this command says --set gamma=0.9")]:
        assert main(["train", "CartPole-v1", "--out", "run", "--resume", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (f"trpo-ext train: error: --resume: run/model.pt was trained with {said}: leave them out to "
                       "continue the run as it was, or start a new run without --resume"), err
    assert main(["train", "Acrobot-v1", "--out", "run", "--resume"]) == 2
    assert "was trained with ENV_ID CartPole-v1; this command says ENV_ID Acrobot-v1" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["model.pt"]  # nothing written


def tensorboard_steps(run_dir) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [event.step for event in events.Scalars("trpo/kl")]


def test_ctrl_c_then_resume_equals_the_uninterrupted_run(capsys, tmp_path):
    """A subprocess interrupted (SIGINT to its process group, as Ctrl-C sends it) after it logged
    updates, then resumed with --resume to a step count, is bitwise the run that went there at once:
    networks, critic optimizer, every computed column of progress.csv, the TensorBoard steps."""
    stopped = tmp_path / "stopped"
    argv = ["train", "CartPole-v1", *TRAIN, "--timesteps", "1000000"]
    # This process's environment as it is: the float results depend on OMP_NUM_THREADS at start-up,
    # even with --threads 1 (seen with torch 2.13: the KL's last bits), and the resumed and the
    # uninterrupted runs below run in this process.
    proc = subprocess.Popen([sys.executable, "-m", "trpo_ext", *argv, "--out", str(stopped)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=tmp_path, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (stopped / "progress.csv").is_file() or len(progress_rows(stopped)) < 3:
            assert proc.poll() is None and time.time() < deadline, "the run ended or stalled before logging 3 updates"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and stderr == "", stderr
    steps = checkpoint.read(stopped / "model.pt")["num_timesteps"]
    assert stdout.splitlines()[-1] == (f"interrupted at {steps} steps; saved {stopped}/model.pt; continue with "
                                       f"`trpo-ext {' '.join(argv)} --out {stopped} --resume`")
    assert len(progress_rows(stopped)) == steps // 64 and (stopped / "learning_curve.png").is_file()

    total = ["--timesteps", str(steps + 3 * 64)]
    assert main([*argv, *total, "--out", str(stopped), "--resume"]) == 0
    assert f"resuming {stopped}/model.pt at {steps} steps, exactly where it stopped" in capsys.readouterr().out
    straight = tmp_path / "straight"
    assert main([*argv, *total, "--out", str(straight)]) == 0

    assert checkpoint.read(stopped / "model.pt")["num_timesteps"] == steps + 192
    assert_same_run(stopped, straight)
    assert [int(row["update"]) for row in progress_rows(stopped)] == list(range(1, steps // 64 + 4))  # no row twice
    assert tensorboard_steps(stopped) == tensorboard_steps(straight) == [64 * u for u in range(1, steps // 64 + 4)]
