"""The extension's torch ops: one typed wrapper per op, keyword arguments only, next to its fake
(meta) kernel for torch.compile / FakeTensor.

Parameter lists are flat, in `MLPPolicy.parameters()` order: W1, b1, ..., WL, bL[, log_std]
(docs/design.md, "Contracts across the C++ boundary"). The wrappers pass their arguments through
unchanged; the ops check them (docs/design.md, "Checks").

`kind`, `activation`, `segments` and the masks describe the policy: build them with
`trpo_ext.policies.FusedSpec.op_kwargs`, never by hand (`kind` is an action family's name,
`trpo_ext.distributions`; docs/design.md, "Action spaces of the fused ops").

The flat vectors the ops take and return (v, b, x, g) lay parameter-shaped tensors end to end:
`flat_vector` builds one, `unflatten` / `load_flat_` take one apart; the package builds every flat
θ, gradient or step with them, whatever the tensors' strides.

The ops compute on CPU or CUDA tensors. A call with a meta tensor among its arguments reaches the
fake kernel (the dispatcher's Meta kernel), which refuses it; under FakeTensorMode (torch.compile)
the fake kernels serve as usual.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence

import torch

from .distributions import family_named

# TRPO_EXT_OPS_LIBRARY: a path to the ops built by CMake (libtrpo_ext_ops.so), loaded instead of the
# package's own extension — how .ci/sanitize runs the tests against an ASan/UBSan build.
_library = os.environ.get("TRPO_EXT_OPS_LIBRARY")
try:
    if _library:
        torch.ops.load_library(_library)
    else:
        from . import _C  # noqa: F401  (registers torch.ops.trpo_ext.*)
except (ImportError, OSError) as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "trpo_ext._C, the compiled extension, could not be imported. Build it with "
        "`pip install . --no-build-isolation` against the torch you run "
        f"(torch {torch.__version__}). Original error: {exc}"
    ) from exc

ops = torch.ops.trpo_ext


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(ops.cuda_built())


# ----------------------------------------------------------------------------- flat vectors
def flat_vector(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors (parameters, their gradients, ...) end to end in one new flat vector, each in
    row-major order whatever its strides: the layout of the ops' flat vectors (docs/design.md,
    "Contracts across the C++ boundary"). Never a view of its inputs; keeps their graph."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Views of consecutive slices of a flat `vector`, one shaped like each tensor of `like`
    (`flat_vector`'s inverse); ValueError unless the lengths add up."""
    sizes = [t.numel() for t in like]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise ValueError(f"a flat vector of length {sum(sizes)} (the tensors' element count) was expected, got shape "
                         f"{tuple(vector.shape)}")
    return [part.view(t.shape) for part, t in zip(vector.split(sizes), like)]


def load_flat_(vector: torch.Tensor, params: Sequence[torch.Tensor]) -> None:
    """Copies a flat vector into `params`, in place and without autograd: each keeps its own storage
    and strides (unlike `torch.nn.utils.vector_to_parameters`, which makes them views of `vector`)."""
    parts = unflatten(vector, params)
    with torch.no_grad():
        for p, part in zip(params, parts):
            p.copy_(part)


# ----------------------------------------------------------------------------- devices
def _check_devices(**arguments) -> None:
    """TypeError unless every tensor among `arguments` (tensors, lists of them or None) is on a CPU or
    CUDA device. Every fake kernel calls it first: real meta tensors reach it through the Meta
    dispatch key (a FakeTensor reports the device it stands for)."""
    for name, value in arguments.items():
        for i, t in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            if isinstance(t, torch.Tensor) and t.device.type not in ("cpu", "cuda"):
                where = name if t is value else f"{name}[{i}]"
                raise TypeError(f"trpo_ext: {where} must be a CPU or CUDA tensor, got one on {t.device}: the ops "
                                "compute on data, which a meta tensor does not have")


class CGResult(NamedTuple):
    """What `mlp_cg` and `rnn_cg` return; the scalars are 0-dim tensors on the solve's device ((C) for a (P, C) b)."""

    x: torch.Tensor  # the solution, flat (or (P, C): one column per right-hand side)
    iterations: torch.Tensor  # CG iterations used (int64)
    residual_norm: torch.Tensor  # ||b - A x|| as tracked by the recursion (float64)
    xAx: torch.Tensor  # x'(F + damping I)x (float64)


# ----------------------------------------------------------------------------- mlp_fvp
def mlp_fvp(obs: torch.Tensor, params: Sequence[torch.Tensor], v: torch.Tensor, *, kind: str, activation: str,
            damping: float, segments: Sequence[int] | None = None,
            action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(F + damping I) v for an MLP policy, flat."""
    return ops.mlp_fvp(obs, list(params), v, kind, activation, damping, segments, action_mask)


@torch.library.register_fake("trpo_ext::mlp_fvp")
def _mlp_fvp_fake(obs, params, v, kind, activation, damping, segments=None, action_mask=None):
    _check_devices(obs=obs, params=params, v=v, action_mask=action_mask)
    return torch.empty_like(v)


# ----------------------------------------------------------------------------- mlp_cg
def mlp_cg(obs: torch.Tensor, params: Sequence[torch.Tensor], b: torch.Tensor, *, kind: str, activation: str,
           damping: float, iters: int, rtol: float, segments: Sequence[int] | None = None,
           action_mask: torch.Tensor | None = None) -> CGResult:
    """Solves (F + damping I) x = b by CG for an MLP policy, the whole loop in one call. `b` (P, C):
    C right-hand sides solved together on one forward pass, each product one GEMM per Jacobian
    product and layer for all columns (docs/design.md, "Several right-hand sides"); each column runs
    its own CG recursion, as if solved alone."""
    return CGResult(*ops.mlp_cg(obs, list(params), b, kind, activation, damping, iters, rtol, segments,
                                action_mask))


@torch.library.register_fake("trpo_ext::mlp_cg")
def _mlp_cg_fake(obs, params, b, kind, activation, damping, iters, rtol, segments=None, action_mask=None):
    _check_devices(obs=obs, params=params, b=b, action_mask=action_mask)
    scalar = dict(device=b.device, dtype=torch.float64)
    shape = tuple(b.shape[1:])  # () for a flat b, (C,) for C columns
    return (torch.empty_like(b, memory_format=torch.contiguous_format), b.new_empty(shape, dtype=torch.int64),
            b.new_empty(shape, **scalar), b.new_empty(shape, **scalar))


# ----------------------------------------------------------------------------- mlp_policy_direction
class DirectionResult(NamedTuple):
    """What `mlp_policy_direction` returns; the scalars are 0-dim tensors on the batch's device (with
    (N, C) advantages: g and x (P, C), the scalars (C))."""

    gradient: torch.Tensor  # g, the surrogate's gradient at the current θ, flat
    x: torch.Tensor  # ≈ (F + damping I)⁻¹ g
    iterations: torch.Tensor  # CG iterations used (int64)
    residual_norm: torch.Tensor  # (float64)
    xAx: torch.Tensor  # x'(F + damping I)x (float64)
    dist_params: torch.Tensor  # the policy's logits or mean on obs, (N, K)


def mlp_policy_direction(obs: torch.Tensor, params: Sequence[torch.Tensor], actions: torch.Tensor,
                         advantages: torch.Tensor, *, kind: str, activation: str, damping: float, iters: int,
                         rtol: float, fvp_obs: torch.Tensor | None = None, group: str | None = None,
                         segments: Sequence[int] | None = None, action_mask: torch.Tensor | None = None,
                         fvp_action_mask: torch.Tensor | None = None) -> DirectionResult:
    """The TRPO direction from one forward pass: g = ∇ mean(π/π_old · A) at ratio 1, then CG on
    (F + damping I) x = g with the Fisher on `fvp_obs` (obs when None), plus the forward pass's
    distribution parameters for the old distribution (the masked logits with `action_mask`).
    `group`: a torch.distributed process group's `group_name`; each rank passes its shard and all
    get the result for the shards together (reductions: the batch sizes, the gradient, one per CG
    product). `fvp_action_mask`: the mask of fvp_obs's rows, given exactly when fvp_obs and
    action_mask are. `advantages` (N, C): C surrogates (a constrained step's reward and cost
    advantages) from the same forward pass, their gradients the columns of g, solved together as
    `mlp_cg` solves a (P, C) b."""
    return DirectionResult(*ops.mlp_policy_direction(obs, list(params), actions, advantages, fvp_obs, kind,
                                                     activation, damping, iters, rtol, group, segments,
                                                     action_mask, fvp_action_mask))


@torch.library.register_fake("trpo_ext::mlp_policy_direction")
def _mlp_policy_direction_fake(obs, params, actions, advantages, fvp_obs, kind, activation, damping, iters, rtol,
                               group=None, segments=None, action_mask=None, fvp_action_mask=None):
    _check_devices(obs=obs, params=params, actions=actions, advantages=advantages, fvp_obs=fvp_obs,
                   action_mask=action_mask, fvp_action_mask=fvp_action_mask)
    numel = sum(p.numel() for p in params)
    scalar = dict(device=obs.device, dtype=torch.float64)
    columns = tuple(advantages.shape[1:])  # () for one surrogate, (C,) for C
    flat = obs.new_empty((numel, *columns), dtype=params[0].dtype)
    # The output width K: the last parameter is the output bias (categorical) or log_std (gaussian), both (K,).
    return (flat, torch.empty_like(flat), obs.new_empty(columns, dtype=torch.int64), obs.new_empty(columns, **scalar),
            obs.new_empty(columns, **scalar), obs.new_empty((obs.shape[0], params[-1].shape[0]), dtype=params[0].dtype))


# ----------------------------------------------------------------------------- mlp_policy_trial
def mlp_policy_trial(obs: torch.Tensor, params: Sequence[torch.Tensor], actions: torch.Tensor,
                     advantages: torch.Tensor, *, old_dist_params: torch.Tensor, old_log_std: torch.Tensor | None,
                     kind: str, activation: str, group: str | None = None, segments: Sequence[int] | None = None,
                     action_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One line-search trial at `params`: (mean KL(old ‖ new), the surrogate's improvement
    mean((π/π_old − 1) · A)) as 0-dim float64 tensors; the old policy is its output on obs (and its
    log_std for a Gaussian). `group` as for `mlp_policy_direction`: one reduction. `action_mask`
    applies to the new logits (and, harmlessly, again to the old ones). `advantages` (N, C): the
    improvement is (C), one per column."""
    return ops.mlp_policy_trial(obs, list(params), actions, advantages, old_dist_params, old_log_std, kind,
                                activation, group, segments, action_mask)


@torch.library.register_fake("trpo_ext::mlp_policy_trial")
def _mlp_policy_trial_fake(obs, params, actions, advantages, old_dist_params, old_log_std, kind, activation,
                           group=None, segments=None, action_mask=None):
    _check_devices(obs=obs, params=params, actions=actions, advantages=advantages, old_dist_params=old_dist_params,
                   old_log_std=old_log_std, action_mask=action_mask)
    return obs.new_empty((), dtype=torch.float64), obs.new_empty(tuple(advantages.shape[1:]), dtype=torch.float64)


# ----------------------------------------------------------------------------- mlp_value_fit
def mlp_value_fit(obs: torch.Tensor, returns: torch.Tensor, params: Sequence[torch.Tensor], *,
                  exp_avg: Sequence[torch.Tensor], exp_avg_sq: Sequence[torch.Tensor],
                  steps: Sequence[torch.Tensor], order: torch.Tensor, batch_size: int, lr: float, beta1: float,
                  beta2: float, eps: float, activation: str, group: str | None = None) -> torch.Tensor:
    """Adam epochs of mean((V(obs) - returns)^2) for an MLP critic, in place; the mean loss (0-dim).
    `group`: a process group's `group_name`; each rank passes its own rows (as many on every rank)
    and every step uses the ranks' minibatches together (one reduction per minibatch). Refused
    before anything is written: lr, beta1, beta2 or eps outside torch.optim.Adam's ranges (lr and
    eps finite), and a tensor it writes (params, exp_avg, exp_avg_sq, steps) sharing memory with
    another argument."""
    return ops.mlp_value_fit(obs, returns, list(params), list(exp_avg), list(exp_avg_sq), list(steps), order,
                             batch_size, lr, beta1, beta2, eps, activation, group)


@torch.library.register_fake("trpo_ext::mlp_value_fit")
def _mlp_value_fit_fake(obs, returns, params, exp_avg, exp_avg_sq, steps, order, batch_size, lr, beta1, beta2,
                        eps, activation, group=None):
    _check_devices(obs=obs, returns=returns, params=params, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, steps=steps,
                   order=order)
    return obs.new_empty((), dtype=torch.float64)


# ----------------------------------------------------------------------------- mlp_act
def mlp_act(obs: torch.Tensor, params: Sequence[torch.Tensor], *, kind: str, activation: str,
            deterministic: bool, generator: torch.Generator | None = None,
            obs_mean: torch.Tensor | None = None, obs_inv_std: torch.Tensor | None = None,
            obs_clip: float = 1.0, segments: Sequence[int] | None = None,
            action_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One rollout step: (normalized observations, actions). Normalization is skipped when
    `obs_mean` is None; `obs_clip` > 0 either way (inf: no clipping). Actions: categorical int64
    (N,), or (N, len(segments)) with `segments`, never a class `action_mask` forbids; bernoulli 0/1
    (N, K) of the parameters' dtype; gaussian (N, K)."""
    return ops.mlp_act(obs, obs_mean, obs_inv_std, obs_clip, list(params), kind, activation, deterministic,
                       generator, segments, action_mask)


@torch.library.register_fake("trpo_ext::mlp_act")
def _mlp_act_fake(obs, obs_mean, obs_inv_std, obs_clip, params, kind, activation, deterministic, generator,
                  segments=None, action_mask=None):
    _check_devices(obs=obs, obs_mean=obs_mean, obs_inv_std=obs_inv_std, params=params, action_mask=action_mask)
    dtype = params[0].dtype
    family = family_named(kind)
    # The last parameter (the output bias, or a Gaussian's log_std) is (K,).
    shape = family.action_shape(obs.shape[0], params[-1].shape[0], segments)
    actions = obs.new_empty(shape, dtype=family.action_dtype(dtype))
    return obs.new_empty(obs.shape, dtype=dtype), actions


# ----------------------------------------------------------------------------- rnn_fvp, rnn_cg
# A recurrent policy (trpo_ext.recurrent.RecurrentPolicy; docs/design.md §12): obs (T, B, D),
# episode_starts (T, B) bool, initial_state [h] (GRU) or [h, c] (LSTM), each (layers, B, hidden);
# params flat in the policy's parameters() order: per recurrent layer weight_ih, weight_hh, bias_ih,
# bias_hh, then the head's W1, b1, ..., WL, bL, then a Gaussian's log_std. Rows (action_mask's) are
# time-major, t·B + b. `cell` ("lstm" / "gru") comes with the rest of the policy's description from
# `trpo_ext.policies.RecurrentFusedSpec.op_kwargs`.
def rnn_fvp(obs: torch.Tensor, episode_starts: torch.Tensor, initial_state: Sequence[torch.Tensor],
            params: Sequence[torch.Tensor], v: torch.Tensor, *, cell: str, kind: str, activation: str, damping: float,
            segments: Sequence[int] | None = None, action_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(F + damping I) v for a recurrent policy, flat: a JVP forward in time, the output Fisher, a VJP
    back in time, on one forward pass (no autograd graph)."""
    return ops.rnn_fvp(obs, episode_starts, list(initial_state), list(params), v, cell, kind, activation, damping,
                       segments, action_mask)


@torch.library.register_fake("trpo_ext::rnn_fvp")
def _rnn_fvp_fake(obs, episode_starts, initial_state, params, v, cell, kind, activation, damping, segments=None,
                  action_mask=None):
    _check_devices(obs=obs, episode_starts=episode_starts, initial_state=initial_state, params=params, v=v,
                   action_mask=action_mask)
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def rnn_cg(obs: torch.Tensor, episode_starts: torch.Tensor, initial_state: Sequence[torch.Tensor],
           params: Sequence[torch.Tensor], b: torch.Tensor, *, cell: str, kind: str, activation: str, damping: float,
           iters: int, rtol: float, segments: Sequence[int] | None = None,
           action_mask: torch.Tensor | None = None, mean_over: float = 0.0, group: str | None = None) -> CGResult:
    """Solves (F + damping I) x = b by CG for a recurrent policy, the whole loop in one call on one
    forward pass (`mlp_cg`'s recursion and kernels). `b` (P, C): C solves one after the other on the
    same forward pass. Data-parallel: `mean_over` the states of all ranks, `group` the process group's
    name (each product summed over its ranks)."""
    return CGResult(*ops.rnn_cg(obs, episode_starts, list(initial_state), list(params), b, cell, kind, activation,
                                damping, iters, rtol, segments, action_mask, mean_over, group))


@torch.library.register_fake("trpo_ext::rnn_cg")
def _rnn_cg_fake(obs, episode_starts, initial_state, params, b, cell, kind, activation, damping, iters, rtol,
                 segments=None, action_mask=None, mean_over=0.0, group=None):
    _check_devices(obs=obs, episode_starts=episode_starts, initial_state=initial_state, params=params, b=b,
                   action_mask=action_mask)
    scalar = dict(device=b.device, dtype=torch.float64)
    shape = tuple(b.shape[1:])
    return (torch.empty_like(b, memory_format=torch.contiguous_format), b.new_empty(shape, dtype=torch.int64),
            b.new_empty(shape, **scalar), b.new_empty(shape, **scalar))
