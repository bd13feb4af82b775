"""MultiCategorical: the torch distribution of a MultiDiscrete action (its family, with
Categorical's, is `trpo_ext.distributions.CategoricalFamily`)."""
from __future__ import annotations

import torch
from torch.distributions import Categorical, Distribution, kl_divergence, register_kl


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
