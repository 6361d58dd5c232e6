"""The combinators `stack`, `dropout` and `residual` (TF1's `MultiRNNCell`,
`DropoutWrapper` and `ResidualWrapper`).

Dropout masks are made visible with an "identity" cell: a basic RNN with `w_x = I`,
`w_h = 0`, `b = 0` and the identity activation, whose output at each step is exactly
its (possibly dropped) input. Most runs use `method="static"`: the eager ops are
compiled once per shape and shared between tests, and method equivalence is covered
by `test_unroll.py`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rnnlab
from rnnlab.cells.base import RNNCell
from rnnlab.cells.gru import gru
from rnnlab.cells.lstm import LSTMState, lstm
from rnnlab.cells.rnn import basic_rnn
from test_unroll import assert_trees_close, assert_trees_equal, jitted_step, loop_reference

I, B, T = 3, 2, 5
N = 64  # units of the identity cell: enough that two random masks never coincide
KEY = jax.random.PRNGKey(0)


def identity_cell(num_units: int = N) -> tuple[RNNCell, dict[str, jax.Array]]:
    """A basic RNN whose output is exactly its input: `h' = x·I + h·0 + 0`."""
    cell = basic_rnn(num_units, activation=lambda v: v)
    params = {
        "w_x": jnp.eye(num_units),
        "w_h": jnp.zeros((num_units, num_units)),
        "b": jnp.zeros((num_units,)),
    }
    return cell, params


def ones(batch: int = B, steps: int = T, size: int = N) -> jax.Array:
    return jnp.ones((batch, steps, size))


def inputs(seed: int = 1) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), (B, T, I))


# --------------------------------------------------------------------------------------
# stack
# --------------------------------------------------------------------------------------


def test_stack_of_mixed_cells_and_widths_equals_manual_layer_chaining() -> None:
    layers = [lstm(5, num_proj=3, peepholes=True), gru(4), basic_rnn(6)]
    cell = rnnlab.stack(layers)
    params = cell.init(KEY, I)
    assert cell.output_size == 6
    assert [p["w_x"].shape[0] for p in params] == [I, 3, 4]  # each layer reads the last
    xs = inputs()

    # Manual chaining, one example and one step at a time through every layer.
    steps = [jitted_step(layer) for layer in layers]
    expected = np.zeros((B, T, 6), np.float32)
    expected_finals = []
    for b in range(B):
        states = [layer.initial_state(p) for layer, p in zip(layers, params)]
        for t in range(T):
            y = xs[b, t]
            for index, (step, p) in enumerate(zip(steps, params)):
                states[index], y = step(p, states[index], y)
            expected[b, t] = y
        expected_finals.append(tuple(states))
    expected_final = jax.tree.map(lambda *leaves: jnp.stack(leaves), *expected_finals)

    ys, final = rnnlab.unroll(cell, params, xs, method="static")  # scan: see test_unroll.py
    np.testing.assert_allclose(ys, expected, rtol=1e-5, atol=1e-6)
    assert_trees_close(final, expected_final, rtol=1e-5)
    # stepping the whole stack at once (cell.step) is the same chain
    state, y = cell.step(params, cell.initial_state(params), xs[0, 0])
    np.testing.assert_allclose(y, expected[0, 0], rtol=1e-5, atol=1e-6)
    assert isinstance(state, tuple) and len(state) == 3 and isinstance(state[0], LSTMState)


def test_stack_initial_state_is_the_tuple_of_layer_states() -> None:
    layers = [lstm(5, num_proj=3), gru(4)]
    cell = rnnlab.stack(layers)
    params = cell.init(KEY, I)
    state = cell.initial_state(params)
    assert_trees_equal(state, (layers[0].initial_state(params[0]), layers[1].initial_state(params[1])))
    assert state[0].c.shape == (5,) and state[0].h.shape == (3,) and state[1].shape == (4,)


def test_empty_stack_raises_value_error() -> None:
    with pytest.raises(ValueError, match="stack needs at least one cell"):
        rnnlab.stack([])


def test_stack_of_a_non_cell_raises_type_error() -> None:
    with pytest.raises(TypeError, match=r"cells\[1\] must be an RNNCell, got function"):
        rnnlab.stack([gru(3), lambda params, state, x: (state, x)])


# --------------------------------------------------------------------------------------
# dropout
# --------------------------------------------------------------------------------------


def test_dropout_with_all_keep_probabilities_one_is_the_identity_even_with_rng() -> None:
    inner = lstm(4, peepholes=True)
    cell = rnnlab.dropout(inner, input_keep=1.0, output_keep=1.0, state_keep=1.0, variational=True)
    params = cell.init(KEY, I)
    ys, final = rnnlab.unroll(cell, params, inputs(), rng=jax.random.PRNGKey(3), method="static")
    plain_ys, plain_final = rnnlab.unroll(inner, params, inputs(), method="static")
    np.testing.assert_array_equal(ys, plain_ys)
    assert_trees_equal(final.cell, plain_final)


def test_dropout_in_evaluation_is_deterministic_and_equals_the_unwrapped_cell() -> None:
    inner = gru(4)
    cell = rnnlab.dropout(inner, input_keep=0.5, output_keep=0.5, state_keep=0.5)
    params = cell.init(KEY, I)
    first, final = rnnlab.unroll(cell, params, inputs(), rng=None, method="static")
    second, _ = rnnlab.unroll(cell, params, inputs(), rng=None, method="static")
    plain, plain_final = rnnlab.unroll(inner, params, inputs(), method="static")
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(first, plain, rtol=1e-6, atol=1e-7)
    assert final.key is None
    np.testing.assert_allclose(final.cell, plain_final, rtol=1e-6, atol=1e-7)


def test_dropout_same_key_same_result_different_key_different_result() -> None:
    cell = rnnlab.dropout(gru(4), input_keep=0.7, output_keep=0.7, state_keep=0.7)
    params = cell.init(KEY, I)

    def run(key: jax.Array) -> np.ndarray:
        return np.asarray(rnnlab.unroll(cell, params, inputs(), rng=key, method="static")[0])

    np.testing.assert_array_equal(run(jax.random.PRNGKey(1)), run(jax.random.PRNGKey(1)))
    assert np.abs(run(jax.random.PRNGKey(1)) - run(jax.random.PRNGKey(2))).max() > 1e-3


def _zero_patterns(ys: jax.Array) -> np.ndarray:
    """`[B, T, N]` booleans: which units are dropped (exactly zero) at each step."""
    return np.asarray(ys) == 0.0


@pytest.mark.parametrize("where", ["input_keep", "output_keep"])
def test_non_variational_masks_differ_from_step_to_step(where: str) -> None:
    inner, params = identity_cell()
    cell = rnnlab.dropout(inner, **{where: 0.5})
    ys, _ = rnnlab.unroll(cell, params, ones(), rng=jax.random.PRNGKey(4), method="static")
    dropped = _zero_patterns(ys)
    assert 0.2 < dropped.mean() < 0.8  # masks are in use at all
    for b in range(B):
        assert len({row.tobytes() for row in dropped[b]}) == T, f"example {b} repeats a mask"


@pytest.mark.parametrize("where", ["input_keep", "output_keep"])
def test_variational_masks_are_the_same_at_every_step_and_differ_between_examples(where: str) -> None:
    inner, params = identity_cell()
    cell = rnnlab.dropout(inner, variational=True, **{where: 0.5})
    ys, _ = rnnlab.unroll(cell, params, ones(), rng=jax.random.PRNGKey(4), method="static")
    dropped = _zero_patterns(ys)
    assert 0.2 < dropped.mean() < 0.8
    for b in range(B):
        for t in range(1, T):
            np.testing.assert_array_equal(dropped[b, t], dropped[b, 0])
    assert not np.array_equal(dropped[0, 0], dropped[1, 0])  # one key per example


def test_stacked_dropout_layers_draw_independent_masks() -> None:
    """Each layer of a stack gets its own key: a unit survives two `output_keep=0.5`
    layers with probability 0.25 (0.5 if they shared masks)."""
    inner, params = identity_cell(4096)
    layer = rnnlab.dropout(inner, output_keep=0.5)
    ys, _ = rnnlab.unroll(rnnlab.stack([layer, layer]), (params, params), ones(1, 1, 4096),
                          rng=jax.random.PRNGKey(0), method="static")
    assert abs((np.asarray(ys) != 0).mean() - 0.25) < 0.03


@pytest.mark.parametrize("same_object", [True, False], ids=["one_cell_object", "two"])
def test_bidirectional_directions_draw_independent_masks(same_object: bool, monkeypatch) -> None:
    """The two directions get their own keys: the backward run's mask at its k-th step
    is not the forward run's at its k-th step."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # one loop for one cell object
    inner, params = identity_cell()
    cell = rnnlab.dropout(inner, output_keep=0.5)
    other = cell if same_object else cell._replace(name=cell.name + " (a copy)")  # equal cells share a loop
    (fw, bw), _ = rnnlab.bidirectional(cell, other, {"fw": params, "bw": params}, ones(), merge="none",
                                       rng=jax.random.PRNGKey(1))
    assert not np.array_equal(_zero_patterns(fw), np.flip(_zero_patterns(bw), axis=1))


def test_stacked_bidirectional_layers_draw_their_own_dropout_keys() -> None:
    """Every layer and direction gets its own key: the keys of the final states differ."""
    cell = rnnlab.dropout(gru(4), output_keep=0.5)
    params = rnnlab.init_stacked_bidirectional([cell, cell], [cell, cell], KEY, I)
    _, (finals_fw, finals_bw) = rnnlab.stacked_bidirectional([cell, cell], [cell, cell], params, inputs(),
                                                             rng=jax.random.PRNGKey(1), method="static")
    assert len({np.asarray(final.key).tobytes() for final in finals_fw + finals_bw}) == 4


def test_hoisted_unroll_applies_input_dropout() -> None:
    """With input dropout the input projection is not hoisted (it would skip the
    masks): `hoist=True` gives the per-example loop's numbers."""
    cell = rnnlab.dropout(gru(4), input_keep=0.5)
    params = cell.init(KEY, I)
    rng = jax.random.PRNGKey(3)
    ys, _ = rnnlab.unroll(cell, params, inputs(2), rng=rng, hoist=True)
    ys_ref, _ = loop_reference(cell, params, inputs(2), rng=rng)
    np.testing.assert_allclose(ys, ys_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variational", [False, True], ids=["per_step", "variational"])
def test_state_mask_is_redrawn_per_step_unless_variational(variational: bool) -> None:
    inner, params = identity_cell()
    cell = rnnlab.dropout(inner, state_keep=0.5, variational=variational)
    state = cell.initial_state(params, jax.random.PRNGKey(5))
    x = jnp.ones((N,))
    masks = []
    for _ in range(3):
        state, y = cell.step(params, state, x)
        np.testing.assert_array_equal(y, x)  # the output is not dropped, only the state
        masks.append(np.asarray(state.cell) == 0.0)
        kept = np.asarray(state.cell)[~masks[-1]]
        np.testing.assert_array_equal(kept, np.full_like(kept, 2.0))  # scaled by 1/keep
    assert 0.2 < np.mean(masks) < 0.8
    if variational:
        assert all(np.array_equal(mask, masks[0]) for mask in masks)
    else:
        assert not np.array_equal(masks[0], masks[1]) and not np.array_equal(masks[1], masks[2])


@pytest.mark.parametrize("keep", [0.3, 0.8])
def test_inverted_dropout_scales_kept_units_so_the_expectation_is_the_input(keep: float) -> None:
    size = 4096
    inner, params = identity_cell(size)
    cell = rnnlab.dropout(inner, input_keep=keep)
    ys, _ = rnnlab.unroll(cell, params, ones(1, 1, size), rng=jax.random.PRNGKey(6), method="static")
    ys = np.asarray(ys).ravel()
    kept = ys != 0.0
    np.testing.assert_allclose(ys[kept], 1.0 / keep, rtol=1e-6)
    assert abs(kept.mean() - keep) < 0.05
    assert abs(ys.mean() - 1.0) < 0.08  # E[output] = input


def test_state_dropout_never_touches_the_lstm_memory_cell() -> None:
    inner = rnnlab.stack([lstm(16), lstm(16, num_proj=8)])
    cell = rnnlab.dropout(inner, state_keep=0.5)
    params = cell.init(KEY, I)
    key_c, key_h, key_x = jax.random.split(jax.random.PRNGKey(7), 3)
    states = (
        LSTMState(c=jax.random.normal(key_c, (16,)), h=jax.random.normal(key_h, (16,))),
        LSTMState(c=jax.random.normal(key_c, (16,)), h=jax.random.normal(key_h, (8,))),
    )
    x = jax.random.normal(key_x, (I,))
    plain_state, plain_y = inner.step(params, states, x)
    step = jax.jit(cell.step)
    for seed in range(3):
        dropped_state, y = step(params, rnnlab.DropoutState(states, jax.random.PRNGKey(seed)), x)
        # (tolerances only for jit-vs-eager rounding; a dropped unit would be 0 or 2x)
        np.testing.assert_allclose(y, plain_y, rtol=1e-6, atol=1e-7)
        for dropped, plain in zip(dropped_state.cell, plain_state):
            np.testing.assert_allclose(dropped.c, plain.c, rtol=1e-6, atol=1e-7)  # untouched
            assert np.all(np.asarray(dropped.c) != 0.0)
            h, plain_h = np.asarray(dropped.h), np.asarray(plain.h)
            zeroed = h == 0.0
            assert zeroed.any() and not zeroed.all()
            np.testing.assert_allclose(h[~zeroed], 2.0 * plain_h[~zeroed], rtol=1e-6)


@pytest.mark.parametrize("argument", ["input_keep", "output_keep", "state_keep"])
@pytest.mark.parametrize("value", [0.0, -0.5, 1.5, True, "0.5"])
def test_invalid_keep_probabilities_raise_value_error(argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"{argument} must be a keep probability in \(0, 1\]"):
        rnnlab.dropout(gru(3), **{argument: value})


def test_keep_probabilities_accept_numpy_floats() -> None:
    # A keep probability from a NumPy sweep (np.float32) is a real number in (0, 1].
    inner, params = identity_cell()
    cell = rnnlab.dropout(inner, input_keep=np.float32(0.5), output_keep=np.float64(1.0))
    reference = rnnlab.dropout(inner, input_keep=0.5)
    key = jax.random.PRNGKey(3)
    ys, _ = rnnlab.unroll(cell, params, ones(), rng=key, method="static")
    np.testing.assert_array_equal(ys, rnnlab.unroll(reference, params, ones(), rng=key, method="static")[0])


def test_dropout_state_holds_the_wrapped_state_and_a_key_only_when_training() -> None:
    cell = rnnlab.dropout(lstm(4), output_keep=0.5)
    params = cell.init(KEY, I)
    training = cell.initial_state(params, jax.random.PRNGKey(0))
    evaluation = cell.initial_state(params)
    assert isinstance(training, rnnlab.DropoutState) and isinstance(training.cell, LSTMState)
    assert training.key is not None and evaluation.key is None
    assert_trees_equal(evaluation.cell, lstm(4).initial_state(params))


def test_dropout_unroll_equals_per_example_loop_with_per_example_keys() -> None:
    cell = rnnlab.dropout(lstm(4, num_proj=2), input_keep=0.6, output_keep=0.7, state_keep=0.8)
    params = cell.init(KEY, I)
    lengths = np.array([5, 2])
    rng = jax.random.PRNGKey(9)
    ys, final = rnnlab.unroll(cell, params, inputs(), lengths=jnp.asarray(lengths), rng=rng, method="static")
    ref_ys, ref_final = loop_reference(cell, params, inputs(), lengths=lengths, rng=rng)
    np.testing.assert_allclose(ys, ref_ys, rtol=1e-5, atol=1e-6)
    assert_trees_close(final, ref_final, rtol=1e-5)


# --------------------------------------------------------------------------------------
# residual
# --------------------------------------------------------------------------------------


def test_residual_adds_the_input_to_the_output() -> None:
    inner = gru(I)
    cell = rnnlab.residual(inner)
    params = cell.init(KEY, I)
    xs = inputs()
    ys, final = rnnlab.unroll(cell, params, xs, method="static")
    plain_ys, plain_final = rnnlab.unroll(inner, params, xs, method="static")
    np.testing.assert_allclose(ys, xs + plain_ys, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(final, plain_final)  # the state is the wrapped cell's
    assert cell.output_size == I


def test_residual_rejects_an_input_size_other_than_the_output_size() -> None:
    cell = rnnlab.residual(lstm(4))
    with pytest.raises(ValueError, match=r"input_size \(3\) must equal the cell's output_size \(4\)"):
        cell.init(KEY, 3)


def test_residual_checks_the_step_shapes_as_well_as_init() -> None:
    # Params made for the inner cell with another input size skip the check in `init`;
    # the step must not broadcast `x + y`.
    cell = rnnlab.residual(gru(4))
    params = gru(4).init(KEY, 1)
    with pytest.raises(ValueError, match=r"input \(1,\) and the cell's output \(4,\) must have the same shape"):
        rnnlab.unroll(cell, params, jnp.ones((B, T, 1)), method="static")


# --------------------------------------------------------------------------------------
# stack: the number of layers
# --------------------------------------------------------------------------------------


def test_stack_rejects_params_or_states_for_another_number_of_layers() -> None:
    cell = rnnlab.stack([lstm(4), gru(5)])
    params = cell.init(KEY, I)
    state = rnnlab.batched_initial_state(cell, params, B)
    layers = r"must be a tuple with one entry per layer \(2\), got 1"
    with pytest.raises(ValueError, match="params " + layers):
        rnnlab.unroll(cell, params[:1], inputs())
    with pytest.raises(ValueError, match="state " + layers):
        rnnlab.unroll(cell, params, inputs(), initial_state=state[:1])
    with pytest.raises(ValueError, match="params " + layers):
        cell.initial_state(params[:1])
    with pytest.raises(ValueError, match="params must be a tuple .* got a dict"):
        cell.step(params[0], cell.initial_state(params), jnp.ones(I))


# --------------------------------------------------------------------------------------
# dropout: nesting, and new keys for a carried state
# --------------------------------------------------------------------------------------


def _nested_dropout_cell(state_keep: float) -> RNNCell:
    """TF1's pattern of a `DropoutWrapper` around a `MultiRNNCell` of wrapped cells."""
    return rnnlab.dropout(rnnlab.stack([rnnlab.dropout(gru(4), output_keep=0.7), lstm(3)]), state_keep=state_keep)


@pytest.mark.parametrize("key_fn", [jax.random.PRNGKey, jax.random.key], ids=["raw_key", "typed_key"])
def test_state_dropout_leaves_the_keys_of_inner_dropout_cells_alone(key_fn) -> None:
    params = _nested_dropout_cell(0.5).init(KEY, I)
    state = _nested_dropout_cell(0.5).initial_state(params, key_fn(1))
    new_state, _ = _nested_dropout_cell(0.5).step(params, state, jnp.ones(I))
    without_state_dropout, _ = _nested_dropout_cell(1.0).step(params, state, jnp.ones(I))
    inner_key = lambda s: jax.random.key_data(s.cell[0].key)
    np.testing.assert_array_equal(inner_key(new_state), inner_key(without_state_dropout))
    for method in ("scan", "static"):
        ys, _ = rnnlab.unroll(_nested_dropout_cell(0.5), params, inputs(), rng=key_fn(2), method=method)
        assert ys.shape == (B, T, 3) and np.all(np.isfinite(ys))


@pytest.mark.parametrize("key_fn", [jax.random.PRNGKey, jax.random.key], ids=["raw_key", "typed_key"])
def test_new_dropout_keys_renews_every_key_and_keeps_the_rest(key_fn) -> None:
    cell = _nested_dropout_cell(0.8)
    params = cell.init(KEY, I)
    _, carried = rnnlab.unroll(cell, params, inputs(), rng=key_fn(3), method="static")
    renewed = rnnlab.new_dropout_keys(carried, jax.random.PRNGKey(4))
    assert jax.tree.structure(renewed) == jax.tree.structure(carried)
    for old, new in zip(jax.tree.leaves(carried), jax.tree.leaves(renewed)):
        assert (old.shape, old.dtype) == (new.shape, new.dtype)
    keys = lambda s: [jax.random.key_data(k) for k in (s.key, s.cell[0].key)]
    for old, new in zip(keys(carried), keys(renewed)):
        assert old.shape[0] == B and not np.any(np.all(np.asarray(old) == np.asarray(new), axis=-1))
        assert len({tuple(np.asarray(k)) for k in new}) == B  # every example its own key
    assert_trees_equal(renewed.cell[0].cell, carried.cell[0].cell)  # states untouched
    key_data = lambda tree: jax.tree.map(
        lambda leaf: jax.random.key_data(leaf) if jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key) else leaf, tree
    )
    assert_trees_equal(key_data(renewed), key_data(rnnlab.new_dropout_keys(carried, jax.random.PRNGKey(4))))
    evaluation = rnnlab.batched_initial_state(cell, params, B)
    assert_trees_equal(rnnlab.new_dropout_keys(evaluation, jax.random.PRNGKey(4)), evaluation)  # no keys, none added


def test_variational_masks_stay_over_a_carried_window_unless_the_keys_are_renewed() -> None:
    inner, params = identity_cell()
    cell = rnnlab.dropout(inner, input_keep=0.5, variational=True)
    _, carried = rnnlab.unroll(cell, params, ones(), rng=jax.random.PRNGKey(5), method="static")
    first_window_mask, _ = rnnlab.unroll(cell, params, ones(), rng=jax.random.PRNGKey(5), method="static")
    same, _ = rnnlab.unroll(cell, params, ones(), initial_state=carried, method="static")
    renewed = rnnlab.new_dropout_keys(carried, jax.random.PRNGKey(6))
    fresh, _ = rnnlab.unroll(cell, params, ones(), initial_state=renewed, method="static")
    np.testing.assert_array_equal(same, first_window_mask)
    for b in range(B):
        np.testing.assert_array_equal(fresh[b], np.broadcast_to(fresh[b, :1], fresh[b].shape))  # still variational
        assert np.any(fresh[b, 0] != first_window_mask[b, 0])
