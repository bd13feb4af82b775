"""Learning curves: progress.csv's mean episode return against env steps, one PNG for one run or an
overlay of several (`trpo-ext train` draws one at the end, `trpo-ext plot` any).

The curve is the record's `ep_return_mean`: the mean return of the last `stats_window` training
episodes, of the stochastic policy (actions sampled, as in training). The axis says so, and where a
deterministic evaluation is given it is drawn as its own point and labelled as a different number.
"""
from __future__ import annotations

import csv
import math
import os

from . import checkpoint


def read_progress(run_dir: str) -> tuple[list[float], list[float]]:
    """(timesteps, mean episode return) from a run directory's progress.csv."""
    steps, returns = [], []
    with open(os.path.join(run_dir, "progress.csv"), newline="") as f:
        for row in csv.DictReader(f):
            value = float(row["ep_return_mean"])
            if math.isfinite(value):
                steps.append(float(row["timesteps"]))
                returns.append(value)
    return steps, returns


def stats_window(run_dir: str) -> int | None:
    """The run's `stats_window` (episodes per point of its curve), from its model.pt; None without one."""
    try:
        return int(checkpoint.read(os.path.join(run_dir, "model.pt"))["hyperparameters"]["stats_window"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plot_runs(run_dirs, out_path: str, title: str | None = None,
              evaluation: tuple[float, float, int] | None = None) -> None:
    """Overlays the learning curves of several runs in one PNG, written atomically. `evaluation`:
    (mean, std, episodes) of a deterministic evaluation of the last run's model, drawn at its last step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    windows = {run_dir: stats_window(run_dir) for run_dir in run_dirs}
    one_window = len(set(windows.values())) == 1
    last_step = 0.0
    for run_dir, window in windows.items():
        steps, returns = read_progress(run_dir)
        label = os.path.basename(os.path.normpath(run_dir))
        if not one_window:
            label += f" (last {window if window else 'stats_window'} episodes)"
        ax.plot(steps, returns, label=label)
        last_step = steps[-1] if steps else last_step
    episodes = f"{windows[run_dirs[0]]}" if one_window and windows[run_dirs[0]] else "stats_window"
    ax.set_xlabel("environment steps")
    ax.set_ylabel(f"mean return of the last {episodes} training\nepisodes (stochastic policy: sampled actions)")
    if evaluation is not None:
        mean, std, n = evaluation
        ax.errorbar([last_step], [mean], yerr=[std], fmt="D", color="black", capsize=4,
                    label=f"deterministic evaluation, {n} episodes: {mean:.1f} ± {std:.1f}\n"
                          "(the policy's mode on fresh episodes: not a point of the curve)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    tmp = f"{out_path}.tmp.png"  # a signal or a crash never leaves half a PNG under the real name
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out_path)
