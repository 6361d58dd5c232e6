"""`rnnlab.zoneout` (Krueger et al., 2016) against step-by-step NumPy recurrences.

Evaluation (no key) is checked against `s_t = r * s_{t-1} + (1 - r) * cell(s_{t-1}, x_t)`
in float64 NumPy, with the candidate `cell(...)` from `numpy_reference`; training
against the same loop with per-unit masks, `s_t = where(mask_t, s_{t-1}, candidate_t)`,
drawn from the keys as the wrapper documents them, and independently by properties:
every unit is its previous or its candidate value, the kept fraction is about the
rate, masks differ per step and per example.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import numpy_reference as ref
import rnnlab
from rnnlab.cells.base import RNNCell
from rnnlab.cells.gru import gru
from rnnlab.cells.lstm import LSTMState, lstm
from rnnlab.cells.rnn import basic_rnn
from rnnlab.linen import RNN, uses_randomness
from rnnlab.wrappers import without_dropout_keys
from test_unroll import assert_trees_close, assert_trees_equal, loop_reference

I, B, T = 3, 2, 5
KEY = jax.random.PRNGKey(0)
RATE, MEMORY_RATE = 0.3, 0.6  # h and c; far enough apart that swapping them shows
LENGTHS = np.array([5, 2])
TOL = dict(rtol=1e-5, atol=1e-6)  # float32 rnnlab against float64 NumPy


def inputs(seed: int = 1, shape: tuple[int, ...] = (B, T, I)) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


# --------------------------------------------------------------------------------------
# The NumPy reference
# --------------------------------------------------------------------------------------


def numpy_zoneout(
    step: Callable, params: dict, state: Any, xs: np.ndarray, rates: tuple[float, ...], masks: Optional[list] = None
) -> tuple[np.ndarray, Any]:
    """Runs the NumPy `step` over `xs [n, I]` under zoneout. `state` is one array or a
    tuple of arrays (`(c, h)` for the LSTM) with one rate per array. `masks`: `None` for
    evaluation (the expectation), else per step a tuple of boolean arrays, true where a
    unit keeps its previous value. Returns `(outputs [n, O], final state)`; the output
    is the candidate step's."""
    single = not isinstance(state, tuple)
    state = tuple(np.asarray(s, np.float64) for s in ((state,) if single else state))
    outputs = []
    for t, x in enumerate(xs):
        candidate, y = step(params, state[0] if single else state, np.asarray(x, np.float64))
        candidate = (candidate,) if single else candidate
        if masks is None:
            state = tuple(r * old + (1.0 - r) * new for r, old, new in zip(rates, state, candidate))
        else:
            state = tuple(np.where(keep, old, new) for keep, old, new in zip(masks[t], state, candidate))
        outputs.append(y)
    return np.stack(outputs).reshape(len(xs), -1), (state[0] if single else state)


def step_masks(zoneout_key: jax.Array, shapes: list, rates: tuple[float, ...], steps: int) -> list:
    """The masks of `steps` steps from a state's zoneout key, as the wrapper documents
    them: every step splits the key into (next key, step key) and the step key into one
    key per state leaf, in pytree order; a unit keeps its previous value where
    `bernoulli(leaf key, rate)`."""
    masks = []
    for _ in range(steps):
        zoneout_key, step_key = jax.random.split(zoneout_key)
        leaf_keys = jax.random.split(step_key, len(shapes))
        masks.append(tuple(np.asarray(jax.random.bernoulli(k, r, s)) for k, r, s in zip(leaf_keys, rates, shapes)))
    return masks


def example_zoneout_keys(rng: jax.Array) -> list:
    """The zoneout key of each example's initial state under `unroll(..., rng=rng)`:
    one key per example (`split(rng, B)`), which `initial_state` splits into (the
    wrapped cell's key, the zoneout key)."""
    return [jax.random.split(example_key)[1] for example_key in jax.random.split(rng, B)]


def numpy_unroll(step, params, initial, xs, rates, lengths=None, masks=None):
    """`numpy_zoneout` per example with `lengths`: outputs zero past each length, the
    final state that after the last valid step. `masks[b]` per example, or `None`."""
    params = ref.to_float64(params)
    lengths = [xs.shape[1]] * xs.shape[0] if lengths is None else lengths
    outputs, finals = [], []
    for b, n in enumerate(lengths):
        ys, final = numpy_zoneout(step, params, initial(b), np.asarray(xs[b, :n]), rates,
                                  None if masks is None else masks[b])
        padded = np.zeros((xs.shape[1], ys.shape[1]))
        padded[:n] = ys
        outputs.append(padded)
        finals.append(final)
    return np.stack(outputs), finals


def lstm_case(num_proj: Optional[int] = None) -> tuple[RNNCell, Any, Callable]:
    cell = rnnlab.zoneout(lstm(4, num_proj=num_proj), RATE, memory_rate=MEMORY_RATE)
    params = cell.init(KEY, I)
    h_size = num_proj or 4
    initial = lambda b: (np.zeros(4), np.zeros(h_size))
    step = lambda p, s, x: ref.lstm_step(p, s, x, num_proj=num_proj)
    return cell, params, initial, step


def assert_lstm_finals(final: LSTMState, expected: list, **tol) -> None:
    for b, (c, h) in enumerate(expected):
        np.testing.assert_allclose(final.c[b], c, **tol)
        np.testing.assert_allclose(final.h[b], h, **tol)


# --------------------------------------------------------------------------------------
# Evaluation: the expectation
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["static", "scan"])
@pytest.mark.parametrize("num_proj", [None, 2], ids=["lstm", "lstm_proj"])
def test_lstm_evaluation_is_the_expectation_with_rate_and_memory_rate(num_proj, method: str) -> None:
    cell, params, initial, step = lstm_case(num_proj)
    ys, final = rnnlab.unroll(cell, params, inputs(), lengths=jnp.asarray(LENGTHS), method=method)
    expected_ys, expected_finals = numpy_unroll(step, params, initial, inputs(), (MEMORY_RATE, RATE), LENGTHS)
    np.testing.assert_allclose(ys, expected_ys, **TOL)
    assert isinstance(final, rnnlab.DropoutState) and final.key is None
    assert_lstm_finals(final.cell, expected_finals, **TOL)


@pytest.mark.parametrize("method", ["static", "scan"])
def test_gru_evaluation_is_the_expectation(method: str) -> None:
    rate = 0.25
    cell = rnnlab.zoneout(gru(4), rate)
    params = cell.init(KEY, I)
    ys, final = rnnlab.unroll(cell, params, inputs(), method=method)
    expected_ys, expected_finals = numpy_unroll(ref.gru_step, params, lambda b: np.zeros(4), inputs(), (rate,))
    np.testing.assert_allclose(ys, expected_ys, **TOL)
    np.testing.assert_allclose(final.cell, np.stack(expected_finals), **TOL)


def test_zoneout_of_a_stack_mixes_every_layer_state() -> None:
    inner = rnnlab.stack([lstm(4), gru(3)])
    cell = rnnlab.zoneout(inner, RATE, memory_rate=MEMORY_RATE)
    params = cell.init(KEY, I)
    ys, final = rnnlab.unroll(cell, params, inputs(), method="static")

    p0, p1 = ref.to_float64(params[0]), ref.to_float64(params[1])

    def stack_step(_, state, x):
        c, h, g = state
        (c, h), y = ref.lstm_step(p0, (c, h), x)
        g, y = ref.gru_step(p1, g, y)
        return (c, h, g), y

    expected_ys, expected_finals = numpy_unroll(stack_step, {}, lambda b: (np.zeros(4), np.zeros(4), np.zeros(3)),
                                                inputs(), (MEMORY_RATE, RATE, RATE))
    np.testing.assert_allclose(ys, expected_ys, **TOL)
    for b, (c, h, g) in enumerate(expected_finals):
        np.testing.assert_allclose(final.cell[0].c[b], c, **TOL)
        np.testing.assert_allclose(final.cell[0].h[b], h, **TOL)
        np.testing.assert_allclose(final.cell[1][b], g, **TOL)


# --------------------------------------------------------------------------------------
# Training: masks
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["static", "scan"])
@pytest.mark.parametrize("key_fn", [jax.random.PRNGKey, jax.random.key], ids=["raw_key", "typed_key"])
def test_training_matches_numpy_with_the_masks_of_the_documented_keys(key_fn, method: str) -> None:
    cell, params, initial, step = lstm_case(num_proj=2)
    rng = key_fn(7)
    ys, final = rnnlab.unroll(cell, params, inputs(), lengths=jnp.asarray(LENGTHS), rng=rng, method=method)
    zoneout_keys = example_zoneout_keys(rng)
    rates = (MEMORY_RATE, RATE)
    masks = [step_masks(k, [(4,), (2,)], rates, n) for k, n in zip(zoneout_keys, LENGTHS)]
    expected_ys, expected_finals = numpy_unroll(step, params, initial, inputs(), rates, LENGTHS, masks)
    np.testing.assert_allclose(ys, expected_ys, **TOL)
    assert_lstm_finals(final.cell, expected_finals, **TOL)
    # the key is carried unchanged past each length: split once per valid step
    for b, (key, n) in enumerate(zip(zoneout_keys, LENGTHS)):
        for _ in range(n):
            key = jax.random.split(key)[0]
        np.testing.assert_array_equal(jax.random.key_data(final.key[b]), jax.random.key_data(key))
    assert any(mask.any() and not mask.all() for step_mask in masks[0] for mask in step_mask)  # masks in use


def test_each_unit_is_its_previous_or_its_candidate_value_at_about_the_rate() -> None:
    """Independently of how the masks are drawn: stepping an LSTM by hand, every unit of
    the new state is exactly the previous or the wrapped cell's new value, `c` keeps its
    previous value about `memory_rate` of the time and `h` about `rate`, and the output
    is the wrapped cell's."""
    size, steps = 256, 4
    inner = lstm(size)
    cell = rnnlab.zoneout(inner, RATE, memory_rate=MEMORY_RATE)
    params = cell.init(KEY, I)
    state = cell.initial_state(params, jax.random.PRNGKey(3))
    xs = inputs(2, (steps, I))
    kept = {"c": [], "h": []}
    for x in xs:
        candidate, plain_y = inner.step(params, state.cell, x)
        new_state, y = cell.step(params, state, x)
        np.testing.assert_array_equal(y, plain_y)
        for field in ("c", "h"):
            old, cand, new = (np.asarray(getattr(s, field)) for s in (state.cell, candidate, new_state.cell))
            assert np.all((new == old) | (new == cand)), f"{field}: a unit is neither previous nor candidate"
            differs = old != cand
            assert differs.mean() > 0.9
            kept[field].append((new == old)[differs])
        state = new_state
    # kept fractions over >= 900 units: standard deviation <= 0.017, tolerance ~5 of them
    assert abs(np.concatenate(kept["c"]).mean() - MEMORY_RATE) < 0.08
    assert abs(np.concatenate(kept["h"]).mean() - RATE) < 0.08


def identity_cell(num_units: int) -> tuple[RNNCell, dict]:
    """A basic RNN whose new state is exactly its input: `h' = x·I + h·0 + 0`."""
    cell = basic_rnn(num_units, activation=lambda v: v)
    params = {"w_x": jnp.eye(num_units), "w_h": jnp.zeros((num_units, num_units)), "b": jnp.zeros((num_units,))}
    return cell, params


def kept_per_step(cell: RNNCell, params: dict, rng: jax.Array, steps: int, size: int) -> np.ndarray:
    """`[steps, size]` booleans: which units kept their previous value, over steps whose
    candidate is `t + 1` in every unit (so kept units hold a smaller value)."""
    state = cell.initial_state(params, rng)
    step = jax.jit(cell.step)
    kept = []
    for t in range(steps):
        state, _ = step(params, state, jnp.full((size,), t + 1.0))
        kept.append(np.asarray(state.cell) != t + 1.0)
    return np.stack(kept)


@pytest.mark.parametrize("rate", [0.2, 0.7])
def test_kept_fraction_is_close_to_the_rate_and_masks_are_redrawn_every_step(rate: float) -> None:
    size, steps = 4096, 4
    inner, params = identity_cell(size)
    kept = kept_per_step(rnnlab.zoneout(inner, rate), params, jax.random.PRNGKey(4), steps, size)
    # per step: 4096 units, standard deviation <= 0.008; over all: <= 0.004
    assert np.all(np.abs(kept.mean(axis=1) - rate) < 0.04)
    assert abs(kept.mean() - rate) < 0.02
    assert len({row.tobytes() for row in kept}) == steps  # a new mask at every step


def test_tiny_rate_updates_every_unit_and_rate_zero_is_the_plain_cell() -> None:
    inner = lstm(4)
    params = inner.init(KEY, I)
    plain_ys, plain_final = rnnlab.unroll(inner, params, inputs(), method="static")
    for rate, rng in [(1e-9, jax.random.PRNGKey(5)), (0.0, jax.random.PRNGKey(5)), (0.0, None)]:
        cell = rnnlab.zoneout(inner, rate)
        ys, final = rnnlab.unroll(cell, params, inputs(), rng=rng, method="static")
        np.testing.assert_array_equal(ys, plain_ys)
        assert_trees_equal(final.cell, plain_final)


def test_masks_differ_between_examples_and_keys_and_repeat_with_the_same_key() -> None:
    size = 64
    inner, params = identity_cell(size)
    cell = rnnlab.zoneout(inner, 0.5)

    def kept(rng):  # one step from zero state to all ones: kept units stay 0
        _, final = rnnlab.unroll(cell, params, jnp.ones((B, 1, size)), rng=rng, method="static")
        return np.asarray(final.cell) == 0.0

    first = kept(jax.random.PRNGKey(8))
    assert 0.2 < first.mean() < 0.8
    assert not np.array_equal(first[0], first[1])  # one key per example
    np.testing.assert_array_equal(kept(jax.random.PRNGKey(8)), first)
    assert not np.array_equal(kept(jax.random.PRNGKey(9)), first)


# --------------------------------------------------------------------------------------
# Unroll options, gradients, jit
# --------------------------------------------------------------------------------------


def test_static_scan_hoisted_and_jitted_unrolls_agree_in_training() -> None:
    cell, params, _, _ = lstm_case()
    rng = jax.random.PRNGKey(10)
    lengths = jnp.asarray(LENGTHS)
    ys, final = rnnlab.unroll(cell, params, inputs(), lengths=lengths, rng=rng, method="static", hoist=False)
    ref_ys, ref_final = loop_reference(cell, params, inputs(), lengths=LENGTHS, rng=rng)
    np.testing.assert_allclose(ys, ref_ys, **TOL)
    assert_trees_close(final, ref_final, rtol=1e-5)
    jitted = jax.jit(lambda p, x, k: rnnlab.unroll(cell, p, x, lengths=lengths, rng=k, method="scan", hoist=True))
    for other_ys, other_final in [
        rnnlab.unroll(cell, params, inputs(), lengths=lengths, rng=rng, method="scan"),
        rnnlab.unroll(cell, params, inputs(), lengths=lengths, rng=rng, method="static", hoist=True),
        jitted(params, inputs(), rng),
    ]:
        np.testing.assert_allclose(other_ys, ys, **TOL)
        assert_trees_close(other_final, final, rtol=1e-5)


def test_the_wrapped_cell_input_projection_is_kept_for_hoisting() -> None:
    inner = gru(4)
    cell = rnnlab.zoneout(inner, 0.2)
    assert cell.can_hoist and cell.input_projection is inner.input_projection
    params = cell.init(KEY, I)
    state = cell.initial_state(params, jax.random.PRNGKey(1))
    x = inputs()[0, 0]
    assert_trees_equal(cell.projected_step(params, state, cell.input_projection(params, x)),
                       cell.step(params, state, x))


def test_grad_in_evaluation_matches_finite_differences_in_float64() -> None:
    with jax.enable_x64(True):
        cell = rnnlab.zoneout(lstm(2, num_proj=2), RATE, memory_rate=MEMORY_RATE)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), cell.init(KEY, 2))
        xs = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 2), jnp.float64)

        def loss(params, xs):
            ys, final = rnnlab.unroll(cell, params, xs, lengths=jnp.array([3, 2]), method="scan")
            return jnp.sum(ys**2) + jnp.sum(final.cell.c) + jnp.sum(final.cell.h**2)

        check_grads(loss, (params, xs), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("training", [False, True], ids=["evaluation", "training"])
def test_grad_matches_autodiff_of_the_written_out_recurrence(training: bool) -> None:
    """`jax.grad` through the unroll equals `jax.grad` of the zoneout recurrence written
    out with the plain cell's step (in training with the masks of the documented keys,
    held constant)."""
    inner = lstm(4)
    cell = rnnlab.zoneout(inner, RATE, memory_rate=MEMORY_RATE)
    params = cell.init(KEY, I)
    rng = jax.random.PRNGKey(11) if training else None
    masks = None
    if training:
        masks = [step_masks(k, [(4,), (4,)], (MEMORY_RATE, RATE), T) for k in example_zoneout_keys(rng)]

    def loss(params):
        ys, final = rnnlab.unroll(cell, params, inputs(), rng=rng, method="scan")
        return jnp.sum(jnp.sin(ys)) + jnp.sum(final.cell.c**2)

    def written_out_loss(params):
        total = 0.0
        for b in range(B):
            c, h = jnp.zeros(4), jnp.zeros(4)
            for t in range(T):
                candidate, y = inner.step(params, LSTMState(c, h), inputs()[b, t])
                if masks is None:
                    c = MEMORY_RATE * c + (1 - MEMORY_RATE) * candidate.c
                    h = RATE * h + (1 - RATE) * candidate.h
                else:
                    keep_c, keep_h = masks[b][t]
                    c, h = jnp.where(keep_c, c, candidate.c), jnp.where(keep_h, h, candidate.h)
                total = total + jnp.sum(jnp.sin(y))
            total = total + jnp.sum(c**2)
        return total

    grads, expected = jax.grad(loss)(params), jax.grad(written_out_loss)(params)
    assert_trees_close(grads, expected, rtol=1e-4, atol=1e-5)
    assert any(np.abs(g).max() > 1e-3 for g in jax.tree.leaves(grads))


def test_zoneout_layers_in_a_stack_draw_their_own_keys() -> None:
    layers = [rnnlab.zoneout(lstm(4), RATE, memory_rate=MEMORY_RATE), rnnlab.zoneout(gru(3), 0.2)]
    cell = rnnlab.stack(layers)
    params = cell.init(KEY, I)
    rng = jax.random.PRNGKey(12)
    lengths = jnp.asarray(LENGTHS)
    # the layerwise unroll equals stepping the whole stack example by example
    for method in ("static", "scan"):
        ys, final = rnnlab.unroll(cell, params, inputs(), lengths=lengths, rng=rng, method=method)
        ref_ys, ref_final = loop_reference(cell, params, inputs(), lengths=LENGTHS, rng=rng)
        np.testing.assert_allclose(ys, ref_ys, **TOL)
        assert_trees_close(final, ref_final, rtol=1e-5)
    assert not np.array_equal(jax.random.key_data(final[0].key), jax.random.key_data(final[1].key))
    # and in evaluation, the NumPy recurrence layer after layer
    ys, final = rnnlab.unroll(cell, params, inputs(), method="static")
    p0, p1 = ref.to_float64(params[0]), ref.to_float64(params[1])
    for b in range(B):
        first, (c, h) = numpy_zoneout(ref.lstm_step, p0, (np.zeros(4), np.zeros(4)), inputs()[b],
                                      (MEMORY_RATE, RATE))
        second, g = numpy_zoneout(ref.gru_step, p1, np.zeros(3), first, (0.2,))
        np.testing.assert_allclose(ys[b], second, **TOL)
        np.testing.assert_allclose(final[0].cell.c[b], c, **TOL)
        np.testing.assert_allclose(final[1].cell[b], g, **TOL)


# --------------------------------------------------------------------------------------
# Keys: carried states, nesting, Flax
# --------------------------------------------------------------------------------------


def test_new_dropout_keys_draws_new_masks_and_without_dropout_keys_evaluates() -> None:
    cell, params, _, step = lstm_case()
    _, carried = rnnlab.unroll(cell, params, inputs(), rng=jax.random.PRNGKey(13), method="static")
    rates = (MEMORY_RATE, RATE)
    start = lambda b: (np.asarray(carried.cell.c[b]), np.asarray(carried.cell.h[b]))

    # the carried keys go on drawing the masks where the window stopped
    same, _ = rnnlab.unroll(cell, params, inputs(2), initial_state=carried, method="static")
    masks = [step_masks(carried.key[b], [(4,), (4,)], rates, T) for b in range(B)]
    np.testing.assert_allclose(same, numpy_unroll(step, params, start, inputs(2), rates, masks=masks)[0], **TOL)

    # new keys: other masks, which are those of the new keys
    renewed = rnnlab.new_dropout_keys(carried, jax.random.PRNGKey(14))
    assert not np.any(np.all(np.asarray(renewed.key) == np.asarray(carried.key), axis=-1))
    fresh, _ = rnnlab.unroll(cell, params, inputs(2), initial_state=renewed, method="static")
    new_masks = [step_masks(renewed.key[b], [(4,), (4,)], rates, T) for b in range(B)]
    np.testing.assert_allclose(fresh, numpy_unroll(step, params, start, inputs(2), rates, masks=new_masks)[0], **TOL)
    assert np.abs(np.asarray(fresh) - np.asarray(same)).max() > 1e-3

    # no keys: the expectation from the carried state
    evaluation = without_dropout_keys(carried)
    assert evaluation.key is None
    assert_trees_equal(evaluation.cell, carried.cell)
    ys, _ = rnnlab.unroll(cell, params, inputs(2), initial_state=evaluation, method="static")
    np.testing.assert_allclose(ys, numpy_unroll(step, params, start, inputs(2), rates)[0], **TOL)


def test_keys_of_dropout_cells_inside_are_carried_not_mixed() -> None:
    inner = rnnlab.stack([rnnlab.dropout(gru(4), output_keep=0.7), lstm(3)])
    cell = rnnlab.zoneout(inner, 0.5)
    params = cell.init(KEY, I)
    state = cell.initial_state(params, jax.random.PRNGKey(15))
    candidate, _ = inner.step(params, state.cell, jnp.ones(I))
    new_state, _ = cell.step(params, state, jnp.ones(I))
    np.testing.assert_array_equal(jax.random.key_data(new_state.cell[0].key), jax.random.key_data(candidate[0].key))
    for method in ("scan", "static"):
        ys, _ = rnnlab.unroll(cell, params, inputs(), rng=jax.random.PRNGKey(2), method=method)
        assert ys.shape == (B, T, 3) and np.all(np.isfinite(ys))


def test_linen_rnn_takes_zoneout_keys_from_the_dropout_stream() -> None:
    cell = rnnlab.zoneout(gru(4), 0.5)
    module = RNN(cell, method="static")
    variables = module.init(jax.random.PRNGKey(1), inputs(), deterministic=True)
    assert uses_randomness(cell, variables["params"]["cell"])
    evaluation = module.apply(variables, inputs(), deterministic=True)
    np.testing.assert_array_equal(evaluation, rnnlab.unroll(cell, variables["params"]["cell"], inputs(),
                                                            method="static")[0])
    train = lambda seed: module.apply(variables, inputs(), deterministic=False,
                                      rngs={"dropout": jax.random.PRNGKey(seed)})
    np.testing.assert_array_equal(train(3), train(3))
    assert np.abs(np.asarray(train(3)) - np.asarray(evaluation)).max() > 1e-3
    assert np.abs(np.asarray(train(3)) - np.asarray(train(4))).max() > 1e-3


# --------------------------------------------------------------------------------------
# Construction
# --------------------------------------------------------------------------------------


def test_name_state_and_params() -> None:
    assert rnnlab.zoneout(lstm(4), rate=0.1, memory_rate=0.5).name == "zoneout(lstm(4), rate=0.1, memory_rate=0.5)"
    assert rnnlab.zoneout(gru(3), np.float32(0.25)).name == "zoneout(gru(3), rate=0.25)"
    cell = rnnlab.zoneout(lstm(4), 0.1)
    assert cell.output_size == 4 and "zoneout" in rnnlab.__all__
    params = cell.init(KEY, I)
    assert_trees_equal(params, lstm(4).init(KEY, I))
    training, evaluation = cell.initial_state(params, jax.random.PRNGKey(0)), cell.initial_state(params)
    assert isinstance(training, rnnlab.DropoutState) and isinstance(training.cell, LSTMState)
    assert training.key is not None and evaluation.key is None


@pytest.mark.parametrize("argument", ["rate", "memory_rate"])
@pytest.mark.parametrize("value", [1.0, -0.1, True, "0.1", float("nan")])
def test_invalid_rates_raise_a_one_line_value_error(argument: str, value: Any) -> None:
    kwargs = {"rate": 0.1, argument: value}
    with pytest.raises(ValueError, match=rf"^{argument} must be a zoneout rate \(a float in \[0, 1\)\)") as error:
        rnnlab.zoneout(lstm(3), **kwargs)
    assert "\n" not in str(error.value)


def test_a_memory_rate_for_a_cell_without_memory_cells_is_refused_at_the_first_step() -> None:
    xs = jax.random.normal(KEY, (2, 3, I))
    for cell in (gru(3), rnnlab.stack([gru(3), basic_rnn(2)])):
        wrapped = rnnlab.zoneout(cell, 0.1, memory_rate=0.5)
        with pytest.raises(ValueError, match=r"memory_rate applies to LSTM memory cells .* drop memory_rate") as error:
            rnnlab.unroll(wrapped, wrapped.init(KEY, I), xs)
        assert "\n" not in str(error.value)
    for cell in (gru(3), rnnlab.stack([gru(3), lstm(2)])):  # the same rate twice, or a stack with an LSTM
        wrapped = rnnlab.zoneout(cell, 0.1, memory_rate=0.1 if cell.layers is None else 0.5)
        rnnlab.unroll(wrapped, wrapped.init(KEY, I), xs)
