"""Bad input gets an exception naming the argument, never a crash, and never touches the policy."""
import gymnasium as gym
import pytest
import torch

import trpo_ext

from helpers import make_policy, n_params, zero_width

ops = torch.ops.trpo_ext


@pytest.fixture
def setup():
    policy = make_policy("gaussian", 4, 2, (5,), "tanh", torch.float32)
    obs = torch.randn(6, 4)
    v = torch.randn(n_params(policy))
    return policy, obs, v


def _params_unchanged(policy, before):
    return all(torch.equal(a, b) for a, b in zip(before, policy.parameters()))


@pytest.mark.parametrize("fn", ["fvp", "cg_solve"])
@pytest.mark.parametrize("mutate, error, words", [
    pytest.param(lambda p, o, v: (p, o.double(), v), TypeError, "obs must have the policy's dtype", id="obs-dtype"),
    pytest.param(lambda p, o, v: (p, o, v.double()), TypeError, "must have the policy's dtype", id="v-dtype"),
    pytest.param(lambda p, o, v: (p, o.to("meta"), v), TypeError, "obs must be on the policy's device", id="obs-device"),
    pytest.param(lambda p, o, v: (p, o[:, :3], v), ValueError, "obs must have shape (N, 4)", id="obs-width"),
    pytest.param(lambda p, o, v: (p, o[0], v), ValueError, "obs must have shape (N, 4)", id="obs-1d"),
    pytest.param(lambda p, o, v: (p, o[:0], v), ValueError, "empty batch", id="obs-empty"),
    pytest.param(lambda p, o, v: (p, o, v[:-1]), ValueError, "flat vector of length", id="v-length"),
    pytest.param(lambda p, o, v: (p, o, v.view(1, -1)), ValueError, "flat vector of length", id="v-2d"),
    pytest.param(lambda p, o, v: (p, o.index_fill(0, torch.tensor([2]), float("nan")), v), ValueError,
                 "obs contains NaN", id="obs-nan"),
    pytest.param(lambda p, o, v: (p, o, v.index_fill(0, torch.tensor([0]), float("inf"))), ValueError,
                 "contains NaN or Inf", id="v-inf"),
    pytest.param(lambda p, o, v: ("not a module", o, v), TypeError, "policy must be a torch.nn.Module", id="not-module"),
    pytest.param(lambda p, o, v: (p, o.numpy(), v), TypeError, "obs must be a torch.Tensor", id="obs-numpy"),
])
def test_bad_arguments(setup, fn, mutate, error, words):
    policy, obs, v = setup
    before = [p.detach().clone() for p in policy.parameters()]
    args = mutate(policy, obs, v)
    with pytest.raises(error, match=None) as info:
        getattr(trpo_ext, fn)(*args)
    assert words in str(info.value)
    assert _params_unchanged(policy, before)


@pytest.mark.parametrize("damping", [-0.1, float("nan"), float("inf"), "0.1", True])
def test_bad_damping(setup, damping):
    policy, obs, v = setup
    for call in (lambda: trpo_ext.fvp(policy, obs, v, damping=damping),
                 lambda: trpo_ext.cg_solve(policy, obs, v, damping=damping)):
        with pytest.raises(ValueError, match=r"damping must be a finite number in \[0.0, inf\]"):
            call()


@pytest.mark.parametrize("iters", [0, -3, 2.5, True])
def test_bad_iters(setup, iters):
    policy, obs, v = setup
    with pytest.raises(ValueError, match="iters must be an int >= 1"):
        trpo_ext.cg_solve(policy, obs, v, iters=iters)


@pytest.mark.parametrize("rtol", [-1.0, 1.0, 2.0, float("nan")])
def test_bad_rtol(setup, rtol):
    # The range of TrustRegionConfig.cg_rtol, checked in one place: rtol >= 1 would run no iteration.
    policy, obs, v = setup
    with pytest.raises(ValueError, match=r"rtol must be a finite number in \[0.0, 1.0\)"):
        trpo_ext.cg_solve(policy, obs, v, rtol=rtol)
    with pytest.raises(ValueError, match=r"cg_rtol must be a finite number in \[0.0, 1.0\)"):
        trpo_ext.trust_region_step(policy, obs, v[:obs.shape[0]] * 0, v[:obs.shape[0]], cg_rtol=rtol)


@pytest.mark.parametrize("space", [
    gym.spaces.MultiDiscrete([[2, 3]]),
    gym.spaces.Box(-1, 1, (2, 2)),
    gym.spaces.Dict({"a": gym.spaces.Discrete(2)}),
    gym.spaces.Tuple([gym.spaces.Discrete(2)]),
    gym.spaces.MultiBinary([2, 2]),
])
def test_unsupported_action_space(space):
    with pytest.raises(TypeError, match="action_space"):
        trpo_ext.MLPPolicy(3, space)


@pytest.mark.parametrize("kwargs, error, words", [
    pytest.param(dict(activation="gelu"), ValueError, "activation must be one of", id="unknown-activation"),
    pytest.param(dict(hidden=(64, 0)), ValueError, "hidden must be a sequence of positive ints", id="zero-width"),
    pytest.param(dict(hidden=64), TypeError, "hidden must be a sequence of positive ints", id="not-a-sequence"),
])
def test_bad_policy_config(kwargs, error, words):
    with pytest.raises(error, match=words):
        trpo_ext.MLPPolicy(3, gym.spaces.Discrete(2), **kwargs)


def test_bad_obs_dim():
    with pytest.raises(ValueError, match="obs_dim must be a positive int"):
        trpo_ext.MLPPolicy(0, gym.spaces.Discrete(2))


def test_generic_policy_with_unsupported_distribution():
    class BetaPolicy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 1)

        def forward(self, obs):
            return torch.distributions.Beta(self.lin(obs).exp().squeeze(-1), torch.ones(obs.shape[0]))

    policy = BetaPolicy()
    with pytest.raises(TypeError, match="policy must return Categorical, MultiCategorical, Independent.Bernoulli. or"):
        trpo_ext.fvp(policy, torch.randn(5, 3), torch.randn(4))


def test_mixed_dtype_policy():
    policy = make_policy("categorical", 3, 2, (4,), "tanh", torch.float32)
    policy.layers[0].double()
    with pytest.raises(TypeError, match="share one dtype and device"):
        trpo_ext.fvp(policy, torch.randn(5, 3), torch.randn(n_params(policy)))


# The ops themselves check their arguments too (for callers that bypass the Python wrappers).
def _op_args(policy, obs, v):
    return obs, [p.detach() for p in policy.parameters()], v


def _with(a, i, value):
    params = list(a[1])
    params[i] = value
    return params


# The setup's gaussian policy: params = [W0 (5, 4), b0, W1 (2, 5), b1, log_std].
@pytest.mark.parametrize("change, error, words", [
    pytest.param(lambda a: (a[0][:, :2], a[1], a[2], "gaussian", "tanh", 0.0), ValueError,
                 r"params\[0\] \(weight of layer 0\) must have shape \(out, 2\)", id="obs-width"),
    pytest.param(lambda a: (a[0], a[1][:-1], a[2], "gaussian", "tanh", 0.0), ValueError, "params must be",
                 id="param-count"),
    pytest.param(lambda a: (a[0], _with(a, 1, a[1][1][:2]), a[2], "gaussian", "tanh", 0.0), ValueError,
                 r"params\[1\] \(bias of layer 0\) must have shape \(5\)", id="bias-shape"),
    pytest.param(lambda a: (a[0], _with(a, 4, a[1][4][:1]), a[2], "gaussian", "tanh", 0.0), ValueError,
                 r"params\[4\] \(log_std\) must have shape \(2\)", id="log-std-shape"),
    pytest.param(lambda a: (a[0], _with(a, 2, a[1][2].double()), a[2], "gaussian", "tanh", 0.0), TypeError,
                 r"params\[2\] \(weight of layer 1\) must have obs's dtype", id="param-dtype"),
    pytest.param(lambda a: (a[0], zero_width(a[1], 0), a[2], "gaussian", "tanh", 0.0), ValueError,
                 r"params\[0\] \(weight of layer 0\) has 0 output units", id="zero-width-hidden"),
    pytest.param(lambda a: (a[0], zero_width(a[1], 1)[:-1] + [a[1][4][:0]], a[2], "gaussian", "tanh", 0.0),
                 ValueError, r"params\[2\] \(weight of layer 1\) has 0 output units", id="zero-width-output"),
    pytest.param(lambda a: (a[0], zero_width(a[1][:-1], 1), a[2], "categorical", "tanh", 0.0), ValueError,
                 r"params\[2\] \(weight of layer 1\) has 0 output units", id="zero-categorical-output"),
    pytest.param(lambda a: (a[0], a[1], a[2][:3], "gaussian", "tanh", 0.0), ValueError, "v must be a flat vector",
                 id="v-length"),
    pytest.param(lambda a: (a[0], a[1], a[2].double(), "gaussian", "tanh", 0.0), TypeError,
                 "v must have obs's dtype", id="v-dtype"),
    pytest.param(lambda a: (a[0], a[1], a[2], "beta", "tanh", 0.0), ValueError, "kind must be", id="bad-kind"),
    pytest.param(lambda a: (a[0], a[1], a[2], "gaussian", "swish", 0.0), ValueError,
                 "activation must be one of 'tanh', 'relu', 'elu'", id="bad-activation"),
    pytest.param(lambda a: (a[0], a[1], a[2], "gaussian", "tanh", -1.0), ValueError, "damping must be",
                 id="negative-damping"),
    pytest.param(lambda a: (a[0].double(), a[1], a[2], "gaussian", "tanh", 0.0), TypeError,
                 "must have obs's dtype", id="obs-dtype"),
    pytest.param(lambda a: (a[0].int(), a[1], a[2], "gaussian", "tanh", 0.0), TypeError,
                 "obs must be float32 or float64", id="obs-int"),
    pytest.param(lambda a: (a[0][:0], a[1], a[2], "gaussian", "tanh", 0.0), ValueError, "empty batch",
                 id="obs-empty"),
])
def test_op_checks(setup, change, error, words):
    args = change(_op_args(*setup))
    with pytest.raises(error, match=words):
        ops.mlp_fvp(*args)
    # mlp_cg runs the same checks: the same exception type and words (its vector is called b).
    with pytest.raises(error, match=words.replace("v must", "b must")):
        ops.mlp_cg(*args, 3, 1e-6)


def test_op_cg_checks(setup):
    obs, params, v = _op_args(*setup)
    with pytest.raises(ValueError, match="iters must be >= 1"):
        ops.mlp_cg(obs, params, v, "gaussian", "tanh", 0.1, 0, 1e-6)
    with pytest.raises(ValueError, match="rtol must be finite"):
        ops.mlp_cg(obs, params, v, "gaussian", "tanh", 0.1, 3, float("inf"))

