"""The TRPO agent: construction, the policy step's guarantees, save/load, logs, CLI and learning."""
import csv
import importlib.util
import os

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch.nn.utils import parameters_to_vector

import trpo_ext.trpo
from trpo_ext import TRPO
from trpo_ext.cli import main as cli_main
from trpo_ext.envpool_env import EnvPoolVectorEnv

FAST = dict(n_envs=2, n_steps=64, critic_epochs=2, seed=0)


class SpaceEnv(gym.Env):
    """An env with arbitrary spaces, to test which ones the agent accepts."""

    def __init__(self, observation_space, action_space):
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


def policy_vector(agent):
    return parameters_to_vector(agent.policy.parameters()).detach().clone()


# ----------------------------------------------------------------------------- construction
@pytest.mark.parametrize("obs_space, action_space, match", [
    (spaces.Box(-1, 1, (3,)), spaces.Dict({"a": spaces.Discrete(2)}), "Tuple and Dict actions are not supported"),
    (spaces.Box(-1, 1, (3,)), spaces.Tuple([spaces.Discrete(2)] * 2), "Tuple and Dict actions are not supported"),
    (spaces.Box(-1, 1, (3,)), spaces.Box(-1, 1, (2, 2)), r"\(2, 2\)"),
    (spaces.Box(-1, 1, (3,)), spaces.MultiDiscrete([[2, 2], [2, 2]]), "MultiDiscrete must be 1-D"),
    (spaces.Tuple([spaces.Discrete(2)] * 2), spaces.Discrete(2), "Tuple, Text and Graph observations"),
    (spaces.Dict({"a": spaces.Dict({"b": spaces.Discrete(2)})}), spaces.Discrete(2), "nested Dict"),
])
def test_unsupported_spaces_get_an_error_naming_them(obs_space, action_space, match):
    with pytest.raises(TypeError, match=match):
        TRPO(lambda: SpaceEnv(obs_space, action_space), n_envs=1)


@pytest.mark.parametrize("obs_space, policy, match", [
    (spaces.Box(0, 255, (40, 40, 3), np.uint8), "MlpPolicy", "use policy='CnnPolicy'"),
    (spaces.Dict({"a": spaces.Discrete(2)}), "MlpPolicy", "use policy='MultiInputPolicy'"),
    (spaces.Box(-1, 1, (3,)), "CnnPolicy", "needs image observations"),
    (spaces.Box(-1, 1, (3,)), "MultiInputPolicy", "needs a Dict observation space"),
    (spaces.Box(0, 255, (16, 16, 3), np.uint8), "CnnPolicy", "at least 36 x 36"),
])
def test_a_built_in_policy_that_does_not_fit_the_observations_says_which_does(obs_space, policy, match):
    with pytest.raises(ValueError, match=match):
        TRPO(lambda: SpaceEnv(obs_space, spaces.Discrete(2)), n_envs=1, policy=policy)


@pytest.mark.parametrize("make_env, error, match", [  # make_env: the env is built in the test, not at collection
    pytest.param(lambda: 3.5, TypeError, "env must be", id="not-an-env"),
    pytest.param(lambda: "NoSuchEnv-v0", gym.error.NameNotFound, "NoSuchEnv", id="unregistered-id"),
    pytest.param(lambda: gym.make_vec("CartPole-v1", 2), ValueError, "SAME_STEP", id="vector-env-next-step-autoreset"),
    pytest.param(lambda: gym.make("CartPole-v1"), ValueError, "cannot be copied", id="env-instance-with-n_envs-8"),
])
def test_bad_env_errors(make_env, error, match):
    with pytest.raises(error, match=match):
        TRPO(make_env())


def test_env_forms_single_callable_and_vector_env():
    single = TRPO(gym.make("CartPole-v1"), n_envs=1, n_steps=32, critic_epochs=1, seed=0).learn(32, progress_bar=False)
    assert single.envs.num_envs == 1 and single.num_timesteps == 32
    vec = gym.make_vec("CartPole-v1", 3, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    agent = TRPO(vec, n_steps=32, critic_epochs=1, seed=0).learn(32, progress_bar=False)
    assert agent.config.n_envs == 3 and agent.config.batch_size == 96 and agent.num_timesteps == 96
    assert agent.hyperparameters["n_envs"] == 3  # a vector env's own num_envs wins
    assert TRPO(lambda: gym.make("CartPole-v1"), **FAST).learn(1, progress_bar=False).evaluate(1)[0] > 0


NEEDS_ENVPOOL = pytest.mark.skipif(importlib.util.find_spec("envpool") is None,
                                   reason='EnvPool is not installed (pip install ".[envpool]")')


@pytest.mark.parametrize("vectorization, vector_env", [
    ("async", gym.vector.AsyncVectorEnv),
    pytest.param("envpool", EnvPoolVectorEnv, marks=NEEDS_ENVPOOL),
])
def test_other_vector_envs_learn_save_and_load_with_fresh_episodes(tmp_path, vectorization, vector_env):
    """Their env states cannot be saved: a loaded agent starts fresh episodes (seeded from seed + steps)."""
    agent = TRPO("CartPole-v1", vectorization=vectorization, **FAST)
    try:
        agent.learn(128, progress_bar=False)
        assert isinstance(agent.envs, vector_env) and agent.num_timesteps == 128
        if vectorization == "envpool":
            assert agent.envs.seed == agent.rank_seed(agent.config.seed)  # env i: seed + i
        agent.save(tmp_path / "m.pt")
    finally:
        agent.close()
    with pytest.warns(UserWarning, match="holds no env states"):
        loaded = TRPO.load(tmp_path / "m.pt", restore_env_states=True)
    try:
        assert isinstance(loaded.envs, vector_env) and loaded.config.vectorization == vectorization
        if vectorization == "envpool":
            assert loaded.envs.seed == loaded.config.seed + 128
        loaded.learn(128, progress_bar=False)
        assert loaded.num_timesteps == 256 and loaded.evaluate(1)[0] > 0  # evaluated on gymnasium's CartPole-v1
    finally:
        loaded.close()


def test_box_actions_are_clipped_for_the_env_and_predict_shapes():
    agent = TRPO("Pendulum-v1", normalize_obs=True, policy_kwargs={"log_std_init": 1.0}, **FAST)
    agent.learn(128, progress_bar=False)
    record = agent.last_record
    assert record["policy_std"] > 0 and np.isfinite(record["entropy"])
    single, state = agent.predict(np.zeros(3))
    batch, _ = agent.predict(np.random.default_rng(0).normal(size=(50, 3)))
    assert single.shape == (1,) and batch.shape == (50, 1) and state is None
    assert np.all(np.abs(batch) <= 2.0)  # Pendulum's torque bounds
    assert agent.normalizer.count > 128
    with pytest.raises(ValueError, match="obs must have shape"):
        agent.predict(np.zeros(4))


def test_predict_has_sb3s_signature_for_discrete_and_box_actions():
    agent = TRPO("CartPole-v1", **FAST)
    env = gym.make("CartPole-v1")
    obs, _ = env.reset(seed=0)
    action, state = agent.predict(obs, deterministic=True)
    assert state is None and np.ndim(action) == 0 and agent.action_space.contains(action)
    env.step(action)
    action, state = agent.predict(obs, state=None, episode_start=np.array([True]), deterministic=False)
    assert state is None and np.ndim(action) == 0
    assert agent.observation_space == env.observation_space and agent.action_space == env.action_space

    box = TRPO(lambda: SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.Box(-1, 1, (2,))), **FAST)
    action, state = box.predict(np.zeros(3), deterministic=True)  # a 2-D action is not split in two
    assert action.shape == (2,) and state is None
    actions, _ = box.predict(np.zeros((5, 3)))
    assert actions.shape == (5, 2) and box.action_space.shape == (2,)


def test_predict_refuses_non_finite_observations_and_the_reset_tuple():
    agent = TRPO("CartPole-v1", **FAST)
    with pytest.raises(ValueError, match=r"^obs\[2\] is nan; expected finite values$"):
        agent.predict(np.array([0.0, 0.0, np.nan, 0.0]))
    with pytest.raises(ValueError, match=r"^obs\[0\] \(row 1 of the batch\) is inf; expected finite values$"):
        agent.predict(np.array([[0.0] * 4, [np.inf, 0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match=r"^obs has dtype complex128; expected numbers of dtype float32"):
        agent.predict(np.zeros(4, complex))
    with pytest.raises(ValueError, match=r"the \(obs, info\) tuple that env.reset\(\) returns"):
        agent.predict(gym.make("CartPole-v1").reset(seed=0))


DICT_SPACE = spaces.Dict({"target": spaces.Discrete(5), "cells": spaces.MultiBinary(3),
                          "img": spaces.Box(0, 255, (36, 36, 3), np.uint8)})


@pytest.fixture(scope="module")
def dict_agent():
    agent = TRPO(lambda: SpaceEnv(DICT_SPACE, spaces.Discrete(2)), n_envs=1, n_steps=8, seed=0)
    yield agent
    agent.close()


@pytest.mark.parametrize("entry, value, says", [
    ("target", 99, r"obs\['target'\] is 99; expected an integer in \[0, 5\) \(Discrete\)"),
    ("target", -1, r"obs\['target'\] is -1; expected an integer in \[0, 5\)"),
    ("target", 2.0, r"obs\['target'\] has dtype float64; expected numbers of dtype int64"),
    ("cells", np.array([0, 2, 1]), r"obs\['cells'\]\[1\] is 2; expected 0 or 1 \(MultiBinary\)"),
    ("img", np.full((36, 36, 3), 1e6), r"obs\['img'\] has dtype float64; expected numbers of dtype uint8"),
    ("img", np.full((36, 36, 3), -1), r"obs\['img'\] has dtype int64; expected numbers of dtype uint8"),
    ("img", np.full((36, 36, 3), 300, np.uint16), r"obs\['img'\]\[0\]\[0\]\[0\] is 300; expected values in \[0, 255\]"),
], ids=["target-99", "target-negative", "target-float", "multibinary-2", "image-1e6", "image-negative",
        "image-uint16-300"])
def test_predict_checks_entries_against_the_observation_space(dict_agent, entry, value, says):
    obs = DICT_SPACE.sample()
    dict_agent.predict(obs)
    rng = torch.get_rng_state()
    with pytest.raises(ValueError, match=says):
        dict_agent.predict({**obs, entry: value})
    assert torch.equal(torch.get_rng_state(), rng)  # refused before anything ran


def test_evaluate_cuts_an_episode_that_never_ends_and_says_so(monkeypatch):
    agent = TRPO(lambda: SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.Discrete(2)), n_envs=1, n_steps=8, seed=0)
    never = SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.Discrete(2))  # no time limit, no spec
    with pytest.warns(UserWarning, match="2 of 2 episodes did not end within 5 steps"):
        assert agent.evaluate(2, env=never, max_episode_steps=5) == (0.0, 0.0)
    monkeypatch.setattr(trpo_ext.trpo, "EVAL_MAX_EPISODE_STEPS", 7)
    with pytest.warns(UserWarning, match="1 of 1 episodes did not end within 7 steps"):
        agent.evaluate(1, env=never)
    never.spec = gym.envs.registration.EnvSpec("Never-v0", max_episode_steps=4)  # the spec's limit comes first
    with pytest.warns(UserWarning, match="within 4 steps"):
        agent.evaluate(1, env=never)
    agent.close()


def test_evaluate_names_the_episode_step_and_field_of_a_bad_env_return():
    class BadFlag(SpaceEnv):
        def step(self, action):
            return self.observation_space.sample(), 0.0, "False", False, {}

    agent = TRPO(lambda: SpaceEnv(spaces.Box(-1, 1, (3,)), spaces.Discrete(2)), n_envs=1, n_steps=8, seed=0)
    with pytest.raises(ValueError, match=r"evaluate: the env at step 1 of episode 0: terminated is a str 'False'; "
                                         r"expected a bool"):
        agent.evaluate(1, env=BadFlag(spaces.Box(-1, 1, (3,)), spaces.Discrete(2)))
    agent.close()


def test_a_refused_rollout_leaves_the_agent_as_it_was():
    class NaNAt(SpaceEnv):  # a NaN observation at the 5th step
        t = 0

        def step(self, action):
            self.t += 1
            obs = self.observation_space.sample()
            return (obs * np.nan if self.t == 5 else obs), 1.0, False, False, {}

    agent = TRPO(lambda: NaNAt(spaces.Box(-1, 1, (3,)), spaces.Discrete(2)), n_envs=1, n_steps=8, seed=0,
                 normalize_obs=True, normalize_reward=True)
    before = policy_vector(agent), agent.normalizer.count, agent.generator.get_state()
    with pytest.raises(ValueError, match=r"env 0 at step 5 of this rollout \(step 5 of its episode\): observation"
                                         r"\[\d\] is nan; expected finite values; the rollout was discarded"):
        agent.learn(8, progress_bar=False)
    assert torch.equal(policy_vector(agent), before[0]) and agent.normalizer.count == before[1]
    assert torch.equal(agent.generator.get_state(), before[2]) and agent.num_timesteps == 0
    agent.close()


def test_learn_accepts_integral_floats_and_checks_callbacks_before_training():
    agent = TRPO("CartPole-v1", **FAST)
    assert agent.learn(128.0, progress_bar=False).num_timesteps == 128
    assert agent.learn(np.float64(1e2), progress_bar=False).num_timesteps == 256
    with pytest.raises(ValueError, match="total_timesteps must be an int >= 0, got 1.5"):
        agent.learn(1.5, progress_bar=False)
    for bad in (3, "print", [lambda a, r: None, None]):
        with pytest.raises(ValueError, match="callback must be a callable"):
            agent.learn(128, callback=bad, progress_bar=False)
    assert agent.n_updates == 2  # refused before any update
    seen = []
    agent.learn(4 * 128, progress_bar=False,
                callback=[lambda a, r: seen.append(("a", r["update"])), lambda a, r: r["update"] < 4])
    assert agent.n_updates == 4 and seen == [("a", 3), ("a", 4)]


def test_load_with_n_envs(tmp_path):
    TRPO("CartPole-v1", **FAST).save(tmp_path / "m.pt")
    agent = TRPO.load(tmp_path / "m.pt", n_envs=3)
    assert agent.envs.num_envs == 3 and agent.config.n_envs == 3
    assert TRPO.load(tmp_path / "m.pt", env="CartPole-v1", n_envs=1).envs.num_envs == 1
    with pytest.raises(ValueError, match="cannot be combined with env= or n_envs="):
        TRPO.load(tmp_path / "m.pt", n_envs=3, restore_env_states=True)


# ----------------------------------------------------------------------------- the policy step
def test_line_search_never_accepts_kl_above_max_kl():
    records = []
    agent = TRPO("CartPole-v1", max_kl=0.005, **FAST)
    agent.learn(128 * 6, progress_bar=False, callback=lambda a, r: records.append(r))
    assert len(records) == 6
    for r in records:
        assert r["kl"] <= 0.005
        assert r["line_search_failed"] or r["surrogate_improvement"] > 0
        assert 1 <= r["cg_iterations"] <= agent.config.trust_region.cg_iters


def test_fvp_subsampling_uses_a_random_subset_of_the_batch(monkeypatch):
    import trpo_ext._ops

    seen = []
    real_direction = trpo_ext._ops.mlp_policy_direction

    def spy(*args, **kwargs):
        seen.append(kwargs["fvp_obs"].clone())
        return real_direction(*args, **kwargs)

    monkeypatch.setattr(trpo_ext._ops, "mlp_policy_direction", spy)
    batches = []
    agent = TRPO("CartPole-v1", fvp_fraction=0.25, **FAST)
    collect = agent.collector.collect
    agent.collector.collect = lambda *a, **k: batches.append(collect(*a, **k)) or batches[-1]
    agent.learn(128, progress_bar=False)
    (fvp_obs,), (batch,) = seen, batches
    assert fvp_obs.shape == (32, 4) and agent.last_record["cg_iterations"] >= 1
    rows = {tuple(r) for r in batch.obs.tolist()}
    assert all(tuple(r) in rows for r in fvp_obs.tolist())  # a subset of this update's observations
    assert not torch.equal(fvp_obs, batch.obs[:32])  # drawn at random, not the first rows


# ----------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("env_id, settings", [("CartPole-v1", {}),
                                              ("Pendulum-v1", dict(use_sde=True, sde_sample_freq=3))],
                         ids=["cartpole", "pendulum-gsde"])
def test_save_load_round_trip_identical_actions_and_continued_training(tmp_path, env_id, settings):
    kwargs = dict(FAST, normalize_obs=True, **settings)
    uninterrupted = TRPO(env_id, **kwargs).learn(3 * 128, progress_bar=False)

    first = TRPO(env_id, **kwargs).learn(128, progress_bar=False)
    path = tmp_path / "model.pt"
    first.save(path)
    assert not [p for p in os.listdir(tmp_path) if p != "model.pt"]  # no temporary file left behind
    loaded = TRPO.load(path, restore_env_states=True)
    obs = np.random.default_rng(0).normal(size=(20, *first.observation_space.shape))
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0],
                                  first.predict(obs, deterministic=True)[0])
    if settings.get("use_sde"):  # gSDE's noise matrices are saved: stochastic actions are the same too
        np.testing.assert_array_equal(loaded.predict(obs)[0], first.predict(obs)[0])
        assert loaded.policy.noise_step == first.policy.noise_step
    assert loaded.hyperparameters == first.hyperparameters and loaded.num_timesteps == 128

    loaded.learn(2 * 128, progress_bar=False)
    assert loaded.num_timesteps == uninterrupted.num_timesteps
    assert torch.equal(policy_vector(loaded), policy_vector(uninterrupted))
    for a, b in zip(loaded.value_net.parameters(), uninterrupted.value_net.parameters()):
        assert torch.equal(a, b)
    np.testing.assert_array_equal(loaded.normalizer.mean, uninterrupted.normalizer.mean)


def test_load_with_another_env_and_bad_file(tmp_path):
    agent = TRPO("CartPole-v1", **FAST).learn(1, progress_bar=False)
    agent.save(tmp_path / "m.pt")
    other = TRPO.load(tmp_path / "m.pt", env=gym.make("CartPole-v1"))
    assert other.envs.num_envs == 1 and other.num_timesteps == agent.num_timesteps
    torch.save({"something": 1}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="bad.pt is not a trpo_ext checkpoint"):
        TRPO.load(tmp_path / "bad.pt")


# ----------------------------------------------------------------------------- logs and CLI
LOG_KEYS = {"ep_return_mean", "ep_length_mean", "kl", "surrogate_improvement", "line_search_steps",
            "line_search_failed", "cg_iterations", "cg_residual", "value_loss", "explained_variance", "entropy",
            "policy_std", "steps_per_sec", "time_rollout", "time_cg", "time_line_search", "time_critic"}


def test_callback_can_stop_training():
    agent = TRPO("CartPole-v1", **FAST)
    agent.learn(10 * 128, progress_bar=False, callback=lambda a, r: r["update"] < 2)
    assert agent.n_updates == 2


def test_a_keyboard_interrupt_leaves_the_agent_consistent_and_savable(tmp_path, monkeypatch):
    agent = TRPO("CartPole-v1", log_dir=tmp_path / "run", **FAST).learn(128, progress_bar=False)
    step, calls = agent.envs.step, []

    def interrupted_step(actions):  # Ctrl-C in the middle of a rollout
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return step(actions)

    def interrupted_policy_step(*args, **kwargs):  # and in the middle of the update
        raise KeyboardInterrupt

    for where, interrupt in [("rollout", lambda: monkeypatch.setattr(agent.envs, "step", interrupted_step)),
                             ("policy step", lambda: monkeypatch.setattr("trpo_ext.trpo.trust_region_step",
                                                                         interrupted_policy_step))]:
        before = policy_vector(agent)
        interrupt()
        with pytest.raises(KeyboardInterrupt):
            agent.learn(10 * 128, progress_bar=False)
        monkeypatch.undo()
        assert torch.equal(policy_vector(agent), before), where
        assert agent.n_updates == 1 and agent.num_timesteps == 128, where  # the finished updates' counts
        assert len(_rows(tmp_path / "run")) == 1, where  # and their log rows
    agent.learn(128, progress_bar=False).save(tmp_path / "model.pt")  # it trains on, and saves
    agent.close()
    loaded = TRPO.load(tmp_path / "model.pt", log_dir=tmp_path / "run", continue_log=True)
    assert torch.equal(policy_vector(loaded), policy_vector(agent)) and loaded.num_timesteps == 256
    loaded.learn(128, progress_bar=False).close()
    assert [int(row["update"]) for row in _rows(tmp_path / "run")] == [1, 2, 3]


def test_cli_train_eval_plot(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "CartPole-v1", "--timesteps", "256", "--n-envs", "2", "--n-steps", "64",
                     "--out", str(out), "--no-progress", "--eval-episodes", "2", "--set", "critic_epochs=1"]) == 0
    assert "deterministic evaluation over 2 episodes" in capsys.readouterr().out
    for name in ("model.pt", "progress.csv", "learning_curve.png"):
        assert (out / name).is_file()
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tb").iterdir())
    with open(out / "progress.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and LOG_KEYS <= set(rows[0])

    assert cli_main(["eval", str(out / "model.pt"), "--episodes", "1"]) == 0
    assert "evaluation over 1 episodes" in capsys.readouterr().out
    assert cli_main(["plot", str(out), str(out), "--out", str(tmp_path / "curves.png")]) == 0
    assert (tmp_path / "curves.png").is_file()


def _rows(run_dir):
    with open(run_dir / "progress.csv") as f:
        return list(csv.DictReader(f))


def test_a_second_cli_run_into_the_same_directory_gets_a_fresh_one(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "CartPole-v1", "--timesteps", "128", "--n-envs", "2", "--n-steps", "64", "--out", str(out),
            "--no-progress", "--eval-episodes", "1", "--set", "critic_epochs=1"]
    assert cli_main(args) == 0
    first_model = (out / "model.pt").read_bytes()
    assert cli_main(args) == 0
    printed = capsys.readouterr().out
    second = tmp_path / "run_2"
    assert f"-> {second} ({out} already holds a run)" in printed
    assert len(_rows(out)) == 1 and len(_rows(second)) == 1  # no rows appended to the first run
    assert (out / "model.pt").read_bytes() == first_model  # the first model is not overwritten
    assert len(list((out / "tb").iterdir())) == 1
    for name in ("model.pt", "progress.csv", "learning_curve.png"):
        assert (second / name).is_file()
    assert cli_main(["plot", str(out)]) == 0  # the same PNG name as train writes
    assert "learning_curve.png" in capsys.readouterr().out


def test_two_agents_with_one_log_dir_log_to_two_directories(tmp_path):
    TRPO("CartPole-v1", log_dir=tmp_path / "logs", **FAST).learn(128, progress_bar=False).close()
    with pytest.warns(UserWarning, match="already holds a run"):
        second = TRPO("CartPole-v1", log_dir=tmp_path / "logs", **FAST)
    second.learn(128, progress_bar=False).close()
    assert second.log_dir == str(tmp_path / "logs_2")
    assert len(_rows(tmp_path / "logs")) == 1 and len(_rows(tmp_path / "logs_2")) == 1


# ----------------------------------------------------------------------------- learning
def test_short_cartpole_run_beats_random_policy():
    agent = TRPO("CartPole-v1", seed=0)  # the defaults the README's main command uses
    agent.learn(20_000, progress_bar=False)
    mean, _ = agent.evaluate(5)
    assert agent.last_record["ep_return_mean"] > 60  # random policy: about 22
    assert mean > 100


def test_learn_uses_num_threads_and_puts_torch_back():
    seen = []
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        TRPO("CartPole-v1", num_threads=1, **FAST).learn(128, progress_bar=False,
                                                         callback=lambda a, r: seen.append(torch.get_num_threads()))
        assert seen == [1] and torch.get_num_threads() == 2
        TRPO("CartPole-v1", num_threads=None, **FAST).learn(128, progress_bar=False,
                                                            callback=lambda a, r: seen.append(torch.get_num_threads()))
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(saved)
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match="num_threads must be an int >= 1"):
            TRPO("CartPole-v1", num_threads=bad, **FAST)


class CrashingEnv(gym.Env):
    """Raises at its 50th step, as a simulator that crashed would."""

    observation_space = spaces.Box(-1, 1, (3,))
    action_space = spaces.Discrete(2)

    def __init__(self):
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action):
        self.t += 1
        if self.t == 50:
            raise RuntimeError("simulator crashed")
        return np.zeros(3, np.float32), 1.0, False, self.t % 20 == 0, {}


@pytest.mark.filterwarnings("ignore::UserWarning:gymnasium")  # the worker's own error report
def test_an_env_that_raised_is_named_on_the_next_learn():
    agent = TRPO(CrashingEnv, vectorization="async", **FAST)
    try:
        before = policy_vector(agent)
        with pytest.raises(RuntimeError, match="simulator crashed"):
            agent.learn(128, progress_bar=False)
        with pytest.raises(RuntimeError, match=r"failed in an earlier rollout \(RuntimeError: simulator crashed\)"):
            agent.learn(128, progress_bar=False)
        assert torch.equal(policy_vector(agent), before)
    finally:
        agent.close()
