"""Policy and value networks.

`MLPPolicy` is the network the fused extension ops understand: a plain MLP whose output is either
categorical logits or the mean of a diagonal Gaussian with a state-independent log-std parameter
(last in `parameters()` order: docs/design.md, "Contracts across the C++ boundary").
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn
from torch.distributions import Categorical, Independent, Normal

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def _check_sizes(name: str, sizes) -> tuple[int, ...]:
    try:
        sizes = tuple(sizes)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of positive ints, got {sizes!r}") from None
    if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in sizes):
        raise ValueError(f"{name} must be a sequence of positive ints, got {sizes!r}")
    return sizes


def _check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation


def _mlp(sizes: Sequence[int], activation: str) -> tuple[nn.ModuleList, nn.Module]:
    layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
    return layers, ACTIVATIONS[activation]()


def _mlp_forward(layers: nn.ModuleList, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Indexing instead of layers[:-1]: slicing a ModuleList builds a new one on every call, which
    # is a visible cost of one rollout step at small batch sizes.
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        x = layer(x)
        if i < last:
            x = act(x)
    return x


def _orthogonal_init(layers: nn.ModuleList, last_gain: float) -> None:
    # The initialisation sb3 and CleanRL use for on-policy MLPs: orthogonal, sqrt(2) gain for hidden
    # layers, a small gain on the policy head so the first policy is close to uniform.
    for i, layer in enumerate(layers):
        gain = last_gain if i == len(layers) - 1 else math.sqrt(2.0)
        nn.init.orthogonal_(layer.weight, gain=gain)
        nn.init.zeros_(layer.bias)


def action_space_kind(action_space) -> tuple[str, int]:
    """("categorical", n) for Discrete(n), ("gaussian", k) for a 1-D Box(k); TypeError otherwise."""
    from gymnasium import spaces

    if isinstance(action_space, spaces.Discrete):
        if int(action_space.start) != 0:
            raise TypeError(f"action_space: Discrete spaces must start at 0, got start={action_space.start}")
        return "categorical", int(action_space.n)
    if isinstance(action_space, spaces.Box):
        if len(action_space.shape) != 1:
            raise TypeError(f"action_space: Box must be 1-D, got shape {action_space.shape}")
        return "gaussian", int(action_space.shape[0])
    raise TypeError(
        f"action_space must be gymnasium.spaces.Discrete or a 1-D gymnasium.spaces.Box, got {action_space!r}"
    )


class _LogStd(nn.Module):
    """Holds the state-independent log-std in a submodule, so it comes last in `parameters()`
    (a module yields its own parameters before its submodules')."""

    def __init__(self, n: int, init: float):
        super().__init__()
        self.log_std = nn.Parameter(torch.full((n,), float(init)))


class MLPPolicy(nn.Module):
    """MLP policy: `policy(obs)` returns `Categorical(logits=...)` or `Independent(Normal(mean, std), 1)`.

    Args:
        obs_dim: size of the (flat) observation.
        action_space: gymnasium `Discrete(n)` or 1-D `Box(k)`.
        hidden: hidden layer widths, e.g. (64, 64); () gives a linear policy.
        activation: "tanh" or "relu".
        log_std_init: initial log standard deviation of the Gaussian (ignored for Discrete).
    """

    def __init__(self, obs_dim: int, action_space, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", log_std_init: float = 0.0):
        super().__init__()
        if not isinstance(obs_dim, int) or isinstance(obs_dim, bool) or obs_dim < 1:
            raise ValueError(f"obs_dim must be a positive int, got {obs_dim!r}")
        self.kind, self.action_dim = action_space_kind(action_space)
        self.obs_dim = obs_dim
        self.hidden = _check_sizes("hidden", hidden)
        self.activation = _check_activation(activation)
        self.layers, self.act = _mlp((obs_dim, *self.hidden, self.action_dim), activation)
        _orthogonal_init(self.layers, last_gain=0.01)
        if self.kind == "gaussian":
            self.std = _LogStd(self.action_dim, log_std_init)

    @property
    def log_std(self) -> nn.Parameter:
        """The Gaussian's log standard deviation (last in `parameters()`)."""
        if self.kind != "gaussian":
            raise AttributeError("a categorical MLPPolicy has no log_std")
        return self.std.log_std

    def distribution_params(self, obs: torch.Tensor) -> torch.Tensor:
        """Logits (categorical) or mean (Gaussian) for a batch of observations."""
        return _mlp_forward(self.layers, self.act, obs)

    def distribution(self, out: torch.Tensor):
        """The policy's distribution for distribution parameters `out` (logits or mean)."""
        if self.kind == "categorical":
            return Categorical(logits=out)
        return Independent(Normal(out, self.log_std.exp().expand_as(out)), 1)

    def forward(self, obs: torch.Tensor):
        return self.distribution(self.distribution_params(obs))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, obs_dim={self.obs_dim}, action_dim={self.action_dim}, activation={self.activation}"


class ValueNetwork(nn.Module):
    """State-value MLP: obs (N, obs_dim) -> values (N,)."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (64, 64), activation: str = "tanh"):
        super().__init__()
        self.activation = _check_activation(activation)
        self.layers, self.act = _mlp((obs_dim, *_check_sizes("hidden", hidden), 1), self.activation)
        _orthogonal_init(self.layers, last_gain=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return _mlp_forward(self.layers, self.act, obs).squeeze(-1)
