"""Tests of the sine series generator and the sine_lstm experiment."""

from __future__ import annotations

import json
import math
import os
import re

import jax
import numpy as np
import numpy_reference as ref
import pytest

from experiments import sine
from rnnlab.data import sine as sine_data


def test_clean_series_is_the_sum_of_sines():
    series = sine_data.sine_series(
        200, frequencies=(0.5, 2.0), amplitudes=(1.0, 0.25), phases=(0.0, 1.0), noise_std=0.0, dt=0.05
    )
    t = np.arange(200) * 0.05
    expected = np.sin(2 * np.pi * 0.5 * t) + 0.25 * np.sin(2 * np.pi * 2.0 * t + 1.0)
    assert series.shape == (200,) and series.dtype == np.float32
    np.testing.assert_allclose(series, expected, atol=1e-6)


def test_noise_has_the_requested_scale_and_the_seed_fixes_everything():
    clean = sine_data.sine_series(20_000, frequencies=(0.1,), phases=(0.0,))
    noisy = sine_data.sine_series(20_000, frequencies=(0.1,), phases=(0.0,), noise_std=0.3, seed=1)
    np.testing.assert_allclose(np.std(noisy - clean), 0.3, rtol=0.03)
    np.testing.assert_array_equal(noisy, sine_data.sine_series(20_000, frequencies=(0.1,), phases=(0.0,),
                                                               noise_std=0.3, seed=1))
    assert not np.array_equal(sine_data.sine_series(50, seed=0), sine_data.sine_series(50, seed=1))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_points=0), "num_points"),
        (dict(num_points=10, frequencies=()), "frequencies"),
        (dict(num_points=10, frequencies=(1.0, 2.0), amplitudes=(1.0,)), "amplitudes"),
        (dict(num_points=10, noise_std=-1.0), "noise_std"),
    ],
)
def test_bad_series_arguments_raise(kwargs, message):
    num_points = kwargs.pop("num_points")
    with pytest.raises(ValueError, match=message):
        sine_data.sine_series(num_points, **kwargs)


def test_windows_and_next_values():
    series = np.arange(10, dtype=np.float32)
    inputs, targets = sine_data.make_windows(series, 4)
    assert inputs.shape == (6, 4, 1) and targets.shape == (6,)
    for i in range(6):
        np.testing.assert_array_equal(inputs[i, :, 0], series[i : i + 4])
        assert targets[i] == series[i + 4]
    with pytest.raises(ValueError, match="no window"):
        sine_data.make_windows(series, 10)


def test_splits_are_contiguous_and_cover_the_series():
    series = np.arange(100, dtype=np.float32)
    splits = sine_data.split_series(series, (0.7, 0.2, 0.1))
    assert [len(splits[name]) for name in sine_data.SPLITS] == [70, 20, 10]
    np.testing.assert_array_equal(np.concatenate([splits[name] for name in sine_data.SPLITS]), series)
    with pytest.raises(ValueError, match="fractions"):
        sine_data.split_series(series, (0.5, 0.5))


def tiny_config(**overrides):
    config = sine.get_config()
    config.update(dict(num_points=700, window=12, num_units=8, batch_size=16, eval_batch_size=32, num_steps=30,
                       warmup_steps=5, learning_rate=1e-2, log_every_steps=10, checkpoint_every_steps=15,
                       progress_bar=False))
    config.update(overrides)
    return config


def perturbed(params):
    """`params` with every leaf moved off its initial value (the zero biases too)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    return jax.tree.unflatten(treedef, [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("sine"))
    return workdir, sine.run(tiny_config(), workdir)


def test_training_reports_rmse_and_plots_predictions(trained_run):
    workdir, results = trained_run
    with open(os.path.join(workdir, "results.json")) as f:
        written = json.load(f)
    assert written == results
    assert written["steps"] == 30
    for split in ("val", "test"):
        np.testing.assert_allclose(written[f"{split}_rmse"], math.sqrt(written[f"{split}_loss"]))
    assert written["test_rmse"] < 1.0  # the series' standard deviation is about 0.8
    for name in ("predictions.png", "curves.png"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0


def test_resume_and_eval(trained_run):
    workdir, _ = trained_run
    assert sine.run(tiny_config(num_steps=40), workdir, resume=True)["steps"] == 40
    results = sine.run(tiny_config(num_steps=40), workdir, mode="eval")
    assert results["step"] == 40
    np.testing.assert_allclose(results["test_rmse"], math.sqrt(results["test_loss"]))
    with pytest.raises(ValueError, match="--mode=train|eval"):
        sine.run(tiny_config(), workdir, mode="sample")


def test_eval_uses_the_trained_config_not_the_given_one(trained_run):
    """The window, width and series of the run's config.json, whatever `config` says
    (launch.py refuses differing overrides); eval-only fields come from `config`."""
    workdir, _ = trained_run
    given = sine.get_config()  # window 50, 32 units, 10000 points: all unlike the trained run
    given.update(eval_batch_size=7, progress_bar=False)
    default = sine.run(given, workdir, mode="eval")
    np.testing.assert_allclose(default["test_rmse"], sine.run(tiny_config(), workdir, mode="eval")["test_rmse"])


def test_series_fields_reach_the_generator():
    splits = sine.make_splits(tiny_config(frequencies="0.2", amplitudes="", noise_std=0.0, split_fractions="0.5,0.25,0.25"))
    assert len(splits["train"]) == 350
    assert np.max(np.abs(splits["train"])) <= 1.0 + 1e-6
    with pytest.raises(ValueError, match="config.frequencies"):
        sine.make_splits(tiny_config(frequencies="0.2,fast"))
    with pytest.raises(ValueError, match="config.frequencies must list at least one frequency.*got ''"):
        sine.make_splits(tiny_config(frequencies=""))


def test_prediction_is_the_dense_layer_on_the_lstm_output_after_the_last_value():
    """Against the float64 NumPy LSTM of `numpy_reference`."""
    config = tiny_config()
    model = sine.build_model(config)
    params = perturbed(model.init(jax.random.PRNGKey(0)))
    windows = np.random.default_rng(0).normal(size=(3, config.window, 1)).astype(np.float32)
    lstm, out = ref.to_float64(params["lstm"]), ref.to_float64(params["out"])
    zero = np.zeros(config.num_units)
    expected = [ref.run(ref.lstm_step, lstm, (zero, zero), window)[1][-1] @ out["w"] + out["b"] for window in windows]
    np.testing.assert_allclose(model.predict(params, windows), np.concatenate(expected), rtol=1e-4, atol=1e-5)


def test_only_process_0_writes_files(tmp_path, monkeypatch):
    """As another process of a multi-process run: results, plots and eval results are
    left to process 0 (orbax's checkpoints are written together)."""
    from rnnlab import distributed

    monkeypatch.setattr(distributed, "is_main_process", lambda: False)
    sine.run(tiny_config(num_steps=4, checkpoint_every_steps=0), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoints"]


@pytest.mark.parametrize("field, value, allowed", [
    ("unroll", 0, "a positive integer"),
    ("window", 0, "a positive integer"),
    ("num_units", -1, "a positive integer"),
    ("dt", 0.0, "a finite number > 0"),
    ("dt", float("nan"), "a finite number > 0"),
    ("noise_std", float("nan"), "a finite number >= 0"),
    ("series_seed", -1, "an integer >= 0"),
])
def test_bad_fields_fail_before_the_workdir_is_written(field, value, allowed, tmp_path):
    message = rf"^config\.{field} must be {re.escape(allowed)}, got {re.escape(repr(value))}\.$"
    with pytest.raises(ValueError, match=message):
        sine.run(tiny_config(**{field: value}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
