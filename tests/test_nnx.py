"""`rnnlab.nnx`: rnnlab cells inside Flax NNX modules."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rnnlab
import rnnlab.nnx
from rnnlab.cells.gru import gru
from rnnlab.cells.lstm import lstm
from rnnlab.cells.rnn import basic_rnn
from test_linen import MODULE_CASES
from test_unroll import assert_trees_equal

B, T, I = 3, 6, 4
LENGTHS = jnp.array([6, 2, 0])


def inputs(seed: int = 0) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), (B, T, I))


def dropout_lstm(width: int = 8) -> rnnlab.RNNCell:
    return rnnlab.dropout(lstm(width), input_keep=0.7, output_keep=0.7)


@MODULE_CASES
def test_rnn_module_equals_rnnlab_unroll_with_the_same_params(cell_factory, options: dict[str, Any]) -> None:
    cell = cell_factory()
    model = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=1), return_state=True, **options)
    # the params are cell.init's, drawn from the "params" stream, one nnx.Param per array
    assert_trees_equal(model.params, cell.init(nnx.Rngs(params=1).params(), I))
    param_leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert len(param_leaves) == len(jax.tree.leaves(model.params))
    assert jax.tree.leaves(nnx.state(model, nnx.Not(nnx.Param))) == []  # no rng state without dropout

    ys, final = model(inputs(2), lengths=LENGTHS)
    expected_ys, expected_final = rnnlab.unroll(cell, model.params, inputs(2), lengths=LENGTHS, **options)
    np.testing.assert_array_equal(ys, expected_ys)
    assert_trees_equal(final, expected_final)
    assert np.all(np.asarray(ys)[2] == 0.0)  # length 0


def test_rnn_module_passes_initial_state_and_time_major() -> None:
    cell = gru(5)
    model = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(0), time_major=True)
    xs = jnp.swapaxes(inputs(), 0, 1)
    start = jnp.full((B, 5), 0.5)
    ys = model(xs, initial_state=start)
    expected, _ = rnnlab.unroll(cell, model.params, xs, initial_state=start, time_major=True)
    assert ys.shape == (T, B, 5)
    np.testing.assert_array_equal(ys, expected)


@pytest.mark.parametrize("time_major", [False, True])
def test_bidirectional_module_equals_rnnlab_bidirectional(time_major: bool) -> None:
    cell_fw, cell_bw = lstm(4), gru(3)
    model = rnnlab.nnx.Bidirectional(cell_fw, cell_bw, I, rngs=nnx.Rngs(1), return_state=True, time_major=time_major)
    assert set(model.params) == {"fw", "bw"}
    xs = jnp.swapaxes(inputs(3), 0, 1) if time_major else inputs(3)
    outputs, finals = model(xs, lengths=LENGTHS)
    expected, expected_finals = rnnlab.bidirectional(
        cell_fw, cell_bw, model.params, xs, lengths=LENGTHS, time_major=time_major
    )
    assert outputs.shape == ((T, B) if time_major else (B, T)) + (4 + 3,)
    np.testing.assert_array_equal(outputs, expected)
    assert_trees_equal(finals, expected_finals)


def test_nnx_grad_under_nnx_jit_equals_jax_grad_of_the_functional_loss() -> None:
    cell = rnnlab.stack([lstm(5), gru(4)])
    model = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(0))
    targets = inputs(7)[..., :1]

    @nnx.jit
    def loss_and_grads(model: rnnlab.nnx.RNN, x: jax.Array) -> tuple[jax.Array, nnx.State]:
        return nnx.value_and_grad(lambda m: jnp.mean((m(x, lengths=LENGTHS)[..., :1] - targets) ** 2))(model)

    def functional_loss(params: Any, x: jax.Array) -> jax.Array:
        ys, _ = rnnlab.unroll(cell, params, x, lengths=LENGTHS)
        return jnp.mean((ys[..., :1] - targets) ** 2)

    loss, grads = loss_and_grads(model, inputs(1))
    loss_again, _ = loss_and_grads(model, inputs(1))  # the compiled function again
    expected_loss, expected_grads = jax.value_and_grad(functional_loss)(model.params, inputs(1))
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_array_equal(loss_again, loss)
    # the gradients, an nnx.State of Params, put back into the module's structure
    grads_as_params = nnx.merge(nnx.graphdef(model), grads).params
    assert jax.tree.structure(grads_as_params) == jax.tree.structure(expected_grads)
    for got, want in zip(jax.tree.leaves(grads_as_params), jax.tree.leaves(expected_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(grads_as_params))


class SumSignClassifier(nnx.Module):
    """LSTM with dropout over the sequence, then a logit for "the sequence sums to a
    positive value"."""

    def __init__(self, *, rngs: nnx.Rngs) -> None:
        cell = rnnlab.dropout(lstm(16), output_keep=0.9)
        self.rnn = rnnlab.nnx.RNN(cell, 1, rngs=rngs, return_state=True)
        self.head = nnx.Linear(16, 1, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        _, final = self.rnn(x)
        return self.head(final.cell.h)[:, 0]


def test_nnx_optimizer_trains_a_tiny_classifier_with_an_rnnlab_lstm() -> None:
    model = SumSignClassifier(rngs=nnx.Rngs(params=0, dropout=1))
    optimizer = nnx.Optimizer(model, optax.adam(2e-2), wrt=nnx.Param)
    # the optimizer holds a state for each of the LSTM's 3 arrays and the head's 2
    assert len(jax.tree.leaves(nnx.state(model, nnx.Param))) == 5
    batch, steps = 64, 8

    def make_batch(seed: int) -> tuple[jax.Array, jax.Array]:
        x = jax.random.normal(jax.random.PRNGKey(seed), (batch, steps, 1))
        return x, (jnp.sum(x, axis=(1, 2)) > 0).astype(jnp.float32)

    def loss_fn(model: SumSignClassifier, x: jax.Array, y: jax.Array) -> jax.Array:
        return jnp.mean(optax.sigmoid_binary_cross_entropy(model(x), y))

    @nnx.jit
    def train_step(model: SumSignClassifier, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array) -> jax.Array:
        loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
        optimizer.update(model, grads)
        return loss

    held_out = make_batch(12345)
    model.eval()
    before = float(nnx.jit(loss_fn)(model, *held_out))
    model.train()
    losses = [float(train_step(model, optimizer, *make_batch(step))) for step in range(50)]
    model.eval()
    after = float(nnx.jit(loss_fn)(model, *held_out))
    assert np.isfinite(losses).all()
    assert before > 0.6  # chance level is log 2 = 0.69
    assert after < 0.5 * before, (before, after, losses[::10])
    assert int(model.rnn.rngs.count[...]) == 50  # one dropout key per training step


def test_deterministic_dropout_equals_no_dropout_and_training_draws_from_the_stream() -> None:
    cell = dropout_lstm()
    model = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=1, dropout=2))
    evaluation = model(inputs(), deterministic=True)
    np.testing.assert_array_equal(evaluation, rnnlab.unroll(cell, model.params, inputs())[0])
    # the wrapper may unroll differently from the bare cell: equal up to rounding
    np.testing.assert_allclose(evaluation, rnnlab.unroll(lstm(8), model.params, inputs())[0], rtol=1e-5, atol=1e-6)

    next_key = nnx.clone(model.rngs)()  # the key the module will draw next
    first = model(inputs(), deterministic=False)
    np.testing.assert_array_equal(first, rnnlab.unroll(cell, model.params, inputs(), rng=next_key)[0])
    assert np.abs(first - evaluation).max() > 1e-3
    # under nnx.jit the stream advances from call to call
    train = nnx.jit(lambda m, x: m(x, deterministic=False))
    second, third = train(model, inputs()), train(model, inputs())
    assert np.abs(first - second).max() > 1e-3 and np.abs(second - third).max() > 1e-3
    assert int(model.rngs.count[...]) == 3
    # the same seeds give the same model and the same masks
    again = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=1, dropout=2))
    assert_trees_equal(again.params, model.params)
    np.testing.assert_array_equal(train(again, inputs()), first)


def test_deterministic_is_set_at_construction_by_train_eval_or_view_and_the_call_wins() -> None:
    cell = dropout_lstm()
    model = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=1, dropout=2), deterministic=True)
    evaluation = rnnlab.unroll(cell, model.params, inputs())[0]
    np.testing.assert_array_equal(model(inputs()), evaluation)
    assert np.abs(model(inputs(), deterministic=False) - evaluation).max() > 1e-3
    model.train()
    assert np.abs(model(inputs()) - evaluation).max() > 1e-3
    np.testing.assert_array_equal(nnx.view(model, deterministic=True)(inputs()), evaluation)
    model.eval()
    np.testing.assert_array_equal(model(inputs()), evaluation)


def test_dropout_errors_when_determinism_is_undecided_or_there_is_no_dropout_stream() -> None:
    cell = dropout_lstm()
    model = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=1, dropout=2))
    with pytest.raises(ValueError, match="`deterministic` is not set"):
        model(inputs())
    both = rnnlab.nnx.Bidirectional(cell, gru(3), I, rngs=nnx.Rngs(params=1, dropout=2))
    with pytest.raises(ValueError, match="`deterministic` is not set"):
        both(inputs())

    no_stream = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=1))
    assert no_stream.rngs is None
    with pytest.raises(ValueError, match='no "dropout" rng stream'):
        no_stream(inputs(), deterministic=False)
    with pytest.raises(ValueError, match='no "dropout" rng stream'):
        no_stream(inputs(), deterministic=False, rngs=nnx.Rngs(params=3))
    no_stream(inputs(), deterministic=True)  # fine without a stream
    # an Rngs, stream or key given at call time is used instead of the module's stream
    np.testing.assert_array_equal(
        no_stream(inputs(), deterministic=False, rngs=nnx.Rngs(dropout=3)),
        rnnlab.unroll(cell, no_stream.params, inputs(), rng=nnx.Rngs(dropout=3).dropout())[0],
    )


def test_cells_without_randomness_need_neither_deterministic_nor_a_dropout_stream() -> None:
    cell = basic_rnn(4)
    model = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=0))
    np.testing.assert_array_equal(model(inputs(), deterministic=False), model(inputs()))
    np.testing.assert_array_equal(model(inputs()), rnnlab.unroll(cell, model.params, inputs())[0])


def test_a_given_initial_state_brings_its_own_keys_and_follows_deterministic() -> None:
    cell = rnnlab.dropout(lstm(4), output_keep=0.5)
    model = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=1, dropout=2), return_state=True)
    _, carried = model(inputs(), deterministic=False)
    assert carried.key is not None
    count = int(model.rngs.count[...])
    ys, _ = model(inputs(3), initial_state=carried, deterministic=False)
    np.testing.assert_array_equal(ys, rnnlab.unroll(cell, model.params, inputs(3), initial_state=carried)[0])
    assert int(model.rngs.count[...]) == count  # no key drawn for a given state
    ys, final = model(inputs(3), initial_state=carried, deterministic=True)
    expected, _ = rnnlab.unroll(lstm(4), model.params, inputs(3), initial_state=carried.cell)
    np.testing.assert_allclose(ys, expected, rtol=1e-6, atol=1e-6)
    assert final.key is None


def test_bidirectional_dropout_draws_from_the_stream_only_for_the_direction_given_none() -> None:
    cell = rnnlab.dropout(gru(6), output_keep=0.5)
    model = rnnlab.nnx.Bidirectional(cell, cell, I, rngs=nnx.Rngs(params=1, dropout=2), merge="none")
    np.testing.assert_array_equal(
        model(inputs(), deterministic=True),
        rnnlab.bidirectional(cell, cell, model.params, inputs(), merge="none")[0],
    )
    given = rnnlab.batched_initial_state(cell, model.params["fw"], B, jax.random.PRNGKey(4))
    train = nnx.jit(lambda m, x: m(x, initial_states=(given, None), deterministic=False))
    (fw_1, bw_1), (fw_2, bw_2) = train(model, inputs(3)), train(model, inputs(3))
    np.testing.assert_array_equal(fw_1, fw_2)  # the given state's own keys
    assert not np.array_equal(bw_1 == 0.0, bw_2 == 0.0)  # masks drawn from the stream


def test_split_and_merge_round_trip_through_jax_jit_preserves_outputs_and_rng_state() -> None:
    cell = dropout_lstm()
    model = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=1, dropout=2))
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state: nnx.State, x: jax.Array) -> tuple[jax.Array, jax.Array, nnx.State]:
        merged = nnx.merge(graphdef, state)
        return merged(x, deterministic=True), merged(x, deterministic=False), nnx.state(merged)

    evaluation, train_1, state = forward(state, inputs())
    _, train_2, state = forward(state, inputs())
    np.testing.assert_array_equal(evaluation, model(inputs(), deterministic=True))
    np.testing.assert_array_equal(train_1, model(inputs(), deterministic=False))
    np.testing.assert_array_equal(train_2, model(inputs(), deterministic=False))
    assert_trees_equal(nnx.state(model, nnx.Param), nnx.state(state, nnx.Param))
    assert int(state["rngs"]["count"][...]) == int(model.rngs.count[...]) == 2


def test_bad_cells_options_and_input_sizes_are_refused_clearly() -> None:
    rngs = nnx.Rngs(0)
    with pytest.raises(TypeError, match="RNN.cell must be an rnnlab RNNCell, got Linear"):
        rnnlab.nnx.RNN(nnx.Linear(4, 3, rngs=rngs), I, rngs=rngs)
    with pytest.raises(TypeError, match="Bidirectional.cell_bw must be an rnnlab RNNCell"):
        rnnlab.nnx.Bidirectional(lstm(3), "gru", I, rngs=rngs)
    with pytest.raises(TypeError, match=r"unknown unroll options \['revers'\]"):
        rnnlab.nnx.RNN(lstm(3), I, rngs=rngs, revers=True)
    with pytest.raises(TypeError, match=r"unknown unroll options \['reverse'\]"):
        rnnlab.nnx.Bidirectional(lstm(3), lstm(3), I, rngs=rngs, reverse=True)
    with pytest.raises(ValueError, match="merge must be"):
        rnnlab.nnx.Bidirectional(lstm(3), lstm(3), I, rngs=rngs, merge="sum")
    for bad in (None, 0):
        with pytest.raises(TypeError, match=r"RNN takes rngs=nnx.Rngs\(...\)"):
            rnnlab.nnx.RNN(lstm(3), I, rngs=bad)
    with pytest.raises(TypeError, match=r"Bidirectional takes rngs=nnx.Rngs"):
        rnnlab.nnx.Bidirectional(lstm(3), lstm(3), I, rngs=jax.random.PRNGKey(0))

    model = rnnlab.nnx.RNN(lstm(3), I, rngs=rngs)
    with pytest.raises(ValueError, match=r"built with input_size=4, got inputs of shape \(3, 6, 5\)"):
        model(jnp.zeros((B, T, I + 1)))
    with pytest.raises(ValueError, match="rank 3"):
        model(jnp.zeros((T, I)))
    both = rnnlab.nnx.Bidirectional(lstm(3), gru(2), I, rngs=rngs)
    with pytest.raises(ValueError, match="built with input_size=4"):
        nnx.jit(lambda m, x: m(x))(both, jnp.zeros((B, T, 2)))


def test_params_of_an_abstract_module_are_shapes() -> None:
    cell = gru(3)
    abstract = nnx.eval_shape(lambda: rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(0)))
    expected = jax.eval_shape(lambda key: cell.init(key, I), jax.random.PRNGKey(0))
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract.params) == jax.tree.map(
        lambda a: (a.shape, a.dtype), expected)
