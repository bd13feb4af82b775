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


# ----------------------------------------------------------------------------- a user's own networks
DEFAULT = "MlpPolicy"
"""The `policy=` / `value_net=` value that selects the built-in networks (MLPPolicy / ValueNetwork)."""


def qualified_name(module: nn.Module) -> str:
    """`module.class.qualname` of a network, what a checkpoint records for information."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def build_network(name: str, spec, observation_space, action_space, default) -> nn.Module:
    """The network `spec` selects: `default()` for "MlpPolicy", the module itself, or what a callable
    `spec(observation_space, action_space)` returns; TypeError for anything else."""
    if isinstance(spec, str):
        if spec != DEFAULT:
            raise ValueError(f"{name} must be {DEFAULT!r}, a torch.nn.Module or a callable "
                             f"(observation_space, action_space) -> nn.Module; got the string {spec!r}")
        return default()
    if isinstance(spec, nn.Module):
        return spec
    if callable(spec):
        module = spec(observation_space, action_space)
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name}: the callable {getattr(spec, '__qualname__', spec)!r} returned a "
                            f"{type(module).__name__}, expected a torch.nn.Module")
        return module
    raise TypeError(f"{name} must be {DEFAULT!r}, a torch.nn.Module or a callable (observation_space, "
                    f"action_space) -> nn.Module; got {type(spec).__name__}")


def _what(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Independent):
        return (f"Independent({type(out.base_dist).__name__}) with batch_shape {tuple(out.batch_shape)} and "
                f"event_shape {tuple(out.event_shape)}")
    if isinstance(out, torch.distributions.Distribution):
        return f"{type(out).__name__} with batch_shape {tuple(out.batch_shape)} and event_shape {tuple(out.event_shape)}"
    return f"a {type(out).__name__}"


def _forward_once(module: nn.Module, label: str, obs_dim: int, device, expected: str):
    """module(2 zero observations), float32 as the rollout feeds them, without gradients and with
    torch's RNG put back afterwards; a ValueError naming `label` and `expected` if it raises."""
    obs = torch.zeros(2, obs_dim, device=device)
    try:
        with torch.random.fork_rng(devices=[] if obs.device.type == "cpu" else [obs.device]), torch.no_grad():
            return module(obs)
    except Exception as e:
        raise ValueError(f"{label}: forward on a batch of observations of shape (2, {obs_dim}) raised "
                         f"{type(e).__name__}: {e}; expected it to return {expected}") from e


def check_custom_policy(policy: nn.Module, obs_dim: int, action_space, device) -> None:
    """ValueError unless `policy` (a user's module) has parameters that all require grad and, called
    once on a batch of 2 zero observations (no grad, torch's RNG put back afterwards), returns the
    distribution the action space needs: Categorical with batch_shape (2,) and n classes for
    Discrete(n); Independent(Normal, 1) with batch_shape (2,) and event_shape (k,) for Box(k)."""
    kind, n = action_space_kind(action_space)
    name = type(policy).__qualname__
    params = list(policy.parameters())
    if not params:
        raise ValueError(f"policy {name} has no parameters")
    frozen = [k for k, p in policy.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"policy {name}: TRPO optimizes every parameter; these do not require grad: {frozen}")
    if kind == "categorical":
        expected = f"Categorical(logits=...) with batch_shape (B,) and {n} classes (the action space Discrete({n}))"
    else:
        expected = (f"Independent(Normal(mean, std), 1) with batch_shape (B,) and event_shape ({n},) (the action "
                    f"space {action_space})")
    out = _forward_once(policy, f"policy {name}", obs_dim, device, expected)
    ok = False
    if kind == "categorical":
        ok = isinstance(out, Categorical) and tuple(out.batch_shape) == (2,) and out.param_shape[-1] == n
    elif isinstance(out, Independent) and isinstance(out.base_dist, Normal):
        ok = tuple(out.batch_shape) == (2,) and tuple(out.event_shape) == (n,)
    if not ok:
        hint = ""
        if kind == "gaussian" and isinstance(out, Normal) and tuple(out.batch_shape) == (2, n):
            hint = "; wrap it: Independent(Normal(mean, std), 1)"
        raise ValueError(f"policy {name}: forward(obs) on obs of shape (2, {obs_dim}) returned {_what(out)}; "
                         f"expected {expected}{hint}")


def check_custom_value_net(value_net: nn.Module, obs_dim: int, device) -> None:
    """ValueError unless `value_net` (a user's module) has parameters and maps a (2, obs_dim) batch
    of zero observations to floating-point values of shape (2,) or (2, 1)."""
    name = type(value_net).__qualname__
    params = list(value_net.parameters())
    if not params:
        raise ValueError(f"value_net {name} has no parameters")
    out = _forward_once(value_net, f"value_net {name}", obs_dim, device, "values of shape (2,) or (2, 1)")
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and tuple(out.shape) in ((2,), (2, 1))):
        what = f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else _what(out)
        raise ValueError(f"value_net {name}: forward(obs) on obs of shape (2, {obs_dim}) returned {what}; "
                         "expected floating-point values of shape (2,) or (2, 1)")


class FlatValues:
    """A value function as the rollout calls it, values (B,), from a module that may return (B, 1)."""

    def __init__(self, value_net: nn.Module):
        self.value_net = value_net

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        return self.value_net(obs).reshape(obs.shape[0])
