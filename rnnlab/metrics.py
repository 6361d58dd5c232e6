"""Metric logging of a training run: JSON lines and TensorBoard events in the workdir."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping

from absl import logging

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
        self._resume_step = resume_step
        self._logged_at_resume: set[str] = set()  # splits the kept log holds at resume_step
        if resume_step is None:
            open(self.path, "w").close()
        else:
            self._logged_at_resume = _truncate_after(self.path, resume_step)
        # Imported here: tensorboardX imports PyTorch when it is installed, which takes
        # seconds that only a run that writes events should pay.
        from tensorboardX import SummaryWriter

        # TensorBoard purges the steps >= purge_step: keep what metrics.jsonl keeps (<= resume_step).
        purge_step = None if resume_step is None else resume_step + 1
        self._tensorboard = SummaryWriter(logdir=workdir, purge_step=purge_step)

    def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
        """Logs scalar `values` of `split` ("train", "test", ...) at `step`; a record
        the kept log of a resumed run already holds (e.g. the final evaluation of a
        finished run resumed again) is not written twice."""
        if step == self._resume_step and split in self._logged_at_resume:
            return
        record = {"step": int(step), "split": split, **{k: _json_float(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for name, value in values.items():
            self._tensorboard.add_scalar(f"{split}/{name}", float(value), int(step))

    def close(self) -> None:
        self._tensorboard.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """The records of `workdir/metrics.jsonl`, in order (see `_parse_records`)."""
    with open(os.path.join(workdir, METRICS_FILE)) as f:
        return _parse_records(f.read(), os.path.join(workdir, METRICS_FILE))


def _parse_records(text: str, path: str) -> list[dict[str, Any]]:
    """The JSON records of the lines of `text`. A last line cut short (a crash while it
    was appended) is dropped with a warning; any other bad line raises a one-line
    `ValueError` naming `path` and the line."""
    lines = text.split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as error:
            if number == len(lines):  # no newline after it: the write was cut short
                logging.warning("%s: ignoring its last line, cut short (%s).", path, error)
                continue
            raise ValueError(f"{path} line {number} is not a metrics record ({error}); "
                             "repair or delete that line.") from None
        records.append(record)
    return records


def _json_float(value: float) -> float | str:
    """A float for JSON; NaN and infinities as strings (strict JSON has no such numbers)."""
    value = float(value)
    return value if math.isfinite(value) else str(value)


def _truncate_after(path: str, step: int) -> set[str]:
    """Drops the records after `step` (logged by a run that was then killed), and a last
    line cut short, atomically. Returns the splits of the records kept at `step`."""
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        kept = [record for record in _parse_records(f.read(), path) if record["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in kept)
    os.replace(path + ".tmp", path)
    return {record.get("split") for record in kept if record["step"] == step}
