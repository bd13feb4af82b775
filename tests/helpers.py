"""Shared test helpers: the device list, tolerances, relative error, and policies, masks and
batches for every action family, and the comparison of two training runs."""
import csv

import gymnasium as gym
import torch

import trpo_ext

# CPU always; CUDA whenever a GPU is visible and the extension was built with its CUDA kernels.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and trpo_ext.cuda_built() else [])

# Relative error bounds against the double-backprop reference (docs/design.md, "Tolerances").
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}

# Every action space the families serve, by the name make_policy takes (action_space below).
KINDS = ["categorical", "multicategorical", "bernoulli", "gaussian"]
# Every action case the public functions are held to: a kind, and a masked one for each maskable kind.
ACTION_CASES = ["categorical", "categorical-masked", "multicategorical", "multicategorical-masked", "bernoulli",
                "gaussian"]
PATHS = ["auto", "fused", "generic"]
# The kinds whose joint actions can be enumerated (reference.enumerated_fisher; action frequencies).
DISCRETE_KINDS = ["categorical", "multicategorical", "bernoulli"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


def action_space(kind: str, act_dim: int = 3) -> gym.Space:
    """The action space of a kind: Discrete(act_dim), MultiDiscrete of act_dim sub-actions
    ([3, 2, 4] for 3), MultiBinary(act_dim) or Box(-1, 1, (act_dim,))."""
    if kind == "categorical":
        return gym.spaces.Discrete(act_dim)
    if kind == "multicategorical":
        return gym.spaces.MultiDiscrete([(3, 2, 4)[i % 3] for i in range(act_dim)])
    if kind == "bernoulli":
        return gym.spaces.MultiBinary(act_dim)
    if kind == "gaussian":
        return gym.spaces.Box(-1, 1, (act_dim,))
    raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")


def kind_of(case: str) -> str:
    """The kind of an ACTION_CASES entry."""
    return case.removesuffix("-masked")


def family_of_kind(kind: str):
    """The action family (trpo_ext.distributions) that serves a kind's space."""
    return trpo_ext.distributions.action_spec(action_space(kind)).family


# What the matrices derive from the families: the cases the extension's ops implement (the op tests
# run these; the fused path refuses the others), the discrete ones, the kinds that take no masks.
FUSED_CASES = [case for case in ACTION_CASES if family_of_kind(kind_of(case)).fused]
DISCRETE_CASES = [case for case in ACTION_CASES if kind_of(case) in DISCRETE_KINDS]
UNMASKABLE_KINDS = [kind for kind in KINDS if not family_of_kind(kind).maskable]


def make_policy(kind="gaussian", obs_dim=5, act_dim=3, hidden=(8, 7), activation="tanh",
                dtype=torch.float64, device="cpu", seed=0):
    """An MLPPolicy for `kind` (a KINDS name: its action_space(kind, act_dim)) or for `kind` given as
    a gymnasium action space itself (act_dim is then unused), its weights moved off the init."""
    torch.manual_seed(seed)
    space = kind if isinstance(kind, gym.Space) else action_space(kind, act_dim)
    policy = trpo_ext.MLPPolicy(obs_dim, space, hidden=hidden, activation=activation).to(device, dtype)
    with torch.no_grad():  # move away from the near-uniform init so every block of F matters
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy


SDE_VARIANTS = {"gsde": dict(), "gsde-feature-std": dict(full_std=False), "gsde-expln": dict(use_expln=True)}
"""gSDE policies (trpo_ext.sde) the Fisher and step matrices hold to the reference: σ per (feature,
action), per feature, and sb3's expln (log-stds on both sides of 0)."""


def make_sde_policy(variant="gsde", obs_dim=5, act_dim=3, hidden=(8, 7), activation="tanh", dtype=torch.float64,
                    device="cpu", seed=0, sample_freq=-1):
    """A gSDE policy (`SDE_VARIANTS[variant]`) for Box(act_dim), its weights moved off the init as
    make_policy's, log-stds around 0.3 (expln's two branches both in play)."""
    torch.manual_seed(seed)
    policy = trpo_ext.policies.sde_policy(obs_dim, action_space("gaussian", act_dim), hidden, activation, 0.3,
                                          sample_freq=sample_freq, **SDE_VARIANTS[variant]).to(device, dtype)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return policy


def random_mask(spec, n: int, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """A bool (n, width) mask that allows about half the classes and at least one of every segment."""
    mask = torch.rand(n, spec.width, generator=generator) < 0.5
    for lo, k in spec.bounds:
        keep = torch.randint(k, (n,), generator=generator)
        mask[torch.arange(n), lo + keep] = True
    return mask.to(device)


def action_problem(case: str, dtype=torch.float64, device="cpu", n=23, seed=0, hidden=(8, 7), activation="tanh"):
    """(policy, obs, v, mask) for an ACTION_CASES entry: a policy of that kind, a batch, a vector of
    the parameters' size and the case's mask (None when unmasked)."""
    kind, masked = kind_of(case), case.endswith("-masked")
    policy = make_policy(kind, 5, 3, hidden, activation, dtype, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    obs = torch.randn(n, 5, generator=g, dtype=dtype).to(device)
    v = torch.randn(n_params(policy), generator=g, dtype=dtype).to(device)
    mask = random_mask(policy.action_spec, n, g, device) if masked else None
    return policy, obs, v, mask


def sample_batch(policy, obs, mask=None, seed=0):
    """(actions, advantages) for obs: actions drawn from the (masked) policy, advantages standard normal."""
    rows = obs.obs.flatten(0, 1) if isinstance(obs, trpo_ext.Sequences) else obs  # Sequences: T·B rows
    g = torch.Generator(rows.device).manual_seed(seed)
    with torch.no_grad():
        actions = trpo_ext.distributions.sample_actions(trpo_ext.distributions.masked(policy(obs), mask), g)
    advantages = torch.randn(rows.shape[0], generator=g, dtype=rows.dtype, device=rows.device)
    return actions, advantages


def n_params(policy) -> int:
    return sum(p.numel() for p in policy.parameters())


def zero_width(params, layer):
    """params with layer `layer` given 0 output units (and the next layer 0 inputs)."""
    params = list(params)
    params[2 * layer], params[2 * layer + 1] = params[2 * layer][:0], params[2 * layer + 1][:0]
    if 2 * layer + 2 < len(params) and params[2 * layer + 2].dim() == 2:
        params[2 * layer + 2] = params[2 * layer + 2][:, :0]
    return params


# ----------------------------------------------------------------------------- runs
TIMING = ("steps_per_sec", "time_rollout", "time_cg", "time_line_search", "time_critic")
"""progress.csv's columns that measure time (everything else is computed, and reproducible)."""


def progress_rows(run_dir) -> list[dict]:
    with open(run_dir / "progress.csv", newline="") as f:
        return list(csv.DictReader(f))


def assert_same_run(a_dir, b_dir) -> None:
    """Two `trpo-ext train` runs' directories hold bitwise the same result: model.pt's networks,
    critic optimizer, random streams and episode statistics (every rank's, where it holds them), and
    every computed column of progress.csv."""
    a, b = trpo_ext.checkpoint.read(a_dir / "model.pt"), trpo_ext.checkpoint.read(b_dir / "model.pt")
    assert a["num_timesteps"] == b["num_timesteps"] and a["world_size"] == b["world_size"]
    for part in ("policy", "value_net"):
        for name in a[part]:
            assert torch.equal(a[part][name], b[part][name]), (part, name)
    for key, moments in a["critic_optimizer"]["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, b["critic_optimizer"]["state"][key][name])
    assert (a["rank_states"] is None) == (b["rank_states"] is None)
    for rank, (x, y) in enumerate(zip([a, *(a["rank_states"] or [])], [b, *(b["rank_states"] or [])])):
        assert torch.equal(x["generator"], y["generator"]), rank
        for name in ("returns", "lengths"):
            assert torch.equal(x["collector"]["stats"][name], y["collector"]["stats"][name]), (rank, name)
        assert x["collector"]["stats"]["finished"] == y["collector"]["stats"]["finished"], rank
        assert torch.equal(x["collector"]["last_obs"], y["collector"]["last_obs"]), rank
    computed = [[v for k, v in row.items() if k not in TIMING] for row in progress_rows(a_dir)]
    assert computed == [[v for k, v in row.items() if k not in TIMING] for row in progress_rows(b_dir)]


RECURRENT_CELLS = trpo_ext.recurrent.FLAT_NAMES
"""The recurrent policies (trpo_ext.recurrent) the matrices run, by cell: their built-in names on flat observations."""


def recurrent_problem(case: str, cell: str = "lstm", n_layers: int = 1, dtype=torch.float64, device="cpu",
                      steps: int = 8, n_seq: int = 4, seed: int = 0, hidden_size: int = 5, activation: str = "tanh"):
    """(policy, seq, v, mask) for an ACTION_CASES entry and a cell: a built-in recurrent policy (head
    hidden (7,)) moved off its init, Sequences of n_seq sequences of `steps` steps with episode starts
    inside them and a non-zero initial state, a vector of the parameters' size, the case's mask."""
    kind, masked = kind_of(case), case.endswith("-masked")
    torch.manual_seed(seed)
    codec = trpo_ext.spaces.ObservationCodec(gym.spaces.Box(-1, 1, (5,)))
    kwargs = {**trpo_ext.config.POLICY_KWARGS, "lstm_hidden_size": hidden_size, "n_lstm_layers": n_layers}
    policy = trpo_ext.policies.built_in_policy(RECURRENT_CELLS[cell], codec, action_space(kind), (7,), activation,
                                               0.0, None, kwargs).to(device, dtype)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn_like(p))
    g = torch.Generator().manual_seed(seed + 1)
    starts = torch.rand(steps, n_seq, generator=g) < 0.25
    starts[0, 0] = True
    state = tuple(0.5 * torch.randn(s.shape, generator=g, dtype=dtype).to(device) for s in policy.initial_state(n_seq))
    seq = trpo_ext.spaces.Sequences(torch.randn(steps, n_seq, 5, generator=g, dtype=dtype).to(device),
                                    starts.to(device), state)
    v = torch.randn(n_params(policy), generator=g, dtype=dtype).to(device)
    mask = random_mask(policy.action_spec, steps * n_seq, g, device) if masked else None
    return policy, seq, v, mask


def double_batch(obs):
    """A batch (a tensor or Sequences) in float64."""
    if isinstance(obs, trpo_ext.Sequences):
        return trpo_ext.Sequences(obs.obs.double(), obs.episode_starts, tuple(s.double() for s in obs.initial_state))
    return obs.double()
