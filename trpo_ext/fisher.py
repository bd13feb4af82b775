"""Fisher-vector products and the conjugate-gradient solve, the public functions
(docs/design.md, "The Fisher-vector product").

Two paths compute the same product, a JVP, the closed-form output Fisher and a VJP (never a second
derivative):
- fused: for an `MLPPolicy` whose class keeps `forward`, `distribution_params` and `distribution`
  as MLPPolicy defines them (`policies.fused_spec`), one call into the extension (the whole CG loop
  in C++/CUDA); likewise for a `RecurrentPolicy` (LSTM / GRU, `policies.recurrent_fused_spec`),
  whose products run forward and back through time in the extension (docs/design.md §12);
- generic (`trpo_ext.generic`): the recorded forward pass of any module whose `forward(obs)` returns
  one of `trpo_ext.distributions`' families, linearised once per solve.
`path="auto"` picks the fused one whenever `fused_spec(policy)` (or `recurrent_fused_spec`) allows it; "fused" and "generic"
force one. `action_mask` (Discrete / MultiDiscrete policies) gives the Fisher of the masked policy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import _ops
from .config import check_trust_region
from .distributions import ActionSpec, family_of
from .generic import GENERIC_LOCK, generic_products
from .policies import FusedSpec, RecurrentFusedSpec, fused_spec, recurrent_fused_spec
from .recurrent import check_sequences, is_recurrent
from .reference import conjugate_gradient
from .spaces import Sequences, batch_len

PATHS = ("auto", "fused", "generic")


def choose_path(policy, path: str) -> FusedSpec | None:
    """Resolves `path` for `policy`: the FusedSpec for the fused path, None for the generic one."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    fused = (fused_spec(policy) or recurrent_fused_spec(policy)) if path != "generic" else None
    if path == "fused" and fused is None:
        raise TypeError(f"path='fused' needs an MLPPolicy (or a RecurrentPolicy) of a fused action family whose class "
                        f"does not override how its output is computed, got {type(policy).__name__}; use path='auto' "
                        "or 'generic'")
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


def _check_obs(name: str, obs, params, fused: FusedSpec | None, obs_dim: int | None) -> None:
    if isinstance(obs, dict) and fused is None:  # a Dict observation space's batch: every entry, one batch size
        if not obs:
            raise ValueError(f"{name} is an empty dict")
        for key, t in obs.items():
            _check_obs(f"{name}[{key!r}]", t, params, None, None)
        if len({t.shape[0] for t in obs.values()}) != 1:
            raise ValueError(f"{name}: the entries have different batch sizes "
                             f"{ {k: t.shape[0] for k, t in obs.items()} }")
        return
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


def check_inputs(policy, params: list[torch.Tensor], fused: FusedSpec | None, **observations) -> None:
    """Checks observation batches (keyword name -> tensor) against `policy` and its `params` (from
    `check_policy`) for the path `fused` describes (None: generic)."""
    for name, obs in observations.items():
        if is_recurrent(policy):  # its batch is Sequences (trpo_ext.recurrent)
            check_sequences(name, obs, policy)
            continue
        _check_obs(name, obs, params, fused, getattr(policy, "obs_dim", None))
    if fused is not None and params[0].is_cuda and not _ops.cuda_built():
        raise RuntimeError("this trpo_ext build has no CUDA kernels (built CPU-only); "
                           "move the policy to the CPU or rebuild with a CUDA torch and nvcc")


def action_spec_of(policy, obs, fused: FusedSpec | None) -> ActionSpec:
    """The action spec of `policy`: the fused policy's own, else read off its distribution on `obs`
    (one forward pass without grad)."""
    if fused is not None:
        return fused.action
    with torch.no_grad():
        dist = policy(obs)
    return family_of(dist).spec_of(dist)


def _validate(policy, obs, vec_name, vec, damping, check_finite, path, action_mask):
    params = check_policy(policy)
    fused = choose_path(policy, path)
    check_inputs(policy, params, fused, obs=obs)
    _check_vector(vec_name, vec, params)
    damping = check_trust_region("damping", damping)
    if check_finite:  # Sequences: check_inputs has held their tensors to finiteness
        _check_finite(**({} if is_recurrent(policy) else {"obs": obs}), **{vec_name: vec})
    if action_mask is not None:
        action_spec_of(policy, obs, fused).check_mask_tensor("action_mask", action_mask, batch_len(obs),
                                                             params[0].device)
    return params, damping, fused


# ----------------------------------------------------------------------------- public API
def fvp(policy: torch.nn.Module, obs: torch.Tensor, v: torch.Tensor, damping: float = 0.0,
        check_finite: bool = True, path: str = "auto", action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(F + damping I) v, flat in `policy.parameters()` order; F is the Hessian of the batch-mean KL.

    `check_finite` tests obs and v for NaN/Inf (one device sync on a GPU). `path`: "auto", "fused"
    or "generic" (module docstring). `action_mask`: bool (N, logits), True = allowed, for a
    Discrete / MultiDiscrete policy: the Fisher of the masked policy (masked classes have
    probability 0 and no part in it).
    """
    params, damping, fused = _validate(policy, obs, "v", v, damping, check_finite, path, action_mask)
    if isinstance(fused, RecurrentFusedSpec):
        return _ops.rnn_fvp(*_sequence_args(obs), [p.detach() for p in params], v, damping=damping,
                            **fused.op_kwargs(action_mask=action_mask))
    if fused is not None:
        return _ops.mlp_fvp(obs, [p.detach() for p in params], v, damping=damping,
                            **fused.op_kwargs(action_mask=action_mask))
    with GENERIC_LOCK, torch.no_grad():
        return generic_products(policy, obs, params, action_mask)(v) + damping * v


def cg_solve(policy: torch.nn.Module, obs: torch.Tensor, b: torch.Tensor, iters: int = 10,
             damping: float = 0.1, rtol: float = 1e-6, check_finite: bool = True,
             cuda_graph: bool = True, path: str = "auto",
             action_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, CGInfo]:
    """Solves (F + damping I) x = b by conjugate gradient; returns (x, CGInfo).

    Stops after `iters` Fisher-vector products or when ||r|| <= rtol ||b||. For an `MLPPolicy`
    (or a built-in recurrent policy: `rnn_cg`) the whole loop is one extension call; on a GPU it never
    synchronises with the host, and with `cuda_graph=True` repeated solves of one shape of an
    MLPPolicy replay a captured CUDA graph (a recurrent solve is not captured).
    `check_finite` tests obs and b for NaN/Inf first (one device sync on a GPU). `path` and
    `action_mask` as for `fvp`. The ranges of iters, damping and rtol are the trust-region
    settings' (`trpo_ext.config.TRUST_REGION_RANGES`: cg_iters, damping, cg_rtol).
    """
    iters = check_trust_region("cg_iters", iters, "iters")
    rtol = check_trust_region("cg_rtol", rtol, "rtol")
    params, damping, fused = _validate(policy, obs, "b", b, damping, check_finite, path, action_mask)
    if isinstance(fused, RecurrentFusedSpec):
        return recurrent_cg_solve(fused, obs, params, b, damping, iters, rtol, mask=action_mask)
    if fused is not None:
        solve = _ops.mlp_cg
        if b.is_cuda and cuda_graph:
            from .cuda_graphs import graphed_mlp_cg as solve
        x, used, res, xAx = solve(obs, [p.detach() for p in params], b, damping=damping, iters=iters, rtol=rtol,
                                  **fused.op_kwargs(action_mask=action_mask))
        return x, CGInfo(used, res, xAx)
    return generic_cg_solve(policy, obs, params, b, damping, iters, rtol, mask=action_mask)


def generic_cg_solve(policy: torch.nn.Module, obs, params: list[torch.Tensor], b: torch.Tensor,
                     damping: float, iters: int, rtol: float, combine=None,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, CGInfo]:
    """CG on (F + damping I) x = b on the generic path, the inputs already checked. `combine`, when
    given, maps this process's product F v to the one the solve uses (data-parallel: the sum over
    the ranks, trpo_ext.step); `mask`: the action mask of obs's rows (the Fisher of the masked policy).
    `b` (P, C): C solves, one per column, on one linearisation of the forward pass (x (P, C), the
    CGInfo fields (C))."""
    with GENERIC_LOCK, torch.no_grad():
        fisher = generic_products(policy, obs, params, mask)
        product = fisher if combine is None else (lambda v: combine(fisher(v)))
        if b.dim() == 1:
            x, used, res, xAx = conjugate_gradient(lambda p: product(p) + damping * p, b, iters, rtol)
            return x, CGInfo(torch.tensor(used, device=b.device), res, xAx)
        solves = [conjugate_gradient(lambda p: product(p) + damping * p, b[:, c].contiguous(), iters, rtol)
                  for c in range(b.shape[1])]
    x, used, res, xAx = zip(*solves)
    return torch.stack(x, 1), CGInfo(torch.tensor(used, device=b.device), torch.stack(res), torch.stack(xAx))


def _sequence_args(seq: Sequences) -> tuple:
    """A `Sequences` batch as the recurrent ops take it: obs, episode_starts, initial_state."""
    return seq.obs, seq.episode_starts, list(seq.initial_state)


def recurrent_cg_solve(fused: RecurrentFusedSpec, seq: Sequences, params: list[torch.Tensor], b: torch.Tensor,
                       damping: float, iters: int, rtol: float, mask: torch.Tensor | None = None,
                       mean_over: float = 0.0, group: str | None = None) -> tuple[torch.Tensor, CGInfo]:
    """CG on (F + damping I) x = b for a fused recurrent policy (`rnn_cg`: the loop in the extension on
    one forward pass), the inputs already checked; b (P, C): C solves, the CGInfo fields (C).
    Data-parallel: `mean_over` the states of all ranks, `group` the process group's name."""
    x, used, res, xAx = _ops.rnn_cg(*_sequence_args(seq), [p.detach() for p in params], b, damping=damping,
                                    iters=iters, rtol=rtol, mean_over=mean_over, group=group,
                                    **fused.op_kwargs(action_mask=mask))
    return x, CGInfo(used, res, xAx)
