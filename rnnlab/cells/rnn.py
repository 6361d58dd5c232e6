"""The basic (Elman) RNN cell: `h' = act(W_x·x + W_h·h + b)`, output `h'`."""

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
    orthogonal,
    zero_state,
)
from rnnlab.cells.rnn_scan import rnn_fused_scan


def basic_rnn(num_units: int, activation: Callable[[Array], Array] = jnp.tanh) -> RNNCell:
    """TF1's `BasicRNNCell`: `h' = activation(W_x·x + W_h·h + b)`.

    Params (input size `I`, `H = num_units`):
      `w_x: [I, H]` (Glorot uniform), `w_h: [H, H]` (orthogonal), `b: [H]` (zeros).
    State: `h: [H]` (zeros initially). Output: `h'`.

    With `jnp.tanh` or `jax.nn.relu` the cell also has a `fused_scan`
    (`rnnlab.cells.rnn_scan`), which `rnnlab.unroll(method="scan")` uses unless told
    `fused=False`.
    """
    num_units = check_positive_int(num_units, "num_units")
    name = f"basic_rnn({num_units})"

    def init(key: PRNGKey, input_size: int) -> Params:
        input_size = check_positive_int(input_size, "input_size")
        kx, kh = jax.random.split(key)
        return {
            "w_x": glorot_uniform(kx, (input_size, num_units)),
            "w_h": orthogonal(kh, (num_units, num_units)),
            "b": jnp.zeros((num_units,)),
        }

    def projected_step(params: Params, h: Array, z: Array) -> tuple[Array, Array]:
        h = activation(z + h @ params["w_h"])
        return h, h

    return hoistable_cell(
        name,
        num_units,
        init,
        zero_state(num_units, "w_h"),
        affine_input_projection,
        projected_step,
        fused_scan=rnn_fused_scan(activation),
    )
