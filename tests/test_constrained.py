"""trpo_ext.constrained_step (CPO) and the two-column solve under it: the (P, 2) solve against two
separate solves, every case of the dual against trpo_ext.reference.cpo_step (double backprop, two
separate CG solves) on every action case and path, the closed-form dual against a brute-force
solution of the QCQP, recovery when infeasible, θ restored exactly when nothing is accepted, bad input."""
import copy
import math

import pytest
import torch

import trpo_ext
from trpo_ext import _ops, reference
from trpo_ext._ops import flat_vector
from trpo_ext.constrained import cpo_dual
from trpo_ext.policies import fused_spec

from helpers import ACTION_CASES, FUSED_CASES, RTOL, action_problem, rel_err, sample_batch

DTYPES = [torch.float64, torch.float32]


def _vector(module):
    return flat_vector(module.parameters()).detach()


def _cost_advantages(advantages, sign, seed=1):
    """Cost advantages correlated with the reward's (sign +1: better reward costs more) or zero (sign 0)."""
    noise = torch.randn(advantages.shape, generator=torch.Generator().manual_seed(seed), dtype=advantages.dtype)
    return sign * advantages + 0.5 * noise.to(advantages.device) if sign else torch.zeros_like(advantages)


# ----------------------------------------------------------------------------- the two-column solve
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", FUSED_CASES)
def test_two_column_solve_equals_two_separate_solves(case, dtype, device):
    # tanh: well conditioned, so ten CG steps keep the products' rounding near 1e-16 (relu's amplify it to ~1e-10)
    policy, obs, v, mask = action_problem(case, dtype, device, n=32)
    params, kwargs = [p.detach() for p in policy.parameters()], fused_spec(policy).op_kwargs(action_mask=mask)
    b = torch.stack([v, torch.randn_like(v)], 1)
    two = _ops.mlp_cg(obs, params, b, damping=0.1, iters=10, rtol=1e-10, **kwargs)
    exact = _ops.mlp_cg(obs.double(), [p.double() for p in params], b.double(), damping=0.1, iters=10, rtol=1e-10,
                        **kwargs)
    for c in range(2):
        one = _ops.mlp_cg(obs, params, b[:, c], damping=0.1, iters=10, rtol=1e-10, **kwargs)
        assert two.iterations[c].item() == one.iterations.item()
        if dtype == torch.float64:
            assert rel_err(two.x[:, c], one.x) <= RTOL[dtype]
            assert two.xAx[c].item() == pytest.approx(one.xAx.item(), rel=RTOL[dtype])
        else:  # CG amplifies float32 rounding: as close to float64 as twice the one-column solve (docs/design.md)
            bound = max(2 * rel_err(one.x, exact.x[:, c]), 1e-5)
            assert rel_err(two.x[:, c], exact.x[:, c]) <= bound
    tol = RTOL[dtype] if dtype == torch.float64 else 1e-4
    # The product itself against the double-backprop reference, column by column.
    actions, advantages = sample_batch(policy, obs, mask)
    both = torch.stack([advantages, -advantages + 0.3], 1)
    direction = _ops.mlp_policy_direction(obs, params, actions, both, damping=0.1, iters=10, rtol=1e-10, **kwargs)
    assert direction.gradient.shape == direction.x.shape == (v.numel(), 2) and direction.xAx.shape == (2,)
    for c in range(2):
        one = _ops.mlp_policy_direction(obs, params, actions, both[:, c].contiguous(), damping=0.1, iters=10,
                                        rtol=1e-10, **kwargs)
        assert rel_err(direction.gradient[:, c], one.gradient) <= tol
        assert rel_err(direction.x[:, c], one.x) <= tol


@pytest.mark.parametrize("case", FUSED_CASES)
def test_two_column_products_match_the_reference(case):
    policy, obs, v, mask = action_problem(case, torch.float64, n=32)
    params, kwargs = [p.detach() for p in policy.parameters()], fused_spec(policy).op_kwargs(action_mask=mask)
    b = torch.stack([v, v.flip(0)], 1)
    x = _ops.mlp_cg(obs, params, b, damping=0.1, iters=1, rtol=0.0, **kwargs).x  # one CG step: x ∝ b
    # After one iteration x = (b'b / b'Ab) b, so b'Ab is read off x: compare with the reference product.
    for c in range(2):
        ref = reference.fvp(policy, obs, b[:, c], damping=0.1, action_mask=mask)
        alpha = (b[:, c] @ b[:, c]) / (b[:, c] @ ref)
        assert rel_err(x[:, c], alpha * b[:, c]) <= 1e-10


# ----------------------------------------------------------------------------- the dual
def _brute_force(g, b, c, two_delta, samples=200_001):
    """max gᵀΔ s.t. c + bᵀΔ ≤ 0, |Δ|² ≤ 2δ in 2-D with F = I: the circle and the chord, sampled."""
    angles = torch.linspace(0, 2 * math.pi, samples, dtype=torch.float64)
    circle = math.sqrt(two_delta) * torch.stack([angles.cos(), angles.sin()], 1)
    # The chord bᵀΔ = −c inside the disk.
    normal, tangent = b / b.norm(), torch.stack([-b[1], b[0]]) / b.norm()
    foot = -c / b.norm() * normal
    half = math.sqrt(max(two_delta - foot.norm().item() ** 2, 0.0))
    chord = foot + torch.linspace(-half, half, samples, dtype=torch.float64)[:, None] * tangent
    points = torch.cat([circle, chord])
    feasible = (c + points @ b <= 1e-12) & ((points ** 2).sum(1) <= two_delta + 1e-12)
    values = torch.where(feasible, points @ g, torch.tensor(-math.inf, dtype=torch.float64))
    return points[values.argmax()] if feasible.any() else None


@pytest.mark.parametrize("g, b, c, case", [
    ((1.0, 1.0), (1.0, 0.0), -0.01, 2),   # r > 0: reward and cost rise together, the boundary binds
    ((1.0, 0.3), (-1.0, 0.5), -0.05, 2),  # r < 0
    ((1.0, 1.0), (1.0, 0.0), -1.0, 3),    # boundary beyond the trust region
    ((1.0, 1.0), (1.0, 0.0), 0.05, 1),    # infeasible, recoverable inside the region
    ((0.2, 1.0), (1.0, 1.0), 0.01, 1),
    ((1.0, 1.0), (1.0, 0.0), 0.0, 1),     # on the boundary
])
def test_closed_form_dual_solves_the_qcqp(g, b, c, case):
    g, b, two_delta = torch.tensor(g, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), 0.02
    dual = cpo_dual((g @ g).item(), (g @ b).item(), (b @ b).item(), c, two_delta / 2, b_small=False)
    assert dual.case == case
    step = dual.x_coef * g + dual.y_coef * b  # F = I: x = g, y = b
    best = _brute_force(g, b, c, two_delta)
    assert (g @ step).item() == pytest.approx((g @ best).item(), abs=1e-5)
    assert c + (b @ step).item() <= 1e-9 and (step @ step).item() <= two_delta * (1 + 1e-9)


def test_dual_recovery_and_degenerate_cases():
    # Case 0: no point of the region is feasible: the region's largest step down the cost gradient.
    dual = cpo_dual(2.0, 1.0, 1.0, 1.0, 0.01, b_small=False)
    assert dual.case == 0 and dual.x_coef == 0 and dual.y_coef == pytest.approx(-math.sqrt(0.02))
    # b ≈ 0: feasible takes the TRPO step, infeasible takes none.
    dual = cpo_dual(2.0, 0.0, 0.0, -1.0, 0.01, b_small=True)
    assert dual.case == 4 and dual.x_coef == pytest.approx(math.sqrt(0.02 / 2.0)) and dual.y_coef == 0
    assert cpo_dual(2.0, 0.0, 0.0, 1.0, 0.01, b_small=True) == (0, 0.0, 0.0, 0.0, 0.0)


# ----------------------------------------------------------------------------- the step against the oracle
def _violation(policy, obs, actions, advantages, cost_advantages, mask, case):
    """A cost violation c that puts the step in `case` (its s from the reference)."""
    if case == 4:
        return -1.0
    log_prob = reference.log_prob(policy, obs, actions, mask)
    b = flat_vector(torch.autograd.grad((torch.exp(log_prob - log_prob.detach()) * cost_advantages).mean(),
                                        list(policy.parameters())))
    y = reference.cg_solve(policy, obs, b, 10, 0.1, 1e-10, mask)[0]
    edge = math.sqrt(0.02 * (b @ y).item())  # |c| where the boundary touches the trust region
    return {3: -3 * edge, 2: -0.3 * edge, 1: 0.3 * edge, 0: 3 * edge}[case]


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("case", ACTION_CASES)
@pytest.mark.parametrize("dual_case", [4, 3, 2, 1, 0])
def test_every_case_takes_the_reference_step(dual_case, case, path):
    if path == "fused" and case not in FUSED_CASES:
        pytest.skip("the ops do not implement this family")
    policy, obs, _, mask = action_problem(case, torch.float64, n=64)
    actions, advantages = sample_batch(policy, obs, mask)
    cost_advantages = _cost_advantages(advantages, 0 if dual_case == 4 else 1)
    c = _violation(policy, obs, actions, advantages, cost_advantages, mask, dual_case)
    oracle = copy.deepcopy(policy)
    before = _vector(policy)
    # Ten CG steps, as tests/test_step.py: more amplify the rounding past 1e-8 (docs/design.md, "Tolerances").
    record = trpo_ext.constrained_step(policy, obs, actions, advantages, cost_advantages, c, cg_iters=10, path=path,
                                       action_mask=mask)
    expected = reference.cpo_step(oracle, obs, actions, advantages, cost_advantages, c, cg_iters=10,
                                  action_mask=mask)
    assert record.case == expected["case"] == dual_case
    assert record.q == pytest.approx(expected["q"], rel=1e-8) and record.s == pytest.approx(expected["s"], rel=1e-8)
    assert record.r == pytest.approx(expected["r"], rel=1e-6, abs=1e-12)
    assert record.lam == pytest.approx(expected["lam"], rel=1e-7) and record.nu == pytest.approx(expected["nu"], rel=1e-7)
    assert record.accepted == expected["accepted"]
    assert record.line_search_steps == expected["steps"]
    if record.accepted:
        assert rel_err(_vector(policy) - before, _vector(oracle) - before) <= 1e-8
        assert record.kl <= 0.01 and record.cost_change <= max(-c, 0) + 1e-12
    else:
        assert torch.equal(_vector(policy), before)
    if dual_case == 0:  # recovery: the step lowers the cost surrogate, whatever it does to the reward
        assert record.expected_cost_change < 0 and record.lam == 0


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_and_generic_paths_take_the_same_step(case):
    fused, obs, _, mask = action_problem(case, torch.float64, n=64)
    generic = copy.deepcopy(fused)
    actions, advantages = sample_batch(fused, obs, mask)
    cost_advantages = _cost_advantages(advantages, 1)
    before = _vector(fused)
    a = trpo_ext.constrained_step(fused, obs, actions, advantages, cost_advantages, 0.0, cg_iters=10, path="fused",
                                  action_mask=mask)
    b = trpo_ext.constrained_step(generic, obs, actions, advantages, cost_advantages, 0.0, cg_iters=10,
                                  path="generic", action_mask=mask)
    assert (a.case, a.accepted, a.line_search_steps, a.cg_iterations) == (b.case, b.accepted, b.line_search_steps,
                                                                         b.cg_iterations)
    assert rel_err(_vector(fused) - before, _vector(generic) - before) <= 1e-8


@pytest.mark.parametrize("case", ["categorical-masked", "gaussian"])
def test_products_on_a_subset_take_the_same_step_on_both_paths(case):
    # fvp_obs: the two-column solve runs on a second cache of other rows (with their own masks).
    fused, obs, _, mask = action_problem(case, torch.float64, n=64)
    generic = copy.deepcopy(fused)
    actions, advantages = sample_batch(fused, obs, mask)
    cost_advantages = _cost_advantages(advantages, 1)
    subset = dict(fvp_obs=obs[::3].clone(), action_mask=mask,
                  fvp_action_mask=None if mask is None else mask[::3].clone(), cg_iters=10)
    before = _vector(fused)
    a = trpo_ext.constrained_step(fused, obs, actions, advantages, cost_advantages, 0.01, path="fused", **subset)
    b = trpo_ext.constrained_step(generic, obs, actions, advantages, cost_advantages, 0.01, path="generic", **subset)
    assert a.accepted and (a.case, a.line_search_steps, a.cg_iterations) == (b.case, b.line_search_steps,
                                                                            b.cg_iterations)
    assert rel_err(_vector(fused) - before, _vector(generic) - before) <= 1e-8


class TrapPolicy(torch.nn.Module):
    """Categorical logits that move by 1e6·|θ − θ₀|² (zero, with a zero gradient, at θ₀): the Fisher and
    both directions are the linear model's, but every trial of a visible size breaks the KL."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(5, 3).double()
        self.start = [p.detach().clone() for p in self.linear.parameters()]

    def forward(self, obs):
        trap = sum(((p - p0) ** 2).sum() for p, p0 in zip(self.linear.parameters(), self.start))
        return torch.distributions.Categorical(logits=self.linear(obs) + 1e6 * trap * torch.tensor([1.0, -1.0, 0.0],
                                                                                               dtype=obs.dtype))


def test_nothing_accepted_restores_theta_exactly():
    # Infeasible with no cost gradient: no direction at all, θ untouched.
    policy, obs, _, _ = action_problem("gaussian", torch.float32, n=64)
    actions, advantages = sample_batch(policy, obs)
    before = _vector(policy).clone()
    record = trpo_ext.constrained_step(policy, obs, actions, advantages, torch.zeros_like(advantages), 1.0)
    assert record.case == 0 and not record.accepted and record.line_search_steps == 0
    assert torch.equal(_vector(policy), before)
    # Every trial rejected (each loaded into the policy on the generic path): θ restored bit for bit.
    policy = TrapPolicy()
    obs = torch.randn(64, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    actions, advantages = sample_batch(policy, obs)
    before = _vector(policy).clone()
    for c in (-0.01, 10.0):  # a feasible case and the recovery
        record = trpo_ext.constrained_step(policy, obs, actions, advantages, _cost_advantages(advantages, 1), c,
                                           max_backtracks=3)
        assert not record.accepted and record.line_search_steps == 3 and record.kl == 0.0
        assert torch.equal(_vector(policy), before)


def test_recovery_lowers_the_cost_of_an_infeasible_policy():
    policy, obs, _, _ = action_problem("categorical", torch.float64, n=256)
    actions, advantages = sample_batch(policy, obs)
    cost_advantages = _cost_advantages(advantages, 1)
    record = trpo_ext.constrained_step(policy, obs, actions, advantages, cost_advantages, 10.0)
    assert record.case == 0 and record.accepted and record.cost_change < 0 and record.kl <= 0.01


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(cost_advantages=[0.0]), TypeError, "cost_advantages must be a torch.Tensor"),
    (dict(cost_advantages=torch.zeros(3, dtype=torch.float64)), ValueError, "cost_advantages must have the shape"),
    (dict(cost_advantages=torch.zeros(64)), TypeError, "cost_advantages must have advantages' dtype"),
    (dict(cost_advantages=torch.full((64,), math.nan, dtype=torch.float64)), ValueError, "cost_advantages must be finite"),
    (dict(cost_violation=math.inf), ValueError, "cost_violation must be a finite number"),
    (dict(cost_violation="1"), ValueError, "cost_violation must be a finite number"),
    (dict(max_kl=0.0), ValueError, "max_kl"),
])
def test_bad_input_names_the_argument(kwargs, error, match):
    policy, obs, _, _ = action_problem("gaussian", torch.float64, n=64)
    actions, advantages = sample_batch(policy, obs)
    arguments = dict(cost_advantages=torch.zeros_like(advantages), cost_violation=0.0) | kwargs
    before = _vector(policy).clone()
    with pytest.raises(error, match=match):
        trpo_ext.constrained_step(policy, obs, actions, advantages, **arguments)
    assert torch.equal(_vector(policy), before)

