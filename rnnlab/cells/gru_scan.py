"""The GRU over a whole sequence, with a hand-written backward pass.

As for the LSTM (`rnnlab.cells.lstm_scan`): the backward loop carries only `dh` and
writes the gradients of the input and recurrent pre-activations of every step; the
gradients of `W_x`, `W_h` and the biases are then one matmul (or sum) each over all
`T·B` rows, instead of two small matmuls and accumulator updates per step.

Both forms of `rnnlab.cells.gru` (with `tanh`) have one: TF1's, where the candidate
reads `(r⊙h)·W_h`, and `reset_after`, where it reads `r⊙(h·W_h + b_h)`. Being a
`jax.custom_vjp`, it supports reverse mode only (see `rnnlab.cells.lstm_scan`);
`rnnlab.unroll(..., fused=False)` is the way to forward mode.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from rnnlab.cells.base import Array, Params, State
from rnnlab.cells import fused


def gru_fused_scan(reset_after: bool) -> Callable[..., tuple[Array, State]]:
    """The fused scan of `gru(num_units, reset_after=reset_after)`.

    Returns:
      `(params, xs, h0, lengths, unroll, hoist) -> (ys, final_h)` with time-major
      `xs: [T, B, I]`, the batched state `h0: [B, H]`, `lengths: [B]` or `None` (for
      `t >= lengths[b]` the state is carried and the output is zero), `unroll` steps per
      loop iteration, `hoist`: the input projection of all steps in one matmul before
      the loop; `ys: [T, B, H]`.
    """

    def fused_scan(
        params: Params, xs: Array, h0: State, lengths: Optional[Array], unroll: int = 1, hoist: bool = False
    ) -> tuple[Array, State]:
        keys = ("w_x", "w_h", "b") + (("b_h",) if reset_after else ())
        arrays = {key: params[key] for key in keys}  # a plain dict, whatever the caller's container
        with fused.reverse_mode_only():
            return _gru_sequence(_Options(reset_after, unroll, hoist), arrays, xs, h0, fused.valid_steps(xs, lengths))

    return fused_scan


class _Options(NamedTuple):
    """The static settings of one fused scan."""

    reset_after: bool
    unroll: int
    hoist: bool  # the input projection of all steps in one matmul before the loop


def _forward(options, params, xs, h0, valid):
    """The loop over `xs: [T, B, I]` from `h0: [B, H]`, `valid: [T, B]` or `None`:
    outputs `ys [T, B, H]`, the carried states `hs [T, B, H]` (`ys` without lengths)
    and per step `r, u, ĉ` and the recurrent candidate term, `[T, B, H]` each
    (`h·W_h + b_h` with `reset_after`, else `r⊙h`)."""
    num_units = params["w_h"].shape[0]
    w_h = params["w_h"]
    loop_xs, project = fused.loop_inputs(xs, params["w_x"], options.hoist)

    def step(h, inputs):
        x, valid_t = inputs
        zx = project(x) + params["b"]
        if options.reset_after:
            zh = h @ w_h + params["b_h"]
            r, u = jnp.split(jax.nn.sigmoid(zx[:, : 2 * num_units] + zh[:, : 2 * num_units]), 2, axis=-1)
            recurrent = zh[:, 2 * num_units :]
            candidate = jnp.tanh(zx[:, 2 * num_units :] + r * recurrent)
        else:
            r, u = jnp.split(jax.nn.sigmoid(zx[:, : 2 * num_units] + h @ w_h[:, : 2 * num_units]), 2, axis=-1)
            recurrent = r * h
            candidate = jnp.tanh(zx[:, 2 * num_units :] + recurrent @ w_h[:, 2 * num_units :])
        new_h = u * h + (1 - u) * candidate
        saved = (r, u, candidate, recurrent)
        if valid_t is None:  # the outputs are the states
            return new_h, (new_h, None, saved)
        keep = valid_t[:, None]
        new_h = jnp.where(keep, new_h, h)
        return new_h, (jnp.where(keep, new_h, 0.0), new_h, saved)

    h, (ys, hs, saved) = jax.lax.scan(step, h0, (loop_xs, valid), unroll=options.unroll)
    return ys, h, (ys if hs is None else hs, saved)


def _backward(options, residuals, cotangents):
    """The reverse loop carries `dh` and writes `dzx_t`, the gradient of `x_t·W_x + b`
    (`[T, B, 3H]`), and with `reset_after` `dzh_t`, that of `h_{t-1}·W_h + b_h` (in
    TF1's form the recurrent matmuls' outputs have the gradient `dzx_t`)."""
    (params, xs, h0, valid), (hs, (rs, us, candidates, recurrents)) = residuals
    d_ys, d_h_final = cotangents
    num_units = params["w_h"].shape[0]
    w_h = params["w_h"]
    h_prev = fused.states_before(h0, hs)

    def step(dh, inputs):
        d_y, h_before, r, u, candidate, recurrent, valid_t = inputs
        dh_total = dh + (d_y if valid_t is None else jnp.where(valid_t[:, None], d_y, 0.0))
        d_pre_c = dh_total * (1 - u) * (1 - candidate * candidate)
        d_pre_u = dh_total * (h_before - candidate) * u * (1 - u)
        if options.reset_after:  # ĉ = tanh(zx_c + r⊙recurrent), recurrent = (h·W_h + b_h)_c
            d_pre_r = d_pre_c * recurrent * r * (1 - r)
            dzh = jnp.concatenate([d_pre_r, d_pre_u, d_pre_c * r], axis=-1)
            dh_prev = dh_total * u + dzh @ w_h.T
        else:  # ĉ = tanh(zx_c + recurrent·W_h_c), recurrent = r⊙h; dzh is dzx
            d_recurrent = d_pre_c @ w_h[:, 2 * num_units :].T
            d_pre_r = d_recurrent * h_before * r * (1 - r)
            d_gates = jnp.concatenate([d_pre_r, d_pre_u], axis=-1)
            dh_prev = dh_total * u + d_recurrent * r + d_gates @ w_h[:, : 2 * num_units].T
            dzh = None
        dzx = jnp.concatenate([d_pre_r, d_pre_u, d_pre_c], axis=-1)
        if valid_t is not None:  # a skipped step passes the state's gradient through
            keep = valid_t[:, None]
            dzx = jnp.where(keep, dzx, 0.0)
            dzh = None if dzh is None else jnp.where(keep, dzh, 0.0)
            dh_prev = jnp.where(keep, dh_prev, dh)
        return dh_prev.astype(dh.dtype), (dzx, dzh)

    dh0, (dzxs, dzhs) = jax.lax.scan(
        step, d_h_final, (d_ys, h_prev, rs, us, candidates, recurrents, valid), reverse=True, unroll=options.unroll
    )
    d_params = {"w_x": fused.summed_over_steps(xs, dzxs), "b": jnp.sum(dzxs, axis=(0, 1))}
    if options.reset_after:
        d_params["w_h"] = fused.summed_over_steps(h_prev, dzhs)
        d_params["b_h"] = jnp.sum(dzhs, axis=(0, 1))
    else:  # the gate columns read h, the candidate columns r⊙h
        d_gates, d_candidate = dzxs[..., : 2 * num_units], dzxs[..., 2 * num_units :]
        d_params["w_h"] = jnp.concatenate(
            [fused.summed_over_steps(h_prev, d_gates), fused.summed_over_steps(recurrents, d_candidate)],
            axis=-1,
        )
    return fused.like((d_params, dzxs @ params["w_x"].T, dh0), (params, xs, h0)) + (None,)


_gru_sequence = fused.sequence_with_vjp(_forward, _backward)
