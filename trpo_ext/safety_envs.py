"""Cost-constrained tasks for the constrained agents (`trpo_ext.constrained_step`): every step's cost is a
float in info["cost"], 1.0 on a violating step and 0.0 otherwise, where Safety-Gymnasium's gymnasium
conversion wrapper (safety_gymnasium/wrappers/gymnasium_conversion.py) puts it. Reset's info has none.

Registered with gymnasium under the "trpo_ext" namespace when trpo_ext is imported:

    SafetyHopperVelocity-v1       Hopper-v5       cost when the x-velocity > 0.7402
    SafetyHalfCheetahVelocity-v1  HalfCheetah-v5  x-velocity > 3.2096
    SafetySwimmerVelocity-v1      Swimmer-v5      x-velocity > 0.2282
    SafetyWalker2dVelocity-v1     Walker2d-v5     x-velocity > 2.3415
    SafetyAntVelocity-v1          Ant-v5          planar speed of the torso > 2.6222
    SafetyHumanoidVelocity-v1     Humanoid-v5     planar speed of the centre of mass > 1.4149
    HazardNav-v0                  a point in the plane, a hazard on the straight path (HazardNav; numpy only)

The velocity tasks are Safety-Gymnasium's Safety*Velocity-v1 (github.com/PKU-Alignment/safety-gymnasium,
safety_gymnasium/tasks/safe_velocity/; it does not import on gymnasium 1.x), rebuilt as a wrapper
(VelocityCost) around gymnasium's own v5 envs. The velocity is the one the v5 env reports in its info,
which is computed as Safety-Gymnasium's: (position after - position before) / dt of qpos[0] (Hopper,
HalfCheetah, Walker2d), of qpos[0:2] (Swimmer), of the torso's xy (Ant), of the mass centre's xy
(Humanoid). The x rule is signed, as theirs: running backward costs nothing. Reward, observation,
termination and the 1000-step limit are the v5 env's; kwargs go to gym.make of the v5 env
(`make_velocity_task(task, max_episode_steps=N)` for another limit). What differs from Safety-Gymnasium:
- Its envs subclass gymnasium's MuJoCo v4 envs, on whose dynamics the thresholds were set. v5 pays the
  healthy reward only while healthy (Hopper, Walker2d, Ant, Humanoid) and gives Walker2d's feet the same
  friction (1.9; v4: 0.9 on one foot).
- Ant: v5's default observation (105) holds the contact forces and its reward a contact cost; v4's default
  (27), which Safety-Gymnasium uses, has neither: `include_cfrc_ext_in_observation=False,
  contact_cost_weight=0.0` give v4's observation and drop the contact cost.
- Humanoid: v5's observation (348) drops v4's always-zero world-body entries (376) and its reward has a
  contact cost again (`contact_cost_weight=0.0` removes it, as in v4).
- Their step returns the cost as a sixth value; here it is in info only, as their conversion wrapper does.
- Their v0 tasks (other thresholds; Swimmer-v0 costs the planar speed) are not rebuilt.
gymnasium 1.x still ships the v4 envs (deprecated), whose infos carry the same velocities: for v4's
dynamics, `VelocityCost(gym.make("Hopper-v4"), 0.7402, "x")` and so on.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import gymnasium as gym
import numpy as np
from gymnasium import spaces

VELOCITY_KINDS = ("x", "xy")
"""Which velocity a task limits: "x" = info["x_velocity"] (signed); "xy" = the planar speed √(vx² + vy²)."""


class VelocityTask(NamedTuple):
    base_id: str
    threshold: float
    velocity_kind: str


# Thresholds: the `_velocity_threshold` that each Safety-Gymnasium v1 file sets, read at commit
# ae966e511b9927f06b39c727ca5c650136a4e696 of PKU-Alignment/safety-gymnasium; the velocity kind is
# what the v0 file each v1 inherits from (or overrides, Swimmer) compares against it.
VELOCITY_TASKS = {
    # safety_gymnasium/tasks/safe_velocity/safety_hopper_velocity_v1.py @ ae966e5
    "SafetyHopperVelocity-v1": VelocityTask("Hopper-v5", 0.7402, "x"),
    # safety_gymnasium/tasks/safe_velocity/safety_half_cheetah_velocity_v1.py @ ae966e5
    "SafetyHalfCheetahVelocity-v1": VelocityTask("HalfCheetah-v5", 3.2096, "x"),
    # safety_gymnasium/tasks/safe_velocity/safety_swimmer_velocity_v1.py @ ae966e5 (its own step: x only)
    "SafetySwimmerVelocity-v1": VelocityTask("Swimmer-v5", 0.2282, "x"),
    # safety_gymnasium/tasks/safe_velocity/safety_walker2d_velocity_v1.py @ ae966e5
    "SafetyWalker2dVelocity-v1": VelocityTask("Walker2d-v5", 2.3415, "x"),
    # safety_gymnasium/tasks/safe_velocity/safety_ant_velocity_v1.py @ ae966e5 (v0's step: planar speed)
    "SafetyAntVelocity-v1": VelocityTask("Ant-v5", 2.6222, "xy"),
    # safety_gymnasium/tasks/safe_velocity/safety_humanoid_velocity_v1.py @ ae966e5 (v0's step: planar speed)
    "SafetyHumanoidVelocity-v1": VelocityTask("Humanoid-v5", 1.4149, "xy"),
}


class VelocityCost(gym.Wrapper):
    """Adds info["cost"] = 1.0 to a step whose velocity (`velocity_kind`, read from the step's info)
    exceeds `threshold`, else 0.0. Everything else passes through unchanged."""

    def __init__(self, env: gym.Env, threshold: float, velocity_kind: str = "x"):
        super().__init__(env)
        if velocity_kind not in VELOCITY_KINDS:
            raise ValueError(f"velocity_kind must be one of {VELOCITY_KINDS}; got {velocity_kind!r}")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number; got {threshold!r}")
        self.threshold, self.velocity_kind = float(threshold), velocity_kind

    def step(self, action):
        observation, reward, terminated, truncated, info = self.env.step(action)
        info = dict(info)  # the inner env's dict is left as it gave it
        info["cost"] = float(self.velocity(info) > self.threshold)
        return observation, reward, terminated, truncated, info

    def velocity(self, info: dict) -> float:
        """The velocity the cost limits, from a step's info."""
        keys = ("x_velocity",) if self.velocity_kind == "x" else ("x_velocity", "y_velocity")
        missing = [key for key in keys if key not in info]
        if missing:
            raise KeyError(f"VelocityCost(velocity_kind={self.velocity_kind!r}) needs info{missing} from "
                           f"{self.env}'s step; its info has {sorted(info)}")
        if self.velocity_kind == "x":
            return float(info["x_velocity"])
        return math.hypot(float(info["x_velocity"]), float(info["y_velocity"]))


def make_velocity_task(task: str, **kwargs) -> VelocityCost:
    """gym.make(the task's v5 env, **kwargs) (its time limit included) wrapped in its VelocityCost."""
    if task not in VELOCITY_TASKS:
        raise ValueError(f"task must be one of {sorted(VELOCITY_TASKS)}; got {task!r}")
    base_id, threshold, velocity_kind = VELOCITY_TASKS[task]
    return VelocityCost(gym.make(base_id, **kwargs), threshold, velocity_kind)


class HazardNav(gym.Env):
    """A point in the plane goes from a start to a goal around (or through) a circular hazard centred on
    the straight line between them.

    Layout, redrawn at every reset from the env's np_random: start (-1, 0) and goal (1, 0), each moved by
    up to ±`jitter` (0.1) per coordinate; the hazard's centre is their midpoint, its radius 0.5. The point
    stays in the square [-2, 2]².
    Action: Box(-1, 1, (2,)), the step's velocity; the point moves by `step_size` (0.1) × the action
    clipped to the box, then to length 1 (so no direction is faster).
    Observation (float32, 6): position, goal - position, hazard centre - position.
    Reward: the step's progress toward the goal (distance before - after) - `step_penalty` (0.05), plus
    `goal_bonus` (1.0) on the step that ends within `goal_radius` (0.1) of the goal, which terminates
    the episode; `horizon` (100) steps truncate it. Progress alone sums to the same total on every path,
    so the step penalty is what makes a longer path pay less.
    Cost: info["cost"] = 1.0 for each step that ends strictly inside the hazard, else 0.0.

    With the defaults (measured on seeds 0-199; tests/test_safety_envs.py checks seeds 0-19):
    - the straight path takes 18-21 steps and costs exactly 10 (the hazard's diameter, 1.0, at 0.1 a
      step), twice a cost limit of 5; return in [1.90, 2.05], mean 1.97;
    - a detour through two waypoints 0.6 off the line, 0.35 either side of the centre (a path of ≈ 2.47
      against ≈ 2), takes 23-25 steps and costs 0; return in [1.64, 1.84], mean 1.75 (0.22 less);
    - with a cost limit between (5, say) the best policy cuts across the hazard's edge instead.
    """

    metadata: dict = {"render_modes": []}
    ARENA = 2.0
    """The point's coordinates stay within ±ARENA."""

    def __init__(self, horizon: int = 100, step_size: float = 0.1, hazard_radius: float = 0.5,
                 goal_radius: float = 0.1, step_penalty: float = 0.05, goal_bonus: float = 1.0, jitter: float = 0.1):
        for name, value in (("step_size", step_size), ("hazard_radius", hazard_radius), ("goal_radius", goal_radius)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0; got {value!r}")
        for name, value in (("step_penalty", step_penalty), ("goal_bonus", goal_bonus), ("jitter", jitter)):
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0; got {value!r}")
        if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
            raise ValueError(f"horizon must be an int >= 1; got {horizon!r}")
        nearest_start = 1.0 - math.sqrt(2.0) * jitter  # the start's least distance from the hazard's centre
        if hazard_radius >= nearest_start:
            raise ValueError(f"hazard_radius must be < 1 - √2 × jitter = {nearest_start:.3g} so that no start is "
                             f"inside the hazard; got hazard_radius={hazard_radius!r}, jitter={jitter!r}")
        self.horizon, self.step_size, self.hazard_radius = int(horizon), float(step_size), float(hazard_radius)
        self.goal_radius, self.step_penalty, self.goal_bonus = float(goal_radius), float(step_penalty), float(goal_bonus)
        self.jitter = float(jitter)
        reach = self.ARENA + 1.0 + self.jitter  # the largest |coordinate| of goal - position or centre - position
        high = np.array([self.ARENA] * 2 + [reach] * 4, dtype=np.float32)
        self.observation_space = spaces.Box(-high, high, dtype=np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.start = self.goal = self.hazard_centre = self.position = np.zeros(2)
        self.distance, self.t = 0.0, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.start = np.array([-1.0, 0.0]) + self.np_random.uniform(-self.jitter, self.jitter, 2)
        self.goal = np.array([1.0, 0.0]) + self.np_random.uniform(-self.jitter, self.jitter, 2)
        self.hazard_centre = (self.start + self.goal) / 2.0
        self.position = self.start.copy()
        self.distance = float(np.linalg.norm(self.goal - self.position))
        self.t = 0
        return self._observe(), {}

    def step(self, action):
        velocity = np.asarray(action, dtype=np.float64)
        if velocity.shape != (2,) or not np.isfinite(velocity).all():
            raise ValueError(f"action must be 2 finite numbers; got {action!r}")
        velocity = np.clip(velocity, -1.0, 1.0)
        speed = float(np.linalg.norm(velocity))
        if speed > 1.0:
            velocity = velocity / speed
        self.position = np.clip(self.position + self.step_size * velocity, -self.ARENA, self.ARENA)
        distance = float(np.linalg.norm(self.goal - self.position))
        reward = self.distance - distance - self.step_penalty
        self.distance = distance
        self.t += 1
        reached = distance < self.goal_radius
        if reached:
            reward += self.goal_bonus
        cost = float(np.linalg.norm(self.position - self.hazard_centre) < self.hazard_radius)
        return self._observe(), float(reward), bool(reached), bool(not reached and self.t >= self.horizon), {"cost": cost}

    def _observe(self) -> np.ndarray:
        return np.concatenate([self.position, self.goal - self.position,
                               self.hazard_centre - self.position]).astype(np.float32)


def register() -> None:
    """Registers VELOCITY_TASKS and HazardNav-v0 under the "trpo_ext/" namespace (once)."""
    for task in VELOCITY_TASKS:
        env_id = f"trpo_ext/{task}"
        if env_id not in gym.registry:  # no time limit of its own: the v5 env's applies
            gym.register(env_id, entry_point=f"{__name__}:make_velocity_task", kwargs={"task": task})
    if "trpo_ext/HazardNav-v0" not in gym.registry:  # HazardNav truncates at its own horizon
        gym.register("trpo_ext/HazardNav-v0", entry_point=f"{__name__}:HazardNav")
