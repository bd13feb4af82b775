"""Rollouts and GAE: what turns a vector env (`trpo_ext.envs`) into the batch of one policy update,
with the episode statistics and the reward check on the way.

The collector steps a SAME_STEP-autoreset vector env: a truncated episode's last observation, to
bootstrap from, arrives in `infos["final_obs"]`. Every value the envs return is checked once, as it
arrives (observations: `ObservationCodec.problem`; the step's form and types: `trpo_ext.envs`;
rewards: `check_rewards`), and a refused value undoes the rollout (`RolloutCollector.collect`).
"""
from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch

from . import spaces
from .action_masks import ActionMasks
from .envs import EnvStepError, LeanSyncVectorEnv, batch_problem
from .inference import Inference
from .normalization import RewardScaler, RunningNormalizer
from .policies import fused_spec
from .recurrent import is_recurrent
from .recurrent_rollout import RecurrentMemory


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


DISCARDED = ("the rollout was discarded: the agent's networks, its observation, reward and episode statistics "
             "and its random stream are as they were before it, and these envs cannot step again")
"""What a refusal during a rollout leaves (`RolloutCollector.collect` puts the state back)."""


class RolloutRefused(ValueError):
    """The envs returned a value the rollout refuses; `cause` says which (the message adds what
    state the refusal left)."""

    def __init__(self, cause: str, left: str = DISCARDED):
        super().__init__(f"{cause}; {left}")
        self.cause = cause


def check_rewards(rewards: np.ndarray, step: int, episode_lengths: np.ndarray) -> None:
    """RolloutRefused naming the env, the step (1-based, in the rollout and in the episode, whose
    length so far is `episode_lengths`) and the value if any reward is non-finite or larger in
    magnitude than MAX_ABS_REWARD (NaN fails the comparison too). The collector calls it only where
    its quick test (`RolloutCollector.reward_test`) does not pass the rewards."""
    if np.maximum.reduce(np.abs(rewards)) <= MAX_ABS_REWARD:
        return
    i = int(np.flatnonzero(~(np.abs(rewards) <= MAX_ABS_REWARD))[0])
    raise RolloutRefused(
        f"env {i} returned reward {float(rewards[i])!r} at step {step} of this rollout (step "
        f"{int(episode_lengths[i]) + 1} of its episode): rewards must be finite with |r| <= {MAX_ABS_REWARD:g} "
        "(trpo_ext.rollout.MAX_ABS_REWARD: the float32 critic's Adam squares its gradients)")


@dataclass
class Batch:
    """One rollout, flattened to (n_steps * n_envs, ...) tensors on the agent's device."""

    obs: object  # the policy's input (normalized): a tensor, or a dict of them (trpo_ext.spaces)
    actions: torch.Tensor  # sampled (unclipped) actions
    advantages: torch.Tensor
    returns: torch.Tensor  # value targets
    values: torch.Tensor  # V(s) before the critic update, for explained variance
    action_masks: torch.Tensor | None = None  # (N, logits) bool, True = allowed; None without masks
    # A recurrent critic's input and targets when they are not obs and returns (trpo_ext.recurrent_rollout)
    critic_obs: object = None
    critic_returns: torch.Tensor | None = None

    def critic_batch(self) -> tuple:
        """The critic's (input, targets): critic_obs and critic_returns where set, else obs and returns."""
        return (self.obs, self.returns) if self.critic_obs is None else (self.critic_obs, self.critic_returns)


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

    def snapshot(self) -> tuple:
        """What `restore` puts back: a copy of the episodes in flight and of the window (once per
        rollout, a thirtieth of `state_dict`'s cost)."""
        return self.returns.copy(), self.lengths.copy(), self.finished.copy()

    def restore(self, snapshot: tuple) -> None:
        returns, lengths, finished = snapshot
        self.returns[:], self.lengths[:] = returns, lengths
        self.finished.clear()
        self.finished.extend(finished)

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
    """Steps a vector env `n_steps` times with batched policy inference (its `inference`, which the
    agent's `predict` uses too) and turns it into a `Batch`.

    Keeps the last observation (and its action masks) between rollouts, so episodes continue
    across updates. Values are computed once per rollout in one batched forward pass (current,
    last and final observations).
    """

    def __init__(self, envs: gym.vector.VectorEnv, n_steps: int, device: torch.device,
                 normalizer: RunningNormalizer | None, stats: EpisodeStats,
                 reward_scaler: RewardScaler | None = None):
        self.inference = Inference(envs.single_observation_space, envs.single_action_space, device, normalizer)
        self.codec, self.device, self.normalizer = self.inference.codec, device, normalizer
        self.envs, self.n_steps, self.n_envs = envs, n_steps, envs.num_envs
        self.stats, self.reward_scaler = stats, reward_scaler
        self.masks = ActionMasks(envs, self.inference.action)
        self.last_obs = None  # a raw batch (an array, or a dict of arrays)
        self.last_masks: np.ndarray | None = None
        self.env_failure: str | None = None  # what the vector env raised, once it has
        self.on_step = None  # on_step(t, obs, rewards, terminated, truncated, infos) after each env step (trpo_ext.sb3)
        # The batched rewards and flags of a vector env that is not ours (LeanSyncVectorEnv makes them
        # from its sub-envs' checked values) are checked as batches.
        self.check_batch = not isinstance(envs, LeanSyncVectorEnv)
        # Rewards whose bits pass this (every |r| < 2^39) need no `check_rewards`: a third of its cost per step
        self.reward_test = spaces.magnitude_test(np.dtype(np.float64), self.n_envs, MAX_ABS_REWARD)
        self.memory = RecurrentMemory(self.n_envs, device)  # used by recurrent policies only

    def _refused(self, problem: tuple, step: int | None) -> RolloutRefused:
        """The refusal of what the envs returned at `step` of this rollout (None: at reset);
        `problem` is (env index or None, field, got, expected). The envs cannot step again."""
        env, field, got, expected = problem
        who = "the vector env" if env is None else f"env {env}"
        when = "at reset" if step is None else f"at step {step} of this rollout" + (
            "" if env is None else f" (step {int(self.stats.lengths[env]) + 1} of its episode)")
        left = "the agent is unchanged, and these envs cannot step again" if step is None else DISCARDED
        refusal = RolloutRefused(f"{who} {when}: {field} {got}; expected {expected}", left)
        self.env_failure = refusal.cause
        return refusal

    def _envs(self, step: int | None, arg) -> tuple:
        """envs.reset(seed=arg) (`step` None) or envs.step(arg) at `step` of this rollout, every value
        it returned checked (a RolloutRefused naming the env, the step and the field otherwise).

        A failure is remembered: a vector env whose worker raised (an AsyncVectorEnv shuts that worker
        down), or whose values were refused, cannot step again, and saying so beats the unrelated error
        its next call would give."""
        if self.env_failure is not None:
            raise RuntimeError(f"the environments failed in an earlier rollout ({self.env_failure}) and cannot "
                               "step again; the agent's networks are unchanged: save it, then TRPO.load(path, env=...) "
                               "with working envs")
        try:
            out = self.envs.reset(seed=arg) if step is None else self.envs.step(arg)
        except EnvStepError as exc:  # what a sub-env returned (trpo_ext.envs)
            raise self._refused((exc.env, exc.field, exc.got, exc.expected), step) from None
        except Exception as exc:
            self.env_failure = f"{type(exc).__name__}: {exc}"
            raise
        if type(out) is not tuple or len(out) != (2 if step is None else 5):
            raise self._refused((None, "its return", f"is {spaces.shown(out)}", "gymnasium's (obs, infos)" if step
                                 is None else "gymnasium's (obs, rewards, terminations, truncations, infos)"), step)
        problem = self.codec.problem(out[0])
        if self.check_batch and problem is None and step is not None:
            problem = batch_problem(*out[1:4], self.n_envs)
        if problem is not None:
            raise self._refused(problem, step)
        return out

    def reset(self, seed: int | None) -> None:
        self.last_obs, infos = self._envs(None, seed)
        self.last_masks = self.masks.start(infos)
        self.memory.reset()
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
                "reward_scaler": None if self.reward_scaler is None else self.reward_scaler.state_dict(),
                "memory": self.memory.state_dict()}

    def load_state_dict(self, state: dict, *, resume_episodes: bool = True) -> None:
        """Restores `state_dict()`. With `resume_episodes=False` only the normalizer's statistics
        are restored (the envs are other ones: their episodes start afresh with `reset`)."""
        if (state["normalizer"] is None) != (self.normalizer is None):
            raise ValueError("RolloutCollector.load_state_dict: the state was saved "
                             f"{'without' if state['normalizer'] is None else 'with'} observation normalization")
        if self.normalizer is not None:
            self.normalizer.load_state_dict(state["normalizer"])
        scaler = state["reward_scaler"]
        if (scaler is None) != (self.reward_scaler is None):
            raise ValueError("RolloutCollector.load_state_dict: the state was saved "
                             f"{'without' if scaler is None else 'with'} reward normalization")
        if self.reward_scaler is not None:
            self.reward_scaler.load_state_dict(scaler, resume_episodes=resume_episodes)
        if resume_episodes:
            self.stats.load_state_dict(state["stats"])
            self.last_obs = None if state["last_obs"] is None else self.codec.raw_from_state(state["last_obs"])
            masks = state["last_masks"]
            self.last_masks = None if masks is None else masks.numpy().copy()
            self.masks.source = state["mask_source"]
            if state.get("memory") is not None:  # None in files of older versions: zero states
                self.memory.load_state_dict(state["memory"])
            else:
                self.memory.reset()

    def collect(self, policy, value_fn, generator: torch.Generator, gamma: float, lam: float) -> Batch:
        """One rollout of `n_steps` steps of every env -> a `Batch`.

        A value the envs return that their spaces or gymnasium's API do not allow, or a reward
        `check_rewards` refuses, is a `RolloutRefused` (a ValueError) naming the env, the step and
        the field; it, or any other error, puts the collector's state (last observation and masks,
        observation, reward and episode statistics) and `generator` back as they were before the
        rollout. After a refusal the envs cannot step again (`env_failure`)."""
        saved = (self.last_obs, self.last_masks, self.stats.snapshot(), generator.get_state(),
                 None if self.normalizer is None else self.normalizer.snapshot(),
                 None if self.reward_scaler is None else self.reward_scaler.snapshot(), self.memory.snapshot())
        try:
            return self._collect(policy, value_fn, generator, gamma, lam)
        except BaseException as exc:
            if isinstance(exc, RolloutRefused):
                self.env_failure = exc.cause
            self.last_obs, self.last_masks, stats, rng, normalizer, scaler, memory = saved
            self.memory.restore(memory)
            self.stats.restore(stats)
            generator.set_state(rng)
            if normalizer is not None:
                self.normalizer.restore(normalizer)
            if scaler is not None:
                self.reward_scaler.restore(scaler)
            raise

    @torch.no_grad()
    def _collect(self, policy, value_fn, generator: torch.Generator, gamma: float, lam: float) -> Batch:
        T, N = self.n_steps, self.n_envs
        obs_steps, act_steps, mask_steps = [], [], []  # stacked once at the end: cheaper than T indexed copies
        rewards = np.empty((T, N))
        terminated = np.empty((T, N), dtype=bool)
        truncated = np.empty((T, N), dtype=bool)
        final_obs = []  # (t, env, observation) where an episode was truncated

        obs, masks = self.last_obs, self.last_masks
        params = list(policy.parameters())
        fused = fused_spec(policy) is not None
        memory = self.memory if is_recurrent(policy) else None
        observe = self.inference.observe if memory is None else self.inference.observe_rows  # packed for an RNN
        if memory is not None:
            memory.begin(policy, value_fn)
        reward_test, from_bytes, byteorder = self.reward_test, int.from_bytes, sys.byteorder  # locals: every step
        for t in range(T):
            # Each observation was checked as it arrived (reset, or the step before), before it can
            # reach the statistics or the policy.
            if self.normalizer is not None:
                # Every observation enters the statistics before the policy sees it, one step at a
                # time (as sb3's VecNormalize does): once per rollout lags them by a rollout and
                # learns worse (docs/benchmarks.md).
                self.normalizer.update(self.codec.norm_features(obs))
            mask_t = self.inference.mask_tensor(masks)
            self.inference.before_step(policy, t, N, generator)  # gSDE's noise schedule
            if memory is None:
                policy_obs, actions = self.inference.act(policy, obs, generator, params=params, fused=fused,
                                                         masks=mask_t)
            else:
                policy_obs = observe(obs)
                actions = memory.act(self.inference, policy, policy_obs, generator, mask_t)
            obs_steps.append(policy_obs)
            act_steps.append(actions)
            if mask_t is not None:
                mask_steps.append(mask_t)
            obs, rewards[t], terminated[t], truncated[t], infos = self._envs(t + 1, self.inference.env_actions(actions))
            try:
                masks = self.masks.after_step(infos)
            except ValueError as e:  # a mask no action passes: which step, and what the refusal left
                raise RolloutRefused(f"at step {t + 1} of this rollout: {e}") from None
            if reward_test is None or ((from_bytes(rewards[t].tobytes(), byteorder) & reward_test[0])
                                       + reward_test[1]) & reward_test[2]:  # spaces.magnitude_test
                check_rewards(rewards[t], t + 1, self.stats.lengths)  # before the statistics see them
            if truncated[t].any():  # the final observations to bootstrap from
                final = infos["final_obs"]
                for i in np.flatnonzero(truncated[t]):
                    problem = self.codec.problem(final[i], batch=False, name="final observation")
                    if problem is not None:
                        raise self._refused((i, *problem[1:]), t + 1)
                    final_obs.append((t, i, final[i]))
            done = terminated[t] | truncated[t]
            if memory is not None:
                ended = [(i, o) for step, i, o in final_obs if step == t]
                memory.after_step(t, done, [i for i, _ in ended],
                                  observe(self.codec.batch_raw([o for _, o in ended])) if ended else None)
            self.stats.step(rewards[t], done)  # the episode statistics keep the raw rewards
            if self.on_step is not None:  # an exception it raises discards the rollout, as any error here does
                self.on_step(t, obs, rewards[t], terminated[t], truncated[t], infos)
            if self.reward_scaler is not None:
                rewards[t] = self.reward_scaler(rewards[t], done)
        self.last_obs, self.last_masks = obs, masks

        obs_buf = spaces.cat(obs_steps)  # (T * N, ...), step-major like the (T, N) arrays
        if memory is not None and memory.recurrent_critic:  # the critic stepped with the policy
            values, next_values = memory.critic_values(observe(obs))
        else:
            # The observation after the last step and the truncated episodes' final observations.
            extra = obs if not final_obs else self.codec.concat_raw([obs, self.codec.batch_raw([o for *_, o in final_obs])])
            # One value pass: all rollout observations, the observation after the last step, final observations.
            all_values = value_fn(spaces.cat([obs_buf, observe(extra)])).cpu().numpy().astype(np.float64)
            values = all_values[: T * N].reshape(T, N)
            next_values = np.concatenate([values[1:], all_values[T * N: T * N + N][None]])
            for k, (t, i, _) in enumerate(final_obs):
                next_values[t, i] = all_values[T * N + N + k]
        advantages, returns = compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam)

        def flat(a):
            return torch.as_tensor(a.reshape(T * N), dtype=torch.float32, device=self.device)

        batch = Batch(obs=obs_buf, actions=torch.cat(act_steps),
                      advantages=flat(advantages), returns=flat(returns), values=flat(values),
                      action_masks=torch.cat(mask_steps) if mask_steps else None)
        if memory is not None:  # the update runs on whole sequences
            batch.critic_obs, batch.critic_returns = (memory.critic_sequences(obs_buf, batch.returns)
                                                      if memory.recurrent_critic else (obs_buf, batch.returns))
            batch.obs = memory.policy_sequences(obs_buf)
        return batch
