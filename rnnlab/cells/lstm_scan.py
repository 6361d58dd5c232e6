"""The LSTM over a whole sequence, with a hand-written backward pass.

Autodiff of `lax.scan` over the LSTM's step accumulates the weight gradients inside
the backward loop: `dW_x += x_tᵀ·dg_t` and `dW_h += h_{t-1}ᵀ·dg_t` at every step (`dg_t`:
the gradient of the gate pre-activations), a small matmul and a read and write of
each `[·, 4H]` accumulator per step. Here the backward loop carries only `(dh, dc)`
and writes `dg_t`; the weight gradients are then one matmul each over all `T·B` rows,
as cuDNN and oneDNN compute them. The gate activations are one elementwise pass over
`[B, 4H]` (`tanh(x) = 2σ(2x) − 1` for the `j` block), saved for the backward pass.

`rnnlab.cells.lstm` attaches `lstm_fused_scan` to cells with `tanh` and without CIFG
or `layer_norm_cell`: TF1's `LSTMCell` options (peepholes, `cell_clip`, `num_proj`,
`proj_clip`) and the gate layer norm of `layer_norm=True` are differentiated by hand
as well (the projection's weight gradient, like the others, after the loop).
`rnnlab.unroll` uses it for `method="scan"` unless the step is rematerialised
(`fused=None`), with the input projection of all steps hoisted out of the loop where
`rnnlab.unroll` hoists. It gives the numbers of the step under `lax.scan` up to
rounding (tested, values and gradients; in bfloat16 the `tanh` by way of `σ` rounds a
little differently). Being a `jax.custom_vjp`, it supports reverse mode only (also
nested, and `jax.hessian`, forward over reverse); `jax.jvp` or `jax.jacfwd` straight
through it raise a `TypeError` that points to `rnnlab.unroll(..., fused=False)`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rnnlab.cells.base import Array, Params, State
from rnnlab.cells import fused

PEEPHOLES = ("w_i_diag", "w_f_diag", "w_o_diag")


def lstm_fused_scan(
    forget_bias: float,
    layer_norm_epsilon: Optional[float] = None,
    peepholes: bool = False,
    cell_clip: Optional[float] = None,
    projection: bool = False,
    proj_clip: Optional[float] = None,
) -> Callable[..., tuple[Array, State]]:
    """The fused scan of `lstm(num_units, forget_bias=forget_bias, peepholes=...,
    cell_clip=..., num_proj=..., proj_clip=...)`; with `layer_norm_epsilon`, of
    `lstm(..., layer_norm=True)` (gates normalised per gate). `projection`: the cell
    has `num_proj` (params `w_proj: [H, R]`).

    Returns:
      `(params, xs, state, lengths, unroll, hoist) -> (ys, final_state)` with time-major
      `xs: [T, B, I]`, the batched `LSTMState` (`c: [B, H]`, `h: [B, R]`), `lengths:
      [B]` or `None` (for `t >= lengths[b]` the state is carried and the output is
      zero), `unroll` steps per loop iteration, `hoist`: the input projection of all
      steps in one matmul before the loop; `ys: [T, B, R]`.
    """

    def fused_scan(
        params: Params, xs: Array, state: State, lengths: Optional[Array], unroll: int = 1, hoist: bool = False
    ) -> tuple[Array, State]:
        options = _Options(forget_bias, layer_norm_epsilon, unroll, hoist, peepholes, cell_clip, proj_clip)
        keys = ("w_x", "w_h") + (("ln_scale", "ln_shift") if layer_norm_epsilon is not None else ("b",))
        keys += (PEEPHOLES if peepholes else ()) + (("w_proj",) if projection else ())
        arrays = {key: params[key] for key in keys}  # a plain dict, whatever the caller's container
        with fused.reverse_mode_only():
            ys, (c, h) = _lstm_sequence(options, arrays, xs, state.c, state.h, fused.valid_steps(xs, lengths))
        return ys, state._replace(c=c, h=h)

    return fused_scan


class _Options(NamedTuple):
    """The static settings of one fused scan."""

    forget_bias: float
    layer_norm_epsilon: Optional[float]  # None: no layer norm (the params have a bias `b`)
    unroll: int
    hoist: bool  # the input projection of all steps in one matmul before the loop
    peepholes: bool
    cell_clip: Optional[float]
    proj_clip: Optional[float]


def _gate_constants(num_units: int, forget_bias: float, dtype) -> tuple[Array, Array, Array]:
    """`(scale, shift, offset)`, each `[4H]`, with `σ(g·scale + shift)·scale + offset`
    giving `σ(i), tanh(j), σ(f + forget_bias), σ(o)` for gate pre-activations `g`."""

    def per_gate(i: float, j: float, f: float, o: float) -> Array:
        return jnp.repeat(jnp.asarray([i, j, f, o], dtype), num_units)

    return per_gate(1, 2, 1, 1), per_gate(0, 0, forget_bias, 0), per_gate(0, -1, 0, 0)


def _per_gate(v: Array) -> Array:
    """`[B, 4H] -> [B, 4, H]`."""
    return v.reshape(v.shape[:-1] + (4, -1))


def _normalise_per_gate(v: Array, epsilon: float) -> tuple[Array, Array]:
    """Each gate's `H` pre-activations of `v: [B, 4H]` to zero mean and unit variance:
    `(normed [B, 4H], 1/σ [B, 4, 1])`."""
    gates = _per_gate(v)
    centred = gates - jnp.mean(gates, axis=-1, keepdims=True)
    inverse_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + epsilon)
    return (centred * inverse_std).reshape(v.shape), inverse_std


def _forward(options, params, xs, c0, h0, valid):
    """The loop over `xs: [T, B, I]` from `c0: [B, H]`, `h0: [B, R]`, `valid: [T, B]` or
    `None`: outputs `ys [T, B, R]`, the carried states `cs [T, B, H]`, `hs [T, B, R]`
    after every step (`hs` is `ys` without lengths), the gate activations
    `acts [T, B, 4H]`, with layer norm the normalised gates `[T, B, 4H]` and
    `1/σ [T, B, 4, 1]`, with a projection its inputs `ms [T, B, H]`, and with clips
    their derivatives (`[T, B, H]` for the cell, `[T, B, R]` for the projection)."""
    num_units = params["w_h"].shape[1] // 4
    dtype = jnp.result_type(xs, params["w_x"], params["w_h"])
    scale, shift, offset = _gate_constants(num_units, options.forget_bias, dtype)
    layer_norm = options.layer_norm_epsilon is not None
    projection = "w_proj" in params
    loop_xs, project = fused.loop_inputs(xs, params["w_x"], options.hoist)

    def step(carry, inputs):
        c, h = carry
        x, valid_t = inputs
        v = project(x) + h @ params["w_h"]
        if layer_norm:
            normed, inverse_std = _normalise_per_gate(v, options.layer_norm_epsilon)
            v, norms = normed * params["ln_scale"] + params["ln_shift"], (normed, inverse_std)
        else:
            v, norms = v + params["b"], None
        if options.peepholes:  # i and f read the entering cell, o the new one
            v_i, v_j, v_f, v_o = jnp.split(v, 4, axis=-1)
            i = jax.nn.sigmoid(v_i + params["w_i_diag"] * c)
            j = jnp.tanh(v_j)
            f = jax.nn.sigmoid(v_f + options.forget_bias + params["w_f_diag"] * c)
            new_c, c_slope = _clipped(f * c + i * j, options.cell_clip)
            o = jax.nn.sigmoid(v_o + params["w_o_diag"] * new_c)
            acts = jnp.concatenate([i, j, f, o], axis=-1)
        else:
            acts = jax.nn.sigmoid(v * scale + shift) * scale + offset
            i, j, f, o = jnp.split(acts, 4, axis=-1)
            new_c, c_slope = _clipped(f * c + i * j, options.cell_clip)
        m = o * jnp.tanh(new_c)
        if projection:
            new_h, h_slope = _clipped(m @ params["w_proj"], options.proj_clip)
        else:
            new_h, h_slope = m, None
        saved = (acts, norms, m if projection else None, (c_slope, h_slope))
        if valid_t is None:  # the outputs are the states
            return (new_c, new_h), (new_h, new_c, None, saved)
        keep = valid_t[:, None]
        new_c, new_h = jnp.where(keep, new_c, c), jnp.where(keep, new_h, h)
        return (new_c, new_h), (jnp.where(keep, new_h, 0.0), new_c, new_h, saved)

    (c, h), (ys, cs, hs, saved) = jax.lax.scan(step, (c0, h0), (loop_xs, valid), unroll=options.unroll)
    return ys, (c, h), (cs, ys if hs is None else hs, saved)


def _clipped(v: Array, clip: Optional[float]) -> tuple[Array, Optional[Array]]:
    """`(clip(v, ±clip), its derivative)`, or `(v, None)` when `clip` is `None`. The
    derivative is the one autodiff of `jnp.clip` takes: 1 inside, 0 outside and ½
    where `|v|` equals `clip` (ties are not rare in bfloat16)."""
    if clip is None:
        return v, None
    slope = jnp.where(jnp.abs(v) < clip, 1.0, jnp.where(jnp.abs(v) == clip, 0.5, 0.0)).astype(v.dtype)
    return jnp.clip(v, -clip, clip), slope


def _backward(options, residuals, cotangents):
    """The reverse loop carries `(dc, dh)` (and the sums of the gradients of the layer
    norm's gain and shift) and writes `dv_t`, the gradient of `x_t·W_x + h_{t-1}·W_h`,
    with a projection that of its output, and with peepholes and layer norm the gates'
    gradient; the gradients of `W_x`, `W_h`, `W_proj`, the peepholes, `b` and `xs`
    follow from all of them at once."""
    (params, xs, c0, h0, valid), (cs, hs, (acts, norms, ms, slopes)) = residuals
    d_ys, (d_c_final, d_h_final) = cotangents
    num_units = params["w_h"].shape[1] // 4
    is_j = (jnp.arange(4 * num_units) // num_units) == 1
    c_prev = fused.states_before(c0, cs)
    w_h_t = params["w_h"].T
    layer_norm = options.layer_norm_epsilon is not None
    projection = "w_proj" in params

    def step(carry, inputs):
        dc, dh, (d_gain, d_shift) = carry
        d_y, c, c_before, (c_slope, h_slope), a, norms_t, valid_t = inputs
        i, j, f, o = jnp.split(a, 4, axis=-1)
        dh_total = dh + (d_y if valid_t is None else jnp.where(valid_t[:, None], d_y, 0.0))
        if projection:  # back through clip(m·W_proj)
            d_out = dh_total if h_slope is None else dh_total * h_slope
            d_m = d_out @ params["w_proj"].T
        else:
            d_out, d_m = None, dh_total
        tanh_c = jnp.tanh(c)
        dc_total = dc + d_m * o * (1 - tanh_c * tanh_c)
        if options.peepholes:
            dc_total = dc_total + d_m * tanh_c * o * (1 - o) * params["w_o_diag"]
        if c_slope is not None:  # back through the cell's clip
            dc_total = dc_total * c_slope
        d_acts = jnp.concatenate([dc_total * j, dc_total * i, dc_total * c_before, d_m * tanh_c], axis=-1)
        dg = d_acts * jnp.where(is_j, 1 - a * a, a * (1 - a))  # of the gates' pre-activations
        dc_prev = dc_total * f
        if options.peepholes:  # i and f read the entering cell
            d_i, _, d_f, _ = jnp.split(dg, 4, axis=-1)
            dc_prev = dc_prev + d_i * params["w_i_diag"] + d_f * params["w_f_diag"]
        if valid_t is not None:  # a skipped step passes the state's gradient through
            keep = valid_t[:, None]
            dg = jnp.where(keep, dg, 0.0)
            d_out = None if d_out is None else jnp.where(keep, d_out, 0.0)
            dc_prev = jnp.where(keep, dc_prev, dc)
            dh = jnp.where(keep, 0.0, dh)
        else:
            dh = 0.0
        d_peephole_gates = dg if options.peepholes and layer_norm else None  # without layer norm: dv
        if layer_norm:  # back through `normed·gain + shift`, then the normalisation
            normed, inverse_std = norms_t
            d_gain, d_shift = d_gain + jnp.sum(dg * normed, axis=0), d_shift + jnp.sum(dg, axis=0)
            g = _per_gate(dg * params["ln_scale"])
            n = _per_gate(normed)
            dv = inverse_std * (g - jnp.mean(g, axis=-1, keepdims=True) - n * jnp.mean(g * n, axis=-1, keepdims=True))
            dg = dv.reshape(dg.shape)
        new_carry = (dc_prev, dg @ w_h_t + dh, (d_gain, d_shift))
        new_carry = jax.tree.map(lambda new, old: new.astype(old.dtype), new_carry, carry)
        return new_carry, (dg, d_peephole_gates, d_out)

    zeros = jnp.zeros((4 * num_units,), acts.dtype)
    (dc0, dh0, (d_gain, d_shift)), (dvs, d_peephole_gates, d_outs) = jax.lax.scan(
        step,
        (d_c_final, d_h_final, (zeros, zeros)),
        (d_ys, cs, c_prev, slopes, acts, norms, valid),
        reverse=True,
        unroll=options.unroll,
    )
    d_params = {
        "w_x": fused.summed_over_steps(xs, dvs),
        "w_h": fused.summed_over_steps(fused.states_before(h0, hs), dvs),
    }
    if layer_norm:
        d_params.update(ln_scale=d_gain, ln_shift=d_shift)
    else:
        d_params["b"] = jnp.sum(dvs, axis=(0, 1))
    if options.peepholes:  # i and f read the entering cell, o the new one
        d_i, _, d_f, d_o = jnp.split(dvs if d_peephole_gates is None else d_peephole_gates, 4, axis=-1)
        for key, d_gate, cell in zip(PEEPHOLES, (d_i, d_f, d_o), (c_prev, c_prev, cs)):
            d_params[key] = jnp.sum(d_gate * cell, axis=(0, 1))
    if projection:
        d_params["w_proj"] = fused.summed_over_steps(ms, d_outs)
    return fused.like((d_params, dvs @ params["w_x"].T, dc0, dh0), (params, xs, c0, h0)) + (None,)


_lstm_sequence = fused.sequence_with_vjp(_forward, _backward)
