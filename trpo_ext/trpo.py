"""The TRPO agent (Schulman et al., 2015), top to bottom: construction, `learn`, one update
(rollout → trust-region policy step → critic → log record), predict / evaluate, save / load, close.

The parts live beside it: hyperparameters and their checks in `config`, env construction in
`envs`, rollouts / GAE / observation normalization in `rollout`, the natural-gradient step with
the fused CG solve and the line search in `step`, the critic regression in `critic`, the file
format in `checkpoint`, progress.csv / TensorBoard in `logger`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time

import gymnasium as gym
import numpy as np
import torch

from . import checkpoint, distributed
from .config import TRPOConfig, check_int
from . import spaces
from .critic import adam_state, check_parallel, draw_seed, fit_value_network, fused_value, seeded_generator
from .envs import eval_env_factory, make_vec_env, registered_spec
from .logger import RunLogger, check_log_dir
from .distributions import action_spec
from .policies import (BUILT_IN, FlatValues, build_network, built_in_policy, built_in_value, check_custom_policy,
                       check_custom_value_net, default_name, fused_spec)
from .rollout import Batch, EpisodeStats, RewardScaler, RolloutCollector, RunningNormalizer, single_env_masks
from .step import StepRecord, trust_region_step

RANK_SEED_STRIDE = 1_000_033
"""Data-parallel rank r seeds its envs and its sampling with seed + r * RANK_SEED_STRIDE (rank 0:
the seed itself), so ranks never share an env seed while n_envs < RANK_SEED_STRIDE."""

CHECK_REPLICAS_EVERY = 10
"""Data-parallel: every this many updates (and at the end of `learn`) the ranks compare checksums
of their networks and observation statistics, and fail loudly if they differ."""


class TRPO:
    """Trust Region Policy Optimization with the fused Fisher-vector-product CG solve.

    Args:
        env: a gymnasium id, an `EnvSpec`, a `gymnasium.Env` (with n_envs=1), a callable returning
            an Env, or a gymnasium vector env built with `autoreset_mode=AutoresetMode.SAME_STEP`.
            Observations: Box (vectors, images, any shape), Discrete, MultiDiscrete, MultiBinary or
            a Dict of those; actions: Discrete, MultiDiscrete, MultiBinary or a 1-D Box (Box actions
            are clipped to the bounds for the env; log-probabilities use the unclipped sample).
        policy: the policy network. "auto" (the default): the built-in one that fits the
            observation space: "MlpPolicy" for flat observations (a Box, Discrete / MultiDiscrete
            one-hot, MultiBinary), "CnnPolicy" for images, "MultiInputPolicy" for a Dict
            (`trpo_ext.spaces` says how each observation is preprocessed; docs/spaces.md). "MlpPolicy":
            the built-in `MLPPolicy` shaped by `policy_kwargs`, whose rollouts, Fisher products and
            solve run in the fused ops. "CnnPolicy": a NatureCNN (512 features) and the action head;
            "MultiInputPolicy": a NatureCNN (256 features) per image entry, the other entries
            flattened, concatenated, then `policy_kwargs`' MLP (stable-baselines3's architectures;
            generic path). Or your own `torch.nn.Module` whose `forward(obs)` takes a batch of
            preprocessed (normalized) observations (a tensor (B, ...), or a dict of them for a Dict
            space) and returns the action space's distribution: `Categorical(logits=...)` for
            Discrete(n) (batch_shape (B,)), `trpo_ext.MultiCategorical(logits, segments=nvec)` for
            MultiDiscrete(nvec), `Independent(Bernoulli(logits=...), 1)` for MultiBinary(k),
            `Independent(Normal(mean, std), 1)` for Box(k) (the std may depend on the state);
            every parameter must require grad. Or a callable `(observation_space, action_space) ->
            nn.Module` (called with torch's RNG seeded from `seed`, so its initialisation is
            reproducible). A module passed itself is moved to `device` and trained in place. A
            custom policy samples its actions from its distribution's parameters with the agent's
            generator (`trpo_ext.distributions.sample_actions`) and takes the generic path of
            `trust_region_step`. It is called once at construction on a batch of zero observations:
            a wrong output is a ValueError naming what it returned and what the action space needs.
            Invalid-action masks (Discrete / MultiDiscrete) are read from the envs when they have an
            `action_masks()` method (as sb3-contrib's MaskablePPO reads them) or put
            `info["action_mask"]` in reset's and every step's info; masked actions are never
            sampled and play no part in the update. Recurrent policies, Tuple spaces and Dict or
            Tuple actions are not supported (TypeError naming the space).
        value_net: the critic, likewise: "auto" (the default): the built-in critic of the policy's
            name (of the observation space when the policy is a module): `ValueNetwork` for
            "MlpPolicy" (fused fit), a NatureCNN / multi-input network with its own feature
            extractor (not shared with the policy) otherwise; or a module mapping observations to
            values (B,) or (B, 1), fitted by a plain PyTorch Adam loop with the same settings
            (`trpo_ext.critic.fit_value_module`); or a callable `(observation_space, action_space) ->
            nn.Module`. A custom critic needs `critic_parallel="gather"` when data-parallel.
            Custom networks are not stored as code in checkpoints: `TRPO.load(path, policy=...,
            value_net=...)` takes them again.
        n_envs … seed: the hyperparameters, each documented (and checked) in `trpo_ext.config.TRPOConfig`;
            the agent holds them as `agent.config`. `seed=None` draws one.
        log_dir: directory for progress.csv and TensorBoard event files (created at the first
            update; an existing file is refused here); None logs nowhere.
        device: "cpu", "cuda", a torch.device, or "auto" (CUDA when available).
        num_threads: torch's CPU threads while `learn` runs (torch.set_num_threads, put back
            afterwards); None leaves torch's own setting. The default, 1, because the networks are
            small and the rollout steps the envs in one thread: more threads gain little there, and two
            runs side by side (routine with seeds) oversubscribe the cores and slow both down many
            times over (docs/benchmarks.md, "Threads"). Raise it for large networks or batches.
        process_group: data-parallel training (docs/distributed.md). "auto" (the default): when
            torch.distributed is initialised (e.g. under torchrun), its default group; every rank
            builds the agent with the same arguments, collects its own rollouts with its n_envs envs
            (seeded per rank), and all ranks take the same update on the union of their batches;
            total_timesteps and the logged step counts are totals over the ranks; only rank 0 logs
            and saves. A ProcessGroup: that group. None: this process alone, even inside a group.
    """

    def __init__(self, env, *, n_envs: int = 8, n_steps: int = 128, gamma: float = 0.99,
                 gae_lambda: float = 0.95, max_kl: float = 0.01, damping: float = 0.1, cg_iters: int = 10,
                 cg_rtol: float = 1e-10, backtrack_factor: float = 0.8, max_backtracks: int = 10,
                 fvp_fraction: float = 1.0, normalize_advantage: bool = True, normalize_obs: bool = False,
                 obs_clip: float = 10.0, normalize_reward: bool = False, reward_clip: float = 10.0,
                 critic_lr: float = 1e-3, critic_epochs: int = 10,
                 critic_batch_size: int = 128, critic_parallel: str = "gather", update_parallel: str = "auto",
                 policy_kwargs: dict | None = None,
                 vectorization: str = "sync",
                 stats_window: int = 100, log_dir: str | os.PathLike | None = None, seed: int | None = None,
                 device: str | torch.device = "cpu", num_threads: int | None = 1, process_group="auto",
                 policy="auto", value_net="auto"):
        config = TRPOConfig.from_dict(dict(
            n_envs=n_envs, n_steps=n_steps, gamma=gamma, gae_lambda=gae_lambda, max_kl=max_kl, damping=damping,
            cg_iters=cg_iters, cg_rtol=cg_rtol, backtrack_factor=backtrack_factor, max_backtracks=max_backtracks,
            fvp_fraction=fvp_fraction, normalize_advantage=normalize_advantage, normalize_obs=normalize_obs,
            obs_clip=obs_clip, normalize_reward=normalize_reward, reward_clip=reward_clip, critic_lr=critic_lr,
            critic_epochs=critic_epochs,
            critic_batch_size=critic_batch_size, critic_parallel=critic_parallel, update_parallel=update_parallel,
            policy_kwargs=policy_kwargs,
            vectorization=vectorization,
            stats_window=stats_window, seed=seed))
        self.group = distributed.resolve_group(process_group)
        self.rank, self.world_size = distributed.rank(self.group), distributed.world_size(self.group)
        self.update_layout = config.update_layout(self.world_size)  # None, "split" or "data"
        self.log_dir = check_log_dir(log_dir) if self.rank == 0 else None
        self.device = _resolve_device(device)
        self.num_threads = None if num_threads is None else check_int("num_threads", num_threads, 1)

        # Environments: a vector env's own num_envs wins over n_envs.
        self.envs = make_vec_env(env, config.n_envs, config.vectorization)
        if self.envs.num_envs != config.n_envs:
            config = dataclasses.replace(config, n_envs=self.envs.num_envs)
        self.config = config
        self.env_spec = registered_spec(env, self.envs)
        self.make_eval_env = eval_env_factory(env, self.env_spec)  # None: evaluate needs env=
        observation_space, action_space = self.envs.single_observation_space, self.envs.single_action_space
        try:
            codec = spaces.ObservationCodec(observation_space)
            action_spec(action_space)
            if config.normalize_obs and codec.norm_dim == 0:
                raise ValueError(f"normalize_obs=True normalizes the Box parts of an observation that are not images; "
                                 f"{observation_space} has none (images are scaled to [0, 1] instead)")
        except BaseException:
            self.envs.close()
            raise

        # Rollouts.
        self.normalizer = RunningNormalizer(codec.norm_dim, config.obs_clip) if config.normalize_obs else None
        reward_scaler = RewardScaler(config.n_envs, config.gamma, config.reward_clip) if config.normalize_reward \
            else None
        self.collector = RolloutCollector(self.envs, config.n_steps, self.device, self.normalizer,
                                          EpisodeStats(config.n_envs, config.stats_window), reward_scaler)

        # Networks, the critic's optimizer and the training random stream.
        hidden, activation = config.policy_kwargs["hidden"], config.policy_kwargs["activation"]
        if isinstance(policy, str) and policy == "auto":  # the built-in network that fits the observations
            policy = default_name(codec)
        if isinstance(value_net, str) and value_net == "auto":  # the built-in critic that fits the policy's input
            value_net = policy if isinstance(policy, str) and policy in BUILT_IN else default_name(codec)
        # The built-in names the networks were made from (None: a user's module); checkpoints keep them.
        self.network_names = {"policy": policy if isinstance(policy, str) else None,
                              "value_net": value_net if isinstance(value_net, str) else None}
        try:
            with torch.random.fork_rng(devices=[]):  # seeded initialisation without touching the global RNG
                torch.manual_seed(config.seed)
                self.policy = build_network("policy", policy, observation_space, action_space, lambda name: built_in_policy(
                    name, codec, action_space, hidden, activation, config.policy_kwargs["log_std_init"])).to(self.device)
                self.value_net = build_network("value_net", value_net, observation_space, action_space,
                                               lambda name: built_in_value(name, codec, hidden, activation)
                                               ).to(self.device)
            if fused_spec(self.policy) is None:
                check_custom_policy(self.policy, codec, action_space, self.device)
            if not fused_value(self.value_net):
                check_custom_value_net(self.value_net, codec, self.device)
                if self.group is not None:
                    check_parallel(self.value_net, config.critic_parallel)
        except BaseException:
            self.envs.close()
            raise
        self._values = self.value_net if fused_value(self.value_net) else FlatValues(self.value_net)
        # Data-parallel: every rank starts from rank 0's networks (one broadcast) and statistics.
        distributed.start_heartbeat(self.group)
        distributed.broadcast_([*self.policy.parameters(), *self.value_net.parameters()], self.group)
        for statistics in self._running_statistics():
            statistics.sync(self.group)
        # Holds the critic's Adam state; the steps themselves run in trpo_ext.critic.fit_value_network.
        self.critic_optimizer = torch.optim.Adam(self.value_net.parameters(), lr=config.critic_lr)
        self.generator = torch.Generator(self.device).manual_seed(self.rank_seed(config.seed))

        self.num_timesteps = 0
        self.n_updates = 0
        self.last_record: dict | None = None
        self._logger: RunLogger | None = None

    def rank_seed(self, seed: int) -> int:
        """The seed this rank uses for its envs and sampling where one process would use `seed`."""
        return seed + self.rank * RANK_SEED_STRIDE

    @property
    def hyperparameters(self) -> dict:
        """`self.config` as a plain dict (what a checkpoint stores; `TRPO(env, **hyperparameters)` rebuilds it)."""
        return self.config.to_dict()

    # ------------------------------------------------------------------------- training loop
    def learn(self, total_timesteps: int, callback=None, progress_bar: bool = True) -> "TRPO":
        """Trains for `total_timesteps` more environment steps (rounded up to whole rollouts; an
        integral float such as 1e5 is accepted).

        `callback(agent, record)` (or each of a list of them) runs after every update with that
        update's log record (a dict); one returning False stops training. The record (also `agent.last_record`, and a row of
        progress.csv / TensorBoard scalars when `log_dir` is set) holds: update, timesteps,
        ep_return_mean / ep_length_mean (last `stats_window` episodes), kl and surrogate_improvement
        of the accepted step (0 when rejected), expected_improvement (β·gᵀx), line_search_steps,
        line_search_failed, cg_iterations, cg_residual, entropy and policy_std (before the step),
        value_loss, explained_variance (of the pre-update values), steps_per_sec, and the time split
        time_rollout (incl. values and GAE) / time_cg (incl. the gradient) / time_line_search / time_critic.
        """
        from tqdm.auto import tqdm

        total_timesteps = _check_timesteps(total_timesteps)
        callbacks = _check_callback(callback)
        if self.collector.last_obs is None:
            self.collector.reset(seed=self.rank_seed(self.config.seed))
        batch_size = self._steps_per_update()
        n_updates = -(-total_timesteps // batch_size)
        with _torch_threads(self.num_threads), \
                tqdm(total=n_updates * batch_size, disable=not progress_bar, unit="step", dynamic_ncols=True) as bar:
            for _ in range(n_updates):
                record = self._update()
                bar.update(batch_size)
                bar.set_postfix(ret=f"{record['ep_return_mean']:.1f}", sps=f"{record['steps_per_sec']:.0f}",
                                refresh=False)
                if any([cb(self, record) is False for cb in callbacks]):  # every callback sees every update
                    break
        self._check_replicas()
        if self._logger is not None:
            self._logger.flush()
        return self

    def _steps_per_update(self) -> int:
        """Environment steps per update: this rank's batch, summed over the ranks (one reduction)."""
        if self.group is None:
            return self.config.batch_size
        return int(distributed.all_reduce_sum_(torch.tensor([self.config.batch_size]), self.group))

    def _running_statistics(self, with_missing: bool = False) -> list:
        """The running statistics a rollout updates: the observation normalizer's and the reward
        scaler's (with_missing: both places, None where not enabled)."""
        scaler = self.collector.reward_scaler
        found = [self.normalizer, None if scaler is None else scaler.stats]
        return found if with_missing else [s for s in found if s is not None]

    def _check_replicas(self) -> None:
        if self.group is None:
            return
        tensors = {"policy": list(self.policy.parameters()), "value_net": list(self.value_net.parameters())}
        for name, statistics in zip(("observation statistics", "return statistics"), self._running_statistics(True)):
            if statistics is not None:
                tensors[name] = [torch.from_numpy(statistics.mean), torch.from_numpy(statistics.var)]
        with distributed.collective_errors(self.group):
            distributed.check_replicas(tensors, self.group)

    def _update(self) -> dict:
        """One update: a rollout, the trust-region policy step, the critic, the log record."""
        with distributed.collective_errors(self.group):
            return self._update_steps()

    def _update_steps(self) -> dict:
        config, group = self.config, self.group
        start = time.perf_counter()
        batch = self.collector.collect(self.policy, self._values, self.generator, config.gamma, config.gae_lambda)
        for statistics in self._running_statistics():
            statistics.sync(group)  # once per rollout: the ranks' observations (and returns) merged
        rollout_time = time.perf_counter() - start
        steps = config.batch_size * self.world_size
        self.num_timesteps += steps

        if self.update_layout == "split":
            batch, policy_log, value_loss, critic_time = self._split_update(batch)
        else:
            policy_log = self._policy_step(batch.obs, batch.actions, batch.advantages, batch.action_masks, group)
            t = time.perf_counter()  # Adam minibatch regression of V(s) on the GAE returns, one extension call
            value_loss = fit_value_network(self.value_net, self.critic_optimizer, batch.obs, batch.returns,
                                           config.critic_epochs, config.critic_batch_size, self.generator,
                                           process_group=group, parallel=config.critic_parallel)
            critic_time = time.perf_counter() - t
        self.n_updates += 1
        if group is not None and self.n_updates % CHECK_REPLICAS_EVERY == 0:
            self._check_replicas()

        ret_mean, len_mean = self.collector.stats.means(group)
        record = {
            "update": self.n_updates, "timesteps": self.num_timesteps,
            "ep_return_mean": ret_mean, "ep_length_mean": len_mean,
            **policy_log,
            "value_loss": value_loss, "explained_variance": _explained_variance(batch.values, batch.returns),
            "steps_per_sec": steps / (time.perf_counter() - start), "world_size": self.world_size,
            "time_rollout": rollout_time, "time_critic": critic_time,
        }
        self.last_record = record
        if self.log_dir is not None:
            if self._logger is None:
                self._logger = RunLogger(self.log_dir)
            self._logger.write(record)
        return record

    def _policy_step(self, obs, actions: torch.Tensor, advantages: torch.Tensor,
                     action_masks: torch.Tensor | None, group) -> dict:
        """`trust_region_step` on the (normalized) advantages, Fisher products on a random
        `fvp_fraction` of the batch, data-parallel over `group`; its part of the log record."""
        if self.config.normalize_advantage:
            advantages = _normalized(advantages, group)
        fvp_obs = fvp_masks = None
        if self.config.fvp_fraction < 1.0:
            n = spaces.batch_len(obs)
            k = max(1, int(round(self.config.fvp_fraction * n)))
            subset = torch.randperm(n, generator=self.generator, device=advantages.device)[:k]
            fvp_obs = spaces.rows(obs, subset)
            fvp_masks = None if action_masks is None else action_masks[subset]
        step = trust_region_step(self.policy, obs, actions, advantages, fvp_obs=fvp_obs, process_group=group,
                                 action_mask=action_masks, fvp_action_mask=fvp_masks,
                                 **dataclasses.asdict(self.config.trust_region))
        return _step_log(step)

    def _split_update(self, batch: Batch) -> tuple[Batch, dict, float, float]:
        """update_parallel="split" (2 ranks; docs/distributed.md): the ranks gather the whole batch
        (one collective pair, which also carries rank 0's seed for the critic's minibatch order, drawn
        as `critic.shared_generator` draws it); then rank 0 takes the policy step and rank 1 fits the
        critic, on the whole batch and at the same time; one more collective gives every rank both
        results (the networks, the critic's Adam state, the log entries). Returns the gathered batch,
        the policy step's log, the value loss and the critic's time. A step that raises on its rank
        still shares what it left (its networks as they are), then both ranks raise."""
        config, group = self.config, self.group
        obs, layout = spaces.pack(batch.obs)
        masks = [] if batch.action_masks is None else [batch.action_masks]
        gathered, ints = distributed.gather_tensors(
            [obs, batch.actions, batch.advantages, batch.returns, batch.values, *masks], group,
            [draw_seed(self.generator)])  # every rank draws: the ranks' streams advance alike
        obs, actions, advantages, returns, values, *masks = gathered
        batch = Batch(obs=spaces.unpack(obs, layout), actions=actions, advantages=advantages, returns=returns,
                      values=values, action_masks=masks[0] if masks else None)

        policy_log, value_loss, critic_time, failure = dict.fromkeys(_STEP_LOG_TYPES, 0.0), float("nan"), 0.0, None
        try:
            if self.rank == 0:
                policy_log = self._policy_step(batch.obs, batch.actions, batch.advantages, batch.action_masks, None)
            else:
                t = time.perf_counter()
                value_loss = fit_value_network(self.value_net, self.critic_optimizer, batch.obs, batch.returns,
                                               config.critic_epochs, config.critic_batch_size,
                                               seeded_generator(int(ints[0, 0]), self.device))
                critic_time = time.perf_counter() - t
        except Exception as exc:  # shared below, so that the other rank does not wait for results in vain
            failure = exc
        failed = float(failure is not None)
        policy_part = torch.tensor([*(float(v) for v in policy_log.values()), failed], dtype=torch.float64)
        critic_part = torch.tensor([value_loss, critic_time, failed], dtype=torch.float64)
        critic_params = list(self.value_net.parameters())
        _, steps, exp_avg, exp_avg_sq = adam_state(self.critic_optimizer, critic_params)
        distributed.share_([(0, [*self.policy.parameters(), policy_part]),
                            (1, [*critic_params, *steps, *exp_avg, *exp_avg_sq, critic_part])], group)
        if failure is not None:
            raise failure
        for owner, (part, task) in enumerate(((policy_part, "policy step"), (critic_part, "critic fit"))):
            if part[-1]:
                raise RuntimeError(f"data-parallel split update: the {task} failed on rank {owner} (its error is in "
                                   "that rank's output); every rank holds the networks as that rank left them")
        policy_log = {k: kind(v) for (k, kind), v in zip(_STEP_LOG_TYPES.items(), policy_part.tolist())}
        return batch, policy_log, critic_part[0].item(), critic_part[1].item()

    # ------------------------------------------------------------------------- use
    @property
    def observation_space(self) -> gym.spaces.Box:
        """The space of one observation (what `predict` takes)."""
        return self.envs.single_observation_space

    @property
    def action_space(self) -> gym.spaces.Space:
        """The space of one action (what `predict` returns for one observation)."""
        return self.envs.single_action_space

    def predict(self, observation, state=None, episode_start=None, deterministic: bool = False,
                action_masks=None) -> tuple[np.ndarray, None]:
        """`(actions, None)` for observations as the env returns them, as stable-baselines3's
        `predict`: one observation gives one action, a batch (a leading axis; for a Dict space, on
        every entry) one action per row. The policy is not recurrent: `state` and `episode_start` are
        accepted and ignored, and the returned state is None.

        Preprocessing and normalization are applied inside; Box actions are clipped to the action
        space; actions come in the form the env takes. `action_masks` (Discrete / MultiDiscrete
        actions): bool, one entry per action (of every sub-action), (logits,) for one observation or
        (B, logits); a masked action is never returned. `deterministic`: the distribution's mode (the
        most probable class, p > 1/2, or the Gaussian's mean), for a custom policy too. Sampling
        uses torch's global RNG, so predicting never changes the training random stream. ValueError
        for the `(obs, info)` tuple `reset()` returns, a wrong shape, or NaN / inf in the observation.
        """
        if isinstance(observation, tuple) and len(observation) == 2 and isinstance(observation[1], dict):
            raise ValueError("predict got the (obs, info) tuple that env.reset() returns; pass the observation: "
                             "obs, info = env.reset()")
        codec = self.collector.codec
        obs, single = codec.raw_single(observation)
        if codec.plain_box:
            obs = obs.astype(np.float32)
        bad = codec.first_nonfinite(obs, single)
        if bad is not None:
            raise ValueError(f"obs contains NaN or inf ({bad})")
        masks = None
        if action_masks is not None:
            n = codec.raw_len(obs)
            masks = np.asarray(action_masks)
            masks = self.collector.action.check_mask(masks[None] if single and masks.ndim == 1 else masks)
            if masks.shape[0] != n:
                raise ValueError(f"action_masks has {masks.shape[0]} rows for {n} observations")
        with torch.no_grad():
            _, actions = self.collector.act(self.policy, obs, deterministic=deterministic,
                                            masks=self.collector.mask_tensor(masks))
        actions = self.collector.env_actions(actions)
        return (actions[0] if single else actions), None

    def evaluate(self, n_episodes: int = 10, deterministic: bool = True, env=None,
                 seed: int | None = None) -> tuple[float, float]:
        """Mean and standard deviation of the return over `n_episodes` full episodes.

        Runs on a separate env (`env`, or a fresh copy of the training env), so training is undisturbed.
        """
        check_int("n_episodes", n_episodes, 1)
        if env is None:
            if self.make_eval_env is None:
                raise ValueError("evaluate: the training env cannot be copied (no registered id); pass env=")
            env = self.make_eval_env()
        elif isinstance(env, (str, gym.envs.registration.EnvSpec)):
            env = gym.make(env)
        seed = self.config.seed + 1_000_003 if seed is None else seed
        returns = []
        spec = self.collector.action
        for episode in range(n_episodes):
            obs, info = env.reset(seed=seed + episode)
            total, done = 0.0, False
            while not done:
                masks = single_env_masks(env, info, spec)  # None when the env has none
                action = self.predict(obs, deterministic=deterministic, action_masks=masks)[0]
                obs, reward, terminated, truncated, info = env.step(action)
                total += float(reward)
                done = terminated or truncated
            returns.append(total)
        return float(np.mean(returns)), float(np.std(returns))

    # ------------------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike) -> None:
        """Writes everything needed to resume into one file, atomically (temporary file + rename).

        Env states are included when the envs are synchronous and picklable; then
        `load(path, restore_env_states=True)` continues the interrupted episodes exactly. The
        format: `trpo_ext.checkpoint`. Data-parallel: rank 0 writes the file (the ranks hold the
        same networks and statistics; its envs, episode statistics and random stream are rank 0's);
        on the other ranks this does nothing.
        """
        if self.rank == 0:
            if self._logger is not None:  # the log rows up to this checkpoint reach the disk with it
                self._logger.flush()
            checkpoint.save(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike, env=None, *, n_envs: int | None = None,
             device: str | torch.device | None = None, log_dir: str | os.PathLike | None = None,
             restore_env_states: bool = False, continue_log: bool = False, policy=None,
             value_net=None) -> "TRPO":
        """Restores an agent saved by `save`: networks, optimizer, statistics, RNG and step count.

        A checkpoint holds the networks' state dicts (tensors) and, for information only, their
        classes' qualified names; it never imports or runs code named in it. So an agent built with
        a custom `policy=` / `value_net=` must be given them again here, as the constructor takes
        them (a module of the same architecture, or the callable), and the saved parameters are
        loaded into it; loading such a file without `policy=` (or `value_net=`) is a ValueError
        naming the saved class. The built-in networks need nothing.

        With `env=None` fresh envs are made from the saved env id, looked up in this process's
        gymnasium registry (the registered spec is used; nothing in the file names code to run);
        pass `env` (anything the constructor takes; a single Env instance means n_envs=1) to train
        or evaluate elsewhere, or when the id is not registered here. `n_envs` replaces the saved
        number of env copies.

        `continue_log=True` continues the run in `log_dir` (the one that wrote the checkpoint):
        its progress.csv rows and TensorBoard events after the checkpoint are dropped and new ones
        appended, instead of logging into a fresh numbered directory (what restarts use).

        `restore_env_states=True` instead continues the saved envs' interrupted episodes exactly.
        **This unpickles the env states stored in the file, and unpickling runs whatever code the
        file names: use it only on files you wrote yourself or fully trust.** Without it, loading
        reads plain data and tensors only.
        """
        agent = checkpoint.load(cls, path, env, n_envs=n_envs, device=device,
                                log_dir=None if continue_log else log_dir, restore_env_states=restore_env_states,
                                policy=policy, value_net=value_net)
        if continue_log and log_dir is not None and agent.rank == 0:
            # The run that wrote the checkpoint goes on logging in log_dir, from the checkpoint's update.
            agent.log_dir = os.fspath(log_dir)
            agent._logger = RunLogger(agent.log_dir, resume_from=(agent.n_updates, agent.num_timesteps))
        return agent

    def close(self) -> None:
        """Closes the envs and the log files."""
        self.envs.close()
        if self._logger is not None:
            self._logger.close()
            self._logger = None


def _check_timesteps(total_timesteps) -> int:
    """total_timesteps as an int >= 0; integral floats (1e5) are accepted, 1.5 is refused."""
    if isinstance(total_timesteps, (float, np.floating)) and float(total_timesteps).is_integer():
        total_timesteps = int(total_timesteps)
    return check_int("total_timesteps", total_timesteps, 0)


def _check_callback(callback) -> list:
    """`callback` as a list of callables: None, a callable, or a list / tuple of callables;
    ValueError for anything else, before any training."""
    if callback is None:
        return []
    callbacks = list(callback) if isinstance(callback, (list, tuple)) else [callback]
    for cb in callbacks:
        if not callable(cb):
            raise ValueError(f"callback must be a callable callback(agent, record) or a list of them, "
                             f"got {type(cb).__name__} {cb!r:.60}")
    return callbacks


def _step_log(step: StepRecord) -> dict:
    """A policy step's entries of the log record."""
    return {"kl": step.kl, "surrogate_improvement": step.improvement,
            "expected_improvement": step.expected_improvement, "line_search_steps": step.line_search_steps,
            "line_search_failed": int(not step.accepted), "cg_iterations": step.cg_iterations,
            "cg_residual": step.cg_residual, "entropy": step.entropy, "policy_std": step.policy_std,
            "time_cg": step.time_cg, "time_line_search": step.time_line_search}


_STEP_LOG_TYPES = {k: type(v) for k, v in _step_log(StepRecord(**{
    f.name: 0.0 if f.type == "float" else 0 for f in dataclasses.fields(StepRecord)})).items()}
"""The type (int or float) of each of `_step_log`'s entries, in its order: how the split update
restores them from the float64 tensor they travel in."""


def _normalized(advantages: torch.Tensor, group) -> torch.Tensor:
    """(A - mean) / (std + 1e-8), the mean and the (unbiased) std over every rank's advantages
    (one reduction of the count, the sum and the sum of squares in float64)."""
    if group is None:
        return (advantages - advantages.mean()) / (advantages.std() + 1e-8)
    a = advantages.double()
    n, total, squares = distributed.all_reduce_sum_(torch.stack([a.new_tensor(a.numel()), a.sum(), (a * a).sum()]),
                                                    group).tolist()
    mean = total / n
    std = math.sqrt(max(squares - n * mean * mean, 0.0) / max(n - 1, 1))
    return (advantages - mean) / (std + 1e-8)


def _explained_variance(values: torch.Tensor, returns: torch.Tensor) -> float:
    var = returns.var().item()
    return float("nan") if var == 0 else 1.0 - (returns - values).var().item() / var


@contextlib.contextmanager
def _torch_threads(n: int | None):
    """torch.set_num_threads(n) for the block (nothing when n is None), then the previous setting."""
    previous = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _resolve_device(device) -> torch.device:
    """`device` as a torch.device; ValueError for a name torch does not know or a CUDA device this
    process cannot use (no CUDA build, no GPU, or no GPU of that index)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'auto' or a torch.device, got {device!r}") from e
    if resolved.type == "cuda":
        if torch.version.cuda is None:
            raise ValueError(f"device={device!r}: this torch ({torch.__version__}) was built without CUDA; "
                             "use device='cpu'")
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r}: CUDA is not available (no GPU visible); use device='cpu'")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device={device!r}: there are only {torch.cuda.device_count()} CUDA devices")
    return resolved
