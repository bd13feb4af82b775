"""Hyperparameters: validation written once, and the trust-region settings as one dataclass.

Every check names the one parameter it refuses and says what was expected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def check_int(name: str, value, low: int) -> int:
    """`value` as an int >= low; ValueError naming `name` otherwise (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_float(name: str, value, low: float = -math.inf, high: float = math.inf, *,
                low_open: bool = False, high_open: bool = False) -> float:
    """`value` as a finite float in the interval [low, high] (open at either end when asked);
    ValueError naming `name` otherwise (bools, NaN and infinities are refused)."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    value = float(value)
    inside = (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    if not math.isfinite(value) or not inside:
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")
    return value


@dataclass(frozen=True)
class TrustRegionConfig:
    """The settings of one TRPO policy step (`trpo_ext.trust_region_step`)."""

    max_kl: float = 0.01
    """Trust-region radius δ: a step is accepted only if the mean KL(old‖new) over the batch is ≤ δ."""
    damping: float = 0.1
    """λ in the CG system (F + λI) x = g."""
    cg_iters: int = 10
    """Maximum conjugate-gradient iterations (Fisher-vector products) per step."""
    cg_rtol: float = 1e-10
    """CG stops early once ||r|| ≤ cg_rtol·||g||."""
    backtrack_factor: float = 0.8
    """The line search shrinks the step by this factor after each rejected trial."""
    max_backtracks: int = 10
    """Step sizes tried before the step is abandoned and θ restored."""

    def __post_init__(self):
        checked = {
            "max_kl": check_float("max_kl", self.max_kl, 0.0, low_open=True),
            "damping": check_float("damping", self.damping, 0.0),
            "cg_iters": check_int("cg_iters", self.cg_iters, 1),
            "cg_rtol": check_float("cg_rtol", self.cg_rtol, 0.0),
            "backtrack_factor": check_float("backtrack_factor", self.backtrack_factor, 0.0, 1.0,
                                            low_open=True, high_open=True),
            "max_backtracks": check_int("max_backtracks", self.max_backtracks, 1),
        }
        for name, value in checked.items():  # numpy scalars become plain Python numbers
            object.__setattr__(self, name, value)
