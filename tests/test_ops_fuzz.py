"""Property tests (hypothesis) of the fused ops against trpo_ext.reference: mlp_fvp, mlp_cg (one
right-hand side or several, each column as if solved alone), mlp_policy_direction, mlp_policy_trial and mlp_act on every fused action case (helpers.FUSED_CASES),
with the shapes drawn (one row or many, observation and action widths, no hidden layer or two),
the activation, float32 or float64, and contiguous or strided tensors (the ops take any strides).
The float32 ops are held to the float64 reference. Derandomized with a fixed number of examples,
so a CI run is quick and repeatable; test_ops.py, test_fisher.py and test_act.py hold the fixed
cases, test_errors.py the refusals."""
import copy
import itertools
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trpo_ext import _ops, reference
from trpo_ext.distributions import MASKED_LOGIT
from trpo_ext.policies import ACTIVATIONS, fused_spec

from helpers import FUSED_CASES, RTOL, kind_of, make_policy, n_params, random_mask, rel_err, sample_batch

FUZZ = settings(max_examples=30, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
# A drawn problem can be worse conditioned than the fixed ones: CG's float64 bound is test_ops.py's.
CG_RTOL64 = 1e-8


def _strided(t: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous view (every stride doubled)."""
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


@dataclass
class Problem:
    policy: torch.nn.Module  # float64, the reference's
    dtype: torch.dtype  # what the op runs in
    strided: bool
    obs: torch.Tensor  # float64
    mask: torch.Tensor | None
    actions: torch.Tensor
    advantages: torch.Tensor  # float64
    v: torch.Tensor  # float64
    generator: torch.Generator

    def op(self, t):
        """A float64 tensor as the op gets it: in its dtype, strided when drawn so."""
        if t is None:
            return None
        t = t.to(self.dtype) if t.is_floating_point() else t
        return _strided(t) if self.strided else t

    def params(self, policy=None):
        return [self.op(p.detach()) for p in (policy or self.policy).parameters()]

    def kwargs(self, **masks):
        return fused_spec(self.policy).op_kwargs(**{k: self.op(m) for k, m in masks.items()})

    @property
    def tol(self):
        return RTOL[self.dtype]


@st.composite
def problems(draw):
    """A fused case's policy (float64), a batch of its actions (masked when the case is), a vector."""
    case = draw(st.sampled_from(FUSED_CASES))
    n, obs_dim, act_dim = draw(st.integers(1, 24)), draw(st.integers(1, 6)), draw(st.integers(1, 4))
    hidden = tuple(draw(st.lists(st.integers(1, 9), max_size=2)))
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    seed = draw(st.integers(0, 2 ** 16))
    policy = make_policy(kind_of(case), obs_dim, act_dim, hidden, activation, torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed)
    obs = torch.randn(n, obs_dim, generator=g, dtype=torch.float64)
    mask = random_mask(policy.action_spec, n, g) if case.endswith("-masked") else None
    actions, advantages = sample_batch(policy, obs, mask, seed)
    v = torch.randn(n_params(policy), generator=g, dtype=torch.float64)
    return Problem(policy, draw(st.sampled_from([torch.float64, torch.float32])), draw(st.booleans()), obs, mask,
                   actions, advantages, v, g)


def _masked_logits(policy, obs, mask):
    with torch.no_grad():
        out = policy.distribution_params(obs)
    return out if mask is None else out.masked_fill(~mask, MASKED_LOGIT)


# ----------------------------------------------------------------------------- the products and CG
@FUZZ
@given(problems(), st.sampled_from([0.0, 0.1, 3.0]))
def test_fvp_is_the_reference_product(p, damping):
    out = _ops.mlp_fvp(p.op(p.obs), p.params(), p.op(p.v), damping=damping, **p.kwargs(action_mask=p.mask))
    expected = reference.fvp(p.policy, p.obs, p.v, damping=damping, action_mask=p.mask)
    assert out.dtype == p.dtype and out.shape == p.v.shape
    assert rel_err(out, expected) <= p.tol


@FUZZ
@given(problems(), st.integers(1, 10))
def test_cg_is_the_reference_solve(p, iters):
    x, used, residual, xAx = _ops.mlp_cg(p.op(p.obs), p.params(), p.op(p.v), damping=0.1, iters=iters, rtol=0.0,
                                         **p.kwargs(action_mask=p.mask))
    ref_x, ref_used, _, ref_xAx = reference.cg_solve(p.policy, p.obs, p.v, iters=iters, damping=0.1, rtol=0.0,
                                                     action_mask=p.mask)
    if p.dtype == torch.float64:
        assert int(used) == ref_used
        assert rel_err(x, ref_x) <= CG_RTOL64
        assert float(xAx) == pytest.approx(float(ref_xAx), rel=CG_RTOL64)
    else:  # as close to the float64 solve as the reference in float32 gets, twice (docs/design.md, "Tolerances")
        policy32 = copy.deepcopy(p.policy).float()
        ref32 = reference.cg_solve(policy32, p.obs.float(), p.v.float(), iters=iters, damping=0.1, rtol=0.0,
                                   action_mask=p.mask)[0]
        assert rel_err(x, ref_x) <= max(2 * rel_err(ref32, ref_x), 1e-5)
    assert torch.isfinite(residual) and residual.dtype == torch.float64


@FUZZ
@given(problems(), st.integers(1, 10), st.integers(2, 3))
def test_cg_columns_are_solved_as_if_alone(p, iters, columns):
    """b (P, C): each column's solve is the one-column op's (iterations too), on one forward pass."""
    b = torch.stack([p.v, *(torch.randn(p.v.shape, generator=p.generator, dtype=p.v.dtype)
                            for _ in range(columns - 1))], 1)
    kwargs = p.kwargs(action_mask=p.mask)
    many = _ops.mlp_cg(p.op(p.obs), p.params(), p.op(b), damping=0.1, iters=iters, rtol=0.0, **kwargs)
    exact = _ops.mlp_cg(p.obs, [q.detach() for q in p.policy.parameters()], b, damping=0.1, iters=iters, rtol=0.0,
                        **fused_spec(p.policy).op_kwargs(action_mask=p.mask))
    for c in range(columns):
        one = _ops.mlp_cg(p.op(p.obs), p.params(), p.op(b[:, c]), damping=0.1, iters=iters, rtol=0.0, **kwargs)
        assert int(many.iterations[c]) == int(one.iterations)
        if p.dtype == torch.float64:
            assert rel_err(many.x[:, c], one.x) <= CG_RTOL64
        else:  # as close to the float64 solve as the one-column solve gets, twice (docs/design.md, "Tolerances")
            assert rel_err(many.x[:, c], exact.x[:, c]) <= max(2 * rel_err(one.x, exact.x[:, c]), 1e-5)


# ----------------------------------------------------------------------------- the policy step
@FUZZ
@given(problems(), st.integers(0, 8))
def test_direction_is_the_reference_gradient_and_solve(p, fvp_rows):
    fvp_obs = fvp_mask = None
    if fvp_rows:  # the Fisher on other rows, with their own masks
        fvp_obs = torch.randn(fvp_rows, p.obs.shape[1], generator=p.generator, dtype=torch.float64)
        fvp_mask = None if p.mask is None else random_mask(p.policy.action_spec, fvp_rows, p.generator)
    result = _ops.mlp_policy_direction(p.op(p.obs), p.params(), p.op(p.actions), p.op(p.advantages), damping=0.1,
                                       iters=5, rtol=0.0, fvp_obs=p.op(fvp_obs),
                                       **p.kwargs(action_mask=p.mask, fvp_action_mask=fvp_mask))
    log_prob = reference.log_prob(p.policy, p.obs, p.actions, p.mask)
    surrogate = (torch.exp(log_prob - log_prob.detach()) * p.advantages).mean()
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(surrogate, list(p.policy.parameters()))])
    assert result.gradient.dtype == p.dtype
    assert rel_err(result.gradient, g) <= p.tol or (g.norm() == 0 and result.gradient.norm() == 0)
    tol = dict(rtol=1e-12, atol=1e-12) if p.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(result.dist_params.double(), _masked_logits(p.policy, p.obs, p.mask), **tol)
    if p.dtype == torch.float64:  # the solve of its own gradient (float32 CG: test_cg_is_the_reference_solve)
        x = reference.cg_solve(p.policy, p.obs if fvp_obs is None else fvp_obs, result.gradient, iters=5,
                               damping=0.1, rtol=0.0, action_mask=p.mask if fvp_obs is None else fvp_mask)[0]
        assert rel_err(result.x, x) <= CG_RTOL64 or (x.norm() == 0 and result.x.norm() == 0)


@FUZZ
@given(problems(), st.sampled_from([0.0, 0.01, 0.3]))
def test_trial_is_the_reference_kl_and_improvement(p, scale):
    new = copy.deepcopy(p.policy)
    with torch.no_grad():
        for q in new.parameters():
            q.add_(scale * torch.randn(q.shape, generator=p.generator, dtype=torch.float64))
    old_log_std = p.op(p.policy.log_std.detach()) if p.policy.action_spec.family.has_log_std else None
    kl, improvement = _ops.mlp_policy_trial(p.op(p.obs), p.params(new), p.op(p.actions), p.op(p.advantages),
                                            old_dist_params=p.op(_masked_logits(p.policy, p.obs, p.mask)),
                                            old_log_std=old_log_std, **p.kwargs(action_mask=p.mask))
    with torch.no_grad():
        expected_kl = reference.kl(new, p.obs, p.mask, old_policy=p.policy).item()
        log_ratio = reference.log_prob(new, p.obs, p.actions, p.mask) - reference.log_prob(p.policy, p.obs, p.actions,
                                                                                         p.mask)
        expected_improvement = (torch.expm1(log_ratio) * p.advantages).mean().item()
    # float32: the inputs' rounding (about 1e-7 of each logit) shows in the KL's and ratio's last digits.
    rel, atol = (1e-9, 1e-12) if p.dtype == torch.float64 else (1e-3, 1e-5)
    assert float(kl) == pytest.approx(expected_kl, rel=rel, abs=atol)
    assert float(improvement) == pytest.approx(expected_improvement, rel=rel, abs=atol)
    if scale == 0.0:
        assert float(kl) == pytest.approx(0.0, abs=atol)


# ----------------------------------------------------------------------------- rollout inference
def _joint_actions(policy):
    """Every joint action of a discrete policy, in the form mlp_act returns them."""
    spec = policy.action_spec
    if spec.kind == "bernoulli":
        return torch.tensor(list(itertools.product((0.0, 1.0), repeat=spec.width)), dtype=torch.float64)
    joint = torch.tensor(list(itertools.product(*(range(k) for _, k in spec.bounds))))
    return joint if spec.segments is not None else joint[:, 0]


@FUZZ
@given(problems(), st.booleans(), st.booleans())
def test_act_takes_the_reference_mode_and_allowed_samples(p, deterministic, normalize):
    norm = {}
    x = p.obs
    if normalize:
        mean = torch.randn(p.obs.shape[1], generator=p.generator, dtype=torch.float64)
        inv_std = torch.rand(p.obs.shape[1], generator=p.generator, dtype=torch.float64) + 0.5
        norm = dict(obs_mean=p.op(mean), obs_inv_std=p.op(inv_std), obs_clip=2.0)
        x = ((p.obs - mean) * inv_std).clamp(-2.0, 2.0)
    normalized, actions = _ops.mlp_act(p.op(p.obs), p.params(), deterministic=deterministic,
                                       generator=torch.Generator().manual_seed(0), **norm,
                                       **p.kwargs(action_mask=p.mask))
    tol = dict(rtol=1e-12, atol=1e-12) if p.dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(normalized.double(), x, **tol)
    spec = p.policy.action_spec
    if spec.family.has_log_std:  # gaussian: the mode is the mean
        assert actions.shape == (len(x), spec.width)
        if deterministic:
            with torch.no_grad():
                torch.testing.assert_close(actions.double(), p.policy.distribution_params(x), **tol)
        return
    # Discrete: every joint action's reference log-probability; the sample is allowed, the mode the best.
    joint = _joint_actions(p.policy)
    with torch.no_grad():
        table = torch.stack([reference.log_prob(p.policy, x, a.expand(len(x), *a.shape), p.mask) for a in joint], 1)
    if p.mask is not None:
        offsets = torch.tensor([lo for lo, _ in spec.bounds])
        columns = joint.reshape(len(joint), -1).long() + offsets
        table = table.masked_fill(~p.mask[:, columns].all(-1), float("-inf"))
    taken = torch.stack([(joint == a).reshape(len(joint), -1).all(1).nonzero()[0, 0] for a in actions])
    got = table[torch.arange(len(x)), taken]
    assert torch.isfinite(got).all()  # an action the mask allows
    if deterministic:  # the most probable (up to rounding: a tie may go either way)
        assert (got >= table.max(1).values - (1e-9 if p.dtype == torch.float64 else 1e-4)).all()
