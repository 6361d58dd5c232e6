"""Unrolling linear recurrences state-at-once: by a parallel prefix scan, or a sequential one.

A cell with a `linear_recurrence` updates `h_t = a_t ⊙ h_{t-1} + b_t` with `a_t, b_t`
from `x_t` only. So everything but that elementwise update can leave the loop: the
coefficients of all steps come first, in one vmapped (hoisted) computation, the readout
of all steps after, and only `h_t = a_t ⊙ h_{t-1} + b_t` is scanned. Two scans give the
same states:

* sequential (`method="scan"` with hoisting, the default for these cells): `lax.scan`
  over the elementwise update alone, `T` steps of `O(B·N)` work;
* associative (`method="associative"`): two steps compose into one step of the same
  form, `(a_1, b_1) ∘ (a_2, b_2) = (a_1 a_2, a_2 b_1 + b_2)`, and `∘` is associative, so
  `jax.lax.associative_scan` gives all `T` states with `O(log T)` sequential depth (and
  `O(T)` work, about twice the sequential scan's). With `block_size > 1` it is a
  two-level scan instead: blocks of steps are scanned side by side and joined by an
  associative scan over the blocks' compositions (`_blocked_states`), fewer passes
  over memory for `O(block_size)` more sequential steps.

The states are the solution of a bidiagonal linear system, and JAX differentiates them
through `jax.lax.custom_linear_solve`: the backward pass is the same kind of scan, run
from the last step to the first, and the gradients of the coefficients and of the
readout's params are computed for all steps at once, outside the loop. A time-invariant
`a` (`LinearRecurrence.constant_a`, the LRU's `λ`) is computed once and broadcast.

Cells with positive coefficients (minGRU, minLSTM) offer `log_coefficients`; the
associative scan then runs in log space, as Feng et al. (2024) do, with
`(log a_1, log b_1) ∘ (log a_2, log b_2) = (log a_1 + log a_2,
logaddexp(log a_2 + log b_1, log b_2))`. Its derivatives come from a custom JVP that
scans the tangents in linear space (they obey the same recurrence), so forward and
reverse mode both work. The sequential scan never divides or compounds products, so
it stays in linear space.

A reset before step `t` (`resets`, episode starts) restarts the recurrence from the
cell's default state `r`: `h_t = a_t ⊙ r + b_t` is the step `(0, b_t + a_t ⊙ r)`, so
resets only change the coefficients and every scan above runs them as they are (in
linear space: `log 0` has no place in the log-space form).

`rnnlab.unroll` calls `linear_unroll`; it has already validated the arguments and
reversed the sequences for `reverse=True`. Generating one step at a time is
`cell.step`, the same recurrence.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rnnlab.cells.base import Array, LinearRecurrence, Params, RNNCell, State
from rnnlab.cells.fused import valid_steps


def linear_unroll(
    cell: RNNCell,
    params: Params,
    xs: Array,
    initial_state: State,
    lengths: Optional[Array],
    *,
    resets: Optional[Array] = None,
    parallel: bool,
    unroll: int = 1,
    block_size: Optional[int] = None,
) -> tuple[Array, State]:
    """Runs a linear-recurrence cell, or a stack of them, computing all states at once.

    Args:
      cell: a cell with a `linear_recurrence`, or a `rnnlab.stack` of such cells (run
        layer by layer).
      params: the cell's params.
      xs: time-major inputs `[T, B, I]`.
      initial_state: the batched state (leaves `[B, ...]`).
      lengths: int32 `[B]` with values in `[0, T]`, or `None` (all `T` steps valid). For
        `t >= lengths[b]` the step is `a = 1, b = 0` (the state is carried) and the
        output is zero.
      resets: bool `[T, B]` or `None`: where `resets[t, b]`, step `t` of example `b`
        starts from `cell.initial_state(params)` instead of the state before it (the
        step becomes `a = 0, b = b + a·r`); the lengths mask wins past `lengths[b]`.
      parallel: scan the states with `jax.lax.associative_scan` (`True`) or `lax.scan`.
      unroll: steps per loop iteration of the sequential scan (`lax.scan(unroll=...)`)
        and of the blocks' loops.
      block_size: for `parallel`, steps per block of the two-level scan
        (`_blocked_states`); `1` is the plain `jax.lax.associative_scan` over all steps.
        `None`: `default_block_size`.

    Returns:
      `(ys [T, B, O], final_state)`, as the cell's own step under `lax.scan` gives them.

    Raises:
      ValueError: naming the cell (or the stack's layer) that is not a linear recurrence.
    """
    _check_linear(cell)
    solver = _Solver(parallel, unroll, block_size)
    return _unroll(cell, params, xs, initial_state, lengths, resets, solver)


def _check_linear(cell: RNNCell, where: str = "") -> None:
    """Raises a clear `ValueError` unless `cell`, or every layer of a stack, is linear."""
    if cell.layers is not None:
        for index, layer in enumerate(cell.layers):
            _check_linear(layer, f"{where}{cell.name} layer {index}: ")
    elif cell.linear_recurrence is None:
        raise ValueError(
            f"{where}{cell.name} is not a linear recurrence; use method='scan'. "
            "method='associative' needs cells with a linear_recurrence, whose update is "
            "h_t = a_t*h_(t-1) + b_t with a_t, b_t from x_t only."
        )


def default_block_size(num_steps: int, log_space: bool) -> int:
    """The associative scan's block size when none is given.

    On CPU about `sqrt(T)`, so that the two-level scan takes `O(sqrt(T))` sequential
    steps of `O(sqrt(T))`-wide work (docs/benchmarks.md measured its train step
    1.1-1.4x faster than the plain associative scan's on 2 CPU cores). `1`, the plain
    scan of `O(log T)` depth, on GPU/TPU (blocks are not measured there yet) and for
    cells that asked for the log-space form, which only the plain scan runs."""
    if log_space or jax.default_backend() != "cpu":
        return 1
    return math.isqrt(num_steps - 1) + 1 if num_steps > 1 else 1


class _Solver(NamedTuple):
    """How the states are scanned: `parallel` (associative, by blocks of `block_size`
    steps; `None` picks) or sequentially, `unroll` steps per loop iteration."""

    parallel: bool
    unroll: int
    block_size: Optional[int] = 1


def _unroll(
    cell: RNNCell,
    params: Params,
    xs: Array,
    state: State,
    lengths: Optional[Array],
    resets: Optional[Array],
    solver: _Solver,
) -> tuple[Array, State]:
    if cell.layers is None:
        default = None if resets is None else cell.initial_state(params)
        return _unroll_linear(cell.linear_recurrence, params, xs, state, lengths, resets, default, solver)
    finals = []
    for layer, layer_params, layer_state in zip(cell.layers, params, state):
        xs, final = _unroll(layer, layer_params, xs, layer_state, lengths, resets, solver)
        finals.append(final)
    return xs, tuple(finals)


def _unroll_linear(
    recurrence: LinearRecurrence,
    params: Params,
    xs: Array,
    h0: State,
    lengths: Optional[Array],
    resets: Optional[Array],
    default: Optional[State],
    solver: _Solver,
) -> tuple[Array, State]:
    """All states `hs` (leaves `[T, B, ...]`), then the outputs from them. `default`:
    one example's state that `resets [T, B]` restart from (`None` without resets)."""
    num_steps = xs.shape[0]
    log_space = recurrence.log_coefficients is not None and resets is None
    if solver.block_size is None:
        solver = solver._replace(block_size=default_block_size(num_steps, log_space))
    valid = valid_steps(xs, lengths)  # [T, B] or None
    if num_steps == 0:  # no states: empty outputs, and the final state is the initial one
        hs = jax.tree.map(lambda h: h[None][:0], h0)
    elif not log_space or not solver.parallel or solver.block_size > 1:
        a, b = _all_coefficients(recurrence, params, xs)
        if resets is not None:
            a, b = _reset_coefficients(resets, a, b, default)
        if valid is not None:  # a = 1, b = 0: carry the state (after resets, which it overrides)
            a, b = _where_valid(valid, a, 1.0), _where_valid(valid, b, 0.0)
        hs = jax.tree.map(functools.partial(_states, solver=solver), a, b, h0)
    else:
        log_a, log_b = _all_steps(recurrence.log_coefficients, params, xs)
        if valid is not None:
            log_a, log_b = _where_valid(valid, log_a, 0.0), _where_valid(valid, log_b, -jnp.inf)
        hs = jax.tree.map(_log_space_states, log_a, log_b, h0)
    ys = jax.vmap(jax.vmap(recurrence.readout, in_axes=(None, 0, 0)), in_axes=(None, 0, 0))(params, hs, xs)
    if valid is not None:
        ys = _where_valid(valid, ys, 0.0)
    if num_steps == 0:
        return ys, h0
    return ys, jax.tree.map(lambda h: h[-1], hs)


def _all_coefficients(recurrence: LinearRecurrence, params: Params, xs: Array) -> tuple[Any, Any]:
    """`(a, b)` of every step and example of `xs: [T, B, I]`: leaves `[T, B, ...]`, except
    that with `recurrence.constant_a` the leaves of `a` are `[1, 1, ...]` (broadcast)."""
    if not recurrence.constant_a:
        return _all_steps(recurrence.coefficients, params, xs)
    any_input = jnp.zeros(xs.shape[2:], xs.dtype)  # a does not depend on x
    a = jax.tree.map(lambda leaf: leaf[None, None], recurrence.coefficients(params, any_input)[0])
    return a, _all_steps(lambda params, x: recurrence.coefficients(params, x)[1], params, xs)


def _reset_coefficients(resets: Array, a: Any, b: Any, default: State) -> tuple[Any, Any]:
    """`(a, b)` (leaves `[T, B, ...]`; `a`'s may be `[1, 1, ...]`) with the steps where
    `resets [T, B]` started from `default` (one example's state): `h_t = a_t r + b_t` is
    the step `(0, b_t + a_t r)`. `a` comes back full-size."""
    a = jax.tree.map(lambda a_leaf, b_leaf: jnp.broadcast_to(a_leaf, b_leaf.shape), a, b)
    b = jax.tree.map(lambda a_leaf, b_leaf, r: b_leaf + _where_valid(resets, a_leaf * r, 0.0), a, b, default)
    return _where_valid(~resets, a, 0.0), b


def _all_steps(fn, params: Params, xs: Array) -> tuple[Any, Any]:
    """`fn(params, x)` of one step, for every step and example of `xs: [T, B, I]`."""
    return jax.vmap(jax.vmap(fn, in_axes=(None, 0)), in_axes=(None, 0))(params, xs)


def _where_valid(valid: Array, tree: Any, fill: float) -> Any:
    """Each leaf `[T, B, ...]` at `[t, b]` where `valid[t, b]`, else `fill`."""
    return jax.tree.map(
        lambda leaf: jnp.where(valid.reshape(valid.shape + (1,) * (leaf.ndim - 2)), leaf, fill), tree
    )


def _states(a: Array, b: Array, h0: Array, solver: _Solver) -> Array:
    """`h_t = a_t h_{t-1} + b_t` for all `t` (`b: [T, ...]`, `h0: [...]`), with `h0`
    folded into `b_0`. `a` is `[T, ...]`, or broadcast from `[1, ...]` when it is the same
    at every step.

    The states solve the bidiagonal linear system `M h = b`, `(M h)_t = h_t − a_t h_{t-1}`.
    `jax.lax.custom_linear_solve` lets JAX differentiate the solution implicitly: the
    backward pass is one more scan, `M^T λ = ḡ`, run from the last step to the first
    (`λ_t = ḡ_t + a_{t+1} λ_{t+1}`). That keeps the parameter gradients out of the loop
    (and, for the associative scan, avoids transposing every slice and pad inside
    `associative_scan`); forward-mode derivatives keep working.
    """
    b = b.at[0].add(a[0] * h0)
    return jax.lax.custom_linear_solve(
        lambda h: h - a * _previous(h),
        b,
        solve=lambda _, rhs: _prefix_states(a, rhs, solver),
        transpose_solve=lambda _, rhs: _suffix_states(a, rhs, solver),
    )


def _previous(h: Array) -> Array:
    """`h_{t-1}` at every step `t` of `h: [T, ...]`, zero at `t = 0`."""
    return jnp.concatenate([jnp.zeros_like(h[:1]), h[:-1]])


def _prefix_states(a: Array, b: Array, solver: _Solver) -> Array:
    """`h_t = a_t h_{t-1} + b_t` from `h_{-1} = 0`, for every `t`."""
    if solver.parallel and solver.block_size > 1:
        return _blocked_states(a, b, solver.block_size, solver.unroll, reverse=False)
    if solver.parallel:
        return jax.lax.associative_scan(_compose, (jnp.broadcast_to(a, b.shape), b))[1]
    return _sequential_states(a, b, solver.unroll, reverse=False)


def _suffix_states(a: Array, g: Array, solver: _Solver) -> Array:
    """`λ_t = g_t + a_{t+1} λ_{t+1}` from `λ_T = 0`: the transposed system `M^T λ = g`,
    from the last step to the first. (`a_T` multiplies `λ_T = 0`, so an `a` constant
    over time serves as `a_{t+1}` unchanged.)"""
    a_next = a if a.shape[0] == 1 else jnp.concatenate([a[1:], jnp.zeros_like(a[:1])])
    if solver.parallel and solver.block_size > 1:
        return _blocked_states(a_next, g, solver.block_size, solver.unroll, reverse=True)
    if solver.parallel:
        return jax.lax.associative_scan(_compose, (jnp.broadcast_to(a_next, g.shape), g), reverse=True)[1]
    return _sequential_states(a_next, g, solver.unroll, reverse=True)


def _sequential_states(a: Array, b: Array, unroll: int, reverse: bool) -> Array:
    """`h_t = a_t h_{t∓1} + b_t` from zero, by `lax.scan` over `t` (backwards if
    `reverse`); an `a: [1, ...]` is the same at every step."""
    constant = a.shape[0] == 1

    def step(h: Array, inputs: Any) -> tuple[Array, Array]:
        a_t, b_t = (a[0], inputs) if constant else inputs
        h = a_t * h + b_t
        return h, h

    return jax.lax.scan(step, jnp.zeros_like(b[0]), b if constant else (a, b), reverse=reverse, unroll=unroll)[1]


def _blocked_states(a: Array, b: Array, block: int, unroll: int, reverse: bool) -> Array:
    """`h_t = a_t h_{t∓1} + b_t` from zero (backwards if `reverse`), by a two-level scan.

    Time is cut into `K = ceil(T / block)` blocks of `block` steps (`b` padded with zeros
    at the end, which leaves every real state unchanged). Three passes:
      1. every block's summary `(Π a, h_end)`, the composition of its steps (its end
         state from zero), by `block` sequential steps that advance all `K` blocks at once;
      2. `jax.lax.associative_scan` over the `K` summaries: the state entering each block;
      3. `block` more steps over all blocks from those states, writing every `h_t`.
    That is `2·block + O(log K)` sequential steps of `O(K·B·N)` work, against `T` steps of
    `O(B·N)` for `lax.scan`, with only multiplications and additions (no division), so it
    is as accurate as the sequential scan. Blocks are read in place, `[K, block, ...]`.

    Args:
      a: `[T, ...]`, or `[1, ...]` when the same at every step.
      b: `[T, ...]`.
      block: steps per block (`>= 1`).
      unroll: loop iterations unrolled in passes 1 and 3.
      reverse: scan from the last step to the first.

    Returns:
      The states, `[T, ...]`.
    """
    num_steps = b.shape[0]
    num_blocks = -(-num_steps // block)
    pad = num_blocks * block - num_steps
    constant = a.shape[0] == 1
    if pad:
        b = jnp.pad(b, [(0, pad)] + [(0, 0)] * (b.ndim - 1))
        if not constant:
            a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    b = b.reshape((num_blocks, block) + b.shape[1:])
    a = a[0] if constant else a.reshape(b.shape)

    def step_coefficients(i: Array) -> tuple[Array, Array]:
        """`(a_t, b_t)` of every block, `[K, ...]`, at its `i`-th step in scan order."""
        t = block - 1 - i if reverse else i
        b_t = jax.lax.dynamic_index_in_dim(b, t, axis=1, keepdims=False)
        return (a if constant else jax.lax.dynamic_index_in_dim(a, t, axis=1, keepdims=False)), b_t

    def summary_step(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        h, product = carry
        a_t, b_t = step_coefficients(i)
        return a_t * h + b_t, a_t * product

    zeros = jnp.zeros_like(b[:, 0])
    ends, products = jax.lax.fori_loop(
        0, block, summary_step, (zeros, jnp.ones_like(a if constant else a[:, 0])), unroll=unroll
    )
    totals = jax.lax.associative_scan(_compose, (jnp.broadcast_to(products, ends.shape), ends), reverse=reverse)[1]
    entering = jnp.concatenate([totals[1:], zeros[:1]] if reverse else [zeros[:1], totals[:-1]])

    def state_step(i: Array, carry: tuple[Array, Array]) -> tuple[Array, Array]:
        h, hs = carry
        a_t, b_t = step_coefficients(i)
        h = a_t * h + b_t
        return h, jax.lax.dynamic_update_index_in_dim(hs, h, block - 1 - i if reverse else i, axis=1)

    hs = jax.lax.fori_loop(0, block, state_step, (entering, jnp.zeros_like(b)), unroll=unroll)[1]
    return hs.reshape((num_blocks * block,) + hs.shape[2:])[:num_steps]


def _compose(earlier: tuple[Array, Array], later: tuple[Array, Array]) -> tuple[Array, Array]:
    a1, b1 = earlier
    a2, b2 = later
    return a1 * a2, a2 * b1 + b2


@jax.custom_jvp
def _log_space_states(log_a: Array, log_b: Array, h0: Array) -> Array:
    """`_states(exp(log_a), exp(log_b), h0)`, computed by a scan in log space.

    One log-space scan gives `Σ_{s<=t} log a_s` and `log s_t`, `s_t` the state reached
    from zero; then `h_t = exp(Σ_{s<=t} log a_s) h0 + s_t`. `h0` stays outside the
    logarithm since it may be zero or negative (the default initial state is zero).
    """
    log_decay, log_s = jax.lax.associative_scan(_log_compose, (log_a, log_b))
    return jnp.exp(log_decay) * h0 + jnp.exp(log_s)


@_log_space_states.defjvp
def _log_space_states_jvp(primals, tangents):
    """`dh_t = a_t dh_{t-1} + a_t h_{t-1} d(log a_t) + b_t d(log b_t)`, `dh_{-1} = dh0`:
    the same recurrence, scanned in linear space (`a_t <= 1` for the cells here)."""
    log_a, log_b, h0 = primals
    d_log_a, d_log_b, d_h0 = tangents
    hs = _log_space_states(log_a, log_b, h0)
    a = jnp.exp(log_a)
    previous = jnp.concatenate([h0[None], hs[:-1]])
    d_hs = _states(a, a * previous * d_log_a + jnp.exp(log_b) * d_log_b, d_h0, _Solver(parallel=True, unroll=1))
    return hs, d_hs


def _log_compose(earlier: tuple[Array, Array], later: tuple[Array, Array]) -> tuple[Array, Array]:
    log_a1, log_b1 = earlier
    log_a2, log_b2 = later
    return log_a1 + log_a2, jnp.logaddexp(log_a2 + log_b1, log_b2)
