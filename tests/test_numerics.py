"""Numerics at the edges: saturated softmax in the fused Fisher, against an exact (mpmath) oracle;
rewards and value targets that float32 cannot train on."""
import re

import gymnasium as gym
import mpmath
import numpy as np
import pytest
import torch

import trpo_ext
from trpo_ext.critic import fit_value_network
from trpo_ext.envs import make_vec_env
from trpo_ext.rollout import MAX_ABS_REWARD, EpisodeStats, RolloutCollector

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


# ----------------------------------------------------------------------------- numbers that break the critic
class RewardAt(gym.Env):
    """obs = [t, 1]; reward 1, except `value` at the env's `at`-th step since construction (steps
    count from 1 across resets); episodes are truncated after 5 steps."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (2,), np.float32)
    action_space = gym.spaces.Discrete(2)

    def __init__(self, value, at):
        self.value, self.at, self.total, self.k = value, at, 0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k = 0
        return np.array([0.0, 1.0], np.float32), {}

    def step(self, action):
        self.k += 1
        self.total += 1
        reward = self.value if self.total == self.at else 1.0
        return np.array([self.k, 1.0], np.float32), reward, False, self.k == 5, {}


def _snapshot(agent):
    return [p.detach().clone() for p in [*agent.policy.parameters(), *agent.value_net.parameters()]]


@pytest.mark.parametrize("value", [1e30, 1e39, -1e30, float("nan"), float("inf")], ids=str)
def test_agent_refuses_a_reward_that_would_break_the_critic(value):
    # n_steps=8: the first rollout (one finished episode) trains normally, the bad reward is step
    # 12, step 4 of the second rollout and step 2 of its episode.
    agent = trpo_ext.TRPO(lambda: RewardAt(value, at=12), n_envs=1, n_steps=8, critic_batch_size=4,
                          policy_kwargs={"hidden": (8,)}, seed=0)
    snapshots = []
    with pytest.raises(ValueError, match=re.escape(f"env 0 returned reward {value!r} at step 4 of this rollout (step 2 of")):
        agent.learn(16, progress_bar=False, callback=lambda a, record: snapshots.append(_snapshot(a)))
    assert len(snapshots) == 1  # one update ran, the second stopped in its rollout
    for before, now in zip(snapshots[0], _snapshot(agent)):
        assert torch.equal(before, now) and torch.isfinite(now).all()
    for state in agent.critic_optimizer.state.values():
        assert torch.isfinite(state["exp_avg_sq"]).all()
    stats = agent.collector.stats
    assert np.isfinite(stats.returns).all() and all(np.isfinite(r) for r, _ in stats.finished)
    assert stats.finished and stats.means()[0] == 5.0
    agent.close()


def test_collector_reward_bound_is_inclusive():
    for value, ok in [(MAX_ABS_REWARD, True), (-MAX_ABS_REWARD, True), (np.nextafter(MAX_ABS_REWARD, np.inf), False)]:
        envs = make_vec_env(lambda: RewardAt(value, at=2), n_envs=1)
        collector = RolloutCollector(envs, 4, torch.device("cpu"), None, EpisodeStats(1, 10))
        collector.reset(seed=0)
        policy = trpo_ext.MLPPolicy(2, envs.single_action_space, hidden=(4,))
        collect = lambda: collector.collect(policy, lambda o: o[:, 0], torch.Generator(), 0.9, 0.9)  # noqa: E731
        if ok:
            assert collect().returns.isfinite().all()
        else:
            with pytest.raises(ValueError, match="MAX_ABS_REWARD"):
                collect()
        envs.close()


def _fit(dtype, target, device, seed=0):
    torch.manual_seed(seed)
    net = trpo_ext.ValueNetwork(3, (8,)).to(device, dtype)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    obs = torch.randn(32, 3, dtype=dtype, device=device)
    fit_value_network(net, opt, obs, torch.randn(32, dtype=dtype, device=device), 1, 8)  # an Adam state to keep
    returns = torch.full((32,), target, dtype=dtype, device=device)
    return net, opt, obs, returns


def _critic_state(net, opt):
    params = [p.detach().clone() for p in net.parameters()]
    return params + [t.clone() for p in net.parameters() for t in opt.state[p].values()]


@pytest.mark.parametrize("target", [1e20, float("nan"), float("inf")], ids=str)
def test_float32_critic_overflow_raises_and_restores(target, device):
    net, opt, obs, returns = _fit(torch.float32, target, device)
    returns[0] = 1.0  # a finite target besides, for the message's range
    before = _critic_state(net, opt)
    with pytest.raises(ValueError, match=r"critic fit: .* became inf or NaN in torch.float32 .*value targets lie in "
                                         r".*restored"):
        fit_value_network(net, opt, obs, returns, 2, 8)
    for b, now in zip(before, _critic_state(net, opt)):
        assert torch.equal(b, now)
    # The critic still trains afterwards.
    fit_value_network(net, opt, obs, torch.randn_like(returns), 2, 8)
    assert all(torch.isfinite(t).all() for t in _critic_state(net, opt))


def test_float32_critic_overflow_in_the_second_moment_alone_is_caught():
    # 1e18 targets and relu hidden units of about 1e4: the loss (1e36) and the parameters stay
    # finite, but the output weights' squared gradients, about (2e18 * 1e4)^2 in float32, overflow
    # exp_avg_sq, after which every Adam step of those weights would be 0.
    torch.manual_seed(0)
    net = trpo_ext.ValueNetwork(3, (8,), "relu")
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    with torch.no_grad():
        net.layers[0].weight.mul_(1e4)
    with pytest.raises(ValueError, match=r"critic fit: exp_avg_sq became inf or NaN .*loss 1e\+36"):
        fit_value_network(net, opt, torch.randn(32, 3), torch.full((32,), 1e18), 1, 8)


def test_float64_critic_on_large_targets_stays_finite_and_moves(device):
    net, opt, obs, returns = _fit(torch.float64, 1e20, device)
    before = _critic_state(net, opt)
    fit_value_network(net, opt, obs, returns, 2, 8)
    after = _critic_state(net, opt)
    assert all(torch.isfinite(t).all() for t in after)
    assert not torch.equal(before[0], after[0])
