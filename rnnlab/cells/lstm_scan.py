"""The LSTM over a whole sequence, with a hand-written backward pass.

Autodiff of `lax.scan` over the LSTM's step accumulates the weight gradients inside
the backward loop: `dW_x += x_tᵀ·dg_t` and `dW_h += h_{t-1}ᵀ·dg_t` at every step (`dg_t`:
the gradient of the gate pre-activations), a small matmul and a read and write of
each `[·, G]` accumulator per step (`G = 4H` gate columns, `3H` with CIFG). Here the
backward loop carries only `(dh, dc)` and writes `dg_t`; the weight gradients are then
one matmul each over all `T·B` rows, as cuDNN and oneDNN compute them. The gate
activations are one elementwise pass over `[B, G]` (`tanh(x) = 2σ(2x) − 1` for the `j`
block), saved for the backward pass.

`rnnlab.cells.lstm` attaches `lstm_fused_scan` to every cell with `tanh` and a Python
number as `forget_bias`: TF1's `LSTMCell` options (peepholes, `cell_clip`, `num_proj`,
`proj_clip`), CIFG (the input gate `1 − f`), and the layer norms of `layer_norm=True`
(per gate) and `layer_norm_cell=True` (of the cell before the output's `tanh`) are
differentiated by hand as well (the projection's weight gradient, like the others,
after the loop). `rnnlab.unroll` uses it for `method="scan"` unless the step is
rematerialised (`fused=None`), with the input projection of all steps hoisted out of
the loop where `rnnlab.unroll` hoists. It gives the numbers of the step under
`lax.scan` up to rounding (tested, values and gradients; in bfloat16 the `tanh` by way
of `σ` rounds a little differently). Being a `jax.custom_vjp`, it supports reverse mode
only (also nested, and `jax.hessian`, forward over reverse); `jax.jvp` or `jax.jacfwd`
straight through it raise a `TypeError` that points to
`rnnlab.unroll(..., fused=False)`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rnnlab.cells.base import Array, Params, State
from rnnlab.cells import fused

GATES = ("i", "j", "f", "o")
"""The order of the gate columns; CIFG has no `i` (`j, f, o`)."""

PEEPHOLES = {"i": "w_i_diag", "f": "w_f_diag", "o": "w_o_diag"}
"""The diagonal peephole weight of each gate that has one (`i` and `f` read the entering
cell, `o` the new one)."""


def lstm_fused_scan(
    forget_bias: float,
    layer_norm_epsilon: Optional[float] = None,
    peepholes: bool = False,
    cell_clip: Optional[float] = None,
    projection: bool = False,
    proj_clip: Optional[float] = None,
    coupled_input_forget: bool = False,
    layer_norm_cell: bool = False,
) -> Callable[..., tuple[Array, State]]:
    """The fused scan of `lstm(num_units, forget_bias=forget_bias, peepholes=...,
    cell_clip=..., num_proj=..., proj_clip=..., coupled_input_forget=...)`; with
    `layer_norm_epsilon`, of `lstm(..., layer_norm=True, layer_norm_cell=...)` (gates
    normalised per gate; `layer_norm_cell`, which needs `layer_norm_epsilon`, also the
    cell before the output's `tanh`, with the same epsilon). `projection`: the cell has
    `num_proj` (params `w_proj: [H, R]`).

    Returns:
      `(params, xs, state, lengths, unroll, hoist) -> (ys, final_state)` with time-major
      `xs: [T, B, I]`, the batched `LSTMState` (`c: [B, H]`, `h: [B, R]`), `lengths:
      [B]` or `None` (for `t >= lengths[b]` the state is carried and the output is
      zero), `unroll` steps per loop iteration, `hoist`: the input projection of all
      steps in one matmul before the loop; `ys: [T, B, R]`.
    """
    gates = GATES[1:] if coupled_input_forget else GATES

    def fused_scan(
        params: Params, xs: Array, state: State, lengths: Optional[Array], unroll: int = 1, hoist: bool = False
    ) -> tuple[Array, State]:
        options = _Options(forget_bias, layer_norm_epsilon, unroll, hoist, gates, peepholes, cell_clip, proj_clip)
        keys = ("w_x", "w_h") + (("ln_scale", "ln_shift") if layer_norm_epsilon is not None else ("b",))
        keys += ("ln_cell_scale", "ln_cell_shift") if layer_norm_cell else ()
        keys += tuple(PEEPHOLES[gate] for gate in gates if peepholes and gate in PEEPHOLES)
        keys += ("w_proj",) if projection else ()
        arrays = {key: params[key] for key in keys}  # a plain dict, whatever the caller's container
        with fused.reverse_mode_only():
            ys, (c, h) = _lstm_sequence(options, arrays, xs, state.c, state.h, fused.valid_steps(xs, lengths))
        return ys, state._replace(c=c, h=h)

    return fused_scan


class _Options(NamedTuple):
    """The static settings of one fused scan (a projection and the cell's layer norm
    show in the params: `w_proj`, `ln_cell_scale`)."""

    forget_bias: float
    layer_norm_epsilon: Optional[float]  # None: no layer norm (the params have a bias `b`)
    unroll: int
    hoist: bool  # the input projection of all steps in one matmul before the loop
    gates: tuple[str, ...]  # the order of the gate columns: `GATES`, or without `i` (CIFG)
    peepholes: bool
    cell_clip: Optional[float]
    proj_clip: Optional[float]


def _gate_constants(gates: tuple[str, ...], num_units: int, forget_bias: float, dtype) -> tuple[Array, Array, Array]:
    """`(scale, shift, offset)`, each `[G]` (`G = len(gates)·H`), with
    `σ(g·scale + shift)·scale + offset` giving `σ(i), tanh(j), σ(f + forget_bias), σ(o)`
    (those of `gates`, in their order) for gate pre-activations `g`."""

    def per_gate(values: dict[str, float], default: float) -> Array:
        return jnp.repeat(jnp.asarray([values.get(gate, default) for gate in gates], dtype), num_units)

    return per_gate({"j": 2}, 1), per_gate({"f": forget_bias}, 0), per_gate({"j": -1}, 0)


def _split_gates(acts: Array, gates: tuple[str, ...]) -> tuple[Array, Array, Array, Array]:
    """`i, j, f, o`, each `[B, H]`, from the gate activations `acts: [B, G]` ordered as
    `gates`; without an `i` block (CIFG) the input gate is `1 − f`."""
    split = dict(zip(gates, jnp.split(acts, len(gates), axis=-1)))
    if "i" not in split:
        split["i"] = 1 - split["f"]
    return split["i"], split["j"], split["f"], split["o"]


def _per_gate(v: Array, num_gates: int) -> Array:
    """`[B, G] -> [B, num_gates, H]`."""
    return v.reshape(v.shape[:-1] + (num_gates, -1))


def normalise(v: Array, epsilon: float) -> tuple[Array, Array]:
    """`v: [..., n]` to zero mean and unit variance over its last axis: `(normed [..., n],
    1/σ [..., 1])`, with `σ² = Var(v) + epsilon`.

    The statistics take one pass over `v`, `Var(v) = E[v²] − E[v]²` accumulated in at
    least float32 (Flax's `LayerNorm` default): XLA:CPU then reads `v` once for both,
    which made the LN-LSTM's train step 3-6 % faster than two passes (docs/benchmarks.md).
    It loses precision only where the mean of `v` is many times its spread, e.g. 6e-6 of
    the variance where the mean is 10x the standard deviation.
    """
    wide = v.astype(jnp.promote_types(v.dtype, jnp.float32))
    mean = jnp.mean(wide, axis=-1, keepdims=True)
    variance = jnp.maximum(jnp.mean(wide * wide, axis=-1, keepdims=True) - mean * mean, 0.0)
    inverse_std = jax.lax.rsqrt(variance + epsilon)
    return ((wide - mean) * inverse_std).astype(v.dtype), inverse_std.astype(v.dtype)


def _normalise_backward(d_normed: Array, normed: Array, inverse_std: Array) -> Array:
    """The gradient of `normalise`'s input `[..., n]` from that of its output `d_normed`,
    given its outputs `normed [..., n]` and `1/σ [..., 1]`."""
    mean_d = jnp.mean(d_normed, axis=-1, keepdims=True)
    mean_dn = jnp.mean(d_normed * normed, axis=-1, keepdims=True)
    return inverse_std * (d_normed - mean_d - normed * mean_dn)


def _plus_gain_and_shift(sums: dict[str, Array], prefix: str, d_out: Array, normed: Array) -> dict[str, Array]:
    """`sums` plus one step's gradients of the gain `{prefix}scale` and the shift
    `{prefix}shift` of a layer norm `normed·gain + shift`, from `normed: [B, n]` and the
    gradient of the output `d_out: [B, n]`."""
    gain, shift = prefix + "scale", prefix + "shift"
    return {**sums, gain: sums[gain] + jnp.sum(d_out * normed, axis=0), shift: sums[shift] + jnp.sum(d_out, axis=0)}


def _forward(options, params, xs, c0, h0, valid):
    """The loop over `xs: [T, B, I]` from `c0: [B, H]`, `h0: [B, R]`, `valid: [T, B]` or
    `None`: outputs `ys [T, B, R]`, the carried states `cs [T, B, H]`, `hs [T, B, R]`
    after every step (`hs` is `ys` without lengths), the gate activations
    `acts [T, B, G]`, with layer norm the normalised gates `[T, B, G]` and
    `1/σ [T, B, G/H, 1]`, with the cell's layer norm the normalised cells `[T, B, H]` and
    `1/σ [T, B, 1]`, with a projection its inputs `ms [T, B, H]`, and with clips their
    derivatives (`[T, B, H]` for the cell, `[T, B, R]` for the projection)."""
    num_gates = len(options.gates)
    num_units = params["w_h"].shape[1] // num_gates
    dtype = jnp.result_type(xs, params["w_x"], params["w_h"])
    scale, shift, offset = _gate_constants(options.gates, num_units, options.forget_bias, dtype)
    layer_norm = options.layer_norm_epsilon is not None
    layer_norm_cell = "ln_cell_scale" in params
    projection = "w_proj" in params
    loop_xs, preactivations = fused.loop_preactivations(xs, params["w_x"], params["w_h"], options.hoist)

    def step(carry, inputs):
        c, h = carry
        x, valid_t = inputs
        v = preactivations(x, h)
        if layer_norm:
            normed, inverse_std = normalise(_per_gate(v, num_gates), options.layer_norm_epsilon)
            normed = normed.reshape(v.shape)
            v, norms = normed * params["ln_scale"] + params["ln_shift"], (normed, inverse_std)
        else:
            v, norms = v + params["b"], None
        if options.peepholes:  # i and f read the entering cell, o the new one
            pre = dict(zip(options.gates, jnp.split(v, num_gates, axis=-1)))
            f = jax.nn.sigmoid(pre["f"] + options.forget_bias + params["w_f_diag"] * c)
            i = jax.nn.sigmoid(pre["i"] + params["w_i_diag"] * c) if "i" in pre else 1 - f
            j = jnp.tanh(pre["j"])
            new_c, c_slope = _clipped(f * c + i * j, options.cell_clip)
            o = jax.nn.sigmoid(pre["o"] + params["w_o_diag"] * new_c)
            acts = jnp.concatenate([dict(i=i, j=j, f=f, o=o)[gate] for gate in options.gates], axis=-1)
        else:
            acts = jax.nn.sigmoid(v * scale + shift) * scale + offset
            i, j, f, o = _split_gates(acts, options.gates)
            new_c, c_slope = _clipped(f * c + i * j, options.cell_clip)
        if layer_norm_cell:  # the state keeps the un-normalised cell
            c_normed, c_inverse_std = normalise(new_c, options.layer_norm_epsilon)
            m = o * jnp.tanh(c_normed * params["ln_cell_scale"] + params["ln_cell_shift"])
            cell_norms = (c_normed, c_inverse_std)
        else:
            m, cell_norms = o * jnp.tanh(new_c), None
        if projection:
            new_h, h_slope = _clipped(m @ params["w_proj"], options.proj_clip)
        else:
            new_h, h_slope = m, None
        saved = (acts, norms, cell_norms, m if projection else None, (c_slope, h_slope))
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
    norms' gains and shifts) and writes `dv_t`, the gradient of `x_t·W_x + h_{t-1}·W_h`,
    with a projection that of its output, and with peepholes and layer norm the gates'
    gradient; the gradients of `W_x`, `W_h`, `W_proj`, the peepholes, `b` and `xs`
    follow from all of them at once."""
    (params, xs, c0, h0, valid), (cs, hs, (acts, norms, cell_norms, ms, slopes)) = residuals
    d_ys, (d_c_final, d_h_final) = cotangents
    num_gates = len(options.gates)
    num_units = params["w_h"].shape[1] // num_gates
    is_j = (jnp.arange(num_gates * num_units) // num_units) == options.gates.index("j")
    c_prev = fused.states_before(c0, cs)
    w_h_t = params["w_h"].T
    layer_norm = options.layer_norm_epsilon is not None
    projection = "w_proj" in params

    def step(carry, inputs):
        dc, dh, sums = carry
        d_y, c, c_before, (c_slope, h_slope), a, norms_t, cell_norms_t, valid_t = inputs
        i, j, f, o = _split_gates(a, options.gates)
        dh_total = dh + (d_y if valid_t is None else jnp.where(valid_t[:, None], d_y, 0.0))
        if projection:  # back through clip(m·W_proj)
            d_out = dh_total if h_slope is None else dh_total * h_slope
            d_m = d_out @ params["w_proj"].T
        else:
            d_out, d_m = None, dh_total
        if cell_norms_t is None:
            tanh_c = jnp.tanh(c)
            dc_total, d_cell_out = dc + d_m * o * (1 - tanh_c * tanh_c), None
        else:  # back through `tanh(normed·gain + shift)`, then the normalisation
            c_normed, c_inverse_std = cell_norms_t
            tanh_c = jnp.tanh(c_normed * params["ln_cell_scale"] + params["ln_cell_shift"])
            d_cell_out = d_m * o * (1 - tanh_c * tanh_c)
            dc_total = dc + _normalise_backward(d_cell_out * params["ln_cell_scale"], c_normed, c_inverse_std)
        if options.peepholes:
            dc_total = dc_total + d_m * tanh_c * o * (1 - o) * params["w_o_diag"]
        if c_slope is not None:  # back through the cell's clip
            dc_total = dc_total * c_slope
        # The gates' gradients are zero at a skipped step: masked here, on `[B, H]`, so
        # that the `[B, G]` work below has no mask to broadcast (XLA:CPU ran that slower).
        keep = None if valid_t is None else valid_t[:, None]
        dc_gates, d_m_gates = (d if keep is None else jnp.where(keep, d, 0.0) for d in (dc_total, d_m))
        d_f = dc_gates * (c_before if "i" in options.gates else c_before - j)  # CIFG: c' = f·c + (1 − f)·j
        d_acts = dict(i=dc_gates * j, j=dc_gates * i, f=d_f, o=d_m_gates * tanh_c)
        d_acts = [d_acts[gate] for gate in options.gates]
        # `fused.blocks` lets XLA:CPU fuse `dg` into one pass (4-5% faster train step at B=128,
        # T=28, H=128); with peepholes or layer norm `dg` has several consumers, into each
        # of which XLA:CPU would fuse the select again: there a concatenate was faster.
        d_acts = jnp.concatenate(d_acts, axis=-1) if options.peepholes or layer_norm else fused.blocks(d_acts)
        dg = d_acts * jnp.where(is_j, 1 - a * a, a * (1 - a))  # of the gates' pre-activations
        dc_prev = dc_total * f
        if options.peepholes:  # i and f read the entering cell
            d_gates = dict(zip(options.gates, jnp.split(dg, num_gates, axis=-1)))
            dc_prev = sum((d_gates[gate] * params[PEEPHOLES[gate]] for gate in ("i", "f") if gate in d_gates), dc_prev)
        if keep is not None:  # a skipped step passes the state's gradient through
            d_out, d_cell_out = (None if d is None else jnp.where(keep, d, 0.0) for d in (d_out, d_cell_out))
            dc_prev = jnp.where(keep, dc_prev, dc)
            dh = jnp.where(keep, 0.0, dh)
        else:
            dh = 0.0
        if d_cell_out is not None:
            sums = _plus_gain_and_shift(sums, "ln_cell_", d_cell_out, c_normed)
        d_peephole_gates = dg if options.peepholes and layer_norm else None  # without layer norm: dv
        if layer_norm:  # back through `normed·gain + shift`, then the normalisation
            normed, inverse_std = norms_t
            sums = _plus_gain_and_shift(sums, "ln_", dg, normed)
            dv = _normalise_backward(
                _per_gate(dg * params["ln_scale"], num_gates), _per_gate(normed, num_gates), inverse_std
            )
            dg = dv.reshape(dg.shape)
        new_carry = (dc_prev, dg @ w_h_t + dh, sums)
        new_carry = jax.tree.map(lambda new, old: new.astype(old.dtype), new_carry, carry)
        return new_carry, (dg, d_peephole_gates, d_out)

    sums = {key: jnp.zeros(params[key].shape, acts.dtype) for key in params if key.startswith("ln_")}  # gains, shifts
    (dc0, dh0, sums), (dvs, d_peephole_gates, d_outs) = jax.lax.scan(
        step,
        (d_c_final, d_h_final, sums),
        (d_ys, cs, c_prev, slopes, acts, norms, cell_norms, valid),
        reverse=True,
        unroll=options.unroll,
    )
    d_params = {
        "w_x": fused.summed_over_steps(xs, dvs),
        "w_h": fused.summed_over_steps(fused.states_before(h0, hs), dvs),
    }
    d_params.update(sums)
    if not layer_norm:
        d_params["b"] = jnp.sum(dvs, axis=(0, 1))
    if options.peepholes:  # i and f read the entering cell, o the new one
        d_gates = jnp.split(dvs if d_peephole_gates is None else d_peephole_gates, num_gates, axis=-1)
        for gate, d_gate in zip(options.gates, d_gates):
            if gate in PEEPHOLES:
                d_params[PEEPHOLES[gate]] = jnp.sum(d_gate * (cs if gate == "o" else c_prev), axis=(0, 1))
    if projection:
        d_params["w_proj"] = fused.summed_over_steps(ms, d_outs)
    return fused.like((d_params, dvs @ params["w_x"].T, dc0, dh0), (params, xs, c0, h0)) + (None,)


_lstm_sequence = fused.sequence_with_vjp(_forward, _backward)
