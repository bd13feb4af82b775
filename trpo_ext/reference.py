"""Pure-PyTorch Fisher-vector products and conjugate gradient, the way sb3-contrib does them: the
test oracle for every path and action family, and the baseline the benchmarks compare against.

The FVP differentiates the batch-mean KL twice: the gradient of KL(pi_old || pi_theta) is built once
with `create_graph=True`, and each product is the gradient of its dot product with v. With an action
mask the KL is written from its definition here, independently of the package's -1e8 masking: a
masked class is excluded (each segment's log-softmax normalises over the allowed classes, and its
terms weigh exactly 0). `enumerated_fisher` forms F a second, independent way for the discrete
families: the expected outer product of the score over every joint action.
"""
from __future__ import annotations

import copy
import itertools
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Categorical, Distribution, Independent, kl_divergence

from ._ops import flat_vector, load_flat_
from .distributions import detach_distribution
from .multicategorical import MultiCategorical


def _categorical_logits(dist: Distribution) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """The logits of a (Multi)Categorical and the (first column, count) of each segment."""
    if isinstance(dist, MultiCategorical):
        counts = dist.segments
        return dist.raw_logits, [(sum(counts[:s]), c) for s, c in enumerate(counts)]
    if isinstance(dist, Categorical):
        return dist.logits, [(0, dist.logits.shape[-1])]
    raise TypeError(f"action masks apply to Categorical and MultiCategorical policies, got {type(dist).__name__}")


def _masked_log_probs(logits: torch.Tensor, bounds, mask: torch.Tensor) -> torch.Tensor:
    """Each segment's log-probabilities over its allowed classes (masked entries finite, weighted 0 by callers)."""
    parts = []
    for lo, k in bounds:
        x, allowed = logits[:, lo:lo + k], mask[:, lo:lo + k]
        parts.append(x - torch.logsumexp(x.masked_fill(~allowed, float("-inf")), 1, keepdim=True))
    return torch.cat(parts, 1)


def kl(policy: torch.nn.Module, obs, action_mask: torch.Tensor | None = None,
       old_policy: torch.nn.Module | None = None) -> torch.Tensor:
    """The batch-mean KL(π_old ‖ π_θ), a function of `policy`'s θ; π_old is `old_policy` (no grad),
    by default the policy itself detached."""
    dist = policy(obs)
    with torch.no_grad():
        old = dist if old_policy is None else old_policy(obs)
    if action_mask is None:
        return kl_divergence(detach_distribution(old), dist).mean()
    logits, bounds = _categorical_logits(dist)
    new = _masked_log_probs(logits, bounds, action_mask)
    old = _masked_log_probs(_categorical_logits(old)[0], bounds, action_mask).detach()
    p_old = torch.where(action_mask, old.exp(), torch.zeros_like(old))
    return (p_old * (old - new)).sum(1).mean()


def log_prob(policy: torch.nn.Module, obs, actions: torch.Tensor,
             action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log π_θ(a|s) per state (of the masked policy with `action_mask`; an action the mask forbids
    has probability 0 but gets a finite value here, the allowed classes' normalisation: weigh it 0)."""
    dist = policy(obs)
    if action_mask is None:
        return dist.log_prob(actions)
    logits, bounds = _categorical_logits(dist)
    table = _masked_log_probs(logits, bounds, action_mask)
    columns = actions.reshape(len(actions), -1) + torch.tensor([lo for lo, _ in bounds], device=actions.device)
    return table.gather(1, columns).sum(1)


def fvp_function(policy: torch.nn.Module, obs, damping: float = 0.0,
                 action_mask: torch.Tensor | None = None) -> Callable:
    """Returns v -> (F + damping I) v by double backprop through the batch-mean KL."""
    params = [p for p in policy.parameters() if p.requires_grad]
    grads = torch.autograd.grad(kl(policy, obs, action_mask), params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])

    def product(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(flat_grad @ v, params, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]) + damping * v

    return product


def fvp(policy: torch.nn.Module, obs, v: torch.Tensor, damping: float = 0.0,
        action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(F + damping I) v by double backprop (one product; build fvp_function once for many)."""
    return fvp_function(policy, obs, damping, action_mask)(v)


def _joint_log_probs(dist: Distribution, action_mask: torch.Tensor | None) -> torch.Tensor:
    """log π(a|s) for every state and every joint action a, (N, A), in itertools.product order."""
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if isinstance(base, Bernoulli):
        k = base.logits.shape[-1]
        actions = torch.tensor(list(itertools.product((0.0, 1.0), repeat=k)), dtype=base.logits.dtype,
                               device=base.logits.device)
        return F.logsigmoid(base.logits) @ actions.t() + F.logsigmoid(-base.logits) @ (1 - actions).t()
    logits, bounds = _categorical_logits(base)
    mask = torch.ones_like(logits, dtype=torch.bool) if action_mask is None else action_mask
    table = _masked_log_probs(logits, bounds, mask)
    columns = torch.tensor([[lo + a for (lo, _), a in zip(bounds, joint)]
                            for joint in itertools.product(*(range(k) for _, k in bounds))], device=logits.device)
    return table[:, columns].sum(-1)


def enumerated_fisher(policy: torch.nn.Module, obs, action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """F as a dense matrix for a discrete policy (Categorical, MultiCategorical or Bernoullis), from
    its definition: (1/N) Σ_states Σ_joint actions π(a|s) ∇log π(a|s) ∇log π(a|s)ᵀ (masked actions
    have π = 0). Every joint action is enumerated: for small action spaces only."""
    names = [name for name, p in policy.named_parameters() if p.requires_grad]
    primals = tuple(p.detach() for p in policy.parameters() if p.requires_grad)

    def log_probs(*values):
        return _joint_log_probs(torch.func.functional_call(policy, dict(zip(names, values)), (obs,)), action_mask)

    with torch.no_grad():
        table = log_probs(*primals)
    n, n_actions = table.shape
    jacobians = torch.autograd.functional.jacobian(log_probs, primals)
    scores = torch.cat([j.reshape(n, n_actions, -1) for j in jacobians], -1)  # (N, A, P)
    p = table.exp() if action_mask is None else table.exp() * _allowed(policy, obs, action_mask).to(table.dtype)
    return torch.einsum("na,nap,naq->pq", p, scores, scores) / n


def _allowed(policy, obs, action_mask) -> torch.Tensor:
    """(N, A): 1 where every sub-action of the joint action is allowed, else 0."""
    with torch.no_grad():
        _, bounds = _categorical_logits(policy(obs))
    joints = itertools.product(*(range(k) for _, k in bounds))
    columns = torch.tensor([[lo + a for (lo, _), a in zip(bounds, joint)] for joint in joints],
                           device=action_mask.device)
    return action_mask[:, columns].all(-1)


def conjugate_gradient(matvec: Callable, b: torch.Tensor, iters: int = 10, rtol: float = 1e-6,
                       eps: float = 1e-20):
    """Solves A x = b for symmetric positive-definite A given as `matvec`.

    Stops when r'r <= rtol^2 b'b, after `iters` products, or on breakdown (p'Ap <= eps p'p).
    Dot products are accumulated in float64. Returns (x, iterations, residual_norm, x'Ax) with
    x'Ax computed as x'(b - r), so the caller needs no extra product for the step size.
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = b.clone()
    rs = torch.dot(r.double(), r.double())
    tol2 = rtol * rtol * rs
    used = 0
    for _ in range(iters):
        if not rs > tol2:
            break
        Ap = matvec(p)
        pAp = torch.dot(p.double(), Ap.double())
        if not pAp > eps * torch.dot(p.double(), p.double()):
            break
        alpha = rs / pAp
        x = x + alpha.to(b.dtype) * p
        r = r - alpha.to(b.dtype) * Ap
        rs_new = torch.dot(r.double(), r.double())
        p = r + (rs_new / rs).to(b.dtype) * p
        rs = rs_new
        used += 1
    xAx = torch.dot(x.double(), (b - r).double())
    return x, used, rs.sqrt(), xAx


def cg_solve(policy: torch.nn.Module, obs, b: torch.Tensor, iters: int = 10, damping: float = 0.1,
             rtol: float = 1e-6, action_mask: torch.Tensor | None = None):
    """Reference CG on (F + damping I) x = b with double-backprop products."""
    return conjugate_gradient(fvp_function(policy, obs, damping, action_mask), b, iters, rtol)


def sb3_policy_step(policy: torch.nn.Module, obs: torch.Tensor, actions: torch.Tensor, advantages: torch.Tensor,
                    max_kl: float = 0.01, damping: float = 0.1, cg_iters: int = 10, residual_tol: float = 1e-10,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, float, float]:
    """The policy step as sb3-contrib's TRPO.train computes it, up to the first line-search trial:
    the speed baseline of `trpo_ext.trust_region_step`.

    A no-grad forward pass for the old distribution and one with grad; the surrogate's gradient and
    the KL's gradient (create_graph=True) by autograd; CG with double-backprop products started
    from x0 = 1e-4·randn (so its first residual costs one product); one more product for xᵀAx; the
    first trial's KL and surrogate. CG stops early once r'r < residual_tol (sb3-contrib's default
    1e-10; 0 runs all `cg_iters`). sb3-contrib takes the two gradients parameter by parameter;
    here each is one autograd call, which is faster, so the baseline errs in sb3-contrib's favour.
    Returns (full step, trial KL, trial surrogate); the policy's parameters are left unchanged.
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        old_dist = detach_distribution(policy(obs))
        old_log_prob = old_dist.log_prob(actions)
    dist = policy(obs)
    objective = (torch.exp(dist.log_prob(actions) - old_log_prob) * advantages).mean()
    kl = kl_divergence(dist, old_dist).mean()
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(objective, params, retain_graph=True)])
    grad_kl = torch.cat([t.reshape(-1) for t in torch.autograd.grad(kl, params, create_graph=True)])

    def product(v: torch.Tensor, retain_graph: bool = True) -> torch.Tensor:
        hv = torch.autograd.grad(grad_kl @ v, params, retain_graph=retain_graph)
        return torch.cat([h.reshape(-1) for h in hv]) + damping * v

    x = 1e-4 * torch.randn(g.shape, generator=generator, dtype=g.dtype, device=g.device)
    r = g - product(x)
    p = r.clone()
    rs = r @ r
    for _ in range(cg_iters):
        if rs < residual_tol:
            break
        Ap = product(p)
        alpha = rs / (p @ Ap)
        x = x + alpha * p
        r = r - alpha * Ap
        rs_new = r @ r
        p = r + (rs_new / rs) * p
        rs = rs_new
    full_step = torch.sqrt(2 * max_kl / (x @ product(x, retain_graph=False))) * x
    original = flat_vector(params).detach()
    with torch.no_grad():
        load_flat_(original + full_step, params)
        trial = policy(obs)
        trial_kl = kl_divergence(trial, old_dist).mean().item()
        trial_objective = (torch.exp(trial.log_prob(actions) - old_log_prob) * advantages).mean().item()
        load_flat_(original, params)
    return full_step.detach(), trial_kl, trial_objective


def cpo_step(policy: torch.nn.Module, obs, actions: torch.Tensor, advantages: torch.Tensor,
             cost_advantages: torch.Tensor, cost_violation: float, max_kl: float = 0.01, damping: float = 0.1,
             cg_iters: int = 15, cg_rtol: float = 1e-10, backtrack_factor: float = 0.8, max_backtracks: int = 20,
             action_mask: torch.Tensor | None = None) -> dict:
    """The CPO step the oracle way (the one `trpo_ext.constrained_step` is held to): both surrogates'
    gradients by autograd, two separate double-backprop CG solves, the dual in the form of Achiam et
    al. 2017's appendix (a minimisation of −gᵀΔ: g_p = −g, r_p = −r), and a line search that loads
    each trial into the policy. Moves the policy like the step; returns a dict with the case,
    lam, nu, q, r, s, the full step, the trials counted and whether one was accepted."""
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        old_policy = copy.deepcopy(policy)
    old_log_prob = log_prob(policy, obs, actions, action_mask).detach()

    def surrogates():
        ratio = torch.exp(log_prob(policy, obs, actions, action_mask) - old_log_prob)
        return (ratio * advantages).mean(), (ratio * cost_advantages).mean()

    reward, cost = surrogates()
    g = flat_vector(torch.autograd.grad(reward, params, retain_graph=True))
    b = flat_vector(torch.autograd.grad(cost, params))
    x, _, _, xAx = cg_solve(policy, obs, g, cg_iters, damping, cg_rtol, action_mask)
    y, _, _, _ = cg_solve(policy, obs, b, cg_iters, damping, cg_rtol, action_mask)
    q, c, d = xAx.item(), float(cost_violation), 2 * max_kl
    r_p, s = -(g.double() @ y.double()).item(), (b.double() @ y.double()).item()
    if (b.double() @ b.double()).item() <= 1e-6:
        case = 4 if c < 0 else None
    else:
        A, B = max(q - r_p ** 2 / s, 0.0), d - c ** 2 / s
        case = (3 if B < 0 else 2) if c < 0 else (1 if B >= 0 else 0)
    out = dict(case=0 if case is None else case, q=q, r=-r_p, s=s, accepted=False, steps=0)
    if case is None:  # infeasible and no cost gradient: no step
        return dict(out, lam=0.0, nu=0.0, full_step=None)
    if case in (3, 4):
        lam, nu = math.sqrt(q / d), 0.0
    elif case == 0:
        lam, nu = 0.0, math.sqrt(d / s)
    else:
        # Λ_a = {λ ≥ 0 | λc − r_p > 0}, Λ_b = {λ ≥ 0 | λc − r_p ≤ 0}; project each unconstrained
        # maximiser onto its set (as an interval [lo, hi]) and keep the better dual value.
        def interval(binding):
            if c == 0:
                ok = (-r_p > 0) == binding
                return (0.0, math.inf) if ok else None
            root = r_p / c  # where λc − r_p changes sign
            above = (c > 0) == binding  # the set lies above the root
            lo, hi = (max(0.0, root), math.inf) if above else (0.0, root)
            return (lo, hi) if lo <= hi and not (hi <= 0 and not above) else None

        def dual_value(lam, binding):
            if not 0 < lam < math.inf:
                return -math.inf
            if binding:
                return -0.5 * (A / lam + B * lam) - r_p * c / s
            return -0.5 * (q / lam + d * lam)

        best = []
        for binding, free in ((True, math.sqrt(A / B) if B > 0 else math.inf), (False, math.sqrt(q / d))):
            span = interval(binding)
            if span is not None:
                lam = min(max(free, span[0]), span[1])
                best.append((dual_value(lam, binding), lam))
        lam = max(best)[1]
        nu = max(lam * c - r_p, 0.0) / s
    full_step = -math.sqrt(d / s) * y if case == 0 else -(1 / lam) * (-x + nu * y)  # −(1/λ)F⁻¹(g_p + νb)
    out.update(lam=lam, nu=nu, full_step=full_step.detach())
    old = flat_vector(params).detach()
    reward0, cost0 = reward.item(), cost.item()
    with torch.no_grad():
        for k in range(1, max_backtracks + 1):
            trial = old + backtrack_factor ** (k - 1) * full_step
            out["steps"] = k
            if not bool(torch.isfinite(trial).all()):
                continue
            load_flat_(trial, params)
            new_reward, new_cost = surrogates()
            trial_kl = kl(policy, obs, action_mask, old_policy=old_policy).item()
            if (trial_kl <= max_kl and new_cost.item() - cost0 <= max(-c, 0.0)
                    and (case < 2 or new_reward.item() - reward0 > 0)):
                out["accepted"] = True
                return out
        load_flat_(old, params)
    return out
