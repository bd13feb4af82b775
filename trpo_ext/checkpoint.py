"""Checkpoints of a `TRPO` agent: one file, written atomically, loadable with
`torch.load(weights_only=True)` (plain data and tensors; the env states are one pickled bytes blob).

The file is `{"format": 3, "sha256": HEX, "payload": BYTES}`, BYTES being `torch.save` of the state
dict, so damage anywhere in the payload is detected. Every field is required and checked before
any of it is used; every problem with a file is one ValueError: "PATH is not a trpo_ext checkpoint
(...)" or "PATH is damaged (...)".

Loading a file never runs code from it by default: the env is rebuilt only from an id registered in
the loading process (the registry's spec, never an entry point or kwargs from the file), and the
pickled env states are unpickled only with `restore_env_states=True`. The networks are state
dicts; their classes' qualified names (`policy_class`, `value_net_class`) are stored for
information and for the error when a custom network is not passed again at load time.

    trpo_ext.checkpoint.save(agent, "model.pt")        # what TRPO.save does
    agent = trpo_ext.checkpoint.load(TRPO, "model.pt")  # what TRPO.load does
"""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import warnings

import gymnasium as gym
import torch

from . import distributed
from .envs import LeanSyncVectorEnv, eval_env_factory
from .policies import BUILT_IN, qualified_name

FORMAT = 3
"""The only format read: the state dict wrapped with its sha256."""

NONE = type(None)
FIELD_TYPES = (
    ("format", int, "an int"), ("hyperparameters", dict, "a dict"), ("env_id", (str, NONE), "a string or None"),
    ("spaces", dict, "a dict"), ("policy", dict, "a dict of tensors"), ("value_net", dict, "a dict of tensors"),
    ("policy_class", str, "a string"), ("value_net_class", str, "a string"), ("network_names", dict, "a dict"),
    ("critic_optimizer", dict, "a dict"), ("generator", torch.Tensor, "a tensor"),
    ("generator_device", str, "a string"), ("num_timesteps", int, "an int"), ("n_updates", int, "an int"),
    ("world_size", int, "an int"), ("collector", dict, "a dict"), ("env_states", (bytes, NONE), "bytes or None"))
"""Every field of a state dict (what `save` writes) and what it must be, checked by `read` before
any of it is used."""

COLLECTOR_FIELD_TYPES = (
    ("last_obs", (torch.Tensor, dict, NONE), "a tensor, a dict or None"),
    ("last_masks", (torch.Tensor, NONE), "a tensor or None"), ("mask_source", (str, NONE), "a string or None"),
    ("stats", dict, "a dict"), ("normalizer", (dict, NONE), "a dict or None"),
    ("reward_scaler", (dict, NONE), "a dict or None"))
"""Likewise for the collector's state (`RolloutCollector.state_dict()`)."""


def save(agent, path: str | os.PathLike) -> None:
    """Writes everything needed to resume `agent` into one file, atomically (temporary file + rename).

    The networks, optimizer, statistics and step count are always saved. Of the env only its
    registered id is kept (`load` rebuilds the env registered under it); an env without one, or
    kwargs differing from the registered ones, are left out with a warning.

    Env states are included when the envs are synchronous and picklable; then
    `load(path, restore_env_states=True)` continues the interrupted episodes exactly.
    """
    state = {
        "format": FORMAT,
        "hyperparameters": agent.hyperparameters,
        "env_id": _env_id(agent.env_spec),
        "spaces": {"observation": str(agent.observation_space), "action": str(agent.action_space)},
        "policy": agent.policy.state_dict(),
        "value_net": agent.value_net.state_dict(),
        "policy_class": qualified_name(agent.policy),  # for information: loading never imports it
        "value_net_class": qualified_name(agent.value_net),
        "network_names": dict(agent.network_names),  # the built-in networks' names; None: a user's module
        "critic_optimizer": agent.critic_optimizer.state_dict(),
        "generator": agent.generator.get_state(),
        "generator_device": agent.device.type,
        "num_timesteps": agent.num_timesteps,
        "n_updates": agent.n_updates,
        "world_size": agent.world_size,  # the data-parallel ranks that trained it (informational: loads at any)
        "collector": agent.collector.state_dict(),
        "env_states": _env_states(agent.envs),
    }
    write_atomic(state, path)


def load(cls, path: str | os.PathLike, env=None, *, n_envs: int | None = None,
         device: str | torch.device | None = None, log_dir: str | os.PathLike | None = None,
         restore_env_states: bool = False, policy=None, value_net=None):
    """An agent of class `cls` (`TRPO`) restored from `path`; see `TRPO.load`."""
    state = read(path)
    networks = {"policy": policy, "value_net": value_net}
    for key, given in networks.items():
        if given is None:
            name = state["network_names"][key]  # the built-in network's name; None: a user's module
            if name is None:
                raise ValueError(f"{os.fspath(path)} was saved with a custom {key} ({state[f'{key}_class']}); a "
                                 f"checkpoint holds its parameters, not its code: pass {key}= (the module or the "
                                 f"callable that built it) to TRPO.load")
            networks[key] = name
    hyperparameters = dict(state["hyperparameters"])
    saved_id = state["env_id"]
    registered = gym.registry.get(saved_id) if saved_id is not None else None  # a lookup: imports nothing
    if restore_env_states and distributed.world_size(distributed.resolve_group("auto")) > 1:
        raise ValueError("load: restore_env_states=True continues one process's saved envs; in a data-parallel "
                         "job every rank has its own envs (load without it: episodes restart, seeded per rank)")
    if restore_env_states and (env is not None or n_envs is not None):
        raise ValueError("load: restore_env_states=True continues the saved envs; it cannot be combined with "
                         "env= or n_envs=")
    resume_envs = restore_env_states and state["env_states"] is not None and state["collector"]["last_obs"] is not None
    if resume_envs:
        env = LeanSyncVectorEnv.from_envs(pickle.loads(state["env_states"]))  # the caller opted in
    elif env is None:
        if saved_id is None:
            raise ValueError(f"{os.fspath(path)}: this model was trained on an env without a registered id; "
                             "pass env=")
        if registered is None:
            raise ValueError(f"{os.fspath(path)}: this model was trained on {saved_id!r}, which is not registered "
                             "in this process; import the module that registers it, or pass env=")
        env = registered
    if restore_env_states and not resume_envs:
        warnings.warn(f"{os.fspath(path)} holds no env states (the envs were not picklable, or not synchronous); "
                      "the loaded agent starts fresh episodes", stacklevel=3)
    if n_envs is not None:
        hyperparameters["n_envs"] = n_envs
    elif isinstance(env, gym.Env):  # one instance cannot be copied into the saved n_envs
        hyperparameters["n_envs"] = 1
    agent = cls(env, **hyperparameters, device=device or "cpu", log_dir=log_dir, **networks)
    if resume_envs and registered is not None:  # the unpickled envs do not know their id; the file does
        agent.env_spec = registered
        agent.make_eval_env = eval_env_factory(registered, registered)
    try:
        agent.policy.load_state_dict(state["policy"])
        agent.value_net.load_state_dict(state["value_net"])
    except RuntimeError as e:  # the networks' shapes: the env's spaces differ from the model's
        agent.close()
        if policy is not None or value_net is not None:
            raise ValueError(f"{os.fspath(path)} does not fit the networks given (saved: policy "
                             f"{state['policy_class']}, value_net {state['value_net_class']}; trained on "
                             f"{_model_spaces(state)}): {_first_line(e)}") from e
        raise ValueError(f"{os.fspath(path)} does not fit this env: the model was trained on {_model_spaces(state)}; "
                         f"the env has observation space {agent.observation_space}, action space "
                         f"{agent.action_space}") from e
    check_optimizer_state(state["critic_optimizer"], list(agent.value_net.parameters()), path)
    agent.critic_optimizer.load_state_dict(state["critic_optimizer"])
    agent.num_timesteps, agent.n_updates = state["num_timesteps"], state["n_updates"]
    resume_seed = agent.rank_seed(agent.config.seed + agent.num_timesteps)
    if agent.world_size > 1:  # data-parallel: each rank its own stream, reproducibly
        agent.generator.manual_seed(resume_seed)
    elif state["generator_device"] == agent.device.type:  # a CPU and a CUDA generator state differ
        agent.generator.set_state(state["generator"])
    agent.collector.load_state_dict(state["collector"], resume_episodes=resume_envs)
    if not resume_envs:  # fresh envs: episodes restart, seeded so that resuming is still reproducible
        agent.collector.reset(seed=resume_seed)
    return agent


def _model_spaces(state: dict) -> str:
    """The spaces a checkpoint's model was trained on, in words."""
    return f"observation space {state['spaces']['observation']}, action space {state['spaces']['action']}"


def _env_id(spec) -> str | None:
    """The id to save for the agent's env spec (None, with a warning, when there is none); warns
    when the spec's kwargs, which are not saved, differ from the registered ones."""
    if spec is None:
        warnings.warn("the env has no registered id and is not saved: TRPO.load will need env=", stacklevel=4)
        return None
    registered = gym.registry.get(spec.id)
    if registered is not None and spec.kwargs != registered.kwargs:
        warnings.warn(f"the env's kwargs {spec.kwargs} are not saved: TRPO.load makes {spec.id!r} with its "
                      f"registered kwargs {registered.kwargs} unless given env=", stacklevel=4)
    return spec.id


def write_atomic(state: dict, path: str | os.PathLike) -> None:
    """Writes `state` to `path` as a format-3 file (the payload and its sha256) through the fixed
    temporary file `PATH.tmp`, fsynced and renamed over `path`: a crash leaves the old file or the
    new one, never a torn one, and at most that one temporary file, which the next save replaces."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    wrapper = {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(wrapper, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read(path: str | os.PathLike) -> dict:
    """The checkpoint's state dict, every field checked (`FIELD_TYPES`, `COLLECTOR_FIELD_TYPES`);
    ValueError "PATH is not a trpo_ext checkpoint (...)" or "PATH is damaged (...)"
    (FileNotFoundError when there is no file)."""
    name = os.fspath(path)
    with open(name, "rb") as f:
        head = f.read(4)
    if not head:
        raise ValueError(f"{name} is not a trpo_ext checkpoint (the file is empty)")
    try:
        outer = torch.load(name, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{name} is not a trpo_ext checkpoint (it holds objects other than plain data and "
                         f"tensors: {_first_line(e)})") from e
    except Exception as e:
        if head == b"PK\x03\x04":  # a zip archive, what torch.save writes, that torch cannot read
            raise ValueError(f"{name} is damaged (torch.load: {_first_line(e)})") from e
        raise ValueError(f"{name} is not a trpo_ext checkpoint (not a file written by torch.save)") from e
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        what = f"a dict with keys {sorted(map(str, outer))[:8]}" if isinstance(outer, dict) else \
            f"a {type(outer).__name__}"
        raise ValueError(f"{name} is not a trpo_ext checkpoint (it holds {what}, not a TRPO checkpoint of "
                         f"format {FORMAT})")
    payload, digest = outer.get("payload"), outer.get("sha256")
    if not isinstance(payload, bytes) or not isinstance(digest, str):
        raise ValueError(f"{name} is damaged (no payload or checksum)")
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ValueError(f"{name} is damaged (its sha256 checksum does not match the contents)")
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"{name} is damaged (the payload does not load: {_first_line(e)})") from e
    if not isinstance(state, dict):
        raise ValueError(f"{name} is damaged (the payload is a {type(state).__name__}, not a dict)")
    _check_fields(name, state, FIELD_TYPES, "")
    if state["format"] != FORMAT:
        raise ValueError(f"{name} is damaged (the payload says format {state['format']}, the file {FORMAT})")
    for key in ("policy", "value_net"):
        if not all(isinstance(v, torch.Tensor) for v in state[key].values()):
            raise ValueError(f"{name} is damaged ({key} is a dict, expected a dict of tensors)")
    names = state["network_names"]
    if set(names) != {"policy", "value_net"} or not all(names[k] is None or names[k] in BUILT_IN for k in names):
        raise ValueError(f"{name} is damaged (network_names is {names!r:.80}, expected a dict of built-in "
                         f"names {BUILT_IN} or None for policy and value_net)")
    if not all(isinstance(state["spaces"].get(k), str) for k in ("observation", "action")):
        raise ValueError(f"{name} is damaged (spaces is {state['spaces']!r:.80}, expected the observation and "
                         "action spaces in words)")
    _check_fields(name, state["collector"], COLLECTOR_FIELD_TYPES, "collector: ")
    return state


def _check_fields(name: str, state: dict, field_types, where: str) -> None:
    """ValueError "NAME is damaged (...)" unless `state` has every field of `field_types`, each of
    its types (bools are not ints)."""
    missing = [key for key, _, _ in field_types if key not in state]
    if missing:
        raise ValueError(f"{name} is damaged ({where}no {', '.join(map(repr, missing))})")
    for key, types, expected in field_types:
        value = state[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise ValueError(f"{name} is damaged ({where}{key} is a {type(value).__name__}, expected {expected})")


def check_optimizer_state(state, params: list[torch.Tensor], path) -> None:
    """ValueError "PATH is damaged (critic_optimizer ...)" unless `state` is an Adam state dict for
    `params`: one group over all of them; per parameter exp_avg / exp_avg_sq (/ max_exp_avg_sq) of
    its shape and dtype, contiguous, and `step` a 1-element float tensor."""
    def fail(what):
        raise ValueError(f"{os.fspath(path)} is damaged (critic_optimizer {what})")

    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        fail("is not an optimizer state dict")
    groups = state["param_groups"]
    if not all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in groups):
        fail("param_groups: each group must be a dict with a 'params' list")
    indices = [i for g in groups for i in g["params"]]
    if indices != list(range(len(params))):
        fail(f"param_groups: parameters {indices}, expected {list(range(len(params)))}")
    for key, entry in state["state"].items():
        if not isinstance(key, int) or not 0 <= key < len(params) or not isinstance(entry, dict):
            fail(f"state[{key!r}]: no such parameter or not a dict")
        param = params[key]
        for field in ("step", "exp_avg", "exp_avg_sq"):
            if field not in entry:
                fail(f"state[{key}]: no {field!r}")
        for field, value in entry.items():
            where = f"state[{key}][{field!r}]"
            if not isinstance(value, torch.Tensor):
                fail(f"{where}: a {type(value).__name__}, not a tensor")
            if field == "step":
                if value.numel() != 1 or not value.is_floating_point():
                    fail(f"{where}: must be a 1-element float tensor, got {value.dtype} of shape {tuple(value.shape)}")
            elif value.shape != param.shape or value.dtype != param.dtype or not value.is_contiguous():
                fail(f"{where}: {value.dtype} of shape {tuple(value.shape)}"
                     f"{'' if value.is_contiguous() else ', not contiguous'}; the parameter is {param.dtype} "
                     f"of shape {tuple(param.shape)}")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


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
