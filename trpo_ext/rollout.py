"""Running observation normalization, rollouts and GAE: what turns a vector env (`trpo_ext.envs`)
into the batch of one policy update.

The collector steps a SAME_STEP-autoreset vector env: a truncated episode's last observation, to
bootstrap from, arrives in `infos["final_obs"]`.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from torch.distributions import Categorical, Independent, Normal

from . import _ops
from .envs import check_spaces
from .fisher import fused_mlp
from .envs import LeanSyncVectorEnv, make_vec_env  # noqa: F401  (re-exported: their import path before trpo_ext.envs)


# ----------------------------------------------------------------------------- observation normalization
def merge_moments(a: tuple, b: tuple) -> tuple:
    """The (count, mean, variance) of two sets of observations together, from each one's (parallel
    Welford / Chan et al.)."""
    count_a, mean_a, var_a = a
    count_b, mean_b, var_b = b
    total = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * count_b / total
    var = (var_a * count_a + var_b * count_b + delta**2 * count_a * count_b / total) / total
    return total, mean, var


class RunningNormalizer:
    """Running mean / variance of observations (parallel Welford update); normalizes and clips.

    Statistics are float64 on the CPU; `normalize` works on float32 tensors on any device. The
    rollout updates them every step, so `update` and `tensors` avoid numpy's Python-level wrappers
    (np.mean / np.var) and refresh float32 CPU mirrors in place.

    Data-parallel (`sync`): each rank updates its statistics with its own observations; `sync`
    merges what every rank saw since the last sync into the statistics all ranks had then, so after
    it the ranks hold identical statistics again.
    """

    def __init__(self, dim: int, clip: float = 10.0, eps: float = 1e-8):
        self.mean = np.zeros(dim)
        self.var = np.ones(dim)
        self.count = eps
        self.clip = float(clip)
        self.eps = eps
        self._mean32 = np.zeros(dim, dtype=np.float32)  # float32 mean and 1 / std, viewed by the CPU tensors
        self._inv_std32 = np.zeros(dim, dtype=np.float32)
        self._cpu = (torch.from_numpy(self._mean32), torch.from_numpy(self._inv_std32))
        self._device_cache = None  # (mean, inv_std) on a non-CPU device
        self._since_sync = None  # data-parallel: (moments at the last sync, moments seen since), else None
        self._refresh()

    def update(self, batch: np.ndarray) -> None:
        batch = np.asarray(batch, dtype=np.float64).reshape(-1, self.mean.shape[0])
        n = batch.shape[0]
        mean = np.add.reduce(batch, axis=0) / n
        centered = batch - mean
        moments = (n, mean, np.add.reduce(centered * centered, axis=0) / n)
        self.count, self.mean, self.var = merge_moments((self.count, self.mean, self.var), moments)
        if self._since_sync is not None:
            synced, seen = self._since_sync
            self._since_sync = synced, (moments if seen is None else merge_moments(seen, moments))
        self._refresh()

    def sync(self, group) -> None:
        """Merges every rank's observations since the last sync (one all-gather); the first call
        starts the bookkeeping, from statistics that must be equal on all ranks."""
        from . import distributed

        if group is None:
            return
        if self._since_sync is None:
            self._since_sync = (self.count, self.mean.copy(), self.var.copy()), None
            return
        synced, seen = self._since_sync
        dim = self.mean.shape[0]
        mine = np.zeros(1 + 2 * dim) if seen is None else np.concatenate([[seen[0]], seen[1], seen[2]])
        merged = synced
        for row in distributed.all_gather_rows(torch.from_numpy(mine), group).numpy():
            if row[0] > 0:  # in rank order: the same arithmetic on every rank
                merged = merge_moments(merged, (row[0], row[1:1 + dim], row[1 + dim:]))
        count, self.mean, self.var = merged
        self.count = float(count)  # a Python float, never a numpy scalar (checkpoints hold plain data)
        self._since_sync = (self.count, self.mean.copy(), self.var.copy()), None
        self._refresh()

    def _refresh(self) -> None:
        np.copyto(self._mean32, self.mean, casting="same_kind")
        np.copyto(self._inv_std32, 1.0 / np.sqrt(self.var + self.eps), casting="same_kind")
        self._device_cache = None

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std) as float32 tensors on `device`. On the CPU they are live views that later
        updates overwrite; elsewhere, copies cached until the next update."""
        device = torch.device(device)
        if device.type == "cpu":
            return self._cpu
        if self._device_cache is None or self._device_cache[0].device != device:
            self._device_cache = tuple(t.to(device) for t in self._cpu)
        return self._device_cache

    def normalize(self, obs: torch.Tensor) -> torch.Tensor:
        mean, inv_std = self.tensors(obs.device)
        return ((obs - mean) * inv_std).clamp_(-self.clip, self.clip)

    def state_dict(self) -> dict:
        return {"mean": torch.from_numpy(self.mean.copy()), "var": torch.from_numpy(self.var.copy()),
                "count": float(self.count), "clip": self.clip}

    def load_state_dict(self, state: dict) -> None:
        self.mean, self.var = state["mean"].numpy().copy(), state["var"].numpy().copy()
        self.count, self.clip = float(state["count"]), float(state["clip"])
        if self._since_sync is not None:  # the loaded statistics are the new common start
            self._since_sync = (self.count, self.mean.copy(), self.var.copy()), None
        self._refresh()


class RewardScaler:
    """Reward normalization with stable-baselines3 VecNormalize's semantics: each env's discounted
    return so far, R <- gamma R + r (reset to 0 where an episode ends), enters a running variance,
    and every reward is divided by that variance's square root (+ eps) and clipped to +-clip. The
    statistics update before the rewards of the step are scaled, as VecNormalize does. Data-parallel,
    `sync` merges the ranks' statistics once per rollout (RunningNormalizer.sync)."""

    def __init__(self, n_envs: int, gamma: float, clip: float = 10.0, eps: float = 1e-8):
        self.returns = np.zeros(n_envs)
        self.stats = RunningNormalizer(1, clip, eps)
        self.gamma, self.clip, self.eps = float(gamma), float(clip), eps

    def __call__(self, rewards: np.ndarray, done: np.ndarray) -> np.ndarray:
        self.returns = self.returns * self.gamma + rewards
        self.stats.update(self.returns[:, None])
        scaled = np.clip(rewards / np.sqrt(self.stats.var[0] + self.eps), -self.clip, self.clip)
        self.returns[done] = 0.0
        return scaled

    def sync(self, group) -> None:
        self.stats.sync(group)

    def state_dict(self) -> dict:
        return {"returns": torch.from_numpy(self.returns.copy()), "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict, *, resume_episodes: bool = True) -> None:
        """The statistics; with `resume_episodes` also the returns of the episodes in flight."""
        self.stats.load_state_dict(state["stats"])
        returns = state["returns"].numpy()
        if resume_episodes:
            if returns.shape != self.returns.shape:
                raise ValueError(f"RewardScaler.load_state_dict: saved for {returns.shape[0]} envs, this one scales "
                                 f"{self.returns.shape[0]}")
            self.returns[:] = returns
        else:
            self.returns[:] = 0.0


# ----------------------------------------------------------------------------- GAE
def compute_gae(rewards, values, next_values, terminated, truncated, gamma: float, lam: float):
    """Generalized advantage estimation over (T, N) arrays; returns (advantages, returns).

    `values[t]` is V(s_t) and `next_values[t]` is V of the observation that followed step t (the
    final observation when the episode ended there). A terminated step has no future value; a
    truncated one bootstraps from its final observation; either way the recursion stops there.
    """
    rewards, values, next_values = (np.asarray(a, dtype=np.float64) for a in (rewards, values, next_values))
    terminated, truncated = np.asarray(terminated, dtype=bool), np.asarray(truncated, dtype=bool)
    deltas = rewards + gamma * np.where(terminated, 0.0, next_values) - values
    carry = gamma * lam * ~(terminated | truncated)
    advantages = np.zeros_like(deltas)
    last = np.zeros_like(deltas[0])
    for t in reversed(range(deltas.shape[0])):
        last = deltas[t] + carry[t] * last
        advantages[t] = last
    return advantages, advantages + values


# ----------------------------------------------------------------------------- rollouts
MAX_ABS_REWARD = 1e12
"""The largest reward magnitude the collector accepts; a larger, infinite or NaN reward is a
ValueError at the step that produced it. Why a bound and why this one: the critic trains in
float32, where Adam squares the gradient, about 2 |V - R| |h| per parameter (R the value target, h
a layer input); that square overflows past 3.4e38, so |R| |h| must stay well below 1e19, or every
later critic step is silently 0 (an infinite second moment) or NaN. The targets are discounted sums
of rewards, |R| <~ |r| / (1 - gamma): 1e14 at gamma = 0.99 and 1e15 at 0.999 for |r| = 1e12, which
leaves four orders of magnitude for |h| and the batch sums. (The critic's fit checks its own result
too: see trpo_ext.critic.)"""


def check_rewards(rewards: np.ndarray, step: int, episode_lengths: np.ndarray) -> None:
    """ValueError naming the env, the step (1-based, in the rollout and in the episode, whose length
    so far is `episode_lengths`) and the value if any reward is non-finite or larger in magnitude
    than MAX_ABS_REWARD (NaN fails the comparison too)."""
    if np.abs(rewards).max(initial=0.0) <= MAX_ABS_REWARD:
        return
    i = int(np.flatnonzero(~(np.abs(rewards) <= MAX_ABS_REWARD))[0])
    raise ValueError(
        f"env {i} returned reward {float(rewards[i])!r} at step {step} of this rollout (step "
        f"{int(episode_lengths[i]) + 1} of its episode): rewards must be finite with |r| <= {MAX_ABS_REWARD:g} "
        "(trpo_ext.rollout.MAX_ABS_REWARD: the float32 critic's Adam squares its gradients); "
        "the agent's parameters and episode statistics were left unchanged")


def sample_actions(dist, generator: torch.Generator | None, deterministic: bool = False) -> torch.Tensor:
    """Actions from a custom policy's distribution: a Categorical (int64 classes) or a (possibly
    Independent) Normal (the unclipped sample).

    Drawn from the distribution's parameters with `generator`, not with `Distribution.sample`
    (which draws from torch's global RNG): a Categorical by `torch.multinomial` on its probabilities,
    a Normal as loc + scale * `torch.randn`. So a run's actions follow from the agent's own random
    stream, reproducibly from its seed and across save / load, and nothing else that uses the global
    RNG disturbs them. `generator=None` (what `predict` passes) uses the global RNG.
    `deterministic`: the mode (the most probable class, or the mean)."""
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if isinstance(base, Categorical):
        probs = base.probs
        if deterministic:
            return probs.argmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    if isinstance(base, Normal):
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        if deterministic:
            return loc.clone()
        return loc + scale * torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
    raise TypeError(f"the policy returned a {type(dist).__name__}; expected Categorical, Normal or "
                    "Independent(Normal)")


@dataclass
class Batch:
    """One rollout, flattened to (n_steps * n_envs, ...) tensors on the agent's device."""

    obs: torch.Tensor  # normalized observations the policy saw
    actions: torch.Tensor  # sampled (unclipped) actions
    advantages: torch.Tensor
    returns: torch.Tensor  # value targets
    values: torch.Tensor  # V(s) before the critic update, for explained variance


class EpisodeStats:
    """Returns and lengths of the episodes in flight and of the last `window` finished ones."""

    def __init__(self, n_envs: int, window: int):
        self.returns = np.zeros(n_envs)
        self.lengths = np.zeros(n_envs, dtype=np.int64)
        self.finished = deque(maxlen=window)

    def step(self, rewards: np.ndarray, done: np.ndarray) -> None:
        self.returns += rewards
        self.lengths += 1
        if done.any():
            for i in np.flatnonzero(done):
                self.finished.append((self.returns[i], int(self.lengths[i])))
            self.returns[done] = 0.0
            self.lengths[done] = 0

    def means(self, group=None) -> tuple[float, float]:
        """Mean return and length of the finished episodes in the window; with a process group,
        over every rank's window (one reduction)."""
        from . import distributed

        if group is not None:
            sums = torch.tensor([sum(r for r, _ in self.finished), sum(n for _, n in self.finished),
                                 len(self.finished)], dtype=torch.float64)
            total_return, total_length, count = distributed.all_reduce_sum_(sums, group).tolist()
            return (total_return / count, total_length / count) if count else (float("nan"), float("nan"))
        if not self.finished:
            return float("nan"), float("nan")
        r, n = zip(*self.finished)
        return float(np.mean(r)), float(np.mean(n))

    def state_dict(self) -> dict:
        """The episodes in flight and the finished ones in the window, as tensors and plain data."""
        return {"returns": torch.from_numpy(self.returns.copy()), "lengths": torch.from_numpy(self.lengths.copy()),
                "finished": [(float(r), int(n)) for r, n in self.finished]}

    def load_state_dict(self, state: dict) -> None:
        returns, lengths = state["returns"].numpy(), state["lengths"].numpy()
        if returns.shape != self.returns.shape or lengths.shape != self.lengths.shape:
            raise ValueError(f"EpisodeStats.load_state_dict: saved for {returns.shape[0]} envs, "
                             f"these stats track {self.returns.shape[0]}")
        self.returns[:], self.lengths[:] = returns, lengths
        self.finished.clear()
        self.finished.extend((float(r), int(n)) for r, n in state["finished"])


class RolloutCollector:
    """Steps a vector env `n_steps` times with batched policy inference and turns it into a `Batch`.

    Keeps the last observation between rollouts, so episodes continue across updates. Values are
    computed once per rollout in one batched forward pass (current, last and final observations).
    """

    def __init__(self, envs: gym.vector.VectorEnv, n_steps: int, device: torch.device,
                 normalizer: RunningNormalizer | None, stats: EpisodeStats,
                 reward_scaler: RewardScaler | None = None):
        self.envs, self.n_steps, self.device = envs, n_steps, device
        self.normalizer, self.stats, self.reward_scaler = normalizer, stats, reward_scaler
        self.n_envs = envs.num_envs
        self.obs_dim, kind = check_spaces(envs.single_observation_space, envs.single_action_space)
        space = envs.single_action_space
        self.discrete = kind == "categorical"
        self.action_shape = () if self.discrete else space.shape
        self.low = None if self.discrete else space.low.astype(np.float32)
        self.high = None if self.discrete else space.high.astype(np.float32)
        self.last_obs: np.ndarray | None = None
        self.env_failure: str | None = None  # what the vector env raised, once it has

    def _envs(self, call, *args, **kwargs):
        """envs.reset / envs.step, remembering a failure: a vector env whose worker raised (an
        AsyncVectorEnv shuts that worker down) cannot step again, and saying so beats the
        unrelated error its next call would give."""
        if self.env_failure is not None:
            raise RuntimeError(f"the environments failed in an earlier rollout ({self.env_failure}) and cannot "
                               "step again; the agent's networks are unchanged: save it, then TRPO.load(path, env=...) "
                               "with working envs")
        try:
            return getattr(self.envs, call)(*args, **kwargs)
        except Exception as exc:
            self.env_failure = f"{type(exc).__name__}: {exc}"
            raise

    def reset(self, seed: int | None) -> None:
        self.last_obs, _ = self._envs("reset", seed=seed)
        self.stats.returns[:] = 0.0
        self.stats.lengths[:] = 0
        if self.reward_scaler is not None:
            self.reward_scaler.returns[:] = 0.0

    def state_dict(self) -> dict:
        """What continues the rollouts exactly (given the same env states): the last observation,
        the episode statistics, the normalizer's statistics and the reward scaler's state (each None
        when not used)."""
        return {"last_obs": None if self.last_obs is None else torch.from_numpy(
                    np.asarray(self.last_obs, dtype=np.float64)),
                "stats": self.stats.state_dict(),
                "normalizer": None if self.normalizer is None else self.normalizer.state_dict(),
                "reward_scaler": None if self.reward_scaler is None else self.reward_scaler.state_dict()}

    def load_state_dict(self, state: dict, *, resume_episodes: bool = True) -> None:
        """Restores `state_dict()`. With `resume_episodes=False` only the normalizer's statistics
        are restored (the envs are other ones: their episodes start afresh with `reset`)."""
        if (state["normalizer"] is None) != (self.normalizer is None):
            raise ValueError("RolloutCollector.load_state_dict: the state was saved "
                             f"{'without' if state['normalizer'] is None else 'with'} observation normalization")
        if self.normalizer is not None:
            self.normalizer.load_state_dict(state["normalizer"])
        scaler = state.get("reward_scaler")  # absent in files written before reward normalization
        if (scaler is None) != (self.reward_scaler is None):
            raise ValueError("RolloutCollector.load_state_dict: the state was saved "
                             f"{'without' if scaler is None else 'with'} reward normalization")
        if self.reward_scaler is not None:
            self.reward_scaler.load_state_dict(scaler, resume_episodes=resume_episodes)
        if resume_episodes:
            self.stats.load_state_dict(state["stats"])
            self.last_obs = None if state["last_obs"] is None else \
                state["last_obs"].numpy().astype(self.envs.single_observation_space.dtype)

    def observe(self, obs: np.ndarray) -> torch.Tensor:
        """Raw observations -> float32 tensor on the device, normalized when enabled."""
        t = torch.as_tensor(obs, dtype=torch.float32, device=self.device)
        return t if self.normalizer is None else self.normalizer.normalize(t)

    @torch.no_grad()
    def act(self, policy, obs: np.ndarray, generator: torch.Generator | None = None, deterministic: bool = False,
            params: list[torch.Tensor] | None = None, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw observations (B, obs_dim) -> (the policy's input, actions).

        An `MLPPolicy` (`trpo_ext.fisher.fused_mlp`) takes one extension call: normalization as
        `observe`, the forward pass, and a sample (or the mode). Any other module: `observe`, then
        `policy(obs)` and `sample_actions` on its distribution (drawn with `generator`).
        `params`: `list(policy.parameters())`, when the caller has it at hand (it costs a module walk);
        `fused`: whether `fused_mlp(policy)` holds, likewise."""
        if fused is None:
            fused = fused_mlp(policy) is not None
        if not fused:
            policy_obs = self.observe(obs)
            return policy_obs, sample_actions(policy(policy_obs), generator, deterministic)
        obs = torch.as_tensor(obs, device=self.device)
        mean = inv_std = None
        clip = 1.0
        if self.normalizer is not None:
            mean, inv_std = self.normalizer.tensors(obs.device)  # obs.device has an index; self.device may not
            clip = self.normalizer.clip
        return _ops.mlp_act(obs, list(policy.parameters()) if params is None else params, kind=policy.kind,
                            activation=policy.activation, deterministic=deterministic, generator=generator,
                            obs_mean=mean, obs_inv_std=inv_std, obs_clip=clip)

    def env_actions(self, actions: torch.Tensor) -> np.ndarray:
        """Sampled actions as the env takes them: Box actions clipped to the bounds."""
        a = actions.cpu().numpy()
        if self.discrete:
            return a
        # In place on a fresh array: `actions` (the unclipped sample) must stay as it was.
        a = a.copy() if actions.device.type == "cpu" else a
        np.maximum(a, self.low, out=a)
        return np.minimum(a, self.high, out=a)

    @torch.no_grad()
    def collect(self, policy, value_fn, generator: torch.Generator, gamma: float, lam: float) -> Batch:
        T, N = self.n_steps, self.n_envs
        obs_steps, act_steps = [], []  # stacked once at the end: cheaper than T indexed copies
        rewards = np.empty((T, N))
        terminated = np.empty((T, N), dtype=bool)
        truncated = np.empty((T, N), dtype=bool)
        final_obs = []  # (t, env, observation) where an episode was truncated

        obs = self.last_obs
        params = list(policy.parameters())
        fused = fused_mlp(policy) is not None
        for t in range(T):
            # Each observation is checked once, before it can reach the statistics or the policy.
            if not np.isfinite(obs).all():
                raise ValueError("the environment returned a non-finite observation; "
                                 "the agent's parameters and observation statistics were left unchanged")
            if self.normalizer is not None:
                # Every observation enters the statistics before the policy sees it, one step at a
                # time (as sb3's VecNormalize does). Updating once per rollout instead lags the
                # statistics by a rollout and learned far worse on HalfCheetah-v5 (bench/README.md).
                self.normalizer.update(obs)
            policy_obs, actions = self.act(policy, obs, generator, params=params, fused=fused)
            obs_steps.append(policy_obs)
            act_steps.append(actions)
            obs, rewards[t], terminated[t], truncated[t], infos = self._envs("step", self.env_actions(actions))
            check_rewards(rewards[t], t + 1, self.stats.lengths)  # before the statistics see them
            done = terminated[t] | truncated[t]
            self.stats.step(rewards[t], done)  # the episode statistics keep the raw rewards
            if self.reward_scaler is not None:
                rewards[t] = self.reward_scaler(rewards[t], done)
            if truncated[t].any():
                final = infos["final_obs"]
                final_obs += [(t, i, final[i]) for i in np.flatnonzero(truncated[t])]
        self.last_obs = obs

        # The observation after the last step and the truncated episodes' final observations (the
        # rewards were checked step by step).
        if not (np.isfinite(obs).all() and all(np.isfinite(o).all() for _, _, o in final_obs)):
            raise ValueError("the environment returned a non-finite observation; "
                             "the agent's parameters were left unchanged")

        # One value pass: all rollout observations, the observation after the last step, final observations.
        extra = [obs] + [o[None] for _, _, o in final_obs]
        extra = self.observe(np.concatenate(extra).astype(np.float32))
        obs_buf = torch.cat(obs_steps)  # (T * N, obs_dim), step-major like the (T, N) arrays
        all_values = value_fn(torch.cat([obs_buf, extra])).cpu().numpy().astype(np.float64)
        values = all_values[: T * N].reshape(T, N)
        next_values = np.concatenate([values[1:], all_values[T * N: T * N + N][None]])
        for k, (t, i, _) in enumerate(final_obs):
            next_values[t, i] = all_values[T * N + N + k]
        advantages, returns = compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam)

        def flat(a):
            return torch.as_tensor(a.reshape(T * N), dtype=torch.float32, device=self.device)

        return Batch(obs=obs_buf, actions=torch.cat(act_steps),
                     advantages=flat(advantages), returns=flat(returns), values=flat(values))

