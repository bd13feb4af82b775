"""Numerics at the edges: saturated softmax in the fused Fisher, against an exact (mpmath) oracle;
rewards and value targets that float32 cannot train on; every op on stride-0, strided and
zero-size inputs."""
import re

import gymnasium as gym
import mpmath
import numpy as np
import pytest
import torch

import trpo_ext
from trpo_ext import _ops
from trpo_ext.critic import fit_value_network
from trpo_ext.envs import make_vec_env
from trpo_ext.rollout import MAX_ABS_REWARD, EpisodeStats, RolloutCollector

from helpers import RTOL, make_policy, rel_err


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


# ----------------------------------------------------------------------------- every op on any layout
# Each op, its tensor arguments (params element by element) and a function of them. Every op must
# read a stride-0 (`.expand`) or strided argument exactly as a dense copy with the same values, or,
# for what it writes in place (the critic's parameters and Adam state), refuse it with a ValueError.
D = torch.float64


def _policy_args(kind):
    torch.manual_seed(0)
    params = [p.detach().clone() for p in make_policy(kind, 4, 3, (5,), "tanh", D).parameters()]
    obs = torch.randn(6, 4, dtype=D)
    actions = torch.randint(0, 3, (6,)) if kind == "categorical" else torch.randn(6, 3, dtype=D)
    return params, obs, actions, torch.randn(6, dtype=D)


def _op_cases():
    cases = {}
    for kind in ["categorical", "gaussian"]:
        params, obs, actions, adv = _policy_args(kind)
        v = torch.randn(sum(p.numel() for p in params), dtype=D)
        common = dict(kind=kind, activation="tanh")
        cases[f"fvp-{kind}"] = (lambda obs, params, v, c=common: _ops.mlp_fvp(obs, params, v, damping=0.1, **c),
                                dict(obs=obs, params=params, v=v))
        cases[f"cg-{kind}"] = (lambda obs, params, b, c=common: tuple(_ops.mlp_cg(obs, params, b, damping=0.1, iters=4,
                                                                                  rtol=0.0, **c)),
                               dict(obs=obs, params=params, b=v))
        cases[f"direction-{kind}"] = (
            lambda obs, params, actions, advantages, fvp_obs, c=common: tuple(_ops.mlp_policy_direction(
                obs, params, actions, advantages, damping=0.1, iters=4, rtol=0.0, fvp_obs=fvp_obs, **c)),
            dict(obs=obs, params=params, actions=actions, advantages=adv, fvp_obs=obs[:4].clone()))
        trial = dict(obs=obs, params=params, actions=actions, advantages=adv,
                     old_dist_params=torch.randn(6, 3, dtype=D))
        if kind == "gaussian":
            trial["old_log_std"] = torch.randn(3, dtype=D)
        cases[f"trial-{kind}"] = (
            lambda obs, params, actions, advantages, old_dist_params, old_log_std=None, c=common: tuple(
                _ops.mlp_policy_trial(obs, params, actions, advantages, old_dist_params=old_dist_params,
                                      old_log_std=old_log_std, **c)), trial)
        for det in [True, False]:
            cases[f"act-{kind}-{'mode' if det else 'sample'}"] = (
                lambda obs, params, obs_mean, obs_inv_std, c=common, det=det: tuple(_ops.mlp_act(
                    obs, params, deterministic=det, generator=torch.Generator().manual_seed(0), obs_mean=obs_mean,
                    obs_inv_std=obs_inv_std, obs_clip=5.0, **c)),
                dict(obs=obs, params=params, obs_mean=torch.randn(4, dtype=D), obs_inv_std=torch.rand(4, dtype=D)))
    torch.manual_seed(0)
    params = [p.detach().clone() for p in trpo_ext.ValueNetwork(4, (5,)).double().parameters()]

    def fit(obs, returns, params, exp_avg, exp_avg_sq, order):
        steps = [torch.tensor(0.0) for _ in params]
        loss = _ops.mlp_value_fit(obs, returns, params, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, steps=steps,
                                  order=order, batch_size=4, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                  activation="tanh")
        return (loss, *params, *exp_avg, *exp_avg_sq)

    cases["value_fit"] = (fit, dict(obs=torch.randn(6, 4, dtype=D), returns=torch.randn(6, dtype=D), params=params,
                                    exp_avg=[torch.rand_like(p) for p in params],
                                    exp_avg_sq=[torch.rand_like(p) for p in params],
                                    order=torch.stack([torch.randperm(6), torch.randperm(6)])))
    return cases


OPS = _op_cases()
WRITTEN = {"value_fit": ("params", "exp_avg", "exp_avg_sq")}  # updated in place: must be dense


def _layouts(t):
    """(name, dense, other) with equal values: stride 0 everywhere, and every other element of a
    twice-as-wide tensor (strided last dimension)."""
    c = t.flatten()[0].clone()
    yield "stride-0", torch.full_like(t, c.item()), c.expand(t.shape)
    if t.dim() >= 1:
        wide = torch.zeros((*t.shape[:-1], 2 * t.shape[-1]), dtype=t.dtype)
        wide[..., ::2] = t
        yield "strided", t.clone(), wide[..., ::2]


def _arguments(name):
    for key, value in OPS[name][1].items():
        for i in (range(len(value)) if isinstance(value, list) else [None]):
            yield pytest.param(name, key, i, id=f"{name}-{key}" + ("" if i is None else f"[{i}]"))


def _with(args, key, i, tensor):
    out = {k: [t.clone() for t in v] if isinstance(v, list) else v.clone() for k, v in args.items()}
    if i is None:
        out[key] = tensor
    else:
        out[key][i] = tensor
    return out


@pytest.mark.parametrize("name, key, index", [p for name in OPS for p in _arguments(name)])
def test_every_op_reads_any_layout_like_a_dense_copy(name, key, index):
    fn, args = OPS[name]
    original = args[key] if index is None else args[key][index]
    for layout, dense, other in _layouts(original):
        if other.is_contiguous():
            continue  # a 1-element stride-0 tensor is contiguous
        if key in WRITTEN.get(name, ()):
            with pytest.raises(ValueError, match="must be contiguous"):
                fn(**_with(args, key, index, other))
            continue
        expected = fn(**_with(args, key, index, dense))
        got = fn(**_with(args, key, index, other))
        expected, got = (x if isinstance(x, tuple) else (x,) for x in (expected, got))
        for e, g in zip(expected, got):  # the GEMMs may take another path: rounding, not more
            torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-14, msg=lambda m: f"{layout}: {m}")


def test_value_fit_refuses_order_out_of_range():
    fn, args = OPS["value_fit"]
    for bad in [torch.full((1, 6), 6), torch.full((1, 6), -1)]:
        with pytest.raises(ValueError, match=r"order must hold row indices in \[0, 6\), got values in"):
            fn(**_with(args, "order", None, bad))


# Zero-size tensors where the ops accept them: an empty batch at inference, no epochs, and an
# observation of width 0 (a network of biases alone), which must act like an input column of zeros.
def test_act_on_an_empty_batch():
    for name in ["act-categorical-sample", "act-gaussian-sample", "act-categorical-mode"]:
        fn, args = OPS[name]
        x, actions = fn(**_with(args, "obs", None, args["obs"][:0]))
        assert x.shape == (0, 4) and actions.shape[0] == 0


def test_value_fit_with_no_epochs_changes_nothing():
    fn, args = OPS["value_fit"]
    args = _with(args, "order", None, torch.empty(0, 6, dtype=torch.long))
    before = [t.clone() for t in args["params"] + args["exp_avg"] + args["exp_avg_sq"]]
    loss, *after = fn(**args)
    assert loss.item() == 0.0 and all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name", ["fvp-categorical", "fvp-gaussian", "cg-gaussian", "direction-categorical",
                                  "trial-gaussian", "act-categorical-mode", "act-gaussian-mode"])
def test_zero_width_observation_acts_like_a_zero_column(name):
    fn, args = OPS[name]
    zero = _with(args, "obs", None, torch.zeros(6, 1, dtype=D))
    zero["params"][0] = zero["params"][0][:, :1].contiguous()
    empty = _with(zero, "obs", None, torch.empty(6, 0, dtype=D))
    empty["params"][0] = zero["params"][0][:, :0]
    for key in ["v", "b"]:
        if key in zero:
            # params[0] is (5, 1): its entries come first, zero so that the CG solves agree too.
            zero[key] = torch.cat([torch.zeros(5, dtype=D), args[key][20:]])
            empty[key] = zero[key][5:]
    if "fvp_obs" in zero:
        zero["fvp_obs"], empty["fvp_obs"] = torch.zeros(4, 1, dtype=D), torch.empty(4, 0, dtype=D)
    if "obs_mean" in zero:
        zero["obs_mean"], zero["obs_inv_std"] = torch.zeros(1, dtype=D), torch.ones(1, dtype=D)
        empty["obs_mean"], empty["obs_inv_std"] = torch.empty(0, dtype=D), torch.empty(0, dtype=D)
    with_column, without = (x if isinstance(x, tuple) else (x,) for x in (fn(**zero), fn(**empty)))
    n_params = sum(p.numel() for p in zero["params"])
    for a, b in zip(with_column, without):
        if a.dim() == 1 and a.numel() == n_params:
            a = a[5:]  # the zero column's entries: their gradient and curvature are 0
        elif a.dim() == 2 and a.shape[1] == 1 and b.shape[1] == 0:
            continue  # the normalized observations themselves
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-14)
