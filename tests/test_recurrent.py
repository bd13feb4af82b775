"""The recurrent policies (trpo_ext.recurrent) and the agent with them: torch's cells, no state across
an episode start, the batch checks, RecurrentPPO's predict protocol, exact resume, refusals, and a
memory task learned. Their Fisher products and steps run in the matrices of test_fisher.py and
test_step.py; the fused ops in test_recurrent_ops.py."""
import copy

import gymnasium as gym
import numpy as np
import pytest
import torch

import trpo_ext
from trpo_ext.spaces import Sequences

from helpers import RECURRENT_CELLS, recurrent_problem


@pytest.mark.parametrize("n_layers", [1, 2])
@pytest.mark.parametrize("cell", RECURRENT_CELLS)
def test_the_cells_are_torchs(cell, n_layers):
    policy, seq, _, _ = recurrent_problem("categorical", cell, n_layers)
    plain = seq._replace(episode_starts=torch.zeros_like(seq.episode_starts))
    out, final = policy.recurrent_features(plain)
    state = plain.initial_state if cell == "lstm" else plain.initial_state[0]
    expected, expected_final = policy.rnn(plain.obs, state)
    assert torch.allclose(out, expected.flatten(0, 1), atol=1e-12, rtol=0)
    expected_final = expected_final if cell == "lstm" else (expected_final,)
    for a, b in zip(final, expected_final):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cell", RECURRENT_CELLS)
def test_a_state_never_leaks_across_an_episode_start(cell):
    """Everything before an episode start (observations, the initial state) changes nothing after it:
    the rows from the start on are those of a sequence that begins there from the zero state."""
    policy, seq, _, _ = recurrent_problem("gaussian", cell, 2, steps=7, n_seq=3)
    starts = torch.zeros_like(seq.episode_starts)
    starts[4, 1] = True
    seq = seq._replace(episode_starts=starts)
    other = Sequences(seq.obs.clone(), starts, tuple(s + 3.0 for s in seq.initial_state))
    other.obs[:4] += 5.0
    with torch.no_grad():
        a, b = policy(seq).mean.view(7, 3, -1), policy(other).mean.view(7, 3, -1)
        fresh = policy(Sequences(seq.obs[4:, 1:2], starts[4:, 1:2], policy.initial_state(1))).mean
    assert torch.equal(a[4:, 1], b[4:, 1])
    assert torch.allclose(a[4:, 1], fresh, atol=1e-14, rtol=0)  # another batch size: GEMMs may round otherwise
    assert not torch.equal(a[:4, 1], b[:4, 1])  # the change does reach the rows before the start


@pytest.mark.parametrize(("field", "change", "error", "match"), [
    ("obs", lambda s: s.obs[:, :, :3], ValueError, r"obs.obs must have shape \(T, B, 5\)"),
    ("obs", lambda s: s.obs.float(), TypeError, "obs.obs must be a torch.float64 tensor"),
    ("obs", lambda s: s.obs.index_fill(0, torch.tensor([2]), float("nan")), ValueError, "obs.obs contains NaN"),
    ("episode_starts", lambda s: s.episode_starts.int(), TypeError, "obs.episode_starts must be a torch.bool"),
    ("episode_starts", lambda s: s.episode_starts[:-1], ValueError, r"obs.episode_starts must have shape \(8, 4\)"),
    ("initial_state", lambda s: s.initial_state[:1], ValueError, r"obs.initial_state must be a tuple of 2 tensors"),
    ("initial_state", lambda s: tuple(t[:, :2] for t in s.initial_state), ValueError,
     r"obs.initial_state\[0\] must have shape \(1, 4, 5\)"),
])
def test_a_bad_sequence_batch_is_refused_by_name(field, change, error, match):
    policy, seq, v, _ = recurrent_problem("categorical", "lstm")
    bad = seq._replace(**{field: change(seq)})
    before = [p.detach().clone() for p in policy.parameters()]
    with pytest.raises(error, match=match):
        trpo_ext.fvp(policy, bad, v, path="generic")
    with pytest.raises(TypeError, match="must be a trpo_ext.Sequences"):
        trpo_ext.fvp(policy, seq.obs, v)
    assert all(torch.equal(b, p) for b, p in zip(before, policy.parameters()))


def _agent(env="CartPole-v1", cell="lstm", **kwargs):
    kwargs = {"n_envs": 3, "n_steps": 16, "seed": 0, "policy_kwargs": {"lstm_hidden_size": 6, "hidden": (8,)},
              **kwargs}
    return trpo_ext.TRPO(env, policy=RECURRENT_CELLS[cell], **kwargs)


@pytest.mark.parametrize("cell", RECURRENT_CELLS)
def test_predict_follows_recurrent_ppos_protocol(cell):
    """(action, state) for one observation or a batch; the state carried step by step gives the
    actions of the whole sequence at once; episode_start resets it; a bad state is refused by name."""
    agent = _agent(cell=cell)
    try:
        obs = np.random.default_rng(0).uniform(-0.2, 0.2, (5, 4)).astype(np.float32)
        action, state = agent.predict(obs[0])
        assert np.shape(action) == () and [s.shape for s in state] == [(1, 1, 6)] * len(state)
        actions, batch_state = agent.predict(obs[:3], episode_start=np.ones(3, bool), deterministic=True)
        assert actions.shape == (3,) and [s.shape for s in batch_state] == [(1, 3, 6)] * len(state)
        # Step by step with the carried state = the sequence at once (deterministic: the argmax).
        state, stepped = None, []
        for t in range(5):
            action, state = agent.predict(obs[t], state=state, episode_start=np.array([t == 0]), deterministic=True)
            stepped.append(int(action))
        seq = Sequences(torch.as_tensor(obs).unsqueeze(1), torch.tensor([[True]] + [[False]] * 4),
                        agent.policy.initial_state(1))
        with torch.no_grad():
            assert stepped == agent.policy(seq).probs.argmax(-1).tolist()
            # episode_start=True forgets the state: the same as a zero state
        assert np.array_equal(agent.predict(obs[2], state=state, episode_start=[True], deterministic=True)[0],
                              agent.predict(obs[2], deterministic=True)[0])
        with pytest.raises(ValueError, match="state must be None or the state predict returned"):
            agent.predict(obs[0], state=(np.zeros((1, 2, 6)),) * len(state))
        with pytest.raises(ValueError, match="episode_start must be None or 3 bools"):
            agent.predict(obs[:3], episode_start=[True])
        mean, _ = agent.evaluate(n_episodes=2)
        assert np.isfinite(mean)
    finally:
        agent.close()


@pytest.mark.parametrize("critic", [True, False])
def test_save_load_resumes_exactly(tmp_path, critic):
    """Networks, the critic's Adam state and the rollout's recurrent states: the resumed run equals
    the uninterrupted one bitwise (with the recurrent critic and with the feed-forward one)."""
    kwargs = {"policy_kwargs": {"lstm_hidden_size": 6, "hidden": (8,), "enable_critic_lstm": critic}}
    agent = _agent(**kwargs)
    try:
        agent.learn(96, progress_bar=False)
        assert isinstance(agent.value_net, trpo_ext.recurrent.RecurrentValue) == critic
        agent.save(tmp_path / "a.pt")
        resumed = trpo_ext.TRPO.load(tmp_path / "a.pt", restore_env_states=True)
        agent.learn(96, progress_bar=False)
        resumed.learn(96, progress_bar=False)
        for a, b in zip([*agent.policy.parameters(), *agent.value_net.parameters()],
                        [*resumed.policy.parameters(), *resumed.value_net.parameters()]):
            assert torch.equal(a, b)
        resumed.close()
    finally:
        agent.close()


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"policy_kwargs": {"shared_lstm": True}}, r"shared_lstm'\]=True is not supported"),
    ({"fvp_fraction": 0.5}, "a recurrent policy's products run through whole sequences"),
    ({"policy_kwargs": {"lstm_hidden_size": 0}}, "lstm_hidden_size"),
    ({"env": "trpo_ext/DictMatch-v0"}, "'MlpLstmPolicy' takes flat observations"),
])
def test_what_a_recurrent_agent_does_not_do_is_refused(kwargs, match):
    kwargs = copy.deepcopy(kwargs)
    env = kwargs.pop("env", "CartPole-v1")
    with pytest.raises(ValueError, match=match):
        _agent(env, **kwargs)


@pytest.mark.parametrize(("env", "kwargs"), [
    ("trpo_ext/CueRecall-v0", {"k": 3, "delay": 4}),
    ("trpo_ext/CueRecallContinuous-v0", {"delay": 4}),
])
def test_a_memory_task_is_learned(env, kwargs):
    """A cue shown once and needed a few steps later: beyond any memoryless policy's return."""
    agent = trpo_ext.TRPO(lambda: gym.make(env, **kwargs), policy="MlpLstmPolicy", n_envs=8, n_steps=32, seed=0,
                          policy_kwargs={"lstm_hidden_size": 16, "hidden": (16,)})  # the recurrent defaults
    try:
        bound = gym.make(env, **kwargs).unwrapped.best_memoryless
        agent.learn(12_000, progress_bar=False)
        mean, _ = agent.evaluate(n_episodes=20, env=gym.make(env, **kwargs))
        assert mean > bound + 0.1, (mean, bound)
    finally:
        agent.close()


@pytest.mark.parametrize("cell", RECURRENT_CELLS)
def test_the_critic_fits_on_pieces_that_give_the_rollouts_values(cell):
    """The recurrent critic's training batch (chunks cut at episode starts, padded, from the states the
    rollout recorded) gives, on its real rows, the values the critic gave step by step in the rollout."""
    agent = _agent("trpo_ext/CueRecall-v0", cell, n_steps=24, policy_kwargs={"lstm_hidden_size": 6, "hidden": (8,)})
    try:
        agent.collector.reset(seed=0)
        batch = agent.collector.collect(agent.policy, agent.value_net, agent.generator, 0.99, 0.95)
        seq, values = agent.collector.memory.critic_sequences(batch.obs.obs.flatten(0, 1), batch.values)
        assert bool(seq.valid.any(0).all()) and int(seq.valid.sum()) == 24 * 3  # every row once, no empty piece
        assert not bool(seq.episode_starts.any())
        with torch.no_grad():
            got = agent.value_net(seq)
        valid = seq.valid.flatten()
        assert torch.allclose(got[valid], values[valid], atol=1e-5, rtol=0)
    finally:
        agent.close()
