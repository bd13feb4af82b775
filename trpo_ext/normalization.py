"""Running statistics of what the envs return: observation normalization (`RunningNormalizer`)
and reward scaling (`RewardScaler`), both merged across data-parallel ranks once per rollout.
"""
from __future__ import annotations

import numpy as np
import torch


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

    def snapshot(self) -> tuple:
        """Everything `update` and `sync` change, for `restore` (a refused rollout is undone)."""
        return self.count, self.mean.copy(), self.var.copy(), self._since_sync

    def restore(self, snapshot: tuple) -> None:
        count, mean, var, self._since_sync = snapshot  # the tuples in _since_sync are replaced, never written
        self.count, self.mean, self.var = count, mean.copy(), var.copy()
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

    def snapshot(self) -> tuple:
        """The returns in flight and the statistics, for `restore` (RunningNormalizer.snapshot)."""
        return self.returns.copy(), self.stats.snapshot()

    def restore(self, snapshot: tuple) -> None:
        returns, stats = snapshot
        self.returns = returns.copy()
        self.stats.restore(stats)

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
