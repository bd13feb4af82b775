"""trpo_ext.distributions, the one home of the action families: the C++ kinds and the Python
families agree, each family's parts fit together for every space it serves, masks, sampling and
the env form of actions."""
import re

import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch.distributions import Categorical

from trpo_ext import distributions
from trpo_ext.distributions import (FAMILIES, MASKED_LOGIT, ActionFamily, action_spec, family_named, family_of,
                                    masked, sample_actions)
from trpo_ext.multicategorical import MultiCategorical

from helpers import KINDS, UNMASKABLE_KINDS, action_space, make_policy, random_mask

ops = torch.ops.trpo_ext


def test_cpp_accepts_exactly_the_python_families():
    # A family the fused ops implement is named by its op kind; the ops refuse any other kind and
    # list theirs (csrc/mlp.cpp, parse_kind). Adding a family means both lists (docs/design.md).
    policy = make_policy("gaussian", 3, 2, (4,), "tanh", torch.float64)
    params = [p.detach() for p in policy.parameters()]
    with pytest.raises(ValueError, match="kind must be") as info:
        ops.mlp_fvp(torch.randn(2, 3, dtype=torch.float64), params, torch.zeros(sum(p.numel() for p in params),
                    dtype=torch.float64), "poisson", "tanh", 0.0)
    assert sorted(re.findall(r"'(\w+)'", str(info.value).split("got")[0])) == sorted(f.name for f in FAMILIES if f.fused)


def test_every_family_defines_its_parts():
    names = [f.name for f in FAMILIES]
    assert len(set(names)) == len(names) and all(family_named(n).name == n for n in names)
    required = ("spec", "distribution", "fisher_outputs", "output_fisher", "sample", "detach", "describe")
    for family in FAMILIES:
        for method in required:  # the base class only raises NotImplementedError
            assert getattr(type(family), method) is not getattr(ActionFamily, method), (family.name, method)
    assert sorted(f.name for f in FAMILIES) == sorted({action_spec(action_space(k)).kind for k in KINDS})


@pytest.mark.parametrize("kind", KINDS)
def test_a_family_round_trips_through_its_distribution(kind):
    policy = make_policy(kind, 5, 3, (8,), "tanh", torch.float64)
    spec = policy.action_spec
    obs = torch.randn(7, 5, dtype=torch.float64)
    with torch.no_grad():
        dist = policy(obs)
    family = family_of(dist)
    assert family is spec.family and family.spec_of(dist) == spec and spec.fits(dist, 7)
    assert spec.describe().endswith(f"(the action space {spec.space})")
    outputs = family.fisher_outputs(dist)
    assert outputs[0].shape == (7, spec.width)
    actions = sample_actions(dist, torch.Generator().manual_seed(0))
    assert actions.shape == family.action_shape(7, spec.width, spec.segments)
    assert actions.dtype == family.action_dtype(torch.float64)
    assert torch.isfinite(dist.log_prob(actions)).all()
    detached = distributions.detach_distribution(dist)
    assert type(detached) is type(dist) and family_of(detached) is family
    assert spec.space.contains(spec.env_action(actions)[0].astype(spec.space.dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_sample_actions_draws_the_distribution_with_the_given_generator_only(kind):
    # What a policy on the generic path samples with: the same generator state gives the same draw,
    # torch's global RNG is left alone, and the draws follow the distribution: the mean of log π(a)
    # over many draws is -H(π) (the entropy), within 5 standard errors.
    policy = make_policy(kind, 5, 3, (8,), "tanh", torch.float64)
    with torch.no_grad():
        dist = policy(torch.randn(1, 5, dtype=torch.float64).expand(100_000, -1))
    state = torch.get_rng_state()
    a, b = (sample_actions(dist, torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), state)
    log_prob = dist.log_prob(a)
    assert abs(log_prob.mean() + dist.entropy()[0]) <= 5 * log_prob.std() / len(log_prob) ** 0.5


def test_unsupported_spaces_and_distributions_are_named():
    with pytest.raises(TypeError, match="action_space must be") as info:
        action_spec(spaces.Tuple([spaces.Discrete(2)]))
    for family in FAMILIES:  # the message lists every family's spaces
        assert all(name in str(info.value) for name in family.space_names)
    with pytest.raises(TypeError, match="the policy must return"):
        family_of(torch.distributions.Poisson(torch.ones(3)))
    with pytest.raises(ValueError, match="kind must be one of"):
        family_named("poisson")


def test_masked_actions_have_probability_zero_and_are_never_sampled():
    logits = torch.randn(1000, 5)
    mask = torch.zeros(1000, 5, dtype=torch.bool)
    mask[:, [1, 3]] = True
    dist = masked(Categorical(logits=logits), mask)
    assert bool((dist.probs[:, [0, 2, 4]] == 0).all())
    actions = sample_actions(dist, torch.Generator().manual_seed(0))
    assert set(actions.tolist()) <= {1, 3}
    multi = masked(MultiCategorical(torch.randn(1000, 5), (2, 3)), torch.tensor([[True, False, False, True, True]] * 1000))
    drawn = sample_actions(multi, torch.Generator().manual_seed(0))
    assert bool((drawn[:, 0] == 0).all()) and set(drawn[:, 1].tolist()) <= {1, 2}
    assert float(dist.log_prob(torch.ones(1000, dtype=torch.long)).min()) > MASKED_LOGIT  # finite log-probabilities


@pytest.mark.parametrize("kind", UNMASKABLE_KINDS)
def test_only_categorical_families_take_masks(kind):
    spec = action_spec(action_space(kind))
    with torch.no_grad():
        dist = make_policy(kind, 5, 3, (4,), "tanh")(torch.randn(2, 5, dtype=torch.float64))
    with pytest.raises(TypeError, match="action masks apply to Categorical and MultiCategorical"):
        masked(dist, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="action masks apply to Discrete and MultiDiscrete actions"):
        spec.check_mask(np.ones((2, 3), bool))


def test_env_masks_are_checked_row_by_row():
    spec = action_spec(spaces.MultiDiscrete([2, 3]))
    good = random_mask(spec, 4, torch.Generator().manual_seed(0)).numpy()
    assert spec.check_mask(good.astype(np.int64)).dtype == np.bool_  # 0 / 1 accepted as booleans
    bad = good.copy()
    bad[2, 2:] = False
    with pytest.raises(ValueError, match="row 2 allows no action sub-action 1"):
        spec.check_mask(bad)
    with pytest.raises(ValueError, match=r"must have shape \(B, 5\)"):
        spec.check_mask(good[:, :4])
    with pytest.raises(ValueError, match="must hold booleans"):
        spec.check_mask(good * 2)


def test_env_actions_are_clipped_boxes_and_integer_binaries():
    box = action_spec(spaces.Box(-1, 2, (2,)))
    sample = torch.tensor([[-3.0, 5.0], [0.5, 1.0]])
    assert np.array_equal(box.env_action(sample), np.array([[-1.0, 2.0], [0.5, 1.0]], np.float32))
    assert torch.equal(sample, torch.tensor([[-3.0, 5.0], [0.5, 1.0]]))  # the unclipped sample is kept
    binary = action_spec(spaces.MultiBinary(3))
    assert binary.env_action(torch.tensor([[1.0, 0.0, 1.0]])).dtype == spaces.MultiBinary(3).dtype
