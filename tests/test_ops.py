"""The fused ops (trpo_ext/_ops.py) on every fused action case (helpers.FUSED_CASES: one softmax,
MultiDiscrete segments, Bernoullis and a Gaussian, masked and not): torch.library.opcheck (schema,
fake kernels, dispatch) and torch.compile tracing; the policy step's direction and line-search
trial against the reference (trpo_ext.reference); what masks and segments mean for the products.
The products and CG against the reference on every case: test_fisher.py; mlp_act: test_act.py;
bad input: test_errors.py."""
import copy

import gymnasium as gym
import pytest
import torch

import trpo_ext
from trpo_ext import _ops, reference
from trpo_ext.distributions import MASKED_LOGIT
from trpo_ext.policies import fused_spec

from helpers import FUSED_CASES, RTOL, action_problem, make_policy, n_params, random_mask, rel_err, sample_batch

ops = torch.ops.trpo_ext
DTYPES = [torch.float32, torch.float64]
CG_RTOL = {torch.float64: 1e-8, torch.float32: 1e-4}  # CG amplifies rounding (docs/design.md, "Tolerances")
MASKED_CASES = [case for case in FUSED_CASES if case.endswith("-masked")]


def _params(policy):
    return [p.detach() for p in policy.parameters()]


def _problem(case, dtype, device="cpu", n=9, **kwargs):
    """(policy, obs, v, mask, actions, advantages) for an ACTION_CASES entry: actions drawn from the (masked) policy."""
    policy, obs, v, mask = action_problem(case, dtype, device, n=n, **kwargs)
    return (policy, obs, v, mask, *sample_batch(policy, obs, mask))


def _schema(policy):
    """kind, activation and segments for an op called positionally, from the one builder."""
    kwargs = fused_spec(policy).op_kwargs()
    return kwargs["kind"], kwargs["activation"], kwargs["segments"]


def _old_log_std(policy):
    """A Gaussian's log_std (a copy) as the old distribution's; None for the other families."""
    return policy.log_std.detach().clone() if policy.action_spec.family.has_log_std else None


def _masked_logits(policy, obs, mask):
    """The policy's output on obs with the masked logits replaced, as the ops return the old distribution."""
    with torch.no_grad():
        out = policy.distribution_params(obs)
    return out if mask is None else out.masked_fill(~mask, MASKED_LOGIT)


def _double(policy, *tensors):
    """A float64 copy of the policy and the floating tensors (the reference's precision)."""
    return (copy.deepcopy(policy).double(),
            *(t.double() if t is not None and t.is_floating_point() else t for t in tensors))


# ----------------------------------------------------------------------------- schema, fake kernels, compile
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_opcheck_mlp_fvp(case, dtype, device):
    policy, obs, v, mask = action_problem(case, dtype, device, n=9)
    kind, activation, segments = _schema(policy)
    torch.library.opcheck(ops.mlp_fvp.default, (obs, _params(policy), v, kind, activation, 0.1, segments, mask))


def _columns(t, columns):
    """t itself (columns None), or t and a second column beside it: (len, 2) (a constrained step's two solves)."""
    return t if columns is None else torch.stack([t, t.flip(0) + 0.5], 1)


@pytest.mark.parametrize("columns", [None, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_opcheck_mlp_cg(case, dtype, columns, device):
    policy, obs, v, mask = action_problem(case, dtype, device, n=9, activation="relu")
    kind, activation, segments = _schema(policy)
    torch.library.opcheck(ops.mlp_cg.default,
                          (obs, _params(policy), _columns(v, columns), kind, activation, 0.1, 5, 1e-6, segments, mask))


@pytest.mark.parametrize("columns", [None, 2])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_opcheck_mlp_policy_direction(case, dtype, columns, device):
    policy, obs, _, mask, actions, advantages = _problem(case, dtype, device)
    advantages = _columns(advantages, columns)
    kind, activation, segments = _schema(policy)
    fvp_mask = None if mask is None else mask[:5]
    torch.library.opcheck(ops.mlp_policy_direction.default,
                          (obs, _params(policy), actions, advantages, obs[:5], kind, activation, 0.1, 5, 1e-6, None,
                           segments, mask, fvp_mask))


@pytest.mark.parametrize("columns", [None, 2])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_opcheck_mlp_policy_trial(case, columns, device):
    policy, obs, _, mask, actions, advantages = _problem(case, torch.float32, device)
    advantages = _columns(advantages, columns)
    kind, activation, segments = _schema(policy)
    old_dist_params = torch.randn(obs.shape[0], policy.action_dim, device=device)
    torch.library.opcheck(ops.mlp_policy_trial.default,
                          (obs, _params(policy), actions, advantages, old_dist_params, _old_log_std(policy), kind,
                           activation, None, segments, mask))


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fake_tensor_shapes(case):
    # Every op's fake (meta) kernel gives its real outputs' shapes and dtypes.
    from torch._subclasses.fake_tensor import FakeTensorMode

    policy, obs, v, mask, actions, advantages = _problem(case, torch.float32)
    kwargs = fused_spec(policy).op_kwargs(action_mask=mask)
    old = _masked_logits(policy, obs, mask)

    def run(obs, params, v, actions, advantages, old, old_log_std, mask):
        kw = {**kwargs, "action_mask": mask} if mask is not None else kwargs
        trial_kw = dict(old_dist_params=old, old_log_std=old_log_std, **kw)
        return [_ops.mlp_fvp(obs, params, v, damping=0.1, **kw),
                *_ops.mlp_cg(obs, params, v, damping=0.1, iters=5, rtol=1e-6, **kw),
                *_ops.mlp_policy_direction(obs, params, actions, advantages, damping=0.1, iters=5, rtol=1e-6, **kw),
                *_ops.mlp_policy_trial(obs, params, actions, advantages, **trial_kw),
                *_ops.mlp_act(obs, params, deterministic=True, **kw)]

    inputs = (obs, _params(policy), v, actions, advantages, old, _old_log_std(policy), mask)
    real = run(*inputs)
    with FakeTensorMode() as mode:
        fake = run(*[None if t is None else [mode.from_tensor(p) for p in t] if isinstance(t, list)
                     else mode.from_tensor(t) for t in inputs])
    assert [(t.shape, t.dtype) for t in fake] == [(t.shape, t.dtype) for t in real]
    x, iters, res, xAx = fake[1:5]
    assert x.shape == v.shape and iters.dtype == torch.int64 and res.shape == () and xAx.dtype == torch.float64


@pytest.mark.parametrize("case", FUSED_CASES)
def test_torch_compile_traces_the_ops(case):
    policy, obs, v, mask = action_problem(case, torch.float32, n=9)
    kind, activation, segments = _schema(policy)
    params = _params(policy)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def solve(obs, params, v, mask):
        return ops.mlp_cg(obs, params, v, kind, activation, 0.1, 5, 1e-6, segments, mask)[0]

    expected = ops.mlp_cg(obs, params, v, kind, activation, 0.1, 5, 1e-6, segments, mask)[0]
    torch.testing.assert_close(solve(obs, params, v, mask), expected)


def test_cuda_built_reports_a_bool():
    assert isinstance(trpo_ext.cuda_built(), bool)


# ----------------------------------------------------------------------------- the policy step
@pytest.mark.parametrize("fvp_rows", [False, True], ids=["fvp-on-obs", "fvp-obs"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_policy_direction_is_the_autograd_gradient_and_the_cg_solution(case, dtype, fvp_rows, device):
    policy, obs, _, mask, actions, advantages = _problem(case, dtype, device, n=11)
    fvp_obs, fvp_mask = obs, mask
    if fvp_rows:  # the Fisher on other rows (and their own mask)
        g = torch.Generator().manual_seed(9)
        fvp_obs = torch.randn(6, 5, generator=g, dtype=dtype).to(device)
        fvp_mask = None if mask is None else random_mask(policy.action_spec, 6, g, device)
    result = _ops.mlp_policy_direction(obs, _params(policy), actions, advantages, damping=0.1, iters=10, rtol=1e-12,
                                       fvp_obs=fvp_obs if fvp_rows else None,
                                       **fused_spec(policy).op_kwargs(action_mask=mask,
                                                                      fvp_action_mask=fvp_mask if fvp_rows else None))
    # The reference, in float64: the surrogate's gradient by autograd, then CG with double-backprop products.
    policy64, obs64, actions64, advantages64, fvp_obs64 = _double(policy, obs, actions, advantages, fvp_obs)
    log_prob = reference.log_prob(policy64, obs64, actions64, mask)
    surrogate = (torch.exp(log_prob - log_prob.detach()) * advantages64).mean()
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(surrogate, list(policy64.parameters()))])
    x, used, _, _ = reference.cg_solve(policy64, fvp_obs64, g.to(dtype).double(), iters=10, damping=0.1, rtol=1e-12,
                                       action_mask=fvp_mask)
    assert result.gradient.dtype == result.x.dtype == dtype
    assert rel_err(result.gradient, g) <= RTOL[dtype]
    assert rel_err(result.x, x) <= CG_RTOL[dtype]
    if dtype == torch.float64:
        torch.testing.assert_close(result.gradient, g, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(result.x, x, rtol=1e-8, atol=1e-12)
        assert int(result.iterations) == used
    # The old distribution: the logits or mean on obs, the masked logits as they were sampled.
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else {}
    torch.testing.assert_close(result.dist_params, _masked_logits(policy, obs, mask), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_policy_trial_is_the_kl_and_improvement_of_the_reference(case, dtype, device):
    old, obs, _, mask, actions, advantages = _problem(case, dtype, device, n=11, activation="relu")
    new = copy.deepcopy(old)
    g = torch.Generator().manual_seed(10)
    with torch.no_grad():
        for p in new.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p))
    kl, improvement = _ops.mlp_policy_trial(obs, _params(new), actions, advantages,
                                            old_dist_params=_masked_logits(old, obs, mask),
                                            old_log_std=_old_log_std(old),
                                            **fused_spec(new).op_kwargs(action_mask=mask))
    assert kl.dtype == improvement.dtype == torch.float64 and kl.shape == improvement.shape == ()
    old64, obs64, actions64, advantages64 = _double(old, obs, actions, advantages)
    new64 = copy.deepcopy(new).double()
    with torch.no_grad():
        expected_kl = reference.kl(new64, obs64, mask, old_policy=old64).item()
        log_ratio = reference.log_prob(new64, obs64, actions64, mask) - reference.log_prob(old64, obs64, actions64, mask)
        expected_improvement = (torch.expm1(log_ratio) * advantages64).mean().item()
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    assert expected_kl > 1e-4  # a real trial, not a vanishing one
    assert float(kl) == pytest.approx(expected_kl, rel=tol)
    assert abs(float(improvement) - expected_improvement) <= tol * max(abs(expected_improvement), 1e-2)


@pytest.mark.parametrize("case", FUSED_CASES)
def test_policy_trial_at_the_old_parameters_is_zero(case):
    policy, obs, _, mask, actions, advantages = _problem(case, torch.float64, n=11)
    kwargs = fused_spec(policy).op_kwargs(action_mask=mask)
    old = _ops.mlp_policy_direction(obs, _params(policy), actions, advantages, damping=0.1, iters=2, rtol=0.0,
                                    **kwargs).dist_params
    kl, improvement = _ops.mlp_policy_trial(obs, _params(policy), actions, advantages, old_dist_params=old,
                                            old_log_std=_old_log_std(policy), **kwargs)
    assert kl.item() == 0.0 and improvement.item() == 0.0


# ----------------------------------------------------------------------------- what masks and segments mean
@pytest.mark.parametrize("case", MASKED_CASES)
def test_masked_logits_contribute_nothing(case):
    """Whatever a masked class's raw logit is, the products are those of the policy without it: moving
    the masked logits (here through the output bias of a one-row batch) changes nothing."""
    policy, obs, v, mask = action_problem(case, torch.float64, n=1, seed=4)
    assert not mask.all()  # something is masked
    moved = copy.deepcopy(policy)
    with torch.no_grad():
        bias = moved.layers[-1].bias
        bias.add_(torch.where(mask[0], 0.0, 50.0 * torch.randn(bias.shape, dtype=torch.float64)))
    kwargs = fused_spec(policy).op_kwargs(action_mask=mask)
    fvps = [_ops.mlp_fvp(obs, _params(p), v, damping=0.0, **kwargs) for p in (policy, moved)]
    # The output bias's masked entries get exactly 0 (no gradient flows into a masked logit).
    bias_masked = fvps[0][-policy.action_dim:][~mask[0]]
    assert torch.equal(bias_masked, torch.zeros_like(bias_masked))
    torch.testing.assert_close(fvps[0], fvps[1], rtol=1e-12, atol=1e-14)
    assert rel_err(fvps[0], reference.fvp(policy, obs, v, damping=0.0, action_mask=mask)) <= RTOL[torch.float64]


def test_a_size_one_segment_adds_nothing():
    """A segment with one class is certain: its block of the output Fisher is 0, and the rest of the
    product is that of the network without the unit."""
    policy, obs, _, _ = action_problem("multicategorical", torch.float64, n=11)
    nvec = list(policy.action_spec.segments)  # (3, 2, 4): 9 logits
    extended = make_policy(gym.spaces.MultiDiscrete(nvec + [1]), 5, hidden=(8, 7))
    with torch.no_grad():  # the same network, plus a tenth output unit (a copy of the first) for the new segment
        for p, q in zip(extended.parameters(), policy.parameters()):
            p.copy_(q if p.shape == q.shape else torch.cat([q, q[:1]]))
    v = torch.randn(n_params(extended), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    out = _ops.mlp_fvp(obs, _params(extended), v, damping=0.0, **fused_spec(extended).op_kwargs())
    # Flat layout of the output layer: W (10 x 7, row-major), then b (10): unit 9's row and bias.
    unit = torch.cat([out[-17:-10], out[-1:]])
    assert torch.equal(unit, torch.zeros_like(unit))
    kept = torch.ones(n_params(extended), dtype=torch.bool)
    kept[-17:-10] = kept[-1] = False
    expected = _ops.mlp_fvp(obs, _params(policy), v[kept], damping=0.0, **fused_spec(policy).op_kwargs())
    torch.testing.assert_close(out[kept], expected, rtol=1e-12, atol=1e-14)
