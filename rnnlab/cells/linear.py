"""Cells linear in their state: `h_t = a_t ⊙ h_{t-1} + b_t` with `a_t, b_t` from `x_t` only.

Each sets `linear_recurrence`, so `rnnlab.unroll(..., method="associative")` runs it with
`jax.lax.associative_scan`; `step` is the same recurrence one step at a time (for
`method="scan"`/`"static"` and for generation).

* `min_gru`, `min_lstm`: Feng et al. 2024, "Were RNNs All We Needed?". With
  `log_space=True` they expose the paper's log-space form
  (`LinearRecurrence.log_coefficients`), which the associative unroll then scans.
  By default they scan in linear space: Feng et al. compute the parallel scan as
  cumulative sums divided by cumulative products, `h_t = A_t Σ_{s<=t} b_s / A_s` with
  `A_t = Π_{s<=t} a_s`, which underflows and divides by zero over long sequences
  unless done in log space. rnnlab's associative unroll composes `(a, b)` pairs and
  never divides: with `0 < a <= 1` every intermediate is bounded, and a product that
  underflows only drops contributions below float precision. Linear space matches
  float64 at T = 10,000 (tests) and its train step ran about 1.8x faster than the
  log-space scan on a 2-core CPU (`docs/benchmarks.md`).
* `lru`: the Linear Recurrent Unit, Orvieto et al. 2023, "Resurrecting Recurrent Neural
  Networks for Long Sequences", with a complex diagonal state.

The RG-LRU of Griffin (`rnnlab.cells.griffin`) builds its cell with `projected_linear_cell`.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from rnnlab.cells.base import (
    Array,
    LinearRecurrence,
    Params,
    PRNGKey,
    RNNCell,
    affine_input_projection,
    check_positive_int,
    glorot_uniform,
    hoistable_cell,
    zero_state,
)

CoefficientsFn = Callable[[Array], tuple[Array, Array]]


def _output_is_state(params: Params, h: Array, x: Array) -> Array:
    """The `LinearRecurrence.readout` of a cell whose output is its new state `h`."""
    del params, x
    return h


def positive_candidate(v: Array) -> Array:
    """The minimal RNNs' candidate activation `g(v) = v + 1/2 if v >= 0 else σ(v)`.

    Continuous, increasing and positive, so the states stay positive and the recurrence
    has a log-space form.
    """
    return jnp.where(v >= 0, jax.nn.relu(v) + 0.5, jax.nn.sigmoid(v))


def log_positive_candidate(v: Array) -> Array:
    """`log(g(v))` for `positive_candidate`, computed without forming `g(v)`."""
    return jnp.where(v >= 0, jnp.log(jax.nn.relu(v) + 0.5), -jax.nn.softplus(-v))


def _min_gru_coefficients(z: Array) -> tuple[Array, Array]:
    """`(a, b) = (1 − z, z ⊙ g(h̃))` from the projection `z: [..., 2H]` (columns `k, h̃`)."""
    k, candidate = jnp.split(z, 2, axis=-1)
    return jax.nn.sigmoid(-k), jax.nn.sigmoid(k) * positive_candidate(candidate)


def _min_gru_log_coefficients(z: Array) -> tuple[Array, Array]:
    """`(log a, log b)` for `_min_gru_coefficients`: `log σ(−k) = −softplus(k)`."""
    k, candidate = jnp.split(z, 2, axis=-1)
    return -jax.nn.softplus(k), -jax.nn.softplus(-k) + log_positive_candidate(candidate)


def _min_lstm_gate_difference(z: Array) -> tuple[Array, Array]:
    """`(d, h̃)` with `d = log i − log f`, so that `f' = σ(−d)` and `i' = σ(d)`.

    `z: [..., 3H]` has the columns `k_f, k_i, h̃`; `log σ(k) = −softplus(−k)`.
    """
    k_f, k_i, candidate = jnp.split(z, 3, axis=-1)
    return jax.nn.softplus(-k_f) - jax.nn.softplus(-k_i), candidate


def _min_lstm_coefficients(z: Array) -> tuple[Array, Array]:
    """`(a, b) = (f', i' ⊙ g(h̃))` with the normalised gates `f' = f/(f+i)`, `i' = i/(f+i)`."""
    difference, candidate = _min_lstm_gate_difference(z)
    return jax.nn.sigmoid(-difference), jax.nn.sigmoid(difference) * positive_candidate(candidate)


def _min_lstm_log_coefficients(z: Array) -> tuple[Array, Array]:
    """`(log a, log b)` for `_min_lstm_coefficients`."""
    difference, candidate = _min_lstm_gate_difference(z)
    return -jax.nn.softplus(difference), -jax.nn.softplus(-difference) + log_positive_candidate(candidate)


def _minimal_rnn(
    kind: str,
    num_units: int,
    num_blocks: int,
    coefficients: CoefficientsFn,
    log_coefficients: CoefficientsFn,
    log_space: bool,
) -> RNNCell:
    """A cell `h' = a ⊙ h + b`, `y = h'`, with `(a, b)` from `z = x·W_x + b_x: [num_blocks·H]`;
    with `log_space`, the associative unroll scans `log_coefficients` in log space."""
    num_units = check_positive_int(num_units, "num_units")
    name = f"{kind}({num_units}{', log_space' if log_space else ''})"

    def init(key: PRNGKey, input_size: int) -> Params:
        input_size = check_positive_int(input_size, "input_size")
        return {
            "w_x": glorot_uniform(key, (input_size, num_blocks * num_units)),
            "b": jnp.zeros((num_blocks * num_units,)),
        }

    return projected_linear_cell(
        name,
        num_units,
        init,
        lambda params, z: coefficients(z),
        (lambda params, z: log_coefficients(z)) if log_space else None,
    )


def projected_linear_cell(
    name: str,
    num_units: int,
    init: Callable[[PRNGKey, int], Params],
    coefficients: Callable[[Params, Array], tuple[Array, Array]],
    log_coefficients: Optional[Callable[[Params, Array], tuple[Array, Array]]] = None,
) -> RNNCell:
    """A cell `h' = a ⊙ h + b`, `y = h'`, `h: [num_units]` (zeros initially), with
    `(a, b) = coefficients(params, z)` from its hoisted projection `z = x·W_x + b`
    (`params["w_x"]`, `params["b"]`); the associative unroll scans
    `log_coefficients(params, z)` in log space when given."""

    def projected_step(params: Params, h: Array, z: Array) -> tuple[Array, Array]:
        a, b = coefficients(params, z)
        h = a * h + b
        return h, h

    def of_input(fn: Callable[[Params, Array], tuple[Array, Array]]) -> Callable[[Params, Array], tuple[Array, Array]]:
        return lambda params, x: fn(params, affine_input_projection(params, x))

    recurrence = LinearRecurrence(
        coefficients=of_input(coefficients),
        readout=_output_is_state,
        log_coefficients=None if log_coefficients is None else of_input(log_coefficients),
    )
    return hoistable_cell(
        name,
        num_units,
        init,
        zero_state(num_units, "w_x"),
        affine_input_projection,
        projected_step,
        linear_recurrence=recurrence,
    )


def min_gru(num_units: int, *, log_space: bool = False) -> RNNCell:
    """minGRU (Feng et al. 2024), `g` the positive candidate activation:

        z  = σ(W_z·x + b_z)
        h̃  = g(W_h·x + b_h)
        h' = (1 − z)⊙h + z⊙h̃                   # a = 1 − z, b = z⊙h̃

    Follows the paper: the gates and candidate read `x` only (with biases, as the
    paper's `nn.Linear` layers have), `g(v) = v + 1/2 if v >= 0 else σ(v)`, and, with
    `log_space=True`, the log-space form `log a = −softplus(k)`,
    `log b = −softplus(−k) + log g(W_h·x + b_h)` with `k = W_z·x + b_z`, which
    `method="associative"` then scans (see the module docstring). rnnlab's choices:
    Glorot uniform kernel and zero biases (the paper's code keeps PyTorch's `nn.Linear`
    default init), a zero initial state (pass `initial_state` to `unroll` for another),
    and no output projection (the paper's blocks add one around the cell).

    Params (input size `I`, `H = num_units`, columns ordered `z, h̃`):
      `w_x: [I, 2H]` Glorot uniform; `b: [2H]` zeros.
    State: `h: [H]` (zeros initially). Output: `h'`.
    `input_projection(params, x) -> [..., 2H]` is `x·W_x + b`; the rest of the step is
    elementwise.
    """
    return _minimal_rnn("min_gru", num_units, 2, _min_gru_coefficients, _min_gru_log_coefficients, log_space)


def min_lstm(num_units: int, *, log_space: bool = False) -> RNNCell:
    """minLSTM (Feng et al. 2024), `g` the positive candidate activation:

        f  = σ(W_f·x + b_f),  i = σ(W_i·x + b_i)
        f' = f / (f + i),     i' = i / (f + i)
        h̃  = g(W_h·x + b_h)
        h' = f'⊙h + i'⊙h̃                       # a = f', b = i'⊙h̃

    Follows the paper: gates and candidate from `x` only (with biases), the normalised
    (time-independent) gates `f', i'`, `g(v) = v + 1/2 if v >= 0 else σ(v)`, and, with
    `log_space=True`, the log-space form `d = softplus(−k_f) − softplus(−k_i)`,
    `log a = −softplus(d)`, `log b = −softplus(−d) + log g(W_h·x + b_h)`, which
    `method="associative"` then scans (see the module docstring).
    `step` computes `f' = σ(−d)`, `i' = σ(d)`, the same gates without dividing. rnnlab's
    choices as for `min_gru`: Glorot uniform kernel, zero biases, zero initial state,
    no output projection.

    Params (input size `I`, `H = num_units`, columns ordered `f, i, h̃`):
      `w_x: [I, 3H]` Glorot uniform; `b: [3H]` zeros.
    State: `h: [H]` (zeros initially). Output: `h'`.
    `input_projection(params, x) -> [..., 3H]` is `x·W_x + b`; the rest of the step is
    elementwise.
    """
    return _minimal_rnn(
        "min_lstm", num_units, 3, _min_lstm_coefficients, _min_lstm_log_coefficients, log_space
    )


def _ring_uniform(key: PRNGKey, shape: tuple[int, ...]) -> Array:
    """Uniform in `(0, 1)`: keeps the LRU's log-parametrised init finite."""
    return jax.random.uniform(key, shape, minval=jnp.finfo(jnp.float32).tiny, maxval=1.0)


def lru_eigenvalues(params: Params) -> Array:
    """The LRU's diagonal recurrence `λ = exp(−exp(ν_log) + i·exp(θ_log)): complex [N]`."""
    return jnp.exp(-jnp.exp(params["nu_log"]) + 1j * jnp.exp(params["theta_log"]))


def lru(
    num_units: int,
    state_size: int,
    *,
    r_min: float = 0.0,
    r_max: float = 1.0,
    max_phase: float = 2 * math.pi,
) -> RNNCell:
    """The Linear Recurrent Unit (Orvieto et al. 2023), a complex diagonal recurrence:

        h' = λ⊙h + γ⊙(B·x)                     # a = λ, b = γ⊙(B·x), complex
        y  = Re(C·h') + D⊙x

    with the exponential parametrisation `λ = exp(−exp(ν_log) + i·exp(θ_log))` (so
    `|λ| < 1`), the normalisation `γ = exp(γ_log)`, initialised to `sqrt(1 − |λ|²)` and
    trained, and the ring initialisation: `|λ|²` uniform in `[r_min², r_max²]` (so `λ`
    uniform on the ring `r_min <= |λ| <= r_max`) and `arg λ` uniform in `[0, max_phase]`.
    `B` has entries `N(0, 1/(2I))` (real and imaginary parts), `C` `N(0, 1/N)`, `D`
    `N(0, 1)`, as in the paper. `D⊙x` needs the input size to equal `num_units`, as in
    the paper's residual blocks.

    Params (input size `I = H = num_units`, `N = state_size`), all real, stored for
    `x·B` like the other rnnlab cells (the paper's code holds the transposes):
      `B_re, B_im: [I, N]`; `C_re, C_im: [N, H]`; `D: [H]`;
      `nu_log, theta_log, gamma_log: [N]`.
    State: `h: complex [N]` (complex64 for float32 params; zeros initially). Output:
    `y: [H]`, real.
    `input_projection(params, x) -> [..., 2N + H]` is `(Re γ⊙Bx, Im γ⊙Bx, D⊙x)`;
    `projected_step` does the elementwise recurrence and the `C` readout.
    """
    num_units = check_positive_int(num_units, "num_units")
    state_size = check_positive_int(state_size, "state_size")
    if not 0.0 <= r_min <= r_max <= 1.0 or r_min == 1.0:
        raise ValueError(
            f"lru needs 0 <= r_min <= r_max <= 1 and r_min < 1, got r_min={r_min!r}, r_max={r_max!r}."
        )
    if not max_phase > 0.0:
        raise ValueError(f"lru needs max_phase > 0, got {max_phase!r}.")
    name = f"lru({num_units}, state_size={state_size}, r=[{r_min:g}, {r_max:g}], max_phase={max_phase:.4g})"

    def init(key: PRNGKey, input_size: int) -> Params:
        input_size = check_positive_int(input_size, "input_size")
        if input_size != num_units:
            raise ValueError(
                f"{name}: input_size ({input_size}) must equal num_units ({num_units}) for the "
                "skip term D⊙x."
            )
        k_nu, k_theta, k_b_re, k_b_im, k_c_re, k_c_im, k_d = jax.random.split(key, 7)
        squared_radius = _ring_uniform(k_nu, (state_size,)) * (r_max**2 - r_min**2) + r_min**2
        nu_log = jnp.log(-0.5 * jnp.log(squared_radius))
        b_scale = 1.0 / math.sqrt(2 * input_size)
        c_scale = 1.0 / math.sqrt(state_size)
        return {
            "B_re": b_scale * jax.random.normal(k_b_re, (input_size, state_size)),
            "B_im": b_scale * jax.random.normal(k_b_im, (input_size, state_size)),
            "C_re": c_scale * jax.random.normal(k_c_re, (state_size, num_units)),
            "C_im": c_scale * jax.random.normal(k_c_im, (state_size, num_units)),
            "D": jax.random.normal(k_d, (num_units,)),
            "nu_log": nu_log,
            "theta_log": jnp.log(max_phase * _ring_uniform(k_theta, (state_size,))),
            "gamma_log": 0.5 * jnp.log(1.0 - jnp.exp(-2.0 * jnp.exp(nu_log))),
        }

    def initial_state(params: Params, rng: PRNGKey | None = None) -> Array:
        del rng
        return jnp.zeros((state_size,), jnp.result_type(params["nu_log"].dtype, jnp.complex64))

    def input_projection(params: Params, x: Array) -> Array:
        gamma = jnp.exp(params["gamma_log"])
        return jnp.concatenate(
            [gamma * (x @ params["B_re"]), gamma * (x @ params["B_im"]), params["D"] * x], axis=-1
        )

    def readout_from_skip(params: Params, h: Array, skip: Array) -> Array:
        """`Re(C·h) + skip` for `h: complex [N]`, `skip = D⊙x: [H]`."""
        return jnp.real(h) @ params["C_re"] - jnp.imag(h) @ params["C_im"] + skip

    def projected_step(params: Params, h: Array, z: Array) -> tuple[Array, Array]:
        b = z[..., :state_size] + 1j * z[..., state_size : 2 * state_size]
        h = lru_eigenvalues(params) * h + b
        return h, readout_from_skip(params, h, z[..., 2 * state_size :])

    def coefficients(params: Params, x: Array) -> tuple[Array, Array]:
        gamma = jnp.exp(params["gamma_log"])
        return lru_eigenvalues(params), gamma * (x @ params["B_re"] + 1j * (x @ params["B_im"]))

    def readout(params: Params, h: Array, x: Array) -> Array:
        return readout_from_skip(params, h, params["D"] * x)

    return hoistable_cell(
        name,
        num_units,
        init,
        initial_state,
        input_projection,
        projected_step,
        input_kernel="B_re",
        linear_recurrence=LinearRecurrence(coefficients=coefficients, readout=readout, constant_a=True),
    )
