"""The run logger: one row per update in `log_dir/progress.csv`, the same scalars in TensorBoard."""
from __future__ import annotations

import csv
import os


def check_log_dir(log_dir: str | os.PathLike | None) -> str | None:
    """`log_dir` as a path string (None stays None); ValueError if it exists and is not a directory.
    Nothing is created: the agent opens its logger at the first update."""
    if log_dir is None:
        return None
    if not isinstance(log_dir, (str, os.PathLike)):
        raise ValueError(f"log_dir must be a path or None, got {log_dir!r}")
    log_dir = os.fspath(log_dir)
    if os.path.exists(log_dir) and not os.path.isdir(log_dir):
        raise ValueError(f"log_dir {log_dir!r} exists and is not a directory")
    return log_dir


class RunLogger:
    """Appends one row per update to `log_dir/progress.csv` and the same scalars to TensorBoard
    (under `log_dir/tb`, tagged `trpo/<key>`, at step `record["timesteps"]`)."""

    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter

        log_dir = check_log_dir(log_dir)
        os.makedirs(log_dir, exist_ok=True)
        self.csv_path = os.path.join(log_dir, "progress.csv")
        self._file = open(self.csv_path, "a", newline="")
        self._csv = None
        self.tensorboard = SummaryWriter(os.path.join(log_dir, "tb"))

    def write(self, record: dict) -> None:
        if self._csv is None:
            self._csv = csv.DictWriter(self._file, fieldnames=list(record))
            if self._file.tell() == 0:
                self._csv.writeheader()
        self._csv.writerow(record)
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
