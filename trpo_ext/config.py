"""Hyperparameters: validation written once, as two frozen dataclasses.

`TrustRegionConfig` holds the settings of one policy step, `TRPOConfig` every hyperparameter of
the agent (it builds a `TrustRegionConfig` from its trust-region fields, so those are checked in
one place only).

The rule for refused values: every check names the one parameter it refuses and says what was
expected, and raises **ValueError** whatever is wrong with the value, its type included (a
hyperparameter's type is part of its valid range: `normalize_obs="False"` is refused exactly like
`gamma=1.5`). Numbers must be real numbers (bools are refused) and finite; ints may be numpy ints
and are stored as Python ints, floats as Python floats, so a config holds plain Python data.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from .policies import ACTIVATIONS


def check_int(name: str, value, low: int, high: int | None = None) -> int:
    """`value` as an int >= low (and <= high when given); ValueError naming `name` otherwise
    (bools are refused)."""
    expected = f">= {low}" if high is None else f">= {low} and <= {high}"
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low \
            or (high is not None and value > high):
        raise ValueError(f"{name} must be an int {expected}, got {value!r}")
    return int(value)


def check_float(name: str, value, low: float = -math.inf, high: float = math.inf, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the interval [low, high] (open at either end when asked);
    ValueError naming `name` otherwise (bools, NaN and infinities are refused)."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    value = float(value)
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not math.isfinite(value) or not inside:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return value


MAX_ITERATIONS = 10_000
"""The most iterations of a loop inside one update: `cg_iters` (CG products), `max_backtracks`
(line-search trials) and `critic_epochs` (passes over the batch). A thousand times the defaults:
every value past it is a typo or a hostile file, and would hang `learn` (2**62 CG iterations run
for centuries). The fused CG op refuses the same bound on its own (csrc/fisher.cpp, kMaxCgIters)."""

MAX_ENVS = 65_536
"""The most env copies one agent steps (`n_envs`, or a vector env's `num_envs`). GPU-batched
simulators run up to tens of thousands of envs in one vector env; 2**16 leaves room for them,
keeps the per-env state (an observation, episode statistics, a return) a few MB, and stays far
below `trpo.RANK_SEED_STRIDE`, so data-parallel ranks never share an env seed. Past it
`n_envs=10**12` would be a bare MemoryError (or minutes of building envs) instead of this error."""

MAX_BATCH = 2**24
"""The most transitions one update holds (`n_steps * n_envs`, per rank): 16.7 million, 256 times
the largest batch in rl-baselines3-zoo's TRPO presets. A rollout keeps every observation of the
batch in memory, so past it a typo (`n_steps=10**9`) would be a bare MemoryError minutes into
`learn` instead of this error at construction."""

THREADS_PER_CORE = 4
"""`num_threads` may be at most this many times the machine's cores (`os.cpu_count()`): more
threads than that only oversubscribe the cores, and torch would try to start a billion."""


def check_num_threads(value, name: str = "num_threads") -> int:
    """`value` as a thread count in [1, cores * THREADS_PER_CORE]; ValueError naming `name` otherwise."""
    return check_int(name, value, 1, (os.cpu_count() or 1) * THREADS_PER_CORE)


def check_bool(name: str, value) -> bool:
    """`value` as a bool; ValueError naming `name` unless it is a bool (or numpy bool): strings,
    0 / 1 and None are refused."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name: str, value, choices) -> str:
    """`value` if it is one of the strings `choices`; ValueError naming `name` otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {sorted(choices)}, got {value!r}")
    return value


@dataclass(frozen=True)
class TrustRegionConfig:
    """The settings of one TRPO policy step (`trpo_ext.trust_region_step`)."""

    max_kl: float = 0.01
    """Trust-region radius δ: a step is accepted only if the mean KL(old‖new) over the batch is ≤ δ
    (a recurrent policy's default: `RECURRENT_DEFAULTS`)."""
    damping: float = 0.1
    """λ in the CG system (F + λI) x = g (a recurrent policy's default: `RECURRENT_DEFAULTS`)."""
    cg_iters: int = 10
    """Maximum conjugate-gradient iterations (Fisher-vector products) per step; at most MAX_ITERATIONS."""
    cg_rtol: float = 1e-10
    """CG stops early once ||r|| ≤ cg_rtol·||g||."""
    backtrack_factor: float = 0.8
    """The line search shrinks the step by this factor after each rejected trial."""
    max_backtracks: int = 10
    """Step sizes tried before the step is abandoned and θ restored; at most MAX_ITERATIONS."""

    def __post_init__(self):
        for f in dataclasses.fields(self):  # numpy scalars become plain Python numbers
            object.__setattr__(self, f.name, check_trust_region(f.name, getattr(self, f.name)))


TRUST_REGION_RANGES = {
    # Beyond a few nats the quadratic model behind the step means nothing (and a huge δ only makes
    # every trial overflow): the bound turns a typo into an error instead of a no-op.
    "max_kl": lambda name, v: check_float(name, v, 0.0, 10.0, low_open=True),
    "damping": lambda name, v: check_float(name, v, 0.0),
    "cg_iters": lambda name, v: check_int(name, v, 1, MAX_ITERATIONS),
    "cg_rtol": lambda name, v: check_float(name, v, 0.0, 1.0, high_open=True),  # >= 1: no iteration
    "backtrack_factor": lambda name, v: check_float(name, v, 0.0, 1.0, low_open=True, high_open=True),
    "max_backtracks": lambda name, v: check_int(name, v, 1, MAX_ITERATIONS),
}
"""The valid range of each trust-region setting, checked here and nowhere else: `TrustRegionConfig`,
`trpo_ext.fvp` (damping) and `trpo_ext.cg_solve` (damping, cg_iters as `iters`, cg_rtol as `rtol`)."""


def check_trust_region(field: str, value, name: str | None = None):
    """`value` checked against the range of the trust-region setting `field` (TRUST_REGION_RANGES);
    the error names `name` (the caller's argument; `field` by default)."""
    return TRUST_REGION_RANGES[field](name or field, value)


CRITIC_PARALLEL = ("gather", "reduce")
"""`TRPOConfig.critic_parallel`'s values (`trpo_ext.critic.fit_value_network`'s `parallel`)."""

UPDATE_PARALLEL = ("auto", "split", "data")
"""`TRPOConfig.update_parallel`'s values."""

VECTORIZATIONS = ("sync", "async", "envpool")
"""`TRPOConfig.vectorization`'s values (`trpo_ext.envs.make_vec_env`)."""

POLICY_KWARGS = {"hidden": (64, 64), "activation": "tanh", "log_std_init": 0.0, "full_std": True, "use_expln": False,
                 "lstm_hidden_size": 256, "n_lstm_layers": 1, "shared_lstm": False, "enable_critic_lstm": True}
"""The defaults of `TRPOConfig.policy_kwargs`; a user's dict overrides some of them."""


def _check_policy_kwargs(value) -> dict:
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise ValueError(f"policy_kwargs must be a dict (keys {sorted(POLICY_KWARGS)}) or None, got {value!r}")
    unknown = set(value) - set(POLICY_KWARGS)
    if unknown:
        raise ValueError(f"policy_kwargs: unknown keys {sorted(unknown, key=repr)}; expected {sorted(POLICY_KWARGS)}")
    kwargs = {**POLICY_KWARGS, **value}
    hidden = kwargs["hidden"]
    if isinstance(hidden, (str, bytes)) or not isinstance(hidden, Sequence) or not all(
            not isinstance(h, bool) and isinstance(h, (int, np.integer)) and h >= 1 for h in hidden):
        raise ValueError(f"policy_kwargs['hidden'] must be a sequence of positive ints, got {hidden!r}")
    return {"hidden": tuple(int(h) for h in hidden),
            "activation": check_choice("policy_kwargs['activation']", kwargs["activation"], ACTIVATIONS),
            "log_std_init": check_float("policy_kwargs['log_std_init']", kwargs["log_std_init"], -20.0, 2.0),
            "full_std": check_bool("policy_kwargs['full_std']", kwargs["full_std"]),
            "use_expln": check_bool("policy_kwargs['use_expln']", kwargs["use_expln"]),
            "lstm_hidden_size": check_int("policy_kwargs['lstm_hidden_size']", kwargs["lstm_hidden_size"], 1, 65536),
            "n_lstm_layers": check_int("policy_kwargs['n_lstm_layers']", kwargs["n_lstm_layers"], 1, 64),
            "shared_lstm": _check_shared_lstm(kwargs["shared_lstm"]),
            "enable_critic_lstm": check_bool("policy_kwargs['enable_critic_lstm']", kwargs["enable_critic_lstm"])}


def _check_shared_lstm(value) -> bool:
    if check_bool("policy_kwargs['shared_lstm']", value):
        raise ValueError("policy_kwargs['shared_lstm']=True is not supported: TRPO moves the policy by a trust-region "
                         "step and the critic by regression, and a shared LSTM would be moved by both (the step's KL "
                         "bound would not hold); the critic gets its own LSTM (enable_critic_lstm=True, the default) "
                         "or none (False)")
    return False


RECURRENT_DEFAULTS = {"max_kl": 0.02, "damping": 0.001, "critic_batch_size": 256}
"""The defaults that differ for a recurrent policy (a name of `trpo_ext.recurrent.RECURRENT` or a
`RecurrentPolicy` module): with the feed-forward ones (δ = 0.01, λ = 0.1) the LSTM learned nothing
about a cue 9 steps back on 3 of 3 seeds; λ = 0.1 swamps the small curvature of the recurrent
weights that carry the cue. δ = 0.02 solved CueRecall on 10 of 10 seeds at RecurrentPPO's budget,
where 0.05 solved 6 and larger steps fewer (a step that large can lock the recall onto a wrong cue).
The critic keeps its ten epochs (three or five solved CueRecall on fewer seeds), in minibatches of
256 rows (bench/results/recurrent_learning.md)."""


def recurrent_layout(config: TRPOConfig, layout: str | None, recurrent: bool) -> str | None:
    """The update layout of a recurrent policy (`layout` as it is for any other): "data" where "auto"
    gave "split" (the split update gathers rows, not sequences). ValueError for what its update does
    not do: the Fisher on a fraction of the states (its products run through whole sequences), and
    "split" asked for."""
    if not recurrent:
        return layout
    if config.fvp_fraction < 1.0:
        raise ValueError(f"fvp_fraction={config.fvp_fraction} subsamples states for the Fisher products; a recurrent "
                         "policy's products run through whole sequences: use fvp_fraction=1.0")
    if layout == "split" and config.update_parallel == "split":
        raise ValueError("update_parallel='split' gathers the batch's rows to one rank; a recurrent policy's update "
                         "runs on whole sequences: use update_parallel='data' (or 'auto')")
    return "data" if layout == "split" else layout


def policy_defaults(arguments: dict, recurrent: bool) -> dict:
    """RECURRENT_DEFAULTS' keys of TRPO's `arguments`, each None replaced by the policy's default."""
    return {key: value if arguments[key] is None else arguments[key]
            for key, value in default_settings(recurrent).items()}


def default_settings(recurrent: bool) -> dict:
    """The defaults of RECURRENT_DEFAULTS' keys: a recurrent policy's, or TRPOConfig's."""
    if recurrent:
        return dict(RECURRENT_DEFAULTS)
    config = TRPOConfig(seed=0)
    return {key: getattr(config.trust_region, key, getattr(config, key, None)) for key in RECURRENT_DEFAULTS}


def _check_sde_sample_freq(value) -> int:
    value = check_int("sde_sample_freq", value, -1, MAX_BATCH)
    if value == 0:
        raise ValueError("sde_sample_freq must be -1 (a new noise matrix once per rollout) or an int >= 1 (every that "
                         "many steps), got 0")
    return value


@dataclass(frozen=True)
class TRPOConfig:
    """Every hyperparameter of the `TRPO` agent, checked once at construction.

    The trust-region settings are one `TrustRegionConfig` (which checks them). `to_dict()` gives
    TRPO's flat keyword form as plain Python data (what a checkpoint stores); `from_dict` reads it.
    """

    n_envs: int = 8
    """Environment copies stepped together as one vector env (a vector env's own `num_envs` wins);
    at most MAX_ENVS."""
    n_steps: int = 128
    """Steps per env per rollout; one policy update uses n_steps * n_envs transitions."""
    gamma: float = 0.99
    """Discount factor, in [0, 1]."""
    gae_lambda: float = 0.95
    """GAE λ in [0, 1] (bias/variance trade-off of the advantage estimate)."""
    trust_region: TrustRegionConfig = field(default_factory=TrustRegionConfig)
    """The policy step's settings (max_kl, damping, cg_iters, cg_rtol, backtrack_factor,
    max_backtracks), documented and checked in `TrustRegionConfig`; TRPO's keywords of those names."""
    fvp_fraction: float = 1.0
    """Fraction in (0, 1] of the batch (a random subset) used for the Fisher-vector products only."""
    normalize_advantage: bool = True
    """Standardize advantages over the batch."""
    normalize_obs: bool = False
    """Running mean/std observation normalization (saved with the model)."""
    obs_clip: float = 10.0
    """Normalized observations are clipped to [-obs_clip, obs_clip]; > 0."""
    normalize_reward: bool = False
    """Scale rewards by the running std of the discounted return and clip them (sb3 VecNormalize's
    reward normalization, `trpo_ext.normalization.RewardScaler`; saved with the model). Episode returns in
    the logs stay raw."""
    reward_clip: float = 10.0
    """Scaled rewards are clipped to [-reward_clip, reward_clip]; > 0."""
    critic_lr: float = 1e-3
    """Adam learning rate of the value network; > 0."""
    critic_epochs: int = 10
    """Passes over the batch per update for the value network (0 leaves it untrained); at most
    MAX_ITERATIONS."""
    critic_batch_size: int = 128
    """Minibatch size of the value-network regression (a recurrent policy's default: `RECURRENT_DEFAULTS`)."""
    critic_parallel: str = "gather"
    """Data-parallel with the "data" update layout (`update_parallel`; the split one fits the
    critic on one rank): "gather" (every rank fits the critic on all ranks' rows; fewest
    collectives, best on a few ranks) or "reduce" (each rank fits its own rows, all-reducing every
    minibatch's gradient; scales to many ranks). docs/distributed.md, "Cost model"."""
    update_parallel: str = "auto"
    """Data-parallel only: how the ranks share an update's two computations after their rollouts.
    "split" (2 ranks): the ranks' batches are gathered, then rank 0 takes the policy step and rank 1
    fits the critic, each on the whole batch and at the same time, and each sends its result to the
    other (the batch gathered in 2 collectives, the results shared in 1); "data": both ranks take part in both (the policy
    step's Fisher products reduced inside the fused solve, the critic by `critic_parallel`); "auto"
    (the default): "split" at world size 2, "data" at any other. docs/distributed.md, "Cost model"."""
    policy_kwargs: dict | None = None
    """Dict with `hidden` (layer widths, also used by the value network), `activation` (a key of
    `trpo_ext.policies.ACTIVATIONS`), `log_std_init` (Gaussian policies, in [-20, 2]; with gSDE the
    log-std of the noise matrix's entries), and gSDE's `full_std` (one σ per (feature, action) rather
    than per feature) and `use_expln` (sb3's expln instead of exp for σ); for the recurrent
    "MlpLstmPolicy" and the other names of `trpo_ext.recurrent.RECURRENT`, sb3-contrib RecurrentPPO's
    `lstm_hidden_size`, `n_lstm_layers` and `enable_critic_lstm` (the critic's own LSTM; False: a
    feed-forward critic), and `shared_lstm` (False only); missing keys take `POLICY_KWARGS`' values,
    and the field always holds all of them."""
    use_sde: bool = False
    """Generalized state-dependent exploration (gSDE, stable-baselines3's): the exploration noise is
    the policy's last hidden features times a random matrix (`trpo_ext.sde`); Box actions and the
    built-in "MlpPolicy" only."""
    sde_sample_freq: int = -1
    """With use_sde: draw a new noise matrix every this many rollout steps; -1: once per rollout, at its
    start (sb3's meaning; 0 is refused)."""
    vectorization: str = "sync"
    """"sync" (one process; `envs.LeanSyncVectorEnv`, which skips gymnasium's per-step info merging),
    "async" (gymnasium's AsyncVectorEnv, one subprocess per env) or "envpool" (EnvPool's C++ thread
    pool, `envpool_env.EnvPoolVectorEnv`; an optional extra, docs/guide.md "EnvPool")."""
    stats_window: int = 100
    """Episodes averaged for the reported episode return and length."""
    seed: int | None = None
    """Seeds network initialisation, action sampling, minibatch order and env resets; an int in
    [0, 2**63 - 1]. None draws one, and the field then holds the drawn seed."""

    def __post_init__(self):
        seed = self.seed
        if seed is None:
            seed = int(np.random.SeedSequence().generate_state(1)[0] >> 1)
        if not isinstance(self.trust_region, TrustRegionConfig):
            raise ValueError(f"trust_region must be a TrustRegionConfig, got {self.trust_region!r}")
        checked = {
            "n_envs": check_int("n_envs", self.n_envs, 1, MAX_ENVS),
            "n_steps": check_int("n_steps", self.n_steps, 1, MAX_BATCH),
            "gamma": check_float("gamma", self.gamma, 0.0, 1.0),
            "gae_lambda": check_float("gae_lambda", self.gae_lambda, 0.0, 1.0),
            "fvp_fraction": check_float("fvp_fraction", self.fvp_fraction, 0.0, 1.0, low_open=True),
            "normalize_advantage": check_bool("normalize_advantage", self.normalize_advantage),
            "normalize_obs": check_bool("normalize_obs", self.normalize_obs),
            "obs_clip": check_float("obs_clip", self.obs_clip, 0.0, low_open=True),
            "normalize_reward": check_bool("normalize_reward", self.normalize_reward),
            "reward_clip": check_float("reward_clip", self.reward_clip, 0.0, low_open=True),
            "critic_lr": check_float("critic_lr", self.critic_lr, 0.0, 1.0, low_open=True),
            "critic_epochs": check_int("critic_epochs", self.critic_epochs, 0, MAX_ITERATIONS),
            "critic_batch_size": check_int("critic_batch_size", self.critic_batch_size, 1),
            "critic_parallel": check_choice("critic_parallel", self.critic_parallel, CRITIC_PARALLEL),
            "update_parallel": check_choice("update_parallel", self.update_parallel, UPDATE_PARALLEL),
            "policy_kwargs": _check_policy_kwargs(self.policy_kwargs),
            "use_sde": check_bool("use_sde", self.use_sde),
            "sde_sample_freq": _check_sde_sample_freq(self.sde_sample_freq),
            "vectorization": check_choice("vectorization", self.vectorization, VECTORIZATIONS),
            "stats_window": check_int("stats_window", self.stats_window, 1),
            "seed": check_int("seed", seed, 0, 2**63 - 1),
        }
        if checked["n_steps"] * checked["n_envs"] > MAX_BATCH:
            raise ValueError(f"n_steps * n_envs (the transitions of one update) must be <= {MAX_BATCH}, got "
                             f"{checked['n_steps']} * {checked['n_envs']} = {checked['n_steps'] * checked['n_envs']}")
        for name, value in checked.items():  # numpy scalars become plain Python values
            object.__setattr__(self, name, value)

    def update_layout(self, world_size: int) -> str | None:
        """How an update runs at `world_size` ranks: None (one process), "split" or "data"
        (`update_parallel`, "auto" resolved); ValueError for "split" at more than 2 ranks."""
        if world_size == 1:
            return None
        if self.update_parallel == "split" and world_size != 2:
            raise ValueError(f"update_parallel='split' runs on exactly 2 ranks (one takes the policy step, the other "
                             f"fits the critic); this job has {world_size}: use 'data' or 'auto'")
        return "split" if self.update_parallel == "split" or (self.update_parallel == "auto" and world_size == 2) \
            else "data"

    @property
    def sde(self) -> dict | None:
        """gSDE's settings for `policies.sde_policy` (full_std, use_expln, sample_freq); None without use_sde."""
        if not self.use_sde:
            return None
        return dict(full_std=self.policy_kwargs["full_std"], use_expln=self.policy_kwargs["use_expln"],
                    sample_freq=self.sde_sample_freq)

    @property
    def batch_size(self) -> int:
        """Transitions per update: n_steps * n_envs."""
        return self.n_steps * self.n_envs

    @classmethod
    def from_dict(cls, hyperparameters: dict) -> "TRPOConfig":
        """The config from TRPO's flat keyword form (what `to_dict` returns): the trust-region
        settings by their own names; missing ones take their defaults."""
        flat = dict(hyperparameters)
        trust_region = TrustRegionConfig(**{name: flat.pop(name) for name in _TRUST_REGION_FIELDS if name in flat})
        return cls(**flat, trust_region=trust_region)

    def to_dict(self) -> dict:
        """TRPO's keyword arguments for this config, as plain Python data (what a checkpoint stores;
        loadable with `torch.load(weights_only=True)`): the trust-region settings flattened in."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, TrustRegionConfig):
                out.update(dataclasses.asdict(value))
            else:
                out[f.name] = copy.deepcopy(value)
        return out


_TRUST_REGION_FIELDS = tuple(f.name for f in dataclasses.fields(TrustRegionConfig))
HYPERPARAMETERS = tuple(TRPOConfig(seed=0).to_dict())
"""TRPO's hyperparameter keywords: TRPOConfig's fields, the trust-region settings flattened in."""
