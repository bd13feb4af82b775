"""trpo_ext.trust_region_step: the line search's guarantees, the fused and generic paths, and the
agent's update being exactly this function."""
import copy
import math

import gymnasium as gym
import pytest
import torch
from torch.distributions import Categorical

import trpo_ext
from trpo_ext import TRPO, reference
from trpo_ext._ops import flat_vector
from trpo_ext.config import TrustRegionConfig
from trpo_ext.distributions import sample_actions
from trpo_ext.step import line_search

from helpers import (ACTION_CASES, FUSED_CASES, RECURRENT_CELLS, SDE_VARIANTS, action_problem, make_policy,
                     make_sde_policy, n_params, recurrent_problem, rel_err, sample_batch)

def _batch(policy, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    dtype = next(policy.parameters()).dtype
    obs = torch.randn(n, policy.obs_dim, generator=g, dtype=dtype)
    with torch.no_grad():
        dist = policy(obs)
        actions = sample_actions(dist, g)
    advantages = torch.randn(n, generator=g, dtype=dtype)
    return obs, actions, advantages

def _vector(module):
    return flat_vector(module.parameters()).detach()

def _reference_step(policy, obs, actions, advantages, mask, line_search_steps, backtrack_factor=0.5):
    """The step trust_region_step should take, from the reference: the surrogate's gradient by
    autograd, reference CG, β = sqrt(2δ / x'Ax), times factor^(k-1) for the k-th trial."""
    log_prob = reference.log_prob(policy, obs, actions, mask)
    surrogate = (torch.exp(log_prob - log_prob.detach()) * advantages).mean()
    g = flat_vector(torch.autograd.grad(surrogate, list(policy.parameters())))
    x, used, _, xAx = reference.cg_solve(policy, obs, g, iters=10, damping=0.1, rtol=1e-10, action_mask=mask)
    beta = math.sqrt(2 * 0.01 / xAx.item())
    return beta * x * backtrack_factor ** (line_search_steps - 1), used, beta * (g @ x).item()

@pytest.mark.parametrize("network", ["mlp", *RECURRENT_CELLS])
@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("case", ACTION_CASES)
def test_accepted_step_is_beta_times_the_cg_direction_and_within_the_trust_region(case, path, network):
    """Every family on both paths, for the MLP and the recurrent policies (on Sequences)."""
    if path == "fused" and case not in FUSED_CASES:
        pytest.skip("the ops do not implement this family (test_fisher.py checks that path='fused' refuses it)")
    policy, obs, _, mask = (action_problem(case, torch.float64, n=64) if network == "mlp"
                            else recurrent_problem(case, network, steps=16, n_seq=4))
    actions, advantages = sample_batch(policy, obs, mask)
    _assert_reference_step(policy, obs, actions, advantages, mask, path)

def _assert_reference_step(policy, obs, actions, advantages, mask, path):
    """trust_region_step on `policy` is accepted, within the trust region, and takes the reference's step."""
    oracle = copy.deepcopy(policy)
    before = _vector(policy)
    record = trpo_ext.trust_region_step(policy, obs, actions, advantages, max_kl=0.01, damping=0.1, cg_iters=10,
                                        backtrack_factor=0.5, path=path, action_mask=mask)
    assert record.accepted and 0 < record.kl <= 0.01 and record.improvement > 0

    step, used, expected_improvement = _reference_step(oracle, obs, actions, advantages, mask,
                                                       record.line_search_steps)
    assert record.cg_iterations == used
    assert record.expected_improvement == pytest.approx(expected_improvement, rel=1e-8)
    # Ten CG steps amplify rounding by about the condition number: 1e-8 (docs/design.md, "Tolerances").
    assert rel_err(_vector(policy) - before, step) <= 1e-8
    with torch.no_grad():
        assert record.kl == pytest.approx(reference.kl(policy, obs, mask, old_policy=oracle).item(), rel=1e-8)

@pytest.mark.parametrize("variant", SDE_VARIANTS)
def test_gsde_step_is_the_reference_step(variant):
    """gSDE's policy (trpo_ext.sde) takes the generic path ("auto" has no fused op for it) and its
    step is the reference's: the Gaussian's KL with the features' state-dependent scale."""
    policy = make_sde_policy(variant)
    obs, actions, advantages = _batch(policy)
    _assert_reference_step(policy, obs, actions, advantages, None, "auto")
    with pytest.raises(TypeError, match="fused"):
        trpo_ext.fvp(policy, obs, _vector(policy), path="fused")

@pytest.mark.parametrize("case", FUSED_CASES)
def test_generic_path_takes_the_fused_step(case):
    fused, obs, _, mask = action_problem(case, torch.float64, n=64)
    generic = copy.deepcopy(fused)
    before = _vector(fused)
    actions, advantages = sample_batch(fused, obs, mask)
    a = trpo_ext.trust_region_step(fused, obs, actions, advantages, path="fused", action_mask=mask)
    b = trpo_ext.trust_region_step(generic, obs, actions, advantages, path="generic", action_mask=mask)
    assert a.accepted and b.accepted and a.line_search_steps == b.line_search_steps
    assert a.cg_iterations == b.cg_iterations
    assert rel_err(_vector(fused) - before, _vector(generic) - before) <= 1e-8
    assert a.kl == pytest.approx(b.kl, rel=1e-8)

class ConvPolicy(torch.nn.Module):
    """A small CNN with a categorical head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)
        self.head = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, obs):
        return Categorical(logits=self.head(torch.relu(self.conv(obs)).flatten(1)))

def test_parameters_and_gradients_of_any_layout_take_the_same_step():
    # A channels-last copy of a CNN: its conv weight, and that weight's gradient, are not contiguous
    # (torch.nn.utils.parameters_to_vector cannot flatten them). The step takes the same step, and
    # each parameter keeps its own storage and layout.
    policy = ConvPolicy().double()
    last = copy.deepcopy(policy).to(memory_format=torch.channels_last)
    weight = last.conv.weight
    assert not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)
    obs = torch.rand(16, 3, 9, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    actions, advantages = sample_batch(policy, obs)
    before, address = _vector(policy), weight.data_ptr()
    a = trpo_ext.trust_region_step(policy, obs, actions, advantages)
    b = trpo_ext.trust_region_step(last, obs.contiguous(memory_format=torch.channels_last), actions, advantages)
    assert a.accepted and b.accepted and a.line_search_steps == b.line_search_steps
    assert rel_err(_vector(last) - before, _vector(policy) - before) <= 1e-8
    assert last.conv.weight is weight and weight.data_ptr() == address
    assert weight.is_contiguous(memory_format=torch.channels_last)

class TrapPolicy(torch.nn.Module):
    """A categorical policy whose logits move by `trap · |θ − θ₀|²` along `direction`: the term and
    its gradient vanish at θ₀, so the Fisher and the CG direction are the linear model's, but any
    step of a visible size changes the distribution a lot. `direction` picks what the trap breaks:
    the KL (any non-constant direction) or the surrogate (lowering the rewarded action's logit)."""

    def __init__(self, direction, trap=1e6):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 3).double()
        self.origin = [p.detach().clone() for p in self.linear.parameters()]
        self.direction = torch.tensor(direction, dtype=torch.float64)
        self.trap = trap

    def forward(self, obs):
        moved = sum(((p - o) ** 2).sum() for p, o in zip(self.linear.parameters(), self.origin))
        return Categorical(logits=self.linear(obs) + self.trap * moved * self.direction)

def _trap_batch():
    obs = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    actions = torch.zeros(40, dtype=torch.int64)  # action 0 is rewarded everywhere
    return obs, actions, torch.ones(40, dtype=torch.float64)

@pytest.mark.parametrize("why, direction, trap, max_kl", [
    ("kl", [0.0, 1.0, -1.0], 1e6, 0.01),  # the KL of every trial is far above max_kl
    # A mild trap and a loose trust region: trials 2-4 are inside it (KL 7.2, 4.1, 2.2), but every
    # trial lowers action 0's probability, so the surrogate rejects them.
    ("surrogate", [-1.0, 0.0, 0.0], 1.0, 10.0),
])
def test_rejected_line_search_restores_parameters_exactly(why, direction, trap, max_kl):
    policy = TrapPolicy(direction, trap)
    obs, actions, advantages = _trap_batch()
    before = _vector(policy)
    record = trpo_ext.trust_region_step(policy, obs, actions, advantages, max_kl=max_kl, max_backtracks=4)
    assert not record.accepted and record.kl == 0.0 and record.improvement == 0.0
    assert record.line_search_steps == 4 and record.cg_iterations >= 1
    assert torch.equal(_vector(policy), before)

def test_zero_advantages_give_no_direction_and_no_change():
    policy = make_policy("gaussian", 5, 3, (8,), "tanh", torch.float64)
    obs, actions, advantages = _batch(policy)
    before = _vector(policy)
    record = trpo_ext.trust_region_step(policy, obs, actions, torch.zeros_like(advantages))
    assert not record.accepted and record.line_search_steps == 0 and math.isnan(record.expected_improvement)
    assert torch.equal(_vector(policy), before)

def test_line_search_never_evaluates_a_non_finite_candidate():
    # float32: old + f·step overflows to inf for f = 1, 0.5, 0.25 and is finite from f = 0.125 on.
    old = torch.full((4,), 3e38)
    evaluated = []

    def trial(candidate):
        evaluated.append(candidate.clone())
        return 0.0, 1.0  # within the trust region and an improvement: accepted

    config = TrustRegionConfig(max_kl=0.01, backtrack_factor=0.5, max_backtracks=6)
    trials, accepted = line_search(trial, old, torch.full((4,), 3e38), config)
    assert trials == 4 and len(evaluated) == 1 and torch.isfinite(evaluated[0]).all()
    assert torch.equal(accepted[0], evaluated[0]) and accepted[1:] == (0.0, 1.0)
    assert line_search(trial, old, torch.full((4,), 3e38), TrustRegionConfig(backtrack_factor=0.5,
                                                                                 max_backtracks=3)) == (3, None)
    assert len(evaluated) == 1  # every candidate of the second search overflowed

def test_fvp_obs_is_what_the_products_use():
    policy = make_policy("gaussian", 5, 3, (8, 7), "tanh", torch.float64)
    obs, actions, advantages = _batch(policy, n=64)
    subset = obs[torch.randperm(64, generator=torch.Generator().manual_seed(3))[:16]]
    full, sub = copy.deepcopy(policy), copy.deepcopy(policy)
    trpo_ext.trust_region_step(full, obs, actions, advantages)
    record = trpo_ext.trust_region_step(sub, obs, actions, advantages, fvp_obs=subset, backtrack_factor=0.5)
    # The expected step: the gradient on the whole batch, the Fisher on the subset only.
    dist = policy(obs)
    surrogate = (torch.exp(dist.log_prob(actions) - dist.log_prob(actions).detach()) * advantages).mean()
    g = flat_vector(torch.autograd.grad(surrogate, list(policy.parameters())))
    x, _, _, xAx = reference.cg_solve(policy, subset, g, iters=10, damping=0.1, rtol=1e-10)
    step = math.sqrt(2 * 0.01 / xAx.item()) * x * 0.5 ** (record.line_search_steps - 1)
    torch.testing.assert_close(_vector(sub) - _vector(policy), step, rtol=1e-8, atol=1e-12)
    assert not torch.allclose(_vector(sub), _vector(full))

def test_agent_update_is_trust_region_step_on_the_normalized_batch():
    agent = TRPO("Pendulum-v1", n_envs=2, n_steps=64, critic_epochs=1, seed=0)
    batches = []
    collect = agent.collector.collect
    agent.collector.collect = lambda *a, **k: batches.append(collect(*a, **k)) or batches[-1]
    policy = copy.deepcopy(agent.policy)
    agent.learn(128, progress_bar=False)
    (batch,) = batches
    advantages = (batch.advantages - batch.advantages.mean()) / (batch.advantages.std() + 1e-8)
    config = agent.config.trust_region
    record = trpo_ext.trust_region_step(policy, batch.obs, batch.actions, advantages, max_kl=config.max_kl,
                                        damping=config.damping, cg_iters=config.cg_iters, cg_rtol=config.cg_rtol)
    assert torch.equal(_vector(policy), _vector(agent.policy))
    assert agent.last_record["kl"] == record.kl and agent.last_record["line_search_steps"] == record.line_search_steps

@pytest.mark.parametrize("kwargs, error, words", [
    (dict(max_kl=0.0), ValueError, "max_kl must be a finite number in (0.0, 10.0]"),
    (dict(max_kl=1e300), ValueError, "max_kl must be a finite number in (0.0, 10.0]"),
    (dict(max_kl=-0.01), ValueError, "max_kl must be"),
    (dict(max_kl=float("inf")), ValueError, "max_kl must be a finite number"),
    (dict(damping=float("nan")), ValueError, "damping must be"),
    (dict(cg_iters=0), ValueError, "cg_iters must be an int >= 1"),
    (dict(backtrack_factor=1.0), ValueError, "backtrack_factor must be a finite number in (0.0, 1.0)"),
    (dict(max_backtracks=True), ValueError, "max_backtracks must be an int >= 1"),
    (dict(path="fast"), ValueError, "path must be one of"),
])
def test_bad_settings_name_the_setting(kwargs, error, words):
    policy = make_policy("categorical", 4, 3, (6,), "tanh", torch.float64)
    obs, actions, advantages = _batch(policy)
    before = _vector(policy)
    with pytest.raises(error) as info:
        trpo_ext.trust_region_step(policy, obs, actions, advantages, **kwargs)
    assert words in str(info.value)
    assert torch.equal(_vector(policy), before)

@pytest.mark.parametrize("change, error, words", [
    (lambda o, a, adv: (o, a, adv[:-1]), ValueError, "advantages must have shape (64,)"),
    (lambda o, a, adv: (o, a[:-1], adv), ValueError, "actions must have one row per observation (64)"),
    (lambda o, a, adv: (o, a, adv.index_fill(0, torch.tensor([3]), float("nan"))), ValueError,
     "advantages must be a finite"),
    (lambda o, a, adv: (o[:0], a[:0], adv[:0]), ValueError, "obs must be a non-empty batch"),
    (lambda o, a, adv: (o.numpy(), a, adv), TypeError, "obs must be a torch.Tensor"),
])
def test_bad_batch_names_the_argument(change, error, words):
    policy = make_policy("categorical", 4, 3, (6,), "tanh", torch.float64)
    before = _vector(policy)
    with pytest.raises(error) as info:
        trpo_ext.trust_region_step(policy, *change(*_batch(policy)))
    assert words in str(info.value)
    assert torch.equal(_vector(policy), before)

def test_subclass_overriding_forward_is_not_given_the_plain_mlp_fisher():
    class Tempered(trpo_ext.MLPPolicy):  # logits scaled by 3: a different Fisher than the plain MLP's
        def forward(self, obs):
            return Categorical(logits=3 * self.distribution_params(obs))

    torch.manual_seed(0)
    policy = Tempered(4, gym.spaces.Discrete(3)).double()
    obs = torch.randn(20, 4, dtype=torch.float64)
    v = torch.randn(n_params(policy), dtype=torch.float64)
    expected = reference.fvp(policy, obs, v)
    torch.testing.assert_close(trpo_ext.fvp(policy, obs, v), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(TypeError, match="path='fused' needs an MLPPolicy"):
        trpo_ext.fvp(policy, obs, v, path="fused")

def test_a_trial_that_raises_leaves_theta_as_it_was():
    class Fragile(torch.nn.Module):  # raises as soon as θ leaves its starting point
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3).double()
            self.origin = self.linear.weight.detach().clone()

        def forward(self, obs):
            if not torch.equal(self.linear.weight, self.origin):
                raise RuntimeError("simulator diverged")
            return Categorical(logits=self.linear(obs))

    policy = Fragile()
    obs, actions, advantages = _trap_batch()
    before = _vector(policy)
    with pytest.raises(RuntimeError, match="simulator diverged"):
        trpo_ext.trust_region_step(policy, obs, actions, advantages)
    assert torch.equal(_vector(policy), before)

def test_the_generic_path_is_safe_from_several_threads():
    # torch.func's forward-AD state is process-global: without the generic path's lock, concurrent
    # products corrupt each other. Each thread must get exactly the single-threaded answer.
    from concurrent.futures import ThreadPoolExecutor

    policy = make_policy("gaussian", 5, 3, (8, 7), "tanh", torch.float64)
    obs = torch.randn(33, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    vectors = [torch.randn(n_params(policy), dtype=torch.float64, generator=torch.Generator().manual_seed(i))
               for i in range(16)]
    expected = [trpo_ext.fvp(policy, obs, v, damping=0.1, path="generic") for v in vectors]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda v: trpo_ext.fvp(policy, obs, v, damping=0.1, path="generic"), vectors * 4))
    for i, out in enumerate(got):
        assert torch.equal(out, expected[i % len(vectors)])
