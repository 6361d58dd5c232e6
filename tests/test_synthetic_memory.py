"""Tests of the synthetic long-memory tasks: the adding and copy_memory experiments."""

from __future__ import annotations

import json
import math
import os
import re

import jax
import numpy as np
import pytest

from experiments import synthetic_memory as memory


def test_adding_examples_mark_one_step_in_each_half_and_sum_the_marked_values():
    for seq_len in (2, 7, 50):  # the shortest, an odd length, an even one
        data = memory.adding_examples(400, seq_len, np.random.default_rng(seq_len))
        inputs, target = data["inputs"], data["target"]
        assert inputs.shape == (400, seq_len, 2) and inputs.dtype == np.float32
        assert target.shape == (400,) and target.dtype == np.float32
        values, markers = inputs[..., 0], inputs[..., 1]
        assert np.all((0.0 <= values) & (values < 1.0))
        half = seq_len // 2
        for row in range(400):
            marked = np.flatnonzero(markers[row])
            assert set(np.unique(markers[row])) <= {0.0, 1.0} and len(marked) == 2
            assert marked[0] < half <= marked[1] < seq_len
            assert target[row] == np.float32(sum(float(values[row, t]) for t in marked))
        if seq_len == 50:  # every position of each half is drawn
            assert len(set(np.flatnonzero(markers.any(axis=0)))) == seq_len


def test_copy_examples_follow_arjovskys_layout():
    delay, symbols, length = 13, 8, 10
    data = memory.copy_examples(300, delay, np.random.default_rng(0))
    inputs, targets = data["inputs"], data["targets"]
    assert inputs.shape == targets.shape == (300, delay + 20)
    assert inputs.dtype == targets.dtype == np.int32
    first = inputs[:, :length]
    assert np.all((1 <= first) & (first <= symbols)) and set(np.unique(first)) == set(range(1, 9))
    np.testing.assert_array_equal(inputs[:, length:length + delay - 1], 0)  # T - 1 blanks
    np.testing.assert_array_equal(inputs[:, length + delay - 1], symbols + 1)  # the delimiter
    np.testing.assert_array_equal(inputs[:, length + delay:], 0)  # 10 more blanks
    np.testing.assert_array_equal(targets[:, :delay + length], 0)
    np.testing.assert_array_equal(targets[:, -length:], first)


@pytest.mark.parametrize("generate", [
    lambda n, rng: memory.adding_examples(n, 9, rng),
    lambda n, rng: memory.copy_examples(n, 5, rng, num_symbols=3, copy_length=4),
], ids=["adding", "copy"])
def test_the_seed_fixes_the_examples_and_a_smaller_set_is_a_prefix(generate):
    data = generate(50, np.random.default_rng(3))
    for name, values in data.items():
        np.testing.assert_array_equal(values, generate(50, np.random.default_rng(3))[name])
        np.testing.assert_array_equal(values[:20], generate(20, np.random.default_rng(3))[name])
        assert not np.array_equal(values, generate(50, np.random.default_rng(4))[name])


def test_the_splits_are_fixed_by_data_seed_and_differ_from_each_other():
    config = tiny_config("copy_memory")
    problem = memory.PROBLEMS["copy_memory"]
    splits = {split: memory.make_split(problem, config, split)["inputs"] for split in memory.SPLIT_STREAMS}
    assert [len(splits[split]) for split in ("train", "val", "test")] == [64, 16, 24]
    np.testing.assert_array_equal(splits["val"], memory.make_split(problem, config, "val")["inputs"])
    assert not np.array_equal(splits["val"], splits["test"][:16])
    assert not np.array_equal(splits["train"][:16], splits["val"])
    config.data_seed = 1
    assert not np.array_equal(splits["test"], memory.make_split(problem, config, "test")["inputs"])


def test_the_baselines_match_their_closed_forms_on_generated_data():
    target = memory.adding_examples(20_000, 10, np.random.default_rng(0))["target"]
    assert abs(np.mean((target - 1.0) ** 2) - memory.adding_baseline_loss()) < 0.006  # 4 standard errors
    assert memory.adding_baseline_loss() == pytest.approx(1 / 6)

    delay, symbols, length = 30, 5, 6
    targets = memory.copy_examples(200, delay, np.random.default_rng(0), symbols, length)["targets"]
    # Blanks for sure, then the uniform distribution over the symbols at the recall steps.
    probabilities = np.zeros(targets.shape + (symbols + 1,))
    probabilities[:, :-length, 0] = 1.0
    probabilities[:, -length:, 1:] = 1.0 / symbols
    picked = np.take_along_axis(probabilities, targets[..., None], axis=-1)[..., 0]
    assert np.mean(-np.log(picked)) == pytest.approx(memory.copy_baseline_loss(delay, symbols, length))
    assert memory.copy_baseline_loss(100) == pytest.approx(10 * math.log(8) / 120)


def tiny_config(name, **overrides):
    config = memory.get_config(name)
    config.update(dict(num_units=8, batch_size=8, eval_batch_size=16, num_steps=6, warmup_steps=1,
                       log_every_steps=3, eval_every_steps=0, checkpoint_every_steps=3, progress_bar=False,
                       num_train_examples=64, num_val_examples=16, num_test_examples=24, state_size=4))
    config.update({"seq_len": 6} if name == "adding" else {"delay": 4, "copy_length": 3})
    with config.ignore_type():  # ill-typed values too, for the checks
        config.update(overrides)
    return config


@pytest.mark.parametrize("cell", memory.CELL_TYPES)
def test_every_cell_gives_one_output_per_step_and_the_linear_ones_the_same_by_associative_scan(cell):
    config = tiny_config("copy_memory", cell=cell, num_layers=2)
    model = memory.build_model(config, 5, 3)
    params = model.init(jax.random.PRNGKey(0))
    inputs = np.random.default_rng(0).normal(size=(2, 7, 5)).astype(np.float32)
    outputs = model.apply(params, inputs)
    assert outputs.shape == (2, 7, 3) and np.all(np.isfinite(outputs))
    if cell in memory.LINEAR_CELLS:
        config.unroll_method = "associative"
        np.testing.assert_allclose(memory.build_model(config, 5, 3).apply(params, inputs), outputs,
                                   rtol=1e-5, atol=1e-6)


def check_training_results(workdir, results, name, metric):
    with open(workdir / "results.json") as f:
        assert json.load(f) == results
    assert results["steps"] == 6
    assert results["baseline_loss"] == memory.PROBLEMS[name].baseline_loss(tiny_config(name))
    assert {"val_loss", "test_loss", f"val_{metric}", f"test_{metric}"} <= set(results)
    assert 0.0 <= results[f"test_{metric}"] <= 1.0
    assert os.path.getsize(workdir / "curves.png") > 0


@pytest.fixture(scope="module")
def trained_adding(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("adding")
    return workdir, memory.run(tiny_config("adding"), str(workdir), name="adding")


def test_adding_reports_the_squared_error_the_fraction_within_tolerance_and_the_baseline(trained_adding):
    check_training_results(*trained_adding, "adding", "within_tolerance")


def test_copy_memory_reports_the_cross_entropy_the_recall_accuracy_and_the_baseline(tmp_path):
    results = memory.run(tiny_config("copy_memory", cell="min_gru"), str(tmp_path), name="copy_memory")
    check_training_results(tmp_path, results, "copy_memory", "accuracy")


def test_resume_and_eval_take_the_model_and_data_from_the_trained_config(trained_adding):
    """For both experiments: their `run` differs only in the problem."""
    workdir, _ = trained_adding
    assert memory.run(tiny_config("adding", num_steps=8), str(workdir), resume=True, name="adding")["steps"] == 8
    given = memory.get_config("adding")  # seq_len 100, 64 units...: config.json's values count
    given.update(num_test_examples=24, progress_bar=False)  # eval may change these
    evaluated = memory.run(given, str(workdir), mode="eval", name="adding")
    with open(workdir / "results.json") as f:
        trained = json.load(f)
    assert evaluated["step"] == 8 and evaluated["baseline_loss"] == 1 / 6
    assert evaluated["test_loss"] == pytest.approx(trained["test_loss"], rel=1e-5)
    with open(workdir / "eval_results.json") as f:
        assert json.load(f) == evaluated
    with pytest.raises(ValueError, match=r"--mode=train\|eval"):
        memory.run(tiny_config("adding"), str(workdir), mode="sample", name="adding")


@pytest.mark.parametrize("name, field, value, allowed", [
    ("adding", "cell", "lstmm", None),
    ("adding", "unroll_method", "associative", None),
    ("adding", "num_units", 0, "a positive integer"),
    ("adding", "num_layers", -1, "a positive integer"),
    ("adding", "num_test_examples", 0, "a positive integer"),
    ("adding", "seq_len", 1, "an integer >= 2 (a marker in each half)"),
    ("adding", "tolerance", float("nan"), "a finite number > 0"),
    ("adding", "data_seed", -1, "an integer >= 0"),
    ("copy_memory", "delay", 0, "a positive integer"),
    ("copy_memory", "num_symbols", 0, "a positive integer"),
    ("copy_memory", "copy_length", 1.5, "a positive integer"),
])
def test_bad_fields_fail_with_one_line_before_the_workdir_is_written(name, field, value, allowed, tmp_path):
    if allowed is None:
        message = rf"^config\.{field}\b.*{re.escape(repr(value))}"
    else:
        message = rf"^config\.{field} must be {re.escape(allowed)}, got {re.escape(repr(value))}\.$"
    with pytest.raises(ValueError, match=message) as raised:
        memory.run(tiny_config(name, **{field: value}), str(tmp_path / "run"), name=name)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "run").exists()
