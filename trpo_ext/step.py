"""The TRPO policy step on a batch the caller collected (docs/design.md, "The trust-region step").

    record = trpo_ext.trust_region_step(policy, obs, actions, advantages, max_kl=0.01)

One forward pass of the policy gives the surrogate's gradient g and the old distribution; CG
solves (F + λI) x = g; the step size β = sqrt(2δ / xᵀAx) needs no extra product (CG returns
xᵀAx); the backtracking line search accepts the first trial β·fᵏ·x whose mean KL(old‖new) is ≤ δ
and whose surrogate improved; θ is written once, with that trial, and otherwise left exactly as it
was. Non-finite values never reach θ.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch
from torch.distributions import Distribution, kl_divergence

from . import _ops, distributed
from ._ops import flat_vector, load_flat_, unflatten
from .config import TrustRegionConfig
from .distributions import detach_distribution, family_of, masked
from .fisher import CGInfo, check_inputs, check_policy, choose_path, generic_cg_solve, recurrent_cg_solve
from .policies import RecurrentFusedSpec
from .spaces import Sequences, batch_len


@dataclass(frozen=True)
class StepRecord:
    """What one `trust_region_step` did."""

    accepted: bool
    """Whether a trial was accepted (θ moved); otherwise θ is exactly as before."""
    kl: float
    """Mean KL(old‖new) of the accepted step; 0.0 when none was accepted."""
    improvement: float
    """Surrogate improvement of the accepted step; 0.0 when none was accepted."""
    expected_improvement: float
    """β·gᵀx, the first-order prediction for the full step; NaN when CG gave no usable direction."""
    line_search_steps: int
    """Trials evaluated (0 when CG gave no usable direction)."""
    cg_iterations: int
    cg_residual: float
    """||g − (F + λI)x|| as tracked by the CG recursion; NaN when the gradient was not finite."""
    entropy: float
    """Mean entropy of the old policy over the batch."""
    policy_std: float
    """Mean standard deviation of a Gaussian old policy over the batch and action dimensions; NaN otherwise."""
    time_cg: float
    """Seconds for the forward pass, the gradient and the CG solve."""
    time_line_search: float
    """Seconds for the step size and the line search."""


@contextmanager
def _unvalidated_distributions():
    # The line search must be able to look at any candidate θ: a distribution whose argument
    # checks raise would abort the step instead of rejecting the trial.
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        Distribution.set_default_validate_args(previous)


def _check_batch(obs, actions, advantages) -> None:
    for name, t in (("obs", obs), ("actions", actions), ("advantages", advantages)):
        if not isinstance(t, torch.Tensor) and not (name == "obs" and (isinstance(obs, dict) and obs or
                                                                       isinstance(obs, Sequences))):
            raise TypeError(f"{name} must be a torch.Tensor{' (or a dict of them, or Sequences)' if name == 'obs' else ''}"
                            f", got {type(t).__name__}")
    # Sequences (a recurrent policy's batch): T·B rows, time-major; check_inputs checks its fields.
    n = batch_len(obs) if isinstance(obs, (dict, Sequences)) or obs.dim() else 0
    if n == 0:
        raise ValueError(f"obs must be a non-empty batch (N, ...), got shape {tuple(obs.shape)}")
    if advantages.shape != (n,):
        raise ValueError(f"advantages must have shape ({n},) (one per observation), got {tuple(advantages.shape)}")
    if actions.dim() == 0 or actions.shape[0] != n:
        raise ValueError(f"actions must have one row per observation ({n}), got shape {tuple(actions.shape)}")
    if not advantages.is_floating_point() or not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages must be a finite floating-point tensor")


class _Direction(NamedTuple):
    """With advantages (N, C) (trpo_ext.constrained: reward and cost), gradient and x are (P, C), the
    CGInfo fields (C), and a trial's improvement a list of C floats."""

    gradient: torch.Tensor
    x: torch.Tensor | None  # None when the gradient is not finite
    info: CGInfo | None
    old_dist: Distribution
    trial: Callable[[torch.Tensor], tuple[float, float]]  # candidate θ (flat) -> (mean KL(old‖new), improvement)


def _direction(policy, params, obs, actions, advantages, config: TrustRegionConfig, fvp_obs, path,
               group, action_mask=None, fvp_action_mask=None) -> _Direction:
    """The gradient, the CG solve and the line search's trial function, from one forward pass of the
    policy. The fused ops compute g analytically, share the forward pass with the solve's cache, and
    evaluate a trial without touching θ; the generic path takes g from autograd and evaluates a
    trial by loading it into the policy. With a process group every mean is over all ranks' shards
    (docs/distributed.md): 2 + (CG iterations) reductions here, one per trial."""
    fused = choose_path(policy, path)
    # A fused recurrent policy: g from autograd as on the generic path, the solve in the extension (rnn_cg).
    recurrent = isinstance(fused, RecurrentFusedSpec)
    products_obs = obs if fvp_obs is None else fvp_obs
    name = distributed.group_name(group)
    if fused is not None and not recurrent:
        check_inputs(policy, params, fused, obs=obs, fvp_obs=products_obs)  # actions: the ops check them
        result = _ops.mlp_policy_direction(obs, [p.detach() for p in params], actions, advantages,
                                           damping=config.damping, iters=config.cg_iters, rtol=config.cg_rtol,
                                           fvp_obs=fvp_obs, group=name,
                                           **fused.op_kwargs(action_mask=action_mask, fvp_action_mask=fvp_action_mask))
        with torch.no_grad():
            old_dist = policy.distribution(result.dist_params)
        old_log_std = params[-1].detach().clone() if fused.action.family.has_log_std else None

        def trial(candidate):
            kl, improvement = _ops.mlp_policy_trial(obs, unflatten(candidate, params), actions, advantages,
                                                    old_dist_params=result.dist_params, old_log_std=old_log_std,
                                                    group=name, **fused.op_kwargs(action_mask=action_mask))
            return kl.item(), improvement.tolist()  # a float, or C of them

        g, x, info = result.gradient, result.x, CGInfo(result.iterations, result.residual_norm, result.xAx)
        if not bool(torch.isfinite(g).all()):
            x = info = None
    else:
        check_inputs(policy, params, fused, obs=obs, fvp_obs=products_obs)
        n_total, m_total = batch_len(obs), batch_len(products_obs)
        if group is not None:  # the batch sizes of all ranks: one reduction
            counts = distributed.all_reduce_sum_(torch.tensor([n_total, m_total], dtype=torch.float64,
                                                              device=advantages.device), group).tolist()
            n_total, m_total = counts
        with torch.enable_grad():
            dist = policy(obs)
            spec = family_of(dist).spec_of(dist)
            if action_mask is not None:
                spec.check_mask_tensor("action_mask", action_mask, batch_len(obs), advantages.device, actions)
                dist = masked(dist, action_mask)
            log_prob = dist.log_prob(actions)
            ratio = torch.exp(log_prob - log_prob.detach())
            if advantages.dim() == 1:
                surrogate = (ratio * advantages).sum() / n_total
                g = flat_vector(torch.autograd.grad(surrogate, params))
            else:  # one surrogate per column, each its gradient from the same graph
                surrogates = (ratio.unsqueeze(1) * advantages).sum(0) / n_total
                g = torch.stack([flat_vector(torch.autograd.grad(surrogate, params, retain_graph=True))
                                 for surrogate in surrogates], 1)
            g = distributed.all_reduce_sum_(g, group)
        old_dist, old_log_prob = detach_distribution(dist), log_prob.detach()

        def trial(candidate):
            load_flat_(candidate, params)
            with _unvalidated_distributions(), torch.no_grad():
                dist = masked(policy(obs), action_mask)
                ratio_minus_one = torch.expm1(dist.log_prob(actions) - old_log_prob)
                improvement = ((ratio_minus_one * advantages).sum().reshape(1) if advantages.dim() == 1
                               else (ratio_minus_one.unsqueeze(1) * advantages).sum(0))
                sums = torch.cat([kl_divergence(old_dist, dist).sum().reshape(1), improvement])
                kl, *improvement = (distributed.all_reduce_sum_(sums.double(), group) / n_total).tolist()
                return kl, improvement[0] if advantages.dim() == 1 else improvement

        products_mask = action_mask if fvp_obs is None else fvp_action_mask
        if fvp_obs is not None and (action_mask is None) != (fvp_action_mask is None):
            raise ValueError("fvp_action_mask must be given with fvp_obs exactly when action_mask is")
        if fvp_action_mask is not None:
            spec.check_mask_tensor("fvp_action_mask", fvp_action_mask, batch_len(fvp_obs), advantages.device)
        x = info = None
        if bool(torch.isfinite(g).all()):
            share = batch_len(products_obs) / m_total

            def over_ranks(fv):  # this rank's share of F v over all ranks' states, summed: one reduction
                return distributed.all_reduce_sum_(fv * share, group)

            if recurrent:  # data-parallel: the op sums each product over the ranks (one reduction)
                x, info = recurrent_cg_solve(fused, products_obs, params, g, config.damping, config.cg_iters,
                                             config.cg_rtol, mask=products_mask,
                                             mean_over=0.0 if group is None else m_total, group=name)
            else:
                x, info = generic_cg_solve(policy, products_obs, params, g, config.damping, config.cg_iters,
                                           config.cg_rtol, combine=None if group is None else over_ranks,
                                           mask=products_mask)
    return _Direction(g, x, info, old_dist, trial)


def line_search(trial: Callable[[torch.Tensor], tuple[float, float]], old_params: torch.Tensor,
                full_step: torch.Tensor, config: TrustRegionConfig):
    """Backtracking on `full_step`: tries old_params + fᵏ·full_step for k = 0 … max_backtracks − 1
    (f = backtrack_factor) and accepts the first whose `trial` (mean KL, surrogate improvement) has
    KL ≤ max_kl and improvement > 0. A candidate with a non-finite entry is skipped, never evaluated.
    Returns (trials counted, (candidate, kl, improvement) or None)."""
    fraction = 1.0
    for k in range(1, config.max_backtracks + 1):
        candidate = old_params + fraction * full_step
        fraction *= config.backtrack_factor
        if not bool(torch.isfinite(candidate).all()):
            continue
        kl, improvement = trial(candidate)
        if math.isfinite(kl) and math.isfinite(improvement) and kl <= config.max_kl and improvement > 0:
            return k, (candidate, kl, improvement)
    return config.max_backtracks, None


def trainable_parameters(policy: torch.nn.Module, step: str) -> list[torch.Tensor]:
    """The policy's parameters (`fisher.check_policy`), every one of which a step (named `step`) moves;
    ValueError naming those that do not require grad."""
    params = check_policy(policy)
    frozen = [name for name, p in policy.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"policy: {step} optimizes every parameter; these do not require grad: {frozen}")
    return params


def record_finisher(record_class, record: dict, start: float):
    """`finish(**changes)`: a step's record (`record_class`) from `record` and `changes`, with the time
    since `start` as the direction's (`time_cg`, unless already set) or else the line search's."""
    def finish(**changes):
        now = time.perf_counter()
        if record["time_cg"] == 0.0:
            record["time_cg"] = now - start
        else:
            record["time_line_search"] = now - start - record["time_cg"]
        return record_class(**{**record, **changes})
    return finish


def trust_region_step(policy: torch.nn.Module, obs: torch.Tensor, actions: torch.Tensor,
                      advantages: torch.Tensor, *, max_kl: float = 0.01, damping: float = 0.1,
                      cg_iters: int = 10, cg_rtol: float = 1e-10, backtrack_factor: float = 0.8,
                      max_backtracks: int = 10, fvp_obs: torch.Tensor | None = None,
                      path: str = "auto", process_group=None, action_mask: torch.Tensor | None = None,
                      fvp_action_mask: torch.Tensor | None = None) -> StepRecord:
    """One TRPO policy step on (obs, actions, advantages); moves `policy`'s parameters in place.

    Args:
        policy: an `MLPPolicy` (fused Fisher-vector products) or any module whose `forward(obs)`
            returns the distribution of one of `trpo_ext.distributions`' action families (generic
            path). Every parameter is optimized and must require grad.
        obs, actions: the batch the policy acted on (obs: a tensor, or a dict of tensors for a
            policy that takes one); actions as the policy's distribution samples them (the
            family's table in `trpo_ext.distributions`; a Gaussian's unclipped sample).
        advantages: one per observation, used as given (normalize them first if you want that).
        max_kl, damping, cg_iters, cg_rtol, backtrack_factor, max_backtracks: see
            `trpo_ext.config.TrustRegionConfig`.
        fvp_obs: observations for the Fisher-vector products only (e.g. a random subset of obs);
            None uses obs.
        path: "auto", "fused" or "generic" (`trpo_ext.fisher`).
        process_group: a torch.distributed ProcessGroup (or "auto": the default group when one is
            initialised) for one data-parallel step: every rank of the group calls this with its own
            shard of the batch (shards may differ in size; fvp_obs too is per rank), the same
            policy parameters and settings, and every rank takes the step a single process would
            take on all shards together. None: this process alone. Reductions: the batch sizes,
            the gradient, one per CG product, one per line-search trial (docs/distributed.md).
        action_mask: invalid-action masks of obs's rows, bool (N, logits), True = allowed, for a
            (Multi)Categorical policy: the step is that of the masked policy (masked logits set to
            `trpo_ext.distributions.MASKED_LOGIT`: probability exactly 0, no part in the KL, the
            gradient or the Fisher). Every action taken must be allowed.
        fvp_action_mask: the masks of fvp_obs's rows; required with fvp_obs exactly when action_mask is given.
    Returns:
        a `StepRecord` (entropy and policy_std describe this rank's shard; the rest is the same on
        every rank).
    """
    config = TrustRegionConfig(max_kl, damping, cg_iters, cg_rtol, backtrack_factor, max_backtracks)
    _check_batch(obs, actions, advantages)
    params = trainable_parameters(policy, "trust_region_step")

    group = distributed.resolve_group(process_group)

    start = time.perf_counter()
    direction = _direction(policy, params, obs, actions, advantages, config, fvp_obs, path, group,
                           action_mask, fvp_action_mask)
    g, x, info, old_dist = direction.gradient, direction.x, direction.info, direction.old_dist
    old_params = flat_vector(params).detach()
    record = dict(accepted=False, kl=0.0, improvement=0.0, expected_improvement=float("nan"), line_search_steps=0,
                  cg_iterations=0, cg_residual=float("nan"), entropy=old_dist.entropy().mean().item(),
                  policy_std=family_of(old_dist).mean_std(old_dist), time_cg=0.0, time_line_search=0.0)

    finish = record_finisher(StepRecord, record, start)

    if x is None:  # the gradient was not finite
        return finish()
    xAx = info.xAx.item()
    record.update(cg_iterations=int(info.iterations), cg_residual=info.residual_norm.item())
    if not (math.isfinite(xAx) and xAx > 0 and bool(torch.isfinite(x).all())):
        return finish()
    record["time_cg"] = time.perf_counter() - start

    # Backtracking line search on β·x.
    full_step = math.sqrt(2.0 * config.max_kl / xAx) * x
    record["expected_improvement"] = torch.dot(g, full_step).item()
    accepted = None
    with torch.no_grad():
        try:
            record["line_search_steps"], accepted = line_search(direction.trial, old_params, full_step, config)
        finally:  # also when a trial raised: a generic trial loads its candidate into the policy
            load_flat_(old_params if accepted is None else accepted[0], params)
    if accepted is None:
        return finish()
    return finish(accepted=True, kl=accepted[1], improvement=accepted[2])
