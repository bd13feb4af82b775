"""The extension's torch ops and their fake (meta) implementations for torch.compile / FakeTensor.

Parameter lists are flat, in `MLPPolicy.parameters()` order: W1, b1, ..., WL, bL[, log_std].
"""
from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (registers torch.ops.trpo_ext.*)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "trpo_ext._C, the compiled extension, could not be imported. Build it with "
        "`pip install . --no-build-isolation` against the torch you run "
        f"(torch {torch.__version__}). Original error: {exc}"
    ) from exc

ops = torch.ops.trpo_ext


def cuda_built() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return bool(ops.cuda_built())


@torch.library.register_fake("trpo_ext::mlp_fvp")
def _mlp_fvp_fake(obs, params, v, kind, activation, damping):
    return torch.empty_like(v)


@torch.library.register_fake("trpo_ext::mlp_cg")
def _mlp_cg_fake(obs, params, b, kind, activation, damping, iters, rtol):
    scalar = dict(device=b.device, dtype=torch.float64)
    return (torch.empty_like(b), b.new_empty((), dtype=torch.int64), b.new_empty((), **scalar),
            b.new_empty((), **scalar))


@torch.library.register_fake("trpo_ext::mlp_value_fit")
def _mlp_value_fit_fake(obs, returns, params, exp_avg, exp_avg_sq, steps, order, batch_size, lr, beta1, beta2,
                        eps, activation):
    return obs.new_empty((), dtype=torch.float64)


@torch.library.register_fake("trpo_ext::mlp_act")
def _mlp_act_fake(obs, obs_mean, obs_inv_std, obs_clip, params, kind, activation, deterministic, generator):
    dtype = params[0].dtype
    n = obs.shape[0]
    policy_obs = obs.new_empty(obs.shape, dtype=dtype)
    if kind == "categorical":
        return policy_obs, obs.new_empty((n,), dtype=torch.int64)
    return policy_obs, obs.new_empty((n, params[-1].shape[0]), dtype=dtype)
