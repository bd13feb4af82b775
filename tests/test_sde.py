"""gSDE (trpo_ext.sde): its distribution is sb3's, its noise is drawn on sb3's schedule, actions are
μ + φ E (μ when deterministic), and what cannot have it is refused by name. Its Fisher and step are
held to the reference in tests/test_generic.py and tests/test_step.py (helpers.SDE_VARIANTS), its
checkpoint in tests/test_checkpoint.py and tests/test_trpo.py, the drop-in's step in tests/test_sb3.py."""
import gymnasium as gym
import numpy as np
import pytest
import torch

from trpo_ext import TRPO
from trpo_ext.distributions import SDENormal, base_of, sample_actions

from helpers import SDE_VARIANTS, make_sde_policy

FAST = dict(n_envs=2, n_steps=10, critic_epochs=1, seed=0)


@pytest.mark.parametrize("variant", SDE_VARIANTS)
def test_the_distribution_is_sb3s(variant):
    """Mean, scale, log-probabilities and samples (given the same noise matrices) equal sb3's
    StateDependentNoiseDistribution on the same features and log-std, bit for bit."""
    distributions = pytest.importorskip("stable_baselines3.common.distributions",
                                        reason="compares with stable-baselines3 (trpo_ext[sb3])")
    policy = make_sde_policy(variant, dtype=torch.float32)
    obs = torch.randn(6, 5)
    dist = policy(obs)
    features = torch.tanh(policy.layers[1](torch.tanh(policy.layers[0](obs))))
    theirs = distributions.StateDependentNoiseDistribution(3, full_std=policy.full_std, use_expln=policy.use_expln)
    theirs.latent_sde_dim = policy.features_dim
    theirs.proba_distribution(policy.layers[2](features), policy.log_std, features)
    assert isinstance(base_of(dist), SDENormal)
    assert torch.equal(base_of(dist).loc, theirs.distribution.loc)
    assert torch.equal(base_of(dist).scale, theirs.distribution.scale)
    actions = torch.randn(6, 3)
    assert torch.equal(dist.log_prob(actions), theirs.log_prob(actions))
    policy.reset_noise(6, torch.Generator().manual_seed(1))  # one matrix per row, as sb3's per-env matrices
    theirs.exploration_matrices = policy.noise
    assert torch.equal(sample_actions(policy(obs), None), theirs.sample())
    theirs.exploration_mat = policy.noise[0]  # another batch size: the first matrix, as sb3's exploration_mat
    assert torch.equal(sample_actions(policy(obs[:4]), None), theirs.get_noise(features[:4]) + theirs.mode()[:4])


@pytest.mark.parametrize("freq, draws", [(4, [0, 4, 8, 10, 14, 18]), (3, [0, 3, 6, 9, 10, 13, 16, 19]),
                                         (1, list(range(20))), (-1, [0, 10])])
def test_noise_is_drawn_every_sde_sample_freq_steps_and_at_each_rollout(freq, draws):
    """sb3's schedule: new matrices (one per env) at the start of every rollout and, with
    sde_sample_freq > 0, every that many steps of it; the actions are μ + φ E with the matrices of
    their step."""
    agent = TRPO("Pendulum-v1", use_sde=True, sde_sample_freq=freq, **FAST)
    policy, seen, steps = agent.policy, [], []
    reset_noise, act = policy.reset_noise, agent.inference.act

    def recording_reset(n, generator=None):
        assert n == 2 and generator is agent.generator  # one matrix per env, from the agent's stream
        seen.append(len(steps))
        reset_noise(n, generator)

    def checking_act(pol, obs, *args, **kwargs):
        policy_obs, actions = act(pol, obs, *args, **kwargs)
        with torch.no_grad():
            dist = policy(policy_obs)
            features = torch.tanh(policy.layers[1](torch.tanh(policy.layers[0](policy_obs))))
        expected = base_of(dist).loc + torch.bmm(features.unsqueeze(1), policy.noise).squeeze(1)
        torch.testing.assert_close(actions, expected, rtol=0, atol=1e-6)
        steps.append(policy.noise.clone())
        return policy_obs, actions

    policy.reset_noise, agent.inference.act = recording_reset, checking_act
    agent.learn(40, progress_bar=False)
    assert seen == draws and len(steps) == 20
    changed = [t for t in range(20) if t == 0 or not torch.equal(steps[t], steps[t - 1])]
    assert changed == draws  # a draw is a new matrix: every step between draws used the same one


def test_deterministic_actions_are_the_mean():
    agent = TRPO("Pendulum-v1", use_sde=True, sde_sample_freq=4, **FAST).learn(20, progress_bar=False)
    obs = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    with torch.no_grad():
        mean = base_of(agent.policy(torch.as_tensor(obs))).loc.numpy()
    np.testing.assert_array_equal(agent.predict(obs, deterministic=True)[0], np.clip(mean, -2.0, 2.0))
    noisy = agent.predict(obs)[0]
    assert not np.array_equal(noisy, agent.predict(obs, deterministic=True)[0])
    np.testing.assert_array_equal(noisy, agent.predict(obs)[0])  # predict does not advance the schedule


@pytest.mark.parametrize("env, kwargs, error, words", [
    ("CartPole-v1", {}, TypeError, "use_sde: gSDE .* applies to Box actions, not to the action space Discrete"),
    ("Pendulum-v1", dict(policy=lambda o, a: torch.nn.Linear(3, 1)), ValueError, "use_sde=True: gSDE is built into "
     "policy='MlpPolicy'; a policy of your own"),
    ("Pendulum-v1", dict(sde_sample_freq=0), ValueError, "sde_sample_freq must be -1"),
])
def test_what_cannot_have_gsde_is_refused_by_name(env, kwargs, error, words):
    with pytest.raises(error, match=words):
        TRPO(env, use_sde=True, **kwargs)


def test_feature_std_and_expln_train():
    env = gym.make("MountainCarContinuous-v0")
    agent = TRPO(env, use_sde=True, policy_kwargs=dict(full_std=False, use_expln=True, hidden=(16,)), n_envs=1,
                 n_steps=32, critic_epochs=1, seed=0).learn(64, progress_bar=False)
    assert agent.policy.log_std.shape == (16, 1) and agent.policy.noise.shape == (1, 16, 1)
    assert agent.last_record["kl"] > 0 and np.isfinite(agent.last_record["policy_std"])
