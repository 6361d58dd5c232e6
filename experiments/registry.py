"""The experiment registry: `launch.py --experiment=NAME` looks names up here.

An experiment is a name, a one-line description, a function building its default
`ml_collections.ConfigDict`, and a function running it. Adding one is one small module
in `experiments/` that calls `register` and is imported by `experiments/__init__.py`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import ml_collections

RunFn = Callable[..., dict[str, Any]]
"""How `launch.py` runs an experiment:

    results = run(config, workdir, *, mode="train", resume=False,
                  data_dir=None, tfds_data_dir=None)

Args:
  config: the experiment's `ConfigDict` with the command line's `--config.*` overrides;
    for mode "eval"/"sample" and `resume`, `launch.py` passes the run's `config.json`
    with the overrides that may change (`common.command_line_config`), and
    the experiment itself takes from `config` only `common.EVAL_FIELDS` /
    `common.RESUME_FIELDS`, the rest from `config.json` (`common.config_for_run`).
  workdir: the run's directory (`--workdir`, default `runs/<experiment>`).
  mode: "train" (train, evaluate, write plots), "eval" (evaluate the newest checkpoint
    in `workdir`) or "sample" (language models: generate text from the newest
    checkpoint). An experiment raises `ValueError` for a mode it does not support.
  resume: continue training from the newest checkpoint in `workdir`.
  data_dir: a directory with the data files (`--data_dir`); `None` lets the loader
    fall back to `$RNNLAB_DATA_DIR`, then TensorFlow Datasets.
  tfds_data_dir: TensorFlow Datasets' data directory (`--tfds_data_dir`).

Returns:
  A dict of results (for "train", what `rnnlab.train.train` wrote to `results.json`).

Errors meant for the user (`ValueError` and its subclasses `rnnlab.data.DataError` and
`rnnlab.checkpoint.CheckpointError`, `OSError`, `rnnlab.train.NonFiniteLossError`)
carry a one-line message; `launch.py` prints it and exits non-zero.
"""


class Experiment(NamedTuple):
    name: str
    description: str
    get_config: Callable[[], ml_collections.ConfigDict]
    run: RunFn
    modes: tuple[str, ...] = ("train", "eval")  # the --mode values `run` supports
    resumable: bool = True  # whether `--resume` applies


_REGISTRY: dict[str, Experiment] = {}


def register(
    name: str,
    description: str,
    get_config: Callable[[], ml_collections.ConfigDict],
    run: RunFn,
    modes: tuple[str, ...] = ("train", "eval"),
    resumable: bool = True,
) -> None:
    """Adds an experiment; names are unique. `modes` and `resumable` say what `run`
    supports, so that `launch.py` refuses the rest before reading any workdir."""
    if name in _REGISTRY:
        raise ValueError(f"experiment {name!r} is registered twice.")
    _REGISTRY[name] = Experiment(name, description, get_config, run, tuple(modes), resumable)


def get(name: str) -> Experiment:
    """The experiment called `name`; the error lists the known names."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown experiment {name!r}; known experiments: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def names() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)
