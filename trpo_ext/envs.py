"""Environment construction: the vector env the agent steps, the spaces it accepts, and the env
it can rebuild (for `TRPO.evaluate` and `TRPO.load`).

Every environment is stepped as one gymnasium vector env in SAME_STEP autoreset mode: when an
episode ends, `step` already returns the first observation of the next one, and the last
observation of the finished episode arrives in `infos["final_obs"]` (mask `infos["_final_obs"]`).
That is what a truncated episode needs to bootstrap from.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from copy import deepcopy

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import concatenate, iterate

from . import spaces
from .envpool_env import EnvPoolVectorEnv


SAME_STEP = gym.vector.AutoresetMode.SAME_STEP
VECTOR_KWARGS = ("num_envs", "vectorization_mode", "vector_kwargs", "wrappers")
"""What `gym.make_vec` adds to a vector env's spec.kwargs besides the env's own kwargs."""


def _env_factory(env):
    """A zero-argument callable that makes one copy of `env` (an id, an EnvSpec or a callable)."""
    if isinstance(env, (str, gym.envs.registration.EnvSpec)):
        return lambda: gym.make(env)
    if callable(env) and not isinstance(env, gym.Env):
        return env
    raise TypeError(f"env must be a gymnasium id, an EnvSpec, a gymnasium.Env, a callable returning one, "
                    f"or a gymnasium.vector.VectorEnv, got {type(env).__name__}")


class EnvStepError(ValueError):
    """A sub-env's `reset` or `step` returned what gymnasium's API or the env's observation space
    does not allow: which env (its index in the vector env), the field, what came and what was
    expected. The rollout collector adds the step."""

    def __init__(self, env, field=None, got=None, expected=None):
        if isinstance(env, EnvStepError):  # AsyncVectorEnv re-raises a worker's error e as type(e)(e)
            env, field, got, expected = env.env, env.field, env.got, env.expected
        super().__init__(env, field, got, expected)
        self.env, self.field, self.got, self.expected = env, field, got, expected

    def __str__(self):
        return f"env {self.env}: {self.field} {self.got}; expected {self.expected}"


STEP_API = "gymnasium's (obs, reward, terminated, truncated, info)"
_FAST_REWARDS = frozenset({float, int, np.float64, np.float32, np.int64, np.int32})
_BOOLS = frozenset({bool, np.bool_})


def step_problem(out, codec: spaces.ObservationCodec | None, check_obs: bool = True) -> tuple | None:
    """(field, got, expected) for the first thing one env's `step` return breaks, or None: the
    5-tuple, a real reward (an int, a float, or a numpy scalar or 0-d array of one), bool
    `terminated` and `truncated`, a dict `info`, and (`check_obs`, with a codec) the observation
    against the space (`ObservationCodec.problem`)."""
    try:
        obs, reward, terminated, truncated, info = out
    except (TypeError, ValueError):
        old = " (the old gym API's (obs, reward, done, info)?)" if isinstance(out, tuple) and len(out) == 4 else ""
        got = f"is a tuple of {len(out)} values{old}" if isinstance(out, tuple) else f"is {spaces.shown(out)}"
        return "the step's return", got, STEP_API
    if not (isinstance(reward, (int, float, np.integer, np.floating))
            or (isinstance(reward, np.ndarray) and reward.shape == () and reward.dtype.kind in "biuf")):
        return "reward", f"is {spaces.shown(reward)}", "a real number (an int, a float or a numpy scalar of one)"
    for name, flag in (("terminated", terminated), ("truncated", truncated)):
        if not isinstance(flag, (bool, np.bool_)):
            return name, f"is {spaces.shown(flag)}", "a bool (True or False)"
    if not isinstance(info, Mapping):
        return "info", f"is {spaces.shown(info)}", "a dict"
    return obs_problem(obs, codec) if check_obs else None


def batch_problem(rewards, terminated, truncated, n: int) -> tuple | None:
    """(None, field, got, expected) where a vector env's batched rewards, terminations or truncations
    are not (n,) arrays of real numbers, bools and bools (the sub-envs' own values: `step_problem`)."""
    for field, a, kinds, expected in (("rewards", rewards, "biuf", "real numbers"), ("terminations", terminated, "b",
                                      "bools"), ("truncations", truncated, "b", "bools")):
        if type(a) is not np.ndarray or a.shape != (n,) or a.dtype.kind not in kinds:
            got = f"are an array of shape {a.shape} and dtype {a.dtype}" if isinstance(a, np.ndarray) else \
                f"are {spaces.shown(a)}"
            return None, field, got, f"an array of {n} {expected}"
    return None


def reset_problem(out, codec: spaces.ObservationCodec | None, check_obs: bool = True) -> tuple | None:
    """`step_problem` for one env's `reset` return: gymnasium's (obs, info)."""
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], Mapping)):
        return "the reset's return", f"is {spaces.shown(out)}", "gymnasium's (obs, info), info a dict"
    return obs_problem(out[0], codec) if check_obs else None


def obs_problem(obs, codec: spaces.ObservationCodec | None) -> tuple | None:
    """(field, got, expected) where one env's observation breaks the space, or None (also without a codec)."""
    found = None if codec is None else codec.problem(obs, batch=False)
    return None if found is None else found[1:]


def _codec(space) -> spaces.ObservationCodec | None:
    """The space's codec, or None for a space the agent refuses anyway (its own error says why)."""
    try:
        return spaces.ObservationCodec(space)
    except TypeError:
        return None


class LeanSyncVectorEnv(gym.vector.SyncVectorEnv):
    """gymnasium's SyncVectorEnv in SAME_STEP autoreset mode, without merging per-step infos, that
    checks what its sub-envs return.

    `SyncVectorEnv.step` folds every sub-env's info dict into batched arrays, key by key, every step,
    and the agent reads none of it (what that costs: docs/benchmarks.md). Here `step` returns the same
    observations, rewards, terminations and truncations (the same sub-envs stepped in the same order),
    and `infos` holds only what an agent needs: `final_obs` (an object array, set where an episode
    ended this step) and its mask `_final_obs`, and `action_mask` (stacked, for the observations
    returned) when the sub-envs' infos have one.

    Each sub-env's return is checked (`step_problem`, `reset_problem`): its form and types on every
    step (type tests), and its observation when numpy cannot batch it (the cause named instead of
    numpy's error); an `EnvStepError` names the env, and leaves the step half done (reset before
    stepping again). The batched observations' values (NaN, range) are the rollout's to check, once
    per batch (`ObservationCodec.problem`), and so are the final observations it bootstraps from (a
    truncated episode's); a terminated episode's final observation, which nothing reads, is not
    checked. A partial reset (options["reset_mask"]) is gymnasium's own.
    """

    def __init__(self, env_fns, copy: bool = True):
        super().__init__(env_fns, copy=copy, autoreset_mode=SAME_STEP)
        self.codec = _codec(self.single_observation_space)

    @classmethod
    def from_envs(cls, envs) -> "LeanSyncVectorEnv":
        """A vector env stepping these existing Env instances (e.g. unpickled from a checkpoint) as they are."""
        return cls([(lambda e=e: e) for e in envs])

    def _reset_env(self, i: int, env, **kwargs) -> tuple:
        out = env.reset(**kwargs)
        if type(out) is tuple and len(out) == 2 and type(out[1]) is dict:  # the common form passes here
            return out
        problem = reset_problem(out, self.codec, check_obs=False)  # the observation: when batched
        if problem is not None:
            raise EnvStepError(i, *problem)
        return out

    def _batch(self) -> object:
        """The sub-envs' observations batched; numpy's error replaced by the env and the cause."""
        try:
            self._observations = concatenate(self.single_observation_space, self._env_obs, self._observations)
        except Exception:
            for i, obs in enumerate(self._env_obs):
                problem = obs_problem(obs, self.codec)
                if problem is not None:
                    raise EnvStepError(i, *problem) from None
            raise
        obs = self._observations
        if self.copy:
            obs = obs.copy() if isinstance(obs, np.ndarray) else deepcopy(obs)
        return obs

    def reset(self, *, seed=None, options=None):
        if options is not None and "reset_mask" in options:
            return super().reset(seed=seed, options=options)
        if seed is None or isinstance(seed, int):
            seed = [None if seed is None else seed + i for i in range(self.num_envs)]
        if len(seed) != self.num_envs:
            raise ValueError(f"seed: {len(seed)} seeds for {self.num_envs} envs")
        for flags in (self._terminations, self._truncations, self._autoreset_envs):
            flags[:] = False
        infos = {}
        for i, (env, single_seed) in enumerate(zip(self.envs, seed, strict=True)):
            self._env_obs[i], info = self._reset_env(i, env, seed=single_seed, options=options)
            infos = self._add_info(infos, info, i)
        return self._batch(), infos

    def step(self, actions):
        final_obs, masks = None, []
        fast_rewards, bools, all_obs, rewards, terminations, truncations = (  # locals: the loop runs every step
            _FAST_REWARDS, _BOOLS, self._env_obs, self._rewards, self._terminations, self._truncations)
        for i, (action, env) in enumerate(zip(iterate(self.action_space, actions), self.envs, strict=True)):
            out = env.step(action)
            try:
                obs, reward, terminated, truncated, info = out
            except (TypeError, ValueError):
                raise EnvStepError(i, *step_problem(out, None)) from None
            # The common types pass here (identity tests first: a float reward, the flags of most steps), the
            # rest are looked at closely
            if ((type(reward) is not float and type(reward) not in fast_rewards)
                    or (terminated is not False and type(terminated) not in bools)
                    or (truncated is not False and type(truncated) not in bools) or type(info) is not dict):
                problem = step_problem(out, None)
                if problem is not None:
                    raise EnvStepError(i, *problem)
            all_obs[i] = obs  # one store each: a tuple assignment would build and unpack a tuple
            rewards[i] = reward
            terminations[i] = terminated
            truncations[i] = truncated
            if terminated or truncated:
                if final_obs is None:
                    final_obs = np.full(self.num_envs, None, dtype=object)
                final_obs[i] = obs
                all_obs[i], info = self._reset_env(i, env)
            if "action_mask" in info:
                masks.append(info["action_mask"])
        obs = self._batch()
        self._autoreset_envs = self._terminations | self._truncations
        infos = {} if final_obs is None else {"final_obs": final_obs, "_final_obs": self._autoreset_envs.copy()}
        if len(masks) == self.num_envs:
            infos["action_mask"] = np.stack(masks)
        return obs, self._rewards.copy(), self._terminations.copy(), self._truncations.copy(), infos


class CheckedEnv(gym.Wrapper):
    """One sub-env of an AsyncVectorEnv, its every reset and step return checked in its worker
    (`step_problem`, `reset_problem`): a fault is an `EnvStepError` naming `index`, where
    gymnasium's worker would raise numpy's error for the batch."""

    def __init__(self, env: gym.Env, index: int):
        super().__init__(env)
        self.index, self.codec = index, _codec(env.observation_space)

    def reset(self, **kwargs):
        out = self.env.reset(**kwargs)
        problem = reset_problem(out, self.codec)
        if problem is not None:
            raise EnvStepError(self.index, *problem)
        return out

    def step(self, action):
        out = self.env.step(action)
        problem = step_problem(out, self.codec)
        if problem is not None:
            raise EnvStepError(self.index, *problem)
        return out


def _checked(make, index: int) -> gym.Env:
    return CheckedEnv(make(), index)


def make_vec_env(env, n_envs: int = 1, vectorization: str = "sync") -> gym.vector.VectorEnv:
    """One gymnasium vector env (SAME_STEP autoreset) from an id, an Env, a callable or a vector env:
    `LeanSyncVectorEnv` for "sync", gymnasium's AsyncVectorEnv (one subprocess per env) for "async",
    `EnvPoolVectorEnv` (an EnvPool task id or EnvSpec only) for "envpool".

    A single `gym.Env` instance cannot be copied, so it needs `n_envs=1`; a vector env is used as
    it is (its `num_envs` wins) and must have been built with `autoreset_mode=SAME_STEP`. `n_envs`
    and `vectorization` are checked once, by `TRPOConfig`.
    """
    if isinstance(env, gym.vector.VectorEnv):
        mode = env.metadata.get("autoreset_mode")
        if mode != SAME_STEP:
            raise ValueError(
                f"env: vector envs must use autoreset_mode=AutoresetMode.SAME_STEP, got {mode!r}; build it with "
                "gym.make_vec(id, n, vectorization_mode='sync', "
                "vector_kwargs={'autoreset_mode': gym.vector.AutoresetMode.SAME_STEP}) "
                "or pass the env id and n_envs instead")
        return env
    if vectorization == "envpool":
        return EnvPoolVectorEnv(env, n_envs)
    if isinstance(env, gym.Env):
        if n_envs != 1:
            raise ValueError("env: a gymnasium.Env instance cannot be copied into n_envs > 1 environments; "
                             "pass its id or a callable that makes one")
        fns = [lambda: env]
    else:
        fns = [_env_factory(env)] * n_envs
    if vectorization == "async":
        return gym.vector.AsyncVectorEnv([functools.partial(_checked, fn, i) for i, fn in enumerate(fns)],
                                         autoreset_mode=SAME_STEP)
    return LeanSyncVectorEnv(fns)


def registered_spec(env, envs: gym.vector.VectorEnv) -> gym.envs.registration.EnvSpec | None:
    """The registered spec of `env` (what the agent was given; `envs` is what `make_vec_env` made
    of it) that the agent can rebuild its env from, for evaluate and load; None if there is none."""
    if isinstance(envs, EnvPoolVectorEnv):  # gymnasium's spec of the same id (None: gymnasium has no such env)
        return envs.spec
    if isinstance(env, str):
        return gym.spec(env)
    if isinstance(env, gym.envs.registration.EnvSpec):
        return env
    if isinstance(env, gym.vector.VectorEnv):  # make_vec's spec, less its vectorization kwargs
        spec = getattr(env, "spec", None)
        return None if spec is None else dataclasses.replace(
            spec, kwargs={k: v for k, v in spec.kwargs.items() if k not in VECTOR_KWARGS})
    if isinstance(envs, gym.vector.SyncVectorEnv):  # an Env instance or a callable's product
        return envs.envs[0].spec
    return None


def eval_env_factory(env, spec: gym.envs.registration.EnvSpec | None):
    """A callable making one evaluation env: the user's callable, else one built from the spec
    (None when there is neither)."""
    if callable(env) and not isinstance(env, (gym.Env, gym.vector.VectorEnv, gym.envs.registration.EnvSpec)):
        return env
    return (lambda: gym.make(spec)) if spec is not None else None
