"""Config pieces and checks shared by the experiment modules."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from rnnlab import distributed, train
from rnnlab.cells.base import Params
from rnnlab.checkpoint import CHECKPOINT_DIR, CheckpointError

CONFIG_FILE = "config.json"

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


def _matches(path: str, fields: Sequence[str]) -> bool:
    """Whether the dotted `path` is one of `fields` or lies inside one of them."""
    return any(path == field or path.startswith(field + ".") for field in fields)


def read_trained_config(workdir: str) -> dict[str, Any]:
    """The config a run in `workdir` was trained with: its `config.json`, as a dict.

    Raises `CheckpointError` (one line) when the file is missing or unreadable.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        checkpoints = os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR))
        if not os.path.isdir(checkpoints):
            raise CheckpointError(f"no checkpoint in {checkpoints} (the directory does not exist).")
        raise CheckpointError(f"{os.path.abspath(path)} does not exist, so the config the checkpoints in "
                              f"{checkpoints} were trained with is unknown.")
    try:
        with open(path) as f:
            trained = json.load(f)
    except (OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {os.path.abspath(path)}: {error}") from None
    if not isinstance(trained, dict):
        raise CheckpointError(f"{os.path.abspath(path)} does not hold a config (a JSON object).")
    return trained


def check_trained_by(workdir: str, experiment: str, config: ml_collections.ConfigDict) -> None:
    """Refuses (one-line `ValueError`) a workdir whose run was trained by another
    experiment: its `config.json` records another `experiment`, or (runs from before
    that field) lacks top-level fields of `config`, the experiment's own."""
    trained = read_trained_config(workdir)
    recorded = trained.get("experiment")
    if recorded is None:  # fields the run lacks; extra ones may be fields an experiment has dropped since
        lacking = sorted(set(config.keys()) - set(trained) - {"experiment"})
        if not lacking:
            return
        why = f"its {CONFIG_FILE} lacks fields of {experiment!r} ({', '.join(lacking[:4])})"
    elif recorded != experiment:
        why = f"it holds a run of --experiment={recorded}"
    else:
        return
    raise ValueError(f"{workdir} was not trained by --experiment={experiment}: {why}; pass the experiment "
                     "it was trained with.")


def trained_config(config: ml_collections.ConfigDict, workdir: str, keep: Sequence[str]) -> ml_collections.ConfigDict:
    """`config` with every field outside `keep` (e.g. `EVAL_FIELDS`) replaced by the
    value the run in `workdir` was trained with (its `config.json`).

    `--mode=eval|sample` and `--resume` build the model and data from this, so they
    read a checkpoint with the model that wrote it; `launch.py` refuses command-line
    overrides of the replaced fields that differ from the trained values
    (`check_overrides`). Raises `CheckpointError` when `config.json` is missing.
    """
    merged = config.copy_and_resolve_references()

    def assign(node: ml_collections.ConfigDict, values: Mapping[str, Any], prefix: str) -> None:
        for key, value in values.items():
            path = prefix + key
            if _matches(path, keep) or key not in node:  # kept, or a field the experiment no longer has
                continue
            if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
                assign(node[key], value, path + ".")
                continue
            with node.ignore_type():
                node[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value

    assign(merged, read_trained_config(workdir), "")
    return merged


def config_for_run(config: ml_collections.ConfigDict, workdir: str, mode: str, resume: bool) -> ml_collections.ConfigDict:
    """The config a run of `mode` works with: `config` for a new training run; the
    trained config for `--mode=eval|sample` (with `EVAL_FIELDS` from `config`) and
    for `--resume` (with `RESUME_FIELDS` from `config`); see `trained_config`."""
    if mode != "train":
        return trained_config(config, workdir, EVAL_FIELDS)
    if resume:
        return trained_config(config, workdir, RESUME_FIELDS)
    return config


def trained_config_with_overrides(config: ml_collections.ConfigDict, workdir: str,
                                  overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """The command line's config for `--mode=eval|sample` and `--resume`: every field
    as the run in `workdir` was trained (its `config.json`; `config` only for fields
    the file lacks), then the `overrides` (`{path: value}`, already checked by
    `check_run_overrides`). So a field not given on the command line keeps its
    trained value, `num_steps` and `sample.*` included."""
    merged = trained_config(config, workdir, keep=())
    with merged.ignore_type():
        merged.update_from_flattened_dict(dict(overrides))
    return merged


def check_run_overrides(overrides: Mapping[str, Any], workdir: str, mode: str, resume: bool) -> None:
    """`check_overrides` for the fields `config_for_run` takes from `config.json`."""
    if mode != "train":
        check_overrides(overrides, workdir, EVAL_FIELDS, f"--mode={mode}")
    elif resume:
        check_overrides(overrides, workdir, RESUME_FIELDS, "--resume")


def _same(given: Any, trained: Any) -> bool:
    """Equality of a parsed command-line value and its JSON-stored counterpart."""
    numbers = (int, float)
    if isinstance(given, numbers) and isinstance(trained, numbers) and not isinstance(given, bool):
        return float(given) == float(trained) or (math.isnan(float(given)) and math.isnan(float(trained)))
    if isinstance(given, (tuple, list)) and isinstance(trained, list):
        return len(given) == len(trained) and all(_same(a, b) for a, b in zip(given, trained))
    return given == trained


_MISSING = object()  # a config path that config.json lacks


def check_overrides(overrides: Mapping[str, Any], workdir: str, keep: Sequence[str], how: str) -> None:
    """Refuses (one-line `ValueError`) a command-line override `{path: value}` of a
    field outside `keep` whose value differs from the one the run in `workdir` was
    trained with, since `how` ("--mode=eval", "--resume") uses the trained value.
    Overrides equal to the trained value, and fields `config.json` lacks, pass."""
    trained = read_trained_config(workdir)
    for path, value in overrides.items():
        if _matches(path, keep):
            continue
        node: Any = trained
        for part in path.split("."):
            node = node.get(part, _MISSING) if isinstance(node, dict) else _MISSING
        if node is not _MISSING and not _same(value, node):
            raise ValueError(
                f"--config.{path}={value!r} differs from the value the run in {workdir} was trained with "
                f"({node!r}, see its {CONFIG_FILE}); {how} uses the trained config, so drop the override "
                f"(it may change only {', '.join(field for field in keep if field in trained)})."
            )


def check_non_negative_int(config: ml_collections.ConfigDict, name: str, meaning: str = "") -> None:
    """Raises a one-line `ValueError` unless `config[name]` is an integer >= 0;
    `meaning` (e.g. " (0: all)") says what 0 does."""
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"config.{name} must be an integer >= 0{meaning}, got {value!r}.")


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
