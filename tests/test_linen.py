"""`rnnlab.linen`: rnnlab cells inside `flax.linen` models."""

from __future__ import annotations

import sys
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rnnlab
from rnnlab.cells.gru import gru
from rnnlab.cells.lstm import lstm
from rnnlab.cells.rnn import basic_rnn
from rnnlab.linen import RNN, Bidirectional, uses_randomness
from test_unroll import assert_trees_equal

B, T, I = 3, 6, 4
LENGTHS = jnp.array([6, 2, 0])


def inputs(seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), (B, T, I))


MODULE_CASES = pytest.mark.parametrize(
    "cell_factory, options",
    [
        (lambda: lstm(5, peepholes=True, num_proj=3), dict(method="scan", unroll=2)),
        (lambda: rnnlab.stack([lstm(5), gru(4)]), dict(method="static", reverse=True)),
    ],
    ids=["lstm_scan_unroll2", "stack_static_reverse"],
)
"""Cells and unroll options the Flax modules (linen here, NNX in test_nnx) are checked with."""


@MODULE_CASES
def test_rnn_module_equals_rnnlab_unroll_with_the_same_params(cell_factory, options: dict[str, Any]) -> None:
    cell = cell_factory()
    module = RNN(cell, return_state=True, **options)
    variables = module.init(jax.random.PRNGKey(1), inputs(), lengths=LENGTHS)
    assert set(variables) == {"params"} and set(variables["params"]) == {"cell"}
    params = variables["params"]["cell"]
    # the Flax parameter is exactly the cell's params pytree
    assert jax.tree.structure(params) == jax.tree.structure(cell.init(jax.random.PRNGKey(0), I))

    ys, final = module.apply(variables, inputs(2), lengths=LENGTHS)
    expected_ys, expected_final = rnnlab.unroll(cell, params, inputs(2), lengths=LENGTHS, **options)
    np.testing.assert_array_equal(ys, expected_ys)
    assert_trees_equal(final, expected_final)
    assert np.all(np.asarray(ys)[2] == 0.0)  # length 0


def test_rnn_module_passes_initial_state_and_time_major() -> None:
    cell = gru(5)
    module = RNN(cell, time_major=True)
    xs = jnp.swapaxes(inputs(), 0, 1)
    variables = module.init(jax.random.PRNGKey(1), xs)
    start = jnp.full((B, 5), 0.5)
    ys = module.apply(variables, xs, initial_state=start)
    expected, _ = rnnlab.unroll(cell, variables["params"]["cell"], xs, initial_state=start, time_major=True)
    assert ys.shape == (T, B, 5)
    np.testing.assert_array_equal(ys, expected)


def test_bidirectional_module_equals_rnnlab_bidirectional() -> None:
    cell_fw, cell_bw = lstm(4), gru(3)
    module = Bidirectional(cell_fw, cell_bw, return_state=True)
    variables = module.init(jax.random.PRNGKey(1), inputs())
    assert set(variables["params"]) == {"fw", "bw"}
    outputs, finals = module.apply(variables, inputs(3), lengths=LENGTHS)
    expected, expected_finals = rnnlab.bidirectional(
        cell_fw, cell_bw, variables["params"], inputs(3), lengths=LENGTHS
    )
    assert outputs.shape == (B, T, 4 + 3)
    np.testing.assert_array_equal(outputs, expected)
    assert_trees_equal(finals, expected_finals)


def test_bidirectional_module_passes_time_major() -> None:
    cell_fw, cell_bw = lstm(4), gru(3)
    module = Bidirectional(cell_fw, cell_bw, time_major=True)
    xs = jnp.swapaxes(inputs(), 0, 1)
    variables = module.init(jax.random.PRNGKey(1), xs)
    outputs = module.apply(variables, xs)
    expected, _ = rnnlab.bidirectional(cell_fw, cell_bw, variables["params"], xs, time_major=True)
    assert outputs.shape == (T, B, 4 + 3)
    np.testing.assert_array_equal(outputs, expected)


def test_dropout_rng_comes_from_the_flax_dropout_stream_only_when_not_deterministic() -> None:
    cell = rnnlab.dropout(lstm(8), input_keep=0.7, output_keep=0.7)
    module = RNN(cell)
    variables = module.init(jax.random.PRNGKey(1), inputs(), deterministic=True)
    params = variables["params"]["cell"]

    evaluation = module.apply(variables, inputs(), deterministic=True)
    np.testing.assert_array_equal(evaluation, rnnlab.unroll(cell, params, inputs())[0])

    train_apply = jax.jit(  # compiled once, called with several keys
        lambda key: module.apply(variables, inputs(), deterministic=False, rngs={"dropout": key})
    )

    def train(seed: int) -> np.ndarray:
        return np.asarray(train_apply(jax.random.PRNGKey(seed)))

    np.testing.assert_array_equal(train(5), train(5))
    assert np.abs(train(5) - train(6)).max() > 1e-3
    assert np.abs(train(5) - np.asarray(evaluation)).max() > 1e-3
    # deterministic may also be fixed on the module
    np.testing.assert_array_equal(RNN(cell, deterministic=True).apply(variables, inputs()), evaluation)

    with pytest.raises(ValueError, match='"deterministic" must be passed'):
        module.apply(variables, inputs())
    with pytest.raises(Exception, match="dropout"):  # flax.errors.InvalidRngError
        module.apply(variables, inputs(), deterministic=False)


def test_cells_without_randomness_need_neither_deterministic_nor_a_dropout_rng() -> None:
    cell = basic_rnn(4)
    assert not uses_randomness(cell, cell.init(jax.random.PRNGKey(0), I))
    random_cell = rnnlab.stack([basic_rnn(4), rnnlab.dropout(gru(3), state_keep=0.5)])
    assert uses_randomness(random_cell, random_cell.init(jax.random.PRNGKey(0), I))

    module = RNN(cell)
    variables = module.init(jax.random.PRNGKey(1), inputs())
    np.testing.assert_array_equal(
        module.apply(variables, inputs(), deterministic=False),  # no rngs needed
        module.apply(variables, inputs()),
    )


def test_rnn_module_rejects_a_non_cell() -> None:
    with pytest.raises(TypeError, match="must be an rnnlab RNNCell"):
        RNN(nn.Dense(3)).init(jax.random.PRNGKey(0), inputs())


class SumSignClassifier(nn.Module):
    """LSTM over the sequence, then a logit for "the sequence sums to a positive value"."""

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        cell = rnnlab.dropout(lstm(16), output_keep=0.9)
        _, final = RNN(cell, return_state=True)(x, deterministic=not train)
        return nn.Dense(1)(final.cell.h)[:, 0]


def test_tiny_flax_model_with_an_rnnlab_lstm_learns_the_sign_of_a_sum() -> None:
    model = SumSignClassifier()
    optimizer = optax.adam(2e-2)
    batch, steps = 64, 8

    def make_batch(key: jax.Array) -> tuple[jax.Array, jax.Array]:
        x = jax.random.normal(key, (batch, steps, 1))
        return x, (jnp.sum(x, axis=(1, 2)) > 0).astype(jnp.float32)

    def loss_fn(params: Any, key: jax.Array, train: bool) -> jax.Array:
        data_key, dropout_key = jax.random.split(key)
        x, y = make_batch(data_key)
        logits = model.apply({"params": params}, x, train=train, rngs={"dropout": dropout_key})
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, y))

    @jax.jit
    def train_step(params: Any, opt_state: Any, key: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(loss_fn)(params, key, True)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = model.init(jax.random.PRNGKey(0), jnp.zeros((batch, steps, 1)), train=False)["params"]
    opt_state = optimizer.init(params)
    held_out = jax.jit(lambda p: loss_fn(p, jax.random.PRNGKey(12345), False))
    before = float(held_out(params))
    losses = []
    for step in range(50):
        params, opt_state, loss = train_step(params, opt_state, jax.random.PRNGKey(step))
        losses.append(float(loss))
    after = float(held_out(params))
    assert np.isfinite(losses).all()
    assert before > 0.6  # chance level is log 2 = 0.69
    print(f"held-out loss {before:.3f} -> {after:.3f}; train losses {np.round(losses[::10], 3)}")
    assert after < 0.5 * before, (before, after, losses[::10])


def test_a_given_initial_state_brings_its_own_dropout_keys_in_training() -> None:
    # Carrying the final state into the next window (truncated BPTT) with dropout on:
    # the module draws no key for a given state, as `rnnlab.unroll` takes one or the other.
    cell = rnnlab.dropout(lstm(4), output_keep=0.5)
    module = RNN(cell, return_state=True)
    variables = module.init(jax.random.PRNGKey(1), inputs(), deterministic=True)
    _, carried = module.apply(variables, inputs(), deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    ys, _ = module.apply(
        variables, inputs(3), initial_state=carried, deterministic=False, rngs={"dropout": jax.random.PRNGKey(3)}
    )
    expected, _ = rnnlab.unroll(cell, variables["params"]["cell"], inputs(3), initial_state=carried)
    np.testing.assert_array_equal(ys, expected)

    both = Bidirectional(cell, cell)
    variables = both.init(jax.random.PRNGKey(1), inputs(), deterministic=True)
    params = variables["params"]
    given = rnnlab.batched_initial_state(cell, params["fw"], B, jax.random.PRNGKey(4))
    outputs = both.apply(
        variables, inputs(3), initial_states=(given, given), deterministic=False, rngs={"dropout": jax.random.PRNGKey(5)}
    )
    expected, _ = rnnlab.bidirectional(cell, cell, params, inputs(3), initial_states=(given, given))
    np.testing.assert_array_equal(outputs, expected)


def test_bidirectional_module_draws_a_state_for_the_direction_given_none() -> None:
    # initial_states=(given, None) in training: the backward direction's initial state,
    # and with it its dropout keys, comes from the "dropout" stream.
    cell = rnnlab.dropout(gru(6), output_keep=0.5)
    module = Bidirectional(cell, cell, merge="none")
    variables = module.init(jax.random.PRNGKey(1), inputs(), deterministic=True)
    given = rnnlab.batched_initial_state(cell, variables["params"]["fw"], B, jax.random.PRNGKey(4))

    def train(seed: int) -> tuple[np.ndarray, np.ndarray]:
        outputs = module.apply(variables, inputs(3), initial_states=(given, None), deterministic=False,
                               rngs={"dropout": jax.random.PRNGKey(seed)})
        return tuple(np.asarray(o) for o in outputs)

    (fw_5, bw_5), (fw_6, bw_6) = train(5), train(6)
    np.testing.assert_array_equal(fw_5, fw_6)  # the given state's own keys
    assert not np.array_equal(bw_5 == 0.0, bw_6 == 0.0)  # masks drawn from the stream


def test_a_given_state_follows_deterministic_too() -> None:
    # deterministic=True evaluates a state carried from training without dropout, and
    # the deterministic flag is still required once, as without a given state.
    cell = rnnlab.dropout(lstm(4), output_keep=0.5)
    module = RNN(cell, return_state=True)
    variables = module.init(jax.random.PRNGKey(1), inputs(), deterministic=True)
    _, carried = module.apply(variables, inputs(), deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
    assert carried.key is not None
    ys, final = module.apply(variables, inputs(3), initial_state=carried, deterministic=True)
    expected, _ = rnnlab.unroll(lstm(4), variables["params"]["cell"], inputs(3), initial_state=carried.cell)
    np.testing.assert_allclose(ys, expected, rtol=1e-6, atol=1e-6)
    assert final.key is None
    with pytest.raises(ValueError, match="deterministic"):
        module.apply(variables, inputs(3), initial_state=carried)
    with pytest.raises(ValueError, match="deterministic"):
        RNN(cell, deterministic=True).apply(variables, inputs(3), initial_state=carried, deterministic=False)


def test_bidirectional_module_with_one_cell_runs_both_directions_in_one_loop(monkeypatch) -> None:
    # Flax rebuilds the cell it holds, so the module must compare cells by equality.
    unroll_module = sys.modules["rnnlab.unroll"]  # `rnnlab.unroll` is the function
    one_loop = unroll_module._fused_directions
    calls = []
    monkeypatch.setattr(unroll_module, "_fused_directions", lambda *a, **k: calls.append(1) or one_loop(*a, **k))
    cell = gru(3)
    module = Bidirectional(cell, cell, fused=False)  # fused scans keep two loops on CPU
    variables = module.init(jax.random.PRNGKey(1), inputs())
    outputs = module.apply(variables, inputs(3), lengths=LENGTHS)
    assert len(calls) == 2  # init and apply
    expected, _ = rnnlab.bidirectional(cell, gru(3), variables["params"], inputs(3), lengths=LENGTHS, fused=False)
    np.testing.assert_allclose(outputs, expected, rtol=1e-6, atol=1e-6)
