"""Property-based tests (hypothesis) of `rnnlab.unroll` over random cells and options.

The shape space is small on purpose (a few widths, batch sizes and lengths) so that
XLA compilations repeat and the whole file stays fast; examples are derandomized so
the run time does not drift between runs, and no example database is written.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rnnlab
from rnnlab.cells.base import RNNCell
from rnnlab.cells.gru import gru
from rnnlab.cells.lstm import lstm
from rnnlab.cells.rnn import basic_rnn

I = 2
FAMILIES: dict[str, Callable[[int], RNNCell]] = {
    "basic_rnn": lambda n: basic_rnn(n),
    "lstm": lambda n: lstm(n),
    "lstm_peep_proj_clip": lambda n: lstm(n, peepholes=True, num_proj=2, cell_clip=1.0, proj_clip=0.5),
    "lstm_cifg_layer_norm": lambda n: lstm(n, coupled_input_forget=True, layer_norm=True, layer_norm_cell=True),
    "gru": lambda n: gru(n),
    "gru_reset_after": lambda n: gru(n, reset_after=True),
    "stack_lstm_gru": lambda n: rnnlab.stack([lstm(n), gru(3)]),
    "dropout_gru": lambda n: rnnlab.dropout(gru(n), input_keep=0.8, output_keep=0.9, state_keep=0.7),
    "residual_stack": lambda n: rnnlab.residual(rnnlab.stack([gru(n), basic_rnn(I)])),
}
WIDTHS = (1, 4)

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CHEAP_SETTINGS = settings(SETTINGS, max_examples=40)


@functools.lru_cache(maxsize=None)
def cell_and_params(family: str, width: int) -> tuple[RNNCell, Any]:
    cell = FAMILIES[family](width)
    return cell, cell.init(jax.random.PRNGKey(0), I)


@st.composite
def batch_and_lengths(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    batch = draw(st.sampled_from([1, 3]))
    steps = draw(st.sampled_from([1, 4]))
    lengths = draw(st.lists(st.integers(0, steps), min_size=batch, max_size=batch))
    return batch, steps, lengths


@SETTINGS
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    width=st.sampled_from(WIDTHS),
    shape=batch_and_lengths(),
    use_lengths=st.booleans(),
    method=st.sampled_from(["scan", "static"]),
    unroll=st.sampled_from([1, 3]),
    reverse=st.booleans(),
    time_major=st.booleans(),
)
def test_unroll_gives_right_shapes_zero_padding_and_finite_values(
    family: str,
    width: int,
    shape: tuple[int, int, list[int]],
    use_lengths: bool,
    method: str,
    unroll: int,
    reverse: bool,
    time_major: bool,
) -> None:
    cell, params = cell_and_params(family, width)
    batch, steps, lengths = shape
    xs = jax.random.normal(jax.random.PRNGKey(batch * 10 + steps), (batch, steps, I))
    rng = jax.random.PRNGKey(1)
    lengths_array = jnp.asarray(lengths, jnp.int32) if use_lengths else None
    ys, final = rnnlab.unroll(
        cell,
        params,
        jnp.swapaxes(xs, 0, 1) if time_major else xs,
        lengths=lengths_array,
        method=method,
        unroll=unroll,
        reverse=reverse,
        time_major=time_major,
        rng=rng,
    )
    ys = np.asarray(jnp.swapaxes(ys, 0, 1) if time_major else ys)

    assert ys.shape == (batch, steps, cell.output_size)
    assert np.isfinite(ys).all()
    initial = rnnlab.batched_initial_state(cell, params, batch, rng)
    assert jax.tree.structure(final) == jax.tree.structure(initial)
    for leaf, start in zip(jax.tree.leaves(final), jax.tree.leaves(initial)):
        assert leaf.shape == start.shape and leaf.dtype == start.dtype
        assert np.isfinite(np.asarray(leaf, np.float64)).all()
    if use_lengths:
        for b, n in enumerate(lengths):
            assert np.all(ys[b, n:] == 0.0)
            if n == 0:  # nothing read: the state is the initial one
                for leaf, start in zip(jax.tree.leaves(final), jax.tree.leaves(initial)):
                    np.testing.assert_array_equal(leaf[b], start[b])


@CHEAP_SETTINGS
@given(
    shape=batch_and_lengths(),
    offset=st.one_of(st.integers(-5, -1), st.integers(1, 5)),
    position=st.integers(0, 2),
    family=st.sampled_from(sorted(FAMILIES)),
)
def test_lengths_out_of_range_raise_value_error(
    shape: tuple[int, int, list[int]], offset: int, position: int, family: str
) -> None:
    cell, params = cell_and_params(family, 4)
    batch, steps, lengths = shape
    lengths = list(lengths)
    lengths[position % batch] = offset if offset < 0 else steps + offset  # < 0 or > T
    with pytest.raises(ValueError, match=r"lengths must lie in \[0, T\]"):
        rnnlab.unroll(cell, params, jnp.zeros((batch, steps, I)), lengths=jnp.asarray(lengths))


@CHEAP_SETTINGS
@given(
    family=st.sampled_from(sorted(FAMILIES)),
    input_size=st.integers(1, 6).filter(lambda n: n != I),
    method=st.sampled_from(["scan", "static"]),
)
def test_wrong_input_size_raises_value_error(family: str, input_size: int, method: str) -> None:
    cell, params = cell_and_params(family, 4)
    with pytest.raises(ValueError, match=rf"input has size {input_size} but .*input_size={I}"):
        rnnlab.unroll(cell, params, jnp.zeros((2, 3, input_size)), method=method)


@CHEAP_SETTINGS
@given(
    lengths_shape=st.lists(st.integers(0, 4), min_size=0, max_size=2).filter(lambda s: tuple(s) != (3,)),
    float_lengths=st.booleans(),
)
def test_lengths_of_wrong_shape_or_dtype_raise(lengths_shape: list[int], float_lengths: bool) -> None:
    cell, params = cell_and_params("gru", 4)
    xs = jnp.zeros((3, 4, I))
    with pytest.raises(ValueError, match=r"lengths must have shape \[batch_size\]=\[3\]"):
        rnnlab.unroll(cell, params, xs, lengths=jnp.zeros(tuple(lengths_shape), jnp.int32))
    if float_lengths:
        with pytest.raises(TypeError, match="lengths must be an integer array"):
            rnnlab.unroll(cell, params, xs, lengths=jnp.full((3,), 2.0))


@CHEAP_SETTINGS
@given(
    method=st.text(min_size=1, max_size=8).filter(lambda m: m not in ("scan", "static", "associative")),
    unroll=st.one_of(st.integers(-3, 0), st.floats(0.5, 3.5), st.booleans()),
)
def test_unknown_method_and_bad_unroll_raise_value_error(method: str, unroll: Any) -> None:
    cell, params = cell_and_params("basic_rnn", 4)
    xs = jnp.zeros((2, 3, I))
    with pytest.raises(ValueError, match="method must be one of"):
        rnnlab.unroll(cell, params, xs, method=method)
    with pytest.raises(ValueError, match="unroll must be a positive integer"):
        rnnlab.unroll(cell, params, xs, unroll=unroll)


@CHEAP_SETTINGS
@given(shape=batch_and_lengths(), use_lengths=st.booleans())
def test_reverse_sequence_is_an_involution_that_keeps_padding_in_place(
    shape: tuple[int, int, list[int]], use_lengths: bool
) -> None:
    batch, steps, lengths = shape
    xs = np.arange(steps * batch * 2, dtype=np.float32).reshape(steps, batch, 2)
    lengths_array = jnp.asarray(lengths) if use_lengths else None
    once = np.asarray(rnnlab.reverse_sequence(jnp.asarray(xs), lengths_array, time_major=True))
    twice = np.asarray(rnnlab.reverse_sequence(jnp.asarray(once), lengths_array, time_major=True))
    np.testing.assert_array_equal(twice, xs)
    for b in range(batch):
        n = lengths[b] if use_lengths else steps
        np.testing.assert_array_equal(once[:n, b], xs[:n, b][::-1])
        np.testing.assert_array_equal(once[n:, b], xs[n:, b])
