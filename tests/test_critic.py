"""The fused critic fit against the plain PyTorch loop it replaces (autograd + torch.optim.Adam); bad
Adam state and network shapes at op level."""
import copy
import math

import pytest
import torch

import trpo_ext
from trpo_ext.critic import fit_value_network

from helpers import rel_err


def _plain_fit(net, opt, obs, returns, epochs, batch_size, generator):
    losses = []
    for _ in range(epochs):
        for idx in torch.randperm(obs.shape[0], generator=generator, device=obs.device).split(batch_size):
            loss = torch.nn.functional.mse_loss(net(obs[idx]), returns[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("activation, hidden", [("tanh", (16, 16)), ("relu", (8,)), ("elu", (16, 8)), ("tanh", ())])
def test_fit_matches_plain_adam_loop(activation, hidden, dtype, tol, device):
    torch.manual_seed(0)
    net = trpo_ext.ValueNetwork(5, hidden, activation).to(device, dtype)
    ref = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=3e-3, foreach=False)
    obs = torch.randn(203, 5, dtype=dtype, device=device)  # 203 = 12 * 16 + 11: a short last minibatch
    returns = torch.randn(203, dtype=dtype, device=device) * 5
    for call in range(2):  # the second call continues from the Adam state of the first
        g1, g2 = torch.Generator(device).manual_seed(call), torch.Generator(device).manual_seed(call)
        loss = fit_value_network(net, opt, obs, returns, epochs=3, batch_size=16, generator=g1)
        ref_loss = _plain_fit(ref, ref_opt, obs, returns, 3, 16, g2)
        assert loss == pytest.approx(ref_loss, rel=tol)
        for p, q in zip(net.parameters(), ref.parameters()):
            assert rel_err(p.detach(), q.detach()) <= tol
            s, t = opt.state[p], ref_opt.state[q]
            assert float(s["step"]) == float(t["step"]) == 39 * (call + 1)
            assert rel_err(s["exp_avg_sq"], t["exp_avg_sq"]) <= tol


def test_parameters_with_different_step_counts_keep_their_own(device):
    # The op increments one shared count when every parameter has taken as many Adam steps; a state
    # where they differ (one parameter's state reset, say) keeps one count per parameter, as
    # torch.optim.Adam does.
    torch.manual_seed(0)
    net = trpo_ext.ValueNetwork(5, (8,)).to(device, torch.float64)
    ref = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=3e-3, foreach=False)
    obs, returns = torch.randn(64, 5, dtype=torch.float64, device=device), torch.randn(64, dtype=torch.float64,
                                                                                   device=device)
    for o, n in ((opt, net), (ref_opt, ref)):
        fit = fit_value_network if o is opt else _plain_fit
        fit(n, o, obs, returns, 1, 16, torch.Generator(device).manual_seed(0))
        del o.state[list(n.parameters())[0]]  # the first weight starts over
    fit_value_network(net, opt, obs, returns, 2, 16, torch.Generator(device).manual_seed(1))
    _plain_fit(ref, ref_opt, obs, returns, 2, 16, torch.Generator(device).manual_seed(1))
    assert [float(opt.state[p]["step"]) for p in net.parameters()] == [8.0, 12.0, 12.0, 12.0]
    for p, q in zip(net.parameters(), ref.parameters()):
        assert float(opt.state[p]["step"]) == float(ref_opt.state[q]["step"])
        assert rel_err(p.detach(), q.detach()) <= 1e-10


def test_zero_epochs_changes_nothing():
    net = trpo_ext.ValueNetwork(3)
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters())
    assert math.isnan(fit_value_network(net, opt, torch.randn(10, 3), torch.randn(10), 0, 4))
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_opcheck_mlp_value_fit(device):
    net = trpo_ext.ValueNetwork(4, (8,)).to(device)
    params = [p.detach().clone() for p in net.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(0.0) for _ in params]
    order = torch.stack([torch.randperm(20, device=device) for _ in range(2)])
    args = (torch.randn(20, 4, device=device), torch.randn(20, device=device), params, m, v, steps, order, 8,
            1e-3, 0.9, 0.999, 1e-8, "tanh")
    torch.library.opcheck(torch.ops.trpo_ext.mlp_value_fit.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_bad_critic_arguments():
    net = trpo_ext.ValueNetwork(3)
    opt = torch.optim.Adam(net.parameters())
    with pytest.raises(ValueError, match="returns must have shape"):
        fit_value_network(net, opt, torch.randn(10, 3), torch.randn(9), 1, 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        fit_value_network(net, opt, torch.randn(10, 3), torch.randn(10), 1, 0)
    with pytest.raises(ValueError, match="plain Adam"):
        fit_value_network(net, torch.optim.Adam(net.parameters(), amsgrad=True), torch.randn(10, 3),
                          torch.randn(10), 1, 4)
    # An optimizer's settings changed after torch.optim.Adam checked them: the op refuses them before any
    # write, so the critic is not turned NaN in place.
    before = [p.detach().clone() for p in net.parameters()]
    for key, value, words in [("lr", float("nan"), "lr must be finite"), ("lr", -1e-3, "lr must be finite"),
                              ("betas", (1.5, 0.999), r"beta1 must be in \[0, 1\)")]:
        bad = torch.optim.Adam(net.parameters())
        bad.param_groups[0][key] = value
        with pytest.raises(ValueError, match=words):
            fit_value_network(net, bad, torch.randn(10, 3), torch.randn(10), 1, 4)
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))


def _fit_args(hidden=(8,), n=12, obs_dim=4):
    """mlp_value_fit's arguments for a fresh ValueNetwork, as a dict to change one at a time."""
    torch.manual_seed(0)
    net = trpo_ext.ValueNetwork(obs_dim, hidden)
    params = [p.detach().clone() for p in net.parameters()]
    return dict(obs=torch.randn(n, obs_dim), returns=torch.randn(n), params=params,
                exp_avg=[torch.zeros_like(p) for p in params], exp_avg_sq=[torch.zeros_like(p) for p in params],
                steps=[torch.tensor(0.0) for _ in params], order=torch.stack([torch.randperm(n)]), batch_size=4)


def _fit(a, activation="tanh"):
    return torch.ops.trpo_ext.mlp_value_fit(a["obs"], a["returns"], a["params"], a["exp_avg"], a["exp_avg_sq"],
                                            a["steps"], a["order"], a["batch_size"], a.get("lr", 1e-3),
                                            a.get("beta1", 0.9), a.get("beta2", 0.999), a.get("eps", 1e-8),
                                            activation)


def _replace(a, key, i, value):
    a[key] = list(a[key])
    a[key][i] = value(a[key][i])
    return a


def _overlapping_states(a):
    """exp_avg[0] and exp_avg[1] in one buffer, their last and first 4 elements the same memory."""
    buffer = torch.zeros(40)
    a["exp_avg"] = [buffer[:32].view(8, 4), buffer[28:36], *a["exp_avg"][2:]]
    return a


# params of ValueNetwork(4, (8,)): [W0 (8, 4), b0 (8), W1 (1, 8), b1 (1)].
@pytest.mark.parametrize("change, error, words", [
    pytest.param(lambda a: _replace(a, "exp_avg", 2, lambda t: torch.zeros(1).expand(t.shape)), ValueError,
                 r"exp_avg\[2\] must be contiguous", id="exp-avg-stride-0"),
    pytest.param(lambda a: _replace(a, "exp_avg_sq", 0, lambda t: torch.zeros(8, 8)[:, :4]), ValueError,
                 r"exp_avg_sq\[0\] must be contiguous", id="exp-avg-sq-strided"),
    pytest.param(lambda a: _replace(a, "exp_avg", 0, lambda t: t.t().contiguous()), ValueError,
                 r"exp_avg\[0\] must have the shape of params\[0\] \(weight of layer 0\)", id="exp-avg-shape"),
    pytest.param(lambda a: _replace(a, "exp_avg_sq", 1, lambda t: t.double()), TypeError,
                 r"exp_avg_sq\[1\] must have obs's dtype", id="exp-avg-sq-dtype"),
    pytest.param(lambda a: _replace(a, "params", 0, lambda t: t.t().contiguous().t()), ValueError,
                 r"params\[0\] \(weight of layer 0\) must be contiguous", id="params-strided"),
    pytest.param(lambda a: _replace(a, "params", 1, lambda t: t.double()), TypeError,
                 r"params\[1\] \(bias of layer 0\) must have obs's dtype", id="params-dtype"),
    pytest.param(lambda a: _replace(a, "steps", 3, lambda t: torch.zeros(2)), ValueError,
                 r"steps\[3\] must be a 0-dim or 1-element tensor", id="steps-shape"),
    pytest.param(lambda a: _replace(a, "steps", 0, lambda t: torch.tensor(0)), TypeError,
                 r"steps\[0\] must be a float32 or float64 tensor", id="steps-int"),
    pytest.param(lambda a: dict(a, steps=a["steps"][:-1]), ValueError, "one tensor per parameter",
                 id="steps-count"),
    pytest.param(lambda a: dict(a, returns=a["returns"].double()), TypeError, "returns must have obs's dtype",
                 id="returns-dtype"),
    pytest.param(lambda a: dict(a, returns=a["returns"][:-1]), ValueError, "returns must have shape",
                 id="returns-shape"),
    pytest.param(lambda a: dict(a, order=a["order"].int()), TypeError, "order must be int64", id="order-dtype"),
    pytest.param(lambda a: dict(a, order=a["order"][:, :-1]), ValueError, "order must be an int64", id="order-shape"),
    pytest.param(lambda a: dict(a, obs=a["obs"][:0], returns=a["returns"][:0], order=a["order"][:, :0]),
                 ValueError, "empty batch", id="obs-empty"),
    pytest.param(lambda a: dict(a, params=a["params"][:-1]), ValueError, "params must be", id="param-count"),
    pytest.param(lambda a: _replace(_replace(_fit_args(hidden=(8, 2)), "params", 4, lambda t: torch.zeros(2, 2)),
                                    "params", 5, lambda t: torch.zeros(2)), ValueError,
                 "the critic's last layer must have one output",
                 id="two-outputs"),
    # Adam's settings: torch.optim.Adam's ranges, lr and eps finite.
    *[pytest.param(lambda a, k=k, x=x: dict(a, **{k: x}), ValueError, rf"{k} must be {rule}, got ", id=f"{k}={x}")
      for k, rule, values in [("lr", "finite and >= 0", (float("nan"), -1e-3, float("inf"))),
                              ("beta1", r"in \[0, 1\)", (1.0, 1.5, -0.1, float("nan"))),
                              ("beta2", r"in \[0, 1\)", (1.0, float("nan"))),
                              ("eps", "finite and >= 0", (-1e-8, float("inf"), float("nan")))] for x in values],
    # What the op writes in place must not share memory with anything else it takes.
    pytest.param(lambda a: _replace(a, "exp_avg_sq", 1, lambda t: a["exp_avg"][1]), ValueError,
                 r"exp_avg\[1\] and exp_avg_sq\[1\] share memory: the op updates params, exp_avg, exp_avg_sq and "
                 "steps in place", id="exp-avg-is-exp-avg-sq"),
    pytest.param(lambda a: _replace(a, "exp_avg", 0, lambda t: a["params"][0]), ValueError,
                 r"params\[0\] \(weight of layer 0\) and exp_avg\[0\] share memory", id="exp-avg-is-param"),
    pytest.param(lambda a: _overlapping_states(a), ValueError, r"exp_avg\[0\] and exp_avg\[1\] share memory",
                 id="exp-avg-overlap"),
    pytest.param(lambda a: dict(a, steps=[a["steps"][0]] * 4), ValueError, r"steps\[0\] and steps\[1\] share memory",
                 id="one-step-tensor"),
    pytest.param(lambda a: dict(a, returns=a["params"][0].view(-1)[:12]), ValueError,
                 r"returns shares memory with params\[0\] \(weight of layer 0\), which the op updates in place",
                 id="returns-in-a-param"),
    pytest.param(lambda a: dict(a, obs=a["exp_avg_sq"][0].expand(12, 8, 4)[:, 0, :]), ValueError,
                 r"obs shares memory with exp_avg_sq\[0\]", id="obs-strided-over-state"),
    # A meta tensor: the fake kernel refuses it (nothing to compute with, nothing written).
    pytest.param(lambda a: _replace(a, "steps", 1, lambda t: t.to("meta")), TypeError,
                 r"steps\[1\] must be a CPU or CUDA tensor, got one on meta", id="steps-meta"),
    pytest.param(lambda a: dict(a, obs=a["obs"].to("meta")), TypeError, "obs must be a CPU or CUDA tensor",
                 id="obs-meta"),
])
def test_op_rejects_bad_arguments(change, error, words):
    a = change(_fit_args())
    state = [t for key in ("params", "exp_avg", "exp_avg_sq", "steps") for t in a[key] if t.device.type != "meta"]
    before = [t.clone() for t in state]
    with pytest.raises(error, match=words):
        _fit(a)
    assert all(torch.equal(t, b) for t, b in zip(state, before)), "a refused call changed the network or its Adam state"


@pytest.mark.parametrize("layer", [0, 1], ids=["hidden", "output"])
def test_op_rejects_zero_width_layers(layer):
    a = _fit_args(hidden=(8,))
    params = list(a["params"])
    params[2 * layer], params[2 * layer + 1] = params[2 * layer][:0], params[2 * layer + 1][:0]
    if layer == 0:
        params[2] = params[2][:, :0]
    a["params"] = params
    a["exp_avg"] = [torch.zeros_like(p) for p in params]
    a["exp_avg_sq"] = [torch.zeros_like(p) for p in params]
    with pytest.raises(ValueError, match=rf"params\[{2 * layer}\] \(weight of layer {layer}\) has 0 output units"):
        _fit(a)


def test_one_element_steps_are_written_back():
    # torch.optim keeps 0-dim steps; a (1,)-shaped one (e.g. a loaded checkpoint) works the same way.
    a = _fit_args()
    a["steps"] = [torch.zeros(1) for _ in a["params"]]
    _fit(a)
    assert all(s.shape == (1,) and float(s) == 3.0 for s in a["steps"])
