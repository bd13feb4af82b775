"""The generic (any nn.Module) Fisher-vector product against the double-backprop reference: the
recorded linearisation (`trpo_ext.tape`, its rules in `trpo_ext.tape_rules` / `tape_layers`) on the
layers and calls it knows, the torch.func fallback (`trpo_ext.generic`) on forward passes it cannot
follow (docs/design.md, "Which path computes the product")."""
import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Independent, Normal

import trpo_ext
from trpo_ext import generic, reference, tape, tape_rules

from helpers import RTOL, SDE_VARIANTS, make_policy, make_sde_policy, n_params, rel_err

DTYPES = [torch.float64, torch.float32]


class LayerNormMLP(nn.Module):
    """Gaussian MLP with a LayerNorm after each hidden Linear, state-independent log-std."""

    def __init__(self, obs_dim=5, act_dim=3, hidden=(8, 7)):
        super().__init__()
        layers, width = [], obs_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.LayerNorm(h), nn.Tanh()]
            width = h
        self.body = nn.Sequential(*layers, nn.Linear(width, act_dim))
        self.log_std = nn.Parameter(torch.full((act_dim,), -0.3))

    def forward(self, obs):
        mean = self.body(obs)
        return Independent(Normal(mean, self.log_std.exp().expand_as(mean)), 1)


class SmallCNN(nn.Module):
    """Categorical conv net on 3x12x12 images: obs scaling, an in-place ReLU, Flatten, a linear head."""

    def __init__(self, n_actions=4):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 5, 4, stride=2), nn.ReLU(inplace=True), nn.Conv2d(5, 6, 3, padding=1),
                                  nn.ReLU(), nn.Flatten(), nn.Linear(6 * 5 * 5, 9), nn.Tanh(), nn.Linear(9, n_actions))

    def forward(self, obs):
        return Categorical(logits=self.body(obs / 2.0))


class StateStdGaussian(nn.Module):
    """Gaussian whose scale is a network output: softplus of half the head (or exp of a clamped log-std)."""

    def __init__(self, obs_dim=5, act_dim=3, clamp=False):
        super().__init__()
        self.clamp = clamp
        self.body = nn.Sequential(nn.Linear(obs_dim, 8), nn.ELU(), nn.Linear(8, 2 * act_dim))

    def forward(self, obs):
        mean, raw = self.body(obs).chunk(2, dim=-1)
        scale = raw.clamp(-2.0, 1.5).exp() if self.clamp else nn.functional.softplus(raw) + 1e-3
        return Independent(Normal(mean, scale), 1)


class ProbsCategorical(nn.Module):
    """Categorical built from probabilities (softmax in the forward pass: logits = log(clamped probs))."""

    def __init__(self, obs_dim=5, n_actions=3):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(obs_dim, 8), nn.Linear(8, n_actions)

    def forward(self, obs):
        return Categorical(probs=torch.softmax(self.lin2(torch.relu(self.lin1(obs))), dim=-1))


class KitchenSink(nn.Module):
    """Tensor arithmetic, broadcasting and shape calls between the layers (each with a rule of its own or
    torch.func's local JVP)."""

    def __init__(self, obs_dim=5, act_dim=3):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(obs_dim, 6), nn.Linear(12, act_dim)
        self.w = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.gain = nn.Parameter(torch.full((6,), 1.2))
        self.log_std = nn.Parameter(torch.zeros(act_dim))

    def forward(self, obs):
        h = torch.sigmoid(self.lin1(obs))
        g = (h @ self.w).t().contiguous().t() * self.gain - 0.5 * h
        g = g / (1.0 + h.pow(2)) + h[:, :1] * 2.0
        g = torch.cat([g, torch.logsumexp(g.unsqueeze(1).expand(-1, 2, -1), dim=1) - h.mean(-1, keepdim=True)], dim=-1)
        mean = self.lin2(torch.nn.functional.gelu(g)).view(-1, self.log_std.numel())
        return Independent(Normal(mean, (self.log_std * 1.0).exp()), 1)


class Tokens(nn.Module):
    """Per-token layers on (N, tokens, features): a 'same'-padded Conv1d across tokens (torch.func's local
    rules), a Linear and a LayerNorm on 3-D input, a mean over tokens."""

    def __init__(self, features=5, n_actions=3):
        super().__init__()
        self.mix = nn.Conv1d(features, features, 3, padding="same")
        self.lin, self.norm, self.head = nn.Linear(features, 8), nn.LayerNorm(8), nn.Linear(8, n_actions)

    def forward(self, obs):
        h = obs + self.mix(obs.transpose(1, 2)).transpose(1, 2)
        h = torch.relu(self.norm(self.lin(h))).mean(dim=1)
        return Categorical(logits=self.head(h))


class InPlaceHidden(nn.Module):
    """Writes into a dependent activation: the tape refuses it, the torch.func fallback computes it."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, obs):
        h = self.lin1(obs)
        h.mul_(0.5)
        return Categorical(logits=self.lin2(torch.tanh(h)))


class ReadsAFloat(nn.Module):
    """Reads a Python float out of a dependent tensor (autograd and torch.func treat it as a constant;
    the tape cannot see where it goes, so it refuses)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, obs):
        h = torch.tanh(self.lin1(obs))
        return Categorical(logits=self.lin2(h) / (1.0 + h.abs().max().item()))


class _Scale(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * 2.0

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return g * 2.0

    @staticmethod
    def jvp(ctx, t):
        return t * 2.0


class CustomFunction(nn.Module):
    """A custom autograd.Function between the layers: the tape cannot see inside it."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(5, 7), nn.Linear(7, 3)

    def forward(self, obs):
        return Categorical(logits=self.lin2(torch.tanh(_Scale.apply(self.lin1(obs)))))


def _perturb(policy, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return policy


def _mlp(kind, activation):
    return lambda: make_policy(kind, 5, 3, (8, 7), activation, torch.float64)


POLICIES = {  # name -> (factory, observation shape)
    "mlp-gaussian-tanh": (_mlp("gaussian", "tanh"), (5,)),
    "mlp-gaussian-relu": (_mlp("gaussian", "relu"), (5,)),
    "mlp-categorical-tanh": (_mlp("categorical", "tanh"), (5,)),
    "mlp-categorical-relu": (_mlp("categorical", "relu"), (5,)),
    "mlp-categorical-elu": (_mlp("categorical", "elu"), (5,)),
    "layernorm-mlp": (lambda: _perturb(LayerNormMLP()), (5,)),
    "cnn-categorical": (lambda: _perturb(SmallCNN()), (3, 12, 12)),
    "state-std-softplus": (lambda: _perturb(StateStdGaussian()), (5,)),
    "state-std-clamp": (lambda: _perturb(StateStdGaussian(clamp=True)), (5,)),
    "categorical-from-probs": (lambda: _perturb(ProbsCategorical()), (5,)),
    "kitchen-sink": (lambda: _perturb(KitchenSink()), (5,)),
    "tokens": (lambda: _perturb(Tokens()), (4, 5)),
    **{variant: ((lambda v=variant: make_sde_policy(v)), (5,)) for variant in SDE_VARIANTS},  # gSDE (trpo_ext.sde)
}
FALLBACK = {"in-place-hidden": (InPlaceHidden, (5,)), "reads-a-float": (ReadsAFloat, (5,)),
            "custom-function": (CustomFunction, (5,))}


def _setup(factory, obs_shape, dtype, n=23, seed=0, device="cpu"):
    torch.manual_seed(seed)
    policy = factory().to(device, dtype)
    g = torch.Generator().manual_seed(seed + 1)
    obs = torch.randn(n, *obs_shape, generator=g, dtype=dtype).to(device)
    v = torch.randn(n_params(policy), generator=g, dtype=dtype).to(device)
    return policy, obs, v


def _takes_the_tape(policy, obs) -> bool:
    """Whether the tape records `policy` (and then runs a product: unguarded, so that a rule that
    breaks fails the test instead of falling back)."""
    params = list(policy.parameters())
    with generic.GENERIC_LOCK, torch.no_grad():
        try:
            product = tape.Tape(policy, obs, params).products()
        except tape_rules.Unsupported:
            return False
        product(torch.ones(n_params(policy), dtype=params[0].dtype, device=params[0].device))
    return True


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(POLICIES))
def test_tape_fvp_matches_reference(name, dtype, device):
    policy, obs, v = _setup(*POLICIES[name], dtype, device=device)
    assert _takes_the_tape(policy, obs)
    before = [p.detach().clone() for p in policy.parameters()]
    flags = [p.requires_grad for p in policy.parameters()]
    expected = reference.fvp(policy, obs, v, damping=0.05)
    got = trpo_ext.fvp(policy, obs, v, damping=0.05, path="generic")
    assert got.shape == v.shape and got.dtype == dtype and got.device == v.device
    assert rel_err(got, expected) <= RTOL[dtype]
    for b, p, flag in zip(before, policy.parameters(), flags):
        assert torch.equal(b, p) and p.requires_grad == flag, "the generic path changed a parameter"
        assert p.grad is None


@pytest.mark.parametrize("name", list(POLICIES))
def test_tape_products_are_symmetric_and_match_the_fallback(name):
    # u'(F v) = v'(F u) only holds when the recorded JVP is exactly the transpose of the VJP.
    policy, obs, v = _setup(*POLICIES[name], torch.float64)
    u = torch.randn(v.shape, dtype=v.dtype, generator=torch.Generator().manual_seed(7))
    params = list(policy.parameters())
    with generic.GENERIC_LOCK, torch.no_grad():
        product = tape.Tape(policy, obs, params).products()
        fallback = generic.functorch_products(policy, obs, params)
        fv, fu = product(v), product(u)
        assert torch.equal(product(v), fv)  # products do not change the cached state
        assert rel_err(fallback(v), fv) <= 1e-12
    assert abs(torch.dot(u, fv) - torch.dot(v, fu)) <= 1e-12 * fv.norm() * u.norm()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FALLBACK))
def test_fallback_when_the_tape_cannot_follow(name, dtype):
    policy, obs, v = _setup(*FALLBACK[name], dtype)
    assert not _takes_the_tape(policy, obs)
    expected = reference.fvp(policy, obs, v, damping=0.05)
    assert rel_err(trpo_ext.fvp(policy, obs, v, damping=0.05, path="generic"), expected) <= RTOL[dtype]


@pytest.mark.parametrize("name", ["layernorm-mlp", "cnn-categorical", "state-std-softplus", "mlp-categorical-relu",
                                  "gsde"])
def test_tape_cg_matches_reference(name):
    policy, obs, b = _setup(*POLICIES[name], torch.float64)
    x_ref, used_ref, _, xAx_ref = reference.cg_solve(policy, obs, b, iters=10, damping=0.1, rtol=0.0)
    x, info = trpo_ext.cg_solve(policy, obs, b, iters=10, damping=0.1, rtol=0.0, path="generic")
    assert rel_err(x, x_ref) <= 1e-8
    assert int(info.iterations) == used_ref
    assert abs(float(info.xAx) - float(xAx_ref)) <= 1e-8 * abs(float(xAx_ref))


def test_tape_on_the_fused_mlp_matches_fused_op():
    policy, obs, v = _setup(_mlp("gaussian", "tanh"), (5,), torch.float64, n=64)
    assert rel_err(trpo_ext.fvp(policy, obs, v, path="generic"), trpo_ext.fvp(policy, obs, v, path="fused")) <= 1e-12


def test_a_distribution_that_does_not_depend_on_the_parameters():
    class Constant(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(2, 2)

        def forward(self, obs):
            return Categorical(logits=torch.zeros(obs.shape[0], 3, dtype=obs.dtype))

    policy = Constant().double()
    v = torch.randn(n_params(policy), dtype=torch.float64)
    assert torch.equal(trpo_ext.fvp(policy, torch.randn(4, 2, dtype=torch.float64), v, path="generic"),
                       torch.zeros_like(v))


def test_a_rule_that_breaks_falls_back_with_a_warning(monkeypatch):
    policy, obs, v = _setup(*POLICIES["layernorm-mlp"], torch.float64)
    expected = reference.fvp(policy, obs, v)

    def broken(call):
        def jvp(t):
            raise IndexError("simulated")
        return jvp, jvp
    monkeypatch.setitem(tape_rules.RULES, torch.nn.functional.layer_norm, [broken])
    with pytest.warns(RuntimeWarning, match="falling back to torch.func"):
        got = trpo_ext.fvp(policy, obs, v, path="generic")
    assert rel_err(got, expected) <= RTOL[torch.float64]


def test_a_frozen_layer_keeps_its_block():
    # requires_grad=False does not take a parameter out of F (the generic path differentiates every
    # parameter, like the fused one).
    policy, obs, v = _setup(_mlp("categorical", "tanh"), (5,), torch.float64)
    expected = trpo_ext.fvp(policy, obs, v, path="generic")
    policy.layers[0].weight.requires_grad_(False)
    got = trpo_ext.fvp(policy, obs, v, path="generic")
    assert not policy.layers[0].weight.requires_grad
    assert rel_err(got, expected) <= 1e-14


def test_interleaved_solves_share_buffers_safely():
    # Two solves of the same shapes take the same pooled buffers; products never overlap, so
    # interleaving them changes nothing.
    (p1, obs, v), (p2, _, _) = (_setup(*POLICIES["layernorm-mlp"], torch.float64, seed=s) for s in (0, 1))
    with generic.GENERIC_LOCK, torch.no_grad():
        a, b = (generic.generic_products(p, obs, list(p.parameters())) for p in (p1, p2))
        a1, b1, a2, b2 = a(v), b(v), a(2 * v), b(2 * v)
    assert rel_err(a1, reference.fvp(p1, obs, v)) <= 1e-10 and rel_err(b1, reference.fvp(p2, obs, v)) <= 1e-10
    assert torch.allclose(a2, 2 * a1, rtol=1e-12, atol=0) and torch.allclose(b2, 2 * b1, rtol=1e-12, atol=0)
    assert not torch.allclose(a1, b1)
