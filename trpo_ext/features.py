"""The built-in networks for image and Dict observations: sb3's NatureCNN and its combined
extractor, and the policy and critic built on them ("CnnPolicy", "MultiInputPolicy"); `PackedFeatures`
runs an extractor on the packed rows a recurrent policy reads (`trpo_ext.spaces.pack`)."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .distributions import action_spec
from .mlp import LogStd, check_activation, check_sizes, mlp, mlp_forward, orthogonal_init
from .spaces import ObservationCodec, unpack

class NatureCNN(nn.Module):
    """The encoder of the DQN paper (Mnih et al., 2015), as stable-baselines3's NatureCNN: images
    (B, C, H, W) scaled to [0, 1] -> conv 32 8x8/4, 64 4x4/2, 64 3x3/1 (ReLU), flatten, a linear
    layer of `features_dim` units (ReLU)."""

    def __init__(self, shape: tuple[int, int, int], features_dim: int = 512):
        super().__init__()
        channels, height, width = shape
        if height < 36 or width < 36:
            raise ValueError(f"NatureCNN needs images of at least 36 x 36 pixels (its three convolutions shrink "
                             f"them by 32), got {height} x {width} (the image as (C, H, W): {tuple(shape)}); pass your "
                             "own policy= / value_net= for smaller ones")
        self.cnn = nn.Sequential(nn.Conv2d(channels, 32, 8, stride=4), nn.ReLU(), nn.Conv2d(32, 64, 4, stride=2),
                                 nn.ReLU(), nn.Conv2d(64, 64, 3, stride=1), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = self.cnn(torch.zeros(1, *shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(flat, features_dim), nn.ReLU())
        self.features_dim = features_dim
        for m in self.modules():  # sb3's initialisation of a features extractor
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.orthogonal_(m.weight, gain=math.sqrt(2.0))
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(images))


class FeatureExtractor(nn.Module):
    """A preprocessed observation (`trpo_ext.spaces.ObservationCodec`) -> features (B, features_dim):
    a NatureCNN per image part (`cnn_features` units each), the other parts flat, concatenated in
    the space's key order (stable-baselines3's NatureCNN / CombinedExtractor)."""

    def __init__(self, codec: ObservationCodec, cnn_features: int):
        super().__init__()
        self.keys = [p.key for p in codec.parts]
        self.cnns = nn.ModuleList(NatureCNN(p.shape, cnn_features) for p in codec.parts if p.kind == "image")
        self.is_image = [p.kind == "image" for p in codec.parts]
        self.features_dim = sum(cnn_features if p.kind == "image" else p.size for p in codec.parts)

    def forward(self, obs) -> torch.Tensor:
        parts, cnns = [], iter(self.cnns)
        for key, image in zip(self.keys, self.is_image):
            x = obs[key] if key is not None else obs
            parts.append(next(cnns)(x) if image else x.flatten(1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, 1)


class FeaturePolicy(nn.Module):
    """A features extractor, an MLP on its features (`hidden`, may be empty) and the action space's
    distribution head: the built-in "CnnPolicy" and "MultiInputPolicy"."""

    def __init__(self, extractor: FeatureExtractor, action_space, hidden: Sequence[int] = (),
                 activation: str = "tanh", log_std_init: float = 0.0):
        super().__init__()
        self.features = extractor
        self.action_spec = action_spec(action_space)
        self.activation = check_activation(activation)
        self.layers, self.act = mlp((extractor.features_dim, *check_sizes("hidden", hidden),
                                      self.action_spec.width), activation)
        orthogonal_init(self.layers, last_gain=0.01)
        if self.action_spec.family.has_log_std:
            self.std = LogStd(self.action_spec.width, log_std_init)

    def forward(self, obs):
        out = mlp_forward(self.layers, self.act, self.features(obs))
        return self.action_spec.distribution(out, self.std.log_std if self.action_spec.family.has_log_std else None)


class FeatureValue(nn.Module):
    """The critic of "CnnPolicy" / "MultiInputPolicy": its own features extractor (not shared with
    the policy: TRPO's policy step and the critic's Adam then never move each other's parameters),
    an MLP and one value: obs -> (B,)."""

    def __init__(self, extractor: FeatureExtractor, hidden: Sequence[int] = (), activation: str = "tanh"):
        super().__init__()
        self.features = extractor
        self.layers, self.act = mlp((extractor.features_dim, *check_sizes("hidden", hidden), 1),
                                     check_activation(activation))
        orthogonal_init(self.layers, last_gain=1.0)

    def forward(self, obs) -> torch.Tensor:
        return mlp_forward(self.layers, self.act, self.features(obs)).squeeze(-1)


CNN_FEATURES = {"CnnPolicy": 512, "MultiInputPolicy": 256}
"""Features per image of the built-in extractor, by the feed-forward name (sb3's defaults)."""


def built_in_extractor(name: str, codec: ObservationCodec) -> FeatureExtractor:
    """The features extractor of the built-in "CnnPolicy" or "MultiInputPolicy" (`name`) for `codec`."""
    return FeatureExtractor(codec, CNN_FEATURES[name])


def head_sizes(name: str, hidden: Sequence[int]) -> tuple[int, ...]:
    """The hidden layers after `name`'s extractor: none after a NatureCNN alone (sb3's net_arch default
    for "CnnPolicy", and RecurrentPPO's for "CnnLstmPolicy"), `hidden` otherwise."""
    return () if name == "CnnPolicy" else tuple(hidden)


class PackedFeatures(nn.Module):
    """A features extractor on packed rows (N, in_dim) (`trpo_ext.spaces.pack` of the preprocessed
    observations): unpacked to the space's tensors, then extracted -> (N, features_dim). The encoder
    of a recurrent policy, whose batches (`Sequences`) hold one row per step."""

    def __init__(self, extractor: FeatureExtractor, codec: ObservationCodec):
        super().__init__()
        self.extractor, self.layout = extractor, codec.packed_layout
        self.in_dim, self.features_dim = codec.packed_dim, extractor.features_dim

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return self.extractor(unpack(rows, self.layout))
