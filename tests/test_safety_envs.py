"""trpo_ext.safety_envs: the Safety-Gymnasium velocity tasks on gymnasium's v5 MuJoCo envs (their cost
rule against Safety-Gymnasium's own computation, thresholds, forced crossings) and HazardNav's documented
numbers (straight path, detour, determinism)."""
import math

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import trpo_ext  # noqa: F401  (registers the "trpo_ext/..." ids)
from trpo_ext.safety_envs import VELOCITY_TASKS, HazardNav, VelocityCost, make_velocity_task

try:
    import mujoco  # noqa: F401
    HAVE_MUJOCO = True
except ImportError:
    HAVE_MUJOCO = False
needs_mujoco = pytest.mark.skipif(not HAVE_MUJOCO, reason="mujoco is not installed (pip install 'gymnasium[mujoco]')")

# Safety-Gymnasium's v1 tasks, written out here apart from the table: base env, `_velocity_threshold` of
# safety_gymnasium/tasks/safe_velocity/safety_*_velocity_v1.py, and what its step compares with it.
SAFETY_GYMNASIUM = {
    "SafetyHopperVelocity-v1": ("Hopper-v5", 0.7402, "x"),
    "SafetyHalfCheetahVelocity-v1": ("HalfCheetah-v5", 3.2096, "x"),
    "SafetySwimmerVelocity-v1": ("Swimmer-v5", 0.2282, "x"),
    "SafetyWalker2dVelocity-v1": ("Walker2d-v5", 2.3415, "x"),
    "SafetyAntVelocity-v1": ("Ant-v5", 2.6222, "xy"),
    "SafetyHumanoidVelocity-v1": ("Humanoid-v5", 1.4149, "xy"),
}
HAS_Y_SLIDE = {"SafetySwimmerVelocity-v1", "SafetyAntVelocity-v1", "SafetyHumanoidVelocity-v1"}  # qvel[1] = y
TASKS = list(SAFETY_GYMNASIUM)


def test_the_table_holds_safety_gymnasiums_thresholds_and_every_id_is_registered():
    assert {task: tuple(spec) for task, spec in VELOCITY_TASKS.items()} == SAFETY_GYMNASIUM
    for env_id in [f"trpo_ext/{task}" for task in TASKS] + ["trpo_ext/HazardNav-v0"]:
        assert env_id in gym.registry, env_id


class _ReportsVelocity(gym.Env):
    """Reports the velocity it is told to, to test the rule without MuJoCo."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(1, np.float32), {}

    def step(self, action):
        return np.zeros(1, np.float32), 0.0, False, False, {"x_velocity": float(action[0]), "y_velocity": float(action[1])}


@pytest.mark.parametrize("kind, velocity, cost", [
    ("x", (0.6, 0.0), 1.0), ("x", (0.5, 0.0), 0.0), ("x", (0.4, 0.9), 0.0), ("x", (-0.9, 0.0), 0.0),
    ("xy", (0.3, 0.4), 0.0), ("xy", (0.3, 0.41), 1.0), ("xy", (-0.6, 0.0), 1.0), ("xy", (0.0, -0.6), 1.0)])
def test_the_cost_rule_is_strict_signed_for_x_and_the_planar_speed_for_xy(kind, velocity, cost):
    env = VelocityCost(_ReportsVelocity(), 0.5, kind)
    env.reset(seed=0)
    info = env.step(np.array(velocity))[-1]
    assert type(info["cost"]) is float and info["cost"] == cost


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="task must be one of"):
        make_velocity_task("SafetyCarVelocity-v1")
    with pytest.raises(ValueError, match="velocity_kind"):
        VelocityCost(_ReportsVelocity(), 0.5, "z")
    with pytest.raises(ValueError, match="threshold"):
        VelocityCost(_ReportsVelocity(), float("nan"))
    env = VelocityCost(gym.make("Pendulum-v1"), 1.0)  # its info has no velocity
    env.reset(seed=0)
    with pytest.raises(KeyError, match="x_velocity"):
        env.step(env.action_space.sample())
    for name, value in [("horizon", 0), ("step_size", 0.0), ("hazard_radius", -1.0), ("step_penalty", -0.1),
                        ("jitter", float("inf"))]:
        with pytest.raises(ValueError, match=name):
            HazardNav(**{name: value})
    with pytest.raises(ValueError, match="hazard_radius"):
        HazardNav(hazard_radius=0.9, jitter=0.1)  # some starts would be inside it
    env = HazardNav()
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(np.zeros(3))


@needs_mujoco
@pytest.mark.filterwarnings("ignore:.*is different from the unwrapped version")  # the cost lives in the wrapper
@pytest.mark.filterwarnings("ignore:.*Box observation space m")  # the v5 envs' own unbounded observations
@pytest.mark.parametrize("task", TASKS)
def test_velocity_task_passes_the_env_checker_and_wraps_the_v5_env(task):
    env = gym.make(f"trpo_ext/{task}")
    base_id, threshold, kind = SAFETY_GYMNASIUM[task]
    assert env.get_wrapper_attr("threshold") == threshold and env.get_wrapper_attr("velocity_kind") == kind
    base = gym.make(base_id)
    assert type(env.unwrapped) is type(base.unwrapped) and env.observation_space == base.observation_space
    check_env(env, skip_render_check=True)
    env.close(), base.close()


@needs_mujoco
def test_kwargs_reach_the_v5_env():
    env = gym.make("trpo_ext/SafetyAntVelocity-v1", include_cfrc_ext_in_observation=False)
    assert env.observation_space.shape == (27,)  # v4's default Ant observation, Safety-Gymnasium's
    assert gym.make("trpo_ext/SafetyAntVelocity-v1").observation_space.shape == (105,)
    assert make_velocity_task("SafetyHopperVelocity-v1", max_episode_steps=7).spec.max_episode_steps == 7


def _safety_gymnasium_position(task: str, env: gym.Env) -> np.ndarray:
    """The position whose displacement / dt Safety-Gymnasium's step calls the velocity."""
    data = env.unwrapped.data
    if task == "SafetyAntVelocity-v1":
        return data.body("torso").xpos[:2].copy()  # their get_body_com("torso")[:2]
    if task == "SafetyHumanoidVelocity-v1":
        from gymnasium.envs.mujoco.humanoid_v5 import mass_center
        return mass_center(env.unwrapped.model, data)
    return data.qpos[0:2].copy()  # the x tasks use [0]


@needs_mujoco
@pytest.mark.parametrize("task", TASKS)
def test_random_steps_cost_what_safety_gymnasiums_rule_says(task):
    _, threshold, kind = SAFETY_GYMNASIUM[task]
    env = gym.make(f"trpo_ext/{task}")
    env.action_space.seed(0)
    env.reset(seed=0)
    for _ in range(300):
        before = _safety_gymnasium_position(task, env)
        _, _, terminated, truncated, info = env.step(env.action_space.sample())
        displacement = (_safety_gymnasium_position(task, env) - before) / env.unwrapped.dt
        velocity = displacement[0] if kind == "x" else math.hypot(*displacement)
        reported = info["x_velocity"] if kind == "x" else math.hypot(info["x_velocity"], info["y_velocity"])
        assert velocity == pytest.approx(reported, abs=1e-9)
        assert type(info["cost"]) is float and info["cost"] == float(velocity > threshold)
        if terminated or truncated:
            env.reset()
    env.close()


@needs_mujoco
@pytest.mark.parametrize("task", TASKS)
def test_a_forced_fast_motion_crosses_the_threshold_as_the_rule_says(task):
    """Random actions cross only some thresholds (Hopper's, Swimmer's and Ant's in the 300 steps above;
    the rest sit near a trained policy's speed), so the root's velocity is set directly: 2 × threshold
    forward, backward, and sideways where the body has a y slide."""
    _, threshold, kind = SAFETY_GYMNASIUM[task]
    env = gym.make(f"trpo_ext/{task}")
    pushes = {"forward": (2 * threshold, 0.0), "backward": (-2 * threshold, 0.0)}
    if task in HAS_Y_SLIDE:
        pushes["sideways"] = (0.0, 2 * threshold)
    for direction, (vx, vy) in pushes.items():
        env.reset(seed=0)
        unwrapped = env.unwrapped
        qvel = unwrapped.data.qvel.copy()
        qvel[0] += vx
        if vy:
            qvel[1] += vy
        unwrapped.set_state(unwrapped.data.qpos.copy(), qvel)
        info = env.step(np.zeros(env.action_space.shape, env.action_space.dtype))[-1]
        speed = math.hypot(info["x_velocity"], info["y_velocity"]) if kind == "xy" else info["x_velocity"]
        expected = 1.0 if direction == "forward" or kind == "xy" else 0.0
        assert info["cost"] == expected, (direction, info["x_velocity"], info.get("y_velocity"))
        if expected:
            assert speed > threshold
    env.close()


def _drive(env: HazardNav, seed: int, detour: bool):
    """One episode at full speed toward the goal, or through two waypoints 0.6 off the straight line 0.35
    either side of the hazard's centre. Returns (return, cost, steps, reached the goal)."""
    env.reset(seed=seed)
    along = (env.goal - env.start) / np.linalg.norm(env.goal - env.start)
    normal = np.array([-along[1], along[0]])
    waypoints = [env.hazard_centre + side * 0.35 * along + 0.6 * normal for side in (-1, 1)] if detour else []
    waypoints.append(env.goal)
    episode_return = episode_cost = 0.0
    for steps in range(1, env.horizon + 1):
        while len(waypoints) > 1 and np.linalg.norm(waypoints[0] - env.position) < env.step_size:
            waypoints.pop(0)
        heading = waypoints[0] - env.position
        _, reward, terminated, truncated, info = env.step(heading / np.linalg.norm(heading))
        episode_return += reward
        episode_cost += info["cost"]
        if terminated or truncated:
            return episode_return, episode_cost, steps, terminated
    raise AssertionError("the horizon did not end the episode")


def test_hazard_nav_straight_path_costs_10_and_the_detour_0_for_a_little_less_return():
    env = HazardNav()
    for seed in range(20):
        straight_return, straight_cost, straight_steps, reached = _drive(env, seed, detour=False)
        assert reached and straight_cost == 10.0 and 18 <= straight_steps <= 21
        assert 1.90 - 1e-9 <= straight_return <= 2.05 + 1e-9
        detour_return, detour_cost, detour_steps, reached = _drive(env, seed, detour=True)
        assert reached and detour_cost == 0.0 and 23 <= detour_steps <= 25
        assert 1.64 - 1e-9 <= detour_return <= 1.84 + 1e-9 and detour_return < straight_return - 0.1


def test_hazard_nav_passes_the_env_checker_and_seeded_resets_repeat():
    check_env(HazardNav(), skip_render_check=True)
    check_env(gym.make("trpo_ext/HazardNav-v0").unwrapped, skip_render_check=True)
    actions = np.random.default_rng(0).uniform(-1.0, 1.0, (30, 2)).astype(np.float32)

    def trajectory(seed):
        env = HazardNav()
        rows = [env.reset(seed=seed)[0]]
        for action in actions:
            observation, reward, _, _, info = env.step(action)
            rows.append(np.hstack([observation, reward, info["cost"]]))
        return np.concatenate(rows)

    first, again, other = trajectory(3), trajectory(3), trajectory(4)
    assert np.array_equal(first, again)
    assert not np.array_equal(first[:6], other[:6])  # the layout moves with the seed


def test_hazard_nav_actions_are_bounded_and_the_horizon_truncates():
    env = HazardNav()
    env.reset(seed=0)
    before = env.position.copy()
    env.step(np.array([5.0, 5.0]))  # clipped to the box, then to length 1
    assert np.linalg.norm(env.position - before) == pytest.approx(env.step_size)
    env.reset(seed=0)
    total = 0.0
    for t in range(1, env.horizon + 1):
        observation, reward, terminated, truncated, _ = env.step(np.array([-1.0, 0.0]))  # into the wall, away from the goal
        total += reward
        assert env.observation_space.contains(observation) and not terminated and truncated == (t == env.horizon)
    assert env.position[0] == -env.ARENA and total < -env.horizon * env.step_penalty
