"""The Real-Gated Linear Recurrent Unit (RG-LRU) of Griffin and Hawk, De et al. 2024,
"Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient Language
Models": a real diagonal recurrence `h_t = a_t ⊙ h_{t-1} + b_t` whose decay `a_t` is
gated by the input, so `rnnlab.unroll(..., method="associative")` runs it too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rnnlab.cells.base import (
    Array,
    Params,
    PRNGKey,
    RNNCell,
    check_positive_int,
    is_positive_finite,
    is_real_number,
)
from rnnlab.cells.linear import projected_linear_cell


SQRT_DERIVATIVE_BOUND = 1000.0
"""The largest derivative `sqrt_bounded_derivative` reports (Griffin's bound)."""


@jax.custom_jvp
def sqrt_bounded_derivative(v: Array) -> Array:
    """`sqrt(v)` for `v >= 0` whose derivative is bounded by `M = SQRT_DERIVATIVE_BOUND`.

    The derivative is taken as `1 / (2·sqrt(max(v, 1/(4·M²))))`: exact for
    `v >= 1/(4·M²) = 2.5e-7`, and `M` below, where the true one grows to infinity at 0.
    """
    return jnp.sqrt(v)


@sqrt_bounded_derivative.defjvp
def _sqrt_bounded_derivative_jvp(primals: tuple[Array], tangents: tuple[Array]) -> tuple[Array, Array]:
    (v,), (dv,) = primals, tangents
    smallest = 1.0 / (4.0 * SQRT_DERIVATIVE_BOUND**2)
    return jnp.sqrt(v), dv * 0.5 * jax.lax.rsqrt(jnp.maximum(v, smallest))


def _ring_logits(key: PRNGKey, size: int, min_radius: float, max_radius: float) -> Array:
    """`Λ: [size]` with `σ(Λ)²` uniform in `[min_radius², max_radius²]` (`0 < radii < 1`)."""
    squared_radius = jax.random.uniform(key, (size,), minval=min_radius**2, maxval=max_radius**2)
    log_radius = 0.5 * jnp.log(squared_radius)
    return log_radius - jnp.log(-jnp.expm1(log_radius))  # logit(r) = log r − log(1 − r)


def _rg_lru_coefficients(z: Array, logits: Array, c: float) -> tuple[Array, Array]:
    """`(a, b)` of the RG-LRU from the projection `z: [..., 3H]` (columns `r, i, u`) and
    `Λ = logits: [H]`: `log a = −c·softplus(−Λ)·σ(r)`, `b = sqrt(1 − a²)·σ(i)·u`."""
    recurrence_gate, input_gate, value = jnp.split(z, 3, axis=-1)
    log_a = -c * jax.nn.softplus(-logits) * jax.nn.sigmoid(recurrence_gate)
    normalisation = sqrt_bounded_derivative(-jnp.expm1(2.0 * log_a))
    return jnp.exp(log_a), normalisation * jax.nn.sigmoid(input_gate) * value


def _check_radii(min_radius: float, max_radius: float) -> None:
    """Raises `ValueError` unless `0 < min_radius <= max_radius < 1`, with both squares
    strictly inside `(0, 1)` in float32 (the ring initialisation draws `σ(Λ)²` there)."""
    radii = f"min_radius={min_radius!r}, max_radius={max_radius!r}"
    if not (is_real_number(min_radius) and is_real_number(max_radius) and 0.0 < min_radius <= max_radius < 1.0):
        raise ValueError(f"rg_lru needs 0 < min_radius <= max_radius < 1, got {radii}.")
    if not (0.0 < np.float32(min_radius**2) and np.float32(max_radius**2) < 1.0):
        raise ValueError(f"rg_lru's squared radii must lie strictly inside (0, 1) in float32, got {radii}.")


def rg_lru(num_units: int, *, c: float = 8.0, min_radius: float = 0.9, max_radius: float = 0.999) -> RNNCell:
    """The Real-Gated Linear Recurrent Unit (RG-LRU) of Griffin and Hawk (De et al. 2024):

        r  = σ(W_a·x + b_a)                      # recurrence gate
        i  = σ(W_i·x + b_i)                      # input gate
        u  = W_u·x + b_u                         # the value
        log a = −c·softplus(−Λ)·r                # a = σ(Λ)^(c·r), in log space
        h' = a⊙h + sqrt(1 − a²)⊙(i⊙u)           # b = sqrt(1 − a²)⊙(i⊙u)
        y  = h'

    Follows the paper: gates from `x` only, `c = 8`, a real diagonal recurrence with
    `0 < a <= 1` and the normalisation `sqrt(1 − a²)`, computed from
    `1 − a² = −expm1(2·log a)` (accurate for `a` near 1). As in Griffin, the derivative
    of that square root is bounded by `SQRT_DERIVATIVE_BOUND = 1000`
    (`sqrt_bounded_derivative`, a `jax.custom_jvp`, so forward and reverse mode agree):
    a recurrence gate `r → 0` gives `a → 1` and `1 − a² → 0`, where the true derivative
    of the square root is infinite and would make the gradients NaN; the bound only
    changes derivatives where `1 − a² < 2.5e-7`. Λ is initialised as in Griffin's public
    code: `σ(Λ)²` uniform in `[min_radius², max_radius²]`, that is the base `σ(Λ)` (not
    `σ(Λ)^c`) uniform by area on the ring `min_radius <= σ(Λ) <= max_radius`, like the
    LRU's ring initialisation; the gated `a = σ(Λ)^(c·r)` then starts in `[σ(Λ)^c, 1]`.

    rnnlab's choices: the value `u = W_u·x + b_u` is a learned projection inside the
    cell, Griffin's linear layer before the RG-LRU, so that any input size works (rnnlab
    has no temporal convolution, which Griffin's block puts between that layer and the
    RG-LRU, nor the block's GeLU branch and output layer); the gates are dense `[I, H]`
    maps where Griffin's are block-diagonal, one block per head; all three kernels start
    `N(0, 1/I)` with zero biases (Griffin's layers use variance 1/fan-in and zero
    biases); the initial state is zero. Griffin's code does not normalise the input at
    the first token of a document; this cell knows no positions, so after a reset
    (`unroll(resets=...)`) it restarts from the zero state and normalises every step.

    Params (input size `I`, `H = num_units`, columns ordered `r, i, u`):
      `w_x: [I, 3H]` `N(0, 1/I)`; `b: [3H]` zeros; `lambda: [H]` Λ, ring-initialised.
    State: `h: [H]` (zeros initially). Output: `h'`.
    `input_projection(params, x) -> [..., 3H]` is `x·W_x + b`; the rest of the step is
    elementwise.
    """
    num_units = check_positive_int(num_units, "num_units")
    if not is_positive_finite(c):
        raise ValueError(f"rg_lru needs a finite c > 0, got {c!r}.")
    _check_radii(min_radius, max_radius)
    name = f"rg_lru({num_units}, c={c:g}, radius=[{min_radius:g}, {max_radius:g}])"
    kernel_init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")

    def init(key: PRNGKey, input_size: int) -> Params:
        input_size = check_positive_int(input_size, "input_size")
        k_kernel, k_lambda = jax.random.split(key)
        return {
            "w_x": kernel_init(k_kernel, (input_size, 3 * num_units)),
            "b": jnp.zeros((3 * num_units,)),
            "lambda": _ring_logits(k_lambda, num_units, min_radius, max_radius),
        }

    return projected_linear_cell(
        name, num_units, init, lambda params, z: _rg_lru_coefficients(z, params["lambda"], c)
    )
