"""Rollouts, GAE and the collector's state (trpo_ext.rollout), and env construction (trpo_ext.envs)."""
import io
import pickle
import re
import sys

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces

import trpo_ext
from trpo_ext import MLPPolicy
from trpo_ext.envpool_env import EnvPoolVectorEnv
from trpo_ext.envs import SAME_STEP, LeanSyncVectorEnv, make_vec_env
from trpo_ext.normalization import RewardScaler, RunningNormalizer
from trpo_ext.rollout import DISCARDED, EpisodeStats, RolloutCollector, compute_gae
from trpo_ext.distributions import BERNOULLI, CATEGORICAL, GAUSSIAN, ActionSpec, action_spec
from trpo_ext.spaces import ObservationCodec, magnitude_test


class CounterEnv(gym.Env):
    """obs = [steps since reset]; reward 1 per step; the episode ends after 3 steps, either
    truncated (time limit) or terminated."""

    observation_space = spaces.Box(-np.inf, np.inf, (1,), np.float32)
    action_space = spaces.Discrete(2)

    def __init__(self, terminate: bool = False):
        self.terminate = terminate
        self.k = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.k = 0
        return np.array([self.k], np.float32), {}

    def step(self, action):
        self.k += 1
        end = self.k == 3
        return np.array([self.k], np.float32), 1.0, end and self.terminate, end and not self.terminate, {}


# ----------------------------------------------------------------------------- GAE
def test_gae_hand_computed_with_termination_and_truncation():
    # One env, 4 steps: the episode is truncated after step 1 (bootstrap from its final observation,
    # value 10) and terminated after step 3 (no bootstrap).
    gamma, lam = 0.9, 0.5
    rewards = np.array([[1.0], [2.0], [3.0], [4.0]])
    values = np.array([[5.0], [6.0], [7.0], [8.0]])
    next_values = np.array([[6.0], [10.0], [8.0], [99.0]])  # 99 must be ignored (terminated)
    terminated = np.array([[False], [False], [False], [True]])
    truncated = np.array([[False], [True], [False], [False]])
    adv, ret = compute_gae(rewards, values, next_values, terminated, truncated, gamma, lam)

    d3 = 4.0 - 8.0
    d2 = 3.0 + 0.9 * 8.0 - 7.0
    d1 = 2.0 + 0.9 * 10.0 - 6.0
    d0 = 1.0 + 0.9 * 6.0 - 5.0
    expected = np.array([d0 + 0.45 * d1, d1, d2 + 0.45 * d3, d3])
    np.testing.assert_allclose(adv[:, 0], expected)
    np.testing.assert_allclose(ret, adv + values)


def test_gae_lambda_one_is_discounted_return_minus_value():
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(6, 3)), rng.normal(size=(6, 3))
    next_values = np.concatenate([values[1:], rng.normal(size=(1, 3))])
    no = np.zeros((6, 3), bool)
    adv, _ = compute_gae(rewards, values, next_values, no, no, 0.9, 1.0)
    g = next_values[-1]
    for t in reversed(range(6)):
        g = rewards[t] + 0.9 * g
        np.testing.assert_allclose(adv[t], g - values[t])


# ----------------------------------------------------------------------------- rollout collector
@pytest.mark.parametrize("terminate", [False, True])
def test_collector_bootstraps_truncation_from_final_observation(terminate):
    envs = make_vec_env(lambda: CounterEnv(terminate), n_envs=2)
    collector = RolloutCollector(envs, n_steps=5, device=torch.device("cpu"), normalizer=None,
                                 stats=EpisodeStats(2, 10))
    collector.reset(seed=0)
    policy = MLPPolicy(1, envs.single_action_space)
    batch = collector.collect(policy, lambda obs: obs[:, 0], torch.Generator().manual_seed(0), gamma=0.5, lam=0.0)
    # States 0,1,2 | 0,1 with V(s) = s; the episode ends after the third step (final observation 3).
    # lam = 0: advantage = 1 + 0.5 V(next) - V(s), V(next) = 0 at a termination.
    end = 1 - 2.0 if terminate else 1 + 1.5 - 2.0
    expected = np.array([1.5, 1.0, end, 1.5, 1.0])
    adv = batch.advantages.view(5, 2).numpy()
    np.testing.assert_allclose(adv, np.stack([expected, expected], 1), rtol=1e-6)
    np.testing.assert_allclose(batch.obs.view(5, 2)[:, 0].numpy(), [0, 1, 2, 0, 1])
    assert collector.stats.finished and collector.stats.means() == (3.0, 3.0)
    assert batch.actions.dtype == torch.long and batch.actions.shape == (10,)


def test_collector_rejects_non_finite_rewards():
    class NaNReward(CounterEnv):
        def step(self, action):
            obs, _, te, tr, info = super().step(action)
            return obs, float("nan"), te, tr, info

    envs = make_vec_env(NaNReward, n_envs=1)
    collector = RolloutCollector(envs, 4, torch.device("cpu"), None, EpisodeStats(1, 10))
    collector.reset(seed=0)
    with pytest.raises(ValueError, match=r"env 0 returned reward nan at step 1 of this rollout"):
        collector.collect(MLPPolicy(1, envs.single_action_space), lambda o: o[:, 0], torch.Generator(), 0.9, 0.9)


def _pendulum_collector(n_steps, normalizer):
    envs = make_vec_env("Pendulum-v1", n_envs=2)
    return RolloutCollector(envs, n_steps, torch.device("cpu"), normalizer, EpisodeStats(2, 10))


def test_normalizer_sees_each_observation_before_the_policy_does():
    norm = RunningNormalizer(3, eps=0.0)
    norm.count = 0.0
    collector = _pendulum_collector(6, norm)
    collector.reset(seed=0)
    seen = [collector.last_obs.copy()]
    policy = MLPPolicy(3, collector.envs.single_action_space)
    batch = collector.collect(policy, lambda o: o[:, 0], torch.Generator().manual_seed(0), 0.9, 0.9)
    # The statistics hold exactly the 6 x 2 observations the policy acted on (not the last one yet) ...
    assert norm.count == 12
    # ... and the first step was normalized with statistics of the first observations alone.
    first = np.asarray(seen[0], dtype=np.float64)
    expected = (first - first.mean(0)) / np.sqrt(first.var(0) + norm.eps)
    np.testing.assert_allclose(batch.obs[:2].numpy(), np.clip(expected, -norm.clip, norm.clip), rtol=1e-4,
                               atol=1e-4)
    collector.envs.close()


# ----------------------------------------------------------------------------- misbehaving envs
class Misbehaving(gym.Env):
    """A Dict-observation env whose copy reset with an odd seed (env 1 of a vector env reset with
    seed 0) returns `fault(obs, reward, terminated, truncated, info)` in place of its 5-tuple at its
    step `at`; its copy with an even seed never misbehaves. Episodes end at `at` when `end` is set."""

    observation_space = spaces.Dict({"x": spaces.Box(-np.inf, np.inf, (3,), np.float32), "k": spaces.Discrete(3),
                                     "img": spaces.Box(0, 255, (6, 6, 3), np.uint8)})
    action_space = spaces.Discrete(2)

    def __init__(self, fault=None, at: int = 3, end: bool = False):
        self.fault, self.at, self.end, self.faulty, self.t = fault, at, end, False, 0

    def _obs(self):
        return {"x": np.full(3, self.t, np.float32), "k": self.t % 3, "img": np.full((6, 6, 3), self.t, np.uint8)}

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.faulty = self.faulty or (seed is not None and seed % 2 == 1)
        self.t = 0
        return self._obs(), {}

    def step(self, action):
        self.t += 1
        out = self._obs(), 1.0, False, self.end and self.t == self.at, {}
        return self.fault(*out) if self.faulty and self.t == self.at and self.fault else out


def _with(key, value):
    return lambda obs, *rest: ({**obs, key: value}, *rest)


def _without(key):
    return lambda obs, *rest: ({k: v for k, v in obs.items() if k != key}, *rest)


MISBEHAVIOURS = {  # fault -> (field, what came), as the refusal names them
    "obs-wrong-shape": (_with("x", np.zeros(5, np.float32)), "observation['x'] has shape (5,)"),
    "obs-nan": (_with("x", np.array([0, 0, np.nan], np.float32)), "observation['x'][2] is nan"),
    "obs-string": (lambda obs, *rest: ("abc", *rest), "observation is a str 'abc'"),
    "obs-None": (lambda obs, *rest: (None, *rest), "observation is None"),
    "obs-dict-missing-key": (_without("k"), "observation['k'] is missing"),
    "obs-discrete-out-of-range": (_with("k", 99), "observation['k'] is 99"),
    "obs-string-entry": (_with("k", "1"), "observation['k'] is a str '1'"),
    "obs-image-of-floats": (_with("img", np.full((6, 6, 3), 0.5)), "observation['img'] has dtype float64"),
    "reward-string": (lambda o, r, te, tr, i: (o, "1.0", te, tr, i), "reward is a str '1.0'"),
    "reward-None": (lambda o, r, te, tr, i: (o, None, te, tr, i), "reward is None"),
    "reward-nan": (lambda o, r, te, tr, i: (o, float("nan"), te, tr, i), "reward nan"),
    "terminated-string": (lambda o, r, te, tr, i: (o, r, "False", tr, i), "terminated is a str 'False'"),
    "truncated-int": (lambda o, r, te, tr, i: (o, r, te, 0, i), "truncated is an int 0"),
    "info-None": (lambda o, r, te, tr, i: (o, r, te, tr, None), "info is None"),
    "old-gym-4-tuple": (lambda o, r, te, tr, i: (o, r, te or tr, i), "the step's return is a tuple of 4 values"),
}


class _Constant(torch.nn.Module):
    """Uniform actions for any observations (the collector's checks, not the policy, are tested here)."""

    def __init__(self):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.zeros(2))

    def forward(self, obs):
        return torch.distributions.Categorical(logits=self.logits.expand(obs["x"].shape[0], 2))


def _state(collector, generator, policy):
    """Everything a refused rollout must leave as it was."""
    return (collector.normalizer.snapshot()[:3], collector.reward_scaler.snapshot(), collector.stats.state_dict(),
            generator.get_state(), collector.last_obs, [p.detach().clone() for p in policy.parameters()])


def _assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, (tuple, list)):
            _assert_same(x, y)
        elif isinstance(x, dict):
            assert x.keys() == y.keys()
            _assert_same(list(x.values()), list(y.values()))
        elif isinstance(x, torch.Tensor):
            assert torch.equal(x, y)
        else:
            np.testing.assert_array_equal(x, y)


def _misbehaving_collector(fault, vectorization="sync", end=False):
    envs = make_vec_env(lambda: Misbehaving(fault, end=end), n_envs=2, vectorization=vectorization)
    collector = RolloutCollector(envs, 4, torch.device("cpu"), RunningNormalizer(3), EpisodeStats(2, 10),
                                 RewardScaler(2, 0.9))
    return collector, _Constant(), torch.Generator().manual_seed(0)


def _collect(collector, policy, generator):
    return collector.collect(policy, lambda o: o["x"][:, 0], generator, 0.9, 0.9)


@pytest.mark.parametrize("name", MISBEHAVIOURS)
def test_a_misbehaving_env_is_one_error_naming_env_step_and_field_and_changes_nothing(name):
    fault, says = MISBEHAVIOURS[name]
    collector, policy, generator = _misbehaving_collector(fault)
    collector.n_steps = 2
    collector.reset(seed=0)
    _collect(collector, policy, generator)  # steps 1-2: fine; the second rollout's step 1 is env 1's step 3
    before = _state(collector, generator, policy)
    with pytest.raises(ValueError) as refused:
        _collect(collector, policy, generator)
    message = str(refused.value)
    where = "env 1 returned" if name == "reward-nan" else "env 1 at"
    assert message.startswith(f"{where}"), message
    assert "step 1 of this rollout (step 3 of its episode)" in message and says in message, message
    assert "expected" in message or "must be" in message
    assert message.endswith(DISCARDED)
    _assert_same(_state(collector, generator, policy), before)
    with pytest.raises(RuntimeError, match=r"failed in an earlier rollout \(env 1 "):
        _collect(collector, policy, generator)
    collector.envs.close()


@pytest.mark.filterwarnings("ignore::UserWarning:gymnasium")  # the worker's own error report
@pytest.mark.parametrize("fault", ["obs-wrong-shape", "old-gym-4-tuple"])
def test_a_misbehaving_env_is_named_from_an_async_worker(fault):
    collector, policy, generator = _misbehaving_collector(MISBEHAVIOURS[fault][0], "async")
    collector.n_steps = 3
    collector.reset(seed=0)
    before = _state(collector, generator, policy)
    with pytest.raises(ValueError, match=re.escape(f"env 1 at step 3 of this rollout (step 3 of its episode): "
                                                   f"{MISBEHAVIOURS[fault][1]}")):
        _collect(collector, policy, generator)
    _assert_same(_state(collector, generator, policy), before)
    collector.envs.close()


def test_a_bad_final_observation_and_a_bad_reset_are_named():
    # The final observation of a truncated episode (never batched: the one it bootstraps from) ...
    collector, policy, generator = _misbehaving_collector(MISBEHAVIOURS["obs-nan"][0], end=True)
    collector.reset(seed=0)
    with pytest.raises(ValueError, match=re.escape("env 1 at step 3 of this rollout (step 3 of its episode): "
                                                   "final observation['x'][2] is nan")):
        _collect(collector, policy, generator)
    # ... and a reset's observation.
    class BadReset(Misbehaving):
        def reset(self, *, seed=None, options=None):
            obs, info = super().reset(seed=seed)
            return ({**obs, "k": -1} if seed == 1 else obs), info

    envs = make_vec_env(BadReset, n_envs=2)
    collector = RolloutCollector(envs, 4, torch.device("cpu"), None, EpisodeStats(2, 10))
    with pytest.raises(ValueError, match=re.escape("env 1 at reset: observation['k'] is -1; expected an integer in "
                                                   "[0, 3) (Discrete); the agent is unchanged")):
        collector.reset(seed=0)
    assert collector.last_obs is None


def test_values_of_less_common_but_valid_types_pass():
    unusual = lambda o, r, te, tr, i: ({**o, "x": o["x"].astype(np.int64), "k": np.uint8(o["k"])},  # noqa: E731
                                       np.array(r, np.float16), np.bool_(te), np.False_, i)
    collector, policy, generator = _misbehaving_collector(unusual)
    collector.reset(seed=0)
    assert _collect(collector, policy, generator).returns.isfinite().all()
    collector.envs.close()


def test_a_refused_observation_leaves_the_statistics_count_as_it_was():
    # The user's report: "left unchanged" while the count had moved (32 -> 40) over the steps before.
    collector, policy, generator = _misbehaving_collector(MISBEHAVIOURS["obs-nan"][0])
    collector.n_steps = 8
    collector.reset(seed=0)
    count = collector.normalizer.count
    with pytest.raises(ValueError, match="its observation, reward and episode statistics .* are as they were"):
        _collect(collector, policy, generator)
    assert collector.normalizer.count == count
    collector.envs.close()


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bound", [np.inf, trpo_ext.rollout.MAX_ABS_REWARD])
def test_the_quick_magnitude_test_passes_only_what_numpy_passes(dtype, bound):
    # The bit test every rollout step runs (spaces.magnitude_test): never passes a non-finite value or
    # one at or past the bound, and for bound = inf passes every finite batch.
    rng, dtype = np.random.default_rng(0), np.dtype(dtype)
    for size in (1, 3, 32, 136):
        masks = magnitude_test(dtype, size, bound)
        for trial in range(200):
            if trial % 2:  # any bit pattern: NaNs with payloads, infinities, subnormals
                a = rng.integers(0, 256, size * dtype.itemsize, dtype=np.uint8).view(dtype)
            else:
                with np.errstate(over="ignore"):
                    a = (rng.standard_normal(size) * 10.0 ** rng.integers(-8, 40, size)).astype(dtype)
            x = int.from_bytes(a.tobytes(), sys.byteorder)
            passed = not ((x & masks[0]) + masks[1]) & masks[2]
            with np.errstate(invalid="ignore"):
                fits = bool((np.abs(a.astype(np.float64)) < bound).all())
            assert fits or not passed, a
            assert passed == fits or bound != np.inf, a
    assert magnitude_test(np.dtype(">f4" if sys.byteorder == "little" else "<f4"), 4) is None
    assert magnitude_test(dtype, 5000) is None


def test_the_observation_quick_test_answers_as_the_full_check():
    codec = ObservationCodec(spaces.Box(-np.inf, np.inf, (4,), np.float32))
    fine = np.arange(32, dtype=np.float32).reshape(8, 4)
    assert codec.problem(fine) is None and codec._quick is not None  # the quick test now holds for (8, 4) float32
    swapped = np.zeros(4, np.dtype(np.float32).newbyteorder())
    swapped[2] = np.nan
    for obs, batch in [(fine, True), (fine, False), (fine.reshape(4, 8), True), (fine.astype(np.float64), True),
                       (fine[:, :3], True), (np.tile(swapped, (8, 1)), True), (list(fine), True)] + [
            (np.where(np.arange(32).reshape(8, 4) == k, v, fine).astype(np.float32), True)
            for k in (0, 13, 31) for v in (np.nan, np.inf, -np.inf, np.finfo(np.float32).max)]:
        expected = codec._problem(obs, batch, "observation")
        assert codec.problem(obs, batch) == expected
        assert codec.problem(obs, batch) == expected  # once more, with what the first call cached
    assert codec.problem(np.where(np.arange(32).reshape(8, 4) == 13, np.nan, fine)) == (
        3, "observation[1]", "is nan", "finite values")


@pytest.mark.parametrize("reward, refused", [(6e11, False), (1e12, False), (-1e12, False), (1.0000001e12, True),
                                             (-np.inf, True), (np.inf, True), (np.nan, True)])
def test_rewards_the_quick_test_does_not_pass_are_checked_exactly(reward, refused):
    class Rewarding(CounterEnv):
        def step(self, action):
            obs, _, te, tr, info = super().step(action)
            return obs, reward if self.k == 2 and self.np_random_seed == 1 else 1.0, te, tr, info

    envs = make_vec_env(Rewarding, n_envs=2)
    collector = RolloutCollector(envs, 4, torch.device("cpu"), None, EpisodeStats(2, 10))
    collector.reset(seed=0)
    collect = lambda: collector.collect(MLPPolicy(1, envs.single_action_space), lambda o: o[:, 0],  # noqa: E731
                                        torch.Generator(), 0.9, 0.9)
    if refused:
        with pytest.raises(ValueError, match=re.escape(f"env 1 returned reward {float(reward)!r} at step 2 of this "
                                                       "rollout (step 2 of its episode)")):
            collect()
    else:
        collect()
        assert collector.stats.finished[1] == (reward + 2.0, 3)


# ----------------------------------------------------------------------------- state_dict round trips
def _through_weights_only_load(state):
    """`state` saved and loaded back as a checkpoint is: torch.load(weights_only=True) must accept it."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_episode_stats_state_dict_round_trip():
    stats = EpisodeStats(3, window=2)
    for rewards, done in [([1.0, 2.0, 0.5], [0, 0, 0]), ([1.0, 1.0, 1.0], [1, 0, 1]), ([2.0, 3.0, 4.0], [1, 0, 0])]:
        stats.step(np.array(rewards), np.array(done, dtype=bool))
    restored = EpisodeStats(3, window=2)
    restored.finished.append((99.0, 99))  # loading replaces what was there
    restored.load_state_dict(_through_weights_only_load(stats.state_dict()))
    np.testing.assert_array_equal(restored.returns, stats.returns)
    np.testing.assert_array_equal(restored.lengths, stats.lengths)
    assert restored.lengths.dtype == np.int64 and list(restored.finished) == list(stats.finished)
    assert len(restored.finished) == 2 and restored.means() == stats.means()
    with pytest.raises(ValueError, match="saved for 3 envs, these stats track 2"):
        EpisodeStats(2, window=2).load_state_dict(stats.state_dict())


def test_collector_state_dict_continues_the_rollouts_exactly():
    collector = _pendulum_collector(7, RunningNormalizer(3))
    collector.reset(seed=0)
    policy = MLPPolicy(3, collector.envs.single_action_space)
    generator = torch.Generator().manual_seed(0)
    collector.collect(policy, lambda o: o[:, 0], generator, 0.9, 0.9)  # mid-episode: Pendulum runs 200 steps

    # A second collector on copies of the same env states, restored from the state dict.
    copy = RolloutCollector(LeanSyncVectorEnv.from_envs(pickle.loads(pickle.dumps(collector.envs.envs))), 7,
                            torch.device("cpu"), RunningNormalizer(3), EpisodeStats(2, 10))
    copy.load_state_dict(_through_weights_only_load(collector.state_dict()))
    assert copy.last_obs.dtype == collector.last_obs.dtype
    np.testing.assert_array_equal(copy.last_obs, collector.last_obs)
    np.testing.assert_array_equal(copy.stats.lengths, [7, 7])
    copy_generator = torch.Generator().manual_seed(0)
    copy_generator.set_state(generator.get_state())
    a = collector.collect(policy, lambda o: o[:, 0], generator, 0.9, 0.9)
    b = copy.collect(policy, lambda o: o[:, 0], copy_generator, 0.9, 0.9)
    for name in ("obs", "actions", "advantages", "returns", "values"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    np.testing.assert_array_equal(copy.normalizer.mean, collector.normalizer.mean)
    assert copy.normalizer.count == collector.normalizer.count
    collector.envs.close()
    copy.envs.close()


def test_collector_load_without_resuming_episodes_keeps_only_the_normalizer():
    collector = _pendulum_collector(5, RunningNormalizer(3))
    collector.reset(seed=0)
    collector.collect(MLPPolicy(3, collector.envs.single_action_space), lambda o: o[:, 0], torch.Generator(), 0.9, 0.9)
    other = _pendulum_collector(5, RunningNormalizer(3))
    other.load_state_dict(collector.state_dict(), resume_episodes=False)
    assert other.last_obs is None and not other.stats.lengths.any()
    np.testing.assert_array_equal(other.normalizer.var, collector.normalizer.var)
    with pytest.raises(ValueError, match="saved with observation normalization"):
        _pendulum_collector(5, None).load_state_dict(collector.state_dict())
    for c in (collector, other):
        c.envs.close()


# ----------------------------------------------------------------------------- normalizer
def test_running_normalizer_matches_numpy():
    rng = np.random.default_rng(1)
    data = [rng.normal(3.0, 2.0, size=(n, 4)) for n in (5, 17, 1, 40)]
    norm = RunningNormalizer(4, clip=100.0, eps=0.0)
    norm.count = 0.0
    for d in data:
        norm.update(d)
    every = np.concatenate(data)
    np.testing.assert_allclose(norm.mean, every.mean(0))
    np.testing.assert_allclose(norm.var, every.var(0))
    out = norm.normalize(torch.as_tensor(every, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(out.mean(0), 0.0, atol=1e-5)
    other = RunningNormalizer(4)
    other.load_state_dict(norm.state_dict())
    np.testing.assert_array_equal(other.mean, norm.mean)
    mean, inv_std = other.tensors("cpu")
    torch.testing.assert_close(inv_std, torch.as_tensor(1 / np.sqrt(norm.var + other.eps), dtype=torch.float32))


def test_normalizer_tensors_follow_every_update():
    norm = RunningNormalizer(2, eps=0.0)
    mean, inv_std = norm.tensors("cpu")
    norm.update(np.array([[1.0, 10.0], [3.0, 30.0]]))
    now_mean, now_inv_std = norm.tensors("cpu")
    for t in (mean, now_mean):  # tensors handed out earlier see the update too (CPU views)
        torch.testing.assert_close(t, torch.as_tensor(norm.mean, dtype=torch.float32))
    torch.testing.assert_close(now_inv_std, torch.as_tensor(1 / np.sqrt(norm.var), dtype=torch.float32))
    assert not np.allclose(norm.mean, 0.0)


# ----------------------------------------------------------------------------- the lean vector env
@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_lean_vector_env_steps_exactly_like_gymnasium(env_id):
    lean = LeanSyncVectorEnv([lambda: gym.make(env_id, max_episode_steps=25)] * 3)
    ref = gym.vector.SyncVectorEnv([lambda: gym.make(env_id, max_episode_steps=25)] * 3, autoreset_mode=SAME_STEP)
    assert lean.metadata["autoreset_mode"] == SAME_STEP
    obs_l, _ = lean.reset(seed=7)
    obs_r, _ = ref.reset(seed=7)
    np.testing.assert_array_equal(obs_l, obs_r)
    rng = np.random.default_rng(0)
    ended = 0
    for _ in range(120):
        action = np.stack([lean.single_action_space.sample() for _ in range(3)])
        if env_id == "CartPole-v1":
            action = rng.integers(0, 2, size=3)
        out_l, out_r = lean.step(action), ref.step(action)
        for a, b in zip(out_l[:4], out_r[:4]):
            np.testing.assert_array_equal(a, b)
        info_l, info_r = out_l[4], out_r[4]
        assert ("final_obs" in info_l) == ("final_obs" in info_r)
        if "final_obs" in info_r:
            np.testing.assert_array_equal(info_l["_final_obs"], info_r["_final_obs"])
            for i in np.flatnonzero(info_r["_final_obs"]):
                np.testing.assert_array_equal(info_l["final_obs"][i], info_r["final_obs"][i])
                ended += 1
        assert set(info_l) <= {"final_obs", "_final_obs"}
        out_l[0][:] = np.nan  # the returned observations are copies: the env's state is untouched
    assert ended >= 3  # episodes ended (time limit or termination) and reset inside step
    assert np.isfinite(lean.step(action)[0]).all()


# ----------------------------------------------------------------------------- EnvPool (vectorization="envpool")
def _envpool():
    return pytest.importorskip("envpool", reason='EnvPool is not installed (pip install ".[envpool]")')


ENVPOOL_LIMITS = {"CartPole-v1": 12, "Pendulum-v1": 5, "Hopper-v5": 20}  # short time limits: episodes end often
QUIET_BOX = pytest.mark.filterwarnings("ignore:.*precision lowered by casting:UserWarning")  # envpool.make's spaces


@QUIET_BOX
@pytest.mark.parametrize("env_id", ENVPOOL_LIMITS)
def test_envpool_steps_envpools_own_pool_with_its_reset_steps_taken_out(env_id):
    """EnvPoolVectorEnv against EnvPool's own NEXT_STEP pool of the same seeds, stepped alongside:
    the same transitions, except that where an episode ends ours has already reset (its first
    observation returned, the final one in infos) and EnvPool's reset step (reward 0, the action
    ignored) never happens; dtypes: the space's observations, float64 rewards, bool flags."""
    envpool = _envpool()
    n, limit = 3, ENVPOOL_LIMITS[env_id]
    ours = EnvPoolVectorEnv(env_id, n, max_episode_steps=limit)
    theirs = envpool.make(env_id, "gymnasium", num_envs=n, seed=[5 + i for i in range(n)], max_episode_steps=limit)
    assert ours.metadata["autoreset_mode"] == SAME_STEP and theirs.metadata["autoreset_mode"] != SAME_STEP
    obs, _ = ours.reset(seed=5)
    np.testing.assert_array_equal(obs, theirs.reset()[0])
    ours.action_space.seed(0)
    ended = {"terminated": 0, "truncated": 0}
    for _ in range(50):
        actions = ours.action_space.sample()
        if env_id == "CartPole-v1":
            actions[0] = 1  # env 0 pushes one way: its episodes terminate, the others' mostly run to the limit
        obs, rewards, terminated, truncated, infos = ours.step(actions)
        o, r, te, tr, _ = theirs.step(actions)
        assert obs.dtype == ours.single_observation_space.dtype and ours.single_observation_space.contains(obs[0])
        assert rewards.dtype == np.float64 and terminated.dtype == truncated.dtype == bool
        np.testing.assert_array_equal(rewards, r)
        np.testing.assert_array_equal(terminated, te)
        np.testing.assert_array_equal(truncated, tr)
        done = te | tr
        np.testing.assert_array_equal(obs[~done], o[~done])
        if not done.any():
            assert "final_obs" not in infos
            continue
        ids = np.flatnonzero(done)
        np.testing.assert_array_equal(infos["_final_obs"], done)
        for i in range(n):
            assert (infos["final_obs"][i] is None) == (not done[i])
        for i in ids:
            assert infos["final_obs"][i].dtype == obs.dtype
            np.testing.assert_array_equal(infos["final_obs"][i], o[i])
        o2, r2, te2, tr2, info2 = theirs.step(actions[ids], env_id=ids)  # EnvPool's own reset step
        assert (r2 == 0).all() and not (te2 | tr2).any() and (info2["elapsed_step"] == 0).all()
        np.testing.assert_array_equal(obs[ids], o2)  # ours returned that first observation already
        ended["terminated"] += int(terminated.sum())
        ended["truncated"] += int(truncated.sum())
    assert ended["truncated"] > 0 and (ended["terminated"] > 0 or env_id == "Pendulum-v1"), ended


class _RecordedEnvPool(EnvPoolVectorEnv):
    def step(self, actions):
        out = super().step(actions)
        self.steps.append(pickle.loads(pickle.dumps(out)))  # a deep copy
        return out


def test_envpool_rollouts_never_cross_a_reset_and_bootstrap_truncation_from_the_final_observation():
    _envpool()
    envs = _RecordedEnvPool("CartPole-v1", 2, max_episode_steps=3)  # 3 steps cannot end CartPole: all truncated
    envs.steps = []
    collector = RolloutCollector(envs, n_steps=7, device=torch.device("cpu"), normalizer=None,
                                 stats=EpisodeStats(2, 10))
    collector.reset(seed=0)

    def value(obs):
        return 1.0 + 10.0 * obs[:, 0] - 3.0 * obs[:, 2]

    batch = collector.collect(MLPPolicy(4, envs.single_action_space), value, torch.Generator().manual_seed(0),
                              gamma=0.5, lam=0.0)
    # Every episode is 3 transitions of reward 1: EnvPool's reward-0 reset step would make them longer.
    assert collector.stats.means() == (3.0, 3.0) and len(collector.stats.finished) == 4
    obs = batch.obs.view(7, 2, 4)
    for t, (o, rewards, terminated, truncated, infos) in enumerate(envs.steps):
        assert (rewards == 1).all() and not terminated.any() and truncated.all() == (t % 3 == 2)
        nxt = torch.as_tensor(np.stack(infos["final_obs"]) if truncated.all() else o)
        if t + 1 < 7:
            assert truncated.all() or torch.equal(obs[t + 1], nxt)  # the next step starts from o
            assert not truncated.all() or torch.equal(obs[t + 1], torch.as_tensor(o))  # o: the new episode's first
        expected = 1.0 + 0.5 * value(nxt) - value(obs[t])  # lam = 0: one-step advantages, truncation bootstrapped
        torch.testing.assert_close(batch.advantages.view(7, 2)[t], expected.float(), rtol=1e-5, atol=1e-5)
    assert (obs[[0, 3, 6]].abs() <= 0.05).all()  # first observations of episodes: CartPole's reset range


@QUIET_BOX
def test_envpool_seeds_env_i_with_seed_plus_i():
    envpool = _envpool()
    envs = EnvPoolVectorEnv("Pendulum-v1", 3)

    def alone(seed):
        return envpool.make("Pendulum-v1", "gymnasium", num_envs=1, seed=seed).reset()[0][0]

    first, _ = envs.reset(seed=7)
    for i in range(3):
        np.testing.assert_array_equal(first[i], alone(7 + i))
    envs.step(np.zeros((3, 1), np.float32))
    np.testing.assert_array_equal(envs.reset(seed=7)[0], first)  # a seed starts the same episodes again
    assert not np.array_equal(envs.reset()[0], first)  # no seed: the pool's streams go on
    folded, _ = envs.reset(seed=2**31 - 1)  # EnvPool's seeds are int32: (seed + i) mod 2**31
    np.testing.assert_array_equal(folded[1], alone(0))
    with pytest.raises(ValueError, match=r"seed: EnvPool seeds env i with seed \+ i; give one int"):
        envs.reset(seed=[1, 2, 3])
    with pytest.raises(ValueError, match="options: EnvPoolVectorEnv.reset takes none"):
        envs.reset(options={"reset_mask": np.ones(3, bool)})
    assert 1 <= envs.num_threads <= len(__import__("os").sched_getaffinity(0))


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Pendulum-v1"])
def test_envpool_classic_control_steps_like_gymnasium_from_the_same_state(env_id):
    """EnvPool's classic control against gymnasium's from the same state, one step at a time (its
    seeding differs from gymnasium's, so episodes start elsewhere; from the same state a chaotic
    task's two float paths part after ~150 steps, docs/guide.md "EnvPool"): the same spaces,
    observations equal to float32 rounding, the same rewards and terminations; except Pendulum-v1
    where the speed clip (|θ'| = 8) binds: EnvPool integrates θ with the unclipped speed (gym <= 0.25's
    order), gymnasium with the clipped one."""
    _envpool()
    ours = EnvPoolVectorEnv(env_id, 1)
    ref = gym.make(env_id).unwrapped
    assert str(ours.single_observation_space) == str(ref.observation_space)  # what a checkpoint compares
    assert str(ours.single_action_space) == str(ref.action_space)
    ref.reset(seed=0)
    ours.action_space.seed(0)
    obs, _ = ours.reset(seed=0)
    clipped = 0
    for k in range(400):
        o = obs[0].astype(np.float64)
        action = ours.action_space.sample()
        if env_id == "Pendulum-v1" and k % 2:  # every other step pumps energy in, so that the speed clip binds
            action[:] = 2.0 * np.sign(o[2])
        if env_id == "CartPole-v1":
            ref.state, ref.steps_beyond_terminated = o, None
            step_action = int(action[0])
        else:
            theta, speed = np.arctan2(o[1], o[0]), o[2]
            ref.state = np.array([theta, speed])
            step_action = action[0]
            unclipped = speed + (3 * 10.0 / 2 * np.sin(theta) + 3.0 * np.clip(step_action[0], -2, 2)) * 0.05
        expected, reward, terminated, _, _ = ref.step(step_action)
        obs, rewards, te, tr, infos = ours.step(action)
        got = infos["final_obs"][0] if (te | tr)[0] else obs[0]
        if env_id == "Pendulum-v1" and abs(unclipped) > 8:
            clipped += 1
            angle = theta + unclipped * 0.05
            expected = np.array([np.cos(angle), np.sin(angle), np.clip(unclipped, -8, 8)])
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(rewards[0], reward, rtol=1e-6)  # EnvPool's rewards are float32
        assert te[0] == terminated
    assert env_id == "CartPole-v1" or clipped > 0


def test_envpool_mujoco_follows_gymnasium_from_the_same_state():
    """Hopper-v5 (fallen and lying, so that it runs 100 steps) from one state: EnvPool's MuJoCo build
    and gymnasium's mujoco differ by rounding from the first step (~1e-15, at MuJoCo 3.6.0 on both sides
    too), which Hopper keeps below 1e-10 for 100 steps; a chaotic task (HalfCheetah) amplifies it
    past 0.1 within ~100 steps (docs/guide.md, "EnvPool")."""
    envpool = _envpool()
    pytest.importorskip("mujoco", reason='gymnasium\'s MuJoCo envs are not installed (pip install ".[mujoco]")')
    pool = envpool.make("Hopper-v5", "gymnasium", num_envs=1, seed=0, terminate_when_unhealthy=False)
    ref = gym.make("Hopper-v5", terminate_when_unhealthy=False)
    obs, info = pool.reset()
    ref.reset(seed=0)
    ref.unwrapped.set_state(np.concatenate([info["x_position"], obs[0, :5]]), obs[0, 5:].copy())
    rng = np.random.default_rng(0)
    for _ in range(100):
        action = rng.uniform(-1, 1, size=3)
        obs, reward, *_ = pool.step(action[None])
        expected, expected_reward, *_ = ref.step(action)
        np.testing.assert_allclose(obs[0], expected, rtol=0, atol=1e-10)
        np.testing.assert_allclose(reward[0], expected_reward, rtol=1e-6)  # EnvPool's rewards are float32


@QUIET_BOX
def test_envpool_dict_observations_of_a_task_gymnasium_lacks():
    """A dm_control task (gymnasium has no such id: no spec to evaluate or save by) with Dict observations:
    the final observations are dicts of the ended rows, and the ended rows restart in place."""
    envpool = _envpool()
    envs = make_vec_env(gym.envs.registration.EnvSpec("HopperHop-v1", max_episode_steps=2), 2, "envpool")
    theirs = envpool.make("HopperHop-v1", "gymnasium", num_envs=2, seed=[3, 4], max_episode_steps=2)
    assert isinstance(envs.single_observation_space, spaces.Dict)
    obs, _ = envs.reset(seed=3)
    theirs.reset()
    actions = np.zeros((2, *envs.single_action_space.shape))
    for t in range(4):
        obs, _, _, truncated, infos = envs.step(actions)
        o = theirs.step(actions)[0]
        assert truncated.all() == (t % 2 == 1) and set(obs) == set(envs.single_observation_space.spaces)
        if truncated.all():
            first = theirs.step(actions, env_id=np.arange(2))[0]  # EnvPool's own reset step
            for key in obs:
                np.testing.assert_array_equal(np.stack([f[key] for f in infos["final_obs"]]), o[key])
                np.testing.assert_array_equal(obs[key], first[key])
    agent = trpo_ext.TRPO("HopperHop-v1", vectorization="envpool", n_envs=2, n_steps=4, critic_epochs=1, seed=0)
    assert agent.env_spec is None and agent.learn(8, progress_bar=False).num_timesteps == 8
    agent.close()


def test_envpool_errors_name_the_env_and_what_envpool_takes(monkeypatch):
    monkeypatch.setitem(sys.modules, "envpool", None)
    with pytest.raises(ImportError, match=r'needs EnvPool, which is not installed: pip install "\.\[envpool\]" in the '
                                          r'trpo_ext checkout \(or pip install envpool==1\.2\.5\); it needs Python >= 3\.11'):
        make_vec_env("CartPole-v1", 2, "envpool")
    monkeypatch.undo()
    _envpool()
    for env, error, words in [
        ("Hoper-v5", ValueError, r"env: EnvPool \S+ has no task 'Hoper-v5' \(close: Hopper-v5"),
        (gym.make("CartPole-v1"), ValueError, "got a gymnasium.Env instance: EnvPool steps its own C.. envs"),
        (lambda: gym.make("CartPole-v1"), ValueError, "got a callable"),
        (gym.envs.registration.EnvSpec("CartPole-v1", kwargs={"sutton_barto_reward": True}), ValueError,
         r"EnvPool's 'CartPole-v1' cannot take the option\(s\) \['sutton_barto_reward'\]: its options are "
         r"\['max_episode_steps', 'reward_threshold'\]"),
        (gym.envs.registration.EnvSpec("CartPole-v1", max_episode_steps="x"), ValueError, "refused the options"),
    ]:
        with pytest.raises(error, match=words):
            make_vec_env(env, 1, "envpool")
    with pytest.raises(ValueError, match=r"cannot take the option\(s\) \['seed'\]: trpo_ext sets them"):
        EnvPoolVectorEnv("CartPole-v1", 2, seed=3)
    spec = gym.envs.registration.EnvSpec("CartPole-v1", entry_point=None, max_episode_steps=7)
    envs = make_vec_env(spec, 2, "envpool")  # an EnvSpec's time limit (and kwargs EnvPool has) are honoured
    assert envs.options == {"max_episode_steps": 7} and envs.spec is spec
    assert EnvPoolVectorEnv("CartPole-v1", 2, max_episode_steps=7).spec is None  # not gymnasium's CartPole-v1
    with pytest.raises(AttributeError, match="no Python attribute 'action_masks'"):
        envs.call("action_masks")


# ----------------------------------------------------------------------------- env construction and spaces
def test_make_vec_env_accepts_id_env_callable_and_vector_env():
    assert make_vec_env("CartPole-v1", 3).num_envs == 3
    assert isinstance(make_vec_env("CartPole-v1", 2), LeanSyncVectorEnv)
    async_envs = make_vec_env("CartPole-v1", 2, "async")
    assert isinstance(async_envs, gym.vector.AsyncVectorEnv)
    async_envs.close()
    assert make_vec_env(gym.make("CartPole-v1"), 1).num_envs == 1
    assert make_vec_env(lambda: gym.make("CartPole-v1"), 2).metadata["autoreset_mode"] == SAME_STEP
    vec = gym.make_vec("CartPole-v1", 2, vectorization_mode="sync", vector_kwargs={"autoreset_mode": SAME_STEP})
    assert make_vec_env(vec, 5) is vec


def test_make_vec_env_errors():
    with pytest.raises(ValueError, match="SAME_STEP"):
        make_vec_env(gym.make_vec("CartPole-v1", 2), 2)
    with pytest.raises(ValueError, match="cannot be copied"):
        make_vec_env(gym.make("CartPole-v1"), 2)
    with pytest.raises(TypeError, match="env must be"):
        make_vec_env(42, 1)


@pytest.mark.parametrize("obs_space, action_space, match", [
    (spaces.Tuple([spaces.Discrete(2)]), spaces.Discrete(2), "observation_space must be"),
    (spaces.Dict({"a": spaces.Dict({"b": spaces.Discrete(2)})}), spaces.Discrete(2), r"observation_space\['a'\]"),
    (spaces.Box(-1, 1, (3,)), spaces.MultiDiscrete([[2, 3]]), "MultiDiscrete must be 1-D"),
    (spaces.Box(-1, 1, (3,)), spaces.Box(-1, 1, (2, 2)), r"action_space.*\(2, 2\)"),
    (spaces.Box(-1, 1, (3,)), spaces.Dict({"a": spaces.Discrete(2)}), "Dict actions"),
])
def test_unsupported_spaces_name_the_bad_space(obs_space, action_space, match):
    with pytest.raises(TypeError, match=match):
        ObservationCodec(obs_space)
        action_spec(action_space)


def test_supported_spaces():
    assert action_spec(spaces.Discrete(4)) == ActionSpec(CATEGORICAL, 4)
    assert action_spec(spaces.MultiDiscrete([2, 3])) == ActionSpec(CATEGORICAL, 5, (2, 3))
    assert action_spec(spaces.MultiBinary(3)) == ActionSpec(BERNOULLI, 3)
    assert action_spec(spaces.Box(-2, 2, (2,))) == ActionSpec(GAUSSIAN, 2)
    assert ObservationCodec(spaces.Box(-1, 1, (3,))).flat_dim == 3
    assert ObservationCodec(spaces.Box(-1, 1, (3, 2))).flat_dim == 6
    assert ObservationCodec(spaces.Discrete(5)).flat_dim == 5
    assert ObservationCodec(spaces.Box(0, 255, (40, 40, 3), np.uint8)).parts[0].shape == (3, 40, 40)
