"""GRU cells: TF1's `GRUCell` and the cuDNN/PyTorch "reset after" form."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from rnnlab.cells.base import (
    Array,
    Params,
    PRNGKey,
    RNNCell,
    affine_input_projection,
    check_positive_int,
    glorot_uniform,
    hoistable_cell,
    is_real_number,
    orthogonal,
    zero_state,
)
from rnnlab.cells.gru_scan import gru_fused_scan


def gru(
    num_units: int,
    *,
    reset_after: bool = False,
    activation: Callable[[Array], Array] = jnp.tanh,
    gate_bias_init: float | None = None,
) -> RNNCell:
    """A GRU cell; gates `r` (reset) and `u` (update), candidate `ĉ`, `act = activation`.

    `reset_after=False`, TF1's `GRUCell` (Cho et al. 2014):

        r, u = σ(W_x·x + W_h·h + b)            # the r and u columns
        ĉ    = act(W_x·x + W_h·(r⊙h) + b)      # the candidate columns
        h'   = u⊙h + (1−u)⊙ĉ

    `reset_after=True`, the cuDNN / PyTorch / Keras `reset_after=True` form, which
    applies the reset gate after the recurrent matmul and so needs one fused `h` matmul:

        r, u = σ(W_x·x + b + W_h·h + b_h)      # the r and u columns
        ĉ    = act(W_x·x + b + r⊙(W_h·h + b_h))  # the candidate columns
        h'   = u⊙h + (1−u)⊙ĉ

    Params (input size `I`, `H = num_units`, gate columns ordered `r, u, c`):
      `w_x: [I, 3H]` Glorot uniform; `w_h: [H, 3H]` orthogonal per `[H, H]` gate block
      (Keras defaults);
      `b: [3H]`: `gate_bias_init` on the `r, u` columns, zeros on the candidate's;
      with `reset_after` also `b_h: [3H]` zeros, the recurrent bias (Keras' second
      bias row, PyTorch's `bias_hh`).
    `gate_bias_init=None` picks the reference default per form: 1.0 for TF1's `GRUCell`
    (`reset_after=False`), 0.0 for Keras' `GRU(reset_after=True)`.
    State: `h: [H]` (zeros initially). Output: `h'`.

    The split for hoisting: `input_projection(params, x) -> [..., 3H]` is `x·W_x + b` for
    all three column blocks and any leading axes of `x`. `projected_step` then does the
    recurrent part: one `h·W_h` matmul with `reset_after`; with TF1's form two, `h·W_h`
    over the gate columns and `(r⊙h)·W_h` over the candidate columns, since the second
    depends on `r`.

    With `jnp.tanh`, both forms also have a `fused_scan` (`rnnlab.cells.gru_scan`): the
    whole loop with a hand-written backward pass, which `rnnlab.unroll(method="scan")`
    uses unless told `fused=False`.
    """
    num_units = check_positive_int(num_units, "num_units")
    if gate_bias_init is None:
        gate_bias_init = 0.0 if reset_after else 1.0
    elif not is_real_number(gate_bias_init):
        raise ValueError(f"gate_bias_init must be a number or None, got {gate_bias_init!r}.")
    gate_bias_init = float(gate_bias_init)
    gates_size = 2 * num_units
    name = f"gru({num_units}, reset_after)" if reset_after else f"gru({num_units})"

    def init(key: PRNGKey, input_size: int) -> Params:
        input_size = check_positive_int(input_size, "input_size")
        kx, kh = jax.random.split(key)
        params = {
            "w_x": glorot_uniform(kx, (input_size, 3 * num_units)),
            "w_h": orthogonal(kh, (num_units, 3 * num_units), num_blocks=3),
            "b": jnp.concatenate(
                [jnp.full((gates_size,), gate_bias_init), jnp.zeros((num_units,))]
            ),
        }
        if reset_after:
            params["b_h"] = jnp.zeros((3 * num_units,))
        return params

    def projected_step(params: Params, h: Array, z: Array) -> tuple[Array, Array]:
        w_h = params["w_h"]
        if reset_after:
            zh = h @ w_h + params["b_h"]
            r, u = jnp.split(jax.nn.sigmoid(z[..., :gates_size] + zh[..., :gates_size]), 2, -1)
            candidate = activation(z[..., gates_size:] + r * zh[..., gates_size:])
        else:
            gates = z[..., :gates_size] + h @ w_h[:, :gates_size]
            r, u = jnp.split(jax.nn.sigmoid(gates), 2, -1)
            candidate = activation(z[..., gates_size:] + (r * h) @ w_h[:, gates_size:])
        h = u * h + (1.0 - u) * candidate
        return h, h

    return hoistable_cell(
        name,
        num_units,
        init,
        zero_state(num_units, "w_h"),
        affine_input_projection,
        projected_step,
        fused_scan=gru_fused_scan(reset_after) if activation is jnp.tanh else None,
    )
