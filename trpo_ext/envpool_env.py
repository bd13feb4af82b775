"""EnvPool's C++ thread pool as the rollout's vector env: `vectorization="envpool"` (docs/guide.md, "EnvPool").

EnvPool (the optional extra `pip install ".[envpool]"`) steps its envs in C++ threads and
resets a finished env on its NEXT step: the step after a done returns the new episode's first
observation with reward 0, and the action given to that env is ignored. The rollout collector
(trpo_ext.rollout) steps SAME_STEP vector envs, and `EnvPoolVectorEnv` is one: right after a step
that ends episodes it resets those envs (EnvPool's partial reset, which draws the same first state
its autoreset would), returns their first observations in place of the final ones and the final
ones in `infos["final_obs"]` (mask `infos["_final_obs"]`), as `envs.LeanSyncVectorEnv` does. EnvPool's
autoreset step never happens, so no transition crosses a reset, and a truncated episode bootstraps
from the observation of its truncating step.
"""
from __future__ import annotations

import contextlib
import difflib
import os
import warnings

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

ENVPOOL_VERSION = "1.2.5"
"""The EnvPool release trpo_ext is tested with (pyproject.toml's `envpool` extra pins it)."""

INSTALL = f'pip install ".[envpool]" in the trpo_ext checkout (or pip install envpool=={ENVPOOL_VERSION})'

OWN_OPTIONS = ("num_envs", "batch_size", "num_threads", "seed", "env_seed", "max_num_players",
               "thread_affinity_offset", "base_path", "gym_reset_return_info")
"""EnvPool's config keys that this module sets itself (n_envs, the seeds at reset, the threads, sync mode)."""

SEED_MODULUS = 2**31
"""EnvPool's seeds are int32: env i of a pool reset with `seed` gets (seed + i) mod 2**31."""


def import_envpool():
    """The envpool module; an ImportError saying how to install it otherwise."""
    try:
        import envpool
    except ImportError as e:
        raise ImportError(f"vectorization='envpool' needs EnvPool, which is not installed: {INSTALL}; "
                          "it needs Python >= 3.11") from e
    return envpool


def default_threads(n_envs: int) -> int:
    """EnvPool's thread count: the cores this process may run on (its CPU affinity), at most one per env."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # no sched_getaffinity (macOS)
        cores = os.cpu_count() or 1
    return max(1, min(cores, n_envs))


def _task(env) -> tuple[str, dict, gym.envs.registration.EnvSpec | None]:
    """(EnvPool task id, its options, the gymnasium spec of the same env or None) for TRPO's `env`."""
    if isinstance(env, str):
        return env, {}, gym.registry.get(env)
    if isinstance(env, gym.envs.registration.EnvSpec):
        if env.additional_wrappers:
            names = [w.name for w in env.additional_wrappers]
            raise ValueError(f"env: vectorization='envpool' cannot apply the EnvSpec's wrappers {names} to EnvPool's "
                             "C++ envs; pass the spec without them, or use vectorization='sync' or 'async'")
        options = dict(env.kwargs)
        if env.max_episode_steps is not None:
            options["max_episode_steps"] = env.max_episode_steps
        return env.id, options, env
    what = ("a gymnasium.Env instance" if isinstance(env, gym.Env) else "a callable" if callable(env)
            else f"{type(env).__name__} {env!r:.60}")
    raise ValueError(f"env: vectorization='envpool' makes its envs from an EnvPool task id (or an EnvSpec of one), "
                     f"got {what}: EnvPool steps its own C++ envs, not Python ones; pass the id, or use "
                     "vectorization='sync' or 'async'")


class EnvPoolVectorEnv(gym.vector.VectorEnv):
    """`num_envs` envs of an EnvPool task as a SAME_STEP-autoreset gymnasium vector env (the module
    docstring says how), for `vectorization="envpool"`.

    `env`: an EnvPool task id (`envpool.list_all_envs()`: every MuJoCo v4/v5 task and classic
    control under gymnasium's ids, and more), or an EnvSpec of one whose kwargs EnvPool's task takes
    under the same names (its max_episode_steps too). `options`: more of EnvPool's task options
    (e.g. `max_episode_steps=5`); an env made with them has no gymnasium spec (`spec` is None).

    Seeding: `reset(seed=s)` makes a fresh pool in which env i is seeded with s + i (mod 2**31;
    EnvPool's own scheme for an int seed), so a reset with a seed always starts the same episodes;
    `reset()` restarts every episode of the current pool. Threads: `default_threads`. Observations
    come in the observation space's dtype, rewards as float64 (EnvPool computes them in float32),
    terminations and truncations as EnvPool reports them.
    """

    def __init__(self, env, num_envs: int, **options):
        task, given, spec = _task(env)
        envpool = import_envpool()
        if task not in envpool.list_all_envs():
            close = difflib.get_close_matches(task, envpool.list_all_envs(), 3)
            raise ValueError(f"env: EnvPool {envpool.__version__} has no task {task!r}"
                             f"{' (close: ' + ', '.join(close) + ')' if close else ''}; envpool.list_all_envs() "
                             "lists its tasks; vectorization='sync' runs gymnasium's envs")
        options = {**given, **options}
        keys = envpool.make_spec(task).config._fields
        own = sorted(set(options) & set(OWN_OPTIONS))
        unknown = sorted(set(options) - set(keys))
        if own or unknown:
            raise ValueError(f"env: EnvPool's {task!r} cannot take the option(s) {own or unknown}: "
                             + ("trpo_ext sets them (n_envs, reset(seed=...), the threads)" if own else
                                f"its options are {sorted(set(keys) - set(OWN_OPTIONS))}"))
        try:
            with _quiet_spaces():
                pool_spec = envpool.make_spec(task, num_envs=num_envs, **options)
                self.single_observation_space = pool_spec.gymnasium_observation_space
                self.single_action_space = pool_spec.gymnasium_action_space
        except (TypeError, ValueError, AssertionError) as e:
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ValueError(f"env: EnvPool's {task!r} refused the options {options}: {first_line}") from None
        self.observation_space = batch_space(self.single_observation_space, num_envs)
        self.action_space = batch_space(self.single_action_space, num_envs)
        self.num_envs = num_envs
        self.metadata = {"autoreset_mode": gym.vector.AutoresetMode.SAME_STEP}
        self.spec = spec if options == given else None  # evaluate and save rebuild gymnasium's env from it
        self.task_id, self.options, self.num_threads = task, options, default_threads(num_envs)
        self.pool, self.seed = None, None
        self._env_ids = np.arange(num_envs, dtype=np.int32)
        self._dtypes = _dtypes(self.single_observation_space)

    def _make_pool(self, seed: int) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        seeds = [(seed + i) % SEED_MODULUS for i in range(self.num_envs)]
        with _quiet_spaces():
            self.pool = import_envpool().make(self.task_id, "gymnasium", num_envs=self.num_envs, seed=seeds,
                                              num_threads=self.num_threads, **self.options)
            self.pool.observation_space  # noqa: B018 (made once, here, where its warning is silenced)
        self.seed = seed

    def _cast(self, obs):
        """Observations in the space's dtype (a Dict space: each entry's)."""
        if isinstance(obs, dict):
            return {k: v if v.dtype == self._dtypes[k] else v.astype(self._dtypes[k]) for k, v in obs.items()}
        return obs if obs.dtype == self._dtypes else obs.astype(self._dtypes)

    def reset(self, *, seed=None, options=None):
        """A fresh pool seeded `seed` + i per env (a random seed when there is no pool yet), or, with
        `seed=None`, every episode of the current pool restarted."""
        if options:
            raise ValueError(f"options: EnvPoolVectorEnv.reset takes none, got {options!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))):
            raise ValueError(f"seed: EnvPool seeds env i with seed + i; give one int, got {seed!r}")
        if seed is not None or self.pool is None:
            self._make_pool(int(np.random.SeedSequence().generate_state(1)[0]) if seed is None else int(seed))
        obs, _ = self.pool.reset()
        return self._cast(obs), {}

    def step(self, actions):
        obs, rewards, terminated, truncated, info = self.pool.step(np.asarray(actions))
        if not np.array_equal(info["env_id"], self._env_ids):  # a sync pool answers in env order; make sure
            order = np.argsort(info["env_id"])
            obs, rewards, terminated, truncated = (_rows(obs, order), rewards[order], terminated[order],
                                                   truncated[order])
        obs = self._cast(obs)
        done = terminated | truncated
        infos = {}
        if done.any():  # SAME_STEP: the ended envs reset now (their first observations replace the final ones)
            ended = np.flatnonzero(done).astype(np.int32)
            final = np.full(self.num_envs, None, dtype=object)
            for i in ended:
                final[i] = _rows(obs, i, copy=True)
            first, info = self.pool.reset(env_id=ended)
            if not np.array_equal(info["env_id"], ended):
                first = _rows(first, np.argsort(info["env_id"]))
            _set_rows(obs, ended, self._cast(first))
            infos = {"final_obs": final, "_final_obs": done}
        return obs, rewards.astype(np.float64), terminated, truncated, infos

    def call(self, name: str, *args, **kwargs) -> tuple:
        """What the agent asks of each sub-env (trpo_ext.action_masks): EnvPool's envs are C++ envs
        without Python attributes, so `has_wrapper_attr` is False for each; any other name is an AttributeError."""
        if name == "has_wrapper_attr":
            return (False,) * self.num_envs
        raise AttributeError(f"EnvPool's envs are C++ envs: they have no Python attribute {name!r}")

    def close_extras(self, **kwargs) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None


@contextlib.contextmanager
def _quiet_spaces():
    """A block in which gymnasium's warning that a Box's float64 bounds (EnvPool's) become float32 is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*precision lowered by casting to float32")
        yield


def _dtypes(space):
    return {k: s.dtype for k, s in space.spaces.items()} if isinstance(space, gym.spaces.Dict) else space.dtype


def _rows(obs, index, copy: bool = False):
    """obs[index] of a batch (a Dict batch: of each entry), copied when asked."""
    if isinstance(obs, dict):
        return {k: _rows(v, index, copy) for k, v in obs.items()}
    return obs[index].copy() if copy else obs[index]


def _set_rows(obs, index, values) -> None:
    if isinstance(obs, dict):
        for k in obs:
            obs[k][index] = values[k]
    else:
        obs[index] = values
