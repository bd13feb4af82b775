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

import functools
import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from gymnasium import spaces

_from_bytes, _BYTEORDER = int.from_bytes, sys.byteorder  # bound once: `problem`'s quick test runs every step


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
        box = self.parts[0].space
        # A float Box alone has `problem`'s quick test (the common case, every rollout step)
        self._float_box = self.parts[0].kind == "box" and box.dtype.kind == "f" and not self.is_dict
        self._quick = None  # the last batch that fitted it: (dtype, shape, *magnitude_test(dtype, size))

    # -- what the networks see
    @property
    def flat_dim(self) -> int | None:
        """The width of the input of an MLP policy: a non-Dict space without images; None otherwise."""
        if self.is_dict or self.has_image:
            return None
        return self.parts[0].size

    @property
    def packed_layout(self):
        """How `unpack` rebuilds this space's preprocessed batch from its `pack`ed (B, packed_dim) rows."""
        return [(p.key, p.shape) for p in self.parts] if self.is_dict else self.parts[0].shape

    @property
    def packed_dim(self) -> int:
        """The width of a preprocessed observation packed into one row (`pack`): what a recurrent policy reads."""
        return sum(p.size for p in self.parts)

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

    def problem(self, obs, batch: bool = True, name: str = "observation") -> tuple | None:
        """The first way a raw batch (or, with `batch=False`, one raw observation) breaks the declared
        space, as (row, field, got, expected): `row` the batch row (None when the fault is not one
        row's), `field` what is wrong, named from `name` ("observation['pos'][2]"), `got` what came
        ("is nan", "has shape (5,)") and `expected` what the space allows. None when it fits.

        Checked: the structure (a dict with the Dict space's keys; extra keys are ignored), the dtype
        (numpy must cast it to the space's dtype under its "same_kind" rule, as the vector envs'
        buffers do: no strings, objects or complex numbers, no floats for integer spaces or images),
        the shape, and the values: finite for a Box, within range for Discrete and MultiDiscrete, 0
        or 1 for MultiBinary, 0..255 for an image in a wider unsigned dtype. A Box's bounds are not
        enforced: many envs exceed the bounds they declare (gymnasium's env checker only warns)."""
        # The quick test, a batch like the last one that fitted: its dtype (`is`: numpy's native dtypes
        # are singletons) and shape, and finite values by their bits (`magnitude_test`)
        quick = self._quick
        if batch and quick is not None and type(obs) is np.ndarray and obs.dtype is quick[0] and obs.shape == quick[1] \
                and not ((_from_bytes(obs.tobytes(), _BYTEORDER) & quick[2]) + quick[3]) & quick[4]:
            return None
        found = self._problem(obs, batch, name)
        if found is None and batch and self._float_box and type(obs) is np.ndarray:
            masks = magnitude_test(obs.dtype, obs.size)
            self._quick = None if masks is None else (obs.dtype, obs.shape, *masks)
        return found

    def _problem(self, obs, batch: bool, name: str) -> tuple | None:
        """`problem` without its quick test."""
        if self.is_dict and not isinstance(obs, Mapping):
            return None, name, f"is {shown(obs)}", f"a dict with the keys {[p.key for p in self.parts]}"
        for part in self.parts:
            field = name if part.key is None else f"{name}[{part.key!r}]"
            if self.is_dict and part.key not in obs:
                return None, field, "is missing", f"every key of the Dict space {[p.key for p in self.parts]}"
            found = _part_problem(self._raw(obs, part), part, batch)
            if found is not None:
                row, index, got, expected = found
                return row, field + "".join(f"[{i}]" for i in index), got, expected
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


def shown(value) -> str:
    """A value in an error message: its type and a short repr ("a str 'abc'")."""
    if value is None:
        return "None"
    kind, text = type(value).__name__, repr(value)
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} {text if len(text) <= 40 else text[:37] + '...'}"


@functools.lru_cache(maxsize=16)
def magnitude_test(dtype: np.dtype, size: int, bound: float = math.inf) -> tuple[int, int, int] | None:
    """Masks m for a quick test of `size` values of a float `dtype` read as one integer,
    x = int.from_bytes(a.tobytes(), sys.byteorder): ((x & m[0]) + m[1]) & m[2] == 0 only if every
    value is finite with |v| < `bound`, and for bound = inf exactly when every value is finite. m[0]
    keeps each value's exponent bits; m[1] adds to them what carries into the value's sign bit (m[2])
    exactly when its exponent reaches a limit: all ones (NaN and inf) for bound = inf, else the
    largest power of two <= bound. Four integer operations, cheaper between env steps than numpy's
    reductions or Python's sum (docs/benchmarks.md, "The checks of what envs return"). None where it
    does not apply: a float not laid out sign, exponent, mantissa (x86's long double), another byte
    order, more than 4096 values, a bound below 1."""
    bits = dtype.itemsize * 8
    info = np.finfo(dtype)
    if not dtype.isnative or 1 + info.nexp + info.nmant != bits or size > 4096 or not bound >= 1:
        return None
    ones = (1 << info.nexp) - 1  # the exponent of NaN and inf
    limit = ones if bound == math.inf else min(ones, ones // 2 + math.frexp(bound)[1] - 1)  # bias + floor(log2)
    every = sum(1 << (bits * i) for i in range(size))  # a 1 in the lowest bit of each value
    return (ones << info.nmant) * every, (ones + 1 - limit << info.nmant) * every, (1 << bits - 1) * every


def _sum(a: np.ndarray) -> float:
    """The sum of a float array, in float64; for a small array by Python's sum, cheaper than numpy's
    reduction there (docs/benchmarks.md, "The checks of what envs return")."""
    return sum(a.ravel().tolist()) if a.size <= 256 else float(np.add.reduce(a, None, np.float64))


def _part_problem(value, part: ObsPart, batch: bool) -> tuple | None:
    """`ObservationCodec.problem` for one part: (row, element index, got, expected) or None."""
    space = part.space
    a = value
    if type(a) is not np.ndarray:
        try:
            a = np.asarray(value)
        except (ValueError, TypeError):  # a ragged sequence
            return None, (), f"is {shown(value)}", f"an array of shape {space.shape}"
    if a.dtype != space.dtype and not np.can_cast(a.dtype, space.dtype, "same_kind"):
        got = f"has dtype {a.dtype}" if type(value) is np.ndarray else f"is {shown(value)}"
        return None, (), got, f"numbers of dtype {space.dtype} (or of a dtype of the same kind)"
    shape = a.shape[1:] if batch else a.shape
    if shape != space.shape or a.ndim < int(batch):
        return None, (), f"has shape {shape}", f"shape {space.shape}"
    if part.kind == "box":  # a finite float64 sum is the quick answer (NaN and inf propagate to it)
        if a.dtype.kind != "f" or math.isfinite(_sum(a)) or np.isfinite(a).all():
            return None
        bad, expected = ~np.isfinite(a), "finite values"
    elif part.kind == "image":
        if a.dtype == np.uint8 or (a.min(initial=0) >= 0 and a.max(initial=0) <= 255):
            return None
        bad, expected = (a < 0) | (a > 255), "values in [0, 255] (a uint8 image)"
    elif part.kind == "binary":
        if a.dtype == np.bool_ or ((a == 0) | (a == 1)).all():
            return None
        bad, expected = (a != 0) & (a != 1), "0 or 1 (MultiBinary)"
    else:  # Discrete, MultiDiscrete: integers in [start, start + n)
        low = space.start
        high = low + (space.n if part.kind == "onehot" else space.nvec)
        bad = (a < low) | (a >= high)
        if not bad.any():
            return None
        expected = None
    index = tuple(int(i) for i in np.argwhere(bad)[0])
    if expected is None:
        j = () if part.kind == "onehot" else index[-1]
        expected = f"an integer in [{low[j]}, {high[j]}) ({type(space).__name__})"
    row, index = (index[0], index[1:]) if batch else (None, index)
    return row, index, f"is {a[(row, *index) if batch else index].item()!r}", expected


# ----------------------------------------------------------------------------- batches of either form
class Sequences(NamedTuple):
    """A recurrent policy's batch (`trpo_ext.recurrent`): B sequences of T steps, rows time-major
    (row t·B + b). `check_sequences` holds a batch to it."""

    obs: torch.Tensor  # (T, B, D), the policy's input
    episode_starts: torch.Tensor  # (T, B) bool: True where a step starts an episode (the state before it is zero)
    initial_state: tuple  # the state before step 0: (h, c) (LSTM) or (h,) (GRU), each (layers, B, hidden)
    valid: torch.Tensor | None = None  # (T, B) bool, rows that count (False: padding; the critic's fit); None: all


def batch_len(obs) -> int:
    """Rows of a preprocessed batch (a tensor, a dict of tensors, or Sequences: T·B)."""
    if isinstance(obs, Sequences):
        return obs.episode_starts.numel()
    return next(iter(obs.values())).shape[0] if isinstance(obs, dict) else obs.shape[0]


def cat(batches: list):
    if isinstance(batches[0], dict):
        return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    return torch.cat(batches)


def rows(obs, index):
    """The rows `index` (a tensor of indices or a slice) of a preprocessed batch; of Sequences, the
    sequences (columns) `index`, each whole."""
    if isinstance(obs, Sequences):
        return Sequences(obs.obs[:, index], obs.episode_starts[:, index], tuple(s[:, index] for s in obs.initial_state),
                         None if obs.valid is None else obs.valid[:, index])
    if isinstance(obs, dict):
        return {k: v[index] for k, v in obs.items()}
    return obs[index]


def sequence_columns(seq: Sequences, returns: torch.Tensor) -> list[torch.Tensor]:
    """Sequences and their (T·B,) returns as tensors with one row per sequence (for a gather of
    whole sequences); `from_sequence_columns` undoes it."""
    T, B = seq.episode_starts.shape
    valid = torch.ones_like(seq.episode_starts) if seq.valid is None else seq.valid
    return [seq.obs.transpose(0, 1), seq.episode_starts.t(), valid.t(), returns.view(T, B).t(),
            *(s.transpose(0, 1) for s in seq.initial_state)]


def from_sequence_columns(columns: list[torch.Tensor], with_valid: bool) -> tuple[Sequences, torch.Tensor]:
    obs, starts, valid, returns, *state = columns
    return (Sequences(obs.transpose(0, 1), starts.t(), tuple(s.transpose(0, 1) for s in state),
                      valid.t() if with_valid else None), returns.t().reshape(-1))


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
