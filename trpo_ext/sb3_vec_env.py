"""stable-baselines3's VecEnvs (DummyVecEnv, SubprocVecEnv, VecNormalize, any VecEnvWrapper) as the
gymnasium vector env in SAME_STEP autoreset mode that the rollout collector takes (trpo_ext.envs).

An sb3 VecEnv resets an env whose episode ended inside `step` and returns the new episode's first
observation, the finished one's last in `info["terminal_observation"]`, and `done` for either end
(`info["TimeLimit.truncated"]` says a time limit cut it): exactly gymnasium's SAME_STEP mode, with
`done` split into terminated / truncated and the final observations in `infos["final_obs"]`
(mask `infos["_final_obs"]`). The sb3 infos of the last step stay in `last_infos` (the drop-in's
callbacks see them as sb3's do). No stable-baselines3 import: any object with sb3's VecEnv methods.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np

from .envs import SAME_STEP


def is_sb3_vec_env(env) -> bool:
    """Whether `env` is a stable-baselines3 VecEnv (by its class's module, without importing sb3)."""
    return any(cls.__name__ == "VecEnv" and cls.__module__.startswith("stable_baselines3.")
               for cls in type(env).__mro__)


class SB3VecEnv(gym.vector.VectorEnv):
    """An sb3 VecEnv `venv` as a gymnasium vector env (SAME_STEP autoreset); closing it closes `venv`."""

    def __init__(self, venv):
        self.venv = venv
        self.num_envs = int(venv.num_envs)
        self.single_observation_space = venv.observation_space
        self.single_action_space = venv.action_space
        self.observation_space = gym.vector.utils.batch_space(venv.observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(venv.action_space, self.num_envs)
        self.metadata = {"autoreset_mode": SAME_STEP}
        self.last_infos: list[dict] = [{} for _ in range(self.num_envs)]

    def reset(self, *, seed=None, options=None):
        if seed is not None:
            self.venv.seed(seed)  # sb3: env i gets seed + i at this reset
        if options is not None:
            self.venv.set_options(options)
        self.last_infos = [{} for _ in range(self.num_envs)]
        return self.venv.reset(), {}

    def step(self, actions):
        obs, rewards, dones, infos = self.venv.step(actions)
        dones = np.asarray(dones, dtype=bool)
        truncated = np.array([bool(d and info.get("TimeLimit.truncated", False)) for d, info in zip(dones, infos)])
        out = {}
        if dones.any():
            final = np.full(self.num_envs, None, dtype=object)
            for i in np.flatnonzero(dones):
                final[i] = infos[i].get("terminal_observation")
            out = {"final_obs": final, "_final_obs": dones.copy()}
        self.last_infos = list(infos)
        return obs, np.asarray(rewards, dtype=np.float64), dones & ~truncated, truncated, out

    def call(self, name: str, *args, **kwargs) -> tuple:
        """Every env's `name(*args, **kwargs)` (sb3's env_method; action masks are asked this way)."""
        return tuple(self.venv.env_method(name, *args, **kwargs))

    def close_extras(self, **kwargs):
        self.venv.close()
