"""Bad input gets an exception naming the argument, never a crash, and never touches the policy."""
import gymnasium as gym
import pytest
import torch

import trpo_ext
from trpo_ext import _ops
from trpo_ext.policies import fused_spec

from helpers import action_problem, make_policy, n_params, random_mask, sample_batch, zero_width

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


@pytest.mark.parametrize("space", [gym.spaces.Box(-1, 1, (0,)), gym.spaces.MultiDiscrete([])],
                         ids=["box", "multidiscrete"])
def test_an_empty_action_space_is_refused(space):
    # Every family's zero-width space (gymnasium itself refuses Discrete(0) and MultiBinary(0)).
    with pytest.raises(TypeError, match=r"action_space .* is empty: it has no action to take"):
        trpo_ext.MLPPolicy(3, space)

    class NoActions(gym.Env):
        observation_space, action_space = gym.spaces.Box(-1, 1, (3,)), space

    with pytest.raises(TypeError, match=r"action_space .* is empty"):
        trpo_ext.TRPO(lambda: NoActions(), n_envs=1, n_steps=8)


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
    # A meta tensor anywhere sends the call to the fake kernel, which refuses it: no uninitialised result.
    pytest.param(lambda a: (a[0].to("meta"), a[1], a[2], "gaussian", "tanh", 0.0), TypeError,
                 r"obs must be a CPU or CUDA tensor, got one on meta", id="obs-meta"),
    pytest.param(lambda a: (a[0], _with(a, 2, a[1][2].to("meta")), a[2], "gaussian", "tanh", 0.0), TypeError,
                 r"params\[2\] must be a CPU or CUDA tensor", id="param-meta"),
    pytest.param(lambda a: (a[0], a[1], a[2].to("meta"), "gaussian", "tanh", 0.0), TypeError,
                 "v must be a CPU or CUDA tensor", id="v-meta"),
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
    # Several right-hand sides are the columns of a (P, C) b, C >= 1.
    with pytest.raises(ValueError, match=r"b must be a flat vector of length \d+ \(the parameter count\) or a \(\d+, C\) "
                                         r"matrix of C >= 1 such columns, got shape \[\d+, 0\]"):
        ops.mlp_cg(obs, params, v[:, None][:, :0], "gaussian", "tanh", 0.1, 3, 1e-6)
    with pytest.raises(ValueError, match="b must be a flat vector"):
        ops.mlp_cg(obs, params, v[:-1, None].expand(-1, 2), "gaussian", "tanh", 0.1, 3, 1e-6)


def test_op_refuses_the_iters_the_config_refuses(setup):
    # One bound on each side of the boundary (config.MAX_ITERATIONS, fisher.cpp's kMaxCgIters): they agree,
    # so an iters that would run for centuries is refused by the raw op as by cg_solve and the config.
    from trpo_ext.config import MAX_ITERATIONS

    obs, params, v = _op_args(*setup)
    for iters in (MAX_ITERATIONS + 1, 2**62):
        with pytest.raises(ValueError, match=r"iters must be >= 1 and <= (\d+), got") as info:
            ops.mlp_cg(obs, params, v, "gaussian", "tanh", 0.1, iters, 0.0)
        assert int(str(info.value).split("<= ")[1].split(",")[0]) == MAX_ITERATIONS
        with pytest.raises(ValueError, match=f"iters must be an int >= 1 and <= {MAX_ITERATIONS}"):
            trpo_ext.cg_solve(setup[0], obs, v, iters=iters)
    x, used, _, _ = ops.mlp_cg(obs, params, v, "gaussian", "tanh", 0.1, MAX_ITERATIONS, 0.0)  # the bound itself runs
    assert 1 <= int(used) <= MAX_ITERATIONS and bool(torch.isfinite(x).all())



# ----------------------------------------------------------------------------- the ops' action arguments
# Segments, masks, actions and the old distribution, on every op that takes them: a valid batch of an
# ACTION_CASES policy (helpers.action_problem) with one argument replaced.
N = 11  # the batch's rows
MASK_OPS = ["fvp", "cg", "direction", "trial", "act"]


def _batch(case):
    """(policy, obs, mask, actions, advantages): a valid batch of N rows for an ACTION_CASES entry,
    or for a gymnasium action space (masked when it is categorical); actions drawn from the policy."""
    if isinstance(case, gym.Space):
        policy = make_policy(case, 5, hidden=(8, 7))
        g = torch.Generator().manual_seed(1)
        obs = torch.randn(N, 5, generator=g, dtype=torch.float64)
        mask = random_mask(policy.action_spec, N, g) if policy.action_spec.maskable else None
    else:
        policy, obs, _, mask = action_problem(case, torch.float64, n=N)
    return (policy, obs, mask, *sample_batch(policy, obs, mask))


def _call(op, case="multicategorical-masked", **change):
    """Calls the fused op `op` on a valid batch of `case` (see _batch), its keyword arguments (from the
    one builder, policies.fused_spec) with those in `change` replaced."""
    policy, obs, mask, actions, advantages = _batch(case)
    params = [p.detach() for p in policy.parameters()]
    kwargs = fused_spec(policy).op_kwargs(action_mask=mask)
    if op == "act":
        kwargs.update(deterministic=False, **change)
        return _ops.mlp_act(obs, params, **kwargs)
    if op in ("fvp", "cg"):
        v = torch.zeros(n_params(policy), dtype=torch.float64)
        kwargs.update(damping=0.1, **(dict(iters=3, rtol=0.0) if op == "cg" else {}), **change)
        return (_ops.mlp_fvp if op == "fvp" else _ops.mlp_cg)(obs, params, v, **kwargs)
    kwargs.update(actions=actions, advantages=advantages)
    if op == "trial":
        with torch.no_grad():
            kwargs.update(old_dist_params=policy.distribution_params(obs),
                          old_log_std=policy.log_std.detach() if policy.kind == "gaussian" else None)
    else:
        kwargs.update(damping=0.1, iters=3, rtol=0.0)
    kwargs.update(change)
    fn = _ops.mlp_policy_trial if op == "trial" else _ops.mlp_policy_direction
    return fn(obs, params, kwargs.pop("actions"), kwargs.pop("advantages"), **kwargs)


def _mask_without(row, columns, width=9):
    mask = torch.ones(N, width, dtype=torch.bool)
    mask[row, columns] = False
    return mask


# The default case, multicategorical-masked: MultiDiscrete([3, 2, 4]), 9 logits.
@pytest.mark.parametrize("op", MASK_OPS)
@pytest.mark.parametrize("case, change, error, match", [
    pytest.param(None, dict(segments=(3, 2, 3)), ValueError, r"segments must sum to the output width 9", id="sum"),
    pytest.param(None, dict(segments=(5, 0, 4)), ValueError, r"segments must be class counts >= 1", id="zero"),
    pytest.param(None, dict(segments=(-1, 10)), ValueError, r"segments must be class counts >= 1", id="negative"),
    pytest.param(None, dict(segments=()), ValueError, r"segments must list at least one", id="empty"),
    pytest.param(None, dict(kind="beta"), ValueError, r"kind must be 'categorical', 'gaussian' or 'bernoulli'",
                 id="kind"),
    pytest.param(None, dict(action_mask=torch.ones(N, 9)), TypeError, r"action_mask must be bool", id="mask-dtype"),
    pytest.param(None, dict(action_mask=torch.ones(N, 8, dtype=torch.bool)), ValueError,
                 r"action_mask must have shape \(11, 9\)", id="mask-shape"),
    pytest.param(None, dict(action_mask=torch.ones(9, dtype=torch.bool)), ValueError,
                 r"action_mask must have shape \(11, 9\)", id="mask-1d"),
    pytest.param(None, dict(action_mask=_mask_without(4, [3, 4])), ValueError,
                 r"action_mask\[4\] allows no action in segment 1 \(columns \[3, 5\)\)", id="mask-empty-segment"),
    pytest.param(gym.spaces.MultiDiscrete([2, 1, 3, 3]), dict(action_mask=_mask_without(7, [2])), ValueError,
                 r"action_mask\[7\] allows no action in segment 1", id="mask-empty-one-class-segment"),
])
def test_bad_segments_and_masks_name_the_argument(op, case, change, error, match):
    with pytest.raises(error, match=match):
        _call(op, "multicategorical-masked" if case is None else case, **change)


@pytest.mark.parametrize("op", MASK_OPS)
def test_an_unsegmented_row_that_allows_nothing(op):
    mask = torch.ones(N, 3, dtype=torch.bool)
    mask[2] = False
    with pytest.raises(ValueError, match=r"action_mask\[2\] allows no action: every row needs at least one"):
        _call(op, "categorical-masked", action_mask=mask)


@pytest.mark.parametrize("op", MASK_OPS)
@pytest.mark.parametrize("kind", ["gaussian", "bernoulli"])
def test_segments_and_masks_are_for_categorical_only(op, kind):
    with pytest.raises(ValueError, match=f"segments is only for kind 'categorical', got kind '{kind}'"):
        _call(op, kind, segments=(2, 1))
    with pytest.raises(ValueError, match=f"action_mask is only for kind 'categorical', got kind '{kind}'"):
        _call(op, kind, action_mask=torch.ones(N, 3, dtype=torch.bool))


def _set(index, value):
    """actions with actions[index] = value."""
    return lambda a: a.index_put(tuple(torch.tensor([i]) for i in index), torch.tensor(value, dtype=a.dtype))


@pytest.mark.parametrize("op", ["direction", "trial"])
@pytest.mark.parametrize("case, actions, error, match", [
    pytest.param("categorical", lambda a: a + 3, ValueError, r"actions must be class indices in \[0, 3\)",
                 id="categorical-range"),
    pytest.param("categorical", lambda a: a.double(), TypeError, r"actions must be int64", id="categorical-dtype"),
    pytest.param("multicategorical", lambda a: a[:, :2], ValueError,
                 r"actions must have shape \(11, 3\) \(one class index", id="segments-columns"),
    pytest.param("multicategorical", lambda a: a[:, 0], ValueError, r"actions must have shape \(11, 3\)",
                 id="segments-1d"),
    pytest.param("multicategorical", _set((5, 1), 2), ValueError,
                 r"actions\[:, 1\] must be class indices in \[0, 2\) \(segments\[1\]\), got values in \[\d+, 2\]",
                 id="segments-range"),
    pytest.param("multicategorical", _set((0, 2), -1), ValueError, r"actions\[:, 2\] must be class indices in \[0, 4\)",
                 id="segments-negative"),
    pytest.param("multicategorical", lambda a: a.double(), TypeError, r"actions must be int64 class indices",
                 id="segments-dtype"),
    pytest.param("bernoulli", _set((3, 1), 0.5), ValueError,
                 r"actions of a bernoulli policy must hold 0 or 1, got 0.5 at actions\[3, 1\]", id="bernoulli-value"),
    pytest.param("bernoulli", _set((0, 0), float("nan")), ValueError, r"must hold 0 or 1, got nan at actions\[0, 0\]",
                 id="bernoulli-nan"),
    pytest.param("bernoulli", lambda a: a.long(), TypeError, r"actions must have obs's dtype", id="bernoulli-dtype"),
    pytest.param("bernoulli", lambda a: a[:, :2], ValueError, r"actions must have shape \(11, 3\)",
                 id="bernoulli-shape"),
    pytest.param("gaussian", lambda a: a[:, :2], ValueError, r"actions must have shape \(11, 3\)",
                 id="gaussian-shape"),
])
def test_bad_actions_name_the_column(op, case, actions, error, match):
    good = _batch(case)[3]
    with pytest.raises(error, match=match):
        _call(op, case, actions=actions(good))


@pytest.mark.parametrize("op", ["direction", "trial"])
@pytest.mark.parametrize("case", ["categorical-masked", "multicategorical-masked"])
def test_a_masked_action_is_refused(op, case):
    policy, _, mask, actions, _ = _batch(case)
    bounds = policy.action_spec.bounds
    mask = mask.clone()
    columns = actions.reshape(N, -1) + torch.tensor([lo for lo, _ in bounds])
    mask[6, columns[6, -1]] = False  # forbid row 6's action in its last segment...
    lo, k = bounds[-1]
    mask[6, lo + (columns[6, -1] - lo + 1) % k] = True  # ...while the segment still allows one
    where = r"actions\[6\]" if policy.segments is None else rf"actions\[6, {len(bounds) - 1}\]"
    with pytest.raises(ValueError, match=where + r" = \d+ is an action that action_mask\[6\] forbids"):
        _call(op, case, action_mask=mask)


@pytest.mark.parametrize("change, error, match", [
    pytest.param(dict(advantages=torch.zeros(4, dtype=torch.float64)), ValueError, r"advantages must have shape \(11\)",
                 id="advantages-length"),
    pytest.param(dict(advantages=torch.zeros(N)), TypeError, "advantages must have obs's dtype", id="advantages-dtype"),
    # (N, C) advantages are C surrogates (trpo_ext.constrained_step's two); none, or a third dimension, is refused.
    pytest.param(dict(advantages=torch.zeros(N, 0, dtype=torch.float64)), ValueError,
                 r"advantages must have shape \(11\) or \(11, C\) with C >= 1, got \[11, 0\]", id="advantages-no-column"),
    pytest.param(dict(advantages=torch.zeros(N, 2, 1, dtype=torch.float64)), ValueError,
                 r"advantages must have shape \(11\) or \(11, C\)", id="advantages-3d"),
    pytest.param(dict(fvp_obs=torch.zeros(4, 2, dtype=torch.float64)), ValueError, "fvp_obs must have shape",
                 id="fvp-obs-width"),
])
def test_policy_direction_checks(change, error, match):
    with pytest.raises(error, match=match):
        _call("direction", "gaussian", **change)


def test_fvp_action_mask_comes_exactly_with_fvp_obs_and_action_mask():
    policy, obs, mask, actions, advantages = _batch("categorical-masked")
    fvp_obs = obs[:4]

    def direction(fvp_obs=None, **masks):
        return _ops.mlp_policy_direction(obs, [p.detach() for p in policy.parameters()], actions, advantages,
                                         damping=0.1, iters=3, rtol=0.0, fvp_obs=fvp_obs,
                                         **fused_spec(policy).op_kwargs(**masks))

    with pytest.raises(ValueError, match="fvp_action_mask must be given when fvp_obs and action_mask are"):
        direction(fvp_obs=fvp_obs, action_mask=mask)
    with pytest.raises(ValueError, match="fvp_action_mask is only for fvp_obs's rows when action_mask is given"):
        direction(fvp_obs=fvp_obs, fvp_action_mask=mask[:4])
    with pytest.raises(ValueError, match="fvp_action_mask is only for fvp_obs's rows"):
        direction(action_mask=mask, fvp_action_mask=mask)
    with pytest.raises(ValueError, match=r"fvp_action_mask must have shape \(4, 3\)"):
        direction(fvp_obs=fvp_obs, action_mask=mask, fvp_action_mask=mask)
    with pytest.raises(TypeError, match="fvp_action_mask must be bool"):
        direction(fvp_obs=fvp_obs, action_mask=mask, fvp_action_mask=mask[:4].long())
    bad = mask[:4].clone()
    bad[1] = False
    with pytest.raises(ValueError, match=r"fvp_action_mask\[1\] allows no action"):
        direction(fvp_obs=fvp_obs, action_mask=mask, fvp_action_mask=bad)
    direction(fvp_obs=fvp_obs, action_mask=mask, fvp_action_mask=mask[:4])


def test_policy_trial_checks_the_old_distribution():
    with pytest.raises(ValueError, match="old_log_std must be given for a gaussian policy"):
        _call("trial", "gaussian", old_log_std=None)
    with pytest.raises(ValueError, match=r"old_dist_params must have shape \(11, 3\)"):
        _call("trial", "gaussian", old_dist_params=torch.zeros(N, 2, dtype=torch.float64))


@pytest.mark.parametrize("op, case, argument", [
    *[(op, "multicategorical-masked", "action_mask") for op in MASK_OPS],
    ("direction", "gaussian", "actions"), ("direction", "gaussian", "advantages"), ("direction", "gaussian", "fvp_obs"),
    ("trial", "gaussian", "old_dist_params"), ("trial", "gaussian", "old_log_std"), ("act", "gaussian", "obs_mean"),
])
def test_every_op_refuses_a_meta_argument_naming_it(op, case, argument):
    policy, obs, mask, actions, advantages = _batch(case)
    value = {"action_mask": lambda: mask, "actions": lambda: actions, "advantages": lambda: advantages,
             "fvp_obs": lambda: obs[:3], "obs_mean": lambda: obs[0],
             "old_dist_params": lambda: policy.distribution_params(obs).detach(),
             "old_log_std": lambda: policy.log_std.detach()}[argument]
    change = {argument: value().to("meta")}
    if argument == "obs_mean":
        change["obs_inv_std"] = torch.ones_like(obs[0])
    with pytest.raises(TypeError, match=f"{argument} must be a CPU or CUDA tensor, got one on meta"):
        _call(op, case, **change)


@pytest.mark.parametrize("obs_clip", [0.0, -1.0, float("nan")])
@pytest.mark.parametrize("normalized", [False, True])
def test_act_refuses_an_obs_clip_outside_its_range(obs_clip, normalized):
    # Checked whether or not the call normalizes: a value out of range is a mistake either way.
    change = dict(obs_mean=torch.zeros(5, dtype=torch.float64), obs_inv_std=torch.ones(5, dtype=torch.float64)) \
        if normalized else {}
    with pytest.raises(ValueError, match=r"obs_clip must be > 0 \(inf: no clipping\), got"):
        _call("act", "gaussian", obs_clip=obs_clip, **change)
