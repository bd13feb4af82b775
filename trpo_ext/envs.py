"""Environment construction: the vector env the agent steps, the spaces it accepts, and the env
it can rebuild (for `TRPO.evaluate` and `TRPO.load`).

Every environment is stepped as one gymnasium vector env in SAME_STEP autoreset mode: when an
episode ends, `step` already returns the first observation of the next one, and the last
observation of the finished episode arrives in `infos["final_obs"]` (mask `infos["_final_obs"]`).
That is what a truncated episode needs to bootstrap from.
"""
from __future__ import annotations

import dataclasses
from copy import deepcopy

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import concatenate, iterate


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


class LeanSyncVectorEnv(gym.vector.SyncVectorEnv):
    """gymnasium's SyncVectorEnv in SAME_STEP autoreset mode, without merging per-step infos.

    `SyncVectorEnv.step` folds every sub-env's info dict into batched arrays, key by key, every step,
    and the agent reads none of it (what that costs: docs/benchmarks.md). Here `step` returns the same observations, rewards, terminations and truncations (the
    same sub-envs stepped in the same order), and `infos` holds only what an agent needs:
    `final_obs` (an object array, set where an episode ended this step) and its mask `_final_obs`,
    and `action_mask` (stacked, for the observations returned) when the sub-envs' infos have one.
    """

    def __init__(self, env_fns, copy: bool = True):
        super().__init__(env_fns, copy=copy, autoreset_mode=SAME_STEP)

    @classmethod
    def from_envs(cls, envs) -> "LeanSyncVectorEnv":
        """A vector env stepping these existing Env instances (e.g. unpickled from a checkpoint) as they are."""
        return cls([(lambda e=e: e) for e in envs])

    def step(self, actions):
        final_obs, masks = None, []
        for i, (action, env) in enumerate(zip(iterate(self.action_space, actions), self.envs, strict=True)):
            (self._env_obs[i], self._rewards[i], self._terminations[i], self._truncations[i], info) = env.step(action)
            if self._terminations[i] or self._truncations[i]:
                if final_obs is None:
                    final_obs = np.full(self.num_envs, None, dtype=object)
                final_obs[i] = self._env_obs[i]
                self._env_obs[i], info = env.reset()
            if "action_mask" in info:
                masks.append(info["action_mask"])
        self._observations = concatenate(self.single_observation_space, self._env_obs, self._observations)
        self._autoreset_envs = self._terminations | self._truncations
        infos = {} if final_obs is None else {"final_obs": final_obs, "_final_obs": self._autoreset_envs.copy()}
        if len(masks) == self.num_envs:
            infos["action_mask"] = np.stack(masks)
        obs = self._observations
        if self.copy:
            obs = obs.copy() if isinstance(obs, np.ndarray) else deepcopy(obs)
        return obs, self._rewards.copy(), self._terminations.copy(), self._truncations.copy(), infos


def make_vec_env(env, n_envs: int = 1, vectorization: str = "sync") -> gym.vector.VectorEnv:
    """One gymnasium vector env (SAME_STEP autoreset) from an id, an Env, a callable or a vector env:
    `LeanSyncVectorEnv` for "sync", gymnasium's AsyncVectorEnv (one subprocess per env) for "async".

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
    if isinstance(env, gym.Env):
        if n_envs != 1:
            raise ValueError("env: a gymnasium.Env instance cannot be copied into n_envs > 1 environments; "
                             "pass its id or a callable that makes one")
        fns = [lambda: env]
    else:
        fns = [_env_factory(env)] * n_envs
    if vectorization == "async":
        return gym.vector.AsyncVectorEnv(fns, autoreset_mode=SAME_STEP)
    return LeanSyncVectorEnv(fns)


def registered_spec(env, envs: gym.vector.VectorEnv) -> gym.envs.registration.EnvSpec | None:
    """The registered spec of `env` (what the agent was given; `envs` is what `make_vec_env` made
    of it) that the agent can rebuild its env from, for evaluate and load; None if there is none."""
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
