"""An sb3-contrib drop-in: `from trpo_ext.sb3 import TRPO` takes sb3_contrib.TRPO's signature, names,
defaults and meanings, and trains with trpo_ext's fused core (docs/sb3.md).

The arguments are translated once, by `trpo_ext.sb3_names` (the KL scale included); what trpo_ext
cannot honour is refused there by name. sb3 VecEnvs are adapted by `trpo_ext.sb3_vec_env`; sb3
callbacks get sb3's calls (init_callback, on_training_start, on_rollout_start, on_step after every
env step with sb3's `locals`, False stopping training at once, on_rollout_end, on_training_end); the
log goes through sb3's logger (stdout with verbose=1, TensorBoard under tensorboard_log/tb_log_name_N).
Needs stable-baselines3 (`pip install trpo_ext[sb3]`).
"""
from __future__ import annotations

import collections
import os
import time
import warnings

import gymnasium as gym
import numpy as np

try:
    from stable_baselines3.common.callbacks import BaseCallback, CallbackList, ConvertCallback, ProgressBarCallback
    from stable_baselines3.common.utils import configure_logger
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("trpo_ext.sb3 needs stable-baselines3: pip install 'trpo_ext[sb3]'") from exc

from . import sb3_names
from .sb3_vec_env import SB3VecEnv, is_sb3_vec_env
from .trpo import TRPO as NativeTRPO


class _StopTraining(Exception):
    """A callback's on_step returned False: the rollout is discarded and learn returns."""


def _native_env(env):
    """What trpo_ext.TRPO is given for sb3's `env`: an sb3 VecEnv adapted, anything else as it is."""
    return SB3VecEnv(env) if is_sb3_vec_env(env) else env


def _zip_path(path) -> str:
    """sb3's file name: ".zip" added to a path without a suffix."""
    path = os.fspath(path)
    return path if os.path.splitext(path)[1] else path + ".zip"


class TRPO:
    """sb3_contrib.TRPO's interface on trpo_ext.TRPO (`self.agent`); the arguments: sb3-contrib's
    docs, their translation: docs/sb3.md."""

    def __init__(self, policy, env, learning_rate=1e-3, n_steps=2048, batch_size=128, gamma=0.99, cg_max_steps=15,
                 cg_damping=0.1, line_search_shrinking_factor=0.8, line_search_max_iter=10, n_critic_updates=10,
                 gae_lambda=0.95, use_sde=False, sde_sample_freq=-1, rollout_buffer_class=None,
                 rollout_buffer_kwargs=None, normalize_advantage=True, target_kl=0.01, sub_sampling_factor=1,
                 stats_window_size=100, tensorboard_log=None, policy_kwargs=None, verbose=0, seed=None, device="auto",
                 _init_setup_model=True):
        arguments = locals()
        sb3_args = {name: arguments[name] for name in sb3_names.SB3_DEFAULTS}
        if not (isinstance(policy, str) and policy in sb3_names.POLICY_NAMES):
            raise ValueError(f"policy={policy!r}: expected one of {', '.join(map(repr, sb3_names.POLICY_NAMES))} "
                             "(sb3 policy classes do not run on trpo_ext's fused core; a network of your own: "
                             "trpo_ext.TRPO(env, policy=module))")
        if _init_setup_model is not True:
            raise ValueError("_init_setup_model=False: the drop-in always builds its model; only True is accepted")
        self.__dict__.update(sb3_args)  # sb3's attributes: model.target_kl, model.n_steps, ...
        self.policy_name = policy
        native = _native_env(env)
        space = native.single_action_space if isinstance(native, gym.vector.VectorEnv) else _action_space(native)
        kwargs = sb3_names.trpo_ext_kwargs({k: v for k, v in sb3_args.items() if k not in sb3_names.FRONT_END
                                            or k == "policy_kwargs"}, space)
        self._adopt(NativeTRPO(native, n_envs=1, policy=policy, **kwargs), env)
        self.num_timesteps = 0
        buffer_size = self.n_envs * n_steps
        if buffer_size % batch_size:  # sb3-contrib's warning, in its words
            warnings.warn(f"You have specified a mini-batch size of {batch_size}, but because the `RolloutBuffer` is "
                          f"of size `n_steps * n_envs = {buffer_size}`, after every {buffer_size // batch_size} "
                          f"untruncated mini-batches, there will be a truncated mini-batch of size "
                          f"{buffer_size % batch_size}", stacklevel=2)

    def _adopt(self, agent: NativeTRPO, env) -> None:
        """The drop-in's state around `agent` (built or loaded)."""
        self.agent = agent
        self.env = env if is_sb3_vec_env(env) else agent.envs
        self.n_envs = agent.config.n_envs
        self.observation_space, self.action_space = agent.observation_space, agent.action_space
        self.ep_info_buffer = collections.deque(maxlen=agent.config.stats_window)
        self._episode = np.zeros((2, self.n_envs))  # the running episodes' returns and lengths
        self._logger = None
        self._callback: BaseCallback | None = None
        self._seeded = False
        agent.collector.on_step = self._on_env_step

    # ------------------------------------------------------------------------- sb3's interface
    @property
    def policy(self):
        return self.agent.policy

    @property
    def logger(self):
        if self._logger is None:
            self._logger = configure_logger(self.verbose, None, "", True)
        return self._logger

    def get_env(self):
        return self.env

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = False):
        return self.agent.predict(observation, state, episode_start, deterministic)

    def learn(self, total_timesteps: int, callback=None, log_interval: int = 1, tb_log_name: str = "TRPO",
              reset_num_timesteps: bool = True, progress_bar: bool = False) -> "TRPO":
        self.start_time = time.time_ns()
        if reset_num_timesteps:
            self.num_timesteps = 0
        else:
            total_timesteps += self.num_timesteps
        self._num_timesteps_at_start = self.num_timesteps
        if reset_num_timesteps or self.agent.collector.last_obs is None:
            collector = self.agent.collector
            collector.reset(seed=None if self._seeded else self.agent.rank_seed(self.agent.config.seed))
            self._seeded, self._episode[:] = True, 0.0
        self._logger = configure_logger(self.verbose, self.tensorboard_log, tb_log_name, reset_num_timesteps)
        callback = self._init_callback(callback, progress_bar)
        callback.on_training_start(locals(), globals())
        iteration = 0
        try:
            while self.num_timesteps < total_timesteps:
                callback.on_rollout_start()
                try:
                    self.agent.learn(self.agent.config.batch_size, callback=self._after_update, progress_bar=False)
                except _StopTraining:
                    self.agent.collector.last_obs = None  # its envs went on: the next learn resets them
                    break
                iteration += 1
                if log_interval is not None and iteration % log_interval == 0:
                    self._dump_logs(iteration)
        finally:
            self._callback = None
        callback.on_training_end()
        return self

    def _init_callback(self, callback, progress_bar: bool) -> BaseCallback:
        """As sb3's BaseAlgorithm._init_callback."""
        if isinstance(callback, list):
            callback = CallbackList(callback)
        if not isinstance(callback, BaseCallback):
            callback = ConvertCallback(callback)
        if progress_bar:
            callback = CallbackList([callback, ProgressBarCallback()])
        callback.init_callback(self)
        self._callback = callback
        return callback

    def _on_env_step(self, t, obs, rewards, terminated, truncated, infos) -> None:
        """The collector's per-step hook: sb3's num_timesteps, infos, episode buffer and on_step."""
        if self._callback is None:
            return
        self.num_timesteps += self.n_envs
        dones = terminated | truncated
        self._episode[0] += rewards
        self._episode[1] += 1.0
        envs = self.agent.collector.envs
        sb3_infos = envs.last_infos if isinstance(envs, SB3VecEnv) else [{} for _ in range(self.n_envs)]
        final = infos.get("final_obs")
        for i in np.flatnonzero(dones):
            if not isinstance(envs, SB3VecEnv):
                sb3_infos[i].update({"terminal_observation": None if final is None else final[i],
                                     "TimeLimit.truncated": bool(truncated[i] and not terminated[i]),
                                     "episode": {"r": float(self._episode[0, i]), "l": int(self._episode[1, i]),
                                                 "t": round((time.time_ns() - self.start_time) / 1e9, 6)}})
            if "episode" in sb3_infos[i]:
                self.ep_info_buffer.append(sb3_infos[i]["episode"])
            self._episode[:, i] = 0.0
        self._callback.update_locals(dict(new_obs=obs, rewards=rewards, dones=dones, infos=sb3_infos, n_steps=t,
                                          env=self.env, callback=self._callback, self=self))
        if not self._callback.on_step():
            raise _StopTraining
        if t == self.n_steps - 1:
            self._callback.on_rollout_end()

    def _after_update(self, agent, record) -> None:
        """trpo_ext's update record as sb3-contrib's train/ keys (its KL per action dimension)."""
        d = sb3_names.kl_scale(self.action_space)
        accepted = not record["line_search_failed"]
        for key, value in (("policy_objective", record["surrogate_improvement"]), ("value_loss", record["value_loss"]),
                           ("kl_divergence_loss", record["kl"] / d if accepted else 0.0),
                           ("explained_variance", record["explained_variance"]),
                           ("is_line_search_success", float(accepted)), ("n_updates", agent.n_updates)):
            self.logger.record(f"train/{key}", value, exclude="tensorboard" if key == "n_updates" else None)
        if isinstance(self.action_space, gym.spaces.Box):
            self.logger.record("train/std", record["policy_std"])

    def _dump_logs(self, iteration: int) -> None:
        """As sb3's OnPolicyAlgorithm.dump_logs."""
        elapsed = max((time.time_ns() - self.start_time) / 1e9, 1e-9)
        self.logger.record("time/iterations", iteration, exclude="tensorboard")
        if self.ep_info_buffer:
            self.logger.record("rollout/ep_rew_mean", float(np.mean([e["r"] for e in self.ep_info_buffer])))
            self.logger.record("rollout/ep_len_mean", float(np.mean([e["l"] for e in self.ep_info_buffer])))
        self.logger.record("time/fps", int((self.num_timesteps - self._num_timesteps_at_start) / elapsed))
        self.logger.record("time/time_elapsed", int(elapsed), exclude="tensorboard")
        self.logger.record("time/total_timesteps", self.num_timesteps, exclude="tensorboard")
        self.logger.dump(step=self.num_timesteps)

    # ------------------------------------------------------------------------- save / load
    def save(self, path) -> None:
        """trpo_ext's checkpoint (not sb3's zip format), at `path` (".zip" added without a suffix, as sb3)."""
        self.agent.save(_zip_path(path))

    @classmethod
    def load(cls, path, env=None, device="auto", custom_objects=None, print_system_info=False, force_reset=True,
             **kwargs) -> "TRPO":
        """A model saved by `save`; `env` (an sb3 VecEnv too) replaces the saved one. kwargs: the
        drop-in's own settings (verbose, tensorboard_log), as sb3's load sets attributes."""
        unknown = set(kwargs) - {"verbose", "tensorboard_log"}
        if custom_objects or unknown:
            raise ValueError(f"TRPO.load: {'custom_objects' if custom_objects else sorted(unknown)[0]} is not "
                             "supported here (trpo_ext's checkpoint holds no sb3 objects); expected verbose= or "
                             "tensorboard_log=")
        agent = NativeTRPO.load(_zip_path(path), None if env is None else _native_env(env), device=device)
        self = cls.__new__(cls)
        back = sb3_names.sb3_kwargs(agent.hyperparameters, sb3_names.kl_scale(agent.action_space))
        self.__dict__.update({**sb3_names.SB3_DEFAULTS, **back, "verbose": 0, "tensorboard_log": None, **kwargs})
        self.policy_name, self.device = "MlpPolicy", agent.device
        self._adopt(agent, env)
        self.num_timesteps = agent.num_timesteps
        return self

    def close(self) -> None:
        self.agent.close()


def _action_space(env) -> gym.Space:
    """The action space of what trpo_ext.TRPO would make of `env` (an id, an Env, a callable)."""
    if isinstance(env, gym.Env):
        return env.action_space
    if isinstance(env, (str, gym.envs.registration.EnvSpec)):
        return sb3_names.env_action_space(env)
    probe = env()
    try:
        return probe.action_space
    finally:
        probe.close()
