"""Reward normalization (normalize_reward=True): stable-baselines3 VecNormalize's semantics, saved
with the model, raw returns in the logs."""
import numpy as np
import pytest
import torch

import trpo_ext
from trpo_ext.normalization import RewardScaler


def test_reward_scaler_is_vecnormalize_reward_normalization():
    # VecNormalize.step_wait, written out: R = gamma R + r; the running variance of R updates;
    # r / sqrt(var + eps) clipped; R = 0 where an episode ended.
    gamma, clip, eps = 0.9, 5.0, 1e-8
    scaler = RewardScaler(2, gamma, clip=clip, eps=eps)
    rng = np.random.default_rng(0)
    returns, count, mean, var = np.zeros(2), eps, 0.0, 1.0
    for t in range(40):
        rewards, done = rng.normal(size=2) * 3, np.array([t % 7 == 6, t % 5 == 4])
        scaled = scaler(rewards, done)
        returns = returns * gamma + rewards
        n, batch_mean, batch_var = 2, returns.mean(), returns.var()
        total = count + n
        delta = batch_mean - mean
        mean, var = mean + delta * n / total, (var * count + batch_var * n + delta**2 * count * n / total) / total
        count = total
        np.testing.assert_allclose(scaled, np.clip(rewards / np.sqrt(var + eps), -clip, clip), rtol=1e-12)
        returns[done] = 0.0
    assert np.abs(scaled).max() <= clip


def test_logged_returns_stay_raw_and_the_first_rollout_is_unchanged():
    runs = {}
    for normalize in (False, True):
        agent = trpo_ext.TRPO("CartPole-v1", n_envs=2, n_steps=64, normalize_reward=normalize, seed=0)
        agent.learn(128, progress_bar=False)  # one update: the rollout precedes any policy change
        runs[normalize] = agent.last_record
        agent.close()
    assert runs[True]["ep_return_mean"] == runs[False]["ep_return_mean"]
    assert runs[True]["value_loss"] != runs[False]["value_loss"]  # the critic saw the scaled rewards


def test_save_load_keeps_the_reward_statistics_and_resumes_exactly(tmp_path):
    def policy_after(agent):
        return torch.cat([p.detach().flatten() for p in agent.policy.parameters()])

    straight = trpo_ext.TRPO("CartPole-v1", n_envs=2, n_steps=32, normalize_reward=True, seed=3)
    straight.learn(256, progress_bar=False)
    first = trpo_ext.TRPO("CartPole-v1", n_envs=2, n_steps=32, normalize_reward=True, seed=3)
    first.learn(128, progress_bar=False)
    first.save(tmp_path / "model.pt")
    resumed = trpo_ext.TRPO.load(tmp_path / "model.pt", restore_env_states=True)
    assert resumed.config.normalize_reward
    np.testing.assert_array_equal(resumed.collector.reward_scaler.returns, first.collector.reward_scaler.returns)
    assert resumed.collector.reward_scaler.stats.var == pytest.approx(first.collector.reward_scaler.stats.var)
    resumed.learn(128, progress_bar=False)
    assert torch.equal(policy_after(resumed), policy_after(straight))
    for agent in (straight, first, resumed):
        agent.close()


def test_reward_clip_is_checked():
    with pytest.raises(ValueError, match="reward_clip"):
        trpo_ext.TRPO("CartPole-v1", normalize_reward=True, reward_clip=0.0)
