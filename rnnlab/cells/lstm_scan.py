"""The plain LSTM over a whole sequence, with a hand-written backward pass.

Autodiff of `lax.scan` over the LSTM's step accumulates the weight gradients inside
the backward loop: `dW_x += x_tᵀ·dg_t` and `dW_h += h_{t-1}ᵀ·dg_t` at every step (`dg_t`:
the gradient of the gate pre-activations), a small matmul and a read and write of
each `[·, 4H]` accumulator per step. Here the backward loop carries only `(dh, dc)`
and writes `dg_t`; the weight gradients are then one matmul each over all `T·B` rows,
as cuDNN and oneDNN compute them. The gate activations are one elementwise pass over
`[B, 4H]` (`tanh(x) = 2σ(2x) − 1` for the `j` block), saved for the backward pass.

`rnnlab.cells.lstm` attaches `lstm_fused_scan(forget_bias)` to cells without
peepholes, CIFG, layer norms, clipping or projection (and with `tanh`), and
`rnnlab.unroll` uses it for `method="scan"` when the step is neither hoisted nor
rematerialised (`fused=None`, the default on CPU). It gives the numbers of the step
under `lax.scan` up to rounding (tested, values and gradients).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from rnnlab.cells.base import Array, Params, State


def lstm_fused_scan(forget_bias: float) -> Callable[..., tuple[Array, State]]:
    """The fused scan of `lstm(num_units, forget_bias=forget_bias)`.

    Returns:
      `(params, xs, state, lengths, unroll) -> (ys, final_state)` with time-major
      `xs: [T, B, I]`, the batched `LSTMState` (`c, h: [B, H]`), `lengths: [B]` or
      `None` (for `t >= lengths[b]` the state is carried and the output is zero),
      `unroll` steps per loop iteration; `ys: [T, B, H]`.
    """

    def fused_scan(
        params: Params, xs: Array, state: State, lengths: Optional[Array], unroll: int = 1
    ) -> tuple[Array, State]:
        valid = None if lengths is None else jnp.arange(xs.shape[0])[:, None] < lengths[None, :]  # [T, B]
        ys, (c, h) = _lstm_sequence(forget_bias, unroll, params, xs, state.c, state.h, valid)
        return ys, state._replace(c=c, h=h)

    return fused_scan


def _gate_constants(num_units: int, forget_bias: float, dtype) -> tuple[Array, Array, Array]:
    """`(scale, shift, offset)`, each `[4H]`, with `σ(g·scale + shift)·scale + offset`
    giving `σ(i), tanh(j), σ(f + forget_bias), σ(o)` for gate pre-activations `g`."""

    def per_gate(i: float, j: float, f: float, o: float) -> Array:
        return jnp.repeat(jnp.asarray([i, j, f, o], dtype), num_units)

    return per_gate(1, 2, 1, 1), per_gate(0, 0, forget_bias, 0), per_gate(0, -1, 0, 0)


def _forward(forget_bias, unroll, params, xs, c0, h0, valid):
    """The loop: outputs `ys [T, B, H]`, the carried states `cs, hs [T, B, H]` after
    every step (`hs` is `ys` without lengths) and the gate activations `acts [T, B, 4H]`."""
    num_units = params["w_h"].shape[1] // 4
    scale, shift, offset = _gate_constants(num_units, forget_bias, xs.dtype)

    def step(carry, inputs):
        c, h = carry
        x, valid_t = inputs
        acts = jax.nn.sigmoid((x @ params["w_x"] + params["b"] + h @ params["w_h"]) * scale + shift) * scale + offset
        i, j, f, o = jnp.split(acts, 4, axis=-1)
        new_c = f * c + i * j
        new_h = o * jnp.tanh(new_c)
        if valid_t is None:  # the outputs are the states
            return (new_c, new_h), (new_h, new_c, None, acts)
        keep = valid_t[:, None]
        new_c, new_h = jnp.where(keep, new_c, c), jnp.where(keep, new_h, h)
        return (new_c, new_h), (jnp.where(keep, new_h, 0.0), new_c, new_h, acts)

    (c, h), (ys, cs, hs, acts) = jax.lax.scan(step, (c0, h0), (xs, valid), unroll=unroll)
    return ys, (c, h), (cs, ys if hs is None else hs, acts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _lstm_sequence(forget_bias, unroll, params, xs, c0, h0, valid):
    ys, final, _ = _forward(forget_bias, unroll, params, xs, c0, h0, valid)
    return ys, final


def _lstm_sequence_fwd(forget_bias, unroll, params, xs, c0, h0, valid):
    ys, final, (cs, hs, acts) = _forward(forget_bias, unroll, params, xs, c0, h0, valid)
    return (ys, final), (params, xs, c0, h0, valid, cs, hs, acts)


def _lstm_sequence_bwd(forget_bias, unroll, residuals, cotangents):
    """The reverse loop carries `(dc, dh)` and writes the gate gradients `dg_t`; the
    gradients of `W_x`, `W_h`, `b` and `xs` follow from all `dg` at once."""
    del forget_bias
    params, xs, c0, h0, valid, cs, hs, acts = residuals
    d_ys, (d_c_final, d_h_final) = cotangents
    num_units = params["w_h"].shape[1] // 4
    is_j = (jnp.arange(4 * num_units) // num_units) == 1
    c_prev = jnp.concatenate([c0[None], cs[:-1]])
    w_h_t = params["w_h"].T

    def step(carry, inputs):
        dc, dh = carry
        d_y, c, c_before, a, valid_t = inputs
        i, j, f, o = jnp.split(a, 4, axis=-1)
        dh_total = dh + (d_y if valid_t is None else jnp.where(valid_t[:, None], d_y, 0.0))
        tanh_c = jnp.tanh(c)
        dc_total = dc + dh_total * o * (1 - tanh_c * tanh_c)
        d_acts = jnp.concatenate([dc_total * j, dc_total * i, dc_total * c_before, dh_total * tanh_c], axis=-1)
        dg = d_acts * jnp.where(is_j, 1 - a * a, a * (1 - a))
        dc_prev = dc_total * f
        if valid_t is not None:  # a skipped step passes the state's gradient through
            keep = valid_t[:, None]
            dg = jnp.where(keep, dg, 0.0)
            dc_prev = jnp.where(keep, dc_prev, dc)
            return (dc_prev, dg @ w_h_t + jnp.where(keep, 0.0, dh)), dg
        return (dc_prev, dg @ w_h_t), dg

    (dc0, dh0), dgs = jax.lax.scan(
        step, (d_c_final, d_h_final), (d_ys, cs, c_prev, acts, valid), reverse=True, unroll=unroll
    )
    h_prev = jnp.concatenate([h0[None], hs[:-1]])
    rows = lambda a: a.reshape(-1, a.shape[-1])  # [T, B, n] -> [T·B, n]
    d_params = {
        "w_x": rows(xs).T @ rows(dgs),
        "w_h": rows(h_prev).T @ rows(dgs),
        "b": jnp.sum(dgs, axis=(0, 1)),
    }
    return d_params, dgs @ params["w_x"].T, dc0, dh0, None


_lstm_sequence.defvjp(_lstm_sequence_fwd, _lstm_sequence_bwd)
