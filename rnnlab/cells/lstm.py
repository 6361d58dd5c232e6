"""LSTM cells: TF1's `LSTMCell` (peepholes, cell clipping, output projection), its
coupled input-forget gate variant (CIFG) and the layer-normalised LSTM.

    cell = lstm(128, peepholes=True, num_proj=64, cell_clip=3.0)
    params = cell.init(key, input_size=28)
    state = cell.initial_state(params)         # LSTMState(c=[128], h=[64])
    state, y = cell.step(params, state, x_t)   # y: [64], the projected output m
"""

from __future__ import annotations

import numbers
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from rnnlab.cells.base import (
    Array,
    Params,
    PRNGKey,
    RNNCell,
    check_positive_int,
    hoistable_cell,
    glorot_uniform,
    is_real_number,
    orthogonal,
)
from rnnlab.cells.lstm_scan import lstm_fused_scan, normalise

LAYER_NORM_EPSILON = 1e-5
"""Added to the variance in every layer norm of the LSTM (TF1's contrib layer norm uses
1e-12, which amplifies float32 rounding noise when a gate's pre-activations are nearly
constant; 1e-5 is PyTorch's default)."""


class LSTMState(NamedTuple):
    """The state of an LSTM for one example.

    Attributes:
      c: `[H]`, the cell state (`H = num_units`).
      h: `[H]`, or `[P]` with a projection (`P = num_proj`): the previous output, which
        TF1 calls `m` when projecting (its state tuple is then `(c, m)`).
    """

    c: Array
    h: Array


def _layer_norm(v: Array, scale: Array, shift: Array) -> Array:
    """Normalises `v` over its last axis to zero mean and unit variance (as the fused
    scan does, `rnnlab.cells.lstm_scan.normalise`), then applies `scale` and `shift`
    (broadcast against `v`)."""
    return normalise(v, LAYER_NORM_EPSILON)[0] * scale + shift


_recomputed_layer_norm = jax.checkpoint(_layer_norm)
"""`_layer_norm` that keeps only its inputs for the backward pass and recomputes the
rest there: inside a scan, storing its intermediates for every step costs more memory
traffic than recomputing them (docs/benchmarks.md)."""


def _check_clip(value: float | None, name: str) -> float | None:
    """Returns `value` as a float (or None), raising `ValueError` unless it is positive."""
    if value is None:
        return None
    if not is_real_number(value) or not value > 0:
        raise ValueError(f"{name} must be a positive number or None, got {value!r}.")
    return float(value)


def _peephole_init(key: PRNGKey, size: int) -> Array:
    """Glorot uniform for a vector (fan_in = fan_out = size), as TF1 and Keras'
    `PeepholeLSTMCell` initialise the diagonal peephole weights."""
    limit = (3.0 / size) ** 0.5
    return jax.random.uniform(key, (size,), minval=-limit, maxval=limit)


def lstm(
    num_units: int,
    *,
    forget_bias: float = 1.0,
    peepholes: bool = False,
    cell_clip: float | None = None,
    num_proj: int | None = None,
    proj_clip: float | None = None,
    coupled_input_forget: bool = False,
    layer_norm: bool = False,
    layer_norm_cell: bool = False,
    activation: Callable[[Array], Array] = jnp.tanh,
) -> RNNCell:
    """TF1's `LSTMCell` with the options of its CIFG and layer-norm relatives.

    With gate pre-activations `i, j, f, o = W_x·x + W_h·h + b` (`h` is the previous
    output, `act = activation`):

        c' = σ(f + forget_bias + w_f⊙c)·c + σ(i + w_i⊙c)·act(j)
        c' = clip(c', -cell_clip, cell_clip)                   # if cell_clip
        h' = σ(o + w_o⊙c')·act(c')
        m  = clip(h'·W_proj, -proj_clip, proj_clip)            # if num_proj (proj_clip)

    The peephole terms `w_·⊙c` appear only with `peepholes=True`. The output and the
    new state's `h` are `m` with a projection, else `h'`.

    * `coupled_input_forget=True` (CIFG, TF1's `CoupledInputForgetGateLSTMCell`): the
      input gate is `1 − σ(f + forget_bias + w_f⊙c)`; there are no `i` columns, so the
      kernels have 3H gate columns ordered `j, f, o` and there is no `w_i_diag`.
    * `layer_norm=True` (TF1's `LayerNormBasicLSTMCell`, Ba et al. 2016): the matmul has
      no bias; each gate's pre-activation is layer-normalised over its H units with its
      own gain and shift (`ln_scale`, `ln_shift`) before `forget_bias` and the peephole
      terms are added, e.g. `σ(LN_f(f) + forget_bias + w_f⊙c)`.
      `layer_norm_cell=True` (requires `layer_norm`) also normalises the cell before
      the output activation, `h' = σ(o + w_o⊙c')·act(LN_c(c'))`; TF1's cell always
      does, so pass it for TF1's `LayerNormBasicLSTMCell`. Unlike TF1's cell,
      whose state keeps `LN_c(c')`, the state here keeps the un-normalised `c'`, as in
      Ba et al.; peepholes read that state. The variance epsilon is
      `LAYER_NORM_EPSILON`; the variance takes one pass, `E[v²] − E[v]²`
      (`rnnlab.cells.lstm_scan.normalise`).

    Every option combines with every other. Invalid settings raise `ValueError`:
    a non-positive `num_units` or `num_proj`, a non-positive `cell_clip`/`proj_clip`,
    `proj_clip` without `num_proj`, `layer_norm_cell` without `layer_norm`.

    Params (input size `I`, `H = num_units`, `G = 4H`, or `3H` with CIFG, gate columns
    ordered `i, j, f, o`, or `j, f, o`; `R = num_proj` if set, else `H`). Initialisers
    follow Keras (TF2) defaults; TF1 cells use Glorot uniform on the joint `[I+R, G]`
    kernel instead:
      `w_x: [I, G]` Glorot uniform; `w_h: [R, G]` orthogonal per `[R, H]` gate block;
      `b: [G]` zeros (absent with `layer_norm`; `forget_bias` is a constant added in
      the step, as in TF1, not part of `b`);
      with `peepholes`: `w_i_diag` (not with CIFG), `w_f_diag`, `w_o_diag`, each `[H]`,
      Glorot uniform as vectors (TF1 / Keras `PeepholeLSTMCell`);
      with `num_proj`: `w_proj: [H, P]` Glorot uniform (TF1's default);
      with `layer_norm`: `ln_scale: [G]` ones, `ln_shift: [G]` zeros (one slice per gate,
      same column order as the kernels);
      with `layer_norm_cell`: `ln_cell_scale: [H]` ones, `ln_cell_shift: [H]` zeros.
    State: `LSTMState(c: [H], h: [R])`, zeros initially. Output: `h` of the new state.

    The split for hoisting: `input_projection(params, x) -> [..., G]` is `x·W_x (+ b)`
    for any leading axes of `x`; `projected_step` does the one recurrent matmul `h·W_h`
    and everything after it (layer norm included).

    The cell with `jnp.tanh` and a Python number as `forget_bias`, whatever its other
    options, also has a `fused_scan` (`rnnlab.cells.lstm_scan`): the whole loop
    with a hand-written backward pass, which `rnnlab.unroll(method="scan")` uses unless
    told `fused=False`.
    """
    num_units = check_positive_int(num_units, "num_units")
    if num_proj is not None:
        num_proj = check_positive_int(num_proj, "num_proj")
    cell_clip = _check_clip(cell_clip, "cell_clip")
    proj_clip = _check_clip(proj_clip, "proj_clip")
    if proj_clip is not None and num_proj is None:
        raise ValueError(
            f"proj_clip={proj_clip} clips the projected output and needs num_proj, which is None."
        )
    if layer_norm_cell and not layer_norm:
        raise ValueError("layer_norm_cell=True requires layer_norm=True.")

    cifg = coupled_input_forget
    num_gates = 3 if cifg else 4
    gates_size = num_gates * num_units
    output_size = num_units if num_proj is None else num_proj
    peephole_keys = ("w_f_diag", "w_o_diag") if cifg else ("w_i_diag", "w_f_diag", "w_o_diag")
    name = _name(
        num_units, peepholes, cifg, layer_norm, layer_norm_cell, cell_clip, num_proj, proj_clip
    )

    def init(key: PRNGKey, input_size: int) -> Params:
        input_size = check_positive_int(input_size, "input_size")
        kx, kh, kd, kp = jax.random.split(key, 4)
        params = {
            "w_x": glorot_uniform(kx, (input_size, gates_size)),
            "w_h": orthogonal(kh, (output_size, num_gates * num_units), num_blocks=num_gates),
        }
        if layer_norm:
            params["ln_scale"] = jnp.ones((gates_size,))
            params["ln_shift"] = jnp.zeros((gates_size,))
        else:
            params["b"] = jnp.zeros((gates_size,))
        if layer_norm_cell:
            params["ln_cell_scale"] = jnp.ones((num_units,))
            params["ln_cell_shift"] = jnp.zeros((num_units,))
        if peepholes:
            for pk, k in zip(peephole_keys, jax.random.split(kd, len(peephole_keys)), strict=True):
                params[pk] = _peephole_init(k, num_units)
        if num_proj is not None:
            params["w_proj"] = glorot_uniform(kp, (num_units, num_proj))
        return params

    def initial_state(params: Params, rng: PRNGKey | None = None) -> LSTMState:
        del rng
        dtype = params["w_h"].dtype
        return LSTMState(c=jnp.zeros((num_units,), dtype), h=jnp.zeros((output_size,), dtype))

    def input_projection(params: Params, x: Array) -> Array:
        z = x @ params["w_x"]
        return z if layer_norm else z + params["b"]

    def projected_step(params: Params, state: LSTMState, z: Array) -> tuple[LSTMState, Array]:
        c, h = state
        gates = z + h @ params["w_h"]
        gates = gates.reshape(gates.shape[:-1] + (num_gates, num_units))
        if layer_norm:
            per_gate = (num_gates, num_units)
            gates = _recomputed_layer_norm(
                gates, params["ln_scale"].reshape(per_gate), params["ln_shift"].reshape(per_gate)
            )
        if cifg:
            j, f, o = jnp.unstack(gates, axis=-2)
        else:
            i, j, f, o = jnp.unstack(gates, axis=-2)

        f = f + forget_bias
        if peepholes:
            f = f + params["w_f_diag"] * c
            if not cifg:
                i = i + params["w_i_diag"] * c
        input_gate = jax.nn.sigmoid(-f) if cifg else jax.nn.sigmoid(i)  # σ(-f) = 1 - σ(f)
        c = jax.nn.sigmoid(f) * c + input_gate * activation(j)
        if cell_clip is not None:
            c = jnp.clip(c, -cell_clip, cell_clip)

        if peepholes:
            o = o + params["w_o_diag"] * c
        c_out = (
            _recomputed_layer_norm(c, params["ln_cell_scale"], params["ln_cell_shift"])
            if layer_norm_cell
            else c
        )
        h = jax.nn.sigmoid(o) * activation(c_out)
        if num_proj is not None:
            h = h @ params["w_proj"]
            if proj_clip is not None:
                h = jnp.clip(h, -proj_clip, proj_clip)
        return LSTMState(c=c, h=h), h

    fused_scan = (
        lstm_fused_scan(
            forget_bias,
            LAYER_NORM_EPSILON if layer_norm else None,
            peepholes=peepholes,
            cell_clip=cell_clip,
            projection=num_proj is not None,
            proj_clip=proj_clip,
            coupled_input_forget=cifg,
            layer_norm_cell=layer_norm_cell,
        )
        if activation is jnp.tanh and isinstance(forget_bias, numbers.Real)
        else None
    )
    return hoistable_cell(
        name, output_size, init, initial_state, input_projection, projected_step, fused_scan=fused_scan
    )


def _name(
    num_units: int,
    peepholes: bool,
    cifg: bool,
    layer_norm: bool,
    layer_norm_cell: bool,
    cell_clip: float | None,
    num_proj: int | None,
    proj_clip: float | None,
) -> str:
    """A short description such as `lstm(128, peepholes, proj=64, cell_clip=3.0)`."""
    flags = [
        ("peepholes", peepholes),
        ("cifg", cifg),
        ("layer_norm", layer_norm),
        ("layer_norm_cell", layer_norm_cell),
    ]
    parts = [str(num_units)] + [flag for flag, on in flags if on]
    values = [("proj", num_proj), ("cell_clip", cell_clip), ("proj_clip", proj_clip)]
    parts += [f"{key}={value}" for key, value in values if value is not None]
    return f"lstm({', '.join(parts)})"
