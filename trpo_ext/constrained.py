"""The CPO policy step (Achiam et al. 2017, §6) on a batch the caller collected (docs/design.md,
"The constrained step").

    record = trpo_ext.constrained_step(policy, obs, actions, advantages, cost_advantages,
                                       cost_violation=ep_cost - cost_limit, max_kl=0.01)

One forward pass gives the reward surrogate's gradient g and the cost surrogate's gradient b; one
two-column CG solve (the fused ops' (N, 2) advantages) gives x ≈ F⁻¹g and y ≈ F⁻¹b; with
q = gᵀF⁻¹g (xᵀAx), r = gᵀF⁻¹b and s = bᵀF⁻¹b the dual of

    max gᵀΔ  s.t.  c + bᵀΔ ≤ 0,  ΔᵀFΔ ≤ 2δ

is solved in closed form (`cpo_dual`, every case), and the backtracking line search accepts the
first trial whose KL is ≤ δ, whose cost surrogate rose by at most max(−c, 0) and, in the feasible
cases, whose reward surrogate improved. θ is written once, with that trial, and otherwise left
exactly as it was.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import NamedTuple

import torch

from . import distributed
from ._ops import flat_vector, load_flat_
from .config import TrustRegionConfig, check_float
from .distributions import family_of
from .step import _check_batch, _direction, record_finisher, trainable_parameters

B_SMALL = 1e-6
"""bᵀb at or below this: the cost gradient is treated as zero (OmniSafe's threshold)."""

CASES = {
    4: "feasible, cost gradient ≈ 0: TRPO step",
    3: "feasible, constraint inactive in the trust region: TRPO step",
    2: "feasible, constraint boundary crosses the trust region",
    1: "infeasible, constraint boundary crosses the trust region",
    0: "infeasible, trust region entirely infeasible: recovery along −F⁻¹b",
}
"""The dual's cases by OmniSafe's optim_case number."""


@dataclass(frozen=True)
class ConstrainedStepRecord:
    """What one `constrained_step` did."""

    case: int
    """The dual's case, OmniSafe's optim_case (`CASES`); 0 and 1 are recovery from an infeasible θ."""
    accepted: bool
    """Whether a trial was accepted (θ moved); otherwise θ is exactly as before."""
    kl: float
    """Mean KL(old‖new) of the accepted step; 0.0 when none was accepted."""
    improvement: float
    """Reward surrogate change mean((π/π_old − 1)·A) of the accepted step; 0.0 when none was accepted."""
    cost_change: float
    """Cost surrogate change mean((π/π_old − 1)·A_C) of the accepted step; 0.0 when none was accepted."""
    expected_improvement: float
    """gᵀΔ for the full step Δ; NaN when there was no usable direction."""
    expected_cost_change: float
    """bᵀΔ for the full step Δ; NaN when there was no usable direction."""
    nu: float
    """ν*, the multiplier of the cost constraint (0 when the TRPO step is taken)."""
    lam: float
    """λ*, the multiplier of the trust region (0 in case 0)."""
    q: float
    r: float
    s: float
    """gᵀF⁻¹g, gᵀF⁻¹b, bᵀF⁻¹b (F with damping), from the two CG solutions; NaN without a direction."""
    reward_direction_norm: float
    """||x||, x ≈ (F + λI)⁻¹g."""
    cost_direction_norm: float
    """||y||, y ≈ (F + λI)⁻¹b."""
    step_norm: float
    """||Δ|| of the full step (before backtracking); NaN without a usable direction."""
    line_search_steps: int
    cg_iterations: tuple[int, int]
    """CG iterations of the reward and the cost solve."""
    cg_residual: tuple[float, float]
    entropy: float
    policy_std: float
    time_cg: float
    """Seconds for the forward pass, both gradients and the two-column solve."""
    time_line_search: float


class Dual(NamedTuple):
    """`cpo_dual`'s answer: the full step is Δ = x_coef·x + y_coef·y."""

    case: int
    lam: float
    nu: float
    x_coef: float
    y_coef: float


def cpo_dual(q: float, r: float, s: float, c: float, max_kl: float, b_small: bool) -> Dual:
    """The closed-form solution of max gᵀΔ s.t. c + bᵀΔ ≤ 0, ΔᵀFΔ ≤ 2δ (Achiam et al. 2017, eq. 13
    with g the reward gradient: ν* = (λ*c + r)₊/s, Δ = (x − ν*y)/λ*). `b_small`: bᵀb ≤ B_SMALL.
    A Δ with a zero or non-finite coefficient is returned as it is: the line search skips it."""
    two_delta = 2.0 * max_kl
    trpo = math.sqrt(two_delta / q)
    if b_small:
        # Cost gradient ≈ 0: the linearised cost does not move. Feasible: TRPO; infeasible: no
        # direction can recover (OmniSafe divides by s ≈ 0 here), so no step.
        return Dual(4, 1.0 / trpo, 0.0, trpo, 0.0) if c < 0 else Dual(0, 0.0, 0.0, 0.0, 0.0)
    A = max(q - r * r / s, 0.0)  # ≥ 0 by Cauchy–Schwarz; CG rounding can make it a hair negative
    B = two_delta - c * c / s
    if c < 0 and B < 0:
        return Dual(3, 1.0 / trpo, 0.0, trpo, 0.0)
    if c >= 0 and B < 0:
        nu = math.sqrt(two_delta / s)
        return Dual(0, 0.0, nu, 0.0, -nu)
    case = 2 if c < 0 else 1
    # λ in Λ_a (the constraint binds: λc + r > 0) or Λ_b (it does not); maximise the dual over each.
    bound = -r / c if c != 0 else (math.inf if r > 0 else 0.0)

    def f_a(lam):
        return -0.5 * (A / lam + B * lam) + r * c / s

    def f_b(lam):
        return -0.5 * (q / lam + two_delta * lam)

    lam_a, lam_b = math.sqrt(A / B) if B > 0 else math.inf, math.sqrt(q / two_delta)
    if c < 0:  # Λ_a = [0, −r/c), Λ_b = [max(0, −r/c), ∞)
        a_set, b_set = (0.0, bound) if bound > 0 else None, (max(0.0, bound), math.inf)
    elif c > 0:  # Λ_a = (max(0, −r/c), ∞), Λ_b = [0, −r/c]
        a_set, b_set = (max(0.0, bound), math.inf), (0.0, bound) if bound >= 0 else None
    else:  # c = 0: the constraint binds for every λ when r > 0, for none otherwise
        a_set, b_set = ((0.0, math.inf), None) if r > 0 else (None, (0.0, math.inf))
    candidates = []
    if a_set is not None:
        lam = min(max(lam_a, a_set[0]), a_set[1])
        candidates.append((f_a(lam) if 0 < lam < math.inf else -math.inf, lam))
    if b_set is not None:
        lam = min(max(lam_b, b_set[0]), b_set[1])
        candidates.append((f_b(lam) if 0 < lam < math.inf else -math.inf, lam))
    lam = max(candidates)[1]  # a tie goes to the larger λ (the shorter step)
    nu = max(lam * c + r, 0.0) / s
    return Dual(case, lam, nu, 1.0 / lam, -nu / lam)


def check_cost_inputs(cost_advantages, advantages, cost_violation) -> float:
    if not isinstance(cost_advantages, torch.Tensor):
        raise TypeError(f"cost_advantages must be a torch.Tensor, got {type(cost_advantages).__name__}")
    if cost_advantages.shape != advantages.shape:
        raise ValueError(f"cost_advantages must have the shape of advantages {tuple(advantages.shape)}, got "
                         f"{tuple(cost_advantages.shape)}")
    if cost_advantages.dtype != advantages.dtype or cost_advantages.device != advantages.device:
        raise TypeError(f"cost_advantages must have advantages' dtype and device ({advantages.dtype}, "
                        f"{advantages.device}), got {cost_advantages.dtype} on {cost_advantages.device}")
    if not bool(torch.isfinite(cost_advantages).all()):
        raise ValueError("cost_advantages must be finite")
    return check_float("cost_violation", cost_violation)


def constrained_step(policy: torch.nn.Module, obs: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor,
                     cost_advantages: torch.Tensor, cost_violation: float, *, max_kl: float = 0.01,
                     damping: float = 0.1, cg_iters: int = 15, cg_rtol: float = 1e-10,
                     backtrack_factor: float = 0.8, max_backtracks: int = 20, fvp_obs: torch.Tensor | None = None,
                     path: str = "auto", process_group=None, action_mask: torch.Tensor | None = None,
                     fvp_action_mask: torch.Tensor | None = None) -> ConstrainedStepRecord:
    """One CPO policy step; moves `policy`'s parameters in place.

    Args:
        policy, obs, actions, advantages, fvp_obs, path, process_group, action_mask,
            fvp_action_mask: as for `trpo_ext.trust_region_step`.
        cost_advantages: the cost advantages A_C, one per observation (like advantages).
        cost_violation: c = J_C(θ) − cost limit (the paper's c; > 0 when the policy is infeasible).
        max_kl, damping, cg_iters, cg_rtol, backtrack_factor, max_backtracks: see
            `trpo_ext.config.TrustRegionConfig` (defaults: OmniSafe's CPO: 15 CG iterations, 20 trials).
    Returns:
        a `ConstrainedStepRecord`.
    """
    config = TrustRegionConfig(max_kl, damping, cg_iters, cg_rtol, backtrack_factor, max_backtracks)
    _check_batch(obs, actions, advantages)
    c = check_cost_inputs(cost_advantages, advantages, cost_violation)
    params = trainable_parameters(policy, "constrained_step")
    group = distributed.resolve_group(process_group)

    start = time.perf_counter()
    both = torch.stack([advantages, cost_advantages], 1)
    direction = _direction(policy, params, obs, actions, both, config, fvp_obs, path, group, action_mask,
                           fvp_action_mask)
    gb, xy, info, old_dist = direction.gradient, direction.x, direction.info, direction.old_dist
    old_params = flat_vector(params).detach()
    nan = float("nan")
    record = dict(case=-1, accepted=False, kl=0.0, improvement=0.0, cost_change=0.0, expected_improvement=nan,
                  expected_cost_change=nan, nu=nan, lam=nan, q=nan, r=nan, s=nan, reward_direction_norm=nan,
                  cost_direction_norm=nan, step_norm=nan, line_search_steps=0, cg_iterations=(0, 0),
                  cg_residual=(nan, nan), entropy=old_dist.entropy().mean().item(),
                  policy_std=family_of(old_dist).mean_std(old_dist), time_cg=0.0, time_line_search=0.0)

    finish = record_finisher(ConstrainedStepRecord, record, start)

    if xy is None:  # a gradient was not finite
        return finish()
    g, b, x, y = gb[:, 0], gb[:, 1], xy[:, 0], xy[:, 1]
    q = info.xAx[0].item()
    r, s = torch.dot(g.double(), y.double()).item(), torch.dot(b.double(), y.double()).item()
    record.update(q=q, r=r, s=s, cg_iterations=tuple(info.iterations.tolist()),
                  cg_residual=tuple(info.residual_norm.tolist()),
                  reward_direction_norm=x.norm().item(), cost_direction_norm=y.norm().item())
    b_small = torch.dot(b.double(), b.double()).item() <= B_SMALL
    if not (math.isfinite(q) and q > 0 and math.isfinite(r) and math.isfinite(s) and (b_small or s > 0)
            and bool(torch.isfinite(xy).all())):
        return finish()
    dual = cpo_dual(q, r, s, c, config.max_kl, b_small)
    record.update(case=dual.case, nu=dual.nu, lam=dual.lam)
    record["time_cg"] = time.perf_counter() - start
    if dual.x_coef == 0.0 and dual.y_coef == 0.0:
        return finish()
    full_step = dual.x_coef * x + dual.y_coef * y
    record.update(expected_improvement=torch.dot(g, full_step).item(),
                  expected_cost_change=torch.dot(b, full_step).item(), step_norm=full_step.norm().item())

    # Backtracking on KL, the cost surrogate and (feasible cases) the reward surrogate.
    cost_allowance, need_improvement = max(-c, 0.0), dual.case >= 2
    accepted, fraction = None, 1.0
    with torch.no_grad():
        try:
            for k in range(1, config.max_backtracks + 1):
                record["line_search_steps"] = k
                candidate = old_params + fraction * full_step
                fraction *= config.backtrack_factor
                if not bool(torch.isfinite(candidate).all()):
                    continue
                kl, (improvement, cost_change) = direction.trial(candidate)
                if (math.isfinite(kl) and math.isfinite(improvement) and math.isfinite(cost_change)
                        and kl <= config.max_kl and cost_change <= cost_allowance
                        and (improvement > 0 or not need_improvement)):
                    accepted = (candidate, kl, improvement, cost_change)
                    break
        finally:  # also when a trial raised: a generic trial loads its candidate into the policy
            load_flat_(old_params if accepted is None else accepted[0], params)
    if accepted is None:
        return finish()
    return finish(accepted=True, kl=accepted[1], improvement=accepted[2], cost_change=accepted[3])
