"""The experiment registry: `launch.py --experiment=NAME` looks names up here.

An experiment is a name, a one-line description, a function building its default
`ml_collections.ConfigDict`, and a function running it. Adding one is one small module
in `experiments/` that calls `register` and is imported by `experiments/__init__.py`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import ml_collections

RunFn = Callable[..., dict[str, Any]]  # (config, workdir, **launch_options) -> results


class Experiment(NamedTuple):
    name: str
    description: str
    get_config: Callable[[], ml_collections.ConfigDict]
    run: RunFn


_REGISTRY: dict[str, Experiment] = {}


def register(name: str, description: str, get_config: Callable[[], ml_collections.ConfigDict], run: RunFn) -> None:
    """Adds an experiment; names are unique."""
    if name in _REGISTRY:
        raise ValueError(f"experiment {name!r} is registered twice.")
    _REGISTRY[name] = Experiment(name, description, get_config, run)


def get(name: str) -> Experiment:
    """The experiment called `name`; the error lists the known names."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown experiment {name!r}; known experiments: {', '.join(sorted(_REGISTRY))}.")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)
