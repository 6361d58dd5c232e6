"""Config pieces and checks shared by the experiment modules."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from rnnlab import distributed, train
from rnnlab.cells.base import Params, is_positive_finite

from experiments.trained_run import TrainedRun

EVAL_FIELDS = ("eval_batch_size", "progress_bar", "unroll", "unroll_method", "reading_digits",
               "num_test_examples", "sample")
"""The config fields (and subtrees, e.g. every `sample.*`) that `--mode=eval|sample`
takes from the command line; every other field comes from the run's `config.json`.
They change how an evaluation is batched, run or shown (`num_test_examples`: how many
test examples are evaluated), never the model, its data pipeline or its params."""

RESUME_FIELDS = EVAL_FIELDS + tuple(field for field in train.RESUME_FIELDS if field not in EVAL_FIELDS)
"""The fields that `--resume` takes from the command line: `EVAL_FIELDS` and
`rnnlab.train.RESUME_FIELDS` (how long training goes on and how often it logs,
evaluates and saves). Everything else (model, data, optimiser, seed) comes from
`config.json`, so the run continues as it began."""


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
    if distributed.is_main_process():  # with several processes, only process 0 writes files
        train.write_json(os.path.join(workdir, "eval_results.json"), results)
    return params, results


def _fields_kept(mode: str, resume: bool) -> Sequence[str] | None:
    """The fields a run of `mode` takes from the command line when the rest comes
    from `config.json`; `None` for a new training run, which takes all of them."""
    if mode != "train":
        return EVAL_FIELDS
    return RESUME_FIELDS if resume else None


def config_for_run(config: ml_collections.ConfigDict, workdir: str, mode: str, resume: bool) -> ml_collections.ConfigDict:
    """The config a run of `mode` works with: `config` for a new training run; the
    trained config for `--mode=eval|sample` (with `EVAL_FIELDS` from `config`) and
    for `--resume` (with `RESUME_FIELDS` from `config`); see `TrainedRun.merged`."""
    keep = _fields_kept(mode, resume)
    return config if keep is None else TrainedRun.read(workdir).merged(config, keep)


def command_line_config(config: ml_collections.ConfigDict, workdir: str, experiment: str,
                        overrides: Mapping[str, Any], mode: str, resume: bool) -> ml_collections.ConfigDict:
    """`launch.py`'s config for `--mode=eval|sample` and `--resume`: every field as the
    run in `workdir` was trained (its `config.json`; `config`, the experiment's
    defaults, only for fields the file lacks), then the command line's `overrides`
    (`{path: value}`). So a field not given on the command line keeps its trained
    value, `num_steps` and `sample.*` included.

    Raises a one-line `ValueError` when the run was trained by another experiment, or
    when an override outside the fields the mode may change differs from the trained
    value; `CheckpointError` when `config.json` is missing or unreadable.
    """
    run = TrainedRun.read(workdir)
    run.check_experiment(experiment, config)
    how = "--resume" if mode == "train" else f"--mode={mode}"
    run.check_overrides(overrides, _fields_kept(mode, resume) or (), how)
    merged = run.merged(config, keep=())
    with merged.ignore_type():
        merged.update_from_flattened_dict(dict(overrides))
    return merged


def check_non_negative_int(config: ml_collections.ConfigDict, name: str, meaning: str = "") -> None:
    """Raises a one-line `ValueError` unless `config[name]` is an integer >= 0;
    `meaning` (e.g. " (0: all)") says what 0 does."""
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.{name} must be an integer >= 0{meaning}, got {value!r}.")


def check_positive_finite(config: ml_collections.ConfigDict, name: str) -> None:
    """Raises a one-line `ValueError` unless `config[name]` is a finite number > 0
    (NaN fails too)."""
    value = config[name]
    if not is_positive_finite(value):
        raise ValueError(f"config.{name} must be a finite number > 0, got {value!r}.")


def check_keep_probability(config: ml_collections.ConfigDict, name: str) -> None:
    """Raises a one-line `ValueError` unless `config[name]` is a keep probability in
    (0, 1] (NaN fails too)."""
    value = config[name]
    if not 0.0 < value <= 1.0:
        raise ValueError(f"config.{name} must be a keep probability in (0, 1] (1.0: no dropout), got {value!r}.")


def split_list(value: str, name: str) -> list[str]:
    """Splits a comma-separated config value such as "lstm,gru" into its items."""
    items = [item.strip() for item in str(value).split(",")]
    if not items or any(not item for item in items):
        raise ValueError(f"config.{name} must be a comma-separated list without empty items, got {value!r}.")
    return items
