"""Checkpoints of a `TRPO` agent: one file, written atomically, loadable with
`torch.load(weights_only=True)` (plain data and tensors; the env states are one pickled bytes blob).

The file is `{"format": 3, "sha256": HEX, "payload": BYTES}`, BYTES being `torch.save` of the state
dict, so damage anywhere in the payload is detected. Every field is required and checked by type,
shape, dtype and range before anything is built from it (`trpo_ext.checkpoint_fields`); every
problem with a file is one ValueError: "PATH is not a trpo_ext checkpoint (...)" (a FIFO, a device
or a directory, refused before opening; a text file; an sb3 model; any other foreign file) or
"PATH is damaged (FIELD ...)". One field is optional: `rank_states`, the other ranks' own states
in a data-parallel save of every rank (`TRPO.save(path, every_rank=True)`), came without a format
change: a format-3 file without it loads as one process's state, and readers that predate it
ignore it.

Loading a file never runs code from it by default: the env is rebuilt only from an id registered in
the loading process (the registry's spec, never an entry point or kwargs from the file), and the
pickled env states are unpickled only with `restore_env_states=True`. The networks are state
dicts; their classes' qualified names (`policy_class`, `value_net_class`) are stored for
information and for the error when a custom network is not passed again at load time.

Saving never follows a symlink or writes through another file: the file is written into a new
temporary file, created exclusively next to the target, then renamed over it.

    trpo_ext.checkpoint.save(agent, "model.pt")        # what TRPO.save does
    agent = trpo_ext.checkpoint.load(TRPO, "model.pt")  # what TRPO.load does
"""
from __future__ import annotations

import codecs
import contextlib
import hashlib
import io
import os
import pickle
import re
import secrets
import stat
import warnings
import zipfile

import gymnasium as gym
import torch

from . import distributed
from .checkpoint_fields import check_fits, check_state
from .envs import LeanSyncVectorEnv, eval_env_factory
from .policies import qualified_name

FORMAT = 3
"""The only format read: the state dict wrapped with its sha256."""


def save(agent, path: str | os.PathLike, rank_states: list[dict] | None = None) -> None:
    """Writes everything needed to resume `agent` into one file, atomically (temporary file + rename).

    The networks, optimizer, statistics and step count are always saved. Of the env only its
    registered id is kept (`load` rebuilds the env registered under it); an env without one, or
    kwargs differing from the registered ones, are left out with a warning.

    Env states are included when the envs are synchronous and picklable; then
    `load(path, restore_env_states=True)` continues the interrupted episodes exactly.
    `rank_states`: the other ranks' own states (`gather_rank_states`), for a data-parallel
    `load(..., restore_env_states=True)` at the same world size to continue every rank exactly.
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
        "rank_states": rank_states,  # ranks 1 .. world_size - 1; None: rank 0's state only
        "sde": agent.policy.noise_state() if agent.config.use_sde else None,  # gSDE's noise matrices (rank 0's)
    }
    write_atomic(state, path)


def rank_state(agent) -> dict:
    """This rank's own part of a data-parallel checkpoint (rank 0's are the main fields): its random
    stream, its collector (last observations and masks, episode statistics, reward scaler) and its
    pickled envs."""
    return {"generator": agent.generator.get_state(), "collector": agent.collector.state_dict(),
            "env_states": _env_states(agent.envs)}


def gather_rank_states(agent) -> list[dict] | None:
    """Ranks 1 .. N - 1's `rank_state`s on rank 0 (None elsewhere, and without a group). A
    collective: every rank of the agent's group calls it at the same point. Each rank's state
    travels as `torch.save` bytes and is read back with `weights_only=True` (plain data, tensors and
    the env states' bytes: nothing in them is unpickled or run here)."""
    if agent.group is None:
        return None
    buffer = io.BytesIO()
    if agent.rank != 0:  # rank 0's own state is the file's main fields
        torch.save(rank_state(agent), buffer)
    with distributed.collective_errors(agent.group):
        everyone = distributed.gather_bytes(buffer.getvalue(), agent.group)
    if agent.rank != 0:
        return None
    return [torch.load(io.BytesIO(data), map_location="cpu", weights_only=True) for data in everyone[1:]]


def rank_states_problem(state: dict, world_size: int) -> str | None:
    """Why the checkpoint `state` cannot continue every rank of a `world_size`-rank job exactly
    (its saved envs, episodes and random streams), in words; None when it can."""
    saved, ranks = state["world_size"], state["rank_states"]
    if saved != world_size:
        return f"each rank's envs and random stream continue only at the world size that saved them ({saved})"
    if ranks is None:
        return "it holds rank 0's envs and random stream only (saved by rank 0 alone)"
    for r, own in enumerate([state, *ranks]):
        if own["env_states"] is None:
            return f"rank {r}'s envs were not saved (not picklable, or not synchronous)"
        if own["collector"]["last_obs"] is None:
            return f"rank {r} had not started its envs (saved before the first rollout)"
    return None


def load(cls, path: str | os.PathLike, env=None, *, n_envs: int | None = None,
         device: str | torch.device | None = None, log_dir: str | os.PathLike | None = None,
         restore_env_states: bool = False, policy=None, value_net=None):
    """An agent of class `cls` (`TRPO`) restored from `path`; see `TRPO.load`."""
    name = os.fspath(path)
    state = read(name)
    networks = {"policy": policy, "value_net": value_net}
    for key, given in networks.items():
        if given is None:
            built_in = state["network_names"][key]  # the built-in network's name; None: a user's module
            if built_in is None:
                raise ValueError(f"{name} was saved with a custom {key} ({state[f'{key}_class']}); a "
                                 f"checkpoint holds its parameters, not its code: pass {key}= (the module or the "
                                 f"callable that built it) to TRPO.load")
            networks[key] = built_in
    hyperparameters = dict(state["hyperparameters"])
    saved_id = state["env_id"]
    registered = gym.registry.get(saved_id) if saved_id is not None else None  # a lookup: imports nothing
    group = distributed.resolve_group("auto")
    own = state  # this rank's generator, collector and env states: rank r > 0's from rank_states
    if restore_env_states and distributed.world_size(group) > 1:
        problem = rank_states_problem(state, distributed.world_size(group))
        if problem is not None:
            raise ValueError(f"load: restore_env_states=True: {name} cannot continue the saved envs of each of this "
                             f"job's {distributed.world_size(group)} ranks: {problem} (load without it: episodes "
                             "restart, seeded per rank)")
        if distributed.rank(group) > 0:
            own = {**state, **state["rank_states"][distributed.rank(group) - 1]}
    if restore_env_states and (env is not None or n_envs is not None):
        raise ValueError("load: restore_env_states=True continues the saved envs; it cannot be combined with "
                         "env= or n_envs=")
    resume_envs = restore_env_states and own["env_states"] is not None and own["collector"]["last_obs"] is not None
    if resume_envs:
        env = LeanSyncVectorEnv.from_envs(pickle.loads(own["env_states"]))  # the caller opted in
    elif env is None:
        if saved_id is None:
            raise ValueError(f"{name}: this model was trained on an env without a registered id; "
                             "pass env=")
        if registered is None:
            raise ValueError(f"{name}: this model was trained on {saved_id!r}, which is not registered "
                             "in this process; import the module that registers it, or pass env=")
        env = registered
    if restore_env_states and not resume_envs:
        warnings.warn(f"{name} holds no env states (the envs were not picklable, or not synchronous); "
                      "the loaded agent starts fresh episodes", stacklevel=3)
    if n_envs is not None:
        hyperparameters["n_envs"] = n_envs
    elif isinstance(env, gym.Env):  # one instance cannot be copied into the saved n_envs
        hyperparameters["n_envs"] = 1
    agent = cls(env, **hyperparameters, device=device or "cpu", log_dir=log_dir, **networks)
    try:  # everything checked against the agent before any of it is loaded; a refusal closes the agent
        check_fits(name, agent, own, resume_envs, custom=policy is not None or value_net is not None)
        if resume_envs and registered is not None:  # the unpickled envs do not know their id; the file does
            agent.env_spec = registered
            agent.make_eval_env = eval_env_factory(registered, registered)
        agent.policy.load_state_dict(state["policy"])
        if state["sde"] is not None:
            agent.policy.load_noise_state(state["sde"])
        agent.value_net.load_state_dict(state["value_net"])
        agent.critic_optimizer.load_state_dict(state["critic_optimizer"])
        agent.num_timesteps, agent.n_updates = state["num_timesteps"], state["n_updates"]
        resume_seed = agent.rank_seed(agent.config.seed + agent.num_timesteps)
        # A CPU and a CUDA generator state differ; data-parallel, a rank's own stream is saved only with its envs.
        if state["generator_device"] == agent.device.type and (agent.world_size == 1 or resume_envs):
            agent.generator.set_state(own["generator"])
        elif agent.world_size > 1:  # each rank its own stream, reproducibly
            agent.generator.manual_seed(resume_seed)
        agent.collector.load_state_dict(own["collector"], resume_episodes=resume_envs)
        if not resume_envs:  # fresh envs: episodes restart, seeded so that resuming is still reproducible
            agent.collector.reset(seed=resume_seed)
    except BaseException:
        agent.close()
        raise
    return agent


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
    """Writes `state` to `path` as a format-3 file (the payload and its sha256): into a new
    temporary file `.NAME.RANDOM.tmp` next to it, created exclusively (never through a link or an
    existing file), fsynced and renamed over `path`. A crash leaves the old file or the new one,
    never a torn one (and at most that temporary file). ValueError, before anything is written,
    when `path` is something other than a regular file (a symlink, a directory, a FIFO, a device)."""
    path = os.fspath(path)
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        raise ValueError(f"save: {path} is {_kind(mode)}, not a regular file; a save replaces only a regular file "
                         "(it never writes through a link or into a device): remove it or choose another path")
    directory, base = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "payload": payload}, buffer)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")  # 64 random bits: no name to plant
    fd = os.open(tmp, flags, 0o666)
    try:
        with open(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # the rename itself reaches the disk (where the system allows it)
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def read(path: str | os.PathLike) -> dict:
    """The checkpoint's state dict, every field checked (`checkpoint_fields.check_state`);
    ValueError "PATH is not a trpo_ext checkpoint (...)" or "PATH is damaged (...)"
    (FileNotFoundError when there is no file)."""
    name = os.fspath(path)
    outer = _load(name, _read_regular_file(name), "the file")
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
    state = _load(name, payload, "the payload")
    if not isinstance(state, dict):
        raise ValueError(f"{name} is damaged (the payload is a {type(state).__name__}, not a dict)")
    if "format" in state and state["format"] != FORMAT:
        raise ValueError(f"{name} is damaged (the payload says format {state['format']!r:.20}, the file {FORMAT})")
    check_state(name, state)
    return state


def _read_regular_file(name: str) -> bytes:
    """The bytes of the regular file `name`; anything else (a FIFO, a device, a directory) is
    refused before it is opened, and opened without blocking in case it was swapped in since."""
    mode = os.stat(name).st_mode
    if stat.S_ISREG(mode):
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)
                     | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            mode = os.fstat(fd).st_mode
            if stat.S_ISREG(mode):
                return f.read()
    raise ValueError(f"{name} is not a trpo_ext checkpoint (it is {_kind(mode)}, not a regular file)")


SB3_ENTRIES = ("_stable_baselines3_version", "policy.pth")
"""Entries of the zip archive stable-baselines3's `save` writes (sb3-contrib's models too)."""


def _load(name: str, data: bytes, what: str):
    """`torch.load(weights_only=True)` of `data` (the file, or its payload), foreign formats named:
    an empty file, a text file, an sb3 model, a zip archive torch.save did not write, objects other
    than plain data and tensors (never with torch's advice to retry with weights_only=False)."""
    def foreign(why):
        return ValueError(f"{name} is not a trpo_ext checkpoint ({why})")

    if not data:
        raise foreign(f"{what} is empty")
    if not data.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
        raise foreign("a text file" if what == "the file" and _is_text(data) else f"{what} was not written by torch.save")
    try:
        entries = zipfile.ZipFile(io.BytesIO(data)).namelist()
    except Exception as e:  # BadZipFile and whatever a mangled directory raises
        raise ValueError(f"{name} is damaged ({what} is a zip archive that does not open: {_first_line(e)})") from None
    if any(entry in entries for entry in SB3_ENTRIES):
        raise foreign("it is an sb3 model: load it with sb3 (stable_baselines3 / sb3_contrib `.load`)")
    if not any(entry.endswith("data.pkl") for entry in entries):
        raise foreign(f"a zip archive torch.save did not write, holding {', '.join(entries[:5])[:120]}")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # torch's message advises weights_only=False: not ours to pass on
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        raise foreign(f"{what} holds objects other than plain data and tensors"
                      f"{f': {found.group(1)}' if found else ''}") from None
    except Exception as e:
        raise ValueError(f"{name} is damaged ({what} does not load: {_first_line(e)})") from None


def _is_text(data: bytes) -> bool:
    """Whether `data` starts like a text file: UTF-8 without control characters other than whitespace."""
    sample = data[:4096]
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(sample)  # a character cut at the end is fine
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\t\n\r\f\v" for c in text.lstrip("\ufeff"))


def _kind(mode: int) -> str:
    """What a file of this st_mode is, in words."""
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symlink"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "not a regular file"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"[:200]


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
