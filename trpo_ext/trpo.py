"""The TRPO agent (Schulman et al., 2015), top to bottom: construction, `learn`, one update
(rollout → trust-region policy step → critic → log record), predict / evaluate, save / load, close.

The parts live beside it: hyperparameters and their checks in `config`, env construction in
`envs`, rollouts and GAE in `rollout`, observation / reward statistics in `normalization`, policy
inference (for the rollout and `predict`) in `inference`, the natural-gradient step with the fused
CG solve and the line search in `step`, the critic regression in `critic`, the 2-rank split update
in `split_update`, the file format in `checkpoint`, progress.csv / TensorBoard in `logger`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
import warnings

import gymnasium as gym
import numpy as np
import torch

from . import checkpoint, distributed, sb3_names, spaces
from .config import HYPERPARAMETERS, TRPOConfig, check_int, check_num_threads, policy_defaults, recurrent_layout
from .critic import check_parallel, fit_value_network, fused_value
from .distributions import action_spec
from .envs import eval_env_factory, make_vec_env, registered_spec
from .logger import RunLogger, check_log_dir
from .normalization import RewardScaler, RunningNormalizer
from .policies import FlatValues, build_networks, check_custom_value_net
from .recurrent import is_recurrent, is_recurrent_spec
from .rollout import EpisodeStats, RolloutCollector
from .split_update import split_update
from .step import StepRecord, trust_region_step

RANK_SEED_STRIDE = 1_000_033
"""Data-parallel rank r seeds its envs and its sampling with seed + r * RANK_SEED_STRIDE (rank 0:
the seed itself), so ranks never share an env seed while n_envs < RANK_SEED_STRIDE."""

EVAL_MAX_EPISODE_STEPS = 100_000
"""`evaluate`'s step limit per episode when neither its `max_episode_steps` nor the env's spec gives
one, so that an env that never ends still returns."""

CHECK_REPLICAS_EVERY = 10
"""Data-parallel: every this many updates (and at the end of `learn`) the ranks compare checksums
of their networks and observation statistics, and fail loudly if they differ."""


class TRPO(metaclass=sb3_names.SB3Hint):  # sb3-contrib's call order and names get a hint
    """Trust Region Policy Optimization with the fused Fisher-vector-product CG solve.

    Args (docs/guide.md describes each in full):
        env: a gymnasium id, an `EnvSpec`, a `gymnasium.Env` (with n_envs=1), a callable returning an
            Env, or a vector env built with `autoreset_mode=SAME_STEP`; the spaces: docs/spaces.md.
        policy: "auto" (the built-in network that fits the observations), "MlpPolicy", "CnnPolicy",
            "MultiInputPolicy", an `nn.Module` returning the action distribution, or a callable building one.
        value_net: the critic, likewise ("auto": the built-in critic that fits the policy); a custom
            module is given again to `TRPO.load`, as a custom policy is.
        n_envs … seed: the hyperparameters, documented and checked in `trpo_ext.config.TRPOConfig`
            (`agent.config`); `seed=None` draws one; other Nones: the policy's (`config.default_settings`).
        log_dir: directory for progress.csv and TensorBoard events (one that holds a run is never
            appended to: the run goes to a numbered sibling); None logs nowhere.
        device: "cpu", "cuda", "cuda:N", a torch.device, or "auto" (CUDA when available).
        num_threads: torch's CPU threads while `learn` runs (default 1: docs/benchmarks.md, "Threads");
            None leaves torch's own setting.
        process_group: data-parallel training (docs/distributed.md): "auto" (torch.distributed's
            default group when one is initialised), a ProcessGroup, or None (this process alone).
    """

    def __init__(self, env, *, n_envs: int = 8, n_steps: int = 128, gamma: float = 0.99,
                 gae_lambda: float = 0.95, max_kl: float | None = None, damping: float | None = None, cg_iters: int = 10,
                 cg_rtol: float = 1e-10, backtrack_factor: float = 0.8, max_backtracks: int = 10,
                 fvp_fraction: float = 1.0, normalize_advantage: bool = True, normalize_obs: bool = False,
                 obs_clip: float = 10.0, normalize_reward: bool = False, reward_clip: float = 10.0,
                 critic_lr: float = 1e-3, critic_epochs: int = 10, critic_batch_size: int | None = None,
                 critic_parallel: str = "gather", update_parallel: str = "auto", policy_kwargs: dict | None = None,
                 vectorization: str = "sync", stats_window: int = 100, log_dir: str | os.PathLike | None = None,
                 seed: int | None = None, use_sde: bool = False, sde_sample_freq: int = -1,
                 device: str | torch.device = "cpu", num_threads: int | None = 1, process_group="auto",
                 policy="auto", value_net="auto"):
        arguments = locals()  # the hyperparameters are the signature's keywords of TRPOConfig's fields
        arguments.update(policy_defaults(arguments, is_recurrent_spec(policy)))  # None: the policy's default
        config = TRPOConfig.from_dict({name: arguments[name] for name in HYPERPARAMETERS})
        self.group = distributed.resolve_group(process_group)
        if self.group is not None:  # the agent adopts the group: gloo's event loops yield to the ranks' work
            distributed.lower_gloo_event_loops(self.group)
        self.rank, self.world_size = distributed.rank(self.group), distributed.world_size(self.group)
        self.update_layout = config.update_layout(self.world_size)  # None, "split" or "data"
        self.log_dir = check_log_dir(log_dir) if self.rank == 0 else None
        self.device = _resolve_device(device)
        self.num_threads = None if num_threads is None else check_num_threads(num_threads)

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
        self.inference = self.collector.inference  # predict's too

        # Networks, the critic's optimizer and the training random stream.
        try:
            self.policy, self.value_net, self.network_names = build_networks(
                policy, value_net, codec, action_space, config.policy_kwargs, config.seed, self.device, config.sde)
            self.update_layout = recurrent_layout(config, self.update_layout, is_recurrent(self.policy))
            if not fused_value(self.value_net) and not is_recurrent(self.value_net):
                check_custom_value_net(self.value_net, codec, self.device, packed=is_recurrent(self.policy))
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
        update's log record (a dict; also `agent.last_record`, and a row of progress.csv / TensorBoard
        scalars when `log_dir` is set; docs/guide.md lists its keys); one returning False stops training.

        The progress bar's one speed is tqdm's: wall-clock env steps per second, a moving average
        over the recent updates (everything included: rollouts, steps, logging, callbacks); beside
        it, the record's `ep_return_mean`. A KeyboardInterrupt ends `learn` where it is and leaves
        the agent usable: the policy as before the interrupted update or after its step, the counts
        and log rows of the finished updates; `save` and `learn` work on.
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
                steps_before = self.num_timesteps
                try:
                    record = self._update()
                except KeyboardInterrupt:
                    self.num_timesteps = steps_before  # counts only the updates that finished
                    raise
                bar.set_postfix(ep_return_mean=f"{record['ep_return_mean']:.1f}", refresh=False)
                bar.update(batch_size)
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
            batch, step, value_loss, critic_time = split_update(
                batch, group, functools.partial(self._policy_step, group=None), self.policy, self.value_net,
                self.critic_optimizer, self.generator, config.critic_epochs, config.critic_batch_size)
        else:
            step = self._policy_step(batch.obs, batch.actions, batch.advantages, batch.action_masks, group)
            t = time.perf_counter()  # Adam minibatch regression of V(s) on the GAE returns, one extension call
            value_loss = fit_value_network(self.value_net, self.critic_optimizer, *batch.critic_batch(),
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
            **_step_log(step),
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
                     action_masks: torch.Tensor | None, group) -> StepRecord:
        """`trust_region_step` on the (normalized) advantages, Fisher products on a random
        `fvp_fraction` of the batch, data-parallel over `group`."""
        if self.config.normalize_advantage:
            advantages = _normalized(advantages, group)
        fvp_obs = fvp_masks = None
        if self.config.fvp_fraction < 1.0:
            n = spaces.batch_len(obs)
            k = max(1, int(round(self.config.fvp_fraction * n)))
            subset = torch.randperm(n, generator=self.generator, device=advantages.device)[:k]
            fvp_obs = spaces.rows(obs, subset)
            fvp_masks = None if action_masks is None else action_masks[subset]
        return trust_region_step(self.policy, obs, actions, advantages, fvp_obs=fvp_obs, process_group=group,
                                 action_mask=action_masks, fvp_action_mask=fvp_masks,
                                 **dataclasses.asdict(self.config.trust_region))

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
                action_masks=None) -> tuple[np.ndarray, tuple | None]:
        """`(actions, state)` for observations as the env returns them, as stable-baselines3's
        `predict`: one observation gives one action, a batch (a leading axis; for a Dict space, on
        every entry) one action per row. A recurrent policy's state goes in and out as sb3-contrib
        RecurrentPPO's does (docs/guide.md, "Recurrent policies"); for any other policy `state` and
        `episode_start` are ignored and the state is None.

        Preprocessing and normalization are applied inside; Box actions are clipped to the action
        space; actions come in the form the env takes. `action_masks` (Discrete / MultiDiscrete
        actions): bool, one entry per action (of every sub-action), (logits,) for one observation or
        (B, logits); a masked action is never returned. `deterministic`: the distribution's mode (the
        most probable class, p > 1/2, or the Gaussian's mean), for a custom policy too. Sampling
        uses torch's global RNG, so predicting never changes the training random stream. ValueError,
        naming the entry, what came and what the space allows, for the `(obs, info)` tuple `reset()`
        returns or an observation that does not fit the observation space: its shape or dtype (no
        strings, complex numbers or floats for integer entries), NaN / inf, a Discrete / MultiDiscrete
        entry out of range, a MultiBinary entry other than 0 / 1, an image value outside 0..255.
        """
        return self.inference.predict(self.policy, observation, deterministic, action_masks, state, episode_start)

    def evaluate(self, n_episodes: int = 10, deterministic: bool = True, env=None,
                 seed: int | None = None, max_episode_steps: int | None = None) -> tuple[float, float]:
        """Mean and standard deviation of the return over `n_episodes` episodes.

        Runs on a separate env (`env`, or a fresh copy of the training env, closed at the end), so
        training is undisturbed. An episode ends when the env ends it or after `max_episode_steps`
        steps (default: the env's spec's `max_episode_steps`, else `EVAL_MAX_EPISODE_STEPS`); an
        episode cut there counts with its return so far, and a warning says how many were cut. Each
        reset's and step's return is checked as in training (`trpo_ext.envs.step_problem`): a
        ValueError names the episode, the step and the field.
        """
        check_int("n_episodes", n_episodes, 1)
        if max_episode_steps is not None:
            check_int("max_episode_steps", max_episode_steps, 1)
        own = env is None or isinstance(env, (str, gym.envs.registration.EnvSpec))
        if env is None:
            if self.make_eval_env is None:
                raise ValueError("evaluate: the training env cannot be copied (no registered id); pass env=")
            env = self.make_eval_env()
        elif own:
            env = gym.make(env)
        spec_limit = getattr(getattr(env, "spec", None), "max_episode_steps", None)
        limit = max_episode_steps or spec_limit or EVAL_MAX_EPISODE_STEPS
        seed = self.config.seed + 1_000_003 if seed is None else seed
        try:
            returns, cut = self.inference.episodes(self.policy, env, n_episodes, deterministic, seed, limit)
        finally:
            if own:
                env.close()
        if cut:
            warnings.warn(f"evaluate: {cut} of {n_episodes} episodes did not end within {limit} steps and were cut "
                          "there (their returns so far count); max_episode_steps= sets the limit", stacklevel=2)
        return float(np.mean(returns)), float(np.std(returns))

    # ------------------------------------------------------------------------- save / load
    def save(self, path: str | os.PathLike, every_rank: bool = False) -> None:
        """Writes everything needed to resume into one file, atomically (temporary file + rename).

        Env states are included when the envs are synchronous and picklable; then
        `load(path, restore_env_states=True)` continues the interrupted episodes exactly. The
        format: `trpo_ext.checkpoint`. Data-parallel: rank 0 writes the file (the ranks hold the
        same networks and statistics) with its own envs, episode statistics and random stream, and
        elsewhere this does nothing; `every_rank=True` adds every rank's own, so that such a load at
        the same world size continues each rank exactly: a collective, called by every rank at once.
        """
        rank_states = checkpoint.gather_rank_states(self) if every_rank else None
        if self.rank == 0:
            if self._logger is not None:  # the log rows up to this checkpoint reach the disk with it
                self._logger.flush()
            checkpoint.save(self, path, rank_states)

    @classmethod
    def load(cls, path: str | os.PathLike, env=None, *, n_envs: int | None = None,
             device: str | torch.device | None = None, log_dir: str | os.PathLike | None = None,
             restore_env_states: bool = False, continue_log: bool = False, policy=None,
             value_net=None) -> "TRPO":
        """Restores an agent saved by `save`: networks, optimizer, statistics, RNG and step count
        (docs/guide.md, "Save, load, resume").

        Loading never imports or runs code named in the file: the networks are state dicts, so a
        custom `policy=` / `value_net=` must be given again here (as the constructor takes them;
        without it, a ValueError naming the saved class), and with `env=None` the envs are made from
        the saved id as registered in this process. `env` (anything the constructor takes) and
        `n_envs` replace the saved ones. `continue_log=True` continues the run in `log_dir` (the one
        that wrote the checkpoint) from the checkpoint's update, as restarts do.

        `restore_env_states=True` continues the saved envs' interrupted episodes exactly (every rank's
        in a data-parallel job: `save(every_rank=True)` at this world size). **It unpickles the env
        states stored in the file, and unpickling runs whatever code the file names: use it only on
        files you wrote yourself or fully trust.**
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
