"""trpo_ext.config.TRPOConfig: every refused value names its one parameter (always a ValueError,
the rule in config.py's docstring); accepted values become plain Python data; TRPO builds its
config before anything else and refuses a log_dir that is a file."""
import dataclasses
import inspect
import io
import math
import re

import numpy as np
import pytest
import torch

import trpo_ext.trpo
from trpo_ext import TRPO
from trpo_ext.config import (MAX_BATCH, MAX_ENVS, MAX_ITERATIONS, POLICY_KWARGS, RECURRENT_DEFAULTS, THREADS_PER_CORE, TRPOConfig, TrustRegionConfig,
                             check_num_threads)
from trpo_ext.policies import ACTIVATIONS

FIELDS = list(TRPOConfig(seed=0).to_dict())  # TRPO's hyperparameter keywords
INF, NAN = float("inf"), float("nan")


def case(name, value, words):
    """One refused value: the hyperparameter `name` = `value` (TRPO's keyword) raises ValueError whose
    message starts with `words`."""
    return pytest.param(name, value, words, id=f"{name}={value!r}")


BAD = [
    case("n_envs", 0, "n_envs must be an int >= 1"),
    case("n_envs", 10**12, "n_envs must be an int >= 1 and <= 65536, got 1000000000000"),
    case("n_envs", 1.5, "n_envs must be an int >= 1"),
    case("n_envs", True, "n_envs must be an int >= 1"),
    case("n_envs", "2", "n_envs must be an int >= 1"),
    case("n_steps", 0, "n_steps must be an int >= 1"),
    case("gamma", 1.5, "gamma must be a finite number in [0.0, 1.0]"),
    case("gamma", -0.1, "gamma must be a finite number in [0.0, 1.0]"),
    case("gamma", NAN, "gamma must be a finite number in [0.0, 1.0]"),
    case("gae_lambda", 1.01, "gae_lambda must be a finite number in [0.0, 1.0]"),
    case("gae_lambda", None, "gae_lambda must be a finite number in [0.0, 1.0]"),
    case("max_kl", 0.0, "max_kl must be a finite number in (0.0, 10.0]"),
    case("max_kl", -0.01, "max_kl must be a finite number in (0.0, 10.0]"),
    case("max_kl", INF, "max_kl must be a finite number in (0.0, 10.0]"),
    case("damping", INF, "damping must be a finite number in [0.0, inf]"),
    case("damping", -1.0, "damping must be a finite number in [0.0, inf]"),
    case("cg_iters", 0, "cg_iters must be an int >= 1"),
    case("cg_iters", 2.0, "cg_iters must be an int >= 1"),
    case("cg_iters", 2**62, "cg_iters must be an int >= 1 and <= 10000"),
    case("cg_iters", 1e30, "cg_iters must be an int >= 1 and <= 10000"),
    case("cg_rtol", INF, "cg_rtol must be a finite number in [0.0, 1.0)"),
    case("backtrack_factor", 0.0, "backtrack_factor must be a finite number in (0.0, 1.0)"),
    case("backtrack_factor", 1.0, "backtrack_factor must be a finite number in (0.0, 1.0)"),
    case("max_backtracks", 0, "max_backtracks must be an int >= 1"),
    case("max_backtracks", 10**9, "max_backtracks must be an int >= 1 and <= 10000"),
    case("fvp_fraction", 0.0, "fvp_fraction must be a finite number in (0.0, 1.0]"),
    case("fvp_fraction", 1.5, "fvp_fraction must be a finite number in (0.0, 1.0]"),
    case("normalize_advantage", 1, "normalize_advantage must be True or False"),
    case("normalize_obs", "False", "normalize_obs must be True or False"),
    case("normalize_obs", None, "normalize_obs must be True or False"),
    case("obs_clip", 0.0, "obs_clip must be a finite number in (0.0, inf]"),
    case("obs_clip", INF, "obs_clip must be a finite number in (0.0, inf]"),
    case("normalize_reward", "yes", "normalize_reward must be True or False"),
    case("reward_clip", -1.0, "reward_clip must be a finite number in (0.0, inf]"),
    case("critic_lr", 0.0, "critic_lr must be a finite number in (0.0, 1.0]"),
    case("critic_lr", INF, "critic_lr must be a finite number in (0.0, 1.0]"),
    case("critic_epochs", -1, "critic_epochs must be an int >= 0"),
    case("critic_epochs", 10_001, "critic_epochs must be an int >= 0 and <= 10000"),
    case("critic_batch_size", 0, "critic_batch_size must be an int >= 1"),
    case("policy_kwargs", [("hidden", (8,))], "policy_kwargs must be a dict"),
    case("policy_kwargs", "tanh", "policy_kwargs must be a dict"),
    case("policy_kwargs", {"widths": (8,)}, "policy_kwargs: unknown keys ['widths']"),
    case("policy_kwargs", {"a": 1, "c": 2}, "policy_kwargs: unknown keys ['a', 'c']"),
    case("policy_kwargs", {"hidden": (0,)}, "policy_kwargs['hidden'] must be a sequence of positive ints"),
    case("policy_kwargs", {"hidden": 64}, "policy_kwargs['hidden'] must be a sequence of positive ints"),
    case("policy_kwargs", {"hidden": "64"}, "policy_kwargs['hidden'] must be a sequence of positive ints"),
    case("policy_kwargs", {"hidden": (8.0,)}, "policy_kwargs['hidden'] must be a sequence of positive ints"),
    case("policy_kwargs", {"hidden": (True,)}, "policy_kwargs['hidden'] must be a sequence of positive ints"),
    case("policy_kwargs", {"activation": "gelu"}, f"policy_kwargs['activation'] must be one of {sorted(ACTIVATIONS)}"),
    case("policy_kwargs", {"log_std_init": NAN}, "policy_kwargs['log_std_init'] must be a finite number in [-20.0, 2.0]"),
    case("policy_kwargs", {"log_std_init": 3.0}, "policy_kwargs['log_std_init'] must be a finite number in [-20.0, 2.0]"),
    case("policy_kwargs", {"full_std": 1}, "policy_kwargs['full_std'] must be True or False"),
    case("policy_kwargs", {"use_expln": "no"}, "policy_kwargs['use_expln'] must be True or False"),
    case("use_sde", 1, "use_sde must be True or False"),
    case("use_sde", None, "use_sde must be True or False"),
    case("sde_sample_freq", 0, "sde_sample_freq must be -1 (a new noise matrix once per rollout) or an int >= 1"),
    case("sde_sample_freq", -2, "sde_sample_freq must be an int >= -1"),
    case("sde_sample_freq", 4.0, "sde_sample_freq must be an int >= -1"),
    case("vectorization", "gpu", "vectorization must be one of ['async', 'envpool', 'sync']"),
    case("critic_parallel", "scatter", "critic_parallel must be one of ['gather', 'reduce']"),
    case("update_parallel", "tasks", "update_parallel must be one of ['auto', 'data', 'split']"),
    case("vectorization", None, "vectorization must be one of ['async', 'envpool', 'sync']"),
    case("stats_window", 0, "stats_window must be an int >= 1"),
    case("seed", -1, "seed must be an int >= 0 and <= 9223372036854775807"),
    case("seed", 2**63, "seed must be an int >= 0 and <= 9223372036854775807"),
    case("seed", 2**64, "seed must be an int >= 0 and <= 9223372036854775807"),
    case("seed", 1.0, "seed must be an int >= 0 and <= 9223372036854775807"),
    case("seed", True, "seed must be an int >= 0 and <= 9223372036854775807"),
]


@pytest.mark.parametrize("name, value, words", BAD)
def test_every_bad_value_is_a_value_error_naming_that_one_parameter(name, value, words):
    with pytest.raises(ValueError) as info:
        TRPOConfig.from_dict({name: value})
    message = str(info.value)
    assert type(info.value) is ValueError
    assert message.startswith(words), message
    others = [f for f in FIELDS if f != name and re.search(rf"\b{f}\b", message)]
    assert not others, f"the message also names {others}: {message}"


def test_every_field_has_a_refused_value_here():
    assert {p.values[0] for p in BAD} == set(FIELDS)


@pytest.mark.parametrize("name, value, words", [
    case("max_kl", 0.0, "max_kl must be"), case("gamma", 1.5, "gamma must be"),
    case("policy_kwargs", {"widths": (8,)}, "policy_kwargs: unknown keys ['widths']"),
    case("vectorization", "gpu", "vectorization must be"),
])
def test_trpo_refuses_bad_hyperparameters_before_building_envs(monkeypatch, name, value, words):
    monkeypatch.setattr(trpo_ext.trpo, "make_vec_env", lambda *a: pytest.fail("envs built before the check"))
    with pytest.raises(ValueError) as info:
        TRPO("CartPole-v1", **{name: value})
    assert str(info.value).startswith(words)


def test_trust_region_settings_are_checked_by_trust_region_config_alone():
    config = TRPOConfig.from_dict(dict(max_kl=0.02, damping=0.2, cg_iters=5, cg_rtol=1e-8, backtrack_factor=0.5,
                                       max_backtracks=3, gamma=0.9))
    assert config.trust_region == TrustRegionConfig(0.02, 0.2, 5, 1e-8, 0.5, 3) and config.gamma == 0.9
    assert TRPOConfig().trust_region == TrustRegionConfig()
    with pytest.raises(ValueError) as direct:
        TrustRegionConfig(max_kl=-0.01)
    with pytest.raises(ValueError) as through:
        TRPOConfig.from_dict({"max_kl": -0.01})
    assert str(direct.value) == str(through.value)
    with pytest.raises(ValueError, match="trust_region must be a TrustRegionConfig, got {'max_kl': 0.1}"):
        TRPOConfig(trust_region={"max_kl": 0.1})


def test_numpy_numbers_are_accepted_and_stored_as_python_numbers(tmp_path):
    config = TRPOConfig.from_dict(dict(
        n_envs=np.int64(2), n_steps=np.int32(16), cg_iters=np.uint8(3), gamma=np.float32(0.5),
        normalize_obs=np.bool_(True), seed=np.uint64(2**63 - 1),
        policy_kwargs={"hidden": [np.int64(8), 4], "log_std_init": np.float64(-1), "lstm_hidden_size": np.int16(32)}))
    assert (config.n_envs, config.n_steps, config.trust_region.cg_iters, config.batch_size) == (2, 16, 3, 32)
    plain = config.to_dict()
    assert plain["policy_kwargs"] == {"hidden": (8, 4), "activation": "tanh", "log_std_init": -1.0, "full_std": True,
                                      "use_expln": False, "lstm_hidden_size": 32, "n_lstm_layers": 1,
                                      "shared_lstm": False, "enable_critic_lstm": True}
    for value in [*plain.values(), *plain["policy_kwargs"].values(), *plain["policy_kwargs"]["hidden"]]:
        assert type(value) in (int, float, bool, str, dict, tuple), (value, type(value))
    buffer = io.BytesIO()
    torch.save(plain, buffer)
    buffer.seek(0)
    assert TRPOConfig.from_dict(torch.load(buffer, weights_only=True)) == config
    agent = TRPO("CartPole-v1", n_envs=np.int64(2), n_steps=np.int64(16), critic_epochs=np.int64(1), seed=np.int64(0))
    assert agent.envs.num_envs == 2 and agent.learn(32, progress_bar=False).num_timesteps == 32
    agent.close()


def test_defaults_seed_and_policy_kwargs():
    config = TRPOConfig()
    assert 0 <= config.seed < 2**63 and config.policy_kwargs == POLICY_KWARGS
    assert TRPOConfig(seed=0).seed == 0 and TRPOConfig(seed=2**63 - 1).seed == 2**63 - 1
    assert dataclasses.replace(config, n_envs=3).seed == config.seed  # a drawn seed is kept
    assert TRPOConfig(policy_kwargs={"hidden": ()}).policy_kwargs["hidden"] == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.gamma = 0.5


def test_trpo_keyword_defaults_are_the_config_defaults():
    signature = inspect.signature(TRPO.__init__).parameters
    defaults = TRPOConfig(seed=0)
    per_policy = set(RECURRENT_DEFAULTS)  # None in the signature: the policy's default
    for name, value in defaults.to_dict().items():
        if name not in ("seed", "policy_kwargs", *per_policy):  # None; POLICY_KWARGS is what None means
            assert signature[name].default == value, name
    assert all(signature[name].default is None for name in ("seed", "policy_kwargs", *per_policy))
    agent = TRPO("CartPole-v1", seed=0)
    assert agent.config == defaults
    agent.close()
    agent = TRPO("CartPole-v1", seed=0, policy="MlpGruPolicy", damping=0.2)  # an explicit value wins
    assert agent.config.trust_region.damping == 0.2 and agent.config.trust_region.max_kl == RECURRENT_DEFAULTS["max_kl"]
    assert agent.config.critic_batch_size == RECURRENT_DEFAULTS["critic_batch_size"]
    agent.close()


def test_log_dir_that_is_a_file_fails_at_construction(tmp_path, monkeypatch):
    path = tmp_path / "not-a-dir"
    path.write_text("x")
    monkeypatch.setattr(trpo_ext.trpo, "make_vec_env", lambda *a: pytest.fail("envs built before the check"))
    with pytest.raises(ValueError, match="log_dir .*not-a-dir.* exists and is not a directory"):
        TRPO("CartPole-v1", log_dir=path, seed=0)
    with pytest.raises(ValueError, match="log_dir must be a path or None"):
        TRPO("CartPole-v1", log_dir=3, seed=0)


def test_log_dir_is_created_at_the_first_update(tmp_path):
    log_dir = tmp_path / "new" / "run"
    agent = TRPO("CartPole-v1", n_envs=2, n_steps=16, critic_epochs=1, log_dir=log_dir, seed=0)
    assert not log_dir.exists()
    agent.learn(32, progress_bar=False)
    agent.close()
    assert (log_dir / "progress.csv").is_file()
    assert math.isfinite(agent.last_record["kl"])


def test_a_custom_critics_fit_takes_batch_size_by_the_configs_rule():
    # One rule for critic_batch_size: fit_value_module (a custom critic's fit, also called directly)
    # checks its batch_size with the config's check, so a numpy int passes and a bool fails in both.
    from trpo_ext.critic import fit_value_module

    net = torch.nn.Linear(3, 1)
    optimizer = torch.optim.Adam(net.parameters())
    assert math.isfinite(fit_value_module(net, optimizer, torch.randn(8, 3), torch.randn(8), 1, np.int64(4)))
    for bad in (0, True, 2.0):
        with pytest.raises(ValueError, match="critic_batch_size must be an int >= 1"):
            TRPOConfig(critic_batch_size=bad)
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            fit_value_module(net, optimizer, torch.randn(8, 3), torch.randn(8), 1, bad)


def test_the_bounds_that_keep_a_value_from_hanging_the_process():
    # The largest values accepted, and one past them: no loop of an update can be told to run for
    # centuries, no n_envs makes a bare MemoryError (config.py: MAX_ITERATIONS, MAX_ENVS).
    config = TRPOConfig.from_dict(dict(cg_iters=MAX_ITERATIONS, max_backtracks=MAX_ITERATIONS,
                                       critic_epochs=MAX_ITERATIONS, n_envs=MAX_ENVS))
    assert (config.trust_region.cg_iters, config.trust_region.max_backtracks, config.critic_epochs,
            config.n_envs) == (MAX_ITERATIONS, MAX_ITERATIONS, MAX_ITERATIONS, MAX_ENVS)
    for name in ("cg_iters", "max_backtracks", "critic_epochs"):
        with pytest.raises(ValueError, match=f"{name} must be an int >= [01] and <= {MAX_ITERATIONS}, got 10001"):
            TRPOConfig.from_dict({name: MAX_ITERATIONS + 1})
    # Data-parallel ranks seed their envs RANK_SEED_STRIDE apart: never shared below the cap.
    assert MAX_ENVS < trpo_ext.trpo.RANK_SEED_STRIDE
    # An update's batch: n_steps alone, then with n_envs (config.py: MAX_BATCH).
    assert TRPOConfig(n_steps=MAX_BATCH, n_envs=1).batch_size == MAX_BATCH
    with pytest.raises(ValueError, match=f"n_steps must be an int >= 1 and <= {MAX_BATCH}, got 1000000000"):
        TRPOConfig(n_steps=10**9)
    with pytest.raises(ValueError, match=rf"n_steps \* n_envs \(the transitions of one update\) must be <= "
                                         rf"{MAX_BATCH}, got 1048576 \* 32 = 33554432"):
        TRPOConfig(n_steps=2**20, n_envs=32)


def test_num_threads_is_bounded_by_the_machines_cores(monkeypatch):
    monkeypatch.setattr(trpo_ext.config.os, "cpu_count", lambda: 2)
    assert check_num_threads(np.int64(2 * THREADS_PER_CORE)) == 2 * THREADS_PER_CORE
    for bad in (0, 2 * THREADS_PER_CORE + 1, 10**9, 1e30, True, "4"):
        with pytest.raises(ValueError, match=f"num_threads must be an int >= 1 and <= {2 * THREADS_PER_CORE}, got"):
            check_num_threads(bad)
    monkeypatch.setattr(trpo_ext.config.os, "cpu_count", lambda: None)  # unknown: as one core
    assert check_num_threads(THREADS_PER_CORE) == THREADS_PER_CORE
