"""`rnnlab.unroll`, `bidirectional` and `stacked_bidirectional` against independent
references: a plain Python loop over examples and time steps that calls `cell.step` on
ONE example at a time (`loop_reference` below), never `rnnlab.unroll` itself.

Sizes are tiny and the configurations are chosen so that every option (method,
`unroll=k`, layout, hoisting, remat, lengths, reverse) is exercised at least once per
cell family while keeping the number of XLA compilations small.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnlab
from rnnlab.cells.base import RNNCell
from rnnlab.cells.gru import gru
from rnnlab.cells.indrnn import indrnn
from rnnlab.cells.lstm import LSTMState, lstm
from rnnlab.cells.rnn import basic_rnn
from rnnlab.wrappers import DropoutState

I, B, T = 3, 4, 7
LENGTHS = np.array([7, 0, 4, 1], np.int32)  # full, empty, partial, a single step
METHOD_RTOL = 1e-6  # between unroll methods (hoisting/batching change rounding only)
REF_RTOL = 1e-5  # against the per-example loop
ATOL = 1e-6


# --------------------------------------------------------------------------------------
# The independent reference and helpers (also imported by test_wrappers / test_linen).
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def jitted_step(cell: RNNCell) -> Callable:
    """`jax.jit(cell.step)`, compiled once per cell and reused for every example/step."""
    return jax.jit(cell.step)


def loop_reference(
    cell: RNNCell,
    params: Any,
    inputs: Any,
    *,
    lengths: Optional[np.ndarray] = None,
    reverse: bool = False,
    initial_state: Any = None,
    rng: Optional[jax.Array] = None,
    resets: Optional[np.ndarray] = None,
) -> tuple[np.ndarray, Any]:
    """The specification of `rnnlab.unroll`, one example and one step at a time.

    For example `b` with `n = lengths[b]` valid steps: starting from its initial state
    (`initial_state[b]`, else `cell.initial_state(params, key_b)` with `key_b` the b-th
    key of `jax.random.split(rng, B)`), step over `x[b, 0..n-1]` (or `x[b, n-1..0]` when
    `reverse`) and write each output at the time index it was read from. Outputs at
    `t >= n` stay zero; the final state is the state after the last valid step. Before
    a step `t` with `resets[b, t]` (bool `[B, T]`), the state becomes
    `cell.initial_state(params)` with the running state's dropout keys (`reset_to`).

    Args:
      inputs: batch-major `[B, T, I]`.
    Returns:
      `(outputs [B, T, O] as NumPy, final state batched along a leading [B] axis)`.
    """
    inputs = np.asarray(inputs)
    batch, steps = inputs.shape[:2]
    step = jitted_step(cell)
    keys = None if rng is None else jax.random.split(rng, batch)
    outputs = np.zeros((batch, steps, cell.output_size), inputs.dtype)
    finals = []
    for b in range(batch):
        if initial_state is not None:
            state = jax.tree.map(lambda leaf: leaf[b], initial_state)
        else:
            state = cell.initial_state(params, None if keys is None else keys[b])
        n = steps if lengths is None else int(lengths[b])
        for t in (range(n - 1, -1, -1) if reverse else range(n)):
            if resets is not None and resets[b, t]:
                state = reset_to(cell.initial_state(params), state)
            state, y = step(params, state, inputs[b, t])
            outputs[b, t] = np.asarray(y)
        finals.append(state)
    return outputs, jax.tree.map(lambda *leaves: jnp.stack(leaves), *finals)


def reset_to(default: Any, running: Any) -> Any:
    """The reference's reset of one example: `default`, with the key of every
    `DropoutState` (in a stack's layers too) taken from `running`."""
    if isinstance(running, DropoutState):
        return DropoutState(reset_to(default.cell, running.cell), running.key)
    if type(running) is tuple:  # a stack's layers
        return tuple(map(reset_to, default, running))
    return default


def assert_trees_close(actual: Any, expected: Any, rtol: float, atol: float = ATOL) -> None:
    """Same pytree structure and every leaf close (exact for integer leaves, e.g. keys)."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        assert np.shape(a) == np.shape(e)
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=rtol, atol=atol)


def assert_trees_equal(actual: Any, expected: Any) -> None:
    """Same pytree structure and bitwise-equal leaves."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def random_inputs(seed: int, shape: tuple[int, ...] = (B, T, I)) -> jax.Array:
    return jax.random.normal(jax.random.PRNGKey(seed), shape)


def run(cell: RNNCell, params: Any, inputs: Any, **kwargs: Any) -> tuple[np.ndarray, Any]:
    """`rnnlab.unroll` on batch-major inputs; with `time_major=True` it transposes the
    inputs in and the outputs back, so results compare against batch-major references."""
    if kwargs.get("time_major"):
        ys, final = rnnlab.unroll(cell, params, jnp.swapaxes(inputs, 0, 1), **kwargs)
        return np.asarray(jnp.swapaxes(ys, 0, 1)), final
    ys, final = rnnlab.unroll(cell, params, inputs, **kwargs)
    return np.asarray(ys), final


# --------------------------------------------------------------------------------------
# Every method and option equals the per-example loop, for every cell family.
# --------------------------------------------------------------------------------------

CELLS: dict[str, Callable[[], RNNCell]] = {
    "basic_rnn": lambda: basic_rnn(6),
    "lstm": lambda: lstm(8, forget_bias=0.5),  # `scan` runs its fused scan (rnnlab.cells.lstm_scan)
    "ln_lstm": lambda: lstm(8, layer_norm=True),  # so does this one
    "lstm_peep_proj": lambda: lstm(8, peepholes=True, num_proj=5, cell_clip=2.0),
    "gru": lambda: gru(7),
    "indrnn": lambda: indrnn(6, recurrent_max_abs=0.9),  # no fused scan: the generic hoisted loop
    "stack_lstm8_gru12": lambda: rnnlab.stack([lstm(8), gru(12)]),
    # a stack of dropout-wrapped layers (unrolled layer by layer) ...
    "stack_of_dropouts": lambda: rnnlab.stack(
        [
            rnnlab.dropout(lstm(8, peepholes=True, num_proj=5), input_keep=0.8, output_keep=0.7, state_keep=0.6),
            rnnlab.dropout(gru(6), input_keep=0.9, output_keep=0.8, state_keep=0.7, variational=True),
        ]
    ),
    # ... and a dropout-wrapped stack (stepped as one cell; input_keep=1 keeps it hoistable)
    "dropout_of_stack": lambda: rnnlab.dropout(
        rnnlab.stack([lstm(8, peepholes=True, num_proj=5), gru(6)]), output_keep=0.8, state_keep=0.7
    ),
}
USES_RNG = {"stack_of_dropouts", "dropout_of_stack"}

CONFIGS: dict[str, dict[str, Any]] = {
    "static": dict(method="static"),
    "scan": dict(method="scan"),
    "scan_unroll2": dict(method="scan", unroll=2),
    "scan_unroll3_time_major": dict(method="scan", unroll=3, time_major=True),
    "scan_nohoist_remat": dict(method="scan", hoist=False, remat=True),
    "static_nohoist_remat_time_major": dict(method="static", hoist=False, remat=True, time_major=True),
}
# Which (config, lengths?) pairs run: every method with and without lengths, and every
# option at least once per cell, without the full product (each `scan` compiles anew).
MATRIX: list[tuple[str, bool]] = [
    ("static", False),
    ("static", True),
    ("scan", False),
    ("scan", True),
    ("scan_unroll2", True),
    ("scan_unroll3_time_major", False),
    ("scan_nohoist_remat", True),
    ("static_nohoist_remat_time_major", False),
]
# Dropout's random-bit generation is slow to compile on CPU: fewer scans for it.
DROPOUT_MATRIX: dict[str, list[tuple[str, bool]]] = {
    "stack_of_dropouts": [("static", False), ("static", True), ("scan_unroll3_time_major", True)],
    "dropout_of_stack": [("static", True), ("scan", True), ("scan_nohoist_remat", False)],
}


@functools.lru_cache(maxsize=None)
def case(cell_name: str) -> tuple[RNNCell, Any, jax.Array, Optional[jax.Array]]:
    """`(cell, params, inputs [B, T, I], rng)` for a named cell, built once."""
    cell = CELLS[cell_name]()
    params = cell.init(jax.random.PRNGKey(0), I)
    rng = jax.random.PRNGKey(42) if cell_name in USES_RNG else None
    return cell, params, random_inputs(1), rng


@functools.lru_cache(maxsize=None)
def reference(cell_name: str, with_lengths: bool, reverse: bool = False) -> tuple[np.ndarray, Any]:
    """`loop_reference` for a named case (with `LENGTHS` or full length), computed once."""
    cell, params, xs, rng = case(cell_name)
    lengths = LENGTHS if with_lengths else None
    return loop_reference(cell, params, xs, lengths=lengths, rng=rng, reverse=reverse)


@functools.lru_cache(maxsize=None)
def static_baseline(cell_name: str, with_lengths: bool) -> tuple[np.ndarray, Any]:
    """`rnnlab.unroll(method="static")` for a named case: what every method must match."""
    cell, params, xs, rng = case(cell_name)
    lengths = jnp.asarray(LENGTHS) if with_lengths else None
    return run(cell, params, xs, method="static", lengths=lengths, rng=rng)


@pytest.mark.parametrize(
    "cell_name, config, with_lengths",
    [
        pytest.param(name, config, with_lengths, id=f"{name}-{config}-{'lengths' if with_lengths else 'full'}")
        for name in CELLS
        for config, with_lengths in DROPOUT_MATRIX.get(name, MATRIX)
    ],
)
def test_every_method_equals_per_example_loop_and_static(cell_name: str, config: str, with_lengths: bool) -> None:
    cell, params, xs, rng = case(cell_name)
    lengths = jnp.asarray(LENGTHS) if with_lengths else None
    ys, final = run(cell, params, xs, lengths=lengths, rng=rng, **CONFIGS[config])

    ref_ys, ref_final = reference(cell_name, with_lengths)
    assert ys.shape == (B, T, cell.output_size)
    np.testing.assert_allclose(ys, ref_ys, rtol=REF_RTOL, atol=ATOL)
    assert_trees_close(final, ref_final, rtol=REF_RTOL)

    static_ys, static_final = static_baseline(cell_name, with_lengths)
    np.testing.assert_allclose(ys, static_ys, rtol=METHOD_RTOL, atol=ATOL)
    assert_trees_close(final, static_final, rtol=METHOD_RTOL)
    if with_lengths:
        for b, n in enumerate(LENGTHS):
            assert np.all(ys[b, n:] == 0.0), f"example {b}: outputs past length {n} are not zero"


def test_dropout_same_key_gives_same_numbers_and_other_key_differs() -> None:
    cell, params, xs, rng = case("stack_of_dropouts")
    with_key = jax.jit(lambda key: rnnlab.unroll(cell, params, xs, rng=key)[0])  # compiled once
    first, again, other = (np.asarray(with_key(key)) for key in (rng, rng, jax.random.PRNGKey(7)))
    evaluation, _ = run(cell, params, xs, method="static", rng=None)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3
    assert np.abs(first - evaluation).max() > 1e-3


# --------------------------------------------------------------------------------------
# Sequence-length semantics (TF1 dynamic_rnn(sequence_length=...)).
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scan", "static"])
def test_outputs_past_length_are_exactly_zero_and_final_state_is_last_valid_state(method: str) -> None:
    cell, params, xs, _ = case("lstm_peep_proj")
    ys, final = run(cell, params, xs, lengths=jnp.asarray(LENGTHS), method=method)
    for b, n in enumerate(LENGTHS):
        assert np.all(ys[b, n:] == 0.0)
        assert np.all(np.abs(ys[b, :n]) > 0.0)  # valid steps are not silently zeroed
        # The state after step n-1 of this example alone, by the per-example loop.
        _, alone = loop_reference(cell, params, xs[b : b + 1, :n], lengths=None)
        assert_trees_close(jax.tree.map(lambda leaf: leaf[b], final), jax.tree.map(lambda leaf: leaf[0], alone), REF_RTOL)


def test_zero_length_keeps_the_initial_state_exactly() -> None:
    cell, params, xs, _ = case("lstm_peep_proj")
    initial = LSTMState(c=jnp.full((B, 8), 0.3), h=jnp.full((B, 5), -0.2))
    ys, final = run(cell, params, xs, lengths=jnp.asarray(LENGTHS), initial_state=initial)
    empty = int(np.flatnonzero(LENGTHS == 0)[0])
    assert_trees_equal(jax.tree.map(lambda leaf: leaf[empty], final), jax.tree.map(lambda leaf: leaf[empty], initial))
    assert np.all(ys[empty] == 0.0)
    # ... and the others start from the given state, like the loop.
    ref_ys, ref_final = loop_reference(cell, params, xs, lengths=LENGTHS, initial_state=initial)
    np.testing.assert_allclose(ys, ref_ys, rtol=REF_RTOL, atol=ATOL)
    assert_trees_close(final, ref_final, REF_RTOL)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("method", ["scan", "static"])
def test_padding_values_do_not_matter(method: str, reverse: bool) -> None:
    cell, params, xs, _ = case("stack_lstm8_gru12")
    lengths = jnp.asarray(LENGTHS)
    pad = np.arange(T)[None, :, None] >= LENGTHS[:, None, None]
    garbage = jnp.where(pad, 1e3 * random_inputs(9) + 17.0, xs)  # large, NaN-free junk
    clean_ys, clean_final = run(cell, params, jnp.where(pad, 0.0, xs), lengths=lengths, method=method, reverse=reverse)
    junk_ys, junk_final = run(cell, params, garbage, lengths=lengths, method=method, reverse=reverse)
    np.testing.assert_array_equal(junk_ys, clean_ys)
    assert_trees_equal(junk_final, clean_final)


@pytest.mark.parametrize("config", ["scan", "static", "scan_unroll3_time_major"])
def test_reverse_with_lengths_equals_loop_over_reversed_valid_prefix(config: str) -> None:
    cell, params, xs, _ = case("gru")
    ys, final = run(cell, params, xs, lengths=jnp.asarray(LENGTHS), reverse=True, **CONFIGS[config])
    ref_ys, ref_final = reference("gru", True, reverse=True)
    np.testing.assert_allclose(ys, ref_ys, rtol=REF_RTOL, atol=ATOL)
    assert_trees_close(final, ref_final, REF_RTOL)
    for b, n in enumerate(LENGTHS):
        assert np.all(ys[b, n:] == 0.0)


def test_reverse_output_at_t_is_state_after_reading_from_last_valid_step_down_to_t() -> None:
    # basic_rnn's output is its state, so output[b, t] must be the state after reading
    # x[b, n-1], x[b, n-2], ..., x[b, t]: the reversal is of the valid prefix only.
    cell, params, xs, _ = case("basic_rnn")
    ys, _ = run(cell, params, xs, lengths=jnp.asarray(LENGTHS), reverse=True)
    step = jitted_step(cell)
    for b, n in enumerate(LENGTHS):
        state = cell.initial_state(params)
        for t in range(n - 1, -1, -1):
            state, _ = step(params, state, xs[b, t])
            np.testing.assert_allclose(ys[b, t], state, rtol=REF_RTOL, atol=ATOL)


def test_reverse_without_lengths_equals_forward_run_on_flipped_time() -> None:
    cell, params, xs, _ = case("lstm_peep_proj")
    ys, final = run(cell, params, xs, reverse=True)
    flipped_ys, flipped_final = run(cell, params, xs[:, ::-1])
    np.testing.assert_allclose(ys, flipped_ys[:, ::-1], rtol=METHOD_RTOL, atol=ATOL)
    assert_trees_close(final, flipped_final, METHOD_RTOL)


def test_reverse_sequence_reverses_valid_prefix_only_and_is_an_involution() -> None:
    xs = jnp.arange(T * B, dtype=jnp.float32).reshape(T, B)[..., None]  # time-major [T, B, 1]
    reversed_xs = np.asarray(rnnlab.reverse_sequence(xs, jnp.asarray(LENGTHS), time_major=True))
    for b, n in enumerate(LENGTHS):
        expected = np.concatenate([np.asarray(xs[:n, b])[::-1], np.asarray(xs[n:, b])])
        np.testing.assert_array_equal(reversed_xs[:, b], expected)
    again = rnnlab.reverse_sequence(jnp.asarray(reversed_xs), jnp.asarray(LENGTHS), time_major=True)
    np.testing.assert_array_equal(again, xs)


def test_reverse_sequence_is_batch_major_by_default_like_unroll() -> None:
    # B == T, so reversing the wrong axis would pass every shape check.
    xs = np.arange(9.0).reshape(3, 3)[..., None]  # [B=3, T=3, 1]
    reversed_xs = np.asarray(rnnlab.reverse_sequence(jnp.asarray(xs), jnp.array([3, 1, 2])))
    np.testing.assert_array_equal(reversed_xs[..., 0], [[2, 1, 0], [3, 4, 5], [7, 6, 8]])


# --------------------------------------------------------------------------------------
# Bidirectional and stacked bidirectional.
# --------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def bidirectional_case() -> tuple[RNNCell, RNNCell, Any, jax.Array]:
    cell_fw, cell_bw = lstm(5, num_proj=3), gru(4)
    return cell_fw, cell_bw, rnnlab.init_bidirectional(cell_fw, cell_bw, jax.random.PRNGKey(3), I), random_inputs(2)


def test_bidirectional_parts_equal_forward_and_reverse_unrolls() -> None:
    cell_fw, cell_bw, params, xs = bidirectional_case()
    lengths = jnp.asarray(LENGTHS)
    (ys_fw, ys_bw), (final_fw, final_bw) = rnnlab.bidirectional(
        cell_fw, cell_bw, params, xs, lengths=lengths, merge="none"
    )
    # the concatenating call, time-major and static: same numbers, other layout
    concat, finals = rnnlab.bidirectional(
        cell_fw, cell_bw, params, jnp.swapaxes(xs, 0, 1), lengths=lengths, time_major=True, method="static"
    )
    concat = jnp.swapaxes(concat, 0, 1)

    fw_ref, fw_final_ref = loop_reference(cell_fw, params["fw"], xs, lengths=LENGTHS)
    bw_ref, bw_final_ref = loop_reference(cell_bw, params["bw"], xs, lengths=LENGTHS, reverse=True)
    np.testing.assert_allclose(ys_fw, fw_ref, rtol=REF_RTOL, atol=ATOL)
    np.testing.assert_allclose(ys_bw, bw_ref, rtol=REF_RTOL, atol=ATOL)
    assert_trees_close(final_fw, fw_final_ref, REF_RTOL)
    assert_trees_close(final_bw, bw_final_ref, REF_RTOL)

    assert concat.shape == (B, T, 3 + 4)
    np.testing.assert_allclose(concat, jnp.concatenate([ys_fw, ys_bw], axis=-1), rtol=METHOD_RTOL, atol=ATOL)
    assert_trees_close(finals, (final_fw, final_bw), METHOD_RTOL)


def test_bidirectional_backward_output_at_t_has_read_last_valid_step_down_to_t() -> None:
    cell = basic_rnn(4)  # output == state: the backward output reveals what it has read
    params = rnnlab.init_bidirectional(cell, cell, jax.random.PRNGKey(5), I)
    xs = random_inputs(3)
    (_, ys_bw), (_, final_bw) = rnnlab.bidirectional(
        cell, cell, params, xs, lengths=jnp.asarray(LENGTHS), merge="none"
    )
    step = jitted_step(cell)
    for b, n in enumerate(LENGTHS):
        state = cell.initial_state(params["bw"])
        for t in range(n - 1, -1, -1):
            state, _ = step(params["bw"], state, xs[b, t])
            np.testing.assert_allclose(ys_bw[b, t], state, rtol=REF_RTOL, atol=ATOL)
        # the backward final state is the state after reading step 0
        np.testing.assert_allclose(final_bw[b], state, rtol=REF_RTOL, atol=ATOL)
        assert np.all(np.asarray(ys_bw[b, n:]) == 0.0)


def test_bidirectional_with_dropout_is_reproducible_from_its_key() -> None:
    cell = rnnlab.dropout(gru(4), input_keep=0.6, output_keep=0.7)
    params = rnnlab.init_bidirectional(cell, cell, jax.random.PRNGKey(0), I)
    xs = random_inputs(4)
    key = jax.random.PRNGKey(11)
    with_key = jax.jit(lambda rng: rnnlab.bidirectional(cell, cell, params, xs, rng=rng)[0])
    first, other = with_key(key), with_key(jax.random.PRNGKey(12))
    again, _ = rnnlab.bidirectional(cell, cell, params, xs, rng=key, method="static")
    np.testing.assert_allclose(first, again, rtol=METHOD_RTOL, atol=ATOL)
    assert np.abs(np.asarray(first) - np.asarray(other)).max() > 1e-3


@pytest.mark.parametrize(
    "cell, options",
    [
        (lstm(5), dict(lengths=LENGTHS)),
        (rnnlab.stack([gru(4), lstm(3)]), dict(lengths=LENGTHS, time_major=True)),
        (rnnlab.cells.lru(I, 2), dict(method="associative")),
    ],
    ids=["lstm", "stack", "lru"],
)
def test_one_cell_for_both_directions_runs_them_in_one_loop_with_the_same_numbers(cell, options, monkeypatch) -> None:
    """`bidirectional(cell, cell, ...)` runs both directions in one vmapped loop; a
    cell that computes the same but is not equal to it runs them one after the other.
    (On CPU a fused scan keeps two loops: the backend is patched to one where it does
    not.)"""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    params = rnnlab.init_bidirectional(cell, cell, jax.random.PRNGKey(6), I)
    xs = random_inputs(7)
    if options.get("time_major"):
        xs = jnp.swapaxes(xs, 0, 1)
    # Both directions start from given states (one loop needs both or neither).
    initial_states = tuple(jax.tree.map(lambda leaf: leaf + shift, rnnlab.batched_initial_state(cell, params[d], B))
                           for d, shift in (("fw", -0.25), ("bw", 0.5)))

    def loss(params, cell_bw):
        outputs, finals = rnnlab.bidirectional(cell, cell_bw, params, xs, initial_states=initial_states, **options)
        return jnp.sum(jnp.sin(outputs)) + sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jax.tree.leaves(finals))

    copy = cell._replace(name=cell.name + " (a copy)")  # the same cell, but not equal to it
    assert copy != cell
    if options.get("method", "scan") == "scan":  # a loop per layer and direction, or per layer
        def loops(cell_bw):
            run = lambda p: rnnlab.bidirectional(cell, cell_bw, p, xs, initial_states=initial_states, **options)
            return str(jax.make_jaxpr(run)(params)).count("scan[")
        assert 2 * loops(cell) == loops(copy) > 0
    for function in (lambda p, c: rnnlab.bidirectional(cell, c, p, xs, initial_states=initial_states, **options),
                     jax.grad(loss)):
        assert_trees_close(function(params, cell), function(params, copy), METHOD_RTOL)


@pytest.mark.parametrize("cell", [gru(4), lstm(3)], ids=["gru", "lstm"])
def test_one_loop_bidirectional_with_lengths_matches_the_per_example_loop(cell, monkeypatch) -> None:
    """The one-loop path reverses each example's valid prefix, not all `T` steps."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # where one cell object runs one loop
    params = rnnlab.init_bidirectional(cell, cell, jax.random.PRNGKey(5), I)
    xs = random_inputs(3)
    run = lambda p: rnnlab.bidirectional(cell, cell, p, xs, lengths=jnp.asarray(LENGTHS), merge="none")
    assert str(jax.make_jaxpr(run)(params)).count("scan[") == 1
    (ys_fw, ys_bw), (final_fw, final_bw) = run(params)
    for ys, final, direction, reverse in ((ys_fw, final_fw, "fw", False), (ys_bw, final_bw, "bw", True)):
        ys_ref, final_ref = loop_reference(cell, params[direction], xs, lengths=LENGTHS, reverse=reverse)
        np.testing.assert_allclose(ys, ys_ref, rtol=REF_RTOL, atol=ATOL)
        assert_trees_close(final, final_ref, REF_RTOL)


@pytest.mark.parametrize(
    "backend, options, loops",
    [("cpu", dict(), 2), ("gpu", dict(), 1), ("cpu", dict(fused=False), 1), ("cpu", dict(remat=True), 1)],
    ids=["cpu_fused", "gpu_fused", "cpu_autodiff", "cpu_remat"],
)
def test_one_cell_for_both_directions_keeps_two_loops_only_for_a_fused_scan_on_cpu(
    backend, options, loops, monkeypatch
) -> None:
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    cell = lstm(5)
    params = rnnlab.init_bidirectional(cell, cell, jax.random.PRNGKey(6), I)
    jaxpr = jax.make_jaxpr(lambda p, xs: rnnlab.bidirectional(cell, cell, p, xs, **options))(params, random_inputs(7))
    assert str(jaxpr).count("scan[") == loops


@functools.lru_cache(maxsize=None)
def stacked_case() -> tuple[list[RNNCell], list[RNNCell], list[Any], jax.Array]:
    cells_fw = [lstm(5), gru(3)]
    cells_bw = [gru(4), basic_rnn(2)]
    params = rnnlab.init_stacked_bidirectional(cells_fw, cells_bw, jax.random.PRNGKey(8), I)
    return cells_fw, cells_bw, params, random_inputs(5)


def test_stacked_bidirectional_one_layer_equals_bidirectional() -> None:
    cells_fw, cells_bw, params, xs = stacked_case()
    lengths = jnp.asarray(LENGTHS)
    ys, (finals_fw, finals_bw) = rnnlab.stacked_bidirectional(
        cells_fw[:1], cells_bw[:1], params[:1], xs, lengths=lengths, method="static"
    )
    expected, (final_fw, final_bw) = rnnlab.bidirectional(
        cells_fw[0], cells_bw[0], params[0], xs, lengths=lengths, method="static"
    )
    np.testing.assert_array_equal(ys, expected)
    assert_trees_equal((finals_fw, finals_bw), ((final_fw,), (final_bw,)))


def test_stacked_bidirectional_two_layers_equal_chained_bidirectional_calls() -> None:
    cells_fw, cells_bw, params, xs = stacked_case()
    lengths = jnp.asarray(LENGTHS)
    ys, (finals_fw, finals_bw) = rnnlab.stacked_bidirectional(cells_fw, cells_bw, params, xs, lengths=lengths)

    # Layer by layer with the per-example loop: layer 1 reads concat(fw, bw) of layer 0.
    fw0, f_fw0 = loop_reference(cells_fw[0], params[0]["fw"], xs, lengths=LENGTHS)
    bw0, f_bw0 = loop_reference(cells_bw[0], params[0]["bw"], xs, lengths=LENGTHS, reverse=True)
    layer1_in = np.concatenate([fw0, bw0], axis=-1)
    fw1, f_fw1 = loop_reference(cells_fw[1], params[1]["fw"], layer1_in, lengths=LENGTHS)
    bw1, f_bw1 = loop_reference(cells_bw[1], params[1]["bw"], layer1_in, lengths=LENGTHS, reverse=True)

    assert ys.shape == (B, T, 3 + 2)
    np.testing.assert_allclose(ys, np.concatenate([fw1, bw1], axis=-1), rtol=REF_RTOL, atol=ATOL)
    assert_trees_close(finals_fw, (f_fw0, f_fw1), REF_RTOL)
    assert_trees_close(finals_bw, (f_bw0, f_bw1), REF_RTOL)


def test_stacked_bidirectional_takes_initial_states_per_layer_as_tf1() -> None:
    cells_fw, cells_bw, params, xs = stacked_case()  # widths 5, 3 forward; 4, 2 backward
    lengths = jnp.asarray(LENGTHS)
    keys = iter(jax.random.split(jax.random.PRNGKey(9), 4))
    random_state = lambda cell, p: jax.tree.map(
        lambda leaf: jax.random.normal(next(keys), leaf.shape), rnnlab.batched_initial_state(cell, p, B)
    )
    states_fw = [random_state(cells_fw[0], params[0]["fw"]), None]
    states_bw = [random_state(cells_bw[0], params[0]["bw"]), random_state(cells_bw[1], params[1]["bw"])]
    ys, (finals_fw, finals_bw) = rnnlab.stacked_bidirectional(
        cells_fw, cells_bw, params, xs, lengths=lengths, initial_states_fw=states_fw, initial_states_bw=states_bw
    )
    expected = xs
    for layer in range(2):
        expected, (final_fw, final_bw) = rnnlab.bidirectional(
            cells_fw[layer], cells_bw[layer], params[layer], expected, lengths=lengths,
            initial_states=(states_fw[layer], states_bw[layer]),
        )
        assert_trees_close(finals_fw[layer], final_fw, rtol=METHOD_RTOL, atol=ATOL)
        assert_trees_close(finals_bw[layer], final_bw, rtol=METHOD_RTOL, atol=ATOL)
    np.testing.assert_allclose(ys, expected, rtol=METHOD_RTOL, atol=ATOL)
    without, _ = rnnlab.stacked_bidirectional(cells_fw, cells_bw, params, xs, lengths=lengths)
    assert np.abs(np.asarray(ys) - np.asarray(without)).max() > 1e-3  # the states were used
    with pytest.raises(ValueError, match=r"initial_states_bw must be a sequence with one state \(or None\) per layer \(2\)"):
        rnnlab.stacked_bidirectional(cells_fw, cells_bw, params, xs, initial_states_bw=states_bw[:1])
    with pytest.raises(TypeError, match="takes no 'initial_states'"):
        rnnlab.stacked_bidirectional(cells_fw, cells_bw, params, xs, initial_states=(None, None))


def test_stacked_bidirectional_shapes_with_mixed_widths() -> None:
    cells_fw, cells_bw, params, xs = stacked_case()
    # layer 1 reads the concatenation of layer 0's outputs: 5 + 4 features
    assert params[0]["fw"]["w_x"].shape == (I, 4 * 5)
    assert params[1]["fw"]["w_x"].shape == (5 + 4, 3 * 3)
    assert params[1]["bw"]["w_x"].shape == (5 + 4, 2)
    ys, (finals_fw, finals_bw) = rnnlab.stacked_bidirectional(
        cells_fw, cells_bw, params, jnp.swapaxes(xs, 0, 1), time_major=True, method="static"
    )
    assert ys.shape == (T, B, 3 + 2)
    assert finals_fw[0].c.shape == finals_fw[0].h.shape == (B, 5)
    assert finals_fw[1].shape == (B, 3)
    assert finals_bw[0].shape == (B, 4)
    assert finals_bw[1].shape == (B, 2)


# --------------------------------------------------------------------------------------
# vmap, jit, grad.
# --------------------------------------------------------------------------------------


def test_vmap_of_single_sequence_unroll_equals_batched_unroll() -> None:
    cell, params, xs, _ = case("lstm_peep_proj")
    lengths = jnp.asarray(LENGTHS)

    def one(x: jax.Array, n: jax.Array) -> tuple[jax.Array, Any]:
        ys, final = rnnlab.unroll(cell, params, x[None], lengths=n[None])
        return ys[0], jax.tree.map(lambda leaf: leaf[0], final)

    ys, final = jax.vmap(one)(xs, lengths)
    batched_ys, batched_final = rnnlab.unroll(cell, params, xs, lengths=lengths)
    np.testing.assert_allclose(ys, batched_ys, rtol=METHOD_RTOL, atol=ATOL)
    assert_trees_close(final, batched_final, METHOD_RTOL)


def test_jit_with_traced_lengths_equals_eager() -> None:
    cell, params, xs, _ = case("gru")
    lengths = jnp.asarray(LENGTHS)
    jitted = jax.jit(lambda p, x, n: rnnlab.unroll(cell, p, x, lengths=n, reverse=True))
    ys, final = jitted(params, xs, lengths)
    ref_ys, ref_final = reference("gru", True, reverse=True)
    np.testing.assert_allclose(ys, ref_ys, rtol=REF_RTOL, atol=ATOL)
    assert_trees_close(final, ref_final, REF_RTOL)


def _unroll_loss(cell: RNNCell, params: Any, xs: jax.Array, **kwargs: Any) -> jax.Array:
    ys, final = rnnlab.unroll(cell, params, xs, lengths=jnp.asarray(LENGTHS), **kwargs)
    weights = jnp.linspace(-1.0, 1.0, ys.size).reshape(ys.shape)
    return jnp.sum(weights * ys) + sum(jnp.sum(jnp.sin(leaf)) for leaf in jax.tree.leaves(final))


@pytest.mark.parametrize(
    "config",
    [dict(method="scan", unroll=2, remat=True), dict(method="scan", hoist=False, reverse=True)],
    ids=["scan_unroll2_remat", "scan_nohoist_reverse"],
)
def test_grad_through_scan_equals_grad_through_static(config: dict[str, Any]) -> None:
    cell, params, xs, _ = case("lstm_peep_proj")
    reverse = config.get("reverse", False)
    grad = jax.grad(functools.partial(_unroll_loss, cell), argnums=(0, 1))
    scan_grads = grad(params, xs, **config)
    static_grads = grad(params, xs, method="static", reverse=reverse)
    assert_trees_close(scan_grads, static_grads, rtol=1e-5, atol=1e-6)
    # gradients reach every parameter and nothing flows from the padding
    assert all(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(scan_grads[0]))
    pad = np.arange(T)[None, :] >= LENGTHS[:, None]
    assert np.all(np.asarray(scan_grads[1])[pad] == 0.0)


def test_check_grads_of_tiny_unroll_in_float64() -> None:
    with jax.enable_x64(True):
        cell = lstm(2, peepholes=True, num_proj=2)
        params = jax.tree.map(lambda p: p.astype(jnp.float64), cell.init(jax.random.PRNGKey(0), 2))
        xs = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 2), jnp.float64)
        lengths = jnp.array([3, 2])

        @jax.jit
        def loss(p: Any, x: jax.Array) -> jax.Array:
            ys, final = rnnlab.unroll(cell, p, x, lengths=lengths, reverse=True, remat=True)
            assert ys.dtype == jnp.float64
            return jnp.sum(ys**2) + jnp.sum(final.c)

        check_grads(loss, (params, xs), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["scan", "static"])
def test_remat_checkpoints_the_step(method: str) -> None:
    cell, params, xs, _ = case("gru")

    def jaxpr(remat: bool) -> str:
        unrolled = lambda p: rnnlab.unroll(cell, p, xs, method=method, remat=remat, fused=False)
        return str(jax.make_jaxpr(unrolled)(params))

    assert "remat" in jaxpr(True) or "checkpoint" in jaxpr(True)
    assert "remat" not in jaxpr(False) and "checkpoint" not in jaxpr(False)


# --------------------------------------------------------------------------------------
# Errors.
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rnn_case() -> tuple[RNNCell, Any, jax.Array]:
    cell, params, xs, _ = case("basic_rnn")
    return cell, params, xs


def test_rank_two_inputs_are_rejected(rnn_case) -> None:
    cell, params, xs = rnn_case
    with pytest.raises(ValueError, match=r"inputs must have rank 3 \(\[B, T, I\]\).*inputs\[None\]"):
        rnnlab.unroll(cell, params, xs[0])
    with pytest.raises(ValueError, match=r"rank 3 \(\[T, B, I\]\)"):
        rnnlab.unroll(cell, params, xs[0], time_major=True)


def test_params_of_another_cell_are_rejected_naming_the_param() -> None:
    key, xs = jax.random.PRNGKey(0), random_inputs(1)
    with pytest.raises(ValueError, match=r"params do not fit lstm\(4\) with input size 3: \['b'\] has shape \(32,\), "
                                         r"expected \(16,\)"):
        rnnlab.unroll(lstm(4), lstm(8).init(key, I), xs)
    with pytest.raises(ValueError, match=r"params do not fit gru\(4\) with input size 3: unexpected \['b_h'\]"):
        rnnlab.unroll(gru(4), gru(4, reset_after=True).init(key, I), xs)
    with pytest.raises(TypeError, match="cell must be an rnnlab RNNCell"):
        rnnlab.unroll(lambda x: x, {}, xs)
    cell = gru(4)
    with pytest.raises(ValueError, match=r"params must be a dict with keys 'fw' and 'bw' .* got \['b', 'w_h', 'w_x'\]"):
        rnnlab.bidirectional(cell, cell, cell.init(key, I), xs)
    params = rnnlab.init_bidirectional(cell, cell, key, I)
    state = rnnlab.batched_initial_state(cell, params["fw"], xs.shape[0])
    with pytest.raises(ValueError, match=r"initial_states must be a pair \(state_fw, state_bw\), .* got length 1"):
        rnnlab.bidirectional(cell, cell, params, xs, initial_states=(state,))
    with pytest.raises(ValueError, match=r"initial_states must be a pair .* got ArrayImpl"):  # one state, not a pair
        rnnlab.bidirectional(cell, cell, params, xs, initial_states=state)
    with pytest.raises(TypeError, match=r"lists with one cell per layer; for one layer pass \[cell\]"):
        rnnlab.stacked_bidirectional(cell, cell, [rnnlab.init_bidirectional(cell, cell, key, I)], xs)


def test_wrong_input_size_is_rejected_with_the_cell_name(rnn_case) -> None:
    cell, params, _ = rnn_case
    with pytest.raises(ValueError, match=r"basic_rnn\(6\): input has size 5 but .*input_size=3"):
        rnnlab.unroll(cell, params, jnp.zeros((B, T, 5)))
    stacked = rnnlab.stack([lstm(4), gru(3)])
    with pytest.raises(ValueError, match=r"input has size 5 but .*input_size=3"):
        rnnlab.unroll(stacked, stacked.init(jax.random.PRNGKey(0), I), jnp.zeros((B, T, 5)), method="static")


@pytest.mark.parametrize("bad_shape", [(B + 1,), (B, 1), ()])
def test_lengths_of_wrong_shape_are_rejected(rnn_case, bad_shape: tuple[int, ...]) -> None:
    cell, params, xs = rnn_case
    with pytest.raises(ValueError, match=r"lengths must have shape \[batch_size\]=\[4\]"):
        rnnlab.unroll(cell, params, xs, lengths=jnp.ones(bad_shape, jnp.int32))


def test_float_lengths_raise_type_error(rnn_case) -> None:
    cell, params, xs = rnn_case
    with pytest.raises(TypeError, match="lengths must be an integer array"):
        rnnlab.unroll(cell, params, xs, lengths=jnp.asarray(LENGTHS, jnp.float32))
    with pytest.raises(TypeError, match="lengths must be an integer array"):
        rnnlab.unroll(cell, params, xs, lengths=[7.0, 0.0, 4.0, 1.0])


@pytest.mark.parametrize("bad", [[7, -1, 4, 1], [7, 0, T + 1, 1]], ids=["negative", "longer_than_T"])
def test_lengths_out_of_range_are_rejected(rnn_case, bad: list[int]) -> None:
    cell, params, xs = rnn_case
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\]=\[0, 7\]"):
        rnnlab.unroll(cell, params, xs, lengths=jnp.asarray(bad))


def test_unknown_method_is_rejected(rnn_case) -> None:
    cell, params, xs = rnn_case
    with pytest.raises(ValueError, match=r"method must be one of .*'scan'.*got 'dynamic'"):
        rnnlab.unroll(cell, params, xs, method="dynamic")


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_non_positive_or_non_integer_unroll_is_rejected(rnn_case, bad: Any) -> None:
    cell, params, xs = rnn_case
    with pytest.raises(ValueError, match="unroll must be a positive integer"):
        rnnlab.unroll(cell, params, xs, unroll=bad)


def test_initial_state_with_wrong_batch_size_is_rejected() -> None:
    cell, params, xs, _ = case("lstm_peep_proj")
    state = LSTMState(c=jnp.zeros((B + 1, 8)), h=jnp.zeros((B + 1, 5)))
    with pytest.raises(ValueError, match=r"initial_state leaf .*leading batch axis of size 4, got shape \(5, 8\)"):
        rnnlab.unroll(cell, params, xs, initial_state=state)
    unbatched = cell.initial_state(params)
    with pytest.raises(ValueError, match="leading batch axis of size 4"):
        rnnlab.unroll(cell, params, xs, initial_state=unbatched)


@pytest.mark.parametrize("cell_name", ["lstm", "min_gru"])
def test_a_state_the_step_promotes_starts_promoted_in_every_method(cell_name: str) -> None:
    # bfloat16 params keep a bfloat16 state, which float32 inputs promote to float32 at
    # the first step: a scan's carry cannot change dtype, so every method starts from
    # the promoted state and gives the numbers of a Python loop.
    cell = {"lstm": lambda: lstm(4), "min_gru": lambda: rnnlab.cells.min_gru(4)}[cell_name]()
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), cell.init(jax.random.PRNGKey(0), I))
    xs = random_inputs(1)
    methods = ["scan", "static"] + (["associative"] if cell.linear_recurrence else [])
    runs = {method: rnnlab.unroll(cell, params, xs, method=method) for method in methods}
    runs["fused=False"] = rnnlab.unroll(cell, params, xs, fused=False)
    given = jax.tree.map(lambda leaf: leaf.astype(jnp.bfloat16), rnnlab.batched_initial_state(cell, params, B))
    runs["bfloat16 state"] = rnnlab.unroll(cell, params, xs, initial_state=given)
    for name, (ys, final) in runs.items():
        assert ys.dtype == jnp.float32 and all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(final)), name
        assert_trees_close((ys, final), runs["static"], rtol=1e-5, atol=1e-6)


def test_an_initial_state_of_the_wrong_width_or_structure_is_rejected_by_name() -> None:
    cell, params, xs, _ = case("lstm_peep_proj")  # c: [8], h: [5]
    with pytest.raises(ValueError, match=r"initial_state leaf \.h must have shape \[B\] \+ \[5\] .* got \[B\] \+ \[8\]"):
        rnnlab.unroll(cell, params, xs, initial_state=LSTMState(c=jnp.zeros((B, 8)), h=jnp.zeros((B, 8))))
    with pytest.raises(TypeError, match=r"initial_state does not have the structure of lstm"):
        rnnlab.unroll(cell, params, xs, initial_state=(jnp.zeros((B, 8)), jnp.zeros((B, 5))))
    gru_cell, gru_params, _, _ = case("gru")  # a state of one array
    with pytest.raises(ValueError, match=r"leaf \(the whole state\) must have shape \[B\] \+ \[7\]"):
        rnnlab.unroll(gru_cell, gru_params, xs, initial_state=jnp.zeros((B, 3)))


def test_associative_method_rejects_a_nonlinear_cell(rnn_case) -> None:
    cell, params, xs = rnn_case
    with pytest.raises(ValueError, match=r"basic_rnn\(6\) is not a linear recurrence"):
        rnnlab.unroll(cell, params, xs, method="associative")


def test_reverse_treats_traced_lengths_above_t_as_t_and_checks_concrete_ones() -> None:
    # Under jit the lengths' values cannot be checked; a forward run reads a length
    # above T as T, and the reverse run must too (not gather past the end).
    cell, params, xs, _ = case("gru")
    run = jax.jit(lambda lengths: rnnlab.unroll(cell, params, xs, lengths=lengths, reverse=True))
    too_long, full = jnp.full((B,), T + 3, jnp.int32), jnp.full((B,), T, jnp.int32)
    assert_trees_close(run(too_long), run(full), rtol=0.0)
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\]=\[0, 7\]"):
        rnnlab.reverse_sequence(xs, jnp.full((B,), T + 3))
    with pytest.raises(TypeError, match="lengths must be an integer array"):
        rnnlab.reverse_sequence(xs, jnp.full((B,), 2.0))
    with pytest.raises(ValueError, match=r"lengths must have shape \[batch_size\]=\[7\], got shape \(4,\)"):
        rnnlab.reverse_sequence(xs, jnp.full((B,), 2), time_major=True)  # [4, 7, 3] read as 7 examples
    with pytest.raises(ValueError, match=r"xs of shape \[B, T, ...\]"):
        rnnlab.reverse_sequence(jnp.ones(T), None)


def test_bidirectional_with_one_cell_object_takes_initial_states_as_with_two() -> None:
    # One cell object runs both directions in one loop (off CPU's fused scans); its
    # handling of given states and rng must be that of two cell objects.
    cell, twin = (rnnlab.dropout(basic_rnn(4), input_keep=0.6, output_keep=0.7) for _ in range(2))
    params = rnnlab.init_bidirectional(cell, cell, jax.random.PRNGKey(0), I)
    xs, lengths = random_inputs(6), jnp.asarray(LENGTHS)
    given = rnnlab.batched_initial_state(cell, params["fw"], B, jax.random.PRNGKey(1))
    for states, rng in [((given, None), None), ((given, None), jax.random.PRNGKey(2)), ((None, given), None)]:
        run = lambda cell_bw: rnnlab.bidirectional(cell, cell_bw, params, xs, lengths=lengths, initial_states=states, rng=rng)
        assert_trees_close(run(cell), run(twin), rtol=METHOD_RTOL, atol=ATOL)
    for cell_bw in (cell, twin):
        with pytest.raises(ValueError, match="pass either rng or initial_state"):
            rnnlab.bidirectional(cell, cell_bw, params, xs, initial_states=(given, given), rng=jax.random.PRNGKey(2))


def test_bidirectional_rejects_unknown_merge() -> None:
    cell_fw, cell_bw, params, xs = bidirectional_case()
    with pytest.raises(ValueError, match="merge must be 'concat' or 'none'"):
        rnnlab.bidirectional(cell_fw, cell_bw, params, xs, merge="sum")


def test_stacked_bidirectional_rejects_empty_and_mismatched_layer_lists() -> None:
    cells_fw, cells_bw, params, xs = stacked_case()
    with pytest.raises(ValueError, match="at least one layer"):
        rnnlab.stacked_bidirectional([], [], [], xs)
    with pytest.raises(ValueError, match="at least one layer"):
        rnnlab.init_stacked_bidirectional(cells_fw, [], jax.random.PRNGKey(0), I)
    with pytest.raises(ValueError, match="same number of layers, got 2 and 1"):
        rnnlab.stacked_bidirectional(cells_fw, cells_bw[:1], params, xs)
    with pytest.raises(ValueError, match="same number of layers, got 1 and 2"):
        rnnlab.init_stacked_bidirectional(cells_fw[:1], cells_bw, jax.random.PRNGKey(0), I)


def test_stacked_bidirectional_rejects_params_of_the_wrong_length() -> None:
    cells_fw, cells_bw, params, xs = stacked_case()
    with pytest.raises(ValueError, match="params has 1 layers but the cell lists have 2"):
        rnnlab.stacked_bidirectional(cells_fw, cells_bw, params[:1], xs)


# --------------------------------------------------------------------------------------
# Edge cases.
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["scan", "static"])
def test_zero_time_steps_give_empty_outputs_and_the_initial_state(method: str) -> None:
    # TF1's dynamic_rnn over zero steps returns [B, 0, O] outputs and the initial state.
    cell, params, _, _ = case("lstm_peep_proj")
    initial = LSTMState(c=jnp.full((B, 8), 0.5), h=jnp.full((B, 5), 0.25))
    ys, final = rnnlab.unroll(cell, params, jnp.zeros((B, 0, I)), initial_state=initial, method=method)
    assert ys.shape == (B, 0, 5)
    assert_trees_equal(final, initial)
