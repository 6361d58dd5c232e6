"""Config pieces and checks shared by the experiment modules."""

from __future__ import annotations

from typing import Sequence

import ml_collections

from rnnlab import train


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


def split_list(value: str, name: str) -> list[str]:
    """Splits a comma-separated config value such as "lstm,gru" into its items."""
    items = [item.strip() for item in str(value).split(",")]
    if not items or any(not item for item in items):
        raise ValueError(f"config.{name} must be a comma-separated list without empty items, got {value!r}.")
    return items
