"""Metric logging of a training run: JSON lines and TensorBoard events in the workdir."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

METRICS_FILE = "metrics.jsonl"


class MetricWriter:
    """Appends `{"step", "split", **values}` lines to `workdir/metrics.jsonl` and writes
    the same scalars to TensorBoard as `{split}/{name}`.

    Args:
      workdir: the run's directory (must exist).
      resume_step: when continuing a run from the checkpoint of this step, lines and
        events logged after it by the interrupted run are dropped, so that the files
        read like one uninterrupted run.
    """

    def __init__(self, workdir: str, resume_step: int | None = None):
        self.path = os.path.join(workdir, METRICS_FILE)
        if resume_step is None:
            open(self.path, "w").close()
        else:
            _truncate_after(self.path, resume_step)
        # Imported here: tensorboardX imports PyTorch when it is installed, which takes
        # seconds that only a run that writes events should pay.
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(logdir=workdir, purge_step=resume_step)

    def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
        """Logs scalar `values` of `split` ("train", "test", ...) at `step`."""
        record = {"step": int(step), "split": split, **{k: _json_float(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{split}/{name}", float(value), int(step))

    def close(self) -> None:
        self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of `workdir/metrics.jsonl`, in order."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return [json.loads(line) for line in f if line.strip()]


def _json_float(value: float) -> float | str:
    """A float for JSON; NaN and infinities as strings (strict JSON has no such numbers)."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _truncate_after(path: str, step: int) -> None:
    """Drops the records after `step` (logged by a run that was then killed), atomically."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)
