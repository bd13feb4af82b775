"""What a rollout of a recurrent policy (`trpo_ext.recurrent`) carries from step to step, and the
sequences its update runs on.

`RecurrentMemory` holds the policy's state (and a recurrent critic's) between env steps and across
rollouts, resets it at every episode start (terminated or truncated: the next step's episode_start
is True), records the state at the start of each rollout (the policy update's `Sequences` start
from it, the whole rollout as B sequences of T steps) and, for a recurrent critic, its state before
every step: the critic regresses on sub-sequences of `critic_chunk` steps that start from those
states (as sb3-contrib's RecurrentPPO starts its minibatch sequences from the states stored in the
rollout), so that one minibatch's backprop through time runs over a chunk, not the whole rollout.
A truncated episode's final observation is valued from the critic's state after the step that
ended it (before the reset), and the observation after the last step from the carried state.
"""
from __future__ import annotations

import numpy as np
import torch

from .inference import Inference
from .recurrent import is_recurrent
from .spaces import Sequences

CRITIC_CHUNK = 32
"""The longest sub-sequence (steps) the recurrent critic backpropagates through in one minibatch
(the largest divisor of n_steps up to this)."""


def critic_chunk(n_steps: int) -> int:
    return max(d for d in range(1, min(n_steps, CRITIC_CHUNK) + 1) if n_steps % d == 0)


class RecurrentMemory:
    """The recurrent states of the envs a collector steps (module doc)."""

    def __init__(self, n_envs: int, device: torch.device):
        self.n_envs, self.device = n_envs, device
        self.policy_state: tuple | None = None  # None: zero (an env reset)
        self.value_state: tuple | None = None
        self.episode_starts = np.ones(n_envs, dtype=bool)  # whether the next step starts an episode

    def reset(self) -> None:
        """The envs were reset: every state is zero and the next step starts an episode."""
        self.policy_state = self.value_state = None
        self.episode_starts[:] = True

    # ----------------------------------------------------------------------- checkpoints
    def snapshot(self) -> tuple:
        return self.policy_state, self.value_state, self.episode_starts.copy()

    def restore(self, snapshot: tuple) -> None:
        self.policy_state, self.value_state, starts = snapshot
        self.episode_starts[:] = starts

    def state_dict(self) -> dict:
        def cpu(state):
            return None if state is None else [s.detach().cpu().clone() for s in state]
        return {"policy_state": cpu(self.policy_state), "value_state": cpu(self.value_state),
                "episode_starts": torch.from_numpy(self.episode_starts.copy())}

    def load_state_dict(self, state: dict) -> None:
        def dev(saved):
            return None if saved is None else tuple(s.to(self.device) for s in saved)
        starts = state["episode_starts"].numpy()
        if starts.shape != self.episode_starts.shape:
            raise ValueError(f"RecurrentMemory.load_state_dict: saved for {starts.shape[0]} envs, not {self.n_envs}")
        self.policy_state, self.value_state = dev(state["policy_state"]), dev(state["value_state"])
        self.episode_starts[:] = starts

    # ----------------------------------------------------------------------- a rollout
    def begin(self, policy, value_fn) -> None:
        """A rollout starts: zero states where there are none; its initial states recorded. `value_fn`:
        the critic, or the `policies.FlatValues` around it."""
        self.critic = getattr(value_fn, "value_net", value_fn)
        self.recurrent_critic = is_recurrent(self.critic)
        for name, net in (("policy", policy), ("value", self.critic if self.recurrent_critic else None)):
            state, zero = getattr(self, f"{name}_state"), None if net is None else net.initial_state(self.n_envs)
            if zero is not None and state is not None and [s.shape for s in state] != [s.shape for s in zero]:
                raise ValueError(f"the rollout's {name} state has shapes {[tuple(s.shape) for s in state]} (a checkpoint's"
                                 f"?), the {name} network's are {[tuple(s.shape) for s in zero]}")
            if state is None or zero is None:
                setattr(self, f"{name}_state", zero)
            else:  # the network's dtype and device
                setattr(self, f"{name}_state", tuple(s.to(z) for s, z in zip(state, zero)))
        self.first_state = self.policy_state
        self.starts, self.values, self.value_states, self.final_values = [], [], [], {}

    def act(self, inference: Inference, policy, policy_obs: torch.Tensor, generator,
            masks: torch.Tensor | None) -> torch.Tensor:
        """One step's actions from the carried state (and, with a recurrent critic, the step's values)."""
        starts = torch.tensor(self.episode_starts, device=self.device)
        self.starts.append(starts)
        actions, self.policy_state = inference.recurrent_actions(policy, policy_obs, self.policy_state, starts,
                                                                 generator, masks=masks)
        if self.recurrent_critic:
            self.value_states.append(self.value_state)
            values, self.value_state = self.critic.step(policy_obs, self.value_state, starts)
            self.values.append(values)
        return actions

    def after_step(self, t: int, done: np.ndarray, truncated_envs, final_obs) -> None:
        """After step t: the truncated episodes' final observations (the policy's input, one row per
        env of `truncated_envs`) valued from the critic's state before the reset; then the resets."""
        if self.recurrent_critic and len(truncated_envs):
            index = torch.as_tensor(truncated_envs, device=self.device)
            state = tuple(s[:, index] for s in self.value_state)
            values, _ = self.critic.step(final_obs, state, torch.zeros(len(index), dtype=torch.bool, device=self.device))
            for i, v in zip(truncated_envs, values.tolist()):
                self.final_values[(t, int(i))] = v
        self.episode_starts[:] = done

    def critic_values(self, last_obs: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(values (T, B), next values (T, B)) of a recurrent critic: each step's, and V of what followed
        it (the next step's observation, the final observation of a truncated episode, or, after the
        last step, the observation the next rollout starts from, valued from the carried state)."""
        last, _ = self.critic.step(last_obs, self.value_state, torch.tensor(self.episode_starts, device=self.device))
        values = torch.stack(self.values).double().cpu().numpy()
        next_values = np.concatenate([values[1:], last.double().cpu().numpy()[None]])
        for (t, i), v in self.final_values.items():
            next_values[t, i] = v
        return values, next_values

    def policy_sequences(self, obs: torch.Tensor) -> Sequences:
        """The rollout (obs (T·B, D), time-major) as the policy update's B sequences of T steps."""
        T = len(self.starts)
        return Sequences(obs.view(T, self.n_envs, -1), torch.stack(self.starts), self.first_state)

    def critic_sequences(self, obs: torch.Tensor, returns: torch.Tensor) -> tuple[Sequences, torch.Tensor]:
        """The rollout as the recurrent critic's training sequences, and the returns in their row order.

        Each env's steps are cut into chunks of `critic_chunk(T)` steps and each chunk again at its
        episode starts; a piece starts from the critic's state recorded before its first step, or from
        zero where that step starts an episode. The pieces are right-padded to the chunk's length
        (`Sequences.valid` marks the real rows): a batch with no episode start inside, which the
        critic runs in one call of its RNN module."""
        T, B = len(self.starts), self.n_envs
        L = critic_chunk(T)
        K = T // L

        def chunked(x):  # (T, B, ...) -> (L, K·B, ...), column k·B + b = chunk k of env b
            return x.reshape(K, L, B, *x.shape[2:]).transpose(0, 1).reshape(L, K * B, *x.shape[2:])
        starts = chunked(torch.stack(self.starts)).cpu()
        states = tuple(torch.cat([self.value_states[k * L][j] for k in range(K)], 1)
                       for j in range(len(self.value_states[0])))
        pieces = []  # (column, first row, rows, from the recorded state)
        for column in range(K * B):
            cuts = [0, *(int(t) for t in torch.nonzero(starts[1:, column]).flatten() + 1), L]
            pieces += [(column, a, b - a, a == 0 and not bool(starts[0, column])) for a, b in zip(cuts[:-1], cuts[1:])]
        rows = torch.arange(L).unsqueeze(1)  # (L, 1)
        first = torch.tensor([a for _, a, _, _ in pieces])
        length = torch.tensor([n for _, _, n, _ in pieces])
        columns = torch.tensor([c for c, _, _, _ in pieces])
        valid = rows < length  # (L, S)
        index = ((first + rows).clamp(max=L - 1) * (K * B) + columns).to(self.device)  # into the (L·K·B) rows
        keep = torch.tensor([s for *_, s in pieces], device=self.device)
        padded = chunked(obs.view(T, B, -1)).flatten(0, 1)[index.flatten()].view(L, len(pieces), -1)
        state = tuple(s[:, columns.to(self.device)] * keep.view(1, -1, 1).to(s.dtype) for s in states)
        valid = valid.to(self.device)
        seq = Sequences(padded, torch.zeros_like(valid), state, valid)
        targets = chunked(returns.view(T, B)).flatten()[index.flatten()].view(L, -1)
        return seq, targets.reshape(-1)
