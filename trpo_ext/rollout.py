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

from . import _ops, spaces
from .distributions import ActionSpec, action_spec, masked, sample_actions
from .policies import fused_spec


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


@dataclass
class Batch:
    """One rollout, flattened to (n_steps * n_envs, ...) tensors on the agent's device."""

    obs: object  # the policy's input (normalized): a tensor, or a dict of them (trpo_ext.spaces)
    actions: torch.Tensor  # sampled (unclipped) actions
    advantages: torch.Tensor
    returns: torch.Tensor  # value targets
    values: torch.Tensor  # V(s) before the critic update, for explained variance
    action_masks: torch.Tensor | None = None  # (N, logits) bool, True = allowed; None without masks


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


class ActionMasks:
    """Where an env's invalid-action masks come from, decided at the first reset: an `action_masks()`
    method of each sub-env (reached through its wrappers, as sb3-contrib's MaskablePPO calls it),
    else `info["action_mask"]` (of reset and of every step), else none (every action valid)."""

    def __init__(self, envs: gym.vector.VectorEnv, spec: ActionSpec):
        self.envs, self.spec = envs, spec
        self.source: str | None = None  # "method", "info" or None

    def start(self, infos: dict) -> np.ndarray | None:
        """At a reset: picks the source, returns the first masks (or None)."""
        self.source = None
        if not self.spec.maskable:
            return None
        # Asked through has_wrapper_attr: a failing call would shut an AsyncVectorEnv's worker down.
        if all(self.envs.call("has_wrapper_attr", "action_masks")):
            self.source = "method"
            return self._checked(self.envs.call("action_masks"))
        if "action_mask" in infos:
            self.source = "info"
            return self._checked(infos["action_mask"])
        return None

    def after_step(self, infos: dict) -> np.ndarray | None:
        if self.source == "method":
            return self._checked(self.envs.call("action_masks"))
        if self.source == "info":
            if "action_mask" not in infos:
                raise ValueError("the env gave info['action_mask'] at reset but not after a step; every step's "
                                 "info must carry the mask of the observation it returns")
            return self._checked(infos["action_mask"])
        return None

    def _checked(self, masks) -> np.ndarray:
        return self.spec.check_mask(np.stack([np.asarray(m).reshape(-1) for m in masks]),
                                    f"the env's action masks ({self.source or 'action_masks()'})")


def single_env_masks(env: gym.Env, info: dict, spec: ActionSpec) -> np.ndarray | None:
    """The action masks (1, logits) of one env's current observation, found as `ActionMasks` finds
    them (an `action_masks()` method, else info["action_mask"]), or None."""
    if not spec.maskable:
        return None
    mask = env.get_wrapper_attr("action_masks")() if env.has_wrapper_attr("action_masks") else info.get("action_mask")
    return None if mask is None else spec.check_mask(np.asarray(mask).reshape(1, -1), "the env's action mask")


class RolloutCollector:
    """Steps a vector env `n_steps` times with batched policy inference and turns it into a `Batch`.

    Keeps the last observation (and its action masks) between rollouts, so episodes continue
    across updates. Values are computed once per rollout in one batched forward pass (current,
    last and final observations).
    """

    def __init__(self, envs: gym.vector.VectorEnv, n_steps: int, device: torch.device,
                 normalizer: RunningNormalizer | None, stats: EpisodeStats,
                 reward_scaler: RewardScaler | None = None):
        self.envs, self.n_steps, self.device = envs, n_steps, device
        self.normalizer, self.stats, self.reward_scaler = normalizer, stats, reward_scaler
        self.n_envs = envs.num_envs
        self.codec = spaces.ObservationCodec(envs.single_observation_space)
        self.action = action_spec(envs.single_action_space)
        self.masks = ActionMasks(envs, self.action)
        self.last_obs = None  # a raw batch (an array, or a dict of arrays)
        self.last_masks: np.ndarray | None = None
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
        self.last_obs, infos = self._envs("reset", seed=seed)
        self.last_masks = self.masks.start(infos)
        self.stats.returns[:] = 0.0
        self.stats.lengths[:] = 0
        if self.reward_scaler is not None:
            self.reward_scaler.returns[:] = 0.0

    def state_dict(self) -> dict:
        """What continues the rollouts exactly (given the same env states): the last observation and
        its masks, the episode statistics, the normalizer's statistics and the reward scaler's state
        (each None when not used)."""
        return {"last_obs": None if self.last_obs is None else self.codec.raw_to_state(self.last_obs),
                "last_masks": None if self.last_masks is None else torch.from_numpy(self.last_masks.copy()),
                "mask_source": self.masks.source,
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
            self.last_obs = None if state["last_obs"] is None else self.codec.raw_from_state(state["last_obs"])
            masks = state.get("last_masks")  # absent in files written before action masks
            self.last_masks = None if masks is None else masks.numpy().copy()
            self.masks.source = state.get("mask_source")

    def observe(self, obs) -> object:
        """A raw batch -> the policy's input on the device (`ObservationCodec.preprocess`),
        normalized when enabled."""
        return self.codec.preprocess(obs, self.device, self.normalizer)

    def mask_tensor(self, masks: np.ndarray | None) -> torch.Tensor | None:
        return None if masks is None else torch.as_tensor(masks, device=self.device)

    @torch.no_grad()
    def act(self, policy, obs, generator: torch.Generator | None = None, deterministic: bool = False,
            params: list[torch.Tensor] | None = None, fused: bool | None = None,
            masks: torch.Tensor | None = None) -> tuple[object, torch.Tensor]:
        """A raw batch -> (the policy's input, actions), never an action `masks` (bool (B, logits),
        True = allowed) rules out.

        An `MLPPolicy` (`trpo_ext.policies.fused_spec`) takes one extension call: (for a 1-D Box
        observation) normalization as `observe`, the forward pass, and a sample (or the mode). Any
        other module: `observe`, then `policy(obs)`, masked, and `sample_actions` on its
        distribution (drawn with `generator`). `params`: `list(policy.parameters())`, when the caller
        has it at hand (it costs a module walk); `fused`: whether `fused_spec(policy)` holds, likewise."""
        spec = fused_spec(policy) if fused is None or fused else None
        if spec is None:
            policy_obs = self.observe(obs)
            return policy_obs, sample_actions(masked(policy(policy_obs), masks), generator, deterministic)
        mean = inv_std = None
        clip = 1.0
        if not self.codec.plain_box:  # preprocessed in Python (one-hot, flattened); the op runs the network
            x = self.observe(obs)
        else:
            x = torch.as_tensor(obs, device=self.device)
            if self.normalizer is not None:
                mean, inv_std = self.normalizer.tensors(x.device)  # x.device has an index; self.device may not
                clip = self.normalizer.clip
        return _ops.mlp_act(x, list(policy.parameters()) if params is None else params, deterministic=deterministic,
                            generator=generator, obs_mean=mean, obs_inv_std=inv_std, obs_clip=clip,
                            **spec.op_kwargs(action_mask=masks))

    def env_actions(self, actions: torch.Tensor) -> np.ndarray:
        """Sampled actions as the env takes them (`ActionSpec.env_action`)."""
        return self.action.env_action(actions)

    @torch.no_grad()
    def collect(self, policy, value_fn, generator: torch.Generator, gamma: float, lam: float) -> Batch:
        T, N = self.n_steps, self.n_envs
        obs_steps, act_steps, mask_steps = [], [], []  # stacked once at the end: cheaper than T indexed copies
        rewards = np.empty((T, N))
        terminated = np.empty((T, N), dtype=bool)
        truncated = np.empty((T, N), dtype=bool)
        final_obs = []  # (t, env, observation) where an episode was truncated

        obs, masks = self.last_obs, self.last_masks
        params = list(policy.parameters())
        fused = fused_spec(policy) is not None
        for t in range(T):
            # Each observation is checked once, before it can reach the statistics or the policy.
            self.codec.check(obs)
            if self.normalizer is not None:
                # Every observation enters the statistics before the policy sees it, one step at a
                # time (as sb3's VecNormalize does). Updating once per rollout instead lags the
                # statistics by a rollout and learned far worse on HalfCheetah-v5 (bench/README.md).
                self.normalizer.update(self.codec.norm_features(obs))
            mask_t = self.mask_tensor(masks)
            policy_obs, actions = self.act(policy, obs, generator, params=params, fused=fused, masks=mask_t)
            obs_steps.append(policy_obs)
            act_steps.append(actions)
            if mask_t is not None:
                mask_steps.append(mask_t)
            obs, rewards[t], terminated[t], truncated[t], infos = self._envs("step", self.env_actions(actions))
            masks = self.masks.after_step(infos)
            check_rewards(rewards[t], t + 1, self.stats.lengths)  # before the statistics see them
            done = terminated[t] | truncated[t]
            self.stats.step(rewards[t], done)  # the episode statistics keep the raw rewards
            if self.reward_scaler is not None:
                rewards[t] = self.reward_scaler(rewards[t], done)
            if truncated[t].any():
                final = infos["final_obs"]
                final_obs += [(t, i, final[i]) for i in np.flatnonzero(truncated[t])]
        self.last_obs, self.last_masks = obs, masks

        # The observation after the last step and the truncated episodes' final observations (the
        # rewards were checked step by step).
        extra = obs if not final_obs else self.codec.concat_raw([obs, self.codec.batch_raw([o for *_, o in final_obs])])
        self.codec.check(extra)

        # One value pass: all rollout observations, the observation after the last step, final observations.
        obs_buf = spaces.cat(obs_steps)  # (T * N, ...), step-major like the (T, N) arrays
        all_values = value_fn(spaces.cat([obs_buf, self.observe(extra)])).cpu().numpy().astype(np.float64)
        values = all_values[: T * N].reshape(T, N)
        next_values = np.concatenate([values[1:], all_values[T * N: T * N + N][None]])
        for k, (t, i, _) in enumerate(final_obs):
            next_values[t, i] = all_values[T * N + N + k]
        advantages, returns = compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam)

        def flat(a):
            return torch.as_tensor(a.reshape(T * N), dtype=torch.float32, device=self.device)

        return Batch(obs=obs_buf, actions=torch.cat(act_steps),
                     advantages=flat(advantages), returns=flat(returns), values=flat(values),
                     action_masks=torch.cat(mask_steps) if mask_steps else None)
