"""The building blocks of the built-in networks: MLP layers, their forward pass and initialisation,
the activations by name, and the module holding a Gaussian's state-independent log-std."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}


def check_sizes(name: str, sizes) -> tuple[int, ...]:
    try:
        sizes = tuple(sizes)
    except TypeError:
        raise TypeError(f"{name} must be a sequence of positive ints, got {sizes!r}") from None
    if not all(isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in sizes):
        raise ValueError(f"{name} must be a sequence of positive ints, got {sizes!r}")
    return sizes


def check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    return activation


def mlp(sizes: Sequence[int], activation: str) -> tuple[nn.ModuleList, nn.Module]:
    layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
    return layers, ACTIVATIONS[activation]()


def mlp_forward(layers: nn.ModuleList, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Indexing instead of layers[:-1]: slicing a ModuleList builds a new one on every call, which
    # is a visible cost of one rollout step at small batch sizes.
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        x = layer(x)
        if i < last:
            x = act(x)
    return x


def orthogonal_init(layers: nn.ModuleList, last_gain: float) -> None:
    # The initialisation sb3 and CleanRL use for on-policy MLPs: orthogonal, sqrt(2) gain for hidden
    # layers, a small gain on the policy head so the first policy is close to uniform.
    for i, layer in enumerate(layers):
        gain = last_gain if i == len(layers) - 1 else math.sqrt(2.0)
        nn.init.orthogonal_(layer.weight, gain=gain)
        nn.init.zeros_(layer.bias)


class LogStd(nn.Module):
    """Holds the state-independent log-std in a submodule, so it comes last in `parameters()`
    (a module yields its own parameters before its submodules')."""

    def __init__(self, n: int, init: float):
        super().__init__()
        self.log_std = nn.Parameter(torch.full((n,), float(init)))
