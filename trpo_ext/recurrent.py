"""Recurrent policies and critics (LSTM / GRU): the built-in "MlpLstmPolicy" and "MlpGruPolicy",
shaped as sb3-contrib's RecurrentPPO shapes them: observation -> a stack of `n_layers` LSTM (or GRU)
layers of `hidden_size` units -> an MLP head (`hidden` layers, then the output layer) -> the action
distribution (or one value, for the critic). "CnnLstmPolicy" and "MultiInputLstmPolicy" (and their
GRU twins) put an encoder before the RNN: the features extractor of "CnnPolicy" / "MultiInputPolicy"
on the observation's packed rows (`trpo_ext.spaces.pack`).

A batch for the update is a `trpo_ext.spaces.Sequences`: observations (T, B, D) of B sequences of T
steps, where each sequence starts an episode (the state before its step is zero), and the state
before step 0. The network's rows are time-major, row t·B + b (actions, advantages and masks in
that order). The state is reset to zero before every step that starts an episode, in every layer,
as RecurrentPPO does (it multiplies the state by 1 − episode_start): nothing leaks from one episode
into the next.

The cell formulas are torch's (nn.LSTM: gates i, f, g, o; nn.GRU: r, z, n, with r applied to the
recurrent part of n), on the parameters of the `nn.LSTM` / `nn.GRU` module that holds them, so a
user's state dict reads as torch's. They are written out here (`lstm_cell`, `gru_cell`) rather than
run through the module so that autograd can differentiate them twice everywhere (the reference FVP
differentiates the KL twice through time; cuDNN's RNN has no double backward). The fused Fisher
products through time (`csrc/recurrent.cpp`) implement the same formulas; docs/design.md §12.
Parameter order (the fused ops' contract): the RNN's, layer by layer (weight_ih, weight_hh,
bias_ih, bias_hh), then the head's (W1, b1, …, WL, bL), then a Gaussian's log_std. A policy with an
encoder has no fused op (the encoder's parameters come after the head's): the generic path computes
its Fisher products, through the encoder and the written-out cells.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .distributions import ActionSpec
from .mlp import mlp_forward
from .spaces import Sequences

CELLS = {"lstm": nn.LSTM, "gru": nn.GRU}
"""The recurrent cells by name (the fused ops' `cell`)."""

RECURRENT = {"MlpLstmPolicy": "lstm", "CnnLstmPolicy": "lstm", "MultiInputLstmPolicy": "lstm",
             "MlpGruPolicy": "gru", "CnnGruPolicy": "gru", "MultiInputGruPolicy": "gru"}
"""The built-in recurrent policies by name, sb3-contrib RecurrentPPO's (and their GRU twins), and their cells."""


def feed_forward_name(name: str) -> str:
    """The feed-forward built-in whose observations a recurrent name reads, and whose features extractor
    runs before its RNN: "CnnLstmPolicy" -> "CnnPolicy"."""
    return name.replace("Lstm", "").replace("Gru", "")


FLAT_NAMES = {cell: name for name, cell in RECURRENT.items() if feed_forward_name(name) == "MlpPolicy"}
"""The built-in recurrent policy on flat observations, by cell: {"lstm": "MlpLstmPolicy", "gru": "MlpGruPolicy"}."""

STATE_TENSORS = {"lstm": 2, "gru": 1}
"""Tensors of a cell's state: (h, c) for an LSTM, (h,) for a GRU."""


def lstm_cell(x_proj: torch.Tensor, state: tuple, w_hh: torch.Tensor, b_hh: torch.Tensor) -> tuple:
    """One LSTM step (torch's formula), x_proj = x W_ihᵀ + b_ih: returns the new (h, c)."""
    h, c = state
    i, f, g, o = (x_proj + F.linear(h, w_hh, b_hh)).chunk(4, -1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def gru_cell(x_proj: torch.Tensor, state: tuple, w_hh: torch.Tensor, b_hh: torch.Tensor) -> tuple:
    """One GRU step (torch's formula), x_proj = x W_ihᵀ + b_ih: returns the new (h,)."""
    (h,) = state
    x_r, x_z, x_n = x_proj.chunk(3, -1)
    h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, -1)
    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
    n = torch.tanh(x_n + r * h_n)
    return ((1 - z) * n + z * h,)


_STEPS = {"lstm": lstm_cell, "gru": gru_cell}


class RecurrentNet(nn.Module):
    """The RNN stack and the MLP head on its output; `head_out(seq)` is the head's output for every
    row of a `Sequences` (T·B, out) and the state after its last step. Built by
    `trpo_ext.policies` (which makes the head's layers the way MLPPolicy's)."""

    def __init__(self, rnn: nn.Module, layers: nn.ModuleList, act: nn.Module, activation: str,
                 encoder: nn.Module | None = None):
        super().__init__()
        self.cell = next(name for name, cls in CELLS.items() if type(rnn) is cls)
        if rnn.batch_first or rnn.bidirectional or getattr(rnn, "proj_size", 0) or not rnn.bias:
            raise ValueError("the recurrent layer must be a plain nn.LSTM / nn.GRU (bias, not batch_first, "
                             "bidirectional or projected)")
        if encoder is not None and getattr(encoder, "features_dim", None) != rnn.input_size:
            raise ValueError(f"the encoder must have features_dim = the RNN's input_size ({rnn.input_size}), got "
                             f"{getattr(encoder, 'features_dim', None)!r}")
        self.rnn, self.layers, self.act, self.activation = rnn, layers, act, activation
        self.encoder = encoder  # rows (N, in_dim) -> (N, features_dim) before the RNN; None: the RNN reads obs
        self.obs_dim = rnn.input_size if encoder is None else int(encoder.in_dim)
        self.hidden_size, self.n_layers = rnn.hidden_size, rnn.num_layers

    def rnn_parameters(self) -> list[tuple[torch.Tensor, ...]]:
        """(weight_ih, weight_hh, bias_ih, bias_hh) of each layer."""
        return [tuple(getattr(self.rnn, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))
                for k in range(self.n_layers)]

    def initial_state(self, n: int) -> tuple[torch.Tensor, ...]:
        """The zero state of n sequences: STATE_TENSORS[cell] tensors of shape (n_layers, n, hidden_size)."""
        p = self.rnn.weight_hh_l0
        return tuple(p.new_zeros(self.n_layers, n, self.hidden_size) for _ in range(STATE_TENSORS[self.cell]))

    def recurrent_features(self, seq: Sequences) -> tuple[torch.Tensor, tuple]:
        """The last RNN layer's output for every row (T·B, hidden_size), and the state after step T−1."""
        x, starts = self.inputs(seq.obs), seq.episode_starts
        T, B = starts.shape
        keep = (~starts).to(x.dtype).unsqueeze(-1)  # (T, B, 1): 0 where the state is reset
        step = _STEPS[self.cell]
        final = []
        for k, (w_ih, w_hh, b_ih, b_hh) in enumerate(self.rnn_parameters()):
            x_proj = F.linear(x, w_ih, b_ih)  # every step's input projection in one GEMM
            state = tuple(s[k] for s in seq.initial_state)
            outputs = []
            for t in range(T):
                state = step(x_proj[t], tuple(s * keep[t] for s in state), w_hh, b_hh)
                outputs.append(state[0])
            x = torch.stack(outputs)
            final.append(state)
        return x.reshape(T * B, self.hidden_size), tuple(torch.stack(parts) for parts in zip(*final))

    def inputs(self, obs: torch.Tensor) -> torch.Tensor:
        """What the RNN reads at each step: the observations (T, B, obs_dim), or their encoder's features."""
        if self.encoder is None:
            return obs
        return self.encoder(obs.flatten(0, 1)).unflatten(0, obs.shape[:2])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The MLP head on RNN outputs (rows, hidden_size)."""
        return mlp_forward(self.layers, self.act, h)

    def head_out(self, seq: Sequences) -> tuple[torch.Tensor, tuple]:
        h, final = self.recurrent_features(seq)
        return self.head(h), final


class RecurrentPolicy(RecurrentNet):
    """An LSTM / GRU policy (module doc): `policy(seq)` returns the action distribution of every row
    of a `Sequences`; `step(obs, state, episode_start)` is one step of B envs (the rollout's and
    predict's), returning the distribution's parameters and the new state. `std`: a module holding a
    Gaussian's state-independent `log_std` (registered last, so that it comes last in parameters())."""

    def __init__(self, rnn: nn.Module, layers: nn.ModuleList, act: nn.Module, activation: str, spec: ActionSpec,
                 std: nn.Module | None = None, encoder: nn.Module | None = None):
        super().__init__(rnn, layers, act, activation, encoder)
        self.action_spec = spec
        self.kind, self.action_dim, self.segments = spec.kind, spec.width, spec.segments
        if spec.family.has_log_std:
            self.std = std

    @property
    def log_std(self) -> nn.Parameter:
        if not self.action_spec.family.has_log_std:
            raise AttributeError(f"a {self.kind} RecurrentPolicy has no log_std")
        return self.std.log_std

    def distribution(self, out: torch.Tensor):
        """The distribution for the head's output `out` (logits or mean)."""
        return self.action_spec.distribution(out, self.log_std if self.action_spec.family.has_log_std else None)

    def forward(self, seq: Sequences):
        return self.distribution(self.head_out(seq)[0])

    def step(self, obs: torch.Tensor, state: tuple, episode_start: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """One step of B envs: obs (B, D), state as `initial_state(B)`, episode_start (B,) bool ->
        (the head's output (B, width), the new state)."""
        return self.head_out(Sequences(obs.unsqueeze(0), episode_start.reshape(1, -1), state))

    def extra_repr(self) -> str:
        return f"cell={self.cell}, kind={self.kind}, action_dim={self.action_dim}, activation={self.activation}"


class RecurrentValue(RecurrentNet):
    """The recurrent critic (its own RNN, as RecurrentPPO's `enable_critic_lstm`): `value(seq)` is V
    of every row (T·B,); `step` as the policy's, returning values (B,). Sequences without an episode
    start run through the nn.LSTM / nn.GRU module in one call (its fused kernels: the critic's fit
    feeds it such sequences, `recurrent_rollout`); the critic is differentiated once only, so the
    written-out cells are not needed for it."""

    def forward(self, seq: Sequences) -> torch.Tensor:
        if bool(seq.episode_starts.any()):
            return self.head_out(seq)[0].squeeze(-1)
        state = seq.initial_state if self.cell == "lstm" else seq.initial_state[0]
        return self.head(self.rnn(self.inputs(seq.obs), state)[0].flatten(0, 1)).squeeze(-1)

    def step(self, obs: torch.Tensor, state: tuple, episode_start: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        out, state = self.head_out(Sequences(obs.unsqueeze(0), episode_start.reshape(1, -1), state))
        return out.squeeze(-1), state


def is_recurrent(module) -> bool:
    return isinstance(module, RecurrentNet)


def is_recurrent_spec(policy) -> bool:
    """Whether TRPO's `policy=` names or is a recurrent policy (a callable's result is not known yet)."""
    return (isinstance(policy, str) and policy in RECURRENT) or isinstance(policy, RecurrentPolicy)


def check_sequences(name: str, seq, net: RecurrentNet) -> None:
    """TypeError / ValueError naming the field of `seq` (called `name`) unless it is a `Sequences`
    that `net` can run: obs (T, B, obs_dim) of the parameters' dtype and device, episode_starts bool
    (T, B), the initial state the cell's (layers, B, hidden_size) tensors, everything finite."""
    if not isinstance(seq, Sequences):
        raise TypeError(f"{name} must be a trpo_ext.Sequences(obs, episode_starts, initial_state) for a recurrent "
                        f"policy, got {type(seq).__name__}")
    p = net.rnn.weight_hh_l0
    obs, starts, state, valid = seq
    if valid is not None:
        raise ValueError(f"{name}.valid must be None: padding rows are for a critic's fit; every row of a policy's "
                         "batch counts")
    for field, t, dtype in ((f"{name}.obs", obs, p.dtype), (f"{name}.episode_starts", starts, torch.bool)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{field} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != dtype or t.device != p.device:
            raise TypeError(f"{field} must be a {dtype} tensor on {p.device}, got {t.dtype} on {t.device}")
    if obs.dim() != 3 or obs.shape[2] != net.obs_dim or obs.shape[0] * obs.shape[1] == 0:
        raise ValueError(f"{name}.obs must have shape (T, B, {net.obs_dim}) with T, B >= 1, got {tuple(obs.shape)}")
    if starts.shape != obs.shape[:2]:
        raise ValueError(f"{name}.episode_starts must have shape {tuple(obs.shape[:2])} (T, B), got {tuple(starts.shape)}")
    expected = (net.n_layers, obs.shape[1], net.hidden_size)
    count = STATE_TENSORS[net.cell]
    if not isinstance(state, (tuple, list)) or len(state) != count:
        raise ValueError(f"{name}.initial_state must be a tuple of {count} tensors ({'(h, c)' if count == 2 else '(h,)'}"
                         f" of a {net.cell.upper()}), got {type(state).__name__} of length "
                         f"{len(state) if isinstance(state, (tuple, list)) else '-'}")
    for i, s in enumerate(state):
        if not isinstance(s, torch.Tensor) or s.dtype != p.dtype or s.device != p.device:
            raise TypeError(f"{name}.initial_state[{i}] must be a {p.dtype} tensor on {p.device}")
        if tuple(s.shape) != expected:
            raise ValueError(f"{name}.initial_state[{i}] must have shape {expected} (layers, B, hidden), "
                             f"got {tuple(s.shape)}")
    for field, t in ((f"{name}.obs", obs), *((f"{name}.initial_state[{i}]", s) for i, s in enumerate(state))):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{field} contains NaN or Inf")
