"""The config a run in a workdir was trained with, read once from its `config.json`.

`--mode=eval|sample` and `--resume` rebuild the model and data from it, so that a
checkpoint is read by the model that wrote it. `launch.py` and the experiments use one
`TrainedRun` for every check and merge:

    run = TrainedRun.read(workdir)                      # CheckpointError if unreadable
    run.check_experiment("lstm_mnist", default_config)  # another experiment's run: ValueError
    run.check_overrides({"num_units": 64}, keep=EVAL_FIELDS, how="--mode=eval")
    config = run.merged(default_config, keep=EVAL_FIELDS)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections

from rnnlab import train
from rnnlab.checkpoint import CHECKPOINT_DIR, CheckpointError

CONFIG_FILE = "config.json"

_MISSING = object()  # a config path that config.json lacks


@dataclasses.dataclass(frozen=True)
class TrainedRun:
    """A run's directory and its `config.json` (nested dicts, as JSON stores them)."""

    workdir: str
    config: Mapping[str, Any]

    @classmethod
    def read(cls, workdir: str) -> TrainedRun:
        """Reads `workdir/config.json`; a missing or unreadable file raises
        `CheckpointError` with one line that says which."""
        path = os.path.join(workdir, CONFIG_FILE)
        if not os.path.exists(path):
            checkpoints = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
            if not os.path.isdir(checkpoints):
                raise CheckpointError(f"no checkpoint in {checkpoints} (the directory does not exist).")
            raise CheckpointError(f"{os.path.abspath(path)} does not exist, so the config the checkpoints in "
                                  f"{checkpoints} were trained with is unknown.")
        try:
            with open(path) as f:
                config = json.load(f)
        except (OSError, ValueError) as error:
            raise CheckpointError(f"cannot read {os.path.abspath(path)}: {error}") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{os.path.abspath(path)} does not hold a config (a JSON object).")
        return cls(workdir, config)

    def check_experiment(self, experiment: str, config: ml_collections.ConfigDict) -> None:
        """Refuses (one-line `ValueError`) a run trained by another experiment: its
        `config.json` records another `experiment`, or (runs from before that field)
        lacks top-level fields of `config`, the experiment's own."""
        recorded = self.config.get("experiment")
        if recorded is None:  # fields the run lacks; extra ones may be fields an experiment has dropped since
            lacking = sorted(set(config.keys()) - set(self.config) - {"experiment"})
            if not lacking:
                return
            why = f"its {CONFIG_FILE} lacks fields of {experiment!r} ({', '.join(lacking[:4])})"
        elif recorded != experiment:
            why = f"it holds a run of --experiment={recorded}"
        else:
            return
        raise ValueError(f"{self.workdir} was not trained by --experiment={experiment}: {why}; pass the "
                         "experiment it was trained with.")

    def check_overrides(self, overrides: Mapping[str, Any], keep: Sequence[str], how: str) -> None:
        """Refuses (one-line `ValueError`) a command-line override `{path: value}` of a
        field outside `keep` whose value differs from the trained one, since `how`
        ("--mode=eval", "--resume") uses the trained value. Overrides equal to the
        trained value, and fields `config.json` lacks, pass."""
        for path, value in overrides.items():
            if train.is_field_within(path, keep):
                continue
            node: Any = self.config
            for part in path.split("."):
                node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
            if node is not _MISSING and not _same(value, node):
                raise ValueError(
                    f"--config.{path}={value!r} differs from the value the run in {self.workdir} was trained with "
                    f"({node!r}, see its {CONFIG_FILE}); {how} uses the trained config, so drop the override "
                    f"(it may change only {', '.join(field for field in keep if field in self.config)})."
                )

    def merged(self, config: ml_collections.ConfigDict, keep: Sequence[str]) -> ml_collections.ConfigDict:
        """`config` with every field outside `keep` (names, or subtrees such as
        "sample") replaced by its trained value. Fields `config.json` lacks keep
        `config`'s value; fields `config` lacks (dropped by the experiment since) are
        skipped."""
        merged = config.copy_and_resolve_references()

        def assign(node: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
            for key, value in values.items():
                path = prefix + key
                if train.is_field_within(path, keep) or key not in node:
                    continue
                if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
                    assign(node[key], value, path + ".")
                    continue
                with node.ignore_type():
                    node[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value

        assign(merged, self.config, "")
        return merged


def _same(given: Any, trained: Any) -> bool:
    """Equality of a parsed command-line value and its JSON-stored counterpart."""
    numbers = (int, float)
    if isinstance(given, numbers) and isinstance(trained, numbers) and not isinstance(given, bool):
        return float(given) == float(trained) or (math.isnan(float(given)) and math.isnan(float(trained)))
    if isinstance(given, (tuple, list)) and isinstance(trained, list):
        return len(given) == len(trained) and all(_same(a, b) for a, b in zip(given, trained))
    return given == trained
