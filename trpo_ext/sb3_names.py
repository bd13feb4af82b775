"""sb3-contrib's TRPO in trpo_ext's terms: the one translation of its arguments (names, defaults and
meanings) onto `trpo_ext.TRPO`'s, used by `trpo_ext.sb3.TRPO` (the drop-in), `trpo_ext.presets.zoo`
and the bench scripts. docs/sb3.md has the table in words.

The KL scale. sb3-contrib takes `kl_divergence(new, old).mean()`: for Box actions its diagonal
Gaussian's KL is a (batch, action_dim) tensor, for MultiBinary(k) its Bernoulli KL a (batch, k) one, so
its Fisher matrix and its KL limit are the summed KL's (the TRPO paper's, trpo_ext's) divided by d.
Its update with (target_kl δ, cg_damping λ) is exactly trpo_ext's with (max_kl d·δ, damping d·λ)
(bench/sb3_step_check.py checks the two steps on one batch). Discrete / MultiDiscrete: d = 1 (their KL
is one number per row in both libraries).

No stable-baselines3 import here: the translation works without it.
"""
from __future__ import annotations

import math

import gymnasium as gym
import torch.nn as nn

from .policies import ACTIVATIONS

SB3_DEFAULTS = dict(
    learning_rate=1e-3, n_steps=2048, batch_size=128, gamma=0.99, cg_max_steps=15, cg_damping=0.1,
    line_search_shrinking_factor=0.8, line_search_max_iter=10, n_critic_updates=10, gae_lambda=0.95, use_sde=False,
    sde_sample_freq=-1, rollout_buffer_class=None, rollout_buffer_kwargs=None, normalize_advantage=True,
    target_kl=0.01, sub_sampling_factor=1, stats_window_size=100, tensorboard_log=None, policy_kwargs=None,
    verbose=0, seed=None, device="auto")
"""sb3_contrib.TRPO's keyword arguments after (policy, env) and their defaults, in its order
(sb3-contrib 2.x; tests/test_sb3.py compares them with the installed one's signature)."""

RENAMED = dict(n_steps="n_steps", batch_size="critic_batch_size", gamma="gamma", gae_lambda="gae_lambda",
               target_kl="max_kl", cg_damping="damping", cg_max_steps="cg_iters",
               line_search_shrinking_factor="backtrack_factor", line_search_max_iter="max_backtracks",
               n_critic_updates="critic_epochs", learning_rate="critic_lr", normalize_advantage="normalize_advantage",
               stats_window_size="stats_window", seed="seed", device="device", use_sde="use_sde",
               sde_sample_freq="sde_sample_freq")
"""sb3-contrib argument -> the trpo_ext argument of the same meaning (KL_SCALED ones times d)."""

KL_SCALED = ("target_kl", "cg_damping")
"""The sb3-contrib arguments in units of the per-dimension KL: times `kl_scale(action_space)` in trpo_ext."""

FRONT_END = ("policy_kwargs", "tensorboard_log", "verbose")
"""Taken by the drop-in itself (policy_kwargs through `policy_kwargs` below), not by `trpo_ext_kwargs`."""

# The sb3 policy_kwargs trpo_ext's built-in networks honour, with the values that they honour only as
# sb3's defaults (anything else is refused by name).
_FIXED_POLICY_KWARGS = dict(ortho_init=True, use_sde=False, squash_output=False, normalize_images=True,
                            share_features_extractor=True)
_WHY_FIXED = dict(squash_output="trpo_ext's gSDE does not squash actions with tanh (actions are clipped to the "
                  "Box's bounds, as sb3's are without squash_output)",
                  use_sde="gSDE is TRPO's own use_sde argument (sb3 sets this key from it)")


def kl_scale(action_space: gym.Space) -> int:
    """d: how many times larger sb3-contrib's trust region is than its target_kl says (module doc)."""
    if isinstance(action_space, (gym.spaces.Box, gym.spaces.MultiBinary)):
        return int(math.prod(action_space.shape))
    return 1


def env_action_space(env_id) -> gym.Space:
    """The action space of a registered env (an id or an EnvSpec; the env is made and closed)."""
    env = gym.make(env_id)
    try:
        return env.action_space
    finally:
        env.close()


def env_kl_scale(env_id) -> int:
    """`kl_scale` of a registered env's action space."""
    return kl_scale(env_action_space(env_id))


def _refuse(name: str, value, why: str):
    raise ValueError(f"{name}={value!r}: {why}")


def trpo_ext_kwargs(sb3_kwargs: dict, action_space: gym.Space) -> dict:
    """trpo_ext.TRPO's keyword arguments that do what sb3_contrib.TRPO's `sb3_kwargs` do (missing
    ones: sb3-contrib's defaults) for an env with `action_space`. Every argument of SB3_DEFAULTS
    except FRONT_END's is either translated or, where trpo_ext cannot honour its value, refused with a
    ValueError naming it; an unknown name is a TypeError, as Python's own."""
    unknown = [k for k in sb3_kwargs if k not in SB3_DEFAULTS]
    if unknown:
        raise TypeError(f"sb3_contrib.TRPO has no argument {unknown[0]!r}; its arguments: {', '.join(SB3_DEFAULTS)}")
    args = {**SB3_DEFAULTS, **sb3_kwargs}
    if callable(args["learning_rate"]):
        _refuse("learning_rate", args["learning_rate"], "trpo_ext's critic learning rate is a constant (critic_lr); "
                "a schedule is not supported, give a float")
    for name in ("rollout_buffer_class", "rollout_buffer_kwargs"):
        if args[name] is not None:
            _refuse(name, args[name], "trpo_ext collects rollouts itself; only None is accepted")
    if args["sub_sampling_factor"] != 1:
        _refuse("sub_sampling_factor", args["sub_sampling_factor"],
                "sb3-contrib's sub-sampling (every k-th transition for the whole policy step) is not supported; "
                "use 1, or trpo_ext's own fvp_fraction (a random subset for the Fisher products only)")
    d = kl_scale(action_space)
    out = {ours: args[theirs] * d if theirs in KL_SCALED else args[theirs] for theirs, ours in RENAMED.items()}
    if not args["use_sde"]:
        out["sde_sample_freq"] = -1  # ignored without gSDE, as in sb3-contrib
    elif isinstance(args["sde_sample_freq"], int) and args["sde_sample_freq"] <= 0:
        out["sde_sample_freq"] = -1  # sb3: any value <= 0 draws the noise once per rollout
    out["fvp_fraction"] = 1.0  # sub_sampling_factor 1
    out["policy_kwargs"] = policy_kwargs(args["policy_kwargs"])
    return out


def sb3_kwargs(trpo_kwargs: dict, scale: int = 1) -> dict:
    """The inverse, for the settings both libraries have: sb3_contrib.TRPO's keyword arguments (in
    RENAMED's order) for trpo_ext settings `trpo_kwargs`, the KL_SCALED ones divided by `scale` (d:
    `kl_scale(action_space)`; 1: the names alone); keys without an sb3 name are left out."""
    return {theirs: trpo_kwargs[ours] / scale if theirs in KL_SCALED else trpo_kwargs[ours]
            for theirs, ours in RENAMED.items() if ours in trpo_kwargs}


def policy_kwargs(sb3_policy_kwargs: dict | None) -> dict:
    """trpo_ext's policy_kwargs (hidden, activation, log_std_init, full_std, use_expln) for sb3's
    (net_arch, activation_fn, log_std_init, full_std, use_expln, and its other keys at their
    defaults); a ValueError names what cannot be honoured."""
    given = dict(sb3_policy_kwargs or {})
    out = {}
    net_arch = given.pop("net_arch", None)
    if isinstance(net_arch, dict):
        pi, vf = net_arch.get("pi", []), net_arch.get("vf", [])
        if list(pi) != list(vf) or set(net_arch) - {"pi", "vf"}:
            _refuse("policy_kwargs['net_arch']", net_arch, "trpo_ext's policy and critic have the same hidden layers; "
                    "give a list, or dict(pi=L, vf=L) with one L")
        net_arch = pi
    if net_arch is not None:
        out["hidden"] = tuple(net_arch)
    activation = given.pop("activation_fn", nn.Tanh)
    names = {cls: name for name, cls in ACTIVATIONS.items()}
    if activation not in names:
        _refuse("policy_kwargs['activation_fn']", activation, f"expected one of "
                f"{', '.join('nn.' + c.__name__ for c in names)}")
    out["activation"] = names[activation]
    for key in ("log_std_init", "full_std", "use_expln"):
        if key in given:
            out[key] = given.pop(key)
    for key, value in given.items():
        if key not in _FIXED_POLICY_KWARGS:
            _refuse(f"policy_kwargs['{key}']", value, "trpo_ext's built-in networks do not take it (they take "
                    "net_arch, activation_fn, log_std_init, full_std, use_expln, and sb3's defaults of "
                    f"{', '.join(_FIXED_POLICY_KWARGS)}); a network of your own: trpo_ext.TRPO(env, policy=module)")
        if value != _FIXED_POLICY_KWARGS[key]:
            why = _WHY_FIXED.get(key, "trpo_ext's built-in networks only do sb3's default here")
            _refuse(f"policy_kwargs['{key}']", value, f"{why} ({_FIXED_POLICY_KWARGS[key]!r})")
    return out


POLICY_NAMES = ("MlpPolicy", "CnnPolicy", "MultiInputPolicy")
"""sb3's policy aliases, which trpo_ext's built-in networks take by the same names."""


def check_native_call(args: tuple, kwargs: dict) -> None:
    """The hint for sb3's argument order and names given to the native `trpo_ext.TRPO(env, ...)`: a
    TypeError saying what to use, where Python's would be bare or gymnasium's would not say why."""
    sb3_only = [k for k in kwargs if k in SB3_DEFAULTS and k not in RENAMED.values() and k != "policy_kwargs"]
    if len(args) > 1 or (args and isinstance(args[0], str) and args[0] in POLICY_NAMES):
        said = f"TRPO({', '.join(repr(a)[:40] for a in args)})"
    elif sb3_only:
        said = f"TRPO(..., {sb3_only[0]}=...)"
    else:
        return
    renamed = [f"{k} -> {RENAMED[k]}" + (" (times the KL scale d)" if k in KL_SCALED else "")
               for k in sb3_only if k in RENAMED]
    raise TypeError(f"{said} is sb3-contrib's TRPO(policy, env, ...): use `from trpo_ext.sb3 import TRPO` for its "
                    "signature, names and meanings, or trpo_ext.TRPO(env, policy=..., ...) with trpo_ext's names"
                    + (f" ({'; '.join(renamed)})" if renamed else "") + "; docs/sb3.md has the table")


class SB3Hint(type):
    """trpo_ext.TRPO's metaclass: a call in sb3-contrib's form gets `check_native_call`'s hint."""

    def __call__(cls, *args, **kwargs):
        check_native_call(args, kwargs)
        return super().__call__(*args, **kwargs)
