"""Where invalid-action masks come from: an env's `action_masks()` method (as sb3-contrib's
MaskablePPO reads them) or `info["action_mask"]`, for the rollout's vector env (`ActionMasks`) and
for one env at evaluation (`single_env_masks`).
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np

from .distributions import ActionSpec


class ActionMasks:
    """Where an env's invalid-action masks come from, decided at the first reset: an `action_masks()`
    method of each sub-env (reached through its wrappers, as sb3-contrib's MaskablePPO calls it),
    else `info["action_mask"]` (of reset and of every step), else none (every action valid)."""

    def __init__(self, envs: gym.vector.VectorEnv, spec: ActionSpec):
        self.envs, self.spec = envs, spec
        self.source: str | None = None  # "method", "info" or None

    def start(self, infos: dict) -> np.ndarray | None:
        """At a reset: picks the source, returns the first masks (or None)."""
        self.source = None
        if not self.spec.maskable:
            return None
        # Asked through has_wrapper_attr: a failing call would shut an AsyncVectorEnv's worker down.
        if all(self.envs.call("has_wrapper_attr", "action_masks")):
            self.source = "method"
            return self._checked(self.envs.call("action_masks"))
        if "action_mask" in infos:
            self.source = "info"
            return self._checked(infos["action_mask"])
        return None

    def after_step(self, infos: dict) -> np.ndarray | None:
        if self.source == "method":
            return self._checked(self.envs.call("action_masks"))
        if self.source == "info":
            if "action_mask" not in infos:
                raise ValueError("the env gave info['action_mask'] at reset but not after a step; every step's "
                                 "info must carry the mask of the observation it returns")
            return self._checked(infos["action_mask"])
        return None

    def _checked(self, masks) -> np.ndarray:
        return self.spec.check_mask(np.stack([np.asarray(m).reshape(-1) for m in masks]),
                                    f"the env's action masks ({self.source or 'action_masks()'})", row="env")


def single_env_masks(env: gym.Env, info: dict, spec: ActionSpec) -> np.ndarray | None:
    """The action masks (1, logits) of one env's current observation, found as `ActionMasks` finds
    them (an `action_masks()` method, else info["action_mask"]), or None."""
    if not spec.maskable:
        return None
    mask = env.get_wrapper_attr("action_masks")() if env.has_wrapper_attr("action_masks") else info.get("action_mask")
    return None if mask is None else spec.check_mask(np.asarray(mask).reshape(1, -1), "the env's action mask")
