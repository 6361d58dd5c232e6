"""What the fused scans of the cells (`lstm_scan`, `gru_scan`, `rnn_scan`) share; the
lengths mask also serves `rnnlab.linear_unroll`."""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp

from rnnlab.cells.base import Array


def valid_steps(xs: Array, lengths: Optional[Array]) -> Optional[Array]:
    """`valid[t, b] = t < lengths[b]`, `[T, B]`, for time-major `xs: [T, B, ...]`; `None`
    without lengths (every step valid)."""
    return None if lengths is None else jnp.arange(xs.shape[0])[:, None] < lengths[None, :]


def states_before(initial: Array, after: Array) -> Array:
    """The state entering every step: `initial [B, H]` then `after [T, B, H]` (the state
    after each step) shifted by one, `[T, B, H]`."""
    return jnp.concatenate([initial[None], after[:-1]])


def summed_over_steps(inputs: Array, grads: Array) -> Array:
    """`Σ_{t,b} inputs[t, b]ᵀ·grads[t, b]`, `[n, m]` from `[T, B, n]` and `[T, B, m]`: a
    weight's gradient from every step at once, one matmul over the `T·B` rows."""
    return inputs.reshape(-1, inputs.shape[-1]).T @ grads.reshape(-1, grads.shape[-1])


def blocks(values: list[Array]) -> Array:
    """`[B, n·H]` whose `k`-th block of `H` columns is `values[k]` (each `[B, H]`): the
    result of `jnp.concatenate(values, axis=-1)`, as a select over a block axis, which
    XLA:CPU fuses with the elementwise work around it (a concatenate runs on its own,
    after a fusion for each of its operands)."""
    block = jnp.arange(len(values))[:, None]  # [n, 1]
    out = values[-1][..., None, :]
    for k in range(len(values) - 2, -1, -1):
        out = jnp.where(block == k, values[k][..., None, :], out)
    return out.reshape(out.shape[:-2] + (-1,))


def loop_inputs(xs: Array, w_x: Array, hoist: bool) -> tuple[Array, Callable[[Array], Array]]:
    """What a forward loop reads at each step, and how it gets `x_t·W_x` from that.

    Not hoisted: `xs [T, B, I]` itself, projected inside the loop (one small matmul
    per step). Hoisted: `xs·W_x [T, B, n]` for all steps at once, one matmul over the
    `T·B` rows before the loop, which leaves only the recurrent matmul in it. The
    backward passes are the same either way (they keep `xs`).
    """
    if hoist:
        return xs @ w_x, lambda projected: projected
    return xs, lambda x: x @ w_x


def loop_preactivations(
    xs: Array, w_x: Array, w_h: Array, hoist: bool
) -> tuple[Array, Callable[[Array, Array], Array]]:
    """What a forward loop reads at each step, and how it gets `x_t·W_x + h·W_h` from
    that and the recurrent input `h: [B, R]`.

    Not hoisted: `xs [T, B, I]` itself, and one matmul per step of `[x_t, h]` by the
    stacked `[I + R, n]` kernel (TF1's layout): 1-3 % faster train steps for the LSTM
    on 2 CPU cores than two matmuls and their sum, 4-6 % with layer norm, where the sum
    had a pass of its own (docs/benchmarks.md). Hoisted: as `loop_inputs`, plus `h·W_h`.
    """
    if hoist:
        projected, project = loop_inputs(xs, w_x, hoist)
        return projected, lambda z, h: project(z) + h @ w_h
    w_xh = jnp.concatenate([w_x, w_h])
    return xs, lambda x, h: jnp.concatenate([x, h], axis=-1) @ w_xh


def like(values: Any, references: Any) -> Any:
    """Each array of `values` cast to the dtype of the matching array of `references`:
    a custom VJP's cotangents must have their primals' dtypes (e.g. bfloat16 inputs
    with float32 params)."""
    return jax.tree.map(lambda value, reference: value.astype(reference.dtype), values, references)


@contextlib.contextmanager
def reverse_mode_only() -> Iterator[None]:
    """Turns JAX's error for forward-mode differentiation of a `jax.custom_vjp` into one
    that says what to do."""
    try:
        yield
    except TypeError as error:
        if "forward-mode" not in str(error):
            raise
        raise TypeError(
            "rnnlab's fused scans (lstm, gru, basic_rnn) are differentiated in reverse mode only; for "
            "jax.jvp or jax.jacfwd through rnnlab.unroll pass fused=False."
        ) from error


def sequence_with_vjp(forward: Callable, backward: Callable) -> Callable:
    """`(options, *arrays) -> (ys, final_state)` with a hand-written backward pass.

    Args:
      forward: `(options, *arrays) -> (ys, final_state, saved)`, the loop; `options` is
        static (hashable), `saved` what the backward pass needs.
      backward: `(options, (arrays, saved), (d_ys, d_final_state)) -> cotangents of
        arrays` (`None` for the boolean `valid` mask).
    """

    @functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
    def sequence(options, *arrays):
        ys, final, _ = forward(options, *arrays)
        return ys, final

    def sequence_forward(options, *arrays):
        ys, final, saved = forward(options, *arrays)
        return (ys, final), (arrays, saved)

    sequence.defvjp(sequence_forward, backward)
    return sequence
