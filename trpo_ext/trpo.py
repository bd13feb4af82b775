"""The TRPO agent (Schulman et al., 2015), top to bottom: rollouts, GAE, the natural-gradient policy
step with the fused conjugate-gradient solve, the backtracking line search, the critic, logs,
predict / evaluate and save / load.
"""
from __future__ import annotations

import csv
import math
import os
import pickle
import tempfile
import time
import warnings

import gymnasium as gym
import numpy as np
import torch

from .critic import fit_value_network
from .step import trust_region_step
from .policies import MLPPolicy, ValueNetwork
from .rollout import (EpisodeStats, LeanSyncVectorEnv, RolloutCollector, RunningNormalizer, check_spaces,
                      make_vec_env)

CHECKPOINT_FORMAT = 1
POLICY_KWARGS = {"hidden": (64, 64), "activation": "tanh", "log_std_init": 0.0}


class TRPO:
    """Trust Region Policy Optimization with the fused Fisher-vector-product CG solve.

    Args:
        env: a gymnasium id, an `EnvSpec`, a `gymnasium.Env` (with n_envs=1), a callable returning
            an Env, or a gymnasium vector env built with `autoreset_mode=AutoresetMode.SAME_STEP`.
            Observations must be a flat 1-D Box; actions Discrete or a 1-D Box (Box actions are
            clipped to the bounds for the env; log-probabilities use the unclipped sample).
        n_envs: environment copies stepped together as one vector env (ignored for a vector env).
        n_steps: steps per env per rollout; one policy update uses n_steps * n_envs transitions.
        gamma: discount factor.
        gae_lambda: GAE λ (bias/variance trade-off of the advantage estimate).
        max_kl: trust-region radius δ: an update is accepted only if the mean KL(old‖new) ≤ max_kl.
        damping: λ in the CG system (F + λI) x = g.
        cg_iters: maximum conjugate-gradient iterations (Fisher-vector products) per update.
        cg_rtol: CG stops early when ||r|| ≤ cg_rtol·||g||.
        backtrack_factor: the line search shrinks the step by this factor after each rejection.
        max_backtracks: step sizes tried before the update is abandoned and θ restored.
        fvp_fraction: fraction of the batch (random subset) used for the Fisher-vector products only.
        normalize_advantage: standardize advantages over the batch.
        normalize_obs: running mean/std observation normalization (saved with the model).
        obs_clip: normalized observations are clipped to [-obs_clip, obs_clip].
        critic_lr: Adam learning rate of the value network.
        critic_epochs: passes over the batch per update for the value network.
        critic_batch_size: minibatch size of the value-network regression.
        policy_kwargs: dict with `hidden` (layer widths, also used by the value network),
            `activation` ("tanh" or "relu") and `log_std_init` (Gaussian policies).
        vectorization: "sync" (one process; `rollout.LeanSyncVectorEnv`, which skips gymnasium's per-step
            info merging) or "async" (gymnasium's AsyncVectorEnv, one subprocess per env).
        stats_window: episodes averaged for the reported episode return and length.
        log_dir: directory for progress.csv and TensorBoard event files; None logs nowhere.
        seed: seeds network initialisation, action sampling, minibatch order and env resets
            (None draws one).
        device: "cpu", "cuda", a torch.device, or "auto" (CUDA when available).
    """

    def __init__(self, env, *, n_envs: int = 8, n_steps: int = 128, gamma: float = 0.99,
                 gae_lambda: float = 0.95, max_kl: float = 0.01, damping: float = 0.1, cg_iters: int = 10,
                 cg_rtol: float = 1e-10, backtrack_factor: float = 0.8, max_backtracks: int = 10,
                 fvp_fraction: float = 1.0, normalize_advantage: bool = True, normalize_obs: bool = False,
                 obs_clip: float = 10.0, critic_lr: float = 1e-3, critic_epochs: int = 10,
                 critic_batch_size: int = 128, policy_kwargs: dict | None = None, vectorization: str = "sync",
                 stats_window: int = 100, log_dir: str | os.PathLike | None = None, seed: int | None = None,
                 device: str | torch.device = "cpu"):
        _check_int("n_steps", n_steps, 1)
        _check_int("cg_iters", cg_iters, 1)
        _check_int("max_backtracks", max_backtracks, 1)
        _check_int("critic_epochs", critic_epochs, 0)
        _check_int("critic_batch_size", critic_batch_size, 1)
        _check_int("stats_window", stats_window, 1)
        for name, value, lo, hi in [("gamma", gamma, 0, 1), ("gae_lambda", gae_lambda, 0, 1),
                                    ("backtrack_factor", backtrack_factor, 0, 1), ("fvp_fraction", fvp_fraction, 0, 1)]:
            _check_float(name, value, lo, hi)
        for name, value in [("max_kl", max_kl), ("damping", damping), ("cg_rtol", cg_rtol),
                            ("obs_clip", obs_clip), ("critic_lr", critic_lr)]:
            _check_float(name, value, 0, math.inf)
        if max_kl <= 0 or fvp_fraction <= 0 or backtrack_factor in (0, 1):
            raise ValueError("max_kl and fvp_fraction must be > 0, and backtrack_factor strictly between 0 and 1")
        unknown = set(policy_kwargs or {}) - set(POLICY_KWARGS)
        if unknown:
            raise ValueError(f"policy_kwargs: unknown keys {sorted(unknown)}; expected {sorted(POLICY_KWARGS)}")
        policy_kwargs = {**POLICY_KWARGS, **(policy_kwargs or {})}
        policy_kwargs["hidden"] = tuple(policy_kwargs["hidden"])
        if seed is None:
            seed = np.random.SeedSequence().generate_state(1)[0] >> 1
        _check_int("seed", seed, 0)
        seed = int(seed)

        self.device = _resolve_device(device)
        self.envs = make_vec_env(env, n_envs, vectorization)
        self.env_spec = _env_spec(env, self.envs)
        self._env_factory = _eval_factory(env, self.env_spec)
        n_envs = self.envs.num_envs
        hyperparameters = dict(
            n_envs=n_envs, n_steps=n_steps, gamma=gamma, gae_lambda=gae_lambda, max_kl=max_kl, damping=damping,
            cg_iters=cg_iters, cg_rtol=cg_rtol, backtrack_factor=backtrack_factor, max_backtracks=max_backtracks,
            fvp_fraction=fvp_fraction, normalize_advantage=normalize_advantage, normalize_obs=normalize_obs,
            obs_clip=obs_clip, critic_lr=critic_lr, critic_epochs=critic_epochs,
            critic_batch_size=critic_batch_size, policy_kwargs=policy_kwargs, vectorization=vectorization,
            stats_window=stats_window, seed=seed)
        self.hyperparameters = {k: v.item() if isinstance(v, np.generic) else v for k, v in hyperparameters.items()}
        self.__dict__.update({k: v for k, v in self.hyperparameters.items() if k != "policy_kwargs"})
        self.batch_size = n_steps * n_envs

        obs_dim, _ = check_spaces(self.envs.single_observation_space, self.envs.single_action_space)
        self.normalizer = RunningNormalizer(obs_dim, obs_clip) if normalize_obs else None
        self.collector = RolloutCollector(self.envs, n_steps, self.device, self.normalizer,
                                          EpisodeStats(n_envs, stats_window))
        hidden, activation = policy_kwargs["hidden"], policy_kwargs["activation"]
        with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
            torch.manual_seed(seed)
            self.policy = MLPPolicy(obs_dim, self.envs.single_action_space, hidden, activation,
                                    policy_kwargs["log_std_init"]).to(self.device)
            self.value_net = ValueNetwork(obs_dim, hidden, activation).to(self.device)
        # Holds the critic's Adam state; the steps themselves run in trpo_ext.critic.fit_value_network.
        self.critic_optimizer = torch.optim.Adam(self.value_net.parameters(), lr=critic_lr)
        self.generator = torch.Generator(self.device).manual_seed(seed)

        self.num_timesteps = 0
        self.n_updates = 0
        self.log_dir = log_dir
        self._logger = None

    # ------------------------------------------------------------------------- training loop
    def learn(self, total_timesteps: int, callback=None, progress_bar: bool = True) -> "TRPO":
        """Trains for `total_timesteps` more environment steps (rounded up to whole rollouts).

        `callback(agent, record)` runs after every update with that update's log record (a dict);
        returning False stops training. The record (also `agent.last_record`, and a row of
        progress.csv / TensorBoard scalars when `log_dir` is set) holds: update, timesteps,
        ep_return_mean / ep_length_mean (last `stats_window` episodes), kl and surrogate_improvement
        of the accepted step (0 when rejected), expected_improvement (β·gᵀx), line_search_steps,
        line_search_failed, cg_iterations, cg_residual, entropy and policy_std (before the step),
        value_loss, explained_variance (of the pre-update values), steps_per_sec, and the time split
        time_rollout (incl. values and GAE) / time_cg (incl. the gradient) / time_line_search / time_critic.
        """
        from tqdm.auto import tqdm

        _check_int("total_timesteps", total_timesteps, 0)
        if self.collector.last_obs is None:
            self.collector.reset(seed=self.seed)
        n_updates = -(-total_timesteps // self.batch_size)
        with tqdm(total=n_updates * self.batch_size, disable=not progress_bar, unit="step",
                  dynamic_ncols=True) as bar:
            for _ in range(n_updates):
                record = self._update()
                bar.update(self.batch_size)
                bar.set_postfix(ret=f"{record['ep_return_mean']:.1f}", sps=f"{record['steps_per_sec']:.0f}",
                                refresh=False)
                if callback is not None and callback(self, record) is False:
                    break
        if self._logger is not None:
            self._logger.flush()
        return self

    def _update(self) -> dict:
        start = time.perf_counter()
        batch = self.collector.collect(self.policy, self.value_net, self.generator, self.gamma, self.gae_lambda)
        rollout_time = time.perf_counter() - start
        self.num_timesteps += self.batch_size

        policy_log = self._policy_step(batch.obs, batch.actions, batch.advantages)
        t = time.perf_counter()
        value_loss = self._critic_step(batch.obs, batch.returns)
        critic_time = time.perf_counter() - t
        self.n_updates += 1

        ret_mean, len_mean = self.collector.stats.means()
        elapsed = time.perf_counter() - start
        record = {
            "update": self.n_updates, "timesteps": self.num_timesteps,
            "ep_return_mean": ret_mean, "ep_length_mean": len_mean,
            **policy_log,
            "value_loss": value_loss, "explained_variance": _explained_variance(batch.values, batch.returns),
            "steps_per_sec": self.batch_size / elapsed,
            "time_rollout": rollout_time, "time_critic": critic_time,
        }
        self.last_record = record
        if self.log_dir is not None:
            if self._logger is None:
                self._logger = RunLogger(self.log_dir)
            self._logger.write(record)
        return record

    # ------------------------------------------------------------------------- policy step
    def _policy_step(self, obs: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor) -> dict:
        if self.normalize_advantage:
            advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        fvp_obs = None
        if self.fvp_fraction < 1.0:
            k = max(1, int(round(self.fvp_fraction * obs.shape[0])))
            fvp_obs = obs[torch.randperm(obs.shape[0], generator=self.generator, device=obs.device)[:k]]
        step = trust_region_step(self.policy, obs, actions, advantages, max_kl=self.max_kl, damping=self.damping,
                                 cg_iters=self.cg_iters, cg_rtol=self.cg_rtol, backtrack_factor=self.backtrack_factor,
                                 max_backtracks=self.max_backtracks, fvp_obs=fvp_obs)
        return {"kl": step.kl, "surrogate_improvement": step.improvement,
                "expected_improvement": step.expected_improvement, "line_search_steps": step.line_search_steps,
                "line_search_failed": int(not step.accepted), "cg_iterations": step.cg_iterations,
                "cg_residual": step.cg_residual, "entropy": step.entropy, "policy_std": step.policy_std,
                "time_cg": step.time_cg, "time_line_search": step.time_line_search}

    # ------------------------------------------------------------------------- critic
    def _critic_step(self, obs: torch.Tensor, returns: torch.Tensor) -> float:
        """Adam minibatch regression of V(s) on the GAE returns, as one extension call; the mean loss."""
        return fit_value_network(self.value_net, self.critic_optimizer, obs, returns, self.critic_epochs,
                                 self.critic_batch_size, self.generator)

    # ------------------------------------------------------------------------- use
    def predict(self, obs, deterministic: bool = False) -> np.ndarray:
        """Actions for raw observations: one observation (obs_dim,) or a batch (B, obs_dim).

        Normalization is applied inside; Box actions are clipped to the action space. Sampling uses
        torch's global RNG, so predicting never changes the training random stream.
        """
        obs = np.asarray(obs, dtype=np.float32)
        single = obs.ndim == 1
        if obs.shape[-1:] != (self.collector.obs_dim,) or obs.ndim > 2:
            raise ValueError(f"obs must have shape ({self.collector.obs_dim},) or (B, {self.collector.obs_dim}), "
                             f"got {obs.shape}")
        with torch.no_grad():
            _, actions = self.collector.act(self.policy, obs[None] if single else obs, deterministic=deterministic)
        actions = self.collector.env_actions(actions)
        return actions[0] if single else actions

    def evaluate(self, n_episodes: int = 10, deterministic: bool = True, env=None,
                 seed: int | None = None) -> tuple[float, float]:
        """Mean and standard deviation of the return over `n_episodes` full episodes.

        Runs on a separate env (`env`, or a fresh copy of the training env), so training is undisturbed.
        """
        _check_int("n_episodes", n_episodes, 1)
        if env is None:
            if self._env_factory is None:
                raise ValueError("evaluate: the training env cannot be copied (no registered id); pass env=")
            env = self._env_factory()
        elif isinstance(env, (str, gym.envs.registration.EnvSpec)):
            env = gym.make(env)
        seed = self.seed + 1_000_003 if seed is None else seed
        returns = []
        for episode in range(n_episodes):
            obs, _ = env.reset(seed=seed + episode)
            total, done = 0.0, False
            while not done:
                obs, reward, terminated, truncated, _ = env.step(self.predict(obs, deterministic))
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
        return float(np.mean(returns)), float(np.std(returns))

    # ------------------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> None:
        """Writes everything needed to resume into one file, atomically (temporary file + rename).

        Env states are included when the envs are synchronous and picklable; then `load(path)`
        continues the interrupted episodes exactly.
        """
        stats = self.collector.stats
        state = {
            "format": CHECKPOINT_FORMAT,
            "hyperparameters": self.hyperparameters,
            "env_spec": self.env_spec.to_json() if self.env_spec is not None else None,
            "policy": self.policy.state_dict(),
            "value_net": self.value_net.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "normalizer": self.normalizer.state_dict() if self.normalizer is not None else None,
            "generator": self.generator.get_state(),
            "generator_device": self.device.type,
            "num_timesteps": self.num_timesteps,
            "n_updates": self.n_updates,
            "episode_returns": torch.from_numpy(stats.returns.copy()),
            "episode_lengths": torch.from_numpy(stats.lengths.copy()),
            "finished_episodes": [(float(r), int(n)) for r, n in stats.finished],
            "last_obs": None if self.collector.last_obs is None else torch.from_numpy(
                np.asarray(self.collector.last_obs, dtype=np.float64)),
            "env_states": self._env_states(),
        }
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

    @classmethod
    def load(cls, path: str | os.PathLike, env=None, *, device: str | torch.device | None = None,
             log_dir: str | os.PathLike | None = None) -> "TRPO":
        """Restores an agent saved by `save`. With `env=None` the envs are rebuilt from the saved
        states (exact continuation) or from the saved env id; pass `env` (anything the
        constructor takes; a single Env instance means n_envs=1) to train or evaluate elsewhere.
        The env states in the file are unpickled: load only files you trust.
        """
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{os.fspath(path)!r} is not a trpo_ext TRPO checkpoint (format {CHECKPOINT_FORMAT})")
        hp = dict(state["hyperparameters"])
        resume_envs = env is None and state["env_states"] is not None and state["last_obs"] is not None
        if resume_envs:
            sub_envs = pickle.loads(state["env_states"])
            env = LeanSyncVectorEnv([(lambda e=e: e) for e in sub_envs])
        elif env is None:
            if state["env_spec"] is None:
                raise ValueError("this model was trained on an env without a registered id; pass env=")
            env = gym.envs.registration.EnvSpec.from_json(state["env_spec"])
        if isinstance(env, gym.Env):  # one instance cannot be copied into the saved n_envs
            hp["n_envs"] = 1
        agent = cls(env, **hp, device=device or "cpu", log_dir=log_dir)
        if resume_envs and state["env_spec"] is not None:
            agent.env_spec = gym.envs.registration.EnvSpec.from_json(state["env_spec"])
            agent._env_factory = _eval_factory(agent.env_spec, agent.env_spec)
        agent.policy.load_state_dict(state["policy"])
        agent.value_net.load_state_dict(state["value_net"])
        agent.critic_optimizer.load_state_dict(state["critic_optimizer"])
        if agent.normalizer is not None:
            agent.normalizer.load_state_dict(state["normalizer"])
        agent.num_timesteps, agent.n_updates = state["num_timesteps"], state["n_updates"]
        if state["generator_device"] == agent.device.type:  # a CPU and a CUDA generator state differ
            agent.generator.set_state(state["generator"])
        if resume_envs:
            stats = agent.collector.stats
            stats.returns[:] = state["episode_returns"].numpy()
            stats.lengths[:] = state["episode_lengths"].numpy()
            stats.finished.extend(state["finished_episodes"])
            agent.collector.last_obs = state["last_obs"].numpy().astype(agent.envs.single_observation_space.dtype)
        else:  # fresh envs: episodes restart, seeded so that resuming is still reproducible
            agent.collector.reset(seed=agent.seed + agent.num_timesteps)
        return agent

    def _env_states(self) -> bytes | None:
        if not isinstance(self.envs, gym.vector.SyncVectorEnv):
            return None
        try:
            return pickle.dumps(self.envs.envs)
        except Exception as e:  # e.g. envs holding a renderer or a simulator handle
            warnings.warn(f"env states are not saved ({type(e).__name__}: {e}); a loaded agent restarts its "
                          "episodes", stacklevel=3)
            return None

    def close(self) -> None:
        """Closes the envs and the log files."""
        self.envs.close()
        if self._logger is not None:
            self._logger.close()
            self._logger = None


# ----------------------------------------------------------------------------- helpers
def _explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    var = returns.var().item()
    return float("nan") if var == 0 else 1.0 - (returns - values).var().item() / var


def _check_int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_float(name: str, value, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not (low <= value <= high):
        raise ValueError(f"{name} must be a number in [{low}, {high}], got {value!r}")


def _resolve_device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _env_spec(env, envs) -> gym.envs.registration.EnvSpec | None:
    """The registered spec the agent can rebuild its env from (for evaluate and load), if any."""
    if isinstance(env, str):
        return gym.spec(env)
    if isinstance(env, gym.envs.registration.EnvSpec):
        return env
    if isinstance(env, gym.vector.VectorEnv):
        return getattr(env, "spec", None)
    if isinstance(envs, gym.vector.SyncVectorEnv):  # an Env instance or a callable's product
        return envs.envs[0].spec
    return None


def _eval_factory(env, spec):
    """A callable making one evaluation env: the user's callable, else one built from the spec."""
    if callable(env) and not isinstance(env, (gym.Env, gym.vector.VectorEnv, gym.envs.registration.EnvSpec)):
        return env
    return (lambda: gym.make(spec)) if spec is not None else None


class RunLogger:
    """Appends one row per update to `log_dir/progress.csv` and the same scalars to TensorBoard."""

    def __init__(self, log_dir):
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(log_dir, exist_ok=True)
        self.csv_path = os.path.join(log_dir, "progress.csv")
        self._file = open(self.csv_path, "a", newline="")
        self._csv = None
        self.tensorboard = SummaryWriter(os.path.join(log_dir, "tb"))

    def write(self, record: dict) -> None:
        if self._csv is None:
            self._csv = csv.DictWriter(self._file, fieldnames=list(record))
            if self._file.tell() == 0:
                self._csv.writeheader()
        self._csv.writerow(record)
        step = record["timesteps"]
        for key, value in record.items():
            if key not in ("update", "timesteps"):
                self.tensorboard.add_scalar(f"trpo/{key}", value, step)

    def flush(self) -> None:
        self._file.flush()
        self.tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        self.tensorboard.close()
