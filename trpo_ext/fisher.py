"""Fisher-vector products and the conjugate-gradient solve (docs/design.md, "The Fisher-vector product").

Two paths compute the same product, a JVP, the closed-form output Fisher and a VJP (never a second
derivative):
- fused: for an `MLPPolicy` whose class keeps `forward`, `distribution_params` and `distribution`
  as MLPPolicy defines them, one call into the extension (the whole CG loop in C++/CUDA);
- generic: torch.func, for any module whose `forward(obs)` returns a Categorical or a (possibly
  Independent) Normal.
`path="auto"` picks the fused one whenever `fused_mlp(policy)` allows it; "fused" and "generic" force one.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
from torch.distributions import Categorical, Independent, Normal

from . import _ops
from .policies import MLPPolicy
from .reference import conjugate_gradient


PATHS = ("auto", "fused", "generic")


@dataclass(frozen=True)
class FusedMLP:
    """What the fused ops need to know about a policy besides its parameters."""

    kind: str  # "categorical" or "gaussian"
    activation: str


def fused_mlp(policy) -> FusedMLP | None:
    """The fused-op description of `policy`, or None when only the generic path is exact for it.

    The fused ops compute the Fisher of the plain MLP that `MLPPolicy` defines; a subclass that
    overrides `forward`, `distribution_params` or `distribution` computes something else, so it gets None.
    """
    if not isinstance(policy, MLPPolicy):
        return None
    cls = type(policy)
    if any(getattr(cls, name) is not getattr(MLPPolicy, name) for name in ("forward", "distribution_params",
                                                                          "distribution")):
        return None
    return FusedMLP(policy.kind, policy.activation)


def choose_path(policy, path: str) -> FusedMLP | None:
    """Resolves `path` for `policy`: the FusedMLP for the fused path, None for the generic one."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    fused = fused_mlp(policy) if path != "generic" else None
    if path == "fused" and fused is None:
        raise TypeError(f"path='fused' needs an MLPPolicy that does not override forward or distribution_params, "
                        f"got {type(policy).__name__}; use path='auto' or 'generic'")
    return fused


@dataclass
class CGInfo:
    """What a CG solve reports. Fields are 0-dim tensors on the solve's device (no host sync)."""

    iterations: torch.Tensor  # CG iterations used (int64)
    residual_norm: torch.Tensor  # ||b - A x|| as tracked by the recursion (float64)
    xAx: torch.Tensor  # x'(F + damping I)x, for the TRPO step size (float64)


# ----------------------------------------------------------------------------- input checks
def check_policy(policy) -> list[torch.Tensor]:
    if not isinstance(policy, torch.nn.Module):
        raise TypeError(f"policy must be a torch.nn.Module, got {type(policy).__name__}")
    params = list(policy.parameters())
    if not params:
        raise ValueError("policy has no parameters")
    dtype, device = params[0].dtype, params[0].device
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"policy parameters must be float32 or float64, got {dtype}")
    for p in params:
        if p.dtype != dtype or p.device != device:
            raise TypeError("policy parameters must all share one dtype and device")
    return params


def _check_tensor(name: str, t, params: list[torch.Tensor]) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ref = params[0]
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} must have the policy's dtype {ref.dtype}, got {t.dtype}")
    if t.device != ref.device:
        raise TypeError(f"{name} must be on the policy's device {ref.device}, got {t.device}")


def _check_obs(name: str, obs, params, fused: FusedMLP | None, obs_dim: int | None) -> None:
    _check_tensor(name, obs, params)
    if fused is not None:
        if obs.dim() != 2 or obs.shape[1] != obs_dim:
            raise ValueError(f"{name} must have shape (N, {obs_dim}), got {tuple(obs.shape)}")
    elif obs.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension, got shape {tuple(obs.shape)}")
    if obs.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (N = 0); the Fisher is a mean over at least one state")


def _check_vector(name: str, v, params) -> None:
    _check_tensor(name, v, params)
    n = sum(p.numel() for p in params)
    if v.dim() != 1 or v.numel() != n:
        raise ValueError(f"{name} must be a flat vector of length {n} (the policy's parameter count), "
                         f"got shape {tuple(v.shape)}")


def _check_finite(**tensors) -> None:
    for name, t in tensors.items():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")


def _check_damping(damping) -> float:
    damping = float(damping)
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping must be a finite number >= 0, got {damping}")
    return damping


def check_inputs(policy, params: list[torch.Tensor], fused: FusedMLP | None, **observations) -> None:
    """Checks observation batches (keyword name -> tensor) against `policy` and its `params` (from
    `check_policy`) for the path `fused` describes (None: generic)."""
    for name, obs in observations.items():
        _check_obs(name, obs, params, fused, getattr(policy, "obs_dim", None))
    if fused is not None and params[0].is_cuda and not _ops.cuda_built():
        raise RuntimeError("this trpo_ext build has no CUDA kernels (built CPU-only); "
                           "move the policy to the CPU or rebuild with a CUDA torch and nvcc")


def _validate(policy, obs, vec_name, vec, damping, check_finite, path):
    params = check_policy(policy)
    fused = choose_path(policy, path)
    check_inputs(policy, params, fused, obs=obs)
    _check_vector(vec_name, vec, params)
    damping = _check_damping(damping)
    if check_finite:
        _check_finite(obs=obs, **{vec_name: vec})
    return params, damping, fused


# ----------------------------------------------------------------------------- generic path
# torch.func's forward-mode AD keeps its levels in process-global state: two threads inside
# torch.func.jvp at once corrupt each other (wrong products, heap corruption, segfaults were seen
# with 4 threads, and a plain torch.func program fails the same way). The generic path therefore runs
# one thread at a time; the fused ops need no lock.
_GENERIC_LOCK = threading.Lock()

def _generic_products(policy: torch.nn.Module, obs: torch.Tensor, params: list[torch.Tensor]):
    """Linearises the policy's distribution parameters once; returns v -> F v (no damping)."""
    names = [name for name, _ in policy.named_parameters()]
    shapes = [p.shape for p in params]
    sizes = [p.numel() for p in params]

    dist = policy(obs)
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if isinstance(base, Categorical):
        probs = base.probs.detach()

        def outputs(d):
            return (d.logits,)

        def output_fisher(t):  # M u = p * u - p (p'u)
            (u,) = t
            return (probs * u - probs * (probs * u).sum(-1, keepdim=True),)
    elif isinstance(base, Normal):
        inv_var = base.scale.detach().pow(-2)

        def outputs(d):
            d = d.base_dist if isinstance(d, Independent) else d
            return (d.loc, d.scale)

        def output_fisher(t):  # mean: 1/sigma^2, scale: 2/sigma^2
            return (t[0] * inv_var, 2.0 * t[1] * inv_var)
    else:
        raise TypeError("policy must return Categorical, Normal or Independent(Normal), "
                        f"got {type(dist).__name__}")

    def f(*flat_params):
        return outputs(torch.func.functional_call(policy, dict(zip(names, flat_params)), (obs,)))

    primals = tuple(p.detach() for p in params)
    # The VJP closure is built once; the JVP runs per product (torch.func.linearize would trace the
    # module with make_fx, which breaks on the data-dependent argument checks of distributions).
    _, vjp_fn = torch.func.vjp(f, *primals)
    n = obs.shape[0]

    def product(v: torch.Tensor) -> torch.Tensor:
        tangents = tuple(t.view(s) for t, s in zip(torch.split(v, sizes), shapes))
        u = output_fisher(torch.func.jvp(f, primals, tangents)[1])
        cotangents = vjp_fn(tuple(t / n for t in u))
        return torch.cat([c.reshape(-1) for c in cotangents])

    return product


# ----------------------------------------------------------------------------- public API
def fvp(policy: torch.nn.Module, obs: torch.Tensor, v: torch.Tensor, damping: float = 0.0,
        check_finite: bool = True, path: str = "auto") -> torch.Tensor:
    """(F + damping I) v, flat in `policy.parameters()` order; F is the Hessian of the batch-mean KL.

    `check_finite` tests obs and v for NaN/Inf (one device sync on a GPU). `path`: "auto", "fused"
    or "generic" (module docstring).
    """
    params, damping, fused = _validate(policy, obs, "v", v, damping, check_finite, path)
    if fused is not None:
        return _ops.mlp_fvp(obs, [p.detach() for p in params], v, kind=fused.kind, activation=fused.activation,
                            damping=damping)
    with _GENERIC_LOCK, torch.no_grad():
        return _generic_products(policy, obs, params)(v) + damping * v


def cg_solve(policy: torch.nn.Module, obs: torch.Tensor, b: torch.Tensor, iters: int = 10,
             damping: float = 0.1, rtol: float = 1e-6, check_finite: bool = True,
             cuda_graph: bool = True, path: str = "auto") -> tuple[torch.Tensor, CGInfo]:
    """Solves (F + damping I) x = b by conjugate gradient; returns (x, CGInfo).

    Stops after `iters` Fisher-vector products or when ||r|| <= rtol ||b||. For an `MLPPolicy`
    the whole loop is one extension call; on a GPU it never synchronises with the host, and with
    `cuda_graph=True` repeated solves of one shape replay a captured CUDA graph.
    `check_finite` tests obs and b for NaN/Inf first (one device sync on a GPU). `path`: "auto",
    "fused" or "generic" (module docstring).
    """
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an int >= 1, got {iters!r}")
    rtol = float(rtol)
    if not math.isfinite(rtol) or rtol < 0:
        raise ValueError(f"rtol must be a finite number >= 0, got {rtol}")
    params, damping, fused = _validate(policy, obs, "b", b, damping, check_finite, path)
    if fused is not None:
        solve = _ops.mlp_cg
        if b.is_cuda and cuda_graph:
            from .cuda_graphs import graphed_mlp_cg as solve
        x, used, res, xAx = solve(obs, [p.detach() for p in params], b, kind=fused.kind,
                                  activation=fused.activation, damping=damping, iters=iters, rtol=rtol)
        return x, CGInfo(used, res, xAx)
    with _GENERIC_LOCK, torch.no_grad():
        product = _generic_products(policy, obs, params)
        x, used, res, xAx = conjugate_gradient(lambda p: product(p) + damping * p, b, iters, rtol)
    return x, CGInfo(torch.tensor(used, device=b.device), res, xAx)
