"""Worker programs of tests/test_distributed.py, run by torch.distributed.run (gloo, CPU):

    python -m torch.distributed.run --nproc-per-node 2 tests/dist_workers.py step OUT_DIR

Each rank writes what it computed to OUT_DIR/rank{R}.pt; the tests compare the ranks with each
other and with the single-process results rank 0 computes on the whole batch.
"""
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.utils import parameters_to_vector

sys.path.insert(0, os.path.dirname(__file__))

import trpo_ext  # noqa: E402
from trpo_ext import step as step_module  # noqa: E402
from trpo_ext.config import TrustRegionConfig  # noqa: E402

from helpers import (ACTION_CASES, RECURRENT_CELLS, SDE_VARIANTS, action_problem, make_policy, make_sde_policy,  # noqa: E402
                     recurrent_problem, sample_batch)

STEP_KEYS = [(dtype, case, path, split, sub) for dtype in (torch.float64, torch.float32) for case in ACTION_CASES
             for path in ("fused", "generic") for split in ("equal", "unequal") for sub in (False, True)] + \
    [(dtype, "gsde", "generic", split, sub) for dtype in (torch.float64, torch.float32)
     for split in ("equal", "unequal") for sub in (False, True)]
# (The GRU-Gaussian draws are ill-conditioned: float32 CG's own error spans 3e-5 .. 5e-3 on them.)
STEP_KEYS += [(dtype, f"{cell}-{case}", path, split, False) for dtype in (torch.float64, torch.float32)
              for cell, cases in (("lstm", ("categorical-masked", "gaussian")), ("gru", ("categorical-masked", "bernoulli")))
              for case in cases for path in ("fused", "generic") for split in ("equal", "unequal")]
"""The two-rank step's matrix: every action case (masks sharded with their rows) x path x even and
uneven shards x the Fisher on the batch or on a subset (fvp_obs, with its own rows of the mask); a
gSDE policy (trpo_ext.sde: the generic path only); LSTM and GRU policies (Sequences sharded by
sequence, their rows' actions, advantages and masks with them)."""
SETTINGS = dict(max_kl=0.01, damping=0.1, cg_iters=10, cg_rtol=1e-10, backtrack_factor=0.8, max_backtracks=10)


def batch(case, n):
    """(policy, obs, actions, advantages, mask) of an ACTION_CASES entry in float64, actions drawn from
    the (masked) policy; every dtype's step starts from these values, cast."""
    if case in SDE_VARIANTS:
        policy, mask = make_sde_policy(case, seed=3), None
        obs = torch.randn(n, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    elif case.split("-")[0] in RECURRENT_CELLS:  # n sequences of 8 steps
        cell, action_case = case.split("-", 1)
        policy, obs, _, mask = recurrent_problem(action_case, cell, n_seq=n, seed=3)
    else:
        policy, obs, _, mask = action_problem(case, torch.float64, n=n, seed=3)
    actions, advantages = sample_batch(policy, obs, mask)
    return policy, obs, actions, advantages, mask


def cast(t, dtype):
    if isinstance(t, trpo_ext.Sequences):
        return trpo_ext.Sequences(t.obs.to(dtype), t.episode_starts, tuple(s.to(dtype) for s in t.initial_state))
    return t.to(dtype) if t is not None and t.is_floating_point() else t


def shard_batch(obs, tensors, lo, hi):
    """Rows lo:hi of obs and of each of `tensors` (None stays None); of Sequences, the sequences lo:hi
    and the tensors' rows of those sequences (time-major rows t·B + b)."""
    if not isinstance(obs, trpo_ext.Sequences):
        return obs[lo:hi], [None if t is None else t[lo:hi] for t in tensors]
    steps, n = obs.episode_starts.shape
    rows = (torch.arange(steps).unsqueeze(1) * n + torch.arange(lo, hi)).flatten()
    seq = trpo_ext.Sequences(obs.obs[:, lo:hi], obs.episode_starts[:, lo:hi], tuple(s[:, lo:hi] for s in obs.initial_state))
    return seq, [None if t is None else t[rows] for t in tensors]


def shard(t, bounds, r):
    return None if t is None else t[bounds[r]:bounds[r + 1]]


def one_step(policy, dtype, path, group, obs, actions, advantages, fvp_obs, mask=None, fvp_mask=None):
    """(g, x, xAx, StepRecord, new θ) of one trust-region step from `policy`'s θ (a copy, in `dtype`)."""
    policy = copy.deepcopy(policy).to(dtype)
    obs, actions, advantages, fvp_obs = (cast(t, dtype) for t in (obs, actions, advantages, fvp_obs))
    params = list(policy.parameters())
    config = TrustRegionConfig(**SETTINGS)
    direction = step_module._direction(policy, params, obs, actions, advantages, config, fvp_obs, path, group,
                                       mask, fvp_mask)
    record = trpo_ext.trust_region_step(policy, obs, actions, advantages, fvp_obs=fvp_obs, path=path,
                                        process_group=group, action_mask=mask, fvp_action_mask=fvp_mask,
                                        **SETTINGS)
    return dict(g=direction.gradient, x=direction.x, xAx=direction.info.xAx, record=record,
                params=parameters_to_vector(policy.parameters()).detach())


COLLECTIVES = ("c10d::allreduce_", "c10d::allgather_", "c10d::broadcast_")


def count_collectives(fn, ops=("c10d::allreduce_",)):
    """fn()'s result and the number of collectives among `ops` it ran (the profiler sees the c10d ops
    both torch.distributed's Python calls and the extension's functional collectives go through)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        result = fn()
    names = [e.name for e in prof.events()]
    return result, sum(1 for n in names if n in ops)


def gloo_event_loops() -> list[tuple[int, int]]:
    """(scheduling policy, nice value) of each of this process's gloo event-loop threads."""
    return [(os.sched_getscheduler(tid), os.getpriority(os.PRIO_PROCESS, tid))
            for tid in trpo_ext.distributed.gloo_event_loop_threads()]


def step_case(out_dir):
    rank = dist.get_rank()
    results = {}
    alone = dist.new_group([0])  # world size 1 through the distributed path (rank 0 only)
    for dtype, case, path, split, sub in STEP_KEYS:
        n = 4 if case.split("-")[0] in RECURRENT_CELLS else 40  # sequences or rows
        policy, obs, actions, advantages, mask = batch(case, n)
        fvp_obs = obs[::3].clone() if sub else None
        fvp_mask = mask[::3].clone() if sub and mask is not None else None
        bounds = [0, n // 2, n] if split == "equal" else [0, max(1, n // 3), n]
        fvp_bounds = None if fvp_obs is None else [0, 5, fvp_obs.shape[0]]
        mine_obs, (mine_actions, mine_advantages, mine_mask) = shard_batch(obs, (actions, advantages, mask),
                                                                           bounds[rank], bounds[rank + 1])
        mine = one_step(policy, dtype, path, dist.group.WORLD, mine_obs, mine_actions, mine_advantages,
                        shard(fvp_obs, fvp_bounds, rank), mine_mask, shard(fvp_mask, fvp_bounds, rank))
        entry = {"distributed": mine}
        if rank == 0:
            entry["single"] = one_step(policy, dtype, path, None, obs, actions, advantages, fvp_obs, mask, fvp_mask)
            if split == "equal" and not sub:
                half_obs, (*half, half_mask) = shard_batch(obs, (actions, advantages, mask), 0, n // 2)
                entry["plain_half"] = one_step(policy, dtype, path, None, half_obs, *half, None, half_mask)
                entry["world1_half"] = one_step(policy, dtype, path, alone, half_obs, *half, None, half_mask)
        results[(str(dtype), case, path, split, sub)] = entry
    # Collectives per step: the batch sizes, the gradient, one per CG product, one per trial.
    policy, obs, actions, advantages, _ = batch("gaussian", 40)
    counts = {}
    for path in ("fused", "generic"):
        record, n = count_collectives(lambda: trpo_ext.trust_region_step(
            policy, obs[rank * 20:(rank + 1) * 20], actions[rank * 20:(rank + 1) * 20],
            advantages[rank * 20:(rank + 1) * 20], path=path, process_group=dist.group.WORLD, **SETTINGS))
        counts[path] = (n, record.cg_iterations, record.line_search_steps)
    results["collectives"] = counts
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def critic_on_shards(make_net):
    """{"distributed": (loss, θ), "single": (loss, θ)}: a critic fitted on this rank's shard of a batch
    (data-parallel, the gather approach) and one fitted by one process on the whole batch with the
    permutations' generator the ranks share (rank 0's seed); both from the same initial θ."""
    from trpo_ext.critic import fit_value_network, shared_generator

    rank = dist.get_rank()
    torch.manual_seed(0)
    obs, returns = torch.randn(50, 4), torch.randn(50)
    bounds = [0, 21, 50]
    single_generator = shared_generator(torch.Generator().manual_seed(7 + rank), dist.group.WORLD)
    fits = {}
    for name, group, o, r, generator in (
            ("distributed", dist.group.WORLD, obs[bounds[rank]:bounds[rank + 1]], returns[bounds[rank]:bounds[rank + 1]],
             torch.Generator().manual_seed(7 + rank)),
            ("single", None, obs, returns, single_generator)):
        torch.manual_seed(1)
        net = make_net()
        loss = fit_value_network(net, torch.optim.Adam(net.parameters(), lr=1e-2), o, r, 3, 16, generator,
                                 process_group=group)
        fits[name] = (loss, parameters_to_vector(net.parameters()).detach())
    return fits


def agent_case(out_dir):
    """A data-parallel agent: replicas stay identical, the step counts are totals, rank 0 alone logs
    and saves, and a checkpoint (this job's, or one from a single process) continues here."""
    from trpo_ext.critic import fit_value_network
    from trpo_ext.normalization import RunningNormalizer

    rank = dist.get_rank()
    results = {}
    # gloo's event loops: as gloo starts them, after a group lookup (which changes nothing), after an
    # agent adopted the group (the default priority), then "idle", and a call that finds nothing
    # left to change.
    lower = trpo_ext.distributed.lower_gloo_event_loops
    loops = {"nice": os.getpriority(os.PRIO_PROCESS, 0), "started": gloo_event_loops()}
    trpo_ext.distributed.resolve_group(dist.group.WORLD)
    loops["looked_up"] = gloo_event_loops()
    trpo_ext.TRPO("CartPole-v1", n_envs=1, n_steps=8, seed=0).close()
    loops["low"] = gloo_event_loops()
    loops["again_changed"] = lower(dist.group.WORLD)
    os.environ["TRPO_EXT_GLOO_LOOP_PRIORITY"] = "idle"
    try:
        loops["idle_changed"] = lower(dist.group.WORLD)
        loops["idle"] = gloo_event_loops()
    finally:
        del os.environ["TRPO_EXT_GLOO_LOOP_PRIORITY"]
    results["gloo_loops"] = loops
    # The critic on shards equals the critic on the whole batch, given rank 0's random stream.
    results["critic"] = critic_on_shards(lambda: trpo_ext.ValueNetwork(4, (8,)))
    # parallel="reduce": each rank its own rows and order; one process with the ranks' minibatches
    # side by side (batch size 2B) makes the same steps.
    torch.manual_seed(2)
    obs64, returns64 = torch.randn(50, 4, dtype=torch.float64), torch.randn(50, dtype=torch.float64)
    epochs, batch = 3, 8

    def fresh_net():
        torch.manual_seed(1)
        net = trpo_ext.ValueNetwork(4, (8,)).double()
        return net, torch.optim.Adam(net.parameters(), lr=1e-2)

    net, optimizer = fresh_net()
    loss = fit_value_network(net, optimizer, obs64[25 * rank:25 * (rank + 1)], returns64[25 * rank:25 * (rank + 1)],
                             epochs, batch, torch.Generator().manual_seed(100 + rank), process_group=dist.group.WORLD,
                             parallel="reduce")
    perms = [torch.stack([torch.randperm(25, generator=g) for _ in range(epochs)])
             for g in (torch.Generator().manual_seed(100), torch.Generator().manual_seed(101))]
    order = torch.stack([torch.cat([torch.cat([perms[0][e, j:j + batch], 25 + perms[1][e, j:j + batch]])
                                    for j in range(0, 25, batch)]) for e in range(epochs)])
    single, single_optimizer = fresh_net()
    from trpo_ext.critic import adam_state
    group_, steps, exp_avg, exp_avg_sq = adam_state(single_optimizer, list(single.parameters()))
    with torch.no_grad():
        single_loss = trpo_ext._ops.mlp_value_fit(obs64, returns64, [p.detach() for p in single.parameters()],
                                                  exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, steps=steps, order=order,
                                                  batch_size=2 * batch, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                                  activation="tanh")
    results["critic_reduce"] = (loss, parameters_to_vector(net.parameters()).detach(), float(single_loss),
                                parameters_to_vector(single.parameters()).detach())
    # Observation statistics: what the ranks saw since the last sync, merged.
    seen = torch.Generator().manual_seed(rank)
    normalizer = RunningNormalizer(3)
    normalizer.sync(dist.group.WORLD)
    mine = [torch.randn(4, 3, generator=seen, dtype=torch.float64).numpy() * (rank + 1) + rank for _ in range(5)]
    for batch in mine:
        normalizer.update(batch)
    normalizer.sync(dist.group.WORLD)
    results["normalizer"] = (normalizer.count, normalizer.mean.copy(), normalizer.var.copy(), mine)

    agent = trpo_ext.TRPO("CartPole-v1", n_envs=2, n_steps=64, normalize_obs=True, seed=0, update_parallel="data",
                          log_dir=os.path.join(out_dir, "run"))
    agent.learn(1024, progress_bar=False)
    agent.save(os.path.join(out_dir, "model.pt"))
    agent.save(os.path.join(out_dir, "every.pt"), every_rank=True)  # a collective: every rank's own state too
    dist.barrier()
    results["agent"] = dict(policy=parameters_to_vector(agent.policy.parameters()).detach(),
                            value=parameters_to_vector(agent.value_net.parameters()).detach(),
                            obs_mean=agent.normalizer.mean.copy(), num_timesteps=agent.num_timesteps,
                            n_updates=agent.n_updates, world_size=agent.world_size, log_dir=agent.log_dir,
                            record=agent.last_record)
    record, n = count_collectives(agent._update, COLLECTIVES)  # update 5: no replica check (every 10th)
    results["update_collectives"] = (n, record["cg_iterations"], record["line_search_steps"])
    continued = [parameters_to_vector(net.parameters()).detach() for net in (agent.policy, agent.value_net)]
    agent.close()
    # The critic reducing minibatch gradients, in the agent: 10 epochs x 1 minibatch of 128 rows.
    reducing = trpo_ext.TRPO("CartPole-v1", n_envs=2, n_steps=64, critic_parallel="reduce", normalize_reward=True,
                             seed=1, update_parallel="data")
    reducing.learn(512, progress_bar=False)
    record, n = count_collectives(reducing._update, COLLECTIVES)
    results["reduce_agent"] = dict(value=parameters_to_vector(reducing.value_net.parameters()).detach(),
                                   return_var=reducing.collector.reward_scaler.stats.var.copy(),
                                   collectives=(n, record["cg_iterations"], record["line_search_steps"]))
    reducing.close()
    # Continue both this job's checkpoint and a one-process one (written by the test) at world size 2.
    for name in ("model.pt", "single.pt"):
        resumed = trpo_ext.TRPO.load(os.path.join(out_dir, name))
        start = resumed.num_timesteps
        resumed.learn(512, progress_bar=False)
        results[f"resumed-{name}"] = dict(start=start, num_timesteps=resumed.num_timesteps,
                                          policy=parameters_to_vector(resumed.policy.parameters()).detach())
        resumed.close()
    # every.pt continues each rank exactly: its next update is the one the agent made after the save.
    exact = trpo_ext.TRPO.load(os.path.join(out_dir, "every.pt"), restore_env_states=True)
    exact.learn(256, progress_bar=False)
    results["exact"] = (continued, [parameters_to_vector(net.parameters()).detach()
                                    for net in (exact.policy, exact.value_net)])
    exact.close()
    try:  # rank 0's envs only: refused, saying why
        trpo_ext.TRPO.load(os.path.join(out_dir, "model.pt"), restore_env_states=True)
    except ValueError as e:
        results["refused"] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def nccl_case(out_dir):
    """World size 1 on NCCL: the fused and generic data-parallel steps on the GPU equal the plain ones."""
    results = {}
    obs, actions, advantages = (t.cuda() for t in batch("gaussian", torch.float32, 64))
    for path in ("fused", "generic"):
        steps = {}
        for name, group in (("plain", None), ("nccl", dist.group.WORLD)):
            policy = make_policy("gaussian", 5, 3, (8, 7), "tanh", torch.float32, "cuda", seed=3)
            record = trpo_ext.trust_region_step(policy, obs, actions, advantages, path=path, process_group=group,
                                                **SETTINGS)
            steps[name] = (record.kl, record.line_search_steps, parameters_to_vector(policy.parameters()).cpu())
        results[path] = steps
    torch.save(results, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))


def custom_case(out_dir):
    """A user's own policy and critic, data-parallel (tests/test_custom_policy.py): the plain-PyTorch
    critic fit on shards equals one process's on the whole batch; the agent keeps identical replicas;
    critic_parallel='reduce' is refused."""
    from test_custom_policy import CategoricalPolicy, Critic

    rank = dist.get_rank()
    results = critic_on_shards(lambda: torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(),
                                                           torch.nn.Linear(8, 1)))
    for layout in ("split", "data"):
        agent = trpo_ext.TRPO("CartPole-v1", n_envs=2, n_steps=64, seed=0, policy=CategoricalPolicy, value_net=Critic,
                              update_parallel=layout)
        agent.learn(512, progress_bar=False)
        results[f"agent-{layout}"] = dict(policy=parameters_to_vector(agent.policy.parameters()).detach(),
                                          value=parameters_to_vector(agent.value_net.parameters()).detach(),
                                          num_timesteps=agent.num_timesteps, record=agent.last_record)
        agent.close()
    try:
        trpo_ext.TRPO("CartPole-v1", n_envs=2, seed=0, value_net=Critic, critic_parallel="reduce")
        results["reduce_error"] = None
    except ValueError as e:
        results["reduce_error"] = str(e)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def spaces_case(out_dir):
    """The new spaces data-parallel: masked Discrete actions on the fused path, a Dict observation
    with an image on the generic path (its critic's rows packed for the gather), recurrent policies
    (their critics' sequences gathered whole); every rank must end
    with the same networks (the agent checks its replicas; the test compares them too)."""
    rank = dist.get_rank()
    results = {}
    cases = [(env_id, layout, "auto") for env_id in ("trpo_ext/MaskedChoice-v0", "trpo_ext/DictImageSide-v0",
                                                     "trpo_ext/MultiDiscreteMatch-v0") for layout in ("split", "data")]
    # A recurrent policy: its update runs on each rank's sequences ("auto" takes the data layout at 2 ranks).
    cases += [("trpo_ext/CueRecall-v0", "auto", "MlpLstmPolicy"), ("trpo_ext/CueRecallContinuous-v0", "data", "MlpGruPolicy"),
              ("trpo_ext/DictImageSide-v0", "auto", "MultiInputLstmPolicy")]  # generic products, packed rows
    for env_id, layout, policy in cases:
        agent = trpo_ext.TRPO(env_id, n_envs=2, n_steps=32, seed=0, critic_epochs=2, update_parallel=layout,
                              policy=policy, policy_kwargs={"lstm_hidden_size": 8})
        agent.learn(256, progress_bar=False)
        results[env_id, layout] = dict(policy=parameters_to_vector(agent.policy.parameters()).detach(),
                               value=parameters_to_vector(agent.value_net.parameters()).detach(),
                               num_timesteps=agent.num_timesteps, record=agent.last_record)
        agent.close()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def split_case(out_dir):
    """update_parallel="split": its two collectives on their own (bit-exact gather of mixed dtypes and
    unequal row counts; results copied from their owners), one update against the data layout's
    from the same start, and a task that fails on one rank."""
    from trpo_ext.distributed import gather_tensors, share_

    rank, world = dist.get_rank(), dist.group.WORLD
    results = {}
    g = torch.Generator().manual_seed(rank)
    n = 3 + 4 * rank
    mine = [torch.randn(n, 2, 3, generator=g), torch.randint(-2**40, 2**40, (n,), generator=g),
            torch.rand(n, 2, generator=g) > 0.5, torch.randn(n, generator=g, dtype=torch.float64)]
    mine[0][0, 0, 0], mine[3][-1] = float("nan"), -0.0
    gathered, ints = gather_tensors(mine, world, [10 * rank, -5])
    results["gather"] = dict(mine=mine, gathered=gathered, ints=ints)
    owned = [torch.full((3,), float(rank)), torch.full((2, 2), 10.0 + rank, dtype=torch.float64),
             torch.tensor(float(rank + 1))]
    share_([(0, owned[:1]), (1, owned[1:])], world)
    results["share"] = owned

    for layout in ("split", "data"):
        agent = trpo_ext.TRPO("CartPole-v1", n_envs=2, n_steps=64, normalize_obs=True, seed=0, update_parallel=layout)
        agent.collector.reset(seed=agent.rank_seed(0))
        record, n_collectives = count_collectives(agent._update, COLLECTIVES)
        _, steps, exp_avg, exp_avg_sq = trpo_ext.critic.adam_state(agent.critic_optimizer,
                                                                   list(agent.value_net.parameters()))
        results[layout] = dict(policy=parameters_to_vector(agent.policy.parameters()).detach(),
                               value=parameters_to_vector(agent.value_net.parameters()).detach(),
                               adam=[t.clone() for t in (*steps, *exp_avg, *exp_avg_sq)], record=record,
                               collectives=n_collectives, layout=agent.update_layout)
        agent.close()

    agent = trpo_ext.TRPO("CartPole-v1", n_envs=2, n_steps=64, seed=0, update_parallel="split")
    if rank == 1:
        def failing_fit(*args, **kwargs):
            raise ValueError("the critic fit failed here")
        trpo_ext.split_update.fit_value_network = failing_fit
    try:
        agent.learn(256, progress_bar=False)
        results["failure"] = None
    except Exception as exc:
        results["failure"] = (type(exc).__name__, str(exc))
    results["after_failure"] = dict(policy=parameters_to_vector(agent.policy.parameters()).detach(),
                                    value=parameters_to_vector(agent.value_net.parameters()).detach())
    agent.close()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


CONSTRAINED_KEYS = [(case, path) for case in ACTION_CASES for path in ("fused", "generic")]
"""The two-rank constrained step's matrix (float64, uneven shards, cost violation 0.01: infeasible,
dual case 1 or 0, both directions used)."""


def constrained_case(out_dir):
    rank, results = dist.get_rank(), {}
    for case, path in CONSTRAINED_KEYS:
        policy, obs, actions, advantages, mask = batch(case, 40)
        cost_advantages = advantages + 0.5 * torch.randn(40, generator=torch.Generator().manual_seed(5),
                                                         dtype=advantages.dtype)
        bounds = [0, 13, 40]

        def step(group, *batch_rows):
            moved = copy.deepcopy(policy)
            record = trpo_ext.constrained_step(moved, *batch_rows[:4], 0.01, path=path, process_group=group,
                                               action_mask=batch_rows[4], cg_iters=10)
            return dict(record=record, params=parameters_to_vector(moved.parameters()).detach())

        rows = (obs, actions, advantages, cost_advantages, mask)
        entry = {"distributed": step(dist.group.WORLD, *(shard(t, bounds, rank) for t in rows))}
        if rank == 0:
            entry["single"] = step(None, *rows)
        results[(case, path)] = entry
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


CASES = {"step": step_case, "constrained": constrained_case, "agent": agent_case, "nccl": nccl_case, "custom": custom_case, "spaces": spaces_case,
         "split": split_case}

if __name__ == "__main__":
    torch.set_num_threads(1)
    dist.init_process_group("nccl" if sys.argv[1] == "nccl" else "gloo")
    try:
        CASES[sys.argv[1]](sys.argv[2])
    finally:
        dist.destroy_process_group()
