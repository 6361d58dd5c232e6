"""The pixel MNIST experiments end to end on tiny generated IDX data, with 16-step
sequences (`pixel_stride=49`), and the permutation they read the pixels in."""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import numpy_reference as ref
import pytest

from data_fixtures import write_mnist_idx
from rnnlab.checkpoint import CheckpointError
from experiments import linear_blocks, mnist, pixel_mnist, registry

PIXEL_EXPERIMENTS = sorted(pixel_mnist.EXPERIMENTS)


def tiny(config, **overrides):
    """`config` shrunk to a few steps of a width-8, one-block model on 16 pixels."""
    if "num_layers" in config:  # the linear stack's
        config.update(dict(state_size=4, num_layers=1))
    config.update(dict(num_units=8, pixel_stride=49, batch_size=16, eval_batch_size=16, num_steps=3, warmup_steps=1,
                       log_every_steps=1, checkpoint_every_steps=0, time_budget_s=0.0, progress_bar=False))
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    write_mnist_idx(str(directory), num_train=32, num_test=20)
    return str(directory)


def perturbed(params):
    """`params` with every leaf moved off its initial value (zero biases, LayerNorm gains of one)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), len(leaves))
    return jax.tree.unflatten(treedef, [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])


def gelu(v):
    """`jax.nn.gelu`'s default, the tanh approximation."""
    return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))


def test_pixel_experiments_are_registered():
    assert {"lstm_pixel_mnist", "lru_pixel_mnist", "lru_ppixel_mnist"} <= set(PIXEL_EXPERIMENTS)
    assert set(PIXEL_EXPERIMENTS) <= set(registry.names())
    assert pixel_mnist.get_config().time_budget_s == 1680  # + the final evaluation: 30 min


@pytest.mark.parametrize("name", PIXEL_EXPERIMENTS)
def test_experiment_trains_end_to_end(name, data_dir, tmp_path):
    experiment = registry.get(name)
    config = tiny(experiment.get_config())
    results = experiment.run(config, str(tmp_path), mode="train", data_dir=data_dir)
    assert results["steps"] == 3 and 0.0 <= results["test_accuracy"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text()) == pytest.approx(results)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "permutation.json").exists() == config.permuted, "written for permuted runs only"
    if config.permuted:
        written = json.loads((tmp_path / "permutation.json").read_text())
        assert written["order"] == pixel_mnist.pixel_order(config).tolist()
    if name == "lstm_pixel_mnist":  # eval reads its config.json, also one with the LRU fields older versions wrote
        trained = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps(dict(trained, state_size=64, num_layers=3, dropout=0.0)))
        evaluated = experiment.run(config, str(tmp_path), mode="eval", data_dir=data_dir)
        assert evaluated["test_loss"] == pytest.approx(results["test_loss"], rel=1e-5)
    if name == "lru_ppixel_mnist":  # eval mode reproduces the final test figures
        evaluated = experiment.run(config, str(tmp_path), mode="eval", data_dir=data_dir)
        assert evaluated["step"] == 3
        assert evaluated["test_loss"] == pytest.approx(results["test_loss"], rel=1e-5)
        # The default pixel order on the command line: eval still reads the trained one.
        default_order = experiment.run(tiny(experiment.get_config(), permutation_seed=5, pixel_stride=1),
                                       str(tmp_path), mode="eval", data_dir=data_dir)
        assert default_order["test_loss"] == pytest.approx(results["test_loss"], rel=1e-5)
        # A refused re-run (the workdir holds checkpoints) leaves permutation.json alone.
        with pytest.raises(CheckpointError, match="already holds checkpoints"):
            experiment.run(tiny(experiment.get_config(), permutation_seed=5), str(tmp_path), data_dir=data_dir)
        assert json.loads((tmp_path / "permutation.json").read_text()) == written


def test_permutation_is_fixed_by_its_seed():
    config = pixel_mnist.get_config(permuted=True)
    order = pixel_mnist.pixel_order(config)
    assert sorted(order.tolist()) == list(range(784))
    assert np.array_equal(order, pixel_mnist.pixel_order(pixel_mnist.get_config(permuted=True)))
    config.permutation_seed = 1
    assert not np.array_equal(order, pixel_mnist.pixel_order(config))
    assert np.array_equal(pixel_mnist.pixel_order(pixel_mnist.get_config()), np.arange(784))


def test_permutation_is_applied_to_the_pixels():
    config = pixel_mnist.get_config(permuted=True)
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28), dtype=np.uint8)
    sequences = np.asarray(pixel_mnist.pixel_sequences(images, pixel_mnist.pixel_order(config)))
    assert sequences.shape == (2, 784, 1)
    order = np.random.default_rng(config.permutation_seed).permutation(784)
    np.testing.assert_allclose(sequences[..., 0], images.reshape(2, 784)[:, order] / 255.0, rtol=1e-6)
    strided = pixel_mnist.pixel_order(tiny(config))
    np.testing.assert_array_equal(strided, order[::49])


@pytest.mark.parametrize("cell", ["lru", "min_gru"])
def test_associative_and_scan_unroll_give_the_same_loss(cell, data_dir):
    """Same params, same batch, 196 steps: `associative_scan` equals `lax.scan`."""
    batch = mnist.load_split("test", data_dir, None)
    losses = {}
    for method in ("associative", "scan"):
        config = tiny(pixel_mnist.get_config(cell, permuted=True), pixel_stride=4, unroll_method=method)
        task, _ = pixel_mnist.make_task(config)
        params = task.init_params(jax.random.PRNGKey(0))
        losses[method] = float(jax.jit(lambda p, b: task.loss(p, None, b, None)[0])(params, batch))
    assert losses["associative"] == pytest.approx(losses["scan"], rel=1e-5)


def test_linear_stack_matches_a_numpy_reference():
    """encoder -> 2 x [x + GLU(GELU(minGRU(LayerNorm(x))))] -> mean over time -> classifier,
    in float64 NumPy from the equations."""
    config = tiny(pixel_mnist.get_config("min_gru", permuted=True), num_layers=2)
    model = pixel_mnist.build_model(config)
    params = perturbed(model.init(jax.random.PRNGKey(0)))
    images = np.random.default_rng(1).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    logits = np.asarray(model.logits(params, images))

    p = jax.tree.map(lambda leaf: np.asarray(leaf, np.float64), params)
    width = config.num_units
    order = np.random.default_rng(config.permutation_seed).permutation(784)[::49]
    x = (images.reshape(3, 784)[:, order] / 255.0)[..., None] @ p["encoder"]["w"] + p["encoder"]["b"]  # [B, T, H]
    for block in p["blocks"]:
        normed = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + ref.LAYER_NORM_EPSILON)
        normed = normed * block["norm"]["scale"] + block["norm"]["bias"]
        z = normed @ block["cell"]["w_x"] + block["cell"]["b"]
        k, candidate = z[..., :width], z[..., width:]
        # minGRU: h_t = a_t h_{t-1} + b_t with a = σ(-k), b = σ(k)·g(candidate)
        a = ref.sigmoid(-k)
        b = ref.sigmoid(k) * np.where(candidate >= 0, candidate + 0.5, ref.sigmoid(candidate))
        h, ys = np.zeros((3, width)), []
        for t in range(x.shape[1]):
            h = a[:, t] * h + b[:, t]
            ys.append(h)
        y = gelu(np.stack(ys, 1))
        value = y @ block["glu_value"]["w"] + block["glu_value"]["b"]
        x = x + value * ref.sigmoid(y @ block["glu_gate"]["w"] + block["glu_gate"]["b"])
    expected = x.mean(1) @ p["classifier"]["w"] + p["classifier"]["b"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)


def test_block_dropout_is_inverted_dropout():
    dropped = np.asarray(linear_blocks.dropout(jax.random.PRNGKey(0), 0.25, np.ones(50_000, np.float32)))
    np.testing.assert_allclose(np.unique(dropped), [0.0, 1 / 0.75], rtol=1e-6)
    assert dropped.mean() == pytest.approx(1.0, abs=0.02)  # the expectation is kept


def test_recurrent_params_are_stored_scaled():
    """ν, θ, γ are stored divided by `recurrent_lr_factor`; the model sees the same LRU."""
    batch = {"image": np.full((2, 28, 28), 100, np.uint8), "label": np.array([1, 2], np.int32)}
    nu_logs, losses = [], []
    for factor in (1.0, 0.25):
        task, _ = pixel_mnist.make_task(tiny(pixel_mnist.get_config("lru"), recurrent_lr_factor=factor))
        params = task.init_params(jax.random.PRNGKey(0))
        nu_logs.append(params["blocks"][0]["cell"]["nu_log"] * factor)
        losses.append(float(task.loss(params, None, batch, None)[0]))
    np.testing.assert_allclose(nu_logs[0], nu_logs[1], rtol=1e-6)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_unknown_cell_is_refused():
    with pytest.raises(ValueError, match="unknown cell type 'gru'"):
        pixel_mnist.build_model(pixel_mnist.get_config("gru"))


def test_the_lstm_config_has_only_the_fields_it_uses():
    lstm_fields = set(pixel_mnist.get_config("lstm"))
    assert not lstm_fields & {"state_size", "num_layers", "r_min", "r_max", "max_phase", "recurrent_lr_factor",
                              "dropout"}
    assert lstm_fields < set(pixel_mnist.get_config("lru"))
    config = tiny(pixel_mnist.get_config("lstm"), cell="lru")
    with pytest.raises(ValueError, match="config.cell='lru' needs the linear stack's fields.*lru_pixel_mnist"):
        pixel_mnist.check_config(config)


@pytest.fixture
def no_data(monkeypatch):
    """Fails a test that reads MNIST: the config checks come first."""
    def load_split(*args, **kwargs):
        raise AssertionError("data was loaded before the config was checked")
    monkeypatch.setattr(mnist, "load_split", load_split)


@pytest.mark.parametrize("name, field, value, allowed", [
    ("lru_ppixel_mnist", "dropout", 1.5, "a drop rate in [0, 1)"),
    ("lru_ppixel_mnist", "dropout", -0.5, "a drop rate in [0, 1)"),
    ("lru_pixel_mnist", "unroll_method", "foo", "one of 'auto', 'associative', 'scan', 'static' for cell 'lru'"),
    ("lstm_pixel_mnist", "unroll_method", "associative", "one of 'auto', 'scan', 'static' for cell 'lstm'"),
    ("lru_pixel_mnist", "num_test_examples", -5, "an integer >= 0 (0: all)"),
    ("lstm_pixel_mnist", "num_test_examples", -5, "an integer >= 0 (0: all)"),
    ("min_gru_ppixel_mnist", "num_layers", 0, "a positive integer"),
    ("lru_pixel_mnist", "recurrent_lr_factor", 0.0, "a finite number > 0"),
    ("lstm_pixel_mnist", "augment_shift", -1, "an integer >= 0"),
    ("lru_ppixel_mnist", "permutation_seed", -1, "an integer >= 0"),
])
def test_bad_fields_fail_before_data_or_workdir(name, field, value, allowed, no_data, tmp_path):
    experiment = registry.get(name)
    config = tiny(experiment.get_config(), progress_bar=True, **{field: value})
    message = rf"^config\.{field} must be {re.escape(allowed)}.*, got {re.escape(repr(value))}\.$"
    with pytest.raises(ValueError, match=message):
        experiment.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
