"""The action-distribution families: the one home of what an action distribution is, the Python
mirror of csrc/distribution.h.

    space                family        distribution                             actions
    Discrete(n)          categorical   Categorical(logits)                      int64 (B,)
    MultiDiscrete(nvec)  categorical   MultiCategorical(logits, segments=nvec)  int64 (B, len(nvec))
    MultiBinary(k)       bernoulli     Independent(Bernoulli(logits), 1)        0/1 floats (B, k)
    Box(k), 1-D          gaussian      Independent(Normal(mean, std), 1)        floats (B, k), unclipped
    Box(k), gSDE         gaussian      Independent(SDENormal(mean, std(φ)), 1)  floats (B, k), unclipped

Each family (an `ActionFamily`) says everything that depends on it, for itself only; `ActionSpec`
is one space's family, width and segments. The rest of the package asks it, or
`family_of(distribution)`, and never branches on a kind (docs/design.md, "Rules of the house";
"Adding an action family" is the recipe).

An invalid-action mask (bool, True = allowed, one entry per logit: (B, n) or (B, sum(nvec))) replaces
the logits of masked actions by MASKED_LOGIT, as sb3-contrib's MaskableCategorical does: their
probability is exactly 0 (exp underflows), they are never sampled, and they contribute exactly 0 to
the KL, the gradient and the Fisher, while every log-probability stays finite.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from gymnasium import spaces
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, Normal

from .multicategorical import MultiCategorical

MASKED_LOGIT = -1e8
"""A masked action's logit (sb3-contrib's; csrc/distribution.h's kMaskedLogit): its exp underflows to 0."""


def base_of(dist: Distribution) -> Distribution:
    """The distribution inside an Independent wrapper (or `dist` itself)."""
    return dist.base_dist if isinstance(dist, Independent) else dist


# ----------------------------------------------------------------------------- the spec of one space
@dataclass(frozen=True)
class ActionSpec:
    """An action space as the policy sees it: its family, the network's output width (logits or the
    mean) and, for MultiDiscrete, the class count of each sub-action."""

    family: ActionFamily
    width: int
    segments: tuple[int, ...] | None = None
    space: spaces.Space | None = field(default=None, compare=False, repr=False)
    cache: dict = field(default_factory=dict, compare=False, repr=False)  # a family's values derived from space

    @property
    def kind(self) -> str:
        """The family's name, which is also the fused ops' `kind`."""
        return self.family.name

    @property
    def maskable(self) -> bool:
        """Whether invalid-action masks apply (one mask entry per logit)."""
        return self.family.maskable

    @property
    def bounds(self) -> list[tuple[int, int]]:
        """(first logit, count) of each segment: one segment of `width` without segments."""
        counts = self.segments or (self.width,)
        return [(int(sum(counts[:s])), c) for s, c in enumerate(counts)]

    def op_kwargs(self) -> dict:
        """The action part of a fused op's keyword arguments (`policies.FusedSpec.op_kwargs` adds the rest)."""
        return {"kind": self.kind, "segments": None if self.segments is None else list(self.segments)}

    def distribution(self, out: torch.Tensor, log_std: torch.Tensor | None = None) -> Distribution:
        """The distribution for the network's output `out` (B, width) (and a Gaussian's log_std)."""
        return self.family.distribution(self, out, log_std)

    def check_mask(self, mask, name: str = "action_masks", row: str = "row") -> np.ndarray:
        """`mask` (from an env or a caller of `predict`) as a bool array (B, width), True = allowed;
        ValueError naming `name` (and a row as `row` i: "env" for a vector env's) unless it has that
        shape and every row allows at least one action of every sub-action."""
        if not self.maskable:
            raise ValueError(f"{name}: action masks apply to Discrete and MultiDiscrete actions, not {self.kind}")
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            if not (np.issubdtype(mask.dtype, np.integer) or np.issubdtype(mask.dtype, np.floating)) or \
                    not np.isin(mask, (0, 1)).all():
                raise ValueError(f"{name} must hold booleans (or 0 / 1), got dtype {mask.dtype}")
            mask = mask.astype(bool)
        if mask.ndim != 2 or mask.shape[1] != self.width:
            raise ValueError(f"{name} must have shape (B, {self.width}) (one entry per action"
                             f"{' of every sub-action' if self.segments else ''}), got {mask.shape}")
        for s, (lo, k) in enumerate(self.bounds):
            empty = np.flatnonzero(~mask[:, lo:lo + k].any(1))
            if empty.size:
                which = f" sub-action {s}" if self.segments else ""
                raise ValueError(f"{name}: {row} {int(empty[0])} allows no action{which}; every state needs at least "
                                 "one valid action")
        return mask

    def check_mask_tensor(self, name: str, mask, n: int, device: torch.device,
                          actions: torch.Tensor | None = None) -> None:
        """The checks of a mask given to `fvp`, `cg_solve` or `trust_region_step`, before any work:
        TypeError unless `mask` is a bool tensor on `device`; ValueError unless the family takes masks,
        it has shape (n, width), every segment of every row allows an action and, with `actions`,
        every action taken is allowed (one host read each)."""
        if not self.maskable:
            raise ValueError(f"{name}: action masks apply to Categorical and MultiCategorical policies, not to a "
                             f"{self.kind} policy")
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
        if mask.device != torch.device(device):
            raise TypeError(f"{name} must be on the observations' device {device}, got {mask.device}")
        if mask.shape != (n, self.width):
            raise ValueError(f"{name} must have shape ({n}, {self.width}) (one entry per logit), got {tuple(mask.shape)}")
        allowed = torch.stack([mask[:, lo:lo + k].any(1) for lo, k in self.bounds], 1)
        if not bool(allowed.all()):
            row, s = (int(i) for i in (~allowed).nonzero()[0])
            which = f" in segment {s}" if self.segments else ""
            raise ValueError(f"{name}[{row}] allows no action{which}: every state needs at least one allowed action")
        if actions is None:
            return
        offsets = torch.tensor([lo for lo, _ in self.bounds], device=mask.device)
        taken = mask.gather(1, actions.reshape(n, -1) + offsets)
        if not bool(taken.all()):
            row = int((~taken).any(1).nonzero()[0])
            raise ValueError(f"{name}: the action of row {row} ({actions[row].tolist()}) is masked; a masked action "
                             "cannot have been sampled")

    def env_action(self, actions: torch.Tensor) -> np.ndarray:
        """Sampled actions as the env takes them (a fresh array; `actions` is left as it was)."""
        return self.family.env_action(self, actions)

    def describe(self) -> str:
        """What a policy must return for this space, in words (errors about a custom policy)."""
        return f"{self.family.describe(self)} (the action space {self.space})"

    def fits(self, dist, batch: int) -> bool:
        """Whether `dist` (a custom policy's output on `batch` observations) is this space's distribution."""
        return tuple(dist.batch_shape) == (batch,) and self.family.fits(self, dist)


# ----------------------------------------------------------------------------- the families
class ActionFamily:
    """One family of action distributions. A subclass defines everything below for itself; the
    registry `FAMILIES` lists them, and `action_spec` / `family_of` find one by space or by
    distribution."""

    name: str  # also the fused ops' `kind` (csrc/distribution.h); unique
    space_names: tuple[str, ...]  # the spaces it serves, in words (errors)
    dist_names: tuple[str, ...]  # the distributions it owns, in words (errors)
    dist_types: tuple[type, ...]  # the base distributions it owns (inside Independent, when wrapped)
    maskable = False  # invalid-action masks apply (one per logit)
    has_log_std = False  # a state-independent log-std parameter, last in the policy's parameters
    fused = False  # the extension's ops implement it (csrc/distribution.*): MLPPolicy takes the fused path
    sde = False  # gSDE applies (`sde_distribution`; trpo_ext.sde's policy)

    def spec(self, space) -> ActionSpec | None:
        """The ActionSpec of `space` when this family serves it (TypeError if it serves its kind of
        space but not this one), else None."""
        raise NotImplementedError

    def distribution(self, spec: ActionSpec, out: torch.Tensor, log_std: torch.Tensor | None) -> Distribution:
        raise NotImplementedError

    def owns(self, dist: Distribution) -> bool:
        return isinstance(base_of(dist), self.dist_types)

    def spec_of(self, dist: Distribution) -> ActionSpec:
        """The spec a distribution of this family has (width and segments from its parameters)."""
        return ActionSpec(self, int(self.fisher_outputs(dist)[0].shape[-1]))

    def fisher_outputs(self, dist: Distribution) -> tuple[torch.Tensor, ...]:
        """The parameters the output Fisher acts on (what the generic path linearises)."""
        raise NotImplementedError

    def output_fisher(self, dist: Distribution, n: int, mask: torch.Tensor | None):
        """u -> M u / n on `fisher_outputs`' tangents (a tuple; None: a parameter that does not
        depend on θ, which stays None). With a mask, M is the masked distribution's."""
        raise NotImplementedError

    def mask(self, dist: Distribution, mask: torch.Tensor) -> Distribution:
        raise TypeError(f"action masks apply to Categorical and MultiCategorical policies, got {type(dist).__name__}")

    def sample(self, dist: Distribution, generator: torch.Generator | None, deterministic: bool) -> torch.Tensor:
        raise NotImplementedError

    def detach(self, base: Distribution) -> Distribution:
        """A copy of the base distribution with no graph."""
        raise NotImplementedError

    def env_action(self, spec: ActionSpec, actions: torch.Tensor) -> np.ndarray:
        return actions.cpu().numpy().copy()

    def describe(self, spec: ActionSpec) -> str:
        raise NotImplementedError

    def fits(self, spec: ActionSpec, dist: Distribution) -> bool:
        return isinstance(dist, Independent) and self.owns(dist) and tuple(dist.event_shape) == (spec.width,)

    def action_shape(self, n: int, width: int, segments) -> tuple[int, ...]:
        """The shape of n actions (the fused rollout op's fake kernel)."""
        return (n, width)

    def action_dtype(self, float_dtype: torch.dtype) -> torch.dtype:
        """The dtype of actions sampled by a policy of `float_dtype`."""
        return float_dtype

    def mean_std(self, dist: Distribution) -> float:
        """The mean standard deviation of the distribution (NaN when it has none)."""
        return float("nan")

    def sde_distribution(self, spec: ActionSpec, mean, scale, features, noise) -> Distribution:
        """gSDE's distribution (`SDENormal`), for a family where `sde` holds."""
        raise TypeError(f"use_sde: gSDE (state-dependent exploration) applies to Box actions, not to the action "
                        f"space {spec.space}")


class CategoricalFamily(ActionFamily):
    """Discrete(n): one softmax; MultiDiscrete(nvec): one softmax per segment (block-diagonal M)."""

    name, space_names, maskable, fused = "categorical", ("Discrete", "MultiDiscrete"), True, True
    dist_types, dist_names = (Categorical, MultiCategorical), ("Categorical", "MultiCategorical")

    def spec(self, space):
        if isinstance(space, spaces.Discrete):
            if int(space.start) != 0:
                raise TypeError(f"action_space: Discrete spaces must start at 0, got start={space.start}")
            return ActionSpec(self, int(space.n), None, space)
        if isinstance(space, spaces.MultiDiscrete):
            if space.nvec.ndim != 1 or np.any(space.start != 0):
                raise TypeError(f"action_space: MultiDiscrete must be 1-D and start at 0, got {space!r}")
            nvec = tuple(int(n) for n in space.nvec)
            return ActionSpec(self, sum(nvec), nvec, space)
        return None

    def distribution(self, spec, out, log_std):
        return Categorical(logits=out) if spec.segments is None else MultiCategorical(out, spec.segments)

    def spec_of(self, dist):
        base = base_of(dist)
        if isinstance(base, MultiCategorical):
            return ActionSpec(self, base.raw_logits.shape[-1], base.segments)
        return ActionSpec(self, base.logits.shape[-1])

    def fisher_outputs(self, dist):
        base = base_of(dist)
        return (base.raw_logits,) if isinstance(base, MultiCategorical) else (base.logits,)

    def output_fisher(self, dist, n, mask):
        probs = self.mask(base_of(dist), mask).probs.detach()
        segments = self.spec_of(dist).segments or (probs.shape[-1],)

        def apply(t):  # M u = p * u - p (p'u), p'u per segment
            (u,) = t
            pu = probs * u
            if len(segments) == 1:
                dot = pu.sum(-1, keepdim=True)
            else:
                dot = torch.cat([part.sum(-1, keepdim=True).expand_as(part) for part in pu.split(segments, -1)], -1)
            return ((pu - probs * dot) / n,)
        return apply

    def mask(self, dist, mask):
        if mask is None:
            return dist
        base = base_of(dist)
        if isinstance(base, MultiCategorical):
            return MultiCategorical(torch.where(mask, base.raw_logits, MASKED_LOGIT), base.segments)
        return Categorical(logits=torch.where(mask, base.logits, MASKED_LOGIT))

    def sample(self, dist, generator, deterministic):
        base = base_of(dist)
        if isinstance(base, MultiCategorical):
            return torch.stack([self.sample(part, generator, deterministic) for part in base.parts], -1)
        probs = base.probs
        if deterministic:
            return probs.argmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])

    def detach(self, base):
        if isinstance(base, MultiCategorical):
            return MultiCategorical(base.raw_logits.detach(), base.segments)
        return Categorical(logits=base.logits.detach())

    def env_action(self, spec, actions):
        return actions.cpu().numpy()

    def describe(self, spec):
        if spec.segments is None:
            return f"Categorical(logits=...) with batch_shape (B,) and {spec.width} classes"
        return f"trpo_ext.MultiCategorical(logits, segments={spec.segments}) with batch_shape (B,)"

    def fits(self, spec, dist):
        if spec.segments is None:
            return isinstance(dist, Categorical) and dist.param_shape[-1] == spec.width
        return isinstance(dist, MultiCategorical) and dist.segments == spec.segments

    def action_shape(self, n, width, segments):
        return (n,) if segments is None else (n, len(segments))

    def action_dtype(self, float_dtype):
        return torch.int64


class BernoulliFamily(ActionFamily):
    """MultiBinary(k): k independent Bernoullis on k logits; M = diag p(1 - p)."""

    name, space_names, dist_types, dist_names = "bernoulli", ("MultiBinary",), (Bernoulli,), ("Independent(Bernoulli)",)
    fused = True

    def spec(self, space):
        if not isinstance(space, spaces.MultiBinary):
            return None
        if len(space.shape) != 1:
            raise TypeError(f"action_space: MultiBinary must be 1-D, got shape {space.shape}")
        return ActionSpec(self, int(space.shape[0]), None, space)

    def distribution(self, spec, out, log_std):
        return Independent(Bernoulli(logits=out), 1)

    def fisher_outputs(self, dist):
        return (base_of(dist).logits,)

    def output_fisher(self, dist, n, mask):
        logits = base_of(dist).logits
        weight = (torch.sigmoid(logits) * torch.sigmoid(-logits)).detach()  # p (1 - p), accurate when saturated

        def apply(t):
            return (t[0] * weight / n,)
        return apply

    def sample(self, dist, generator, deterministic):
        probs = base_of(dist).probs
        if deterministic:
            return (probs > 0.5).to(probs.dtype)
        return (torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device) < probs
                ).to(probs.dtype)

    def detach(self, base):
        return Bernoulli(logits=base.logits.detach())

    def env_action(self, spec, actions):
        return actions.cpu().numpy().astype(spec.space.dtype)

    def describe(self, spec):
        return f"Independent(Bernoulli(logits=...), 1) with batch_shape (B,) and event_shape ({spec.width},)"


class GaussianFamily(ActionFamily):
    """Box(k), 1-D: a diagonal Gaussian whose mean is the network's output; its scale is a
    state-independent log-std parameter (MLPPolicy) or another network output (a custom policy).
    M = 1/σ² on the mean, 2/σ² on the scale."""

    name, space_names, dist_types, dist_names = "gaussian", ("a 1-D Box",), (Normal,), ("(Independent) Normal",)
    has_log_std, fused, sde = True, True, True

    def spec(self, space):
        if not isinstance(space, spaces.Box):
            return None
        if len(space.shape) != 1:
            raise TypeError(f"action_space: Box must be 1-D, got shape {space.shape}")
        return ActionSpec(self, int(space.shape[0]), None, space)

    def distribution(self, spec, out, log_std):
        return Independent(Normal(out, log_std.exp().expand_as(out)), 1)

    def fisher_outputs(self, dist):
        base = base_of(dist)
        return base.loc, base.scale

    def output_fisher(self, dist, n, mask):
        inv_var = base_of(dist).scale.detach().pow(-2)

        def apply(t):  # mean: 1/sigma^2, scale: 2/sigma^2 (a state-dependent scale is a network output)
            return tuple(None if u is None else u * inv_var / n * w for u, w in zip(t, (1.0, 2.0)))
        return apply

    def sample(self, dist, generator, deterministic):
        base = base_of(dist)
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        if deterministic:
            return loc.clone()
        if isinstance(base, SDENormal):  # gSDE: the noise is the features times the policy's noise matrix
            return loc + base.exploration()
        return loc + scale * torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)

    def detach(self, base):
        return Normal(base.loc.detach(), base.scale.detach())

    def env_action(self, spec, actions):
        # Clipped on a fresh array: `actions` (the unclipped sample, log-probabilities use it) stays as it was.
        if "low" not in spec.cache:
            spec.cache.update(low=spec.space.low.astype(np.float32), high=spec.space.high.astype(np.float32))
        a = actions.cpu().numpy()
        a = a.copy() if actions.device.type == "cpu" else a
        np.maximum(a, spec.cache["low"], out=a)
        return np.minimum(a, spec.cache["high"], out=a)

    def describe(self, spec):
        return f"Independent(Normal(mean, std), 1) with batch_shape (B,) and event_shape ({spec.width},)"

    def mean_std(self, dist):
        return base_of(dist).scale.mean().item()

    def sde_distribution(self, spec, mean, scale, features, noise):
        return Independent(SDENormal(mean, scale, features, noise), 1)


class SDENormal(Normal):
    """gSDE's diagonal Gaussian (stable-baselines3's StateDependentNoiseDistribution; trpo_ext.sde):
    Normal(mean, scale) with scale_j² = Σ_i features_i² σ_ij² + ε, whose samples are not
    mean + scale·ε but mean + features @ noise, `noise` (n, F, A) a matrix the policy draws from
    N(0, σ²) every `sde_sample_freq` steps: row r of a batch of n rows uses noise[r] (one matrix per
    env), any other batch noise[0]. Log-probabilities, the KL and the Fisher are Normal's."""

    def __init__(self, loc, scale, features: torch.Tensor, noise: torch.Tensor, validate_args=None):
        super().__init__(loc, scale, validate_args)
        self.features, self.noise = features, noise

    def exploration(self) -> torch.Tensor:
        """features @ noise: the noise added to the mean, (B, A)."""
        if self.noise.shape[0] == self.features.shape[0] > 1:
            return torch.bmm(self.features.unsqueeze(1), self.noise).squeeze(1)
        return self.features @ self.noise[0]



CATEGORICAL, BERNOULLI, GAUSSIAN = CategoricalFamily(), BernoulliFamily(), GaussianFamily()
FAMILIES: tuple[ActionFamily, ...] = (CATEGORICAL, BERNOULLI, GAUSSIAN)
"""Every action family, in the order spaces and distributions are matched against them."""


def action_spec(action_space) -> ActionSpec:
    """The ActionSpec of a supported action space; TypeError naming the space otherwise."""
    for family in FAMILIES:
        spec = family.spec(action_space)
        if spec is not None:
            if spec.width == 0:  # Box(shape=(0,)), MultiDiscrete([]): a policy with no output, no action to take
                raise TypeError(f"action_space {action_space!r} is empty: it has no action to take (a policy needs "
                                "at least one output)")
            return spec
    raise TypeError(f"action_space must be {_either(f.space_names for f in FAMILIES)} (Tuple and Dict actions are "
                    f"not supported), got {action_space!r}")


def family_of(dist: Distribution) -> ActionFamily:
    """The family of a policy's distribution; TypeError naming what it is otherwise."""
    for family in FAMILIES:
        if family.owns(dist):
            return family
    raise TypeError(f"the policy must return {_either(f.dist_names for f in FAMILIES)}, got {type(dist).__name__}")


def _either(groups) -> str:
    """'a, b or c' from the families' word lists."""
    words = [word for group in groups for word in group]
    return f"{', '.join(words[:-1])} or {words[-1]}"


def family_named(kind: str) -> ActionFamily:
    """The family whose name (the fused ops' kind) is `kind`."""
    for family in FAMILIES:
        if family.name == kind:
            return family
    raise ValueError(f"kind must be one of {[f.name for f in FAMILIES]}, got {kind!r}")


# ----------------------------------------------------------------------------- on any distribution
def masked(dist: Distribution, mask: torch.Tensor | None) -> Distribution:
    """`dist` with the logits of actions where `mask` is False replaced by MASKED_LOGIT (None: `dist`).
    Only Categorical and MultiCategorical take masks; the mask has one entry per logit."""
    return dist if mask is None else family_of(dist).mask(dist, mask)


def sample_actions(dist: Distribution, generator: torch.Generator | None, deterministic: bool = False) -> torch.Tensor:
    """Actions from the distribution, drawn from its parameters with `generator` rather than with
    `Distribution.sample` (which draws from torch's global RNG): so a run's actions follow from the
    agent's own random stream, reproducibly from its seed and across save / load, and nothing else
    that uses the global RNG disturbs them. `generator=None` (what `predict` passes) uses the global
    RNG. `deterministic`: the mode (the most probable class per segment, p > 1/2, or the mean)."""
    return family_of(dist).sample(dist, generator, deterministic)


def detach_distribution(dist: Distribution) -> Distribution:
    """A copy of the distribution with no graph."""
    if isinstance(dist, Independent):
        return Independent(detach_distribution(dist.base_dist), dist.reinterpreted_batch_ndims)
    return family_of(dist).detach(dist)
