"""Checkpoints of a `TRPO` agent: one file, written atomically, loadable with
`torch.load(weights_only=True)` (plain data and tensors; the env states are one pickled bytes blob).

Loading a file never runs code from it by default: the env is rebuilt only from an id registered in
the loading process (the registry's spec, never an entry point or kwargs from the file), and the
pickled env states are unpickled only with `restore_env_states=True`.

    trpo_ext.checkpoint.save(agent, "model.pt")        # what TRPO.save does
    agent = trpo_ext.checkpoint.load(TRPO, "model.pt")  # what TRPO.load does
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
import warnings

import gymnasium as gym
import torch

from .envs import LeanSyncVectorEnv, eval_env_factory

FORMAT = 2
"""Format 2 keeps the collector's state as `RolloutCollector.state_dict()`; format 1 files (flat
episode / observation / normalizer keys) are still read."""


def save(agent, path: str | os.PathLike) -> None:
    """Writes everything needed to resume `agent` into one file, atomically (temporary file + rename).

    Env states are included when the envs are synchronous and picklable; then
    `load(path, restore_env_states=True)` continues the interrupted episodes exactly.
    """
    state = {
        "format": FORMAT,
        "hyperparameters": agent.hyperparameters,
        "env_spec": agent.env_spec.to_json() if agent.env_spec is not None else None,
        "policy": agent.policy.state_dict(),
        "value_net": agent.value_net.state_dict(),
        "critic_optimizer": agent.critic_optimizer.state_dict(),
        "generator": agent.generator.get_state(),
        "generator_device": agent.device.type,
        "num_timesteps": agent.num_timesteps,
        "n_updates": agent.n_updates,
        "collector": agent.collector.state_dict(),
        "env_states": _env_states(agent.envs),
    }
    write_atomic(state, path)


def load(cls, path: str | os.PathLike, env=None, *, device: str | torch.device | None = None,
         log_dir: str | os.PathLike | None = None, restore_env_states: bool = False):
    """An agent of class `cls` (`TRPO`) restored from `path`; see `TRPO.load`."""
    state = read(path)
    hyperparameters = dict(state["hyperparameters"])
    saved_id = saved_env_id(state)
    registered = gym.registry.get(saved_id) if saved_id is not None else None  # a lookup: imports nothing
    if restore_env_states and env is not None:
        raise ValueError("load: restore_env_states=True continues the saved envs; it cannot be combined with env=")
    resume_envs = restore_env_states and state["env_states"] is not None and state["collector"]["last_obs"] is not None
    if resume_envs:
        env = LeanSyncVectorEnv.from_envs(pickle.loads(state["env_states"]))  # the caller opted in
    elif env is None:
        if saved_id is None:
            raise ValueError(f"{os.fspath(path)!r}: this model was trained on an env without a registered id; "
                             "pass env=")
        if registered is None:
            raise ValueError(f"{os.fspath(path)!r}: this model was trained on {saved_id!r}, which is not registered "
                             "in this process; import the module that registers it, or pass env=")
        env = registered
    if isinstance(env, gym.Env):  # one instance cannot be copied into the saved n_envs
        hyperparameters["n_envs"] = 1
    agent = cls(env, **hyperparameters, device=device or "cpu", log_dir=log_dir)
    if resume_envs and registered is not None:  # the unpickled envs do not know their id; the file does
        agent.env_spec = registered
        agent.make_eval_env = eval_env_factory(registered, registered)
    agent.policy.load_state_dict(state["policy"])
    agent.value_net.load_state_dict(state["value_net"])
    agent.critic_optimizer.load_state_dict(state["critic_optimizer"])
    agent.num_timesteps, agent.n_updates = state["num_timesteps"], state["n_updates"]
    if state["generator_device"] == agent.device.type:  # a CPU and a CUDA generator state differ
        agent.generator.set_state(state["generator"])
    agent.collector.load_state_dict(state["collector"], resume_episodes=resume_envs)
    if not resume_envs:  # fresh envs: episodes restart, seeded so that resuming is still reproducible
        agent.collector.reset(seed=agent.config.seed + agent.num_timesteps)
    return agent


def saved_env_id(state: dict) -> str | None:
    """The env id a checkpoint names (plain data only: the id field of the saved spec's JSON), or None."""
    spec = state.get("env_spec")
    if not isinstance(spec, str):
        return None
    try:
        env_id = json.loads(spec).get("id")
    except (ValueError, AttributeError):
        return None
    return env_id if isinstance(env_id, str) else None


def write_atomic(state: dict, path: str | os.PathLike) -> None:
    """`torch.save(state)` to `path` through a temporary file in the same directory, fsynced and
    renamed over `path`: a crash leaves the old file or the new one, never a torn one."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read(path: str | os.PathLike) -> dict:
    """The checkpoint's state dict (format 1 upgraded to format 2); ValueError if `path` is not a
    trpo_ext TRPO checkpoint."""
    state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") not in (1, FORMAT):
        raise ValueError(f"{os.fspath(path)!r} is not a trpo_ext TRPO checkpoint (format {FORMAT})")
    if state["format"] == 1:
        stats = {"returns": state.pop("episode_returns"), "lengths": state.pop("episode_lengths"),
                 "finished": state.pop("finished_episodes")}
        state["collector"] = {"last_obs": state.pop("last_obs"), "normalizer": state.pop("normalizer"),
                              "stats": stats}
        state["format"] = FORMAT
    return state


def _env_states(envs) -> bytes | None:
    """The synchronous sub-envs, pickled; None for other vector envs or when they do not pickle."""
    if not isinstance(envs, gym.vector.SyncVectorEnv):
        return None
    try:
        return pickle.dumps(envs.envs)
    except Exception as e:  # e.g. envs holding a renderer or a simulator handle
        warnings.warn(f"env states are not saved ({type(e).__name__}: {e}); a loaded agent restarts its "
                      "episodes", stacklevel=4)  # the caller of TRPO.save
        return None
