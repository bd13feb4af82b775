"""torch.library.opcheck on every op: schema, fake (meta) kernels, dispatch; and torch.compile tracing."""
import pytest
import torch

import trpo_ext

from helpers import make_policy, n_params

ops = torch.ops.trpo_ext


def _args(kind, dtype, device):
    policy = make_policy(kind, 5, 3, (8, 7), "tanh", dtype, device)
    obs = torch.randn(9, 5, dtype=dtype, device=device)
    v = torch.randn(n_params(policy), dtype=dtype, device=device)
    return obs, [p.detach() for p in policy.parameters()], v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_opcheck_mlp_fvp(kind, dtype, device):
    obs, params, v = _args(kind, dtype, device)
    torch.library.opcheck(ops.mlp_fvp.default, (obs, params, v, kind, "tanh", 0.1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_opcheck_mlp_cg(kind, dtype, device):
    obs, params, v = _args(kind, dtype, device)
    torch.library.opcheck(ops.mlp_cg.default, (obs, params, v, kind, "relu", 0.1, 5, 1e-6))


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    obs, params, v = _args("gaussian", torch.float32, "cpu")
    with FakeTensorMode() as mode:
        fobs, fparams, fv = mode.from_tensor(obs), [mode.from_tensor(p) for p in params], mode.from_tensor(v)
        x, iters, res, xAx = ops.mlp_cg(fobs, fparams, fv, "gaussian", "tanh", 0.1, 5, 1e-6)
    assert x.shape == v.shape and iters.dtype == torch.int64 and res.shape == () and xAx.dtype == torch.float64


def test_torch_compile_traces_the_ops():
    obs, params, v = _args("categorical", torch.float32, "cpu")

    @torch.compile(fullgraph=True, backend="aot_eager")
    def solve(obs, params, v):
        return ops.mlp_cg(obs, params, v, "categorical", "tanh", 0.1, 5, 1e-6)[0]

    expected = ops.mlp_cg(obs, params, v, "categorical", "tanh", 0.1, 5, 1e-6)[0]
    torch.testing.assert_close(solve(obs, params, v), expected)


def test_cuda_built_reports_a_bool():
    assert isinstance(trpo_ext.cuda_built(), bool)


def _direction_args(kind, dtype, device, n=9):
    obs, params, _ = _args(kind, dtype, device)
    g = torch.Generator().manual_seed(0)
    actions = (torch.randint(0, 3, (n,), generator=g) if kind == "categorical"
               else torch.randn(n, 3, generator=g, dtype=dtype)).to(device)
    advantages = torch.randn(n, generator=g, dtype=dtype).to(device)
    return obs, params, actions, advantages


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_opcheck_mlp_policy_direction(kind, dtype, device):
    obs, params, actions, advantages = _direction_args(kind, dtype, device)
    torch.library.opcheck(ops.mlp_policy_direction.default,
                          (obs, params, actions, advantages, obs[:5], kind, "tanh", 0.1, 5, 1e-6))


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_policy_direction_is_the_autograd_gradient_and_the_cg_solution(kind, device):
    policy = make_policy(kind, 5, 3, (8, 7), "tanh", torch.float64, device)
    obs, params, actions, advantages = _direction_args(kind, torch.float64, device, n=9)
    obs = torch.randn(9, 5, dtype=torch.float64, device=device)
    fvp_obs = obs[:4]
    result = trpo_ext._ops.mlp_policy_direction(obs, [p.detach() for p in policy.parameters()], actions, advantages,
                                                kind=kind, activation="tanh", damping=0.1, iters=7, rtol=1e-12,
                                                fvp_obs=fvp_obs)
    dist = policy(obs)
    surrogate = (torch.exp(dist.log_prob(actions) - dist.log_prob(actions).detach()) * advantages).mean()
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(surrogate, list(policy.parameters()))])
    x, used, _, xAx = trpo_ext.reference.cg_solve(policy, fvp_obs, g, iters=7, damping=0.1, rtol=1e-12)
    torch.testing.assert_close(result.gradient, g, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(result.x, x, rtol=1e-8, atol=1e-12)
    assert int(result.iterations) == used
    torch.testing.assert_close(result.dist_params, policy.distribution_params(obs).detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind, change, error, words", [
    ("categorical", lambda a: a.__setitem__(2, a[2] + 3), ValueError, "actions must be class indices in [0, 3)"),
    ("categorical", lambda a: a.__setitem__(2, a[2].double()), TypeError, "actions must be int64"),
    ("gaussian", lambda a: a.__setitem__(2, a[2][:, :2]), ValueError, "actions must have shape (9, 3)"),
    ("gaussian", lambda a: a.__setitem__(3, a[3][:4]), ValueError, "advantages must have shape (9)"),
    ("gaussian", lambda a: a.__setitem__(3, a[3].float()), TypeError, "advantages must have obs's dtype"),
    ("gaussian", lambda a: a.__setitem__(4, a[4][:, :2]), ValueError, "fvp_obs must have shape"),
], ids=["class-out-of-range", "float-classes", "gaussian-action-width", "advantages-length", "advantages-dtype",
        "fvp-obs-width"])
def test_policy_direction_checks(kind, change, error, words):
    obs, params, actions, advantages = _direction_args(kind, torch.float64, "cpu")
    args = [obs, params, actions, advantages, obs[:4], kind, "tanh", 0.1, 5, 1e-6]
    change(args)
    with pytest.raises(error) as info:
        ops.mlp_policy_direction(*args)
    assert words in str(info.value)


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_policy_trial_is_the_kl_and_improvement_of_torch_distributions(kind, device):
    old = make_policy(kind, 5, 3, (8, 7), "relu", torch.float64, device, seed=0)
    new = make_policy(kind, 5, 3, (8, 7), "relu", torch.float64, device, seed=1)
    obs, _, actions, advantages = _direction_args(kind, torch.float64, device)
    with torch.no_grad():
        old_dist, new_dist = old(obs), new(obs)
        expected_kl = torch.distributions.kl_divergence(old_dist, new_dist).mean()
        expected_improvement = (torch.expm1(new_dist.log_prob(actions) - old_dist.log_prob(actions))
                                * advantages).mean()
    kl, improvement = trpo_ext._ops.mlp_policy_trial(
        obs, [p.detach() for p in new.parameters()], actions, advantages,
        old_dist_params=old.distribution_params(obs).detach(),
        old_log_std=old.log_std.detach() if kind == "gaussian" else None, kind=kind, activation="relu")
    assert kl.dtype == improvement.dtype == torch.float64 and kl.shape == improvement.shape == ()
    assert float(kl) == pytest.approx(float(expected_kl), rel=1e-12) and float(kl) > 0
    assert float(improvement) == pytest.approx(float(expected_improvement), rel=1e-12)


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_opcheck_mlp_policy_trial(kind, device):
    obs, params, actions, advantages = _direction_args(kind, torch.float32, device)
    old_dist_params = torch.randn(9, 3, device=device)
    old_log_std = params[-1].clone() if kind == "gaussian" else None
    torch.library.opcheck(ops.mlp_policy_trial.default,
                          (obs, params, actions, advantages, old_dist_params, old_log_std, kind, "tanh"))


def test_policy_trial_checks_the_old_distribution():
    obs, params, actions, advantages = _direction_args("gaussian", torch.float64, "cpu")
    with pytest.raises(ValueError, match="old_log_std must be given for a gaussian policy"):
        ops.mlp_policy_trial(obs, params, actions, advantages, torch.zeros(9, 3, dtype=torch.float64), None,
                             "gaussian", "tanh")
    with pytest.raises(ValueError, match=r"old_dist_params must have shape \(9, 3\)"):
        ops.mlp_policy_trial(obs, params, actions, advantages, torch.zeros(9, 2, dtype=torch.float64), params[-1],
                             "gaussian", "tanh")
