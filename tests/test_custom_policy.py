"""A user's own networks as TRPO(policy=..., value_net=...): rollouts, the generic step, the plain
PyTorch critic, save / load (the module passed again), and the errors for wrong outputs."""
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import Categorical, Independent, Normal
from torch.nn.utils import parameters_to_vector

from trpo_ext import TRPO
from trpo_ext.critic import fit_value_network, fit_value_module
from trpo_ext.distributions import sample_actions

FAST = dict(n_envs=2, n_steps=64, critic_epochs=2, seed=0)


class CategoricalPolicy(nn.Module):
    """The MLP of the built-in policy, written as a user would (torch's default initialisation)."""

    def __init__(self, observation_space, action_space, hidden=64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(observation_space.shape[0], hidden), nn.Tanh(),
                                 nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, action_space.n))

    def forward(self, obs):
        return Categorical(logits=self.net(obs))


class GaussianPolicy(nn.Module):
    """A Gaussian whose std depends on the state (a second head)."""

    def __init__(self, observation_space, action_space):
        super().__init__()
        k = action_space.shape[0]
        self.body = nn.Sequential(nn.Linear(observation_space.shape[0], 32), nn.Tanh())
        self.mean, self.log_std = nn.Linear(32, k), nn.Linear(32, k)

    def forward(self, obs):
        h = self.body(obs)
        return Independent(Normal(self.mean(h), self.log_std(h).clamp(-5, 2).exp()), 1)


class Critic(nn.Module):
    """Values of shape (B, 1), as many users write them."""

    def __init__(self, observation_space, action_space):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(observation_space.shape[0], 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, obs):
        return self.net(obs)


class Returns(nn.Module):
    """A policy returning whatever `make(logits)` makes of its logits."""

    def __init__(self, make, n_out=2):
        super().__init__()
        self.linear = nn.Linear(4, n_out)
        self.make = make

    def forward(self, obs):
        return self.make(self.linear(obs))


def vector(module):
    return parameters_to_vector(module.parameters()).detach().clone()


def test_custom_categorical_policy_learns_cartpole():
    agent = TRPO("CartPole-v1", seed=0, policy=CategoricalPolicy)
    assert isinstance(agent.policy, CategoricalPolicy)
    agent.learn(12_288, progress_bar=False)
    record = agent.last_record
    assert record["ep_return_mean"] > 60  # random policy: about 22
    assert agent.evaluate(5)[0] > 100


def test_custom_policy_reaches_475_on_cartpole_at_100k_steps():
    # The defaults (8 envs x 128 steps) with the user's module, as docs/guide.md's custom-policy example runs it.
    with torch.random.fork_rng(devices=[]):  # the module's initialisation, independent of the tests before
        torch.manual_seed(0)
        policy = CategoricalPolicy(*_spaces("CartPole-v1"))
    agent = TRPO("CartPole-v1", seed=0, policy=policy)
    agent.learn(100_000, progress_bar=False)
    mean, _ = agent.evaluate(10)
    assert mean >= 475


def _spaces(env_id):
    import gymnasium as gym

    env = gym.make(env_id)
    spaces = env.observation_space, env.action_space
    env.close()
    return spaces


def test_state_dependent_gaussian_on_pendulum_and_callables():
    agent = TRPO("Pendulum-v1", policy=GaussianPolicy, value_net=Critic, normalize_obs=True, **FAST)
    assert isinstance(agent.policy, GaussianPolicy) and isinstance(agent.value_net, Critic)
    before = vector(agent.policy)
    agent.learn(3 * 128, progress_bar=False)
    record = agent.last_record
    for key in ("kl", "value_loss", "entropy", "policy_std", "explained_variance", "cg_residual"):
        assert math.isfinite(record[key]), key
    assert record["update"] == 3 and not torch.equal(vector(agent.policy), before)
    actions, _ = agent.predict(np.zeros((5, 3)), deterministic=True)
    assert actions.shape == (5, 1) and np.all(np.abs(actions) <= 2.0)
    # deterministic = the mean, clipped for the env
    with torch.no_grad():
        mean = agent.policy(agent.inference.observe(np.zeros((5, 3), np.float32))).mean.numpy()
    np.testing.assert_array_equal(actions, np.clip(mean, -2, 2))


def test_a_callable_is_called_with_the_seeded_rng_and_the_spaces():
    seen = []

    def make(observation_space, action_space):
        seen.append((observation_space.shape, action_space.n))
        return CategoricalPolicy(observation_space, action_space)

    a, b = (TRPO("CartPole-v1", policy=make, value_net=Critic, **FAST) for _ in range(2))
    assert seen == [((4,), 2)] * 2
    assert torch.equal(vector(a.policy), vector(b.policy)) and torch.equal(vector(a.value_net), vector(b.value_net))
    global_state = torch.get_rng_state()
    a.learn(128, progress_bar=False)
    b.learn(128, progress_bar=False)
    assert torch.equal(torch.get_rng_state(), global_state)  # sampling uses the agent's generator
    assert torch.equal(vector(a.policy), vector(b.policy))  # reproducible from the seed


def test_custom_critic_fit_matches_a_plain_adam_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    ref = [p.detach().clone() for p in net.parameters()]
    obs, returns = torch.randn(37, 3), torch.randn(37)
    loss = fit_value_network(net, torch.optim.Adam(net.parameters(), lr=1e-2), obs, returns, 2, 8,
                             torch.Generator().manual_seed(1))
    ref_net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))
    with torch.no_grad():
        for p, q in zip(ref_net.parameters(), ref):
            p.copy_(q)
    opt, g, losses = torch.optim.Adam(ref_net.parameters(), lr=1e-2), torch.Generator().manual_seed(1), []
    for _ in range(2):
        for idx in torch.randperm(37, generator=g).split(8):
            step_loss = ((ref_net(obs[idx]).squeeze(1) - returns[idx]) ** 2).mean()
            opt.zero_grad()
            step_loss.backward()
            opt.step()
            losses.append(step_loss.item())
    assert loss == pytest.approx(np.mean(losses), rel=1e-6)
    for p, q in zip(net.parameters(), ref_net.parameters()):
        torch.testing.assert_close(p, q)


def test_custom_critic_fit_restores_and_raises_on_overflow():
    net = nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    fit_value_module(net, opt, torch.randn(8, 3), torch.randn(8), 1, 4)
    before = [p.detach().clone() for p in net.parameters()]
    moments = [opt.state[p]["exp_avg_sq"].clone() for p in net.parameters()]
    with pytest.raises(ValueError, match="restored"):
        fit_value_module(net, opt, torch.randn(8, 3), torch.full((8,), 3e38), 1, 4)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert all(torch.equal(opt.state[p]["exp_avg_sq"], m) for p, m in zip(net.parameters(), moments))
    assert all(float(opt.state[p]["step"]) == 2 for p in net.parameters())


def test_reduce_needs_the_built_in_critic():
    net = nn.Linear(3, 1)
    with pytest.raises(ValueError, match="critic_parallel='reduce' needs the built-in ValueNetwork"):
        fit_value_network(net, torch.optim.Adam(net.parameters()), torch.randn(8, 3), torch.randn(8), 1, 4,
                          process_group=object(), parallel="reduce")


def test_save_load_round_trip_and_exact_resume(tmp_path):
    kwargs = dict(FAST, normalize_obs=True)
    uninterrupted = TRPO("CartPole-v1", policy=CategoricalPolicy, value_net=Critic, **kwargs)
    uninterrupted.learn(3 * 128, progress_bar=False)

    first = TRPO("CartPole-v1", policy=CategoricalPolicy, value_net=Critic, **kwargs).learn(128, progress_bar=False)
    path = tmp_path / "model.pt"
    first.save(path)
    state = torch.load(path, weights_only=True)  # plain data: loads with weights_only
    assert state["format"] == 3
    # Given again as a module instance (fresh parameters) and as the callable.
    loaded = TRPO.load(path, restore_env_states=True, policy=CategoricalPolicy(*_spaces("CartPole-v1")),
                       value_net=Critic)
    assert torch.equal(vector(loaded.policy), vector(first.policy))
    assert torch.equal(vector(loaded.value_net), vector(first.value_net))
    obs = np.random.default_rng(0).normal(size=(20, 4))
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], first.predict(obs, deterministic=True)[0])

    loaded.learn(2 * 128, progress_bar=False)
    assert loaded.num_timesteps == uninterrupted.num_timesteps
    assert torch.equal(vector(loaded.policy), vector(uninterrupted.policy))
    assert torch.equal(vector(loaded.value_net), vector(uninterrupted.value_net))
    np.testing.assert_array_equal(loaded.normalizer.mean, uninterrupted.normalizer.mean)


def test_loading_without_the_custom_networks_names_them(tmp_path):
    path = tmp_path / "model.pt"
    TRPO("CartPole-v1", policy=CategoricalPolicy, value_net=Critic, **FAST).save(path)
    with pytest.raises(ValueError, match=r"custom policy \(test_custom_policy\.CategoricalPolicy\).*pass policy="):
        TRPO.load(path)
    with pytest.raises(ValueError, match=r"custom value_net \(test_custom_policy\.Critic\).*pass value_net="):
        TRPO.load(path, policy=CategoricalPolicy)
    with pytest.raises(ValueError, match="does not fit the networks given"):
        TRPO.load(path, policy=lambda o, a: CategoricalPolicy(o, a, hidden=16), value_net=Critic)
    # The built-in networks need nothing, and a custom policy with the built-in critic only policy=.
    path2 = tmp_path / "model2.pt"
    TRPO("CartPole-v1", policy=CategoricalPolicy, **FAST).save(path2)
    TRPO.load(path2, policy=CategoricalPolicy).close()


@pytest.mark.parametrize("make, match", [
    (lambda logits: logits, r"returned a tensor of shape \(2, 2\); expected Categorical"),
    (lambda logits: (logits,), "returned a tuple"),
    (lambda logits: Categorical(logits=logits[:, :1]), r"Categorical with batch_shape \(2,\).*2 classes"),
    (lambda logits: Normal(logits, 1.0), r"returned Normal.*expected Categorical"),
])
def test_bad_forward_outputs_fail_at_construction(make, match):
    policy = Returns(make)
    before = vector(policy)
    with pytest.raises(ValueError, match=match):
        TRPO("CartPole-v1", policy=policy, **FAST)
    assert torch.equal(vector(policy), before)


@pytest.mark.parametrize("make, match", [
    (lambda out: Normal(out, 1.0), r"returned Normal with batch_shape \(2, 1\).*wrap it: Independent"),
    (lambda out: Independent(Normal(out.repeat(1, 2), 1.0), 1), r"event_shape \(2,\).*event_shape \(1,\)"),
    (lambda out: Categorical(logits=out), "expected Independent"),
])
def test_bad_gaussian_outputs_fail_at_construction(make, match):
    policy = Returns(make, n_out=1)
    policy.linear = nn.Linear(3, 1)  # Pendulum: 3 observations, Box(1) actions
    with pytest.raises(ValueError, match=match):
        TRPO("Pendulum-v1", policy=policy, **FAST)


def test_other_construction_errors():
    with pytest.raises(ValueError, match="policy must be one of .'MlpPolicy', 'CnnPolicy', 'MultiInputPolicy'."):
        TRPO("CartPole-v1", policy="CNNPolicy", **FAST)
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        TRPO("CartPole-v1", policy=lambda o, a: "not a module", **FAST)
    frozen = CategoricalPolicy(*_spaces("CartPole-v1"))
    frozen.net[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"do not require grad: \['net.0.weight'\]"):
        TRPO("CartPole-v1", policy=frozen, **FAST)
    with pytest.raises(ValueError, match=r"value_net .* returned .* shape \(2, 2\); expected"):
        TRPO("CartPole-v1", value_net=nn.Linear(4, 2), **FAST)
    with pytest.raises(ValueError, match=r"forward on a float32 tensor of shape \(B, 4\) with B = 2 raised RuntimeError"):
        TRPO("CartPole-v1", policy=Returns(lambda x: Categorical(logits=x)).requires_grad_(True).to(torch.float64),
             **FAST)


def test_sample_actions_uses_the_generator():
    dist = Independent(Normal(torch.zeros(4, 2), torch.ones(4, 2)), 1)
    a = sample_actions(dist, torch.Generator().manual_seed(3))
    b = sample_actions(dist, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == (4, 2)
    c = sample_actions(Categorical(logits=torch.tensor([[0.0, 5.0]] * 3)), None, deterministic=True)
    assert c.tolist() == [1, 1, 1] and c.dtype == torch.int64


def test_data_parallel_custom_networks(tmp_path):
    from test_distributed import launch

    ranks = launch("custom", tmp_path)
    for rank in ranks:
        (loss, params), (single_loss, single_params) = rank["distributed"], rank["single"]
        assert torch.equal(params, single_params) and loss == single_loss
        assert "critic_parallel='reduce' needs the built-in ValueNetwork" in rank["reduce_error"]
    for layout in ("split", "data"):  # the agent keeps identical replicas with either update layout
        a0, a1 = ranks[0][f"agent-{layout}"], ranks[1][f"agent-{layout}"]
        assert torch.equal(a0["policy"], a1["policy"]) and torch.equal(a0["value"], a1["value"]), layout
        assert a0["num_timesteps"] == 512 and math.isfinite(a0["record"]["value_loss"]), layout
