"""Config pieces and checks shared by the experiment modules."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from rnnlab import train
from rnnlab.cells.base import Params


def base_config(**overrides) -> ml_collections.ConfigDict:
    """The training fields of `rnnlab.train.default_config()` with `overrides` applied.

    Experiments add their own fields (model, data) to the returned dict. Overrides must
    name existing fields, so a typo fails here rather than being ignored.
    """
    config = train.default_config()
    for name, value in overrides.items():
        if name not in config:
            raise KeyError(f"base_config: {name!r} is not a training field; add it after the call instead.")
        config[name] = value
    return config


def check_mode(experiment: str, mode: str, supported: Sequence[str]) -> None:
    """Raises a one-line `ValueError` unless the experiment supports `mode`."""
    if mode not in supported:
        raise ValueError(
            f"experiment {experiment!r} supports --mode={'|'.join(supported)}, not --mode={mode}."
        )


def evaluate_newest_checkpoint(
    task: train.Task,
    config: ml_collections.ConfigDict,
    workdir: str,
    splits: Mapping[str, Any],
    derived: Callable[[dict[str, Any]], dict[str, Any]] = lambda results: {},
) -> tuple[Params, dict[str, Any]]:
    """`--mode=eval`: restores the newest checkpoint in `workdir`, evaluates it on each
    of `splits` (`{prefix: data}`), and writes `eval_results.json` there with `step`,
    `{prefix}_{metric}` for every metric, and whatever `derived(results)` adds.

    Returns the restored params and those results.
    """
    params, step = train.restore_params(task, config, workdir)
    results: dict[str, Any] = {"step": step}
    for prefix, data in splits.items():
        values = train.evaluate(task, params, data, config.eval_batch_size)
        results.update({f"{prefix}_{metric}": value for metric, value in values.items()})
    results.update(derived(results))
    train.write_json(os.path.join(workdir, "eval_results.json"), results)
    return params, results


def split_list(value: str, name: str) -> list[str]:
    """Splits a comma-separated config value such as "lstm,gru" into its items."""
    items = [item.strip() for item in str(value).split(",")]
    if not items or any(not item for item in items):
        raise ValueError(f"config.{name} must be a comma-separated list without empty items, got {value!r}.")
    return items
