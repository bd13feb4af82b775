"""Checkpoint files: nothing in a file runs code on load, damaged and foreign files are named as such,
saving always saves."""
import copy
import os
import pickle
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_ext import TRPO, checkpoint
from trpo_ext.cli import main as cli_main

FAST = dict(n_envs=2, n_steps=32, critic_epochs=1, seed=0)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small trained CartPole agent's checkpoint (read it, never write to it)."""
    path = tmp_path_factory.mktemp("saved") / "model.pt"
    agent = TRPO("CartPole-v1", **FAST).learn(64, progress_bar=False)
    agent.save(path)
    agent.close()
    return path


def rewrite(src, dst, **changes):
    """A copy of checkpoint `src` at `dst` with some fields of its state replaced."""
    state = checkpoint.read(src)
    state.update(changes)
    checkpoint.write_atomic(state, dst)
    return dst


# ----------------------------------------------------------------------------- a file never runs code
class MakesMarker:
    """Unpickling this creates the directory `path`: what a malicious payload would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_pickled_env_states_are_not_unpickled_unless_asked(saved, tmp_path):
    marker = tmp_path / "ran"
    path = rewrite(saved, tmp_path / "poisoned.pt", env_states=pickle.dumps([MakesMarker(marker)]))
    agent = TRPO.load(path)  # safe fallback: fresh envs from the registered id
    assert not marker.exists()
    assert agent.envs.num_envs == 2 and agent.num_timesteps == 64
    assert agent.learn(32, progress_bar=False).num_timesteps == 128
    assert cli_main(["eval", str(path), "--episodes", "1"]) == 0
    assert not marker.exists()
    with pytest.raises(Exception):  # the opt-in does unpickle (the payload is live): only for trusted files
        TRPO.load(path, restore_env_states=True)
    assert marker.exists()


@pytest.mark.parametrize("env_id", ["Evil-v0", "posix:Evil-v0"])
def test_an_unregistered_saved_id_is_refused(saved, tmp_path, env_id):
    path = rewrite(saved, tmp_path / "m.pt", env_id=env_id)
    with pytest.raises(ValueError, match="which is not registered in this process; import the module"):
        TRPO.load(path)
    assert TRPO.load(path, env="CartPole-v1").num_timesteps == 64


def test_restore_env_states_continues_the_episodes(saved):
    agent = TRPO.load(saved, restore_env_states=True)
    assert agent.env_spec is gym.registry["CartPole-v1"] and agent.evaluate(1)[0] > 0
    with pytest.raises(ValueError, match="cannot be combined with env="):
        TRPO.load(saved, env="CartPole-v1", restore_env_states=True)
    with pytest.warns(UserWarning, match="holds no env states"):
        TRPO.load(rewrite(saved, saved.with_name("no-states.pt"), env_states=None), restore_env_states=True)
    np.testing.assert_array_equal(agent.collector.last_obs, checkpoint.read(saved)["collector"]["last_obs"].numpy()
                                  .astype(np.float32))


# ----------------------------------------------------------------------------- save always saves
class ClassEntryPointEnv(gym.Env):
    observation_space = gym.spaces.Box(-1, 1, (3,))
    action_space = gym.spaces.Discrete(2)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 1.0, False, bool(self.np_random.random() < 0.1), {}


@pytest.fixture
def class_entry_point_id():
    gym.register("TrpoExtClassEntryPoint-v0", entry_point=ClassEntryPointEnv)
    yield "TrpoExtClassEntryPoint-v0"
    del gym.registry["TrpoExtClassEntryPoint-v0"]


def test_save_with_a_class_entry_point(class_entry_point_id, tmp_path):
    agent = TRPO(class_entry_point_id, **FAST).learn(64, progress_bar=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left out
        agent.save(tmp_path / "m.pt")
    loaded = TRPO.load(tmp_path / "m.pt")
    assert loaded.num_timesteps == 64 and loaded.evaluate(1)[0] > 0
    del gym.registry[class_entry_point_id]  # a process that does not register it
    with pytest.raises(ValueError, match="'TrpoExtClassEntryPoint-v0', which is not registered"):
        TRPO.load(tmp_path / "m.pt")
    gym.register(class_entry_point_id, entry_point=ClassEntryPointEnv)


def test_save_with_a_make_vec_env(tmp_path):
    vec = gym.make_vec("CartPole-v1", 3, vectorization_mode="sync",
                       vector_kwargs={"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP})
    agent = TRPO(vec, n_steps=32, critic_epochs=1, seed=0).learn(96, progress_bar=False)
    assert agent.evaluate(1)[0] > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        agent.save(tmp_path / "m.pt")
    loaded = TRPO.load(tmp_path / "m.pt")
    assert loaded.envs.num_envs == 3 and loaded.num_timesteps == 96
    np.testing.assert_array_equal(loaded.predict(np.zeros((5, 4)), deterministic=True)[0],
                                  agent.predict(np.zeros((5, 4)), deterministic=True)[0])


def test_what_cannot_be_saved_about_the_env_is_left_out_with_a_warning(tmp_path):
    agent = TRPO(lambda: ClassEntryPointEnv(), **FAST).learn(64, progress_bar=False)  # no registered id
    with pytest.warns(UserWarning, match="no registered id and is not saved: TRPO.load will need env="):
        agent.save(tmp_path / "m.pt")
    with pytest.raises(ValueError, match="trained on an env without a registered id; pass env="):
        TRPO.load(tmp_path / "m.pt")
    loaded = TRPO.load(tmp_path / "m.pt", env=lambda: ClassEntryPointEnv())
    assert loaded.num_timesteps == 64 and loaded.envs.num_envs == 2

    pendulum = TRPO(lambda: gym.make("Pendulum-v1", g=5.0), **FAST)
    with pytest.warns(UserWarning, match="kwargs .*'g': 5.0.* are not saved"):
        pendulum.save(tmp_path / "p.pt")
    assert TRPO.load(tmp_path / "p.pt").envs.envs[0].unwrapped.g == 10.0


# ----------------------------------------------------------------------------- damaged and foreign files
class Foreign:
    pass


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p, good: _write(p, b""), r"is not a trpo_ext checkpoint \(the file is empty\)"),
    (lambda p, good: _write(p, good[: len(good) // 2]), "is damaged"),
    (lambda p, good: _write(p, np.random.default_rng(0).bytes(5000)), "is not a trpo_ext checkpoint"),
    (lambda p, good: _write(p, b"hello, this is a text file\n" * 10), "is not a trpo_ext checkpoint"),
    (lambda p, good: _write(p, pickle.dumps({"format": 2}, protocol=2)), "is not a trpo_ext checkpoint"),
    (lambda p, good: torch.save({"something": 1}, p), r"is not a trpo_ext checkpoint \(it holds a dict with keys"),
    (lambda p, good: torch.save([1, 2], p), r"is not a trpo_ext checkpoint \(it holds a list"),
    (lambda p, good: torch.save({"x": Foreign()}, p), "is not a trpo_ext checkpoint .*other than plain data"),
    (lambda p, good: torch.save({"format": 3, "sha256": "0" * 64, "payload": b"x"}, p), "is damaged .*sha256"),
    (lambda p, good: checkpoint.write_atomic({"format": 3, "policy": {}}, p), "is damaged .*no 'hyperparameters'"),
    (lambda p, good: checkpoint.write_atomic([1, 2], p), r"is damaged \(the payload is a list, not a dict\)"),
], ids=["empty", "truncated", "random-bytes", "text", "plain-pickle", "foreign-dict", "foreign-list",
        "foreign-object", "bad-checksum", "missing-keys", "payload-not-a-dict"])
def test_damaged_or_foreign_files_are_named_as_such(saved, tmp_path, make, message):
    path = tmp_path / "file.pt"
    make(path, saved.read_bytes())
    with pytest.raises(ValueError, match=f"file.pt {message}"):
        TRPO.load(path)


@pytest.mark.parametrize("field, value, expected", [
    ("hyperparameters", [1, 2], "hyperparameters is a list, expected a dict"),
    ("policy", {"layers.0.weight": 3}, "policy is a dict, expected a dict of tensors"),
    ("num_timesteps", "64", "num_timesteps is a str, expected an int"),
    ("num_timesteps", True, "num_timesteps is a bool, expected an int"),
    ("env_id", 3, "env_id is a int, expected a string or None"),
    ("env_states", "abc", "env_states is a str, expected bytes or None"),
    ("world_size", 2.0, "world_size is a float, expected an int"),
    ("policy_class", None, "policy_class is a NoneType, expected a string"),
    ("critic_optimizer", [], "critic_optimizer is a list, expected a dict"),
    ("format", 2, "the payload says format 2, the file 3"),
    ("spaces", {"observation": "Box(4)"}, "spaces is .*, expected the observation and action spaces in words"),
    ("network_names", {"policy": "MlpPolicy"}, "network_names is .*, expected a dict of built-in names .*"),
    ("network_names", {"policy": "os.system", "value_net": None}, "network_names is .*, expected a dict of built-in .*"),
    ("collector", {"stats": {}}, "collector: no 'last_obs', 'last_masks', 'mask_source', 'normalizer', "
                                 "'reward_scaler'"),
])
def test_fields_of_the_wrong_type_are_damage(saved, tmp_path, field, value, expected):
    path = rewrite(saved, tmp_path / "m.pt", **{field: value})
    with pytest.raises(ValueError, match=f"m.pt is damaged \\({expected}\\)"):
        TRPO.load(path)


def test_flipped_bytes_in_the_middle_are_detected(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(b ^ 0xFF for b in data[middle: middle + 64])
    path = _write(tmp_path / "flipped.pt", bytes(data))
    with pytest.raises(ValueError, match="flipped.pt is damaged"):
        TRPO.load(path)


@pytest.mark.parametrize("field", [key for key, _, _ in checkpoint.FIELD_TYPES])
def test_every_field_is_required(saved, tmp_path, field):
    state = checkpoint.read(saved)
    del state[field]
    checkpoint.write_atomic(state, tmp_path / "m.pt")
    with pytest.raises(ValueError, match=f"m.pt is damaged \\(no '{field}'\\)"):
        TRPO.load(tmp_path / "m.pt")


@pytest.mark.parametrize("field, value, expected", [
    (None, None, r"collector: no '{field}'"),
    ("stats", [], "collector: stats is a list, expected a dict"),
    ("last_masks", [[True]], "collector: last_masks is a list, expected a tensor or None"),
    ("mask_source", 1, "collector: mask_source is a int, expected a string or None"),
    ("normalizer", "none", "collector: normalizer is a str, expected a dict or None"),
])
def test_every_collector_field_is_required_and_checked(saved, tmp_path, field, value, expected):
    for key, _, _ in checkpoint.COLLECTOR_FIELD_TYPES if field is None else [(field, None, None)]:
        state = checkpoint.read(saved)
        if field is None:
            del state["collector"][key]
        else:
            state["collector"][key] = value
        checkpoint.write_atomic(state, tmp_path / "m.pt")
        with pytest.raises(ValueError, match=f"m.pt is damaged \\({expected.format(field=key)}\\)"):
            TRPO.load(tmp_path / "m.pt")


def test_what_save_writes_is_what_read_checks(saved):
    agent = TRPO.load(saved)
    state = checkpoint.read(saved)
    assert list(state) == [key for key, _, _ in checkpoint.FIELD_TYPES]
    assert list(agent.collector.state_dict()) == [key for key, _, _ in checkpoint.COLLECTOR_FIELD_TYPES]


def test_earlier_formats_are_not_checkpoints(saved, tmp_path):
    state = checkpoint.read(saved)
    state["format"] = 2
    torch.save(state, tmp_path / "v2.pt")  # the state dict itself, unwrapped
    with pytest.raises(ValueError, match=r"v2.pt is not a trpo_ext checkpoint \(it holds a dict with keys .*, not a "
                                         r"TRPO checkpoint of format 3\)"):
        TRPO.load(tmp_path / "v2.pt")


def test_saves_leave_no_temporary_files(saved, tmp_path, monkeypatch):
    agent = TRPO.load(saved)
    path = tmp_path / "model.pt"
    (tmp_path / "model.pt.tmp").write_bytes(b"left by a save that was killed")
    for _ in range(3):
        agent.save(path)
    assert os.listdir(tmp_path) == ["model.pt"]
    before = path.read_bytes()

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        agent.learn(32, progress_bar=False).save(path)
    assert os.listdir(tmp_path) == ["model.pt"] and path.read_bytes() == before
    monkeypatch.undo()
    assert TRPO.load(path).num_timesteps == 64


def _optimizer_state(state, change):
    state = copy.deepcopy(state)
    change(state["critic_optimizer"])
    return state


@pytest.mark.parametrize("change, message", [
    (lambda o: o["state"][0].update(exp_avg=torch.zeros(3)), r"state\[0\]\['exp_avg'\]: .*shape \(3,\)"),
    (lambda o: o["state"][1].update(exp_avg_sq=o["state"][1]["exp_avg_sq"].double()),
     r"state\[1\]\['exp_avg_sq'\]: torch.float64"),
    (lambda o: o["state"][0].update(exp_avg=o["state"][0]["exp_avg"].t().contiguous().t()),
     r"state\[0\]\['exp_avg'\]: .*not contiguous"),
    (lambda o: o["state"][0].update(step=torch.tensor([1.0, 2.0])), r"state\[0\]\['step'\]: must be a 1-element"),
    (lambda o: o["state"][0].update(step=3), r"state\[0\]\['step'\]: a int, not a tensor"),
    (lambda o: o["state"][0].pop("exp_avg_sq"), r"state\[0\]: no 'exp_avg_sq'"),
    (lambda o: o["state"].update({99: {}}), r"state\[99\]: no such parameter"),
    (lambda o: o["param_groups"][0].update(params=[0]), "param_groups: parameters"),
], ids=["shape", "dtype", "contiguous", "step-shape", "step-type", "missing", "extra", "groups"])
def test_optimizer_state_is_validated_before_use(saved, tmp_path, change, message):
    state = checkpoint.read(saved)
    assert len(state["critic_optimizer"]["state"]) == 6  # the value net's 3 layers, trained
    checkpoint.write_atomic(_optimizer_state(state, change), tmp_path / "opt.pt")
    with pytest.raises(ValueError, match=f"opt.pt is damaged \\(critic_optimizer {message}"):
        TRPO.load(tmp_path / "opt.pt")
