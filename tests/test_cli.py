"""The command line's user errors: one line on stderr naming the problem, exit status 2, no traceback."""
import re

import pytest
import torch

from trpo_ext import TRPO
from trpo_ext.cli import main

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
    (["train", "CartPole-v1", "--set", "seed=3"], "--set seed=...: use --seed"),
    (["train", "CartPole-v1", "--set", "gamma=1.5"], "gamma must be a finite number in"),
    (["train", "CartPole-v1", "--n-envs", "0"], "n_envs must be an int >= 1"),
    (["train", "CartPole-v1", "--eval-episodes", "0"], "argument --eval-episodes: must be >= 1"),
    (["train", "CartPole-v1", "--device", "gpu"], "device must be 'cpu', 'cuda'"),
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
    assert "device='cuda': " in line and ("without CUDA" in line or "not available" in line)
    line = error_line(capsys, ["eval", str(cartpole_model), "--device", "cuda"], tmp_path)
    assert line.startswith("trpo-ext eval: error: device='cuda'")
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
    for default in ("environment steps (default: 100000)", "(default: 8)", "(default: 128)", "(default: 0.01)",
                    "(default: runs/ENV_ID-seedSEED)", "final evaluation (default: 10)", "(default: cpu)"):
        assert default in text, default


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
