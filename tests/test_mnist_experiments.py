"""Every registered MNIST experiment end to end on tiny generated IDX data."""

from __future__ import annotations

import json
import re
import shutil

import jax
import numpy as np
import numpy_reference as ref
import pytest
from matplotlib.colors import to_hex

from data_fixtures import write_mnist_idx
from experiments import mnist, registry
from rnnlab import plots, train

MNIST_EXPERIMENTS = sorted(mnist.EXPERIMENTS)
RESULT_KEYS = {"steps", "planned_steps", "epochs", "train_seconds", "num_params", "stop_reason", "devices", "test_loss", "test_accuracy"}


def tiny(config, **overrides):
    """`config` shrunk to a few steps of a width-8 model."""
    config.update(dict(num_units="8", batch_size=16, eval_batch_size=16, num_steps=3, warmup_steps=1,
                       log_every_steps=1, checkpoint_every_steps=0, reading_digits=1, progress_bar=False))
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_mnist_idx(str(directory), num_train=64, num_test=20)
    return str(directory)


def perturbed(params):
    """`params` with every leaf moved off its initial value (the zero biases too)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    return jax.tree.unflatten(treedef, [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def numpy_lstm_output(params, xs):
    """The float64 NumPy LSTM's output after reading `xs: [T, I]` from a zero state."""
    params = ref.to_float64(params)
    zero = np.zeros(params["w_h"].shape[0])
    _, outputs = ref.run(ref.lstm_step, params, (zero, zero), xs)
    return outputs[-1]


def test_all_mnist_experiments_are_registered():
    assert set(MNIST_EXPERIMENTS) == {
        "lstm_mnist", "gru_mnist", "bilstm_mnist", "lstm3_mnist", "gru3_mnist", "lstm_gru_mnist", "bilstm3_mnist",
    }
    assert set(MNIST_EXPERIMENTS) <= set(registry.names())


@pytest.mark.parametrize("name", MNIST_EXPERIMENTS)
def test_experiment_trains_end_to_end(name, data_dir, tmp_path):
    experiment = registry.get(name)
    results = experiment.run(tiny(experiment.get_config()), str(tmp_path), mode="train", data_dir=data_dir)
    assert RESULT_KEYS <= set(results) and results["steps"] == 3
    assert json.loads((tmp_path / "results.json").read_text()) == pytest.approx(results)
    for plot in ("curves.png", "reading.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if name == "bilstm_mnist":  # eval mode reproduces the final test figures from the checkpoint
        evaluated = experiment.run(tiny(experiment.get_config()), str(tmp_path), mode="eval", data_dir=data_dir)
        assert evaluated["step"] == 3
        assert evaluated["test_accuracy"] == pytest.approx(results["test_accuracy"])
        assert evaluated["test_loss"] == pytest.approx(results["test_loss"], rel=1e-5)


def test_unsupported_mode_is_refused(data_dir, tmp_path):
    with pytest.raises(ValueError, match="--mode=train|eval"):
        mnist.run(tiny(mnist.get_config()), str(tmp_path), mode="sample", data_dir=data_dir)


def test_static_and_scan_unroll_give_the_same_loss(data_dir):
    """Same params, same batch: the Python-loop unroll equals `lax.scan`."""
    batch = mnist.load_split("test", data_dir, None)
    losses = {}
    for method in ("scan", "static"):
        config = tiny(mnist.get_config("lstm"), unroll_method=method)
        task, _ = mnist.make_task(config)
        params = task.init_params(jax.random.PRNGKey(0))
        losses[method] = float(jax.jit(lambda p, b: task.loss(p, None, b, None)[0])(params, batch))
    assert losses["static"] == pytest.approx(losses["scan"], rel=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_reading_after_the_last_row_is_the_prediction(bidirectional, data_dir):
    """The reading figure's last panel is the classifier's output on the whole image."""
    config = tiny(mnist.get_config("lstm", bidirectional=bidirectional))
    model = mnist.build_model(config)
    params = model.init(jax.random.PRNGKey(1))
    images = mnist.load_split("test", data_dir, None)["image"][:3]
    probabilities = mnist.reading_probabilities(model, params, images)
    assert probabilities.shape == (3, 28, 10)
    full = jax.nn.softmax(model.logits(params, images))
    np.testing.assert_allclose(probabilities[:, -1], full, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_logits_are_those_of_a_numpy_lstm_reading_one_row_per_step(bidirectional):
    """Step t reads image row t (28 pixels in [0, 1]); the classifier reads the forward
    LSTM's output after row 27 and, when bidirectional, the backward LSTM's after it has
    read rows 27 down to 0."""
    model = mnist.build_model(tiny(mnist.get_config("lstm", bidirectional=bidirectional)))
    params = perturbed(model.init(jax.random.PRNGKey(0)))
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    logits = np.asarray(model.logits(params, images))
    head = ref.to_float64(params["classifier"])
    for b, image in enumerate(images):
        rows = image / 255.0
        if bidirectional:
            (layer,) = params["rnn"]
            forward, backward = numpy_lstm_output(layer["fw"], rows), numpy_lstm_output(layer["bw"], rows[::-1])
            features = np.concatenate([forward, backward])
        else:
            features = numpy_lstm_output(params["rnn"], rows)
        np.testing.assert_allclose(logits[b], features @ head["w"] + head["b"], rtol=1e-4, atol=1e-5)


def test_reading_figure_colours_the_true_class_green_also_when_it_is_predicted(tmp_path, monkeypatch):
    """Each panel's bars: the true class green, another arg-max orange, the rest blue."""
    figures, close = [], plots.plt.close

    def keep_and_close(figure):
        figures.append(figure)
        close(figure)

    monkeypatch.setattr(plots.plt, "close", keep_and_close)
    probabilities = np.full((1, 2, 10), 0.05)
    probabilities[0, 0, 3] = 0.55  # after row 1 the true class 3 is the arg-max
    probabilities[0, 1, 7] = 0.55  # after row 2 class 7 is
    plots.plot_reading(np.zeros((1, 28, 28)), np.array([3]), probabilities, str(tmp_path / "reading.png"))
    (figure,) = figures
    names = {to_hex(name): name.removeprefix("tab:") for name in ("tab:blue", "tab:green", "tab:orange")}
    _, row_1, row_2 = figure.axes  # the image, then one bar chart per row read
    colours = [[names[to_hex(bar.get_facecolor())] for bar in axis.patches] for axis in (row_1, row_2)]
    assert colours[0] == ["blue"] * 3 + ["green"] + ["blue"] * 6
    assert colours[1] == ["blue"] * 3 + ["green"] + ["blue"] * 3 + ["orange"] + ["blue"] * 2


def test_shift_images_moves_pixels_and_pads_with_zeros():
    images = np.zeros((64, 6, 6), np.uint8)
    images[:, 2, 3] = 255
    shifted = np.asarray(mnist.shift_images(jax.random.PRNGKey(0), images, 1))
    assert shifted.shape == images.shape and shifted.dtype == np.uint8
    assert (shifted == 255).sum(axis=(1, 2)).tolist() == [1] * 64
    rows, cols = np.nonzero(shifted == 255)[1:]
    assert set(rows) == {1, 2, 3} and set(cols) == {2, 3, 4}
    assert np.array_equal(np.asarray(mnist.shift_images(jax.random.PRNGKey(0), images, 0)), images)


def test_classification_task_shifts_training_images_only():
    """The task's loss sees shifted images in training (rng given) and the images
    themselves in evaluation; a model that reads one pixel tells them apart."""
    images = np.zeros((32, 6, 6), np.uint8)
    images[:, 2, 3] = 255
    batch = {"image": images, "label": np.zeros(32, np.int32)}

    def logits(params, images, lengths=None, rng=None):
        del params, lengths, rng
        return np.float32(10.0) * jax.numpy.stack([images[:, 2, 3] / 255.0, 1.0 - images[:, 2, 3] / 255.0], axis=1)

    model = mnist.Model(init=lambda key: {}, logits=logits)
    for shift in (0, 1):
        task = mnist.classification_task(model, shift)
        _, (_, evaluated) = task.loss({}, None, batch, None)
        _, (_, trained) = task.loss({}, None, batch, jax.random.PRNGKey(0))
        assert np.asarray(evaluated["accuracy"]).tolist() == [1.0] * 32
        moved = np.asarray(trained["accuracy"]) == 0.0  # the pixel left (2, 3)
        assert moved.any() == bool(shift) and not moved.all()


def test_bad_model_config_raises_one_line_errors():
    with pytest.raises(ValueError, match="unknown cell type 'lsmt'"):
        mnist.build_model(tiny(mnist.get_config("lstm,lsmt")))
    with pytest.raises(ValueError, match="2 widths for 3 layers"):
        mnist.build_model(tiny(mnist.get_config("lstm,lstm,lstm"), num_units="8,8"))


def test_resume_through_the_experiment_continues_exactly(data_dir, tmp_path):
    """LSTM with dropout and augmentation: 4 steps, stop, 3 more == 7 uninterrupted."""
    config = tiny(mnist.get_config("lstm"), num_steps=7, checkpoint_every_steps=4,
                  dropout_keep=0.8, augment_shift=2, reading_digits=0)
    task, _ = mnist.make_task(config)
    data = mnist.load_split("train", data_dir, None)
    reference = train.train(task, config, str(tmp_path / "ref"), data)

    shutil.copytree(tmp_path / "ref", tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "7")  # as if stopped after step 4
    resumed = train.train(task, config, str(tmp_path / "cut"), data, resume=True)
    assert int(resumed.state.step) == 7
    jax.tree.map(np.testing.assert_array_equal, resumed.state.params, reference.state.params)
    jax.tree.map(np.testing.assert_array_equal, resumed.state.opt_state, reference.state.opt_state)


@pytest.fixture
def no_data(monkeypatch):
    """Fails a test that reads MNIST: the config checks come first."""
    def load_split(*args, **kwargs):
        raise AssertionError("data was loaded before the config was checked")
    monkeypatch.setattr(mnist, "load_split", load_split)


@pytest.mark.parametrize("field, value", [("dropout_keep", 1.5), ("dropout_keep", 0.0), ("dropout_keep", float("nan")),
                                          ("unroll_method", "associative"), ("unroll", 0), ("augment_shift", -1),
                                          ("reading_digits", -2)])
def test_bad_fields_fail_before_data_or_workdir(field, value, no_data, tmp_path):
    config = tiny(mnist.get_config("lstm"), **{field: value})
    with pytest.raises(ValueError, match=rf"^config\.{field} must be .*, got {re.escape(repr(value))}\.$"):
        mnist.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_eval_checks_its_command_line_fields(no_data, tmp_path):
    """`reading_digits` comes from the command line in eval mode: checked before the
    checkpoint is read (here there is none, only the run's config.json)."""
    train.write_json(str(tmp_path / "config.json"), tiny(mnist.get_config("lstm")).to_dict())
    with pytest.raises(ValueError, match="config.reading_digits must be an integer >= 0 .*got -2"):
        mnist.run(tiny(mnist.get_config("lstm"), reading_digits=-2), str(tmp_path), mode="eval")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["config.json"]
