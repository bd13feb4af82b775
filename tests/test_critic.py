"""The fused critic fit against the plain PyTorch loop it replaces (autograd + torch.optim.Adam)."""
import copy

import pytest
import torch

import trpo_ext
from trpo_ext.critic import fit_value_network

from conftest import rel_err


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
@pytest.mark.parametrize("activation, hidden", [("tanh", (16, 16)), ("relu", (8,)), ("tanh", ())])
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


def test_zero_epochs_changes_nothing():
    net = trpo_ext.ValueNetwork(3)
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.Adam(net.parameters())
    assert fit_value_network(net, opt, torch.randn(10, 3), torch.randn(10), 0, 4) != 0  # nan
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
