"""trpo_ext.sb3_names: every sb3-contrib TRPO argument translated or refused by name, the KL scale,
policy_kwargs, and the native TRPO's hint for sb3's call form. Runs without sb3-contrib (the
comparison with its signature is skipped then)."""
import inspect
import re
from pathlib import Path

import gymnasium as gym
import pytest
import torch.nn as nn

import trpo_ext
from trpo_ext import sb3_names
from trpo_ext.sb3_names import SB3_DEFAULTS, kl_scale, policy_kwargs, trpo_ext_kwargs

BOX3 = gym.spaces.Box(-1.0, 1.0, (3,))

# sb3-contrib argument, a value, and what trpo_ext gets for it with Box(3) actions (d = 3): {key: value},
# or the ValueError's pattern (a str). Every argument of SB3_DEFAULTS has a row.
ARGUMENTS = [
    ("learning_rate", 3e-4, {"critic_lr": 3e-4}),
    ("learning_rate", lambda progress: 1e-3, r"learning_rate=.*schedule is not supported"),
    ("n_steps", 64, {"n_steps": 64}),
    ("batch_size", 32, {"critic_batch_size": 32}),
    ("gamma", 0.9, {"gamma": 0.9}),
    ("cg_max_steps", 25, {"cg_iters": 25}),
    ("cg_damping", 0.01, {"damping": 0.03}),
    ("line_search_shrinking_factor", 0.5, {"backtrack_factor": 0.5}),
    ("line_search_max_iter", 4, {"max_backtracks": 4}),
    ("n_critic_updates", 20, {"critic_epochs": 20}),
    ("gae_lambda", 0.98, {"gae_lambda": 0.98}),
    ("use_sde", False, {}),
    ("use_sde", True, {"use_sde": True}),
    ("sde_sample_freq", 4, {}),  # sb3-contrib ignores it without gSDE, and so does the translation
    ("rollout_buffer_class", object, r"rollout_buffer_class=.*only None"),
    ("rollout_buffer_kwargs", {}, r"rollout_buffer_kwargs=\{\}.*only None"),
    ("normalize_advantage", False, {"normalize_advantage": False}),
    ("target_kl", 0.04, {"max_kl": 0.12}),
    ("sub_sampling_factor", 1, {"fvp_fraction": 1.0}),
    ("sub_sampling_factor", 4, r"sub_sampling_factor=4: .*not supported"),
    ("stats_window_size", 10, {"stats_window": 10}),
    ("tensorboard_log", "runs", None),  # the drop-in's own (sb3's logger): not translated
    ("policy_kwargs", dict(net_arch=[32, 32]), {"policy_kwargs": {"hidden": (32, 32), "activation": "tanh"}}),
    ("verbose", 1, None),
    ("seed", 7, {"seed": 7}),
    ("device", "cpu", {"device": "cpu"}),
]


def test_every_sb3_argument_has_a_row():
    assert {name for name, *_ in ARGUMENTS} == set(SB3_DEFAULTS)


@pytest.mark.parametrize("name, value, expected", ARGUMENTS, ids=[f"{n}={v!r:.20}" for n, v, _ in ARGUMENTS])
def test_argument(name, value, expected):
    if expected is None:
        assert name in sb3_names.FRONT_END
        return
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            trpo_ext_kwargs({name: value}, BOX3)
        return
    got, defaults = trpo_ext_kwargs({name: value}, BOX3), trpo_ext_kwargs({}, BOX3)
    assert {k: v for k, v in got.items() if v != defaults[k]} == {k: v for k, v in expected.items()
                                                                   if v != defaults[k]}
    assert all(got[k] == v for k, v in expected.items())


def test_defaults_translate_to_sb3_contribs_update():
    assert trpo_ext_kwargs({}, BOX3) == dict(
        n_steps=2048, critic_batch_size=128, gamma=0.99, gae_lambda=0.95, max_kl=0.03, damping=0.1 * 3, cg_iters=15,
        backtrack_factor=0.8, max_backtracks=10, critic_epochs=10, critic_lr=1e-3, normalize_advantage=True,
        stats_window=100, seed=None, device="auto", use_sde=False, sde_sample_freq=-1, fvp_fraction=1.0,
        policy_kwargs={"activation": "tanh"})


@pytest.mark.parametrize("freq, expected", [(4, 4), (1, 1), (-1, -1), (0, -1), (-5, -1)])
def test_gsde_and_its_sample_freq(freq, expected):
    """With use_sde the drop-in takes sb3's sde_sample_freq (any value <= 0: once per rollout)."""
    got = trpo_ext_kwargs({"use_sde": True, "sde_sample_freq": freq}, BOX3)
    assert (got["use_sde"], got["sde_sample_freq"]) == (True, expected)


def test_unknown_argument_is_a_type_error():
    with pytest.raises(TypeError, match="sb3_contrib.TRPO has no argument 'max_kl'"):
        trpo_ext_kwargs({"max_kl": 0.1}, BOX3)


def test_defaults_are_sb3_contribs():
    sb3_contrib = pytest.importorskip("sb3_contrib", reason="compares with sb3-contrib's signature (trpo_ext[sb3])")
    params = inspect.signature(sb3_contrib.TRPO.__init__).parameters
    theirs = {k: p.default for k, p in params.items() if k not in ("self", "policy", "env", "_init_setup_model")}
    assert list(theirs.items()) == list(SB3_DEFAULTS.items())


@pytest.mark.parametrize("space, d", [
    (BOX3, 3), (gym.spaces.Box(-1, 1, (2, 3)), 6), (gym.spaces.MultiBinary(4), 4), (gym.spaces.Discrete(5), 1),
    (gym.spaces.MultiDiscrete([2, 3]), 1)])
def test_kl_scale(space, d):
    assert kl_scale(space) == d
    got = trpo_ext_kwargs({"target_kl": 0.02, "cg_damping": 0.5}, space)
    assert (got["max_kl"], got["damping"]) == (pytest.approx(0.02 * d), pytest.approx(0.5 * d))
    back = sb3_names.sb3_kwargs(got, d)
    assert (back["target_kl"], back["cg_damping"]) == (pytest.approx(0.02), pytest.approx(0.5))


POLICY_KWARGS = [
    (dict(net_arch=[256, 256], activation_fn=nn.ReLU, log_std_init=-1.0),
     {"hidden": (256, 256), "activation": "relu", "log_std_init": -1.0}),
    (dict(net_arch=dict(pi=[8], vf=[8]), activation_fn=nn.ELU), {"hidden": (8,), "activation": "elu"}),
    (dict(ortho_init=True, squash_output=False, normalize_images=True), {"activation": "tanh"}),
    (dict(net_arch=dict(pi=[8], vf=[16])), r"policy_kwargs\['net_arch'\]=.*same hidden layers"),
    (dict(activation_fn=nn.GELU), r"policy_kwargs\['activation_fn'\]=.*expected one of nn.Tanh"),
    (dict(ortho_init=False), r"policy_kwargs\['ortho_init'\]=False: .*only do sb3's default here \(True\)"),
    (dict(use_expln=True, full_std=False, log_std_init=-2.0),
     {"activation": "tanh", "use_expln": True, "full_std": False, "log_std_init": -2.0}),
    (dict(squash_output=True), r"policy_kwargs\['squash_output'\]=True: trpo_ext's gSDE does not squash actions"),
    (dict(use_sde=True), r"policy_kwargs\['use_sde'\]=True: gSDE is TRPO's own use_sde argument"),
    (dict(features_extractor_class=nn.Flatten), r"policy_kwargs\['features_extractor_class'\]=.*do not take it"),
    (dict(optimizer_kwargs=dict(eps=1e-5)), r"policy_kwargs\['optimizer_kwargs'\]=.*do not take it"),
]


@pytest.mark.parametrize("given, expected", POLICY_KWARGS, ids=[str(sorted(g)) for g, _ in POLICY_KWARGS])
def test_policy_kwargs(given, expected):
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            policy_kwargs(given)
    else:
        assert policy_kwargs(given) == expected


@pytest.mark.parametrize("args, kwargs, match", [
    (("MlpPolicy", "CartPole-v1"), {}, r"TRPO\('MlpPolicy', 'CartPole-v1'\) is sb3-contrib's TRPO\(policy, env"),
    (("MlpPolicy",), {}, "use `from trpo_ext.sb3 import TRPO`"),
    (("CartPole-v1",), {"target_kl": 0.1}, r"target_kl -> max_kl \(times the KL scale d\)"),
    (("CartPole-v1",), {"verbose": 1}, r"TRPO\(\.\.\., verbose=\.\.\.\) is sb3-contrib's"),
])
def test_native_trpo_hints_at_the_drop_in(args, kwargs, match):
    with pytest.raises(TypeError, match=match):
        trpo_ext.TRPO(*args, **kwargs)


def test_docs_table_has_every_argument():
    """docs/sb3.md's table "sb3-contrib argument -> trpo_ext argument" names every argument once."""
    text = (Path(__file__).parents[1] / "docs" / "sb3.md").read_text()
    rows = re.findall(r"^\| `(\w+)`", text, flags=re.M)
    assert sorted(rows) == sorted(set(rows)) and set(SB3_DEFAULTS) <= set(rows)
