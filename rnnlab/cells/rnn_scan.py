"""The basic RNN over a whole sequence, with a hand-written backward pass.

As for the LSTM (`rnnlab.cells.lstm_scan`): the backward loop carries only `dh` and
writes the gradient of every step's pre-activation `x_t·W_x + h_{t-1}·W_h + b`;
`dW_x`, `dW_h` and `b` then take one matmul (or sum) each over all `T·B` rows. For
`tanh` and `relu`, whose derivatives follow from the output (`1 − h'²`, `h' > 0`).
Reverse mode only; `rnnlab.unroll(..., fused=False)` is the way to forward mode.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rnnlab.cells.base import Array, Params, State
from rnnlab.cells import fused

_DERIVATIVES: dict[Callable[[Array], Array], Callable[[Array], Array]] = {
    jnp.tanh: lambda h: 1 - h * h,
    jax.nn.relu: lambda h: (h > 0).astype(h.dtype),
}
"""The activations with a fused scan, and their derivatives as functions of the output."""


def rnn_fused_scan(activation: Callable[[Array], Array]) -> Optional[Callable[..., tuple[Array, State]]]:
    """The fused scan of `basic_rnn(num_units, activation)`, or `None` for an activation
    without one (any but `jnp.tanh` and `jax.nn.relu`).

    The scan maps `(params, xs [T, B, I], h0 [B, H], lengths [B] | None, unroll, hoist)` to
    `(ys [T, B, H], final h [B, H])`; for `t >= lengths[b]` the state is carried and the
    output is zero.
    """
    if activation not in _DERIVATIVES:
        return None

    def fused_scan(
        params: Params, xs: Array, h0: State, lengths: Optional[Array], unroll: int = 1, hoist: bool = False
    ) -> tuple[Array, State]:
        arrays = {key: params[key] for key in ("w_x", "w_h", "b")}  # a plain dict
        with fused.reverse_mode_only():
            return _rnn_sequence(_Options(activation, unroll, hoist), arrays, xs, h0, fused.valid_steps(xs, lengths))

    return fused_scan


class _Options(NamedTuple):
    """The static settings of one fused scan."""

    activation: Callable[[Array], Array]
    unroll: int
    hoist: bool  # the input projection of all steps in one matmul before the loop


def _forward(options, params, xs, h0, valid):
    """The loop over `xs: [T, B, I]` from `h0: [B, H]`, `valid: [T, B]` or `None`:
    outputs `ys [T, B, H]` and the carried states `hs [T, B, H]` (`ys` without lengths)."""
    loop_xs, project = fused.loop_inputs(xs, params["w_x"], options.hoist)

    def step(h, inputs):
        x, valid_t = inputs
        new_h = options.activation(project(x) + h @ params["w_h"] + params["b"])
        if valid_t is None:  # the outputs are the states
            return new_h, (new_h, None)
        keep = valid_t[:, None]
        new_h = jnp.where(keep, new_h, h)
        return new_h, (jnp.where(keep, new_h, 0.0), new_h)

    h, (ys, hs) = jax.lax.scan(step, h0, (loop_xs, valid), unroll=options.unroll)
    return ys, h, ys if hs is None else hs


def _backward(options, residuals, cotangents):
    """The reverse loop carries `dh` and writes the pre-activation gradients `dz_t`."""
    (params, xs, h0, valid), hs = residuals
    d_ys, d_h_final = cotangents
    derivative = _DERIVATIVES[options.activation]
    w_h_t = params["w_h"].T

    def step(dh, inputs):
        d_y, h, valid_t = inputs
        if valid_t is None:
            dz = (dh + d_y) * derivative(h)
            return (dz @ w_h_t).astype(dh.dtype), dz
        keep = valid_t[:, None]
        dz = jnp.where(keep, (dh + d_y) * derivative(h), 0.0)
        return jnp.where(keep, dz @ w_h_t, dh).astype(dh.dtype), dz

    dh0, dzs = jax.lax.scan(step, d_h_final, (d_ys, hs, valid), reverse=True, unroll=options.unroll)
    d_params = {
        "w_x": fused.summed_over_steps(xs, dzs),
        "w_h": fused.summed_over_steps(fused.states_before(h0, hs), dzs),
        "b": jnp.sum(dzs, axis=(0, 1)),
    }
    return fused.like((d_params, dzs @ params["w_x"].T, dh0), (params, xs, h0)) + (None,)


_rnn_sequence = fused.sequence_with_vjp(_forward, _backward)
