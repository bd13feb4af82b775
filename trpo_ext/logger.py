"""The run logger: one row per update in `log_dir/progress.csv`, the same scalars in TensorBoard."""
from __future__ import annotations

import csv
import os
import warnings


# What a run leaves in its directory; a directory holding any of them is taken.
RUN_FILES = ("progress.csv", "tb", "model.pt")


def holds_run(path: str) -> bool:
    """Whether `path` already holds a run's logs or model."""
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in RUN_FILES)


def check_log_dir(log_dir: str | os.PathLike | None) -> str | None:
    """The directory a new run logs into: `log_dir` itself, or `log_dir_2`, `log_dir_3`, … when it
    already holds a run (two runs never share a progress.csv or a TensorBoard directory; a warning
    says where this one goes). None stays None. ValueError if the path is not a directory. Nothing
    is created here: the agent opens its logger at the first update."""
    if log_dir is None:
        return None
    if not isinstance(log_dir, (str, os.PathLike)):
        raise ValueError(f"log_dir must be a path or None, got {log_dir!r}")
    requested = os.fspath(log_dir)
    log_dir, number = requested, 1
    while holds_run(log_dir) or (os.path.exists(log_dir) and not os.path.isdir(log_dir)):
        if os.path.exists(log_dir) and not os.path.isdir(log_dir) and log_dir == requested:
            raise ValueError(f"log_dir {requested!r} exists and is not a directory")
        number += 1
        log_dir = f"{requested.rstrip(os.sep)}_{number}"
    if log_dir != requested:
        warnings.warn(f"log_dir {requested!r} already holds a run; this run logs to {log_dir!r}", stacklevel=3)
    return log_dir


def truncate_progress(csv_path: str, last_update: int) -> None:
    """Drops the rows of `csv_path` after update `last_update` (rows a run wrote after the
    checkpoint it is resumed from), atomically."""
    if not os.path.exists(csv_path):
        return
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "update" not in rows[0]:
        return
    column = rows[0].index("update")
    kept = [rows[0]] + [row for row in rows[1:] if len(row) > column and int(float(row[column])) <= last_update]
    tmp = csv_path + ".tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(kept)
    os.replace(tmp, csv_path)


class RunLogger:
    """Appends one row per update to `log_dir/progress.csv` and the same scalars to TensorBoard
    (under `log_dir/tb`, tagged `trpo/<key>`, at step `record["timesteps"]`).

    `resume_from=(update, timesteps)` continues the run already in `log_dir` from that point (a
    checkpoint's): its later progress.csv rows and TensorBoard events are dropped first. Otherwise a
    directory holding a run is never reused (`check_log_dir`)."""

    def __init__(self, log_dir: str | os.PathLike, resume_from: tuple[int, int] | None = None):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = check_log_dir(log_dir) if resume_from is None else os.fspath(log_dir)
        os.makedirs(log_dir, exist_ok=True)
        self.csv_path = os.path.join(log_dir, "progress.csv")
        if resume_from is not None:
            truncate_progress(self.csv_path, resume_from[0])
        self._file = open(self.csv_path, "a", newline="")
        self._csv = None
        purge = None if resume_from is None else resume_from[1] + 1
        self.tensorboard = SummaryWriter(os.path.join(log_dir, "tb"), purge_step=purge)

    def write(self, record: dict) -> None:
        if self._csv is None:
            self._csv = csv.DictWriter(self._file, fieldnames=list(record))
            if self._file.tell() == 0:
                self._csv.writeheader()
        self._csv.writerow(record)
        self._file.flush()  # a row per update on disk as it is written: `tail -f`, and a kill loses no row
        step = record["timesteps"]
        for key, value in record.items():
            if key not in ("update", "timesteps"):
                self.tensorboard.add_scalar(f"trpo/{key}", value, step)

    def flush(self) -> None:
        self._file.flush()
        self.tensorboard.flush()

    def close(self) -> None:
        self._file.close()
        self.tensorboard.close()
