"""Data-parallel training on torch.distributed (docs/distributed.md), with real gloo ranks on the CPU:
each test's workers (tests/dist_workers.py) run under torch.distributed.run."""
import os
import subprocess
import sys

import pytest
import torch

from dist_workers import CONSTRAINED_KEYS, STEP_KEYS
from helpers import rel_err

HERE = os.path.dirname(__file__)
SHARED_RECORD_FIELDS = ("accepted", "kl", "improvement", "expected_improvement", "line_search_steps",
                        "cg_iterations", "cg_residual")


def launch(case: str, out_dir, nproc: int = 2, timeout: float = 240, extra=()):
    """Runs dist_workers.py CASE under torch.distributed.run; returns the ranks' saved results."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--monitor-interval=0.2",
           os.path.join(HERE, "dist_workers.py"), case, str(out_dir), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(nproc)]


@pytest.fixture(scope="module")
def step_results(tmp_path_factory):
    return launch("step", tmp_path_factory.mktemp("step"))


def _step_keys():
    return [(str(dtype), case, path, split, sub) for dtype, case, path, split, sub in STEP_KEYS]


@pytest.mark.parametrize("key", _step_keys(), ids=lambda k: "-".join(str(p) for p in k))
def test_two_rank_step_equals_one_process_on_the_whole_batch(step_results, key):
    rank0, rank1 = step_results[0][key], step_results[1][key]
    dist_result, single = rank0["distributed"], rank0["single"]
    # Every rank takes the same step, exactly.
    for name in ("g", "x", "params"):
        assert torch.equal(dist_result[name], rank1["distributed"][name]), name
    for field in SHARED_RECORD_FIELDS:  # entropy and policy_std describe each rank's own shard
        assert getattr(dist_result["record"], field) == getattr(rank1["distributed"]["record"], field), field
    # And it is the one-process step on the concatenated shards.
    d, s = dist_result["record"], single["record"]
    assert d.accepted and s.accepted
    assert d.line_search_steps == s.line_search_steps and d.cg_iterations == s.cg_iterations
    if key[0] == "torch.float64":
        for name in ("g", "x", "params"):
            assert rel_err(dist_result[name], single[name]) <= 1e-10, name
        assert float(dist_result["xAx"]) == pytest.approx(float(single["xAx"]), rel=1e-10)
        assert d.kl == pytest.approx(s.kl, rel=1e-10) and d.improvement == pytest.approx(s.improvement, rel=1e-10)
    else:
        # float32: the gradient and θ within 1e-5; the CG direction amplifies rounding by the
        # system's conditioning, so it is held to the error float32 itself makes on this solve
        # (against the float64 solve of the same problem), whichever is larger.
        twin = step_results[0][("torch.float64", *key[1:])]["single"]
        assert rel_err(dist_result["g"], single["g"]) <= 1e-5
        assert rel_err(dist_result["params"], single["params"]) <= 1e-5
        own_error = rel_err(single["x"], twin["x"])
        assert rel_err(dist_result["x"], single["x"]) <= max(1e-5, 4 * own_error)
        assert d.kl == pytest.approx(s.kl, rel=1e-3, abs=1e-7)


@pytest.fixture(scope="module")
def constrained_results(tmp_path_factory):
    return launch("constrained", tmp_path_factory.mktemp("constrained"))


@pytest.mark.parametrize("key", CONSTRAINED_KEYS, ids=lambda k: "-".join(k))
def test_two_rank_constrained_step_equals_one_process_on_the_whole_batch(constrained_results, key):
    # The CPO step's two gradients, its two-column solve (one reduction per product for both
    # columns), the dual and the trials' KL, reward and cost: every rank the same, and the one-process step.
    mine, other, single = (constrained_results[0][key]["distributed"], constrained_results[1][key]["distributed"],
                           constrained_results[0][key]["single"])
    assert torch.equal(mine["params"], other["params"])
    d, s = mine["record"], single["record"]
    assert d.case == s.case and d.case in (0, 1) and d.accepted and s.accepted
    assert d.line_search_steps == s.line_search_steps
    assert d.cg_iterations == s.cg_iterations and d.nu == pytest.approx(s.nu, rel=1e-8)
    assert rel_err(mine["params"], single["params"]) <= 1e-10
    assert d.cost_change == pytest.approx(s.cost_change, rel=1e-8)


@pytest.mark.parametrize("key", [k for k in _step_keys() if k[3] == "equal" and not k[4]],
                         ids=lambda k: "-".join(str(p) for p in k[:3]))
def test_world_size_one_through_the_distributed_path_is_the_plain_path_bitwise(step_results, key):
    entry = step_results[0][key]
    plain, one = entry["plain_half"], entry["world1_half"]
    for name in ("g", "x", "xAx", "params"):
        assert torch.equal(plain[name], one[name]), name
    assert plain["record"].kl == one["record"].kl and plain["record"].improvement == one["record"].improvement


@pytest.mark.parametrize("path", ["fused", "generic"])
def test_collectives_per_step_are_as_documented(step_results, path):
    # docs/distributed.md: the batch sizes, the gradient, one per CG product, one per line-search trial.
    for rank in step_results:
        n, cg_iterations, trials = rank["collectives"][path]
        assert cg_iterations >= 1 and trials >= 1
        assert n == 2 + cg_iterations + trials


# ----------------------------------------------------------------------------- the agent
@pytest.fixture(scope="module")
def agent_results(tmp_path_factory):
    import trpo_ext

    out = tmp_path_factory.mktemp("agent")
    single = trpo_ext.TRPO("CartPole-v1", n_envs=2, n_steps=64, normalize_obs=True, seed=0)
    single.learn(256, progress_bar=False)
    single.save(out / "single.pt")
    single.close()
    return out, launch("agent", out)


def test_critic_on_shards_equals_the_critic_on_the_whole_batch(agent_results):
    _, ranks = agent_results
    for rank in ranks:
        (loss, params), (single_loss, single_params) = rank["critic"]["distributed"], rank["critic"]["single"]
        assert torch.equal(params, single_params) and loss == single_loss


def test_critic_reducing_minibatch_gradients_equals_one_process_with_the_minibatches_together(agent_results):
    _, ranks = agent_results
    assert torch.equal(ranks[0]["critic_reduce"][1], ranks[1]["critic_reduce"][1])  # identical replicas
    for rank in ranks:
        loss, params, single_loss, single_params = rank["critic_reduce"]
        assert rel_err(params, single_params) <= 1e-12
        assert loss == pytest.approx(single_loss, rel=1e-12)


def test_observation_statistics_merge_what_every_rank_saw(agent_results):
    import numpy as np

    _, ranks = agent_results
    count0, mean0, var0, _ = ranks[0]["normalizer"]
    count1, mean1, var1, _ = ranks[1]["normalizer"]
    assert count0 == count1 and np.array_equal(mean0, mean1) and np.array_equal(var0, var1)
    # One process that saw all of it.
    from trpo_ext.normalization import RunningNormalizer

    alone = RunningNormalizer(3)
    for rank in ranks:
        for batch in rank["normalizer"][3]:
            alone.update(batch)
    assert count0 == pytest.approx(alone.count, rel=1e-15)
    np.testing.assert_allclose(mean0, alone.mean, rtol=1e-12)
    np.testing.assert_allclose(var0, alone.var, rtol=1e-12)


def test_data_parallel_agent_keeps_identical_replicas_and_counts_every_rank(agent_results):
    out, ranks = agent_results
    a0, a1 = ranks[0]["agent"], ranks[1]["agent"]
    assert torch.equal(a0["policy"], a1["policy"]) and torch.equal(a0["value"], a1["value"])
    assert (a0["obs_mean"] == a1["obs_mean"]).all()
    # 2 ranks x 2 envs x 64 steps = 256 steps per update: 4 updates for 1024 steps.
    assert a0["num_timesteps"] == a1["num_timesteps"] == 1024 and a0["n_updates"] == 4
    assert a0["world_size"] == 2 and a0["record"]["world_size"] == 2
    assert a0["record"]["ep_return_mean"] == a1["record"]["ep_return_mean"]  # over both ranks' episodes
    assert a0["log_dir"] == str(out / "run") and a1["log_dir"] is None
    rows = (out / "run" / "progress.csv").read_text().splitlines()
    assert len(rows) == 1 + 5 and "world_size" in rows[0]  # 4 updates of learn, 1 counted (agent_case)


def test_collectives_per_update_are_as_documented(agent_results):
    # docs/distributed.md: observation statistics 1, advantages 1, the step 2 + CG products + trials,
    # the critic 3, the episode statistics 1 (and the replica check every 10th update).
    for rank in agent_results[1]:
        n, cg_iterations, trials = rank["update_collectives"]
        assert n == 1 + 1 + (2 + cg_iterations + trials) + 3 + 1
        # critic_parallel="reduce", reward normalization instead of observation normalization:
        # 1 (return statistics) + 1 + (2 + k + t) + (1 + 10 + 1) + 1.
        n, cg_iterations, trials = rank["reduce_agent"]["collectives"]
        assert n == 1 + 1 + (2 + cg_iterations + trials) + (1 + 10 + 1) + 1
    values = [rank["reduce_agent"]["value"] for rank in agent_results[1]]
    assert torch.equal(values[0], values[1])
    return_vars = [rank["reduce_agent"]["return_var"] for rank in agent_results[1]]
    assert (return_vars[0] == return_vars[1]).all()  # the ranks' return statistics merged alike


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities and /proc/self/task are Linux's")
def test_gloo_event_loops_run_at_low_priority(agent_results):
    # trpo_ext.distributed.lower_gloo_event_loops, which an agent built with a group calls: gloo starts
    # its event loops under SCHED_OTHER at the process's nice value and a group lookup leaves them so;
    # the default lowers them to nice 19, "idle" moves them to SCHED_IDLE, and a loop already there is
    # left alone.
    for rank in agent_results[1]:
        loops = rank["gloo_loops"]
        n = len(loops["started"])
        assert n >= 1 and loops["started"] == loops["looked_up"] == [(os.SCHED_OTHER, loops["nice"])] * n
        assert loops["low"] == [(os.SCHED_OTHER, 19)] * n
        assert loops["again_changed"] == 0
        assert loops["idle_changed"] == n and all(policy == os.SCHED_IDLE for policy, _ in loops["idle"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread priorities and /proc/self/task are Linux's")
def test_init_from_env_lowers_the_gloo_event_loops_of_the_group_it_starts(monkeypatch):
    import socket

    import torch.distributed as dist

    from trpo_ext import distributed

    with socket.socket() as s:  # a free port for this one-rank job's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                           TORCHELASTIC_RUN_ID="test-init").items():
        monkeypatch.setenv(key, value)
    assert distributed.init_from_env("gloo", 30.0)
    try:
        loops = distributed.gloo_event_loop_threads()
        assert loops and all(os.getpriority(os.PRIO_PROCESS, tid) == 19 for tid in loops)
    finally:
        dist.destroy_process_group()


def test_a_bad_gloo_loop_priority_is_an_error_naming_the_variable(monkeypatch):
    from trpo_ext import distributed

    monkeypatch.setenv("TRPO_EXT_GLOO_LOOP_PRIORITY", "fast")
    with pytest.raises(ValueError, match="TRPO_EXT_GLOO_LOOP_PRIORITY must be one of"):
        distributed.lower_gloo_event_loops(None)


def test_checkpoints_continue_at_another_world_size(agent_results):
    import trpo_ext

    out, ranks = agent_results
    for name, start in (("model.pt", 1024), ("single.pt", 256)):
        r0, r1 = ranks[0][f"resumed-{name}"], ranks[1][f"resumed-{name}"]
        assert r0["start"] == start and r0["num_timesteps"] == start + 512
        assert torch.equal(r0["policy"], r1["policy"])
    # And the 2-rank checkpoint in one process; the file says who wrote it.
    assert trpo_ext.checkpoint.read(out / "model.pt")["world_size"] == 2
    assert trpo_ext.checkpoint.read(out / "single.pt")["world_size"] == 1
    agent = trpo_ext.TRPO.load(out / "model.pt")
    assert agent.num_timesteps == 1024 and agent.world_size == 1
    agent.learn(128, progress_bar=False)
    assert agent.num_timesteps == 1152
    agent.close()


def test_a_save_of_every_rank_continues_each_rank_exactly(agent_results):
    import trpo_ext

    out, ranks = agent_results
    for rank in ranks:
        (policy, value), (exact_policy, exact_value) = rank["exact"]
        assert torch.equal(exact_policy, policy) and torch.equal(exact_value, value)
        assert rank["refused"] == (f"load: restore_env_states=True: {out}/model.pt cannot continue the saved envs of "
                                   "each of this job's 2 ranks: it holds rank 0's envs and random stream only (saved "
                                   "by rank 0 alone) (load without it: episodes restart, seeded per rank)")
    every = trpo_ext.checkpoint.read(out / "every.pt")
    assert len(every["rank_states"]) == 1 and trpo_ext.checkpoint.read(out / "model.pt")["rank_states"] is None
    assert not torch.equal(every["rank_states"][0]["generator"], every["generator"])  # each rank its own stream


@pytest.mark.skipif(not torch.cuda.is_available(), reason="NCCL needs a GPU")
def test_nccl_step_on_one_gpu_equals_the_plain_step(tmp_path):
    (results,) = launch("nccl", tmp_path, nproc=1)
    for path, steps in results.items():
        (kl, trials, params), (nccl_kl, nccl_trials, nccl_params) = steps["plain"], steps["nccl"]
        assert trials == nccl_trials and kl == pytest.approx(nccl_kl, rel=1e-6), path
        assert rel_err(nccl_params, params) <= 1e-6, path


def test_new_spaces_train_data_parallel_with_identical_replicas(tmp_path):
    """Masked actions (fused), a Dict observation with an image (generic, packed critic rows),
    MultiDiscrete actions, LSTM and GRU policies (whole sequences; a MultiInputLstmPolicy on the
    generic path): two ranks end with the same networks after 4 updates of 2 x 64 steps."""
    ranks = launch("spaces", tmp_path)
    assert len(ranks[0]) == 9  # 3 envs x the split and the data update layouts, 3 recurrent policies
    for key, r0 in ranks[0].items():
        r1 = ranks[1][key]
        assert r0["num_timesteps"] == r1["num_timesteps"] == 256, key
        assert torch.equal(r0["policy"], r1["policy"]) and torch.equal(r0["value"], r1["value"]), key
        assert r0["record"]["world_size"] == 2 and r0["record"]["line_search_failed"] == 0, key


# ----------------------------------------------------------------------------- update_parallel="split"
@pytest.fixture(scope="module")
def split_results(tmp_path_factory):
    return launch("split", tmp_path_factory.mktemp("split"))


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().tobytes()


def test_split_gather_is_bit_exact_for_any_dtype_and_row_count(split_results):
    theirs = [r["gather"]["mine"] for r in split_results]
    for rank in split_results:
        gathered, ints = rank["gather"]["gathered"], rank["gather"]["ints"]
        for i, part in enumerate(gathered):  # a NaN, a -0.0, int64 beyond 2**32 and bools survive as they were
            whole = torch.cat([theirs[0][i], theirs[1][i]])
            assert part.dtype == whole.dtype and part.shape == whole.shape and _bits(part) == _bits(whole), i
        assert ints.tolist() == [[0, -5], [10, -5]]


def test_split_share_copies_each_owners_tensors_to_every_rank(split_results):
    for rank in split_results:
        a, b, steps = rank["share"]
        assert a.tolist() == [0.0] * 3 and b.tolist() == [[11.0, 11.0]] * 2 and steps.item() == 2.0


def test_split_update_equals_the_data_layout_and_keeps_identical_replicas(split_results):
    for rank in split_results:
        split, data = rank["split"], rank["data"]
        assert split["layout"] == "split" and data["layout"] == "data"
        # The critic: the same rows, the same minibatch order (rank 0's seed) -> the same fit, bit for bit.
        assert torch.equal(split["value"], data["value"])
        assert all(torch.equal(a, b) for a, b in zip(split["adam"], data["adam"]))
        # The policy: one process's step on the whole batch vs the step reduced over the shards (float32).
        assert rel_err(split["policy"], data["policy"]) <= 1e-5
        assert split["record"]["kl"] == pytest.approx(data["record"]["kl"], rel=1e-4)
        assert split["record"]["line_search_steps"] == data["record"]["line_search_steps"]
        assert isinstance(split["record"]["cg_iterations"], int)
        # docs/distributed.md: observation statistics 1, the gather 2, the results 1, the episode statistics 1.
        assert split["collectives"] == 1 + 2 + 1 + 1
    r0, r1 = split_results
    assert torch.equal(r0["split"]["policy"], r1["split"]["policy"]) and torch.equal(r0["split"]["value"],
                                                                                       r1["split"]["value"])
    # The step's entries and the critic's come from their owner rank: every entry but this rank's own
    # timings is the same on both ranks.
    for key in set(r0["split"]["record"]) - {"steps_per_sec", "time_rollout"}:
        assert r0["split"]["record"][key] == pytest.approx(r1["split"]["record"][key], rel=0, nan_ok=True), key


def test_a_task_failing_on_one_rank_stops_both_with_the_same_networks(split_results):
    r0, r1 = split_results
    assert r1["failure"] == ("ValueError", "the critic fit failed here")
    kind, message = r0["failure"]
    assert kind == "RuntimeError" and "the critic fit failed on rank 1" in message
    assert torch.equal(r0["after_failure"]["policy"], r1["after_failure"]["policy"])
    assert torch.equal(r0["after_failure"]["value"], r1["after_failure"]["value"])


def test_update_layout_by_world_size():
    from trpo_ext.config import TRPOConfig

    assert [TRPOConfig().update_layout(w) for w in (1, 2, 3)] == [None, "split", "data"]
    assert [TRPOConfig(update_parallel="data").update_layout(w) for w in (1, 2)] == [None, "data"]
    assert TRPOConfig(update_parallel="split").update_layout(2) == "split"
    with pytest.raises(ValueError, match="update_parallel='split' runs on exactly 2 ranks.*this job has 4"):
        TRPOConfig(update_parallel="split").update_layout(4)
    with pytest.raises(ValueError, match="update_parallel"):
        TRPOConfig(update_parallel="tasks")
