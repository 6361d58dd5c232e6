"""The Independently Recurrent Neural Network cell (IndRNN, Li et al. 2018, "Independently
Recurrent Neural Network (IndRNN): Building A Longer and Deeper RNN"):
`h' = act(W_x·x + u ⊙ h + b)`, each unit recurrent on itself only, output `h'`."""

from __future__ import annotations

import math
from typing import Callable, Optional

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
    is_positive_finite,
    is_real_number,
    zero_state,
)


def _is_finite_real(value: object) -> bool:
    return is_real_number(value) and math.isfinite(value)


def _check_recurrent_max_abs(recurrent_max_abs: Optional[float]) -> None:
    if recurrent_max_abs is not None and not is_positive_finite(recurrent_max_abs):
        raise ValueError(f"indrnn needs recurrent_max_abs None or a finite number > 0, got {recurrent_max_abs!r}.")


def _recurrent_init_range(
    recurrent_max_abs: Optional[float], recurrent_init_range: Optional[tuple[float, float]]
) -> tuple[float, float]:
    """The checked `(low, high)` of the initial `u`: by default `[0, 1]`, cut to the clip."""
    if recurrent_init_range is None:
        return 0.0, (1.0 if recurrent_max_abs is None else min(1.0, recurrent_max_abs))
    if (
        not isinstance(recurrent_init_range, (tuple, list))
        or len(recurrent_init_range) != 2
        or not all(_is_finite_real(bound) for bound in recurrent_init_range)
        or recurrent_init_range[0] > recurrent_init_range[1]
    ):
        raise ValueError(
            "indrnn needs recurrent_init_range (low, high) of finite numbers, low <= high, "
            f"got {recurrent_init_range!r}."
        )
    low, high = recurrent_init_range
    if recurrent_max_abs is not None and not -recurrent_max_abs <= low <= high <= recurrent_max_abs:
        raise ValueError(
            f"indrnn's recurrent_init_range {recurrent_init_range!r} must lie within the clip "
            f"[-{recurrent_max_abs!r}, {recurrent_max_abs!r}] (a weight beyond it would start at the bound)."
        )
    return float(low), float(high)


def indrnn(
    num_units: int,
    *,
    activation: Callable[[Array], Array] = jax.nn.relu,
    recurrent_max_abs: Optional[float] = None,
    recurrent_init_range: Optional[tuple[float, float]] = None,
) -> RNNCell:
    """IndRNN (Li et al. 2018): `h' = activation(W_x·x + u⊙h + b)` with an elementwise
    recurrent weight `u: [H]`, so each unit sees only its own past.

    Follows the paper: ReLU by default, and `recurrent_max_abs` bounds `|u|` so that a
    gradient grows by at most `γ` over `T` steps (`|u| <= γ^(1/T)`, e.g. `2^(1/T)` with
    ReLU). The step reads `clip(u, −recurrent_max_abs, recurrent_max_abs)`, and the
    gradient of `u` is the gradient of that clipped weight (straight through the clip):
    the authors clip the stored `u` after each update, so its gradient is always taken at
    a weight within the clip; a cell is a pure function and cannot rewrite its params, so
    an entry beyond the clip acts at the bound and still gets that gradient, rather than
    the clip's true derivative, zero, which would freeze it there for good.

    rnnlab's choices: `u` starts uniform in `recurrent_init_range`, by default `[0, 1]`,
    cut to `[0, recurrent_max_abs]` when that is smaller (the authors initialise `u`
    uniform in `[0, 2^(1/T)]`, about `[0, 1]` for long sequences; a given range must lie
    within the clip); `W_x` Glorot uniform and `b` zeros like the other rnnlab cells (the
    authors' code sets the input kernels per experiment, He-normal or small uniform or
    Gaussian, with batch normalisation between layers); a zero initial state.

    Params (input size `I`, `H = num_units`):
      `w_x: [I, H]` Glorot uniform; `u: [H]` uniform in the init range; `b: [H]` zeros.
    State: `h: [H]` (zeros initially). Output: `h'`.
    `input_projection(params, x) -> [..., H]` is `x·W_x + b`; the rest of the step is
    elementwise. Not a linear recurrence: `unroll(method="associative")` refuses it.
    """
    num_units = check_positive_int(num_units, "num_units")
    _check_recurrent_max_abs(recurrent_max_abs)
    low, high = _recurrent_init_range(recurrent_max_abs, recurrent_init_range)
    clip = "" if recurrent_max_abs is None else f", recurrent_max_abs={recurrent_max_abs:g}"
    name = f"indrnn({num_units}{clip})"

    def init(key: PRNGKey, input_size: int) -> Params:
        input_size = check_positive_int(input_size, "input_size")
        k_kernel, k_recurrent = jax.random.split(key)
        return {
            "w_x": glorot_uniform(k_kernel, (input_size, num_units)),
            "u": jax.random.uniform(k_recurrent, (num_units,), minval=low, maxval=high),
            "b": jnp.zeros((num_units,)),
        }

    def recurrent_weight(params: Params) -> Array:
        """`u`, clipped to `[−recurrent_max_abs, recurrent_max_abs]` when that is set, with
        the gradient passed straight through the clip."""
        u = params["u"]
        if recurrent_max_abs is None:
            return u
        return u + jax.lax.stop_gradient(jnp.clip(u, -recurrent_max_abs, recurrent_max_abs) - u)

    def projected_step(params: Params, h: Array, z: Array) -> tuple[Array, Array]:
        h = activation(z + recurrent_weight(params) * h)
        return h, h

    return hoistable_cell(name, num_units, init, zero_state(num_units, "u"), affine_input_projection, projected_step)
