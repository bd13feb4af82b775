"""Pure-PyTorch Fisher-vector product and conjugate gradient, the way sb3-contrib does them.

The FVP differentiates the batch-mean KL twice: the gradient of KL(pi_old || pi_theta) is built once
with `create_graph=True`, and each product is the gradient of its dot product with v. This is the
test oracle for the fused ops and the baseline the benchmarks compare against.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.distributions import kl_divergence

from .distributions import detach_distribution  # noqa: F401  (also imported from here)


def fvp_function(policy: torch.nn.Module, obs: torch.Tensor, damping: float = 0.0) -> Callable:
    """Returns v -> (F + damping I) v by double backprop through the batch-mean KL."""
    params = [p for p in policy.parameters() if p.requires_grad]
    dist = policy(obs)
    kl = kl_divergence(detach_distribution(dist), dist).mean()
    grads = torch.autograd.grad(kl, params, create_graph=True)
    flat_grad = torch.cat([g.reshape(-1) for g in grads])

    def product(v: torch.Tensor) -> torch.Tensor:
        hv = torch.autograd.grad(flat_grad @ v, params, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]) + damping * v

    return product


def fvp(policy: torch.nn.Module, obs: torch.Tensor, v: torch.Tensor, damping: float = 0.0) -> torch.Tensor:
    """(F + damping I) v by double backprop (one product; build fvp_function once for many)."""
    return fvp_function(policy, obs, damping)(v)


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


def cg_solve(policy: torch.nn.Module, obs: torch.Tensor, b: torch.Tensor, iters: int = 10,
             damping: float = 0.1, rtol: float = 1e-6):
    """Reference CG on (F + damping I) x = b with double-backprop products."""
    return conjugate_gradient(fvp_function(policy, obs, damping), b, iters, rtol)


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
    original = torch.nn.utils.parameters_to_vector(params).detach().clone()
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(original + full_step, params)
        trial = policy(obs)
        trial_kl = kl_divergence(trial, old_dist).mean().item()
        trial_objective = (torch.exp(trial.log_prob(actions) - old_log_prob) * advantages).mean().item()
        torch.nn.utils.vector_to_parameters(original, params)
    return full_step.detach(), trial_kl, trial_objective
