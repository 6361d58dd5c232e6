"""Sine regression: an LSTM reads `window` values of a noisy multi-frequency sine series
and predicts the next value (mean squared error).

The series comes from `rnnlab.data.sine.sine_series` (its parameters are config
fields) and is cut into contiguous train / validation / test parts, each turned into
every window of `window` values with the value that follows. The workdir receives what
`rnnlab.train.train` writes (`val_loss` and `test_loss` are MSEs), with `val_rmse` and
`test_rmse` added to `results.json`,
plus `curves.png` and `predictions.png` (one-step predictions against the truth on the
test part).

    python launch.py --experiment=sine_lstm --workdir=runs/sine_lstm \
        --config.frequencies=0.1,0.37 --config.noise_std=0.05 --config.window=50
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import rnnlab
from rnnlab import distributed, plots, train
from rnnlab.cells.base import Array, Params, PRNGKey, check_positive_int
from rnnlab.data import sine as sine_data
from rnnlab.metrics import read_metrics

from experiments import common, registry

EVAL_SPLITS = {"val": "validation", "test": "test"}  # results key prefix -> series split
PLOT_POINTS = 400  # test steps shown in predictions.png


def get_config() -> ml_collections.ConfigDict:
    """The `sine_lstm` config.

    Series fields (see `rnnlab.data.sine.sine_series`):
      num_points: length of the whole series before the split.
      frequencies: comma-separated frequencies in cycles per unit time, e.g. "0.1,0.37".
      amplitudes: comma-separated amplitudes, one per frequency ("" for all ones).
      noise_std: standard deviation of the additive Gaussian noise; it is also the
        lowest RMSE a predictor can reach on noisy targets.
      dt: sampling interval (> 0).
      series_seed: seeds the phases and the noise.
      split_fractions: comma-separated train, validation, test fractions.
    Model fields:
      window: values read before each prediction (time steps of the LSTM).
      num_units: LSTM width.
      unroll: steps per `lax.scan` iteration.
    Training fields: see `rnnlab.train.default_config`.
    """
    config = common.base_config(
        batch_size=64,
        eval_batch_size=500,
        num_epochs=6,
        learning_rate=3e-3,
        warmup_steps=100,
        grad_clip_norm=1.0,
        log_every_steps=50,
        checkpoint_every_steps=500,
    )
    config.num_points = 10_000
    config.frequencies = "0.1,0.37"
    config.amplitudes = "1.0,0.5"
    config.noise_std = 0.05
    config.dt = 0.1
    config.series_seed = 0
    config.split_fractions = "0.8,0.1,0.1"
    config.window = 50
    config.num_units = 32
    config.unroll = 1
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line `ValueError` naming a field of `config` out of range; `run`
    calls it before it writes to the workdir. (`make_splits` checks the rest of the
    series fields.)"""
    for name in ("num_points", "window", "num_units", "unroll"):
        check_positive_int(config[name], f"config.{name}")
    common.check_positive_finite(config, "dt")
    if not 0.0 <= config.noise_std < math.inf:
        raise ValueError(f"config.noise_std must be a finite number >= 0, got {config.noise_std!r}.")
    common.check_non_negative_int(config, "series_seed")


def _floats(config: ml_collections.ConfigDict, name: str) -> Optional[list[float]]:
    """A comma-separated config field as floats; an empty string is `None`."""
    if not str(config[name]).strip():
        return None
    try:
        return [float(item) for item in common.split_list(config[name], name)]
    except ValueError:
        raise ValueError(f"config.{name} must be comma-separated numbers, got {config[name]!r}.") from None


def make_splits(config: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
    """The series of `config` cut into `{"train", "validation", "test": float32 [n]}`."""
    if _floats(config, "frequencies") is None:  # "" means None, which the generator reads as a default
        raise ValueError(f"config.frequencies must list at least one frequency, e.g. \"0.1,0.37\"; "
                         f"got {config.frequencies!r}.")
    series = sine_data.sine_series(
        config.num_points,
        frequencies=_floats(config, "frequencies"),
        amplitudes=_floats(config, "amplitudes"),
        noise_std=config.noise_std,
        dt=config.dt,
        seed=config.series_seed,
    )
    return sine_data.split_series(series, _floats(config, "split_fractions"))


def windows(series: np.ndarray, window: int) -> dict[str, np.ndarray]:
    """`{"inputs": float32 [N, window, 1], "target": float32 [N]}` for every window."""
    inputs, targets = sine_data.make_windows(series, window)
    return {"inputs": inputs, "target": targets}


class Model(NamedTuple):
    """An LSTM followed by a linear read-out of its last output.

    Attributes:
      init: `(key) -> params`.
      predict: `(params, inputs [B, W, 1]) -> [B]`, the predicted next values.
    """

    init: Callable[[PRNGKey], Params]
    predict: Callable[[Params, Array], Array]


def build_model(config: ml_collections.ConfigDict) -> Model:
    """The LSTM(`num_units`) regressor of `config`."""
    from rnnlab.cells.lstm import lstm

    cell = lstm(config.num_units)

    def init(key: PRNGKey) -> Params:
        cell_key, out_key = jax.random.split(key)
        return {
            "lstm": cell.init(cell_key, 1),
            "out": {
                "w": jax.nn.initializers.glorot_uniform()(out_key, (cell.output_size, 1)),
                "b": jnp.zeros((1,)),
            },
        }

    def predict(params: Params, inputs: Array) -> Array:
        outputs, _ = rnnlab.unroll(cell, params["lstm"], inputs, unroll=config.unroll)
        return (outputs[:, -1] @ params["out"]["w"] + params["out"]["b"])[:, 0]

    return Model(init, predict)


def make_task(model: Model) -> train.Task:
    """The task over `{"inputs": [B, W, 1], "target": [B]}`; its per-example metric
    `loss` is the squared error, so a split's mean `loss` is its MSE."""

    def loss(params: Params, carry: None, batch: dict[str, Array], rng: Optional[PRNGKey]):
        del rng
        squared_error = jnp.square(model.predict(params, batch["inputs"]) - batch["target"])
        return jnp.mean(squared_error), (carry, {"loss": squared_error})

    return train.Task(init_params=model.init, loss=loss)


def plot_predictions(truth: np.ndarray, predictions: np.ndarray, path: str, title: str) -> None:
    """One-step predictions against the truth (`[n]` each) as a PNG at `path`."""
    import matplotlib.pyplot as plt  # rnnlab.plots selected the Agg backend

    figure, (axis, error_axis) = plt.subplots(2, 1, figsize=(10, 5), sharex=True,
                                              gridspec_kw={"height_ratios": [3, 1]})
    steps = np.arange(len(truth))
    axis.plot(steps, truth, color="black", linewidth=1, label="truth")
    axis.plot(steps, predictions, color="tab:orange", linewidth=1, linestyle="--", label="prediction")
    axis.set_title(title)
    axis.legend(loc="upper right")
    axis.grid(alpha=0.3)
    error_axis.plot(steps, predictions - truth, color="tab:red", linewidth=0.8)
    error_axis.set_ylabel("error")
    error_axis.set_xlabel("test step")
    error_axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _rmse(results: dict[str, Any]) -> dict[str, float]:
    """`{split}_rmse` from the `{split}_loss` (MSE) entries of `results`."""
    return {f"{prefix}_rmse": math.sqrt(results[f"{prefix}_loss"]) for prefix in EVAL_SPLITS if f"{prefix}_loss" in results}


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mode: str = "train",
    resume: bool = False,
    data_dir: Optional[str] = None,
    tfds_data_dir: Optional[str] = None,
    name: str = "sine_lstm",
) -> dict[str, Any]:
    """Trains ("train") or evaluates the newest checkpoint ("eval"); see
    `registry.RunFn`. The data is generated, so `data_dir` and `tfds_data_dir` are
    unused. "train" adds `val_rmse` and `test_rmse` to `results.json`; "eval" writes
    `eval_results.json`. Both write `predictions.png`. "eval" and `resume` build the
    model and the series from the run's `config.json`, taking only
    `common.EVAL_FIELDS` / `common.RESUME_FIELDS` from `config`."""
    del data_dir, tfds_data_dir
    common.check_mode(name, mode, ("train", "eval"))
    config = common.config_for_run(config, workdir, mode, resume)
    check_config(config)
    model = build_model(config)
    task = make_task(model)
    splits = make_splits(config)
    eval_data = {prefix: windows(splits[split], config.window) for prefix, split in EVAL_SPLITS.items()}
    if mode == "train":
        result = train.train(task, config, workdir, windows(splits["train"], config.window), eval_data, resume=resume,
                             may_change=common.RESUME_FIELDS)
        params, results = result.state.params, result.results
        if results["stop_reason"] not in ("done", "time_budget"):
            return results
        results.update(_rmse(results))
        if distributed.is_main_process():  # with several processes, only process 0 writes files
            train.write_json(os.path.join(workdir, "results.json"), results)
            plots.plot_training_curves(read_metrics(workdir), os.path.join(workdir, "curves.png"))
    else:
        params, results = common.evaluate_newest_checkpoint(task, config, workdir, eval_data, derived=_rmse)
    test = eval_data["test"]
    shown = min(PLOT_POINTS, len(test["target"]))
    predictions = jax.jit(model.predict)(params, test["inputs"][:shown])
    title = (f"next-value prediction on the test series: test RMSE {results['test_rmse']:.4f} "
             f"(noise std {config.noise_std})")
    if distributed.is_main_process():
        plot_predictions(test["target"][:shown], np.asarray(predictions), os.path.join(workdir, "predictions.png"),
                         title)
    return results


registry.register(
    "sine_lstm",
    "LSTM(32) predicting the next value of a noisy two-frequency sine series from 50 values.",
    get_config,
    functools.partial(run, name="sine_lstm"),
)
