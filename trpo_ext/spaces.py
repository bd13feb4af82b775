"""How observations from gymnasium spaces become the policy's input (`ObservationCodec`); what an
action space means is `trpo_ext.distributions`' job.

Accepted: a Box (a 1-D vector; an image: uint8, 3-D, bounds 0..255; any other shape flattened),
Discrete (one-hot), MultiDiscrete (one one-hot per component, concatenated), MultiBinary (0/1
floats), or a Dict of those. They are preprocessed as stable-baselines3 does (`preprocess_obs`):
images channel-first (HWC transposed to CHW, the channel axis being the smallest) and scaled to
[0, 1]; a Dict becomes a dict of tensors in the space's key order. Observation normalization
(`normalize_obs`) applies to the Box parts that are not images. Tuple spaces, nested Dicts and Text
/ Graph spaces are refused with a TypeError naming the space.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gymnasium import spaces


# ----------------------------------------------------------------------------- observations
def is_image_space(space) -> bool:
    """sb3's test: a uint8 Box of rank 3 with bounds 0 and 255."""
    return (isinstance(space, spaces.Box) and space.dtype == np.uint8 and len(space.shape) == 3
            and bool(np.all(space.low == 0)) and bool(np.all(space.high == 255)))


@dataclass(frozen=True)
class ObsPart:
    """One observation (or one Dict entry) and what preprocessing makes of it."""

    key: str | None  # the Dict key; None for a non-Dict space
    kind: str  # "box", "image", "onehot" (Discrete), "multi_onehot" (MultiDiscrete) or "binary" (MultiBinary)
    space: spaces.Space
    shape: tuple[int, ...]  # of one preprocessed observation: (C, H, W) for images, (features,) otherwise
    channels_last: bool = False  # images stored HWC (transposed to CHW)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def _part(key, space) -> ObsPart:
    where = "observation_space" if key is None else f"observation_space[{key!r}]"
    if is_image_space(space):
        shape = space.shape
        channels_last = int(np.argmin(shape)) != 0  # sb3: the smallest axis is the channels
        chw = (shape[2], shape[0], shape[1]) if channels_last else tuple(shape)
        return ObsPart(key, "image", space, tuple(int(s) for s in chw), channels_last)
    if isinstance(space, spaces.Box):
        if space.shape == () or int(np.prod(space.shape)) == 0:
            raise TypeError(f"{where}: a Box needs at least one element, got shape {space.shape}")
        return ObsPart(key, "box", space, (int(np.prod(space.shape)),))
    if isinstance(space, spaces.Discrete):
        return ObsPart(key, "onehot", space, (int(space.n),))
    if isinstance(space, spaces.MultiDiscrete):
        if space.nvec.ndim != 1:
            raise TypeError(f"{where}: MultiDiscrete observations must be 1-D, got {space!r}")
        return ObsPart(key, "multi_onehot", space, (int(space.nvec.sum()),))
    if isinstance(space, spaces.MultiBinary):
        return ObsPart(key, "binary", space, (int(np.prod(space.shape)),))
    if isinstance(space, spaces.Dict):
        raise TypeError(f"{where}: nested Dict observations are not supported; flatten them with "
                        "gymnasium.wrappers.FlattenObservation or a wrapper of your own")
    raise TypeError(f"{where} must be a Box, Discrete, MultiDiscrete, MultiBinary or a Dict of those (Tuple, Text "
                    f"and Graph observations are not supported), got {space!r}")


class ObservationCodec:
    """Raw observations (as the vector env returns them: an array, or a dict of arrays, with a batch
    axis) -> the policy's input: a float32 tensor, or a dict of them for a Dict space.

    The one place that knows the layout of an observation: checks, preprocessing, normalization of
    the Box parts, and the batch operations the agent needs on either form (concatenation, row
    selection, packing into one (B, D) float tensor for collectives and back)."""

    def __init__(self, space):
        self.space = space
        self.is_dict = isinstance(space, spaces.Dict)
        if self.is_dict:
            if not space.spaces:
                raise TypeError("observation_space: an empty Dict")
            self.parts = [_part(str(k), s) for k, s in space.spaces.items()]
        else:
            self.parts = [_part(None, space)]
        self.norm_parts = [p for p in self.parts if p.kind == "box"]
        self.norm_dim = sum(p.size for p in self.norm_parts)
        self.has_image = any(p.kind == "image" for p in self.parts)

    # -- what the networks see
    @property
    def flat_dim(self) -> int | None:
        """The width of the input of an MLP policy: a non-Dict space without images; None otherwise."""
        if self.is_dict or self.has_image:
            return None
        return self.parts[0].size

    @property
    def plain_box(self) -> bool:
        """A 1-D Box: the raw observation is the policy's input (the fused rollout op normalizes it)."""
        part = self.parts[0]
        return not self.is_dict and part.kind == "box" and len(part.space.shape) == 1

    def describe(self) -> str:
        """The preprocessed input, in words, for error messages: "(B, 4)", "dict of image (3, 64, 64), (5,)"."""
        if not self.is_dict:
            return f"a float32 tensor of shape (B, {', '.join(map(str, self.parts[0].shape))})"
        return "a dict of float32 tensors {" + ", ".join(f"{p.key!r}: (B, {', '.join(map(str, p.shape))})"
                                                        for p in self.parts) + "}"

    # -- raw observations
    def _raw(self, obs, part: ObsPart) -> np.ndarray:
        return obs[part.key] if self.is_dict else obs

    def check(self, obs) -> None:
        """ValueError unless every Box part of a raw batch from the env is finite (the other parts
        hold integers)."""
        for part in self.parts:
            if part.kind == "box" and not np.isfinite(self._raw(obs, part)).all():
                where = "" if part.key is None else f" (in {part.key!r})"
                raise ValueError(f"the environment returned a non-finite observation{where}; the agent's parameters "
                                 "and observation statistics were left unchanged")

    def first_nonfinite(self, obs, single: bool = False) -> str | None:
        """Where a raw batch first holds NaN or inf, in words ("obs[0, 2] = nan"; without the batch
        index when it holds a `single` observation), or None."""
        for part in self.parts:
            if part.kind == "box":
                a = np.asarray(self._raw(obs, part))
                bad = np.argwhere(~np.isfinite(a))
                if bad.size:
                    index = tuple(int(i) for i in bad[0])
                    shown = index[1:] if single else index
                    name = "obs" if part.key is None else f"obs[{part.key!r}]"
                    return f"{name}{list(shown)} = {a[index]}"
        return None

    def norm_features(self, obs) -> np.ndarray:
        """The Box parts of a raw batch, flattened side by side: (B, norm_dim), what the normalizer sees."""
        rows = [np.asarray(self._raw(obs, p)).reshape(-1, p.size) for p in self.norm_parts]
        return rows[0] if len(rows) == 1 else np.concatenate(rows, 1)

    def batch_raw(self, observations: list) -> object:
        """Single raw observations stacked into a raw batch."""
        if self.is_dict:
            return {p.key: np.stack([o[p.key] for o in observations]) for p in self.parts}
        return np.stack(observations)

    def concat_raw(self, batches: list) -> object:
        if self.is_dict:
            return {p.key: np.concatenate([b[p.key] for b in batches]) for p in self.parts}
        return np.concatenate(batches)

    def raw_len(self, obs) -> int:
        """Rows of a raw batch."""
        return len(self._raw(obs, self.parts[0]))

    def raw_to_state(self, obs) -> object:
        """A raw batch as tensors, for a checkpoint (its dtypes kept)."""
        if self.is_dict:
            return {p.key: torch.from_numpy(np.ascontiguousarray(obs[p.key])) for p in self.parts}
        return torch.from_numpy(np.asarray(obs, dtype=np.float64)) if self.plain_box else \
            torch.from_numpy(np.ascontiguousarray(obs))

    def raw_from_state(self, state) -> object:
        if self.is_dict:
            return {p.key: state[p.key].numpy().astype(p.space.dtype) for p in self.parts}
        return state.numpy().astype(self.space.dtype)

    def raw_single(self, observation, name: str = "obs") -> tuple[object, bool]:
        """An observation as `predict` takes it (one, or a batch) -> (raw batch, whether it was one);
        ValueError naming `name` and the expected shapes otherwise."""
        if self.is_dict:
            if not isinstance(observation, dict):
                raise ValueError(f"{name} must be a dict with keys {[p.key for p in self.parts]} (the Dict "
                                 f"observation space), got {type(observation).__name__}")
            missing = [p.key for p in self.parts if p.key not in observation]
            if missing:
                raise ValueError(f"{name} lacks the keys {missing} of the Dict observation space")
            arrays = {p.key: np.asarray(observation[p.key]) for p in self.parts}
            singles = {self._single(arrays[p.key], p, f"{name}[{p.key!r}]") for p in self.parts}
            if len(singles) != 1:
                raise ValueError(f"{name}: the entries mix single observations and batches")
            single = singles.pop()
            batch = {k: (a[None] if single else a) for k, a in arrays.items()}
        else:
            batch = np.asarray(observation)
            single = self._single(batch, self.parts[0], name)
            batch = batch[None] if single else batch
        n = {len(self._raw(batch, p)) for p in self.parts}
        if len(n) != 1:
            raise ValueError(f"{name}: the entries have different batch sizes {sorted(n)}")
        return batch, single

    @staticmethod
    def _single(a: np.ndarray, part: ObsPart, name: str) -> bool:
        shape = part.space.shape
        if a.shape == shape:
            return True
        if a.shape[1:] == shape and a.ndim == len(shape) + 1:
            return False
        raise ValueError(f"{name} must have shape {shape} (one observation) or (B, {', '.join(map(str, shape))}) "
                         f"(a batch), got {a.shape}")

    # -- preprocessed tensors
    def preprocess(self, obs, device, normalizer=None):
        """A raw batch -> the policy's input on `device` (float32), the Box parts normalized when a
        normalizer (over `norm_features`) is given."""
        normalized = None
        if normalizer is not None:
            features = torch.as_tensor(self.norm_features(obs), dtype=torch.float32, device=device)
            normalized = iter(normalizer.normalize(features).split([p.size for p in self.norm_parts], 1))
        out = {}
        for part in self.parts:
            raw = self._raw(obs, part)
            if part.kind == "box":
                t = next(normalized) if normalized is not None else \
                    torch.as_tensor(np.asarray(raw), dtype=torch.float32, device=device).reshape(-1, part.size)
            elif part.kind == "image":
                t = torch.as_tensor(np.asarray(raw), device=device)
                if part.channels_last:
                    t = t.permute(0, 3, 1, 2)
                # A copy (never the caller's array, scaled in place) with row-major (B, C, H, W) strides
                # for every layout: `.contiguous()` keeps a 1-channel HWC batch's permuted strides, which
                # are channels-last strides too, and the convolutions would run in that memory format.
                t = t.to(torch.float32, memory_format=torch.contiguous_format, copy=True).div_(255.0)
            elif part.kind == "onehot":
                idx = torch.as_tensor(np.asarray(raw, dtype=np.int64) - int(part.space.start), device=device)
                t = torch.nn.functional.one_hot(idx.reshape(-1), part.size).to(torch.float32)
            elif part.kind == "multi_onehot":
                idx = torch.as_tensor(np.asarray(raw, dtype=np.int64) - part.space.start.astype(np.int64),
                                      device=device)
                t = torch.cat([torch.nn.functional.one_hot(idx[:, j], int(n)) for j, n in enumerate(part.space.nvec)],
                              1).to(torch.float32)
            else:  # binary
                t = torch.as_tensor(np.asarray(raw), dtype=torch.float32, device=device).reshape(-1, part.size)
            out[part.key] = t
        return out if self.is_dict else out[None]

    def zeros(self, n: int, device):
        """A preprocessed batch of n zero observations (to check a network's output once)."""
        out = {p.key: torch.zeros(n, *p.shape, device=device) for p in self.parts}
        return out if self.is_dict else out[None]


# ----------------------------------------------------------------------------- batches of either form
def batch_len(obs) -> int:
    """Rows of a preprocessed batch (a tensor or a dict of tensors)."""
    return next(iter(obs.values())).shape[0] if isinstance(obs, dict) else obs.shape[0]


def cat(batches: list):
    if isinstance(batches[0], dict):
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return torch.cat(batches)


def rows(obs, index):
    """The rows `index` (a tensor of indices or a slice) of a preprocessed batch."""
    if isinstance(obs, dict):
        return {k: v[index] for k, v in obs.items()}
    return obs[index]


def pack(obs) -> tuple[torch.Tensor, object]:
    """A preprocessed batch as one (B, D) tensor and what `unpack` needs to rebuild it."""
    if isinstance(obs, dict):
        layout = [(k, v.shape[1:]) for k, v in obs.items()]
        return torch.cat([v.reshape(v.shape[0], -1) for v in obs.values()], 1), layout
    return obs.reshape(obs.shape[0], -1), obs.shape[1:]


def unpack(flat: torch.Tensor, layout):
    if isinstance(layout, list):
        sizes = [int(np.prod(s)) for _, s in layout]
        return {k: part.reshape(-1, *s) for (k, s), part in zip(layout, flat.split(sizes, 1))}
    return flat.reshape(-1, *layout)
