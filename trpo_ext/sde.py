"""Generalized state-dependent exploration (gSDE, Raffin et al. 2021), as stable-baselines3 does it
(its StateDependentNoiseDistribution in an ActorCriticPolicy): `SDEPolicy`, the built-in
"MlpPolicy" of `TRPO(env, use_sde=True)`.

The exploration noise is a linear function of the policy's last hidden features φ(s) (detached, as
sb3's `learn_features=False`): action = μ(s) + φ(s) E, E (F, A) drawn from N(0, σ²) per (feature,
action) entry every `sde_sample_freq` rollout steps (−1: once per rollout, at its start), one E per
env. At a state the action is then a diagonal Gaussian with mean μ(s) and variance
σ_j(s)² = Σ_i φ_i(s)² σ_ij² + ε (ε = 1e-6, sb3's), σ = exp(log_std) (or sb3's `expln`), log_std a
(F, A) parameter (`full_std`) or one per feature (F, 1) broadcast over the actions. Its KL, gradient
and Fisher are that Gaussian's (`distributions.SDENormal`): the Fisher-vector products take the
generic path (docs/design.md §4), whose M is 1/σ² on μ's tangent and 2/σ² on σ's; since φ is
detached, σ depends on log_std only and the Fisher has no μ–log_std cross block.
"""
from __future__ import annotations

import torch
from torch import nn

from .distributions import ActionSpec

EPSILON = 1e-6
"""Added to the variance (sb3's StateDependentNoiseDistribution's epsilon)."""


class _SDELogStd(nn.Module):
    """The (F, A) or (F, 1) log-std, in a submodule so that it comes last in `parameters()`."""

    def __init__(self, features: int, actions: int, init: float):
        super().__init__()
        self.log_std = nn.Parameter(torch.full((features, actions), float(init)))


class SDEPolicy(nn.Module):
    """An MLP policy with gSDE exploration (module doc) for a 1-D Box action space; built by
    `policies.sde_policy` (which makes its MLP `layers`, hidden activation `act`, the way MLPPolicy's).

    Args: the MLP, its activation's name, the ActionSpec, log_std_init, full_std (one σ per
    (feature, action) instead of per feature), use_expln (σ = expln(log_std), sb3's option that
    keeps σ above 0 and slows its growth), sample_freq (sde_sample_freq: a new noise matrix every
    that many rollout steps; -1: once per rollout, at its start).

    The noise matrices `noise` (n, F, A) and `noise_step` (rollout steps sampled with them) are the
    exploration's state: a checkpoint keeps them (`noise_state`), `predict(deterministic=False)`
    uses them, and the rollout advances them (`rollout_step`)."""

    def __init__(self, layers: nn.ModuleList, act: nn.Module, activation: str, spec: ActionSpec,
                 log_std_init: float = 0.0, full_std: bool = True, use_expln: bool = False, sample_freq: int = -1):
        super().__init__()
        if not spec.family.sde:
            spec.family.sde_distribution(spec, None, None, None, None)  # its TypeError
        self.action_spec, self.layers, self.act, self.activation = spec, layers, act, activation
        self.obs_dim, self.action_dim = layers[0].in_features, spec.width
        self.features_dim = layers[-1].in_features
        self.full_std, self.use_expln, self.sample_freq = bool(full_std), bool(use_expln), int(sample_freq)
        self.std = _SDELogStd(self.features_dim, self.action_dim if full_std else 1, log_std_init)
        self.noise_step = 0
        # A buffer, so that it follows .to() / .double(), but not in state_dict: its first dimension is
        # the number of envs, which a load may change (the checkpoint keeps it apart: `noise_state`).
        # As sb3's, there is a matrix from the start (the global RNG, which build_networks seeds).
        self.register_buffer("noise", self._draw(1, None), persistent=False)

    @property
    def log_std(self) -> nn.Parameter:
        return self.std.log_std

    def sde_std(self) -> torch.Tensor:
        """σ (F, A) from log_std: exp, or sb3's expln (exp below 0, log1p(x) + 1 above)."""
        log_std = self.std.log_std
        if self.use_expln:
            below = torch.exp(log_std) * (log_std <= 0)
            safe = log_std * (log_std > 0) + EPSILON  # no NaN from log1p of the values below 0
            std = below + (torch.log1p(safe) + 1.0) * (log_std > 0)
        else:
            std = torch.exp(log_std)
        return std if self.full_std else torch.ones(self.features_dim, self.action_dim, dtype=std.dtype,
                                                    device=std.device) * std

    def forward(self, obs: torch.Tensor):
        x, last = obs, len(self.layers) - 1
        for i in range(last):  # indexing: slicing a ModuleList builds a new one per call
            x = self.act(self.layers[i](x))
        mean = self.layers[last](x)
        features = x.detach()  # sb3's learn_features=False: the noise's scale does not train the features
        variance = (features * features) @ self.sde_std().pow(2)
        scale = torch.sqrt(variance + EPSILON)
        return self.action_spec.family.sde_distribution(self.action_spec, mean, scale, features, self.noise)

    # ------------------------------------------------------------------------- the noise
    def _draw(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        std = self.sde_std().detach()
        return std * torch.randn((n, *std.shape), generator=generator, dtype=std.dtype, device=std.device)

    def reset_noise(self, n: int, generator: torch.Generator | None = None) -> None:
        """Draws n new noise matrices (one per env) with `generator`."""
        self.noise, self.noise_step = self._draw(n, generator), 0

    def rollout_step(self, t: int, n: int, generator: torch.Generator) -> None:
        """Before step t of a rollout of n envs: new noise at its start and, with sample_freq > 0,
        every sample_freq steps (sb3's OnPolicyAlgorithm.collect_rollouts)."""
        if t == 0 or (self.sample_freq > 0 and self.noise_step >= self.sample_freq):
            self.reset_noise(n, generator)
        self.noise_step += 1

    def noise_state(self) -> dict:
        """What a checkpoint keeps of the exploration: the noise matrices and their step count."""
        return {"noise": self.noise.detach().clone(), "step": self.noise_step}

    def load_noise_state(self, state: dict) -> None:
        self.noise = state["noise"].to(device=self.log_std.device, dtype=self.log_std.dtype).clone()
        self.noise_step = int(state["step"])

    def extra_repr(self) -> str:
        return (f"obs_dim={self.obs_dim}, action_dim={self.action_dim}, activation={self.activation}, "
                f"full_std={self.full_std}, use_expln={self.use_expln}, sde_sample_freq={self.sample_freq}")
