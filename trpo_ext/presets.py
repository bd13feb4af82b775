"""rl-baselines3-zoo's TRPO hyperparameters, shipped with the package (no download at run time), and
`zoo(env_id)`: the trpo_ext.TRPO keyword arguments that run them with sb3-contrib's meaning, translated
by `trpo_ext.sb3_names` (the per-dimension KL included). `trpo-ext train ENV --preset zoo` uses it.

ZOO_TRPO is hyperparams/trpo.yml of DLR-RM/rl-baselines3-zoo at ZOO_COMMIT, as written there (sb3's
names; its YAML anchors expanded; its `policy_kwargs` strings as the dicts they evaluate to).
"""
from __future__ import annotations

import sys

import torch.nn as nn

from .sb3_names import env_action_space, trpo_ext_kwargs

ZOO_COMMIT = "22e3ff2450fd92033f7f032915e1f64894a09584"

_PYBULLET = dict(normalize=True, n_envs=2, n_timesteps=2e6, policy="MlpPolicy", batch_size=128, n_steps=1024,
                 gamma=0.99, gae_lambda=0.95, sub_sampling_factor=1, cg_max_steps=25, cg_damping=0.1,
                 n_critic_updates=20, learning_rate=1e-3)
_MUJOCO = dict(_PYBULLET, n_timesteps=1e6)
_MINITAUR = dict(normalize=True, n_envs=8, n_timesteps=2e6, policy="MlpPolicy", n_steps=2048, batch_size=64,
                 gae_lambda=0.95, gamma=0.99, learning_rate=2.5e-4)

ZOO_TRPO = {
    "default": dict(n_timesteps=1e6, policy="MlpPolicy"),
    "CartPole-v1": dict(n_envs=2, n_timesteps=1e5, policy="MlpPolicy", n_steps=512, batch_size=512, cg_damping=1e-3,
                        gae_lambda=0.98, gamma=0.99, learning_rate=1e-3, n_critic_updates=20),
    "Pendulum-v1": dict(n_envs=2, n_timesteps=1e5, policy="MlpPolicy", n_steps=1024, gamma=0.9, n_critic_updates=15,
                        use_sde=True, sde_sample_freq=4),
    "LunarLander-v3": dict(n_envs=2, n_timesteps=2e5, policy="MlpPolicy", n_steps=512, cg_damping=0.01,
                           gae_lambda=0.98, gamma=0.99, learning_rate=1e-3, n_critic_updates=15),
    "LunarLanderContinuous-v3": dict(normalize=True, n_envs=2, n_timesteps=1e5, policy="MlpPolicy", n_steps=1024,
                                     n_critic_updates=20),
    "Acrobot-v1": dict(normalize=True, n_envs=2, n_timesteps=1e5, policy="MlpPolicy", n_steps=1024),
    "MountainCar-v0": dict(normalize=True, n_envs=2, n_timesteps=1e5, policy="MlpPolicy", n_steps=1024,
                           n_critic_updates=20),
    "MountainCarContinuous-v0": dict(normalize=True, n_envs=2, n_timesteps=50000, policy="MlpPolicy", use_sde=True,
                                     sde_sample_freq=4),
    "HalfCheetahBulletEnv-v0": _PYBULLET,
    "AntBulletEnv-v0": _PYBULLET,
    "Walker2DBulletEnv-v0": _PYBULLET,
    "HopperBulletEnv-v0": dict(_PYBULLET, n_timesteps=1e6),
    "ReacherBulletEnv-v0": dict(_PYBULLET, n_timesteps=3e5, policy_kwargs=dict(
        log_std_init=-1, ortho_init=False, activation_fn=nn.ReLU, net_arch=dict(pi=[256, 256], vf=[256, 256]))),
    "Ant-v4": _MUJOCO,
    "HalfCheetah-v4": dict(_MUJOCO, target_kl=0.04),
    "Hopper-v4": _MUJOCO,
    "Walker2d-v4": _MUJOCO,
    "Humanoid-v4": dict(_MUJOCO, n_timesteps=2e6),
    "Swimmer-v4": dict(_MUJOCO, gamma=0.9999),
    "BipedalWalker-v3": dict(_MUJOCO, n_timesteps=1e6),
    "BipedalWalkerHardcore-v3": dict(_MUJOCO, n_timesteps=1e7),
    "MinitaurBulletEnv-v0": _MINITAUR,
    "MinitaurBulletDuckEnv-v0": _MINITAUR,
    "HumanoidBulletEnv-v0": dict(_MINITAUR, n_timesteps=1e7),
    "InvertedDoublePendulumBulletEnv-v0": _MINITAUR,
    "InvertedPendulumSwingupBulletEnv-v0": _MINITAUR,
}

# The zoo's `normalize` (VecNormalize's settings; True: its defaults) -> trpo_ext's arguments.
_NORMALIZE = dict(norm_obs="normalize_obs", norm_reward="normalize_reward", clip_obs="obs_clip",
                  clip_reward="reward_clip")
_VEC_NORMALIZE_DEFAULTS = dict(norm_obs=True, norm_reward=True, clip_obs=10.0, clip_reward=10.0)


def zoo_key(env_id: str) -> str:
    """The trpo.yml entry for `env_id`: its own, else its -v4 entry for a -v5 id, else "default"."""
    if env_id in ZOO_TRPO:
        return env_id
    name, _, version = env_id.rpartition("-")
    if version == "v5" and f"{name}-v4" in ZOO_TRPO:
        return f"{name}-v4"
    return "default"


def zoo_timesteps(env_id: str) -> int:
    """The zoo's training budget (n_timesteps) for `env_id`."""
    return int(ZOO_TRPO[zoo_key(env_id)]["n_timesteps"])


def _normalize(value) -> dict:
    """trpo_ext's normalization arguments for the zoo's `normalize` (a bool, or VecNormalize's kwargs)."""
    if value is False:
        return dict(normalize_obs=False, normalize_reward=False)
    given = {} if value is True else dict(value)
    unknown = set(given) - set(_NORMALIZE)
    if unknown:
        raise ValueError(f"normalize={value!r}: trpo_ext takes {', '.join(_NORMALIZE)} of VecNormalize's settings, "
                         f"not {sorted(unknown)[0]}")
    return {_NORMALIZE[k]: v for k, v in {**_VEC_NORMALIZE_DEFAULTS, **given}.items()}


def zoo(env_id: str) -> dict:
    """trpo_ext.TRPO's keyword arguments for rl-baselines3-zoo's TRPO preset of `env_id` (sb3-contrib's
    meaning): n_envs, normalization, and every sb3-contrib argument translated (`trpo_ext_kwargs`).
    Not included: the budget (`zoo_timesteps`), seed and device, and the policy (MlpPolicy in every
    entry: trpo_ext's "auto" for these envs). An env without an entry gets the zoo's default, and a
    one-line notice on stderr. gSDE (Pendulum-v1, MountainCarContinuous-v0) is trpo_ext's use_sde."""
    key = zoo_key(env_id)
    if key == "default":
        print(f"--preset zoo: rl-baselines3-zoo's trpo.yml has no entry for {env_id}; using its default "
              "(sb3-contrib's defaults, 1 env)", file=sys.stderr)
    entry = dict(ZOO_TRPO[key])
    n_envs, normalize = entry.pop("n_envs", 1), entry.pop("normalize", False)
    del entry["n_timesteps"], entry["policy"]
    kwargs = trpo_ext_kwargs(entry, env_action_space(env_id))
    del kwargs["seed"], kwargs["device"]  # not the zoo's: the caller's
    return dict(n_envs=n_envs, **kwargs, **_normalize(normalize))

