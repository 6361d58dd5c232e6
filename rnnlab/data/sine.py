"""Synthetic sine series for sequence regression: generation, windows, splits.

    series = sine_series(5000, frequencies=(1.0, 2.3), noise_std=0.05, seed=0)  # [5000]
    splits = split_series(series, (0.8, 0.1, 0.1))                            # train/val/test
    inputs, targets = make_windows(splits["train"], window=50)                # [N, 50, 1], [N]
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")


def sine_series(
    num_points: int,
    *,
    frequencies: Sequence[float] = (1.0,),
    amplitudes: Optional[Sequence[float]] = None,
    phases: Optional[Sequence[float]] = None,
    noise_std: float = 0.0,
    dt: float = 0.1,
    seed: int = 0,
) -> np.ndarray:
    """A sum of sines sampled every `dt`, plus i.i.d. Gaussian noise.

    `x[n] = sum_k a_k · sin(2π · f_k · n · dt + φ_k) + ε_n`, `ε_n ~ N(0, noise_std²)`.

    Args:
      num_points: length of the series.
      frequencies: `f_k`, in cycles per unit time.
      amplitudes: `a_k`; default 1 for each frequency.
      phases: `φ_k` in radians; default drawn uniformly in `[0, 2π)` from `seed`.
      noise_std: standard deviation of the additive noise (0 for a clean series).
      dt: the sampling interval.
      seed: seeds the phases and the noise.

    Returns:
      `[num_points]` float32.
    """
    num_points = _positive_int(num_points, "num_points")
    frequencies = np.asarray(frequencies, np.float64)
    if frequencies.ndim != 1 or frequencies.size == 0:
        raise ValueError(f"frequencies must be a non-empty sequence, got {frequencies.tolist()!r}.")
    rng = np.random.default_rng(seed)
    amplitudes = _per_frequency(amplitudes, np.ones_like(frequencies), "amplitudes")
    phases = _per_frequency(phases, rng.uniform(0.0, 2 * np.pi, frequencies.size), "phases")
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std!r}.")
    t = np.arange(num_points)[:, None] * dt  # [N, 1]
    clean = np.sum(amplitudes * np.sin(2 * np.pi * frequencies * t + phases), axis=1)
    return (clean + noise_std * rng.standard_normal(num_points)).astype(np.float32)


def _positive_int(value: int, name: str) -> int:
    """`value` as an int: any integer type (`np.int64` included) but bool, and positive."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return int(value)


def _one_dimensional(series: np.ndarray) -> np.ndarray:
    series = np.asarray(series)
    if series.ndim != 1:
        raise ValueError(f"series must be 1-D [N], got shape {series.shape}.")
    return series


def _per_frequency(values: Optional[Sequence[float]], default: np.ndarray, name: str) -> np.ndarray:
    if values is None:
        return default
    values = np.asarray(values, np.float64)
    if values.shape != default.shape:
        raise ValueError(f"{name} needs one value per frequency ({default.size}), got {values.tolist()!r}.")
    return values


def split_series(series: np.ndarray, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> dict[str, np.ndarray]:
    """Cuts `series` into contiguous train / validation / test parts, in that order.

    Contiguous cuts keep the test part in the future of the training part, so windows
    of one split never overlap another's. The test part always ends with the series,
    however the fractions round.

    Raises:
      ValueError: `series` not 1-D, fractions not three positive numbers summing to 1,
        or a part that would be empty.
    """
    series = _one_dimensional(series)
    fractions = np.asarray(fractions, np.float64)
    if fractions.shape != (3,) or np.any(fractions <= 0) or not np.isclose(fractions.sum(), 1.0):
        raise ValueError(f"fractions must be three positive numbers summing to 1, got {fractions.tolist()!r}.")
    ends = np.round(np.cumsum(fractions) * len(series)).astype(int)
    ends[-1] = len(series)
    starts = np.concatenate([[0], ends[:-1]])
    empty = [name for name, start, end in zip(SPLITS, starts, ends) if end <= start]
    if empty:
        raise ValueError(
            f"a series of length {len(series)} split by fractions {fractions.tolist()!r} "
            f"leaves {' and '.join(empty)} empty; use a longer series."
        )
    return {name: series[start:end] for name, start, end in zip(SPLITS, starts, ends)}


def make_windows(series: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Every window of `window` consecutive values and the value that follows it.

    Args:
      series: `[N]`.
      window: the window length `W`; needs `N > W`.

    Returns:
      `(inputs [N - W, W, 1], targets [N - W])`: `targets[i] = series[i + W]`.

    Raises:
      ValueError: `window` not a positive integer, `series` not 1-D, or `N <= W`.
    """
    window = _positive_int(window, "window")
    series = _one_dimensional(series)
    if len(series) <= window:
        raise ValueError(f"a series of length {len(series)} has no window of {window} values plus a target.")
    inputs = np.lib.stride_tricks.sliding_window_view(series[:-1], window)  # [N - W, W]
    return np.ascontiguousarray(inputs[..., None]), series[window:].copy()
