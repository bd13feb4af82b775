"""Policy and value networks.

`MLPPolicy` is the network the fused extension ops understand: a plain MLP whose output is the
parameters of the action space's distribution (`trpo_ext.distributions`), with a state-independent
log-std parameter last in `parameters()` order for a Gaussian (docs/design.md, "Contracts across the
C++ boundary"). `fused_spec(policy)` says whether the fused ops compute its Fisher, and builds their
keyword arguments (`FusedSpec.op_kwargs`): every call into a fused op takes them from there.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.distributions import Independent

from .distributions import ActionSpec, action_spec
from .features import (FeatureExtractor, FeaturePolicy, FeatureValue, NatureCNN, PackedFeatures,  # noqa: F401
                       built_in_extractor, head_sizes)
from .mlp import ACTIVATIONS, LogStd, check_activation, check_sizes, mlp, mlp_forward, orthogonal_init
from .recurrent import CELLS, RECURRENT, RecurrentPolicy, RecurrentValue, feed_forward_name
from .sde import SDEPolicy
from .spaces import ObservationCodec, pack

class MLPPolicy(nn.Module):
    """MLP policy: `policy(obs)` returns the action space's distribution (`trpo_ext.distributions`).

    Args:
        obs_dim: size of the (flat) observation.
        action_space: a space one of `trpo_ext.distributions`' families serves (its table).
        hidden: hidden layer widths, e.g. (64, 64); () gives a linear policy.
        activation: a key of ACTIVATIONS.
        log_std_init: initial log standard deviation of a Gaussian (ignored by the other families).
    """

    def __init__(self, obs_dim: int, action_space, hidden: Sequence[int] = (64, 64),
                 activation: str = "tanh", log_std_init: float = 0.0):
        super().__init__()
        if not isinstance(obs_dim, int) or isinstance(obs_dim, bool) or obs_dim < 1:
            raise ValueError(f"obs_dim must be a positive int, got {obs_dim!r}")
        self.action_spec = action_spec(action_space)
        self.kind, self.action_dim = self.action_spec.kind, self.action_spec.width
        self.segments = self.action_spec.segments
        self.obs_dim = obs_dim
        self.hidden = check_sizes("hidden", hidden)
        self.activation = check_activation(activation)
        self.layers, self.act = mlp((obs_dim, *self.hidden, self.action_dim), activation)
        orthogonal_init(self.layers, last_gain=0.01)
        if self.action_spec.family.has_log_std:
            self.std = LogStd(self.action_dim, log_std_init)

    @property
    def log_std(self) -> nn.Parameter:
        """The Gaussian's log standard deviation (last in `parameters()`)."""
        if not self.action_spec.family.has_log_std:
            raise AttributeError(f"a {self.kind} MLPPolicy has no log_std")
        return self.std.log_std

    def distribution_params(self, obs: torch.Tensor) -> torch.Tensor:
        """The network's output for a batch of observations: logits, or a Gaussian's mean."""
        return mlp_forward(self.layers, self.act, obs)

    def distribution(self, out: torch.Tensor):
        """The policy's distribution for distribution parameters `out` (logits or mean)."""
        return self.action_spec.distribution(out, self.log_std if self.action_spec.family.has_log_std else None)

    def forward(self, obs: torch.Tensor):
        return self.distribution(self.distribution_params(obs))

    def extra_repr(self) -> str:
        return f"kind={self.kind}, obs_dim={self.obs_dim}, action_dim={self.action_dim}, activation={self.activation}"


@dataclass(frozen=True)
class FusedSpec:
    """What the fused ops need to know about a policy besides its parameters and the batch."""

    action: ActionSpec
    activation: str

    def op_kwargs(self, **masks) -> dict:
        """The keyword arguments every fused op takes for this policy: kind, activation, segments,
        and the masks given by name (`action_mask=`, `fvp_action_mask=`; None ones are left out).
        The one place they are built: a call site that wrote them by hand could forget one."""
        kwargs = {**self.action.op_kwargs(), "activation": self.activation}
        kwargs.update((name, mask) for name, mask in masks.items() if mask is not None)
        return kwargs


def fused_spec(policy) -> FusedSpec | None:
    """The fused ops' description of `policy`, or None when only the generic path is exact for it.

    The fused ops compute the Fisher of the plain MLP that `MLPPolicy` defines, for the families
    they implement; a subclass that overrides `forward`, `distribution_params` or `distribution`
    computes something else, so it gets None.
    """
    if not isinstance(policy, MLPPolicy) or not policy.action_spec.family.fused:
        return None
    cls = type(policy)
    if any(getattr(cls, name) is not getattr(MLPPolicy, name) for name in ("forward", "distribution_params",
                                                                          "distribution")):
        return None
    return FusedSpec(policy.action_spec, policy.activation)


@dataclass(frozen=True)
class RecurrentFusedSpec(FusedSpec):
    """A recurrent policy's description for the fused ops through time (`rnn_fvp`, `rnn_cg`): the
    FusedSpec's, and its cell ("lstm" / "gru")."""

    cell: str = "lstm"

    def op_kwargs(self, **masks) -> dict:
        return {**super().op_kwargs(**masks), "cell": self.cell}


_RECURRENT_METHODS = ("forward", "distribution", "head_out", "recurrent_features", "inputs", "head")


def recurrent_fused_spec(policy) -> RecurrentFusedSpec | None:
    """The fused ops' description of a recurrent policy (`trpo_ext.recurrent.RecurrentPolicy`), or
    None when only the generic path is exact for it: the fused ops compute the Fisher of the network
    RecurrentPolicy defines (its RNN, a head of linear layers with `activation` between them, a
    fused action family), so a subclass that overrides how the output is computed, a head that is
    not such an MLP, an encoder before the RNN or parameters beyond those get None."""
    if not isinstance(policy, RecurrentPolicy) or not policy.action_spec.family.fused or policy.encoder is not None:
        return None
    cls = type(policy)
    if any(getattr(cls, name) is not getattr(RecurrentPolicy, name) for name in _RECURRENT_METHODS):
        return None
    if type(policy.act) is not ACTIVATIONS.get(policy.activation) or not all(
            type(layer) is nn.Linear and layer.bias is not None for layer in policy.layers):
        return None
    expected = 4 * policy.n_layers + 2 * len(policy.layers) + int(policy.action_spec.family.has_log_std)
    if sum(1 for _ in policy.parameters()) != expected:
        return None
    return RecurrentFusedSpec(policy.action_spec, policy.activation, policy.cell)


class ValueNetwork(nn.Module):
    """State-value MLP: obs (N, obs_dim) -> values (N,)."""

    def __init__(self, obs_dim: int, hidden: Sequence[int] = (64, 64), activation: str = "tanh"):
        super().__init__()
        self.activation = check_activation(activation)
        self.layers, self.act = mlp((obs_dim, *check_sizes("hidden", hidden), 1), self.activation)
        orthogonal_init(self.layers, last_gain=1.0)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return mlp_forward(self.layers, self.act, obs).squeeze(-1)


# ----------------------------------------------------------------------------- networks by name
BUILT_IN = ("MlpPolicy", "CnnPolicy", "MultiInputPolicy", *RECURRENT)
"""The `policy=` / `value_net=` names of the built-in networks, as stable-baselines3 calls them."""


def default_name(codec: ObservationCodec) -> str:
    """The built-in network that fits an observation space."""
    return "MultiInputPolicy" if codec.is_dict else "CnnPolicy" if codec.has_image else "MlpPolicy"


def _check_name_fits(name: str, codec: ObservationCodec, role: str) -> None:
    fits = default_name(codec)
    base = feed_forward_name(name) if name in RECURRENT else name
    if base == fits:
        return
    why = {"MultiInputPolicy": "needs a Dict observation space", "CnnPolicy": "needs image observations "
           "(a uint8 Box of rank 3 with bounds 0..255)", "MlpPolicy": "takes flat observations"}[base]
    use = name.replace(base[:-len("Policy")], fits[:-len("Policy")], 1)  # the same network for this space
    raise ValueError(f"{role}={name!r} {why}; the observation space is {codec.space}: use {role}={use!r}")


def sde_policy(obs_dim: int, action_space, hidden, activation, log_std_init, full_std=True, use_expln=False,
               sample_freq=-1) -> SDEPolicy:
    """The gSDE policy (`trpo_ext.sde`) on MLPPolicy's MLP: the same layers and initialisation."""
    layers, act = mlp((obs_dim, *check_sizes("hidden", hidden), action_spec(action_space).width),
                       check_activation(activation))
    orthogonal_init(layers, last_gain=0.01)
    return SDEPolicy(layers, act, activation, action_spec(action_space), log_std_init, full_std, use_expln, sample_freq)


def built_in_policy(name: str, codec: ObservationCodec, action_space, hidden, activation, log_std_init,
                    sde: dict | None = None, recurrent: dict | None = None) -> nn.Module:
    """The built-in policy `name` for these spaces: MLPPolicy (fused ops) for "MlpPolicy" (with `sde`,
    gSDE's `sde_policy` on its keyword arguments); a FeaturePolicy with a NatureCNN of 512 features
    and no hidden layers for "CnnPolicy" (sb3's defaults), or with 256 features per image and
    `hidden` for "MultiInputPolicy"; a `RecurrentPolicy` (its RNN as torch initialises it, as
    RecurrentPPO's; the Cnn / MultiInput names with that extractor before it) for a name of
    RECURRENT, sized by `recurrent` (policy_kwargs' lstm_hidden_size and n_lstm_layers)."""
    _check_name_fits(name, codec, "policy")
    if sde is not None and name != "MlpPolicy":
        raise ValueError(f"use_sde=True: gSDE is built into policy='MlpPolicy' only, not {name!r}")
    if sde is not None:
        return sde_policy(codec.flat_dim, action_space, hidden, activation, log_std_init, **sde)
    if name in RECURRENT:
        spec = action_spec(action_space)
        std = LogStd(spec.width, log_std_init) if spec.family.has_log_std else None
        rnn, layers, act, encoder = _recurrent_parts(name, codec, hidden, activation, recurrent, spec.width, 0.01)
        return RecurrentPolicy(rnn, layers, act, activation, spec, std, encoder)
    if name == "MlpPolicy":
        return MLPPolicy(codec.flat_dim, action_space, hidden, activation, log_std_init)
    return FeaturePolicy(built_in_extractor(name, codec), action_space, head_sizes(name, hidden), activation,
                         log_std_init)


def _recurrent_parts(name: str, codec: ObservationCodec, hidden, activation, recurrent: dict, out: int, last_gain):
    """The RNN (policy_kwargs' lstm_hidden_size and n_lstm_layers; torch's initialisation, as
    RecurrentPPO's), the head (`head_sizes`, then `out` units; MLPPolicy's initialisation) and the
    encoder (None for "Mlp..."; else the features extractor of the feed-forward name on packed rows)
    of `name`."""
    base = feed_forward_name(name)
    encoder = None if base == "MlpPolicy" else PackedFeatures(built_in_extractor(base, codec), codec)
    rnn = CELLS[RECURRENT[name]](codec.packed_dim if encoder is None else encoder.features_dim,
                                 recurrent["lstm_hidden_size"], recurrent["n_lstm_layers"])
    layers, act = mlp((rnn.hidden_size, *check_sizes("hidden", head_sizes(base, hidden)), out), activation)
    orthogonal_init(layers, last_gain=last_gain)
    return rnn, layers, act, encoder


def built_in_value(name: str, codec: ObservationCodec, hidden, activation, recurrent: dict | None = None) -> nn.Module:
    """The built-in critic `name`, shaped like `built_in_policy`'s policy (a recurrent name: its own
    RNN with `recurrent["enable_critic_lstm"]`, else the feed-forward critic of its observations, on
    the packed rows its rollout holds)."""
    _check_name_fits(name, codec, "value_net")
    if name in RECURRENT and recurrent["enable_critic_lstm"]:
        rnn, layers, act, encoder = _recurrent_parts(name, codec, hidden, activation, recurrent, 1, 1.0)
        return RecurrentValue(rnn, layers, act, activation, encoder)
    base = feed_forward_name(name) if name in RECURRENT else name
    if base == "MlpPolicy":
        return ValueNetwork(codec.flat_dim, hidden, activation)
    extractor = built_in_extractor(base, codec)  # a recurrent policy's rollout packs the observations
    return FeatureValue(PackedFeatures(extractor, codec) if name in RECURRENT else extractor,
                        head_sizes(base, hidden), activation)


def build_networks(policy, value_net, codec: ObservationCodec, action_space, policy_kwargs: dict, seed: int,
                   device, sde: dict | None = None) -> tuple[nn.Module, nn.Module, dict]:
    """The agent's policy and critic from TRPO's `policy=` / `value_net=` ("auto": the built-in network
    that fits the observations, and the critic of the policy's name; a name of BUILT_IN; a module; or
    a callable), initialised from `seed` without touching torch's global RNG, on `device`; a user's
    policy is checked (`check_custom_policy`). Returns (policy, value_net, the built-in names they
    were made from, None for a user's module: what a checkpoint keeps). `sde`: gSDE's settings
    (`TRPOConfig.sde`), for the built-in "MlpPolicy" only."""
    hidden, activation = policy_kwargs["hidden"], policy_kwargs["activation"]
    if sde is not None and not isinstance(policy, str):
        raise ValueError(f"use_sde=True: gSDE is built into policy='MlpPolicy'; a policy of your own "
                         f"({type(policy).__name__}) makes its own exploration")
    if isinstance(policy, str) and policy == "auto":
        policy = default_name(codec)
    if isinstance(value_net, str) and value_net == "auto":
        value_net = policy if isinstance(policy, str) and policy in BUILT_IN else default_name(codec)
    names = {"policy": policy if isinstance(policy, str) else None,
             "value_net": value_net if isinstance(value_net, str) else None}
    observation_space = codec.space
    with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
        torch.manual_seed(seed)
        policy = build_network("policy", policy, observation_space, action_space, lambda name: built_in_policy(
            name, codec, action_space, hidden, activation, policy_kwargs["log_std_init"], sde, policy_kwargs)).to(device)
        value_net = build_network("value_net", value_net, observation_space, action_space,
                                  lambda name: built_in_value(name, codec, hidden, activation, policy_kwargs)).to(device)
    if fused_spec(policy) is None and not isinstance(policy, RecurrentPolicy):
        check_custom_policy(policy, codec, action_space, device)
    if isinstance(value_net, RecurrentValue) and not isinstance(policy, RecurrentPolicy):
        raise ValueError("a recurrent critic needs a recurrent policy: value_net=" + repr(names["value_net"]) +
                         " with policy=" + repr(names["policy"] or type(policy).__name__))
    return policy, value_net, names


# ----------------------------------------------------------------------------- a user's own networks
def qualified_name(module: nn.Module) -> str:
    """`module.class.qualname` of a network, what a checkpoint records for information."""
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def build_network(name: str, spec, observation_space, action_space, built_in) -> nn.Module:
    """The network `spec` selects: `built_in(spec)` for one of BUILT_IN's names, the module itself,
    or what a callable `spec(observation_space, action_space)` returns; TypeError for anything else."""
    if isinstance(spec, str):
        if spec not in BUILT_IN:
            raise ValueError(f"{name} must be one of {BUILT_IN}, a torch.nn.Module or a callable "
                             f"(observation_space, action_space) -> nn.Module; got the string {spec!r}")
        return built_in(spec)
    if isinstance(spec, nn.Module):
        return spec
    if callable(spec):
        module = spec(observation_space, action_space)
        if not isinstance(module, nn.Module):
            raise TypeError(f"{name}: the callable {getattr(spec, '__qualname__', spec)!r} returned a "
                            f"{type(module).__name__}, expected a torch.nn.Module")
        return module
    raise TypeError(f"{name} must be one of {BUILT_IN}, a torch.nn.Module or a callable (observation_space, "
                    f"action_space) -> nn.Module; got {type(spec).__name__}")


def _what(out) -> str:
    if isinstance(out, torch.Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Independent):
        return (f"Independent({type(out.base_dist).__name__}) with batch_shape {tuple(out.batch_shape)} and "
                f"event_shape {tuple(out.event_shape)}")
    if isinstance(out, torch.distributions.Distribution):
        return f"{type(out).__name__} with batch_shape {tuple(out.batch_shape)} and event_shape {tuple(out.event_shape)}"
    return f"a {type(out).__name__}"


def _forward_once(module: nn.Module, label: str, codec: ObservationCodec, device, expected: str,
                  packed: bool = False):
    """module(2 zero observations), preprocessed as the rollout feeds them (`packed`: into one row
    each, as beside a recurrent policy), without gradients and with torch's RNG put back afterwards;
    a ValueError naming `label` and `expected` if it raises."""
    obs = pack(codec.zeros(2, device))[0] if packed else codec.zeros(2, device)
    try:
        with torch.random.fork_rng(devices=[] if torch.device(device).type == "cpu" else [device]), torch.no_grad():
            return module(obs)
    except Exception as e:
        raise ValueError(f"{label}: forward on {_described(codec, packed)} with B = 2 raised {type(e).__name__}: {e}; "
                         f"expected it to return {expected}") from e


def _described(codec: ObservationCodec, packed: bool) -> str:
    return f"packed observations, a float32 tensor of shape (B, {codec.packed_dim})" if packed else codec.describe()


def check_custom_policy(policy: nn.Module, codec: ObservationCodec, action_space, device) -> None:
    """ValueError unless `policy` (a user's module) has parameters that all require grad and, called
    once on a batch of 2 zero observations (no grad, torch's RNG put back afterwards), returns the
    distribution the action space needs (`ActionSpec.describe`)."""
    spec = action_spec(action_space)
    name = type(policy).__qualname__
    params = list(policy.parameters())
    if not params:
        raise ValueError(f"policy {name} has no parameters")
    frozen = [k for k, p in policy.named_parameters() if not p.requires_grad]
    if frozen:
        raise ValueError(f"policy {name}: TRPO optimizes every parameter; these do not require grad: {frozen}")
    expected = spec.describe()
    out = _forward_once(policy, f"policy {name}", codec, device, expected)
    if not (isinstance(out, torch.distributions.Distribution) and spec.fits(out, 2)):
        hint = ""
        if isinstance(out, torch.distributions.Distribution) and not isinstance(out, Independent) \
                and len(out.batch_shape) == 2 and spec.fits(Independent(out, 1), 2):
            hint = f"; wrap it: Independent({type(out).__name__}(...), 1)"
        raise ValueError(f"policy {name}: forward(obs) on {codec.describe()} with B = 2 returned {_what(out)}; "
                         f"expected {expected}{hint}")


def check_custom_value_net(value_net: nn.Module, codec: ObservationCodec, device, packed: bool = False) -> None:
    """ValueError unless `value_net` (a user's module) has parameters and maps a batch of 2 zero
    observations (`packed`: packed rows, what a critic beside a recurrent policy reads) to
    floating-point values of shape (2,) or (2, 1)."""
    name = type(value_net).__qualname__
    params = list(value_net.parameters())
    if not params:
        raise ValueError(f"value_net {name} has no parameters")
    out = _forward_once(value_net, f"value_net {name}", codec, device, "values of shape (2,) or (2, 1)", packed)
    if not (isinstance(out, torch.Tensor) and out.is_floating_point() and tuple(out.shape) in ((2,), (2, 1))):
        what = f"a {out.dtype} tensor of shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else _what(out)
        raise ValueError(f"value_net {name}: forward(obs) on {_described(codec, packed)} with B = 2 returned {what}; "
                         "expected floating-point values of shape (2,) or (2, 1)")


class FlatValues:
    """A value function as the rollout calls it, values (B,), from a module that may return (B, 1)."""

    def __init__(self, value_net: nn.Module):
        self.value_net = value_net

    def __call__(self, obs) -> torch.Tensor:
        values = self.value_net(obs)
        return values.reshape(values.shape[0])
