"""The rollout inference op (trpo_ext::mlp_act): normalization, forward pass and sampling against
plain PyTorch; its distributions; bad input; opcheck."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from helpers import make_policy, zero_width

ops = torch.ops.trpo_ext


def _params(policy):
    return [p.detach() for p in policy.parameters()]


def _normalized(obs, mean, inv_std, clip):
    return ((obs - mean) * inv_std).clamp(-clip, clip)


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


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_deterministic_is_the_mode_without_normalization(kind, device):
    policy = make_policy(kind, 4, 3, (6,), "tanh", torch.float64, device)
    obs = torch.randn(7, 4, dtype=torch.float64, device=device)
    x, actions = ops.mlp_act(obs, None, None, 1.0, _params(policy), kind, "tanh", True, None)
    with torch.no_grad():
        out = policy.distribution_params(obs)
    assert torch.equal(x, obs)
    torch.testing.assert_close(actions, out.argmax(-1) if kind == "categorical" else out)


def test_categorical_samples_follow_softmax(device):
    policy = make_policy("categorical", 3, 4, (5,), "relu", torch.float64, device)
    obs = torch.randn(1, 3, dtype=torch.float64, device=device).expand(200_000, 3)
    _, actions = ops.mlp_act(obs, None, None, 1.0, _params(policy), "categorical", "relu", False,
                             torch.Generator(device).manual_seed(0))
    with torch.no_grad():
        probs = policy(obs[:1]).probs[0]
    assert actions.dtype == torch.int64 and actions.min() >= 0 and actions.max() <= 3
    freq = torch.bincount(actions, minlength=4).double() / actions.numel()
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


def test_same_generator_state_same_actions():
    policy = make_policy("categorical", 3, 5, (4,), "tanh", torch.float32)
    obs = torch.randn(64, 3)
    runs = [ops.mlp_act(obs, None, None, 1.0, _params(policy), "categorical", "tanh", False,
                        torch.Generator().manual_seed(7))[1] for _ in range(2)]
    assert torch.equal(*runs)


def test_collector_act_matches_normalizer_and_policy():
    import trpo_ext
    from trpo_ext.rollout import EpisodeStats, RolloutCollector, RunningNormalizer

    envs = trpo_ext.envs.make_vec_env("Pendulum-v1", 2)
    norm = RunningNormalizer(3, clip=2.0)
    norm.update(np.random.default_rng(0).normal(size=(50, 3)) * 4)
    collector = RolloutCollector(envs, 4, torch.device("cpu"), norm, EpisodeStats(2, 10))
    policy = trpo_ext.MLPPolicy(3, envs.single_action_space)
    raw = np.random.default_rng(1).normal(size=(2, 3)) * 5
    x, actions = collector.act(policy, raw, deterministic=True)
    torch.testing.assert_close(x, collector.observe(raw))
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


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
def test_opcheck_mlp_act(kind, device):
    policy = make_policy(kind, 5, 3, (8, 7), "tanh", torch.float32, device)
    obs = torch.randn(9, 5, device=device)
    mean, inv_std = torch.zeros(5, device=device), torch.ones(5, device=device)
    # deterministic: opcheck runs the op several times and compares the outputs
    torch.library.opcheck(ops.mlp_act.default, (obs, mean, inv_std, 5.0, _params(policy), kind, "tanh", True, None))


@pytest.mark.parametrize("kind", ["categorical", "gaussian"])
@pytest.mark.parametrize("activation", ["tanh", "relu", "elu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_few_rows_on_the_cpu_match_the_gemm_path(kind, activation, dtype):
    # mlp_act runs a rollout step's few rows (up to kernels.h's kSmallBatchRows, 16) through plain
    # loops on the CPU and larger batches through GEMMs: the first rows of a large batch must come
    # out as the same rows alone, to rounding, normalization included. (The sampling after the
    # forward pass is shared; the tests above check it at 11 rows.)
    policy = make_policy(kind, 5, 4, (8, 7), activation, dtype)
    g = torch.Generator().manual_seed(0)
    obs = 2 * torch.randn(200, 5, generator=g, dtype=dtype)
    mean, inv_std = torch.randn(5, dtype=dtype), torch.rand(5, dtype=dtype) + 0.5
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)

    def act(x):
        return ops.mlp_act(x, mean, inv_std, 3.0, _params(policy), kind, activation, True, None)

    x_all, mode_all = act(obs)
    with torch.no_grad():
        expected = policy.distribution_params(x_all)
    for rows in (1, 7, 16):
        x, mode = act(obs[:rows])
        torch.testing.assert_close(x, x_all[:rows], **tol)
        torch.testing.assert_close(mode, mode_all[:rows], **tol)
        if kind == "gaussian":  # the mode is the forward pass itself
            torch.testing.assert_close(mode, expected[:rows], **tol)
