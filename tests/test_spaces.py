"""Every supported space end to end through the public API (trpo_ext.toy_envs' matching tasks: the
best return is 16, a random policy gets far less), the generic path's output Fishers for the new
distributions and masks against the double-backprop reference, predict on raw observations,
save / load, and the errors for what is refused."""
import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from torch import nn

import trpo_ext
from trpo_ext import TRPO, reference, toy_envs
from trpo_ext.distributions import action_spec
from trpo_ext._ops import flat_vector
from trpo_ext.policies import FeaturePolicy, built_in_policy, default_name, fused_spec, recurrent_fused_spec
from trpo_ext.spaces import ObservationCodec, pack, unpack

from helpers import random_mask, rel_err, sample_batch

FAST = dict(n_envs=4, n_steps=64, critic_epochs=5, seed=0)


def learned(agent, steps, episodes=10) -> float:
    agent.learn(steps, progress_bar=False)
    mean, _ = agent.evaluate(episodes)
    agent.close()
    return mean


# ----------------------------------------------------------------------------- learning, each space
@pytest.mark.parametrize("env_id, policy, steps, floor", [
    pytest.param("trpo_ext/MultiDiscreteMatch-v0", "auto", 5000, 13.0, id="multidiscrete-fused"),  # random ~4.2
    pytest.param("trpo_ext/MultiBinaryMatch-v0", "auto", 5000, 13.0, id="multibinary-fused"),  # random 8
    pytest.param("trpo_ext/MaskedChoice-v0", "auto", 4000, 14.0, id="masked-method-fused"),  # random ~5.6 with masks
    pytest.param("trpo_ext/MaskedChoiceInfo-v0", "auto", 4000, 14.0, id="masked-info-fused"),
    pytest.param("trpo_ext/DiscreteObsMatch-v0", "auto", 4000, 14.0, id="discrete-obs-fused"),  # random 3.2
    pytest.param("trpo_ext/DictMatch-v0", "MultiInputPolicy", 4000, 14.0, id="dict"),  # random 4
    pytest.param("trpo_ext/ImageSide-v0", "CnnPolicy", 2048, 14.0, id="image-hwc"),  # random 8
    pytest.param("trpo_ext/GrayImageSide-v0", "CnnPolicy", 2048, 14.0, id="image-hwc-1-channel"),  # random 8
    pytest.param("trpo_ext/StackedImageSide-v0", "auto", 2048, 12.5, id="image-frame-stack"),  # random 8
    pytest.param("trpo_ext/DictImageSide-v0", "auto", 2048, 14.0, id="dict-image-chw"),
    pytest.param("trpo_ext/ImageSide-v0", "CnnLstmPolicy", 2048, 12.5, id="image-hwc-lstm"),
    pytest.param("trpo_ext/DictImageSide-v0", "MultiInputGruPolicy", 2048, 12.5, id="dict-image-chw-gru"),
])
def test_each_space_learns_clearly_better_than_random(env_id, policy, steps, floor):
    # A recurrent policy's generic products step through time in Python: shorter sequences, a small RNN.
    small_rnn = dict(n_envs=8, n_steps=16, policy_kwargs={"lstm_hidden_size": 32})
    agent = TRPO(env_id, policy=policy, **{**FAST, **(small_rnn if policy in trpo_ext.recurrent.RECURRENT else {})})
    assert (fused_spec(agent.policy) is not None) == env_id.endswith(("Match-v0", "Choice-v0", "ChoiceInfo-v0")) \
        or policy != "auto"
    # MaskedChoice raises on a masked action: learning at all shows none was ever sampled.
    assert learned(agent, steps) >= floor


def _custom(obs_space, action_space):
    """A plain nn.Module policy for flat observations and any action space (the generic path)."""
    spec, codec = action_spec(action_space), ObservationCodec(obs_space)

    class Policy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(codec.flat_dim, 32), nn.Tanh(), nn.Linear(32, spec.width))

        def forward(self, obs):
            return spec.distribution(self.net(obs))
    return Policy()


@pytest.mark.parametrize("env_id, floor", [("trpo_ext/MultiDiscreteMatch-v0", 12.0),  # random ~4.2
                                           ("trpo_ext/MultiBinaryMatch-v0", 11.5),  # random 8
                                           ("trpo_ext/MaskedChoice-v0", 12.0)])  # random ~5.6
def test_a_custom_module_learns_the_new_action_spaces_on_the_generic_path(env_id, floor):
    agent = TRPO(env_id, policy=_custom, **FAST)
    assert fused_spec(agent.policy) is None
    assert learned(agent, 4000) >= floor


# ----------------------------------------------------------------------------- generic Fishers vs the reference
@pytest.mark.parametrize("space, use_mask", [
    (spaces.MultiDiscrete([3, 2, 4]), False), (spaces.MultiDiscrete([3, 2, 4]), True),
    (spaces.MultiBinary(5), False), (spaces.Discrete(6), True),
])
def test_generic_output_fishers_equal_double_backprop_float64(space, use_mask):
    torch.manual_seed(0)
    policy = _custom(spaces.Box(-1, 1, (7,)), space).double()
    obs, v = torch.randn(50, 7, dtype=torch.float64), torch.randn(sum(p.numel() for p in policy.parameters()),
                                                                  dtype=torch.float64)
    mask = random_mask(action_spec(space), 50, torch.Generator().manual_seed(0)) if use_mask else None
    expected = reference.fvp(policy, obs, v, damping=0.1, action_mask=mask)
    with torch.no_grad():  # one product of what generic_cg_solve iterates
        product = trpo_ext.generic.generic_products(policy, obs, list(policy.parameters()), mask)(v) + 0.1 * v
    assert rel_err(product, expected) < 1e-10


@pytest.mark.parametrize("cell", [None, "Lstm", "Gru"], ids=["feed-forward", "lstm", "gru"])
@pytest.mark.parametrize("env", [toy_envs.DictImageSide, toy_envs.GrayImageSide, toy_envs.StackedImageSide],
                         ids=["dict-image-chw", "image-hwc-1-channel", "image-frame-stack"])
def test_generic_fisher_of_cnn_and_dict_policies_equals_double_backprop(env, cell):
    """CnnPolicy / MultiInputPolicy, and their recurrent twins (the extractor on packed rows before the
    RNN, Sequences with an episode start inside)."""
    torch.manual_seed(0)
    space = env().observation_space
    space.seed(0)
    codec = ObservationCodec(space)
    name = default_name(codec) if cell is None else default_name(codec).replace("Policy", f"{cell}Policy")
    recurrent = {"lstm_hidden_size": 4, "n_lstm_layers": 1}
    policy = trpo_ext.policies.built_in_policy(name, codec, spaces.Discrete(2), (16,), "tanh", 0.0, None,
                                               recurrent).double()
    obs = codec.preprocess(codec.batch_raw([space.sample() for _ in range(6)]), "cpu")  # as the rollout sees them
    obs = {k: t.double() for k, t in obs.items()} if isinstance(obs, dict) else obs.double()
    if cell is not None:  # 2 sequences of 3 steps, the second starting an episode at step 1
        starts = torch.tensor([[True, False], [False, True], [False, False]])
        obs = trpo_ext.Sequences(pack(obs)[0].view(3, 2, -1), starts, tuple(
            0.5 * torch.randn_like(s) for s in policy.initial_state(2)))
        assert recurrent_fused_spec(policy) is None  # the encoder: the generic path
    params = list(policy.parameters())
    v = torch.randn(sum(p.numel() for p in params), dtype=torch.float64)
    expected = reference.fvp(policy, obs, v)
    with torch.no_grad():
        got = trpo_ext.generic.generic_products(policy, obs, params)(v)
    assert rel_err(got, expected) < 1e-10


def test_predict_takes_observations_as_the_env_returns_them():
    agent = TRPO("trpo_ext/DictImageSide-v0", **FAST)
    env = gym.make("trpo_ext/DictImageSide-v0")
    obs, _ = env.reset(seed=0)
    action, state = agent.predict(obs)
    assert state is None and env.action_space.contains(action)
    batch = {k: np.stack([v, v]) for k, v in obs.items()}
    actions, _ = agent.predict(batch, deterministic=True)
    assert actions.shape == (2,) and actions[0] == actions[1]
    with pytest.raises(ValueError, match=r"lacks the keys \['image'\]"):
        agent.predict({"hint": obs["hint"]})
    with pytest.raises(ValueError, match=r"obs\['image'\] must have shape \(1, 40, 40\)"):
        agent.predict({"image": obs["image"][0], "hint": obs["hint"]})
    agent.close()

    md = TRPO("trpo_ext/MultiBinaryMatch-v0", **FAST)
    a, _ = md.predict(np.ones(6, np.float32))
    assert a.dtype == md.action_space.dtype and md.action_space.contains(a)
    ints = TRPO("trpo_ext/DiscreteObsMatch-v0", **FAST)
    assert ints.predict(3)[0] in range(5) and ints.predict(np.array([0, 4]))[0].shape == (2,)
    md.close()
    ints.close()


def test_predict_never_returns_a_masked_action():
    agent = TRPO("trpo_ext/MaskedChoice-v0", **FAST)
    obs = np.zeros((200, 12), np.float32)
    mask = np.zeros((200, 6), bool)
    mask[:, 4] = True
    mask[::2, 1] = True
    actions, _ = agent.predict(obs, action_masks=mask)
    assert set(actions[1::2].tolist()) == {4} and set(actions.tolist()) <= {1, 4}
    assert agent.predict(obs[0], action_masks=mask[1], deterministic=True)[0] == 4
    with pytest.raises(ValueError, match=r"must have shape \(B, 6\)"):
        agent.predict(obs[0], action_masks=np.ones(5, bool))
    with pytest.raises(ValueError, match="row 0 allows no action"):
        agent.predict(obs[0], action_masks=np.zeros(6, bool))
    agent.close()


@pytest.mark.parametrize("env_id, policy", [("trpo_ext/ImageSide-v0", "auto"), ("trpo_ext/DictMatch-v0", "auto"),
                                            ("trpo_ext/MaskedChoice-v0", "auto"), ("trpo_ext/MultiDiscreteMatch-v0", "auto"),
                                            ("trpo_ext/DictImageSide-v0", "MultiInputLstmPolicy")])
def test_save_load_resume_for_the_new_spaces(env_id, policy, tmp_path):
    agent = TRPO(env_id, policy=policy, **dict(FAST, n_steps=16))
    agent.learn(64, progress_bar=False)
    agent.save(tmp_path / "model.pt")
    loaded = TRPO.load(tmp_path / "model.pt", restore_env_states=True)
    assert type(loaded.policy) is type(agent.policy)
    for a, b in zip(agent.policy.parameters(), loaded.policy.parameters()):
        assert torch.equal(a, b)
    agent.learn(64, progress_bar=False)  # the same next update from the original and the loaded agent
    loaded.learn(64, progress_bar=False)
    for a, b in zip(agent.policy.parameters(), loaded.policy.parameters()):
        assert torch.equal(a, b)
    fresh = TRPO.load(tmp_path / "model.pt")  # fresh envs: their own episodes
    fresh.learn(64, progress_bar=False)
    for a in (agent, loaded, fresh):
        a.close()


def test_normalize_obs_normalizes_the_box_parts_only():
    agent = TRPO("trpo_ext/DictMatch-v0", normalize_obs=True, **dict(FAST, n_steps=16))
    agent.learn(64, progress_bar=False)
    assert agent.normalizer.mean.shape == (3,)  # "noise" only; "target" is a one-hot
    obs = agent.inference.observe({"target": np.array([2]), "noise": np.array([[0.5, 0.0, -0.5]], np.float32)})
    assert obs["target"].tolist() == [[0.0, 0.0, 1.0, 0.0]]
    agent.close()
    with pytest.raises(ValueError, match="has none .images are scaled"):
        TRPO("trpo_ext/ImageSide-v0", normalize_obs=True, **FAST)


def test_env_masks_that_are_wrong_are_refused():
    class BadMasks(toy_envs.MaskedChoice):
        def action_masks(self):
            return np.zeros(6, bool)

    agent = TRPO(lambda: BadMasks(), **FAST)
    with pytest.raises(ValueError, match="allows no action"):
        agent.learn(64, progress_bar=False)
    agent.close()

    class BadLater(toy_envs.MaskedChoice):  # fine at reset, empty from the third step on
        calls = 0

        def action_masks(self):
            self.calls += 1
            return super().action_masks() if self.calls < 3 else np.zeros(6, bool)

    agent = TRPO(lambda: BadLater(), **FAST)
    with pytest.raises(ValueError, match=r"^at step 2 of this rollout: the env's action masks \(method\): env 0 "
                                         r"allows no action; .*; the rollout was discarded"):
        agent.learn(64, progress_bar=False)
    assert agent.num_timesteps == 0
    agent.close()


def test_step_refuses_a_mask_that_rules_out_a_taken_action():
    policy = _custom(spaces.Box(-1, 1, (3,)), spaces.Discrete(4))
    obs, actions = torch.randn(8, 3), torch.zeros(8, dtype=torch.long)
    mask = torch.ones(8, 4, dtype=torch.bool)
    mask[5, 0] = False
    with pytest.raises(ValueError, match=r"the action of row 5 \(0\) is masked"):
        trpo_ext.trust_region_step(policy, obs, actions, torch.randn(8), action_mask=mask)
    with pytest.raises(ValueError, match=r"action_mask must have shape \(8, 4\)"):
        trpo_ext.trust_region_step(policy, obs, actions, torch.randn(8), action_mask=mask[:, :3])


def test_pack_unpack_round_trip_dict_batches():
    obs = {"image": torch.rand(3, 1, 40, 40), "hint": torch.randn(3, 1)}
    flat, layout = pack(obs)
    assert flat.shape == (3, 1601)
    back = unpack(flat, layout)
    assert all(torch.equal(back[k], obs[k]) for k in obs)


def test_multi_input_policy_is_a_feature_policy_with_a_cnn_per_image():
    agent = TRPO("trpo_ext/DictImageSide-v0", **FAST)
    assert isinstance(agent.policy, FeaturePolicy) and len(agent.policy.features.cnns) == 1
    assert agent.network_names == {"policy": "MultiInputPolicy", "value_net": "MultiInputPolicy"}
    agent.close()


# ----------------------------------------------------------------------------- every image layout
# HWC and CHW, 1, 3 or 4 channels (a frame stack), square or not, from NatureCNN's smallest input up to Atari's.
IMAGE_SHAPES = [(40, 40, 1), (1, 40, 40), (40, 40, 3), (3, 40, 40), (40, 40, 4), (4, 40, 40), (36, 36, 1),
                (37, 53, 3), (84, 84, 1), (4, 84, 84)]


def _image_step(shape, rows=slice(None), process_group=None):
    """The CnnPolicy (float64) of a uint8 image space of `shape` after one trust-region step on the
    `rows` of a batch of 8 noise images (the same batch, policy and actions on every call): (the
    step's record, the preprocessed batch, the step θ' - θ)."""
    codec = ObservationCodec(spaces.Box(0, 255, shape, np.uint8))
    policy = built_in_policy("CnnPolicy", codec, spaces.Discrete(3), (), "tanh", 0.0).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # float64 draws, the same in every process (the init's float32 QR is not, at 1e-7, across
        for p in policy.parameters():  # thread counts)
            scale = (2 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1
            p.copy_(scale * torch.randn(p.shape, generator=g, dtype=torch.float64))
    raw = np.random.default_rng(0).integers(0, 256, (8, *shape), dtype=np.uint8)
    obs = codec.preprocess(raw, "cpu").double()
    actions, advantages = sample_batch(policy, obs)
    before = flat_vector(policy.parameters()).detach()
    # Damping 1 and 5 CG iterations: the default 10 at damping 0.1 amplify any change of summation order
    # (the batch's row order, say) to up to 2e-5 of the step here (84 x 84); these keep it near 1e-14.
    record = trpo_ext.trust_region_step(policy, obs[rows], actions[rows], advantages[rows], damping=1.0, cg_iters=5,
                                        process_group=process_group)
    return record, obs, flat_vector(policy.parameters()).detach() - before


@pytest.mark.parametrize("shape", IMAGE_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_every_image_layout_takes_a_trust_region_step(shape):
    record, obs, _ = _image_step(shape)
    channels = min(shape)
    assert obs.shape[1] == channels and obs.stride() == torch.empty(obs.shape).stride()  # CHW, row-major
    assert record.accepted and 0 < record.kl <= 0.01 and record.improvement > 0


def _two_rank_image_steps(rank, init_file, out_dir):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        shard = slice(0, 3) if rank == 0 else slice(3, 8)  # shards of different sizes
        torch.save({shape: _image_step(shape, shard, dist.group.WORLD)[2] for shape in IMAGE_SHAPES},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_image_layout_takes_a_data_parallel_step(tmp_path):
    """Two gloo ranks, each with its shard of the batch, take the step one process takes on all of it."""
    torch.multiprocessing.spawn(_two_rank_image_steps, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for shape in IMAGE_SHAPES:
        single = _image_step(shape)[2]
        assert torch.equal(ranks[0][shape], ranks[1][shape]), shape
        assert rel_err(ranks[0][shape], single) <= 1e-10, shape


def test_an_image_below_what_the_cnn_takes_is_refused_with_the_smallest_size():
    class Small(toy_envs.GrayImageSide):
        size = 35

    with pytest.raises(ValueError, match=r"NatureCNN needs images of at least 36 x 36 pixels .*got 35 x 35 \(the image "
                                         r"as \(C, H, W\): \(1, 35, 35\)\)"):
        TRPO(lambda: Small(), **FAST)


# ----------------------------------------------------------------------------- memory tasks and NoVel envs
MEMORY_IDS = ["trpo_ext/CueRecall-v0", "trpo_ext/CueRecallContinuous-v0"]
NO_VEL = {"trpo_ext/CartPoleNoVel-v1": ("CartPole-v1", [1, 3], 500), "trpo_ext/PendulumNoVel-v1": ("Pendulum-v1", [2], 200)}


@pytest.mark.filterwarnings("ignore::UserWarning")  # gymnasium's notes on wrapped envs and CartPole's infinite bounds
@pytest.mark.parametrize("env_id, kwargs", [(i, {}) for i in MEMORY_IDS + list(NO_VEL)]
                         + [("trpo_ext/CueRecall-v0", dict(k=7, delay=0)),
                            ("trpo_ext/CueRecallContinuous-v0", dict(delay=3, uniform_cue=True))])
def test_memory_and_no_vel_envs_pass_gymnasiums_env_checker(env_id, kwargs):
    from gymnasium.utils.env_checker import check_env

    env = gym.make(env_id, **kwargs)
    check_env(env if env_id in NO_VEL else env.unwrapped, skip_render_check=True)
    env.close()


def _play(env, policy, seed):
    """One episode; `policy(obs, history)` sees every observation so far (history), the last one first."""
    obs, _ = env.reset(seed=seed)
    history, total, done = [obs], 0.0, False
    while not done:
        obs, reward, terminated, truncated, _ = env.step(policy(obs, history))
        history.append(obs)
        total += reward
        done = terminated or truncated
    return total, history


@pytest.mark.parametrize("k, delay", [(4, 8), (3, 2), (2, 0)])
def test_cue_recall_pays_memory_only(k, delay):
    """The recall step's observation is one and the same whatever the cue (so a memoryless policy acts
    there alike for every cue and is right 1 / k of the time at best), the cue is uniform, and a policy
    that remembers the first observation is always right."""
    env = gym.make("trpo_ext/CueRecall-v0", k=k, delay=delay)
    assert env.unwrapped.best_memoryless == pytest.approx(1 / k)
    recall_obs, cues, constant = set(), [], np.zeros(k)
    for seed in range(400):
        total, history = _play(env, lambda obs, h: int(np.argmax(h[0][:k])), seed)
        assert total == 1.0 and len(history) == delay + 3
        cue = int(np.argmax(history[0][:k]))
        cues.append(cue)
        recall_obs.add(history[delay + 1].tobytes())
        assert all(not h[:k].any() for h in history[1:])  # shown once
        for action in range(k):
            constant[action] += _play(env, lambda obs, h: action, seed)[0]
    assert len(recall_obs) == 1
    assert np.allclose(np.bincount(cues, minlength=k) / 400, 1 / k, atol=0.08)
    assert np.allclose(constant / 400, 1 / k, atol=0.08)
    assert np.isclose(constant.sum() / 400, 1.0)  # exactly one constant action is right in each episode
    env.close()


@pytest.mark.parametrize("uniform_cue, bound", [(False, -1.0), (True, -0.5)])
def test_cue_recall_continuous_memoryless_bound(uniform_cue, bound):
    env = gym.make("trpo_ext/CueRecallContinuous-v0", uniform_cue=uniform_cue)
    assert env.unwrapped.best_memoryless == bound
    remembered = [_play(env, lambda obs, h: np.array([h[0][0]], np.float32), seed)[0] for seed in range(200)]
    assert max(abs(r) for r in remembered) < 1e-6
    for action in (-1.0, -0.3, 0.0, 0.6, 1.0):
        played = [_play(env, lambda obs, h: np.array([action], np.float32), seed) for seed in range(800)]
        returns, cues = np.array([p[0] for p in played]), np.array([p[1][0][0] for p in played])
        assert np.allclose(returns, -np.abs(np.float32(action) - cues), atol=1e-6)
        assert returns.mean() <= bound + 0.05
        if not uniform_cue:  # each cue ±1 half the time, and |a - 1| + |a + 1| = 2 on [-1, 1]
            assert set(cues) == {-1.0, 1.0} and abs((cues == 1).mean() - 0.5) < 0.05
            assert (returns[cues == 1].mean() + returns[cues == -1].mean()) / 2 == pytest.approx(-1.0)
    recall = {_play(env, lambda obs, h: np.zeros(1, np.float32), seed)[1][-2].tobytes() for seed in range(50)}
    assert len(recall) == 1
    env.close()


@pytest.mark.parametrize("env_id", MEMORY_IDS + list(NO_VEL))
def test_memory_and_no_vel_envs_are_deterministic_under_seeds(env_id):
    def episode(seed):
        env = gym.make(env_id)
        env.action_space.seed(seed)
        _, history = _play(env, lambda obs, h: env.action_space.sample(), seed)
        env.close()
        return np.array(history)

    assert np.array_equal(episode(3), episode(3))
    assert not all(np.array_equal(episode(s)[0], episode(0)[0]) for s in range(1, 6))


@pytest.mark.parametrize("env_id", list(NO_VEL))
def test_no_vel_envs_are_the_base_env_with_the_zoos_velocities_zeroed(env_id):
    base_id, velocities, limit = NO_VEL[env_id]
    env, base = gym.make(env_id), gym.make(base_id)
    assert env.observation_space == base.observation_space and env.action_space == base.action_space
    keep = [i for i in range(base.observation_space.shape[0]) if i not in velocities]
    obs, _ = env.reset(seed=5)
    base_obs, _ = base.reset(seed=5)
    env.action_space.seed(5)
    steps, done = 0, False
    while not done:
        assert not obs[velocities].any() and np.array_equal(obs[keep], base_obs[keep])
        action = env.action_space.sample()
        obs, reward, terminated, truncated, _ = env.step(action)
        base_obs, base_reward, *_ = base.step(action)
        assert reward == base_reward
        steps, done = steps + 1, terminated or truncated
    assert truncated or steps < limit
    assert steps <= limit


@pytest.mark.parametrize("env_id", MEMORY_IDS + list(NO_VEL))
def test_memory_and_no_vel_ids_train_a_recurrent_trpo(env_id):
    agent = TRPO(env_id, policy="MlpLstmPolicy", n_envs=2, n_steps=16, seed=0, policy_kwargs={"lstm_hidden_size": 8})
    agent.learn(64, progress_bar=False)
    action, state = agent.predict(gym.make(env_id).reset(seed=0)[0], state=None, episode_start=None, deterministic=True)
    assert agent.action_space.contains(np.asarray(action, dtype=agent.action_space.dtype).reshape(agent.action_space.shape))
    agent.close()
