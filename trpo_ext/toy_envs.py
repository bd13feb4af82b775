"""Small environments, one per kind of space the agent supports, for the tests, the examples and the
learning benchmarks (bench/space_learning.py). Each is a matching task: the observation says which
action pays, an episode lasts `horizon` steps (then truncates), a step pays the fraction of the
action that matches, so a random policy's return and the best one (= horizon) are known.

Registered with gymnasium under the "trpo_ext" namespace when trpo_ext is imported:

    MultiDiscreteMatch-v0  Box obs (one-hots of a target), MultiDiscrete([3, 4, 5]) actions
    MultiBinaryMatch-v0    Box obs (the target bits), MultiBinary(6) actions
    MaskedChoice-v0        Box obs, Discrete(6) actions of which a random subset is valid each step,
                           from an `action_masks()` method; an invalid action raises
    MaskedChoiceInfo-v0    the same, the masks in info["action_mask"]
    DictMatch-v0           Dict obs {"target": Discrete(4), "noise": Box(3)}, Discrete(4) actions
    DiscreteObsMatch-v0    Discrete(5) obs, Discrete(5) actions
    ImageSide-v0           uint8 image obs (40, 40, 3) HWC with a bright square on one side, Discrete(2)
    GrayImageSide-v0       the same in grayscale, (40, 40, 1) HWC (Atari's frames with a channel axis)
    StackedImageSide-v0    the last 4 grayscale frames, (4, 40, 40), as gymnasium's FrameStackObservation
                           stacks (H, W) frames; only the newest one's square pays
    DictImageSide-v0       Dict obs {"image": (1, 40, 40) uint8 CHW, "hint": Box(1)}, Discrete(2)

Memory tasks, for the recurrent policies (bench/recurrent_learning.py): what pays depends on something
the current observation no longer shows, so a policy without memory is capped well below the best.

    CueRecall-v0           a cue (one of k = 4 classes) shown at the first step only, `delay` = 8 blank
                           steps, then a recall step at which Discrete(k) action = cue pays 1; best 1,
                           best memoryless 1 / k = 0.25
    CueRecallContinuous-v0 the same with a cue of ±1 and a Box(1) action in [-1, 1] paying -|action - cue|
                           at the recall step; best 0, best memoryless -1 (`uniform_cue=True`: a cue
                           uniform in [-1, 1], best memoryless -0.5)
    CartPoleNoVel-v1       CartPole-v1 / Pendulum-v1 with the velocities zeroed in the observation, as
    PendulumNoVel-v1       rl-baselines3-zoo's CartPoleNoVel-v1 / PendulumNoVel-v1 (its MaskVelocityWrapper)
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium import spaces


class _Match(gym.Env):
    """A target drawn every step; `_observe()` shows it, `_score(action)` says how much of it matched."""

    metadata: dict = {"render_modes": []}

    def __init__(self, horizon: int = 16):
        self.horizon = int(horizon)
        self.t = 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        self._draw()
        return self._observe(), self._info()

    def step(self, action):
        reward = float(self._score(action))
        self.t += 1
        self._draw()
        return self._observe(), reward, False, self.t >= self.horizon, self._info()

    def _info(self) -> dict:
        return {}


class MultiDiscreteMatch(_Match):
    nvec = (3, 4, 5)

    def __init__(self, horizon: int = 16):
        super().__init__(horizon)
        self.observation_space = spaces.Box(0.0, 1.0, (sum(self.nvec),), np.float32)
        self.action_space = spaces.MultiDiscrete(self.nvec)

    def _draw(self):
        self.target = np.array([self.np_random.integers(n) for n in self.nvec])

    def _observe(self):
        return np.concatenate([np.eye(n, dtype=np.float32)[k] for n, k in zip(self.nvec, self.target)])

    def _score(self, action):
        return np.mean(np.asarray(action) == self.target)


class MultiBinaryMatch(_Match):
    n = 6

    def __init__(self, horizon: int = 16):
        super().__init__(horizon)
        self.observation_space = spaces.Box(0.0, 1.0, (self.n,), np.float32)
        self.action_space = spaces.MultiBinary(self.n)

    def _draw(self):
        self.target = self.np_random.integers(0, 2, self.n)

    def _observe(self):
        return self.target.astype(np.float32)

    def _score(self, action):
        return np.mean(np.asarray(action) == self.target)


class _Masked(_Match):
    """Each step a random subset (at least 2) of the 6 actions is valid and one of them pays; the
    observation shows the valid set and the paying action. Taking an invalid action raises, or with
    `invalid_reward` set (for agents that cannot mask) pays that."""

    n = 6

    def __init__(self, horizon: int = 16, mask_in_info: bool = False, invalid_reward: float | None = None):
        super().__init__(horizon)
        self.mask_in_info, self.invalid_reward = mask_in_info, invalid_reward
        self.observation_space = spaces.Box(0.0, 1.0, (2 * self.n,), np.float32)
        self.action_space = spaces.Discrete(self.n)

    def _draw(self):
        valid = np.zeros(self.n, dtype=bool)
        valid[self.np_random.choice(self.n, self.np_random.integers(2, self.n + 1), replace=False)] = True
        self.valid = valid
        self.target = int(self.np_random.choice(np.flatnonzero(valid)))

    def _observe(self):
        return np.concatenate([self.valid.astype(np.float32), np.eye(self.n, dtype=np.float32)[self.target]])

    def _score(self, action):
        if not self.valid[int(action)]:
            if self.invalid_reward is not None:
                return self.invalid_reward
            raise RuntimeError(f"MaskedChoice: action {int(action)} is masked (valid: {np.flatnonzero(self.valid)})")
        return float(int(action) == self.target)

    def _info(self) -> dict:
        return {"action_mask": self.valid.copy()} if self.mask_in_info else {}


class MaskedChoice(_Masked):
    """The masks from an `action_masks()` method, as sb3-contrib's MaskablePPO reads them."""

    def action_masks(self) -> np.ndarray:
        return self.valid.copy()


class MaskedChoiceInfo(_Masked):
    """The masks only in info["action_mask"] (of reset and of every step)."""

    def __init__(self, horizon: int = 16, invalid_reward: float | None = None):
        super().__init__(horizon, mask_in_info=True, invalid_reward=invalid_reward)


class DictMatch(_Match):
    n = 4

    def __init__(self, horizon: int = 16):
        super().__init__(horizon)
        self.observation_space = spaces.Dict({"target": spaces.Discrete(self.n),
                                              "noise": spaces.Box(-1.0, 1.0, (3,), np.float32)})
        self.action_space = spaces.Discrete(self.n)

    def _draw(self):
        self.target = int(self.np_random.integers(self.n))

    def _observe(self):
        return {"target": self.target, "noise": self.np_random.uniform(-1, 1, 3).astype(np.float32)}

    def _score(self, action):
        return float(int(action) == self.target)


class DiscreteObsMatch(_Match):
    n = 5

    def __init__(self, horizon: int = 16):
        super().__init__(horizon)
        self.observation_space = spaces.Discrete(self.n)
        self.action_space = spaces.Discrete(self.n)

    def _draw(self):
        self.target = int(self.np_random.integers(self.n))

    def _observe(self):
        return self.target

    def _score(self, action):
        return float(int(action) == self.target)


def _side_image(rng, side: int, size: int, channels: int, channels_first: bool) -> np.ndarray:
    """A dim noisy image with a bright 8 x 8 square in the left (0) or right (1) half."""
    image = rng.integers(0, 40, (size, size, channels), dtype=np.uint8)
    row = int(rng.integers(0, size - 8))
    col = int(rng.integers(0, size // 2 - 8)) + side * (size // 2)
    image[row:row + 8, col:col + 8] = 255
    return np.ascontiguousarray(image.transpose(2, 0, 1)) if channels_first else image


class ImageSide(_Match):
    size = 40

    def __init__(self, horizon: int = 16, channels: int = 3, channels_first: bool = False):
        super().__init__(horizon)
        self.channels, self.channels_first = channels, channels_first
        shape = (channels, self.size, self.size) if channels_first else (self.size, self.size, channels)
        self.observation_space = spaces.Box(0, 255, shape, np.uint8)
        self.action_space = spaces.Discrete(2)

    def _draw(self):
        self.target = int(self.np_random.integers(2))

    def _observe(self):
        return _side_image(self.np_random, self.target, self.size, self.channels, self.channels_first)

    def _score(self, action):
        return float(int(action) == self.target)


class GrayImageSide(ImageSide):
    """One channel, last: (40, 40, 1) HWC."""

    def __init__(self, horizon: int = 16):
        super().__init__(horizon, channels=1, channels_first=False)


class StackedImageSide(ImageSide):
    """A frame stack: the last `frames` grayscale frames, oldest first, (frames, 40, 40), as gymnasium's
    FrameStackObservation stacks them (the first frame of an episode repeated to fill the stack). Each
    step draws a new target; the older frames show earlier targets, which no longer pay."""

    frames = 4

    def __init__(self, horizon: int = 16):
        super().__init__(horizon, channels=1, channels_first=True)
        self.observation_space = spaces.Box(0, 255, (self.frames, self.size, self.size), np.uint8)
        self.stack: list[np.ndarray] = []

    def reset(self, *, seed=None, options=None):
        self.stack = []
        return super().reset(seed=seed, options=options)

    def _observe(self):
        frame = super()._observe()[0]
        self.stack = (self.stack or [frame] * self.frames)[1:] + [frame]
        return np.stack(self.stack)


class DictImageSide(ImageSide):
    """The square's side from the image; "hint" is noise the policy must learn to ignore."""

    def __init__(self, horizon: int = 16):
        super().__init__(horizon, channels=1, channels_first=True)
        self.observation_space = spaces.Dict({"image": self.observation_space,
                                              "hint": spaces.Box(-1.0, 1.0, (1,), np.float32)})

    def _observe(self):
        return {"image": super()._observe(), "hint": self.np_random.uniform(-1, 1, 1).astype(np.float32)}


class CueRecall(gym.Env):
    """A cue, one of `k` classes, is shown (one-hot) at the first step of an episode and never again;
    `delay` steps of a blank observation follow, then one recall step whose observation has only the
    recall flag set. The action at the recall step pays 1 if it is the cue's class, else 0, and ends the
    episode (`delay` + 2 steps in all); every other step pays 0, whatever the action. Observation:
    [cue one-hot (k), recall flag].

    Why a memoryless policy cannot solve it: the recall step's observation is the same for every cue,
    so a policy that sees only the current observation acts on it the same way whatever the cue was,
    and is right with probability 1 / k at best (`MEMORYLESS_BEST`); remembering the cue for `delay` + 1
    steps pays 1 every episode. `delay` sets how far back (the default 8: several steps; a policy that
    can count could also tell the recall step without the flag, but the flag makes the task memory only).
    """

    metadata: dict = {"render_modes": []}

    def __init__(self, k: int = 4, delay: int = 8):
        if k < 2 or delay < 0:
            raise ValueError(f"CueRecall: need k >= 2 and delay >= 0 (got k={k}, delay={delay})")
        self.k, self.delay = int(k), int(delay)
        self.observation_space = spaces.Box(0.0, 1.0, (self.k + 1,), np.float32)
        self.action_space = self._action_space()
        self.t, self.cue = 0, None

    def _action_space(self):
        return spaces.Discrete(self.k)

    def _draw(self):
        return int(self.np_random.integers(self.k))

    def _observe(self) -> np.ndarray:
        obs = np.zeros(self.observation_space.shape, np.float32)
        if self.t == 0:
            obs[self.cue] = 1.0
        if self.t == self.delay + 1:
            obs[-1] = 1.0
        return obs

    def _score(self, action) -> float:
        return float(int(action) == self.cue)

    @property
    def best_memoryless(self) -> float:
        """The best expected return of a policy that acts on the current observation only."""
        return 1.0 / self.k

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.cue = 0, self._draw()
        return self._observe(), {}

    def step(self, action):
        recall = self.t == self.delay + 1
        reward = self._score(action) if recall else 0.0
        self.t += 1
        return self._observe(), reward, recall, False, {}


class CueRecallContinuous(CueRecall):
    """CueRecall with continuous actions: the cue is a value c (±1, or uniform in [-1, 1] with
    `uniform_cue`), shown at the first step only as [c, 1 (the "cue shown" flag), 0]; the recall
    step's observation is [0, 0, 1]. The Box(1) action a in [-1, 1] (clipped to it) pays -|a - c| at the
    recall step, 0 elsewhere; best return 0.

    Memoryless bound: at the recall step a memoryless policy's action a does not depend on c, so its
    expected return is at most max_a -E|a - c|: with c = ±1, -(|a - 1| + |a + 1|) / 2 = -1 for every a in
    [-1, 1]; with c uniform in [-1, 1], -E|c| = -0.5 at a = 0 (the median). A stochastic policy does no
    better (the expectation of a convex loss over a's distribution)."""

    def __init__(self, delay: int = 8, uniform_cue: bool = False):
        self.uniform_cue = bool(uniform_cue)
        super().__init__(k=2, delay=delay)
        self.observation_space = spaces.Box(-1.0, 1.0, (3,), np.float32)

    def _action_space(self):
        return spaces.Box(-1.0, 1.0, (1,), np.float32)

    def _draw(self):
        if self.uniform_cue:
            return float(self.np_random.uniform(-1.0, 1.0))
        return float(2 * int(self.np_random.integers(2)) - 1)

    def _observe(self) -> np.ndarray:
        obs = np.zeros(3, np.float32)
        if self.t == 0:
            obs[:2] = self.cue, 1.0
        if self.t == self.delay + 1:
            obs[2] = 1.0
        return obs

    def _score(self, action) -> float:
        return -abs(float(np.clip(np.asarray(action, dtype=np.float64).reshape(-1)[0], -1.0, 1.0)) - self.cue)

    @property
    def best_memoryless(self) -> float:
        return -0.5 if self.uniform_cue else -1.0


class MaskVelocity(gym.ObservationWrapper):
    """The velocities of a classic-control env's observation set to 0 (the observation keeps its shape),
    which makes the task partially observed: the policy must infer them from past observations. As
    rl-baselines3-zoo's MaskVelocityWrapper (rl_zoo3/wrappers.py, registered as <Name>NoVel-v<k> in
    rl_zoo3/import_envs.py; github.com/DLR-RM/rl-baselines3-zoo), with its indices for these envs."""

    velocity_indices = {"CartPole-v1": [1, 3], "Pendulum-v1": [2]}

    def __init__(self, env: gym.Env, env_id: str):
        super().__init__(env)
        self.mask = np.ones(env.observation_space.shape, env.observation_space.dtype)
        self.mask[self.velocity_indices[env_id]] = 0

    def observation(self, observation):
        return observation * self.mask


def make_no_vel(env_id: str, **kwargs) -> gym.Env:
    """gym.make(env_id, **kwargs) (its time limit included) with the velocities masked."""
    return MaskVelocity(gym.make(env_id, **kwargs), env_id)


ENVS = {"MultiDiscreteMatch-v0": MultiDiscreteMatch, "MultiBinaryMatch-v0": MultiBinaryMatch,
        "MaskedChoice-v0": MaskedChoice, "MaskedChoiceInfo-v0": MaskedChoiceInfo, "DictMatch-v0": DictMatch, "DiscreteObsMatch-v0": DiscreteObsMatch,
        "ImageSide-v0": ImageSide, "GrayImageSide-v0": GrayImageSide, "StackedImageSide-v0": StackedImageSide,
        "DictImageSide-v0": DictImageSide, "CueRecall-v0": CueRecall, "CueRecallContinuous-v0": CueRecallContinuous}
NO_VEL = {"CartPoleNoVel-v1": "CartPole-v1", "PendulumNoVel-v1": "Pendulum-v1"}  # the zoo's names


def register() -> None:
    """Registers ENVS and the NO_VEL envs under the "trpo_ext/" namespace (once)."""
    for name, cls in ENVS.items():
        env_id = f"trpo_ext/{name}"
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=f"{__name__}:{cls.__name__}")
    for name, base in NO_VEL.items():
        env_id = f"trpo_ext/{name}"
        if env_id not in gym.registry:  # no time limit of its own: the base env's applies
            gym.register(env_id, entry_point=f"{__name__}:make_no_vel", kwargs={"env_id": base})
