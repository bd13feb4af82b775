"""Policy inference, one home for the rollout and for `TRPO.predict` / `evaluate`: raw observations
(as the envs return them) -> the policy's input -> actions -> the form the env takes.
"""
from __future__ import annotations

import numpy as np
import torch

from . import _ops, spaces
from .action_masks import single_env_masks
from .distributions import action_spec, masked, sample_actions
from .envs import reset_problem, step_problem
from .normalization import RunningNormalizer
from .policies import fused_spec
from .recurrent import is_recurrent
from .sde import SDEPolicy


class Inference:
    """Runs a policy on raw observations of `observation_space` for actions of `action_space`, on
    `device`, normalizing observations with `normalizer` when one is given (`RolloutCollector` is
    one, stepping envs with it; the agent holds another for `predict`)."""

    def __init__(self, observation_space, action_space, device: torch.device,
                 normalizer: RunningNormalizer | None = None):
        self.codec = spaces.ObservationCodec(observation_space)
        self.action = action_spec(action_space)
        self.device, self.normalizer = device, normalizer

    def observe(self, obs) -> object:
        """A raw batch -> the policy's input on the device (`ObservationCodec.preprocess`),
        normalized when enabled."""
        return self.codec.preprocess(obs, self.device, self.normalizer)

    def observe_rows(self, obs) -> torch.Tensor:
        """A raw batch -> `observe`'s input packed into one (B, packed_dim) tensor (`spaces.pack`): what
        a recurrent policy (and the critic beside it) reads, one row per step of its sequences."""
        return spaces.pack(self.observe(obs))[0]

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

    @torch.no_grad()
    def recurrent_actions(self, policy, policy_obs: torch.Tensor, state: tuple, episode_start: torch.Tensor,
                          generator: torch.Generator | None = None, deterministic: bool = False,
                          masks: torch.Tensor | None = None) -> tuple[torch.Tensor, tuple]:
        """One step of a recurrent policy (`trpo_ext.recurrent`) on the policy's input (B, D) from
        `state`, reset where `episode_start` (B,) bool: (actions, the new state)."""
        out, state = policy.step(policy_obs, state, episode_start)
        return sample_actions(masked(policy.distribution(out), masks), generator, deterministic), state

    @staticmethod
    def before_step(policy, t: int, n: int, generator: torch.Generator) -> None:
        """What sampling needs before step t of a rollout of n envs: gSDE's noise schedule
        (`SDEPolicy.rollout_step`); nothing for any other policy."""
        if isinstance(policy, SDEPolicy):
            policy.rollout_step(t, n, generator)

    def env_actions(self, actions: torch.Tensor) -> np.ndarray:
        """Sampled actions as the env takes them (`ActionSpec.env_action`)."""
        return self.action.env_action(actions)

    def predict(self, policy, observation, deterministic: bool = False, action_masks=None, state=None,
                episode_start=None) -> tuple[np.ndarray, tuple | None]:
        """`TRPO.predict`'s (actions in the env's form, state) for one raw observation or a batch
        (what it takes: its docstring); ValueError, before the policy runs, for the `(obs, info)` tuple
        `reset()` returns, an observation that does not fit the space (shape, dtype, NaN / inf,
        Discrete / MultiDiscrete / MultiBinary / image ranges: `ObservationCodec.problem`), masks or
        (a recurrent policy) a state or episode_start that do not fit. Nothing is changed before the
        checks pass. The state is None for a feed-forward policy."""
        if isinstance(observation, tuple) and len(observation) == 2 and isinstance(observation[1], dict):
            raise ValueError("predict got the (obs, info) tuple that env.reset() returns; pass the observation: "
                             "obs, info = env.reset()")
        obs, single = self.codec.raw_single(observation)
        problem = self.codec.problem(obs, name="obs")
        if problem is not None:
            row, field, got, expected = problem
            where = "" if single or row is None else f" (row {row} of the batch)"
            raise ValueError(f"{field}{where} {got}; expected {expected}")
        if self.codec.plain_box:
            obs = obs.astype(np.float32)
        masks = None
        if action_masks is not None:
            n = self.codec.raw_len(obs)
            masks = np.asarray(action_masks)
            masks = self.action.check_mask(masks[None] if single and masks.ndim == 1 else masks)
            if masks.shape[0] != n:
                raise ValueError(f"action_masks has {masks.shape[0]} rows for {n} observations")
        if is_recurrent(policy):
            n = self.codec.raw_len(obs)
            state, starts = _recurrent_inputs(policy, state, episode_start, n, self.device)
            actions, state = self.recurrent_actions(policy, self.observe_rows(obs), state, starts,
                                                    deterministic=deterministic, masks=self.mask_tensor(masks))
            state = tuple(s.cpu().numpy() for s in state)
        else:
            state = None
            _, actions = self.act(policy, obs, deterministic=deterministic, masks=self.mask_tensor(masks))
        actions = self.env_actions(actions)
        return (actions[0] if single else actions), state

    def episodes(self, policy, env, n_episodes: int, deterministic: bool, seed: int, limit: int) -> tuple[list, int]:
        """`TRPO.evaluate`'s episodes on one env: (their returns, how many were cut at `limit` steps).
        Episode i is reset with `seed + i`; each reset's and step's return is checked as in training
        (`trpo_ext.envs.step_problem`): a ValueError names the episode, the step and the field."""
        returns, cut = [], 0
        for episode in range(n_episodes):
            out, step = env.reset(seed=seed + episode), 0
            _refuse(reset_problem(out, self.codec), episode, step)
            obs, info = out
            total, done, state = 0.0, False, None
            while not done and step < limit:
                masks = single_env_masks(env, info, self.action)  # None when the env has none
                action, state = self.predict(policy, obs, deterministic, masks, state, step == 0)
                out, step = env.step(action), step + 1
                _refuse(step_problem(out, self.codec), episode, step)
                obs, reward, terminated, truncated, info = out
                total += float(reward)
                done = terminated or truncated
            cut += not done
            returns.append(total)
        return returns, cut


def _refuse(problem: tuple | None, episode: int, step: int) -> None:
    """`episodes`' ValueError for what the env returned at `step` of `episode` (0: at its reset)."""
    if problem is not None:
        field, got, expected = problem
        when = "at the reset" if step == 0 else f"at step {step}"
        raise ValueError(f"evaluate: the env {when} of episode {episode}: {field} {got}; expected {expected}")


def _recurrent_inputs(policy, state, episode_start, n: int, device) -> tuple[tuple, torch.Tensor]:
    """predict's state and episode_start for n observations of a recurrent policy, as RecurrentPPO
    takes them: state None (zero) or the tuple predict returned, (layers, n, hidden) arrays;
    episode_start None (no start) or n bools. ValueError naming the argument otherwise."""
    if state is None:
        state = policy.initial_state(n)
    else:
        expected = tuple(s.shape for s in policy.initial_state(n))
        if not isinstance(state, (tuple, list)) or len(state) != len(expected) or any(
                np.shape(s) != e for s, e in zip(state, expected)):
            shapes = [tuple(np.shape(s)) for s in state] if isinstance(state, (tuple, list)) else type(state).__name__
            raise ValueError(f"state must be None or the state predict returned for {n} observation(s): "
                             f"{len(expected)} arrays of shape {tuple(expected[0])} (layers, n, hidden); got {shapes}")
        state = tuple(torch.as_tensor(np.asarray(s), dtype=policy.rnn.weight_hh_l0.dtype, device=device)
                      for s in state)
        if not all(bool(torch.isfinite(s).all()) for s in state):
            raise ValueError("state contains NaN or Inf")
    if episode_start is None:
        starts = torch.zeros(n, dtype=torch.bool, device=device)
    else:
        starts = np.asarray(episode_start)
        if starts.size != n or not (starts.dtype == np.bool_ or np.isin(starts, (0, 1)).all()):
            raise ValueError(f"episode_start must be None or {n} bools (one per observation), got {episode_start!r:.80}")
        starts = torch.as_tensor(starts.reshape(n).astype(bool), device=device)
    return state, starts
