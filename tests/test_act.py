"""The rollout inference op (trpo_ext::mlp_act) on every fused action case (helpers.FUSED_CASES):
normalization and the forward pass against plain PyTorch, samples against the reference's
probabilities (trpo_ext.reference), the mode, masks, generators; bad input; opcheck."""
import itertools

import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_ext import _ops, reference
from trpo_ext.policies import fused_spec

from helpers import DISCRETE_KINDS, FUSED_CASES, kind_of, action_problem, make_policy, zero_width

ops = torch.ops.trpo_ext


def _params(policy):
    return [p.detach() for p in policy.parameters()]


def _normalized(obs, mean, inv_std, clip):
    return ((obs - mean) * inv_std).clamp(-clip, clip)


def _act(policy, obs, mask=None, deterministic=False, seed=0, **normalization):
    """mlp_act with the policy's arguments from the one builder (kind, activation, segments, the mask)
    and a generator of obs's device seeded with `seed`: (normalized obs, actions)."""
    return _ops.mlp_act(obs, _params(policy), deterministic=deterministic,
                        generator=torch.Generator(obs.device).manual_seed(seed), **normalization,
                        **fused_spec(policy).op_kwargs(action_mask=mask))


def _action_shape(case, n, dtype=torch.float64):
    """(shape, dtype) of the actions mlp_act returns for n rows of a FUSED_CASES policy of `dtype`
    (3 classes, sub-actions, bits or coordinates): class indices for a discrete kind with classes,
    one column per sub-action with segments."""
    kind = kind_of(case)
    shape = (n,) if kind == "categorical" else (n, 3)
    return shape, torch.int64 if kind in ("categorical", "multicategorical") else dtype


def _joint_actions(policy):
    """Every joint action of a discrete policy, in the form mlp_act returns actions."""
    spec = policy.action_spec
    device = next(policy.parameters()).device
    if spec.kind == "bernoulli":
        return torch.tensor(list(itertools.product((0.0, 1.0), repeat=spec.width)), device=device,
                            dtype=next(policy.parameters()).dtype)
    joint = torch.tensor(list(itertools.product(*(range(k) for _, k in spec.bounds))), device=device)
    return joint if spec.segments is not None else joint[:, 0]


def _allowed(policy, actions, mask):
    """Whether the mask allows every sub-action of each row's action, (N,)."""
    offsets = torch.tensor([lo for lo, _ in policy.action_spec.bounds], device=actions.device)
    return mask.gather(1, actions.reshape(len(actions), -1) + offsets).all(1)


def _joint_probs(policy, obs, mask, joint):
    """π(a|s) of every joint action at every state, (N, A), from the reference (trpo_ext.reference):
    0 where the mask forbids the action."""
    n, a = obs.shape[0], joint.shape[0]
    obs_rows = obs.repeat_interleave(a, 0)
    actions = joint.repeat(n, *[1] * (joint.dim() - 1))
    mask_rows = None if mask is None else mask.repeat_interleave(a, 0)
    with torch.no_grad():
        probs = reference.log_prob(policy, obs_rows, actions, mask_rows).exp()
    if mask is not None:
        probs = torch.where(_allowed(policy, actions, mask_rows), probs, torch.zeros_like(probs))
    return probs.view(n, a)


@pytest.mark.parametrize("activation", ["tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gaussian_sample_is_mean_plus_std_times_the_same_randn(activation, dtype, device):
    policy = make_policy("gaussian", 5, 3, (8, 7), activation, dtype, device)
    obs = 3 * torch.randn(11, 5, dtype=torch.float64, device=device)  # raw obs in another dtype
    mean, inv_std = torch.randn(5, dtype=dtype, device=device), torch.rand(5, dtype=dtype, device=device) + 0.5
    x, actions = ops.mlp_act(obs, mean, inv_std, 1.5, _params(policy), "gaussian", activation, False,
                             torch.Generator(device).manual_seed(3))
    expected_x = _normalized(obs.to(dtype), mean, inv_std, 1.5)
    noise = torch.randn((11, 3), generator=torch.Generator(device).manual_seed(3), dtype=dtype, device=device)
    with torch.no_grad():
        expected = policy.distribution_params(expected_x) + policy.log_std.exp() * noise
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    assert x.dtype == dtype and actions.shape == (11, 3)
    assert x.abs().max() <= 1.5
    torch.testing.assert_close(x, expected_x, **tol)
    torch.testing.assert_close(actions, expected, **tol)


@pytest.mark.parametrize("case", FUSED_CASES)
def test_deterministic_is_the_mode_without_normalization(case, device):
    policy, obs, _, mask = action_problem(case, torch.float64, device, n=40)
    with torch.no_grad():
        out = policy.distribution_params(obs)
    if mask is not None:
        # Forbid the unmasked argmax of every segment with more than one class: the mode must move.
        mask = torch.ones_like(mask)
        for lo, k in policy.action_spec.bounds:
            if k > 1:
                mask[torch.arange(len(obs)), lo + out[:, lo:lo + k].argmax(1)] = False
    x, actions = _act(policy, obs, mask, deterministic=True)
    assert torch.equal(x, obs)
    assert (actions.shape, actions.dtype) == _action_shape(case, len(obs))
    if kind_of(case) not in DISCRETE_KINDS:  # continuous: the mean
        torch.testing.assert_close(actions, out)
        return
    joint = _joint_actions(policy)  # the most probable joint action of the (masked) reference distribution
    assert torch.equal(actions, joint[_joint_probs(policy, obs, mask, joint).argmax(1)])
    if mask is not None:
        assert _allowed(policy, actions, mask).all()


@pytest.mark.parametrize("case", FUSED_CASES)
def test_samples_follow_the_distribution_and_never_a_masked_action(case, device):
    policy, obs, _, mask = action_problem(case, torch.float64, device, n=1, seed=4)
    n = 200_000
    _, actions = _act(policy, obs.expand(n, -1), None if mask is None else mask.expand(n, -1))
    assert (actions.shape, actions.dtype) == _action_shape(case, n)
    if kind_of(case) not in DISCRETE_KINDS:
        with torch.no_grad():
            dist = policy(obs)
        z = (actions - dist.mean) / dist.stddev
        # 200k draws: the standard error of z's mean is 0.0022, of its std 0.0016; 5 of them is a loose bound.
        assert z.mean(0).abs().max() < 0.011 and (z.std(0) - 1).abs().max() < 0.008
        return
    joint = _joint_actions(policy)
    drawn = (actions.reshape(n, 1, -1) == joint.reshape(1, len(joint), -1)).all(-1)  # (n, joint actions)
    assert drawn.sum(1).eq(1).all()  # every draw is one joint action: each class in range of its segment
    freq, probs = drawn.double().mean(0), _joint_probs(policy, obs, mask, joint)[0]
    if mask is not None:
        forbidden = ~_allowed(policy, joint, mask.expand(len(joint), -1))
        assert forbidden.any() and (freq[forbidden] == 0).all()
    # 200k draws: the standard error of each frequency is below 0.0012; 5 of them is a loose bound.
    assert (freq - probs).abs().max() < 0.006, (freq, probs)


def test_integer_observations_are_converted():
    # e.g. uint8 RAM observations: the op converts them like the weights' dtype, as the Python path did
    policy = make_policy("categorical", 5, 3, (8,), "tanh", torch.float32)
    obs = torch.randint(0, 255, (6, 5), dtype=torch.uint8)
    x, actions = ops.mlp_act(obs, None, None, 1.0, _params(policy), "categorical", "tanh", True, None)
    assert torch.equal(x, obs.float())
    with torch.no_grad():
        assert torch.equal(actions, policy.distribution_params(obs.float()).argmax(-1))


def test_nan_observation_stays_nan_after_clipping(device):
    policy = make_policy("gaussian", 2, 1, (4,), "tanh", torch.float32, device)
    obs = torch.tensor([[float("nan"), 100.0]], device=device)
    x, _ = ops.mlp_act(obs, torch.zeros(2, device=device), torch.ones(2, device=device), 5.0, _params(policy),
                       "gaussian", "tanh", True, None)
    assert torch.isnan(x[0, 0]) and x[0, 1] == 5.0


def test_zero_probability_class_is_never_sampled(device):
    # Class 1's logit is so low that its probability is exactly 0 in float32.
    policy = make_policy("categorical", 2, 3, (4,), "relu", torch.float32, device)
    with torch.no_grad():
        policy.layers[-1].weight.zero_()
        policy.layers[-1].bias.copy_(torch.tensor([0.0, -1e4, 0.0]))
    obs = torch.randn(50_000, 2, device=device)
    _, actions = ops.mlp_act(obs, None, None, 1.0, _params(policy), "categorical", "relu", False,
                             torch.Generator(device).manual_seed(1))
    counts = torch.bincount(actions, minlength=3)
    assert counts[1] == 0 and counts[0] > 0 and counts[2] > 0


@pytest.mark.parametrize("case", FUSED_CASES)
def test_same_generator_state_same_actions(case):
    policy, obs, _, mask = action_problem(case, torch.float32, n=64)
    first, second = _act(policy, obs, mask, seed=7)[1], _act(policy, obs, mask, seed=7)[1]
    assert (first.shape, first.dtype) == _action_shape(case, 64, torch.float32)
    assert torch.equal(first, second)


def test_one_segment_of_all_classes_draws_like_no_segments():
    # MultiDiscrete([K]) (segments=(K,)) is one softmax: the same draw as Discrete(K), in one column.
    discrete = make_policy("categorical", 5, 9, (8, 7), "tanh", torch.float64)
    one_segment = make_policy(gym.spaces.MultiDiscrete([9]), 5, hidden=(8, 7))
    one_segment.load_state_dict(discrete.state_dict())
    obs = torch.randn(30, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    columns = _act(one_segment, obs, seed=4)[1]
    assert columns.shape == (30, 1)
    assert torch.equal(columns[:, 0], _act(discrete, obs, seed=4)[1])


@pytest.mark.parametrize("deterministic", [False, True], ids=["sample", "argmax"])
@pytest.mark.parametrize("case", FUSED_CASES)
def test_an_empty_batch_gives_no_actions(case, deterministic):
    policy, obs, _, mask = action_problem(case, torch.float64, n=1)
    x, actions = _act(policy, obs[:0], None if mask is None else mask[:0], deterministic)
    assert x.shape == (0, 5) and (actions.shape, actions.dtype) == _action_shape(case, 0)


def test_collector_act_matches_normalizer_and_policy():
    import trpo_ext
    from trpo_ext.normalization import RunningNormalizer
    from trpo_ext.rollout import EpisodeStats, RolloutCollector

    envs = trpo_ext.envs.make_vec_env("Pendulum-v1", 2)
    norm = RunningNormalizer(3, clip=2.0)
    norm.update(np.random.default_rng(0).normal(size=(50, 3)) * 4)
    collector = RolloutCollector(envs, 4, torch.device("cpu"), norm, EpisodeStats(2, 10))
    policy = trpo_ext.MLPPolicy(3, envs.single_action_space)
    raw = np.random.default_rng(1).normal(size=(2, 3)) * 5
    x, actions = collector.inference.act(policy, raw, deterministic=True)
    torch.testing.assert_close(x, collector.inference.observe(raw))
    with torch.no_grad():
        torch.testing.assert_close(actions, policy.distribution_params(x))
    envs.close()


@pytest.mark.parametrize("change, error, match", [
    pytest.param(dict(kind="beta"), ValueError, "kind must be", id="bad-kind"),
    pytest.param(dict(activation="gelu"), ValueError, "activation must be one of", id="bad-activation"),
    pytest.param(dict(obs=torch.randn(4, 6)), ValueError, r"params\[0\] \(weight of layer 0\) must have shape \(out, 6\)",
                 id="obs-width"),
    pytest.param(dict(obs=torch.randn(4)), ValueError, "obs must have shape", id="obs-1d"),
    pytest.param(dict(obs=torch.zeros(4, 5, dtype=torch.complex64)), TypeError, "obs must be a real tensor",
                 id="obs-complex"),
    pytest.param(dict(mean=torch.zeros(5), inv_std=None), ValueError, "given together", id="mean-without-inv-std"),
    pytest.param(dict(mean=torch.zeros(4), inv_std=torch.ones(4)), ValueError, r"obs_mean must have shape \(5\)",
                 id="mean-shape"),
    pytest.param(dict(mean=torch.zeros(5), inv_std=torch.ones(5, dtype=torch.float64)), TypeError,
                 "obs_inv_std must have params\\[0\\]'s dtype", id="inv-std-dtype"),
    pytest.param(dict(clip=0.0, mean=torch.zeros(5), inv_std=torch.ones(5)), ValueError, "obs_clip must be > 0",
                 id="clip-zero"),
    pytest.param(dict(params="drop_log_std"), ValueError, "params must be", id="missing-log-std"),
    pytest.param(dict(params="int_weights"), TypeError, r"params\[0\] \(weight of layer 0\) must be float32 or float64",
                 id="int-params"),
    pytest.param(dict(params="double_bias"), TypeError, r"params\[1\] \(bias of layer 0\) must have params\[0\]'s dtype",
                 id="mixed-dtype-params"),
    pytest.param(dict(params="zero_hidden"), ValueError, r"params\[0\] \(weight of layer 0\) has 0 output units",
                 id="zero-width-hidden"),
    pytest.param(dict(params="zero_output"), ValueError, r"params\[2\] \(weight of layer 1\) has 0 output units",
                 id="zero-width-output"),
])
def test_bad_input_names_the_argument(change, error, match):
    policy = make_policy("gaussian", 5, 3, (8,), "tanh", torch.float32)
    args = dict(obs=torch.randn(4, 5), mean=None, inv_std=None, clip=1.0, params=_params(policy),
                kind="gaussian", activation="tanh")
    args.update(change)
    params = _params(policy)
    args["params"] = {
        "drop_log_std": params[:-1],
        "int_weights": [p.int() for p in params],
        "double_bias": [params[0], params[1].double(), *params[2:]],
        "zero_hidden": zero_width(params, 0),
        "zero_output": zero_width(params, 1)[:-1] + [params[-1][:0]],
    }.get(args["params"], args["params"]) if isinstance(args["params"], str) else args["params"]
    with pytest.raises(error, match=match):
        ops.mlp_act(args["obs"], args["mean"], args["inv_std"], args["clip"], args["params"], args["kind"],
                    args["activation"], False, None)


@pytest.mark.parametrize("deterministic", [False, True], ids=["sample", "argmax"])
def test_categorical_with_zero_actions_is_refused(deterministic):
    # A categorical head with 0 units has nothing to sample: a ValueError naming the layer, not a crash.
    policy = make_policy("categorical", 3, 2, (4,), "relu", torch.float32)
    params = zero_width(_params(policy), 1)
    with pytest.raises(ValueError, match=r"params\[2\] \(weight of layer 1\) has 0 output units"):
        ops.mlp_act(torch.randn(5, 3), None, None, 1.0, params, "categorical", "relu", deterministic, None)


@pytest.mark.parametrize("case", FUSED_CASES)
def test_opcheck_mlp_act(case, device):
    policy, obs, _, mask = action_problem(case, torch.float32, device, n=9)
    op = fused_spec(policy).op_kwargs()
    mean, inv_std = torch.zeros(5, device=device), torch.ones(5, device=device)
    # deterministic: opcheck runs the op several times and compares the outputs
    torch.library.opcheck(ops.mlp_act.default, (obs, mean, inv_std, 5.0, _params(policy), op["kind"], op["activation"],
                                                True, None, op["segments"], mask))


@pytest.mark.parametrize("case", FUSED_CASES)
@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_few_rows_on_the_cpu_match_the_gemm_path(case, activation, dtype):
    # mlp_act runs a rollout step's few rows (up to kernels.h's kSmallBatchRows, 16) through plain
    # loops on the CPU and larger batches through GEMMs: the first rows of a large batch must come
    # out as the same rows alone, to rounding, normalization included. (The sampling after the
    # forward pass is shared; the tests above check it at 11 rows.)
    policy, obs, _, mask = action_problem(case, dtype, n=200, activation=activation)
    obs = 2 * obs
    g = torch.Generator().manual_seed(0)
    mean, inv_std = torch.randn(5, generator=g, dtype=dtype), torch.rand(5, generator=g, dtype=dtype) + 0.5
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)

    def act(rows):
        return _act(policy, obs[:rows], None if mask is None else mask[:rows], deterministic=True,
                    obs_mean=mean, obs_inv_std=inv_std, obs_clip=3.0)

    x_all, mode_all = act(200)
    with torch.no_grad():
        expected = policy.distribution_params(x_all)
    for rows in (1, 7, 16):
        x, mode = act(rows)
        torch.testing.assert_close(x, x_all[:rows], **tol)
        torch.testing.assert_close(mode, mode_all[:rows], **tol)
        if kind_of(case) not in DISCRETE_KINDS:  # the mode is the forward pass itself
            torch.testing.assert_close(mode, expected[:rows], **tol)
