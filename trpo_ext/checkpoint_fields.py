"""What a checkpoint's state dict holds, and the check of every field: its type, shape, dtype and
range, against the other fields and the file's own hyperparameters (`check_state`, before anything
is built from it), then against the agent built from them (`check_fits`, before anything is loaded
into it). The format around the state dict, and how a file is read: `trpo_ext.checkpoint`.

Every refusal is one ValueError naming the file and the field: "PATH is damaged (FIELD ...)", or
"PATH does not fit this env (...)" when a sound model meets an env of other spaces.
"""
from __future__ import annotations

import math

import torch

from .config import MAX_BATCH, MAX_ENVS, TRPOConfig, check_int
from .policies import BUILT_IN

NONE = type(None)
FIELD_TYPES = (
    ("format", int, "an int"), ("hyperparameters", dict, "a dict"), ("env_id", (str, NONE), "a string or None"),
    ("spaces", dict, "a dict"), ("policy", dict, "a dict of tensors"), ("value_net", dict, "a dict of tensors"),
    ("policy_class", str, "a string"), ("value_net_class", str, "a string"), ("network_names", dict, "a dict"),
    ("critic_optimizer", dict, "a dict"), ("generator", torch.Tensor, "a tensor"),
    ("generator_device", str, "a string"), ("num_timesteps", int, "an int"), ("n_updates", int, "an int"),
    ("world_size", int, "an int"), ("collector", dict, "a dict"), ("env_states", (bytes, NONE), "bytes or None"),
    ("rank_states", (list, NONE), "a list or None"), ("sde", (dict, NONE), "a dict or None"))
"""Every field of a state dict (what `checkpoint.save` writes) and its type."""

OPTIONAL_FIELDS = {"rank_states": None, "sde": None}
"""The fields that files written before them lack, and their value in such a file: `rank_states`
came with `TRPO.save(every_rank=True)`; a file without it holds one process's state (rank 0's).
`sde` (gSDE's noise, `SDEPolicy.noise_state`) came with use_sde, which older files cannot have."""

RANK_STATE_FIELD_TYPES = (("generator", torch.Tensor, "a tensor"), ("collector", dict, "a dict"),
                          ("env_states", (bytes, NONE), "bytes or None"))
"""An entry of `rank_states` (one per rank 1 .. world_size - 1; rank 0's are the main fields): that
rank's random stream, collector state and pickled envs, checked as the main fields are."""

COLLECTOR_FIELD_TYPES = (
    ("last_obs", (torch.Tensor, dict, NONE), "a tensor, a dict or None"),
    ("last_masks", (torch.Tensor, NONE), "a tensor or None"), ("mask_source", (str, NONE), "a string or None"),
    ("stats", dict, "a dict"), ("normalizer", (dict, NONE), "a dict or None"),
    ("reward_scaler", (dict, NONE), "a dict or None"), ("memory", (dict, NONE), "a dict or None"))
"""Likewise for the collector's state (`RolloutCollector.state_dict()`)."""

OPTIONAL_COLLECTOR_FIELDS = {"memory": None}
"""The collector's fields that files written before them lack, and their value there: `memory` (the
recurrent states) came with recurrent policies (None: zero states)."""

HYPERPARAMETERS = tuple(TRPOConfig(seed=0).to_dict())
"""The keys of a checkpoint's hyperparameters: TRPO's hyperparameter keywords, nothing else."""

USES_HIDDEN = ("MlpPolicy", "MultiInputPolicy")
"""The built-in networks whose MLP takes `policy_kwargs['hidden']` (built_in_policy's docstring:
"CnnPolicy" has no hidden layers)."""

MASK_SOURCES = ("method", "info")
"""The values of `ActionMasks.source` other than None (trpo_ext.action_masks)."""

GENERATOR_BYTES = {"cpu": torch.Generator().get_state().numel(), "cuda": 16}
"""The size of a generator's state by device type: the CPU's Mersenne Twister state; CUDA's
Philox seed and offset (8 bytes each)."""


class Damaged(ValueError):
    """What is wrong with one field; `check_state` / `check_fits` add the file's name."""


def check_state(name: str, state: dict) -> TRPOConfig:
    """The file's hyperparameters as a config, after checking every field of `state`;
    ValueError "NAME is damaged (FIELD ...)" at the first field that is not what `save` writes."""
    try:
        for key, value in OPTIONAL_FIELDS.items():
            state.setdefault(key, value)
        check_types(state, FIELD_TYPES, "")
        config = _hyperparameters(state["hyperparameters"])
        names = state["network_names"]
        if set(names) != {"policy", "value_net"} or not all(names[k] is None or names[k] in BUILT_IN for k in names):
            raise Damaged(f"network_names is {_short(names)}, expected a dict of built-in names {BUILT_IN} or None "
                          "for policy and value_net")
        for key in ("policy", "value_net"):
            _network(key, state[key], names[key], config.policy_kwargs["hidden"])
        if set(state["spaces"]) != {"observation", "action"} or not all(isinstance(v, str) for v in
                                                                         state["spaces"].values()):
            raise Damaged(f"spaces is {_short(state['spaces'])}, expected the observation and action spaces in words")
        device = state["generator_device"]
        if device not in GENERATOR_BYTES:
            raise Damaged(f"generator_device is {_short(device)}, expected one of {sorted(GENERATOR_BYTES)}")
        _generator("generator", state["generator"], device)
        _int("num_timesteps", state["num_timesteps"], 0, 2**63 - 1)
        _int("n_updates", state["n_updates"], 0, state["num_timesteps"])  # an update takes at least one step
        _int("world_size", state["world_size"], 1, 2**31 - 1)
        _optimizer(state["critic_optimizer"], config.critic_lr)
        _collector(state["collector"], config)
        _rank_states(state, config)
        _sde(state["sde"], config)
    except Damaged as e:
        raise ValueError(f"{name} is damaged ({e})") from None
    return config


def check_types(state: dict, field_types, where: str) -> None:
    """Damaged unless `state` has every field of `field_types`, each of its types (bools are not ints)."""
    missing = [key for key, _, _ in field_types if key not in state]
    if missing:
        raise Damaged(f"{where}no {', '.join(map(repr, missing))}")
    for key, types, expected in field_types:
        value = state[key]
        if not isinstance(value, types) or isinstance(value, bool):
            raise Damaged(f"{where}{key} is a {type(value).__name__}, expected {expected}")


def check_fits(name: str, agent, state: dict, resume_envs: bool, custom: bool) -> None:
    """ValueError unless the agent built from `state` can take it: the networks' parameters (names,
    shapes, dtypes), the optimizer's moments, the normalizer's width and, when the saved envs are
    resumed (`resume_envs`), their observations and masks. Nothing is loaded here."""
    for key in ("policy", "value_net"):
        problem = _mismatch(state[key], getattr(agent, key).state_dict())
        if problem and custom:
            raise ValueError(f"{name} does not fit the networks given (saved: policy {state['policy_class']}, "
                             f"value_net {state['value_net_class']}; trained on {model_spaces(state)}): {key} {problem}")
        if problem:
            raise ValueError(f"{name} does not fit this env: the model was trained on {model_spaces(state)}; the env "
                             f"has observation space {agent.observation_space}, action space {agent.action_space} "
                             f"({key} {problem})")
    sde = state["sde"]
    if sde is not None and (sde["noise"].shape[1:] != agent.policy.noise.shape[1:]
                            or sde["noise"].dtype != agent.policy.noise.dtype):
        raise ValueError(f"{name} does not fit this env: sde['noise'] is {_what(sde['noise'])} (n_envs, features, "
                         f"actions), the policy's noise matrices are {agent.policy.noise.dtype} of shape "
                         f"(n, {', '.join(map(str, agent.policy.noise.shape[1:]))})")
    normalizer = state["collector"]["normalizer"]
    if normalizer is not None and normalizer["mean"].shape != agent.normalizer.mean.shape:
        raise ValueError(f"{name} does not fit this env: the model normalizes {normalizer['mean'].shape[0]} observation "
                         f"features, the env's observation space {agent.observation_space} has "
                         f"{agent.normalizer.mean.shape[0]}")
    try:
        _optimizer_shapes(state["critic_optimizer"], list(agent.value_net.parameters()))
        if resume_envs:
            _saved_envs(agent, state["collector"], state["hyperparameters"]["n_envs"])
    except Damaged as e:
        raise ValueError(f"{name} is damaged ({e})") from None


def model_spaces(state: dict) -> str:
    """The spaces a checkpoint's model was trained on, in words."""
    return f"observation space {state['spaces']['observation']}, action space {state['spaces']['action']}"


# ----------------------------------------------------------------------------- the fields
def _hyperparameters(hyperparameters: dict) -> TRPOConfig:
    """The config, through the constructor's checks; TRPO's hyperparameter keys exactly."""
    unknown = [key for key in hyperparameters if key not in HYPERPARAMETERS]
    if unknown:
        raise Damaged(f"hyperparameters: unknown keys {', '.join(_short(k) for k in unknown)}; a checkpoint holds "
                      f"TRPO's hyperparameters: {', '.join(HYPERPARAMETERS)}")
    missing = [key for key in HYPERPARAMETERS if key not in hyperparameters]
    if missing:
        raise Damaged(f"hyperparameters: no {', '.join(map(repr, missing))}")
    if hyperparameters["seed"] is None:
        raise Damaged("hyperparameters: seed is None, expected the int the agent was seeded with")
    try:
        return TRPOConfig.from_dict(hyperparameters)
    except ValueError as e:
        raise Damaged(f"hyperparameters: {e}") from None


def _network(key: str, params: dict, built_in: str | None, hidden: tuple[int, ...]) -> None:
    """A state dict: names to finite tensors; as many numbers as `hidden` implies for a built-in MLP
    (so that a file's hidden widths cannot make the constructor allocate more than the file holds)."""
    for param, value in params.items():
        if not isinstance(param, str):
            raise Damaged(f"{key} has the key {_short(param)}, expected parameter names")
        _tensor(f"{key}[{param!r}]", value)
    least = sum(hidden) + sum(a * b for a, b in zip(hidden, hidden[1:]))
    held = sum(value.numel() for value in params.values())
    if built_in in USES_HIDDEN and held < least:
        raise Damaged(f"{key} holds {held} numbers; a {built_in} of hidden widths {hidden} (hyperparameters "
                      f"policy_kwargs) has at least {least}")


def _optimizer(state, critic_lr: float) -> None:
    """The critic's Adam state: one param group, as the agent builds it (lr = critic_lr); per
    parameter a finite step >= 0, a finite exp_avg and a finite exp_avg_sq >= 0."""
    if not isinstance(state.get("state"), dict) or not isinstance(state.get("param_groups"), list) \
            or set(state) != {"state", "param_groups"}:
        raise Damaged("critic_optimizer is not an optimizer state dict (its keys: 'state', 'param_groups')")
    groups = state["param_groups"]
    if len(groups) != 1 or not isinstance(groups[0], dict) or not isinstance(groups[0].get("params"), list):
        raise Damaged("critic_optimizer param_groups: one group, a dict with a 'params' list, expected")
    expected = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=critic_lr).state_dict()["param_groups"][0]
    for key, value in groups[0].items():
        if key != "params" and (key not in expected or not _same(value, expected[key])):
            raise Damaged(f"critic_optimizer param_groups[0][{_short(key)}] is {_short(value)}, expected "
                          f"{_short(expected.get(key, 'no such key'))} (the critic's Adam with lr=critic_lr)")
    indices = groups[0]["params"]
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in indices) or indices != list(range(len(indices))):
        raise Damaged(f"critic_optimizer param_groups: parameters {_short(indices)}, expected 0, 1, 2, ...")
    for index, entry in state["state"].items():
        where = f"critic_optimizer state[{_short(index)}]"
        if index not in indices or not isinstance(entry, dict):
            raise Damaged(f"{where}: no such parameter or not a dict")
        fields = set(entry)
        if fields != {"step", "exp_avg", "exp_avg_sq"}:
            raise Damaged(f"{where}: fields {', '.join(sorted(map(_short, fields)))}, expected 'exp_avg', "
                          "'exp_avg_sq', 'step'")
        step = entry["step"]
        if not isinstance(step, torch.Tensor) or step.numel() != 1 or not step.is_floating_point():
            raise Damaged(f"{where}['step']: must be a 1-element float tensor, got {_what(step)}")
        _tensor(f"{where}['step']", step, low=0.0)
        _tensor(f"{where}['exp_avg']", entry["exp_avg"], float)
        _tensor(f"{where}['exp_avg_sq']", entry["exp_avg_sq"], float, low=0.0)


def _optimizer_shapes(state: dict, params: list[torch.Tensor]) -> None:
    """Damaged unless the optimizer's moments are, parameter by parameter, of its shape and dtype."""
    indices = state["param_groups"][0]["params"]
    if len(indices) != len(params):
        raise Damaged(f"critic_optimizer param_groups: {len(indices)} parameters, the value net has {len(params)}")
    for index, entry in state["state"].items():
        param = params[index]
        for field in ("exp_avg", "exp_avg_sq"):
            value = entry[field]
            if value.shape != param.shape or value.dtype != param.dtype or not value.is_contiguous():
                raise Damaged(f"critic_optimizer state[{index}][{field!r}]: {value.dtype} of shape {tuple(value.shape)}"
                              f"{'' if value.is_contiguous() else ', not contiguous'}; the parameter is {param.dtype} "
                              f"of shape {tuple(param.shape)}")


def _collector(collector: dict, config: TRPOConfig, where: str = "collector") -> None:
    """The collector's state (`where`: its place in the file), its per-env arrays of the file's n_envs rows."""
    for key, value in OPTIONAL_COLLECTOR_FIELDS.items():
        collector.setdefault(key, value)
    check_types(collector, COLLECTOR_FIELD_TYPES, f"{where}: ")
    n = config.n_envs
    obs, masks, source = collector["last_obs"], collector["last_masks"], collector["mask_source"]
    for key, value in (obs.items() if isinstance(obs, dict) else [(None, obs)] if obs is not None else []):
        at = f"{where}: last_obs" + ("" if key is None else f"[{_short(key)}]")
        if not isinstance(key, (str, NONE)):
            raise Damaged(f"{at}: keys must be strings")
        _tensor(at, value, rows=n)
        if value.is_complex():
            raise Damaged(f"{at}: {value.dtype}, expected real numbers")
    if masks is not None:
        _tensor(f"{where}: last_masks", masks, torch.bool, rows=n)
        if masks.dim() != 2 or obs is None:
            raise Damaged(f"{where}: last_masks has shape {tuple(masks.shape)}, expected ({n}, actions) with last_obs")
    if source not in (None, *MASK_SOURCES) or (source is None) != (masks is None):
        raise Damaged(f"{where}: mask_source is {_short(source)}, expected one of {MASK_SOURCES} with last_masks, "
                      "None without")
    if collector["memory"] is not None:  # the recurrent states (trpo_ext.recurrent_rollout)
        _memory(f"{where}: memory", collector["memory"], n)
    stats = collector["stats"]
    _keys(f"{where}: stats", stats, ("returns", "lengths", "finished"))
    _tensor(f"{where}: stats['returns']", stats["returns"], torch.float64, (n,))
    _tensor(f"{where}: stats['lengths']", stats["lengths"], torch.int64, (n,), low=0)
    finished = stats["finished"]
    if not isinstance(finished, list) or len(finished) > config.stats_window or not all(
            isinstance(e, (tuple, list)) and len(e) == 2 and _real(e[0]) and isinstance(e[1], int)
            and not isinstance(e[1], bool) and e[1] >= 1 for e in finished):
        raise Damaged(f"{where}: stats['finished'] must be a list of at most stats_window ({config.stats_window}) "
                      "(return, length) pairs: finite numbers and positive ints")
    for key, on, clip, dim in (("normalizer", config.normalize_obs, config.obs_clip, None),
                               ("reward_scaler", config.normalize_reward, config.reward_clip, 1)):
        value = collector[key]
        if (value is None) == on:
            raise Damaged(f"{where}: {key} is {'None' if value is None else 'a dict'}, but hyperparameters "
                          f"normalize_{'obs' if key == 'normalizer' else 'reward'} is {on}")
        if value is not None and key == "normalizer":
            _moments(f"{where}: normalizer", value, clip, dim)
        elif value is not None:
            _keys(f"{where}: reward_scaler", value, ("returns", "stats"))
            _tensor(f"{where}: reward_scaler['returns']", value["returns"], torch.float64, (n,))
            _moments(f"{where}: reward_scaler['stats']", value["stats"], clip, dim)


def _memory(where: str, memory, n: int) -> None:
    """The rollout's recurrent states: each None or 1-2 floating (layers, n, hidden) tensors, and n
    episode-start flags (their shapes against the networks: `RecurrentMemory.begin`)."""
    _keys(where, memory, ("policy_state", "value_state", "episode_starts"))
    _tensor(f"{where}['episode_starts']", memory["episode_starts"], torch.bool, (n,))
    for key in ("policy_state", "value_state"):
        state = memory[key]
        if state is None:
            continue
        if not isinstance(state, list) or len(state) not in (1, 2):
            raise Damaged(f"{where}[{key!r}] is {_what(state)}, expected None or a list of 1 or 2 tensors")
        for i, s in enumerate(state):
            _tensor(f"{where}[{key!r}][{i}]", s, float)
            if s.dim() != 3 or s.shape[1] != n:
                raise Damaged(f"{where}[{key!r}][{i}] has shape {tuple(s.shape)}, expected (layers, {n}, hidden)")


def _generator(where: str, value, device: str) -> None:
    """A generator's state for `device` (a checked generator_device): its size, and for the CPU one
    that a generator takes."""
    _tensor(where, value, torch.uint8, (GENERATOR_BYTES[device],))
    if device == "cpu":
        try:
            torch.Generator().set_state(value)  # a throwaway generator: the agent's is built later
        except RuntimeError as e:
            raise Damaged(f"{where} is not a CPU generator's state: {str(e).splitlines()[0]}") from e


def _rank_states(state: dict, config: TRPOConfig) -> None:
    """`rank_states`: None, or one entry per rank 1 .. world_size - 1, each its generator, collector
    and env states as the main fields are checked, its statistics rank 0's (the ranks share them)."""
    ranks, world = state["rank_states"], state["world_size"]
    if ranks is None:
        return
    if len(ranks) != world - 1 or not ranks:
        raise Damaged(f"rank_states holds {len(ranks)} entries; world_size is {world}, so expected "
                      f"{f'{world - 1} (ranks 1 to {world - 1}) or ' if world > 1 else ''}None")
    for r, entry in enumerate(ranks, 1):
        where = f"rank_states: rank {r}"
        if not isinstance(entry, dict) or set(entry) - {key for key, _, _ in RANK_STATE_FIELD_TYPES}:
            raise Damaged(f"{where} is {_short(entry)}, expected a dict of "
                          f"{', '.join(repr(key) for key, _, _ in RANK_STATE_FIELD_TYPES)}")
        check_types(entry, RANK_STATE_FIELD_TYPES, f"{where}: ")
        _generator(f"{where}: generator", entry["generator"], state["generator_device"])
        _collector(entry["collector"], config, f"{where}: collector")
        mine, first = entry["collector"], state["collector"]
        scalers = [None if c["reward_scaler"] is None else c["reward_scaler"]["stats"] for c in (mine, first)]
        for key, a, b in (("normalizer", mine["normalizer"], first["normalizer"]), ("reward_scaler['stats']", *scalers)):
            if a is not None and not (torch.equal(a["mean"], b["mean"]) and torch.equal(a["var"], b["var"])
                                      and a["count"] == b["count"]):
                raise Damaged(f"{where}: collector {key} differs from rank 0's; the ranks hold the same statistics")


def _moments(where: str, state, clip: float, dim: int | None) -> None:
    """A RunningNormalizer's state: float64 mean and var of one width (`dim` when given), var >= 0,
    a count > 0 and the clip of the hyperparameters."""
    _keys(where, state, ("mean", "var", "count", "clip"))
    mean = state["mean"]
    _tensor(f"{where}['mean']", mean, torch.float64, (dim,) if dim else None)
    if mean.dim() != 1 or mean.numel() == 0:
        raise Damaged(f"{where}['mean'] has shape {tuple(mean.shape)}, expected (features,)")
    _tensor(f"{where}['var']", state["var"], torch.float64, tuple(mean.shape), low=0.0)
    if not _real(state["count"]) or not state["count"] > 0:
        raise Damaged(f"{where}['count'] is {_short(state['count'])}, expected a finite number > 0")
    if not _real(state["clip"]) or state["clip"] != clip:
        raise Damaged(f"{where}['clip'] is {_short(state['clip'])}, expected {clip} (the hyperparameters')")


def _mismatch(saved: dict, built: dict) -> str | None:
    """How a saved state dict differs from the built network's (names, shapes, dtypes); None if not."""
    missing, unexpected = [k for k in built if k not in saved], [k for k in saved if k not in built]
    if missing or unexpected:
        return f"parameters differ: missing {_short(missing)}, unexpected {_short(unexpected)}"
    for key, value in built.items():
        if saved[key].shape != value.shape or saved[key].dtype != value.dtype:
            return (f"[{key!r}]: {saved[key].dtype} of shape {tuple(saved[key].shape)} saved, the network's is "
                    f"{value.dtype} of shape {tuple(value.shape)}")
    return None


def _saved_envs(agent, collector: dict, n_envs: int) -> None:
    """The saved envs' last observations and masks against the envs unpickled from the same file."""
    if agent.envs.num_envs != n_envs:
        raise Damaged(f"env_states holds {agent.envs.num_envs} envs, hyperparameters n_envs is {n_envs}")
    codec, obs = agent.collector.codec, collector["last_obs"]
    if isinstance(obs, dict) != codec.is_dict or (codec.is_dict and set(obs) != {p.key for p in codec.parts}):
        raise Damaged(f"collector: last_obs does not fit the saved envs' observation space {codec.space}")
    for part in codec.parts:
        value = obs[part.key] if codec.is_dict else obs
        if tuple(value.shape) != (n_envs, *part.space.shape):
            raise Damaged(f"collector: last_obs{'' if part.key is None else f'[{part.key!r}]'} has shape "
                          f"{tuple(value.shape)}, the saved envs' observations ({n_envs}, {part.space.shape})")
    if collector["last_masks"] is not None:
        try:
            agent.collector.masks.spec.check_mask(collector["last_masks"].numpy(), "collector: last_masks")
        except ValueError as e:
            raise Damaged(str(e)) from None


def _sde(sde, config: TRPOConfig) -> None:
    """gSDE's noise state: None exactly without use_sde; else noise matrices (n, F, A) of a floating
    dtype, finite, 1 <= n <= MAX_ENVS, and the steps sampled with them, an int in [0, MAX_BATCH]."""
    if (sde is None) != (not config.use_sde):
        expected = "the noise state (hyperparameters use_sde is True)" if sde is None else \
            "None (hyperparameters use_sde is False)"
        raise Damaged(f"sde is {'None' if sde is None else _what(sde)}, expected {expected}")
    if sde is None:
        return
    _keys("sde", sde, ("noise", "step"))
    _tensor("sde['noise']", sde["noise"], float)
    if sde["noise"].dim() != 3 or not 1 <= sde["noise"].shape[0] <= MAX_ENVS or 0 in sde["noise"].shape:
        raise Damaged(f"sde['noise'] has shape {tuple(sde['noise'].shape)}, expected (n_envs, features, actions)")
    _int("sde['step']", sde["step"], 0, MAX_BATCH)


# ----------------------------------------------------------------------------- helpers
def _tensor(where: str, value, dtype=None, shape=None, *, rows: int | None = None, low: float | None = None) -> None:
    """Damaged unless `value` is a dense tensor (of `dtype`: a torch dtype, or `float` for any
    floating one; of `shape`; of `rows` rows), finite where it is floating, and >= `low`."""
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.is_quantized:
        raise Damaged(f"{where} is {_what(value)}, expected a dense tensor")
    if (dtype is float and not value.is_floating_point()) or (dtype not in (None, float) and value.dtype != dtype):
        raise Damaged(f"{where} is {_what(value)}, expected {'a floating' if dtype is float else dtype} tensor")
    if (shape is not None and tuple(value.shape) != shape) or (rows is not None and (value.dim() == 0
                                                                                      or value.shape[0] != rows)):
        raise Damaged(f"{where} has shape {tuple(value.shape)}, expected "
                      f"{shape if shape is not None else f'({rows}, ...): one row per env'}")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise Damaged(f"{where} holds NaN or Inf")
    if low is not None and value.numel() and bool((value < low).any()):
        raise Damaged(f"{where} holds values < {low}")


def _int(where: str, value, low: int, high: int) -> None:
    try:
        check_int(where, value, low, high)
    except ValueError as e:
        raise Damaged(str(e)) from None


def _keys(where: str, value: dict, keys: tuple[str, ...]) -> None:
    if not isinstance(value, dict) or set(value) != set(keys):
        raise Damaged(f"{where} is {_short(value)}, expected a dict of {', '.join(map(repr, keys))}")


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _same(value, expected) -> bool:
    """`value == expected` of the same kind (ints and floats alike, bools apart)."""
    if _real(expected) and not isinstance(expected, bool):
        return _real(value) and value == expected
    return type(value) is type(expected) and value == expected


def _what(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _short(value) -> str:
    """repr(value), cut to 60 characters (a hostile file's strings can be long)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
