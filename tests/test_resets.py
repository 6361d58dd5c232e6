"""`rnnlab.unroll(..., resets=...)`: episode starts inside a window of a stream.

The reference (`test_unroll.loop_reference`) is a Python loop over examples and steps
built from the cell contract alone: before a valid step `t` with `resets[b, t]`, the
state becomes `cell.initial_state(params)` (dropout keys kept from the running state),
then `cell.step`; past `lengths[b]` nothing happens and the output is zero. Every method
(the generic loop, fused cells, hoisted and associative linear scans, stacks) must give
its numbers, and the same gradients.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rnnlab
import rnnlab.linen
import rnnlab.nnx
from rnnlab.cells import basic_rnn, gru, lru, lstm, min_gru, min_lstm, rg_lru
from rnnlab.cells.base import RNNCell
from test_unroll import assert_trees_close, loop_reference

B, T, I = 3, 7, 4
# Example 0 starts a new episode at t=0 and again at t=3; example 1 resets at t=2 and,
# past its length 4, at t=5 and t=6 (ignored there); example 2 at t=1 and, past its
# length 2, at t=6.
RESETS = np.array(
    [
        [1, 0, 0, 1, 0, 0, 0],
        [0, 0, 1, 0, 0, 1, 1],
        [0, 1, 0, 0, 0, 0, 1],
    ],
    bool,
)
LENGTHS = np.array([7, 4, 2], np.int32)
RTOL, ATOL = 1e-5, 1e-6


def with_default(cell: RNNCell, value: float) -> RNNCell:
    """`cell` whose default initial state is `value` in every unit instead of zero, so
    that a reset to it is more than a multiplication by zero."""

    def initial_state(params: Any, rng: Optional[jax.Array] = None) -> Any:
        return jax.tree.map(lambda leaf: jnp.full_like(leaf, value), cell.initial_state(params, rng))

    return cell._replace(initial_state=initial_state)


CELLS: dict[str, Callable[[], RNNCell]] = {
    "lstm": lambda: lstm(4),  # runs its fused scan without resets
    "lstm_peepholes": lambda: with_default(lstm(4, peepholes=True, num_proj=3), 0.5),
    "gru": lambda: gru(5),
    "basic_rnn": lambda: basic_rnn(4),
    "stack_lstm_gru": lambda: rnnlab.stack([lstm(4), with_default(gru(3), -0.5)]),
    "min_gru": lambda: with_default(min_gru(4), 0.5),
    "min_gru_log_space": lambda: min_gru(4, log_space=True),
    "min_lstm": lambda: min_lstm(5),
    "lru": lambda: with_default(lru(I, 3), 0.5),  # a constant a, a complex state
    "rg_lru": lambda: with_default(rg_lru(4), 0.5),
    "stack_min_lstm_min_gru": lambda: rnnlab.stack([min_lstm(4), with_default(min_gru(4), 0.5)]),
}
LINEAR = {"min_gru", "min_gru_log_space", "min_lstm", "lru", "rg_lru", "stack_min_lstm_min_gru"}


@functools.lru_cache(maxsize=None)
def case(name: str) -> tuple[RNNCell, Any, jax.Array, Any]:
    """`(cell, params, inputs [B, T, I], a random batched initial state)`, built once."""
    cell = CELLS[name]()
    params = cell.init(jax.random.PRNGKey(0), I)
    xs = jax.random.normal(jax.random.PRNGKey(1), (B, T, I))
    default = rnnlab.batched_initial_state(cell, params, B)
    leaves, treedef = jax.tree.flatten(default)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    carried = [jax.random.normal(key, leaf.shape, leaf.dtype) for key, leaf in zip(keys, leaves)]
    return cell, params, xs, jax.tree.unflatten(treedef, carried)


@pytest.mark.parametrize("with_lengths", [False, True], ids=["full", "lengths_and_initial_state"])
@pytest.mark.parametrize("name", list(CELLS))
def test_unroll_with_resets_equals_the_reference_loop(name: str, with_lengths: bool) -> None:
    cell, params, xs, carried = case(name)
    options = dict(lengths=LENGTHS, initial_state=carried) if with_lengths else {}
    ys, final = rnnlab.unroll(cell, params, xs, resets=RESETS, **options)
    expected_ys, expected_final = loop_reference(cell, params, xs, resets=RESETS, **options)
    np.testing.assert_allclose(ys, expected_ys, rtol=RTOL, atol=ATOL)
    assert_trees_close(final, expected_final, RTOL, ATOL)
    if with_lengths:  # zero outputs past each length
        assert not np.any(np.asarray(ys)[np.arange(T)[None, :] >= LENGTHS[:, None]])


CONFIGS: dict[str, dict[str, Any]] = {
    "scan": {},  # fused=None; for linear cells hoisted: the sequential scan of linear_unroll
    "scan_unfused": dict(fused=False),
    "scan_unroll2_hoisted": dict(unroll=2, hoist=True),
    "scan_not_hoisted": dict(hoist=False),  # for linear cells, the cell's own step
    "scan_remat": dict(remat=True),
    "associative": dict(method="associative", block_size=1),
    "associative_blocks": dict(method="associative", block_size=3, unroll=2),
}
# Every config at least once per cell family, without the full product (each compiles).
MATRIX: list[tuple[str, str]] = [
    ("lstm", "scan"),
    ("lstm", "scan_unfused"),
    ("lstm", "scan_remat"),
    ("lstm_peepholes", "scan_unroll2_hoisted"),
    ("lstm_peepholes", "scan_not_hoisted"),
    ("gru", "scan"),
    ("gru", "scan_unroll2_hoisted"),
    ("basic_rnn", "scan"),
    ("basic_rnn", "scan_not_hoisted"),
    ("stack_lstm_gru", "scan"),
    ("stack_lstm_gru", "scan_unroll2_hoisted"),
    ("min_gru", "scan"),
    ("min_gru", "scan_not_hoisted"),
    ("min_gru", "associative"),
    ("min_gru", "associative_blocks"),
    ("min_gru_log_space", "associative"),
    ("min_lstm", "scan_unroll2_hoisted"),
    ("min_lstm", "associative_blocks"),
    ("lru", "scan"),
    ("lru", "associative"),
    ("lru", "associative_blocks"),
    ("rg_lru", "associative_blocks"),
    ("stack_min_lstm_min_gru", "scan"),
    ("stack_min_lstm_min_gru", "associative_blocks"),
]


def loss_and_grads(name: str, **options: Any) -> tuple[Any, ...]:
    """`(outputs, final state, d loss / d params, d loss / d inputs)` of the named case
    unrolled with `RESETS`, `LENGTHS` and its carried state, for a loss that reads every
    output and every final state leaf."""
    cell, params, xs, carried = case(name)
    weights = jax.random.normal(jax.random.PRNGKey(3), (B, T, cell.output_size))

    def loss(params: Any, xs: jax.Array) -> tuple[jax.Array, tuple[Any, Any]]:
        ys, final = rnnlab.unroll(
            cell, params, xs, resets=RESETS, lengths=LENGTHS, initial_state=carried, **options
        )
        total = jnp.sum(ys * weights) + sum(jnp.sum(jnp.real(h) + jnp.imag(h)) for h in jax.tree.leaves(final))
        return total, (ys, final)

    (_, (ys, final)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, xs)
    return ys, final, *grads


@functools.lru_cache(maxsize=None)
def static_baseline(name: str) -> tuple[Any, ...]:
    """`loss_and_grads` of the static loop of the cell's own step, computed once per cell."""
    return loss_and_grads(name, method="static", hoist=False)


@pytest.mark.parametrize("name, config", MATRIX, ids=[f"{name}-{config}" for name, config in MATRIX])
def test_every_method_gives_the_values_and_gradients_of_the_static_loop(name: str, config: str) -> None:
    actual = loss_and_grads(name, **CONFIGS[config])
    for got, want in zip(actual, static_baseline(name)):
        assert_trees_close(got, want, 1e-4, 1e-5)


@pytest.mark.parametrize(
    "name, options",
    [
        ("lstm", {}),  # fused without resets, the autodiff loop with them
        ("gru", dict(method="static")),
        ("stack_lstm_gru", dict(time_major=True)),
        ("min_gru", dict(method="associative", block_size=3)),
        ("min_gru_log_space", dict(method="associative", block_size=1)),  # log space without resets
        ("lru", {}),
    ],
)
def test_no_resets_equals_the_plain_unroll(name: str, options: dict[str, Any]) -> None:
    cell, params, xs, carried = case(name)
    if options.get("time_major"):
        xs = jnp.swapaxes(xs, 0, 1)
    none = jnp.zeros(xs.shape[:2], bool)
    ys, final = rnnlab.unroll(cell, params, xs, resets=none, lengths=LENGTHS, initial_state=carried, **options)
    plain_ys, plain_final = rnnlab.unroll(cell, params, xs, lengths=LENGTHS, initial_state=carried, **options)
    np.testing.assert_allclose(ys, plain_ys, rtol=RTOL, atol=ATOL)
    assert_trees_close(final, plain_final, RTOL, ATOL)


def test_time_major_resets_are_t_by_b() -> None:
    cell, params, xs, carried = case("gru")
    ys, final = rnnlab.unroll(
        cell, params, jnp.swapaxes(xs, 0, 1), resets=RESETS.T, lengths=LENGTHS, initial_state=carried,
        time_major=True,
    )
    expected_ys, expected_final = loop_reference(cell, params, xs, resets=RESETS, lengths=LENGTHS, initial_state=carried)
    np.testing.assert_allclose(jnp.swapaxes(ys, 0, 1), expected_ys, rtol=RTOL, atol=ATOL)
    assert_trees_close(final, expected_final, RTOL, ATOL)


# --------------------------------------------------------------------------------------
# Dropout and zoneout keys run on through a reset.
# --------------------------------------------------------------------------------------

RANDOM_CELLS: dict[str, Callable[[], RNNCell]] = {
    "variational_dropout": lambda: rnnlab.dropout(lstm(4), output_keep=0.5, state_keep=0.7, variational=True),
    "dropout": lambda: rnnlab.dropout(gru(4), input_keep=0.7, output_keep=0.6),
    "zoneout": lambda: rnnlab.zoneout(lstm(4), 0.4),
    "stack_dropout_zoneout": lambda: rnnlab.stack([rnnlab.dropout(lstm(4), output_keep=0.6), rnnlab.zoneout(gru(3), 0.3)]),
}


@pytest.mark.parametrize("method", ["scan", "static"])
@pytest.mark.parametrize("name", list(RANDOM_CELLS))
def test_dropout_and_zoneout_keys_are_kept_by_a_reset(name: str, method: str) -> None:
    cell = RANDOM_CELLS[name]()
    params = cell.init(jax.random.PRNGKey(0), I)
    xs = jax.random.normal(jax.random.PRNGKey(1), (B, T, I))
    rng = jax.random.PRNGKey(7)
    ys, final = rnnlab.unroll(cell, params, xs, resets=RESETS, lengths=LENGTHS, rng=rng, method=method)
    expected_ys, expected_final = loop_reference(cell, params, xs, resets=RESETS, lengths=LENGTHS, rng=rng)
    np.testing.assert_allclose(ys, expected_ys, rtol=RTOL, atol=ATOL)
    assert_trees_close(final, expected_final, RTOL, ATOL)


def test_variational_masks_after_a_reset_are_the_masks_before_it() -> None:
    cell = rnnlab.dropout(lstm(5), output_keep=0.5, variational=True)
    params = cell.init(jax.random.PRNGKey(0), I)
    xs = jax.random.normal(jax.random.PRNGKey(1), (B, T, I))
    rng = jax.random.PRNGKey(3)
    ys, final = rnnlab.unroll(cell, params, xs, resets=RESETS, rng=rng)
    dropped = np.asarray(ys) == 0.0  # [B, T, O]: the output mask of each step
    assert dropped.any() and not dropped.all()
    assert (dropped == dropped[:, :1]).all()  # one mask per example, through every reset
    assert_trees_close(final.key, rnnlab.batched_initial_state(cell, params, B, rng).key, 0.0, 0.0)


# --------------------------------------------------------------------------------------
# jit, errors, and the Flax adapters.
# --------------------------------------------------------------------------------------


def test_resets_under_jit_equal_eager() -> None:
    cell, params, xs, carried = case("min_lstm")

    @jax.jit
    def run(params: Any, xs: jax.Array, resets: jax.Array) -> tuple[jax.Array, Any]:
        return rnnlab.unroll(cell, params, xs, resets=resets, lengths=LENGTHS, method="associative")

    ys, final = run(params, xs, jnp.asarray(RESETS))
    expected_ys, expected_final = loop_reference(cell, params, xs, resets=RESETS, lengths=LENGTHS)
    np.testing.assert_allclose(ys, expected_ys, rtol=RTOL, atol=ATOL)
    assert_trees_close(final, expected_final, RTOL, ATOL)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(resets=RESETS.T), r"resets must have shape \[B, T\]=\[3, 7\]"),
        (dict(resets=RESETS, time_major=True), r"resets must have shape \[T, B\]"),
        (dict(resets=RESETS[:, :, None]), "resets must have shape"),
        (dict(resets=RESETS.astype(np.int32)), "resets must be a bool array, got dtype int32"),
        (dict(resets=RESETS, reverse=True), "reverse=True"),
        (dict(resets=RESETS, fused=True), "fused=None or False"),
    ],
    ids=["transposed", "time_major", "rank3", "int_dtype", "reverse", "fused"],
)
def test_bad_resets_raise_one_line_errors(options: dict[str, Any], match: str) -> None:
    cell, params, xs, _ = case("lstm")
    if options.get("time_major"):
        xs = jnp.swapaxes(xs, 0, 1)[:, :2]  # [T, B=2, I]: resets [B=3, T] do not fit
    error_type = TypeError if "dtype" in match else ValueError  # as for lengths
    with pytest.raises(error_type, match=match) as error:
        rnnlab.unroll(cell, params, xs, **options)
    assert "\n" not in str(error.value)


def test_resets_as_python_lists_including_an_empty_window() -> None:
    cell, params, xs, _ = case("gru")
    ys, _ = rnnlab.unroll(cell, params, xs, resets=RESETS.tolist())
    np.testing.assert_array_equal(ys, rnnlab.unroll(cell, params, xs, resets=RESETS)[0])
    empty, final = rnnlab.unroll(cell, params, xs[:, :0], resets=[[] for _ in range(B)])  # T = 0
    assert empty.shape == (B, 0, cell.output_size)
    assert_trees_close(final, rnnlab.batched_initial_state(cell, params, B), 0.0, 0.0)


def test_bidirectional_runs_refuse_resets() -> None:
    cell = gru(3)
    xs = jax.random.normal(jax.random.PRNGKey(1), (B, T, I))
    params = rnnlab.init_bidirectional(cell, cell, jax.random.PRNGKey(0), I)
    with pytest.raises(ValueError, match="take no resets") as error:
        rnnlab.bidirectional(cell, cell, params, xs, resets=RESETS)
    assert "\n" not in str(error.value)
    stacked = rnnlab.init_stacked_bidirectional([cell], [cell], jax.random.PRNGKey(0), I)
    with pytest.raises(ValueError, match="take no resets"):
        rnnlab.stacked_bidirectional([cell], [cell], stacked, xs, resets=RESETS)


@pytest.mark.parametrize("time_major", [False, True], ids=["batch_major", "time_major"])
def test_nnx_rnn_passes_resets_through(time_major: bool) -> None:
    cell, _, xs, _ = case("stack_lstm_gru")
    resets = RESETS.T if time_major else RESETS
    xs = jnp.swapaxes(xs, 0, 1) if time_major else xs
    model = rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=1), return_state=True, time_major=time_major)
    ys, final = model(xs, lengths=LENGTHS, resets=resets)
    expected_ys, expected_final = rnnlab.unroll(
        cell, model.params, xs, lengths=LENGTHS, resets=resets, time_major=time_major
    )
    np.testing.assert_array_equal(ys, expected_ys)
    assert_trees_close(final, expected_final, 0.0, 0.0)
    with pytest.raises(TypeError, match="unknown unroll options"):
        rnnlab.nnx.RNN(cell, I, rngs=nnx.Rngs(params=1), resets=RESETS)  # a call argument only


def test_linen_rnn_passes_resets_through() -> None:
    cell, _, xs, _ = case("min_gru")
    module = rnnlab.linen.RNN(cell, method="associative", return_state=True)
    variables = module.init(jax.random.PRNGKey(1), xs)
    ys, final = module.apply(variables, xs, lengths=LENGTHS, resets=RESETS)
    expected_ys, expected_final = rnnlab.unroll(
        cell, variables["params"]["cell"], xs, lengths=LENGTHS, resets=RESETS, method="associative"
    )
    np.testing.assert_array_equal(ys, expected_ys)
    assert_trees_close(final, expected_final, 0.0, 0.0)
