"""Numerics at the edges: saturated softmax in the fused Fisher, against an exact (mpmath) oracle."""
import gymnasium as gym
import mpmath
import pytest
import torch

import trpo_ext

from helpers import RTOL, rel_err


def _linear_policy(bias, obs_dim, dtype, device, seed=0):
    """A linear categorical policy (hidden=()) whose logits are `bias` plus a small W s."""
    torch.manual_seed(seed)
    policy = trpo_ext.MLPPolicy(obs_dim, gym.spaces.Discrete(len(bias)), hidden=()).to(device, dtype)
    layer = policy.layers[0]
    with torch.no_grad():
        layer.weight.copy_(0.1 * torch.randn_like(layer.weight))
        layer.bias.copy_(torch.tensor(bias, dtype=dtype))
    return policy


def _exact_fvp(policy, obs, v):
    """(1/N) J' M J v for a linear categorical policy, in 200-digit arithmetic from the exact values
    of the parameters, obs and v (every float is exactly representable in mpmath)."""
    with mpmath.workdps(200):
        W = policy.layers[0].weight.detach().double().cpu().tolist()
        b = policy.layers[0].bias.detach().double().cpu().tolist()
        S = obs.detach().double().cpu().tolist()
        vv = [mpmath.mpf(x) for x in v.detach().double().cpu().tolist()]
        k, d = len(W), len(W[0])
        Wd = [vv[j * d:(j + 1) * d] for j in range(k)]  # the tangent of W (row-major) and of b
        bd = vv[k * d:]
        gW = [[mpmath.mpf(0)] * d for _ in range(k)]
        gb = [mpmath.mpf(0)] * k
        n = len(S)
        for s in S:
            s = [mpmath.mpf(x) for x in s]
            z = [mpmath.fsum(mpmath.mpf(W[j][i]) * s[i] for i in range(d)) + b[j] for j in range(k)]
            e = [mpmath.exp(zj) for zj in z]
            total = mpmath.fsum(e)
            p = [ej / total for ej in e]
            u = [mpmath.fsum(Wd[j][i] * s[i] for i in range(d)) + bd[j] for j in range(k)]  # J v
            pu = mpmath.fsum(p[j] * u[j] for j in range(k))
            m = [p[j] * (u[j] - pu) / n for j in range(k)]  # M J v / N
            for j in range(k):
                gb[j] += m[j]
                for i in range(d):
                    gW[j][i] += m[j] * s[i]
        flat = [x for row in gW for x in row] + gb
        return torch.tensor([float(x) for x in flat], dtype=torch.float64)


# Logits whose largest probability rounds to 1 (or to 1 - a few ulps): the products are tiny, and a
# formula p_j (u_j - p'u) loses its dominant term to the rounding of p'u.
SATURATED = {
    "30-0-m5": [30.0, 0.0, -5.0],   # p_0 = 1 - 9.4e-14
    "50-0-0": [50.0, 0.0, 0.0],     # p_0 == 1.0 exactly in float64
    "0-40-3-m2": [0.0, 40.0, 3.0, -2.0],  # the argmax is not class 0
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", list(SATURATED.values()), ids=list(SATURATED))
def test_fused_fvp_saturated_softmax_matches_exact(bias, dtype, device):
    policy = _linear_policy(bias, obs_dim=3, dtype=dtype, device=device)
    g = torch.Generator().manual_seed(1)
    obs = torch.randn(7, 3, generator=g, dtype=dtype).to(device)
    v = torch.randn(sum(p.numel() for p in policy.parameters()), generator=g, dtype=dtype).to(device)
    expected = _exact_fvp(policy, obs, v)
    fused = trpo_ext.fvp(policy, obs, v, path="fused")
    assert torch.isfinite(fused).all()
    assert rel_err(fused.cpu(), expected) <= RTOL[dtype]


def test_fused_fvp_unsaturated_matches_exact(device):
    """The same oracle on ordinary logits (the rewritten row formula is exact there too)."""
    policy = _linear_policy([0.3, -0.2, 0.1, 0.0], obs_dim=3, dtype=torch.float64, device=device)
    g = torch.Generator().manual_seed(2)
    obs = torch.randn(9, 3, generator=g, dtype=torch.float64).to(device)
    v = torch.randn(16, generator=g, dtype=torch.float64).to(device)
    assert rel_err(trpo_ext.fvp(policy, obs, v, path="fused").cpu(), _exact_fvp(policy, obs, v)) <= 1e-13
