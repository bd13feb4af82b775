"""The policy distributions, one per action space, and what the agent does with any of them:
masking invalid actions, sampling with the agent's generator, the mode, a detached copy.

    Discrete(n)          Categorical(logits)                      actions int64 (B,)
    MultiDiscrete(nvec)  MultiCategorical(logits, segments=nvec)  actions int64 (B, len(nvec))
    MultiBinary(k)       Independent(Bernoulli(logits), 1)        actions float 0/1 (B, k)
    Box(k)               Independent(Normal(mean, std), 1)        actions float (B, k), unclipped

An invalid-action mask (bool, True = allowed, one entry per logit: (B, n) or (B, sum(nvec))) replaces
the logits of masked actions by MASKED_LOGIT, as sb3-contrib's MaskableCategorical does: their
probability is exactly 0 (exp underflows), they are never sampled, and they contribute exactly 0 to
the KL, the gradient and the Fisher, while every log-probability stays finite.
"""
from __future__ import annotations

import torch
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, Normal, kl_divergence, register_kl

MASKED_LOGIT = -1e8
"""The logit a masked action gets (sb3-contrib's value): exp(MASKED_LOGIT - anything finite) is 0."""


class MultiCategorical(Distribution):
    """Independent categoricals over consecutive segments of one row of logits: the distribution of
    a MultiDiscrete(nvec) action, `segments` = nvec. Its Fisher is block diagonal, one
    diag(p) - p pᵀ per segment."""

    arg_constraints: dict = {}
    has_enumerate_support = False

    def __init__(self, logits: torch.Tensor, segments, validate_args=None):
        self.segments = tuple(int(s) for s in segments)
        if not self.segments or min(self.segments) < 1 or logits.shape[-1] != sum(self.segments):
            raise ValueError(f"MultiCategorical: segments {self.segments} must be positive class counts summing to "
                             f"the logits' last dimension {logits.shape[-1]}")
        self.raw_logits = logits
        self.parts = [Categorical(logits=part) for part in logits.split(self.segments, -1)]
        super().__init__(batch_shape=logits.shape[:-1], event_shape=(len(self.segments),), validate_args=False)

    @property
    def logits(self) -> torch.Tensor:
        """Each segment's normalized logits (log-probabilities), side by side."""
        return torch.cat([part.logits for part in self.parts], -1)

    @property
    def probs(self) -> torch.Tensor:
        return torch.cat([part.probs for part in self.parts], -1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return sum(part.log_prob(value[..., s]) for s, part in enumerate(self.parts))

    def entropy(self) -> torch.Tensor:
        return sum(part.entropy() for part in self.parts)

    @property
    def mode(self) -> torch.Tensor:
        return torch.stack([part.probs.argmax(-1) for part in self.parts], -1)

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        return torch.stack([part.sample(sample_shape) for part in self.parts], -1)


@register_kl(MultiCategorical, MultiCategorical)
def _kl_multicategorical(p: MultiCategorical, q: MultiCategorical) -> torch.Tensor:
    return sum(kl_divergence(a, b) for a, b in zip(p.parts, q.parts))


def base_of(dist: Distribution) -> Distribution:
    """The distribution inside an Independent wrapper (or `dist` itself)."""
    return dist.base_dist if isinstance(dist, Independent) else dist


def masked(dist: Distribution, mask: torch.Tensor | None) -> Distribution:
    """`dist` with the logits of actions where `mask` is False replaced by MASKED_LOGIT (None: `dist`).
    Only Categorical and MultiCategorical take masks; the mask has one entry per logit."""
    if mask is None:
        return dist
    if isinstance(dist, Categorical):
        return Categorical(logits=torch.where(mask, dist.logits, MASKED_LOGIT))
    if isinstance(dist, MultiCategorical):
        return MultiCategorical(torch.where(mask, dist.raw_logits, MASKED_LOGIT), dist.segments)
    raise TypeError(f"action masks apply to Categorical and MultiCategorical policies, got {type(dist).__name__}")


def sample_actions(dist: Distribution, generator: torch.Generator | None, deterministic: bool = False) -> torch.Tensor:
    """Actions from any of the module docstring's distributions, drawn from its parameters with
    `generator` rather than with `Distribution.sample` (which draws from torch's global RNG): so a
    run's actions follow from the agent's own random stream, reproducibly from its seed and across
    save / load, and nothing else that uses the global RNG disturbs them. `generator=None` (what
    `predict` passes) uses the global RNG. Categorical: `torch.multinomial` on the probabilities;
    Bernoulli: uniform < p; Normal: loc + scale * `torch.randn` (the unclipped sample).
    `deterministic`: the mode (the most probable class per segment, p > 1/2, or the mean)."""
    base = base_of(dist)
    if isinstance(base, MultiCategorical):
        return torch.stack([sample_actions(part, generator, deterministic) for part in base.parts], -1)
    if isinstance(base, Categorical):
        probs = base.probs
        if deterministic:
            return probs.argmax(-1)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])
    if isinstance(base, Bernoulli):
        probs = base.probs
        if deterministic:
            return (probs > 0.5).to(probs.dtype)
        return (torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device) < probs
                ).to(probs.dtype)
    if isinstance(base, Normal):
        loc, scale = torch.broadcast_tensors(base.loc, base.scale)
        if deterministic:
            return loc.clone()
        return loc + scale * torch.randn(loc.shape, generator=generator, dtype=loc.dtype, device=loc.device)
    raise TypeError(f"the policy returned a {type(dist).__name__}; expected Categorical, MultiCategorical, "
                    "Independent(Bernoulli) or (Independent) Normal")


def detach_distribution(dist: Distribution) -> Distribution:
    """A copy of any of the module docstring's distributions with no graph."""
    if isinstance(dist, Independent):
        return Independent(detach_distribution(dist.base_dist), dist.reinterpreted_batch_ndims)
    if isinstance(dist, Categorical):
        return Categorical(logits=dist.logits.detach())
    if isinstance(dist, MultiCategorical):
        return MultiCategorical(dist.raw_logits.detach(), dist.segments)
    if isinstance(dist, Bernoulli):
        return Bernoulli(logits=dist.logits.detach())
    if isinstance(dist, Normal):
        return Normal(dist.loc.detach(), dist.scale.detach())
    raise TypeError("policy must return Categorical, MultiCategorical, Independent(Bernoulli) or (Independent) "
                    f"Normal, got {type(dist).__name__}")
