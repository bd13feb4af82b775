"""Checkpoint files: nothing in a file runs code on load, damaged and foreign files are named as such,
saving always saves."""
import json
import os
import pickle

import gymnasium as gym
import numpy as np
import pytest

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


@pytest.mark.parametrize("entry_point", ["posix:system", "os:system"])
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Evil-v0"])
def test_saved_env_spec_entry_point_and_kwargs_are_never_used(saved, tmp_path, entry_point, env_id):
    marker = tmp_path / "ran"
    spec = {"id": env_id, "entry_point": entry_point, "kwargs": {"command": f"mkdir {marker}"},
            "reward_threshold": None, "nondeterministic": False, "max_episode_steps": None,
            "order_enforce": True, "disable_env_checker": True, "additional_wrappers": [],
            "vector_entry_point": None}
    path = rewrite(saved, tmp_path / "poisoned.pt", env_spec=json.dumps(spec), env_states=None)
    if env_id in gym.registry:  # the registered spec is used, not the file's
        agent = TRPO.load(path)
        assert agent.env_spec is gym.registry[env_id]
        assert agent.evaluate(1)[0] > 0
        assert cli_main(["eval", str(path), "--episodes", "1"]) == 0
    else:
        with pytest.raises(ValueError, match="'Evil-v0', which is not registered in this process"):
            TRPO.load(path)
        with pytest.raises(ValueError, match="not registered"):
            TRPO.load(path, restore_env_states=True)
    assert not marker.exists()


def test_restore_env_states_continues_the_episodes(saved):
    agent = TRPO.load(saved, restore_env_states=True)
    assert agent.env_spec is gym.registry["CartPole-v1"] and agent.evaluate(1)[0] > 0
    with pytest.raises(ValueError, match="cannot be combined with env="):
        TRPO.load(saved, env="CartPole-v1", restore_env_states=True)
    np.testing.assert_array_equal(agent.collector.last_obs, checkpoint.read(saved)["collector"]["last_obs"].numpy()
                                  .astype(np.float32))
