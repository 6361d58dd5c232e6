"""Linear-recurrence cells (minGRU, minLSTM, LRU, RG-LRU), `unroll(method="associative")`
and the hoisted sequential scan that `method="scan"` gives them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

import rnnlab
import rnnlab.linen
from rnnlab.cells import basic_rnn, indrnn, lstm
from rnnlab.cells.griffin import SQRT_DERIVATIVE_BOUND, rg_lru, sqrt_bounded_derivative
from rnnlab.cells.linear import lru, lru_eigenvalues, min_gru, min_lstm
from rnnlab.linear_unroll import default_block_size

B, T = 4, 7
LENGTHS = np.array([0, T, 3, 5], np.int32)
TOLERANCE = dict(rtol=1e-5, atol=1e-6)

# name -> (cell factory, input size); the LRU's skip term needs input size == num_units.
CELLS = {
    "min_gru": (lambda: min_gru(6), 4),
    "min_lstm": (lambda: min_lstm(6), 4),
    "min_gru_log": (lambda: min_gru(6, log_space=True), 4),
    "min_lstm_log": (lambda: min_lstm(6, log_space=True), 4),
    "lru": (lambda: lru(6, 5, r_min=0.5, r_max=0.99), 6),
    "rg_lru": (lambda: rg_lru(6), 4),
}
# The tests of the unroll's machinery (block sizes, stacks, zero steps, forward mode,
# stepping on from an associative unroll) run on these; the tests of a cell's numbers
# (every method's values and gradients, float64, T = 10k) on every cell. Each test
# compiles anew, so a cell added for its numbers (rg_lru) joins the latter only.
MACHINERY_CELLS = ["min_gru", "min_lstm", "min_gru_log", "min_lstm_log", "lru"]
# The sequential scan runs the "_log" cells in linear space too, so tests of it alone skip them.
LINEAR_SPACE_CELLS = [name for name in MACHINERY_CELLS if not name.endswith("_log")]


def _setup(name: str, seed: int = 0, num_steps: int = T, batch_size: int = B):
    """The cell, its params, inputs `[B, T, I]` and a random (nonzero, signed) initial state."""
    make_cell, input_size = CELLS[name]
    cell = make_cell()
    k_params, k_xs, k_state = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = cell.init(k_params, input_size)
    xs = jax.random.normal(k_xs, (batch_size, num_steps, input_size))
    return cell, params, xs, _random_state(cell, params, k_state, batch_size)


def _random_state(cell, params, key, batch_size):
    zeros = rnnlab.batched_initial_state(cell, params, batch_size)
    leaves, treedef = jax.tree.flatten(zeros)
    keys = jax.random.split(key, len(leaves))
    random = []
    for leaf, leaf_key in zip(leaves, keys):
        k_re, k_im = jax.random.split(leaf_key)
        value = jax.random.normal(k_re, leaf.shape)
        if jnp.iscomplexobj(leaf):
            value = value + 1j * jax.random.normal(k_im, leaf.shape)
        random.append(value.astype(leaf.dtype))
    return jax.tree.unflatten(treedef, random)


def _assert_trees_close(actual, expected, **tolerance):
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), **tolerance)


def _squared_norm(tree) -> jax.Array:
    return sum(jnp.sum(jnp.real(leaf * jnp.conj(leaf))) for leaf in jax.tree.leaves(tree))


# -- the methods agree ---------------------------------------------------------------


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_lengths", [False, True])
@pytest.mark.parametrize("name", CELLS)
def test_associative_matches_scan_and_static(name, with_lengths, reverse):
    cell, params, xs, h0 = _setup(name)
    lengths = LENGTHS if with_lengths else None

    def run(**kwargs):
        return rnnlab.unroll(cell, params, xs, initial_state=h0, lengths=lengths, reverse=reverse, **kwargs)

    ys, final = run(method="associative")
    for kwargs in [dict(method="scan"), dict(method="static"), dict(method="scan", hoist=False)]:
        ys_ref, final_ref = run(**kwargs)
        _assert_trees_close(ys, ys_ref, **TOLERANCE)
        _assert_trees_close(final, final_ref, **TOLERANCE)
    if with_lengths:
        np.testing.assert_array_equal(np.asarray(ys[0]), 0.0)  # lengths[0] == 0
        _assert_trees_close(jax.tree.map(lambda h: h[0], final), jax.tree.map(lambda h: h[0], h0))


@pytest.mark.parametrize("block_size", [1, 2, T, T + 3])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("name", MACHINERY_CELLS)
def test_every_block_size_matches_scan(name, reverse, block_size):
    """The plain associative scan (`block_size=1`), blocks that do not divide `T` (padded),
    one block of exactly `T` steps and one longer than `T`, with lengths, both ways."""
    cell, params, xs, h0 = _setup(name, seed=16)

    def run(**kwargs):
        return rnnlab.unroll(cell, params, xs, initial_state=h0, lengths=LENGTHS, reverse=reverse, **kwargs)

    ys, final = run(method="associative", block_size=block_size)
    ys_ref, final_ref = run(method="scan", hoist=False)
    _assert_trees_close(ys, ys_ref, **TOLERANCE)
    _assert_trees_close(final, final_ref, **TOLERANCE)


@pytest.mark.parametrize(
    "num_steps, log_space, expected",
    [(1, False, 1), (2, False, 2), (784, False, 28), (1000, False, 32), (1000, True, 1)],
)
def test_default_block_size_by_backend(monkeypatch, num_steps, log_space, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert default_block_size(num_steps, log_space) == expected
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert default_block_size(num_steps, log_space) == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(method="scan", block_size=4), "method='associative' only"),
        (dict(method="associative", block_size=0), "positive integer"),
        (dict(method="associative", block_size=True), "positive integer"),
    ],
)
def test_block_size_errors(kwargs, message):
    cell, params, xs, h0 = _setup("min_gru")
    with pytest.raises(ValueError, match=message):
        rnnlab.unroll(cell, params, xs, **kwargs)
    with pytest.raises(ValueError, match=message):  # the Flax module passes it on
        rnnlab.linen.RNN(cell, **kwargs).init(jax.random.PRNGKey(0), xs)


@pytest.mark.parametrize("name", MACHINERY_CELLS)
def test_two_layer_stack(name):
    make_cell, input_size = CELLS[name]
    cell = rnnlab.stack([make_cell(), make_cell()])
    params = cell.init(jax.random.PRNGKey(1), input_size)
    xs = jax.random.normal(jax.random.PRNGKey(2), (B, T, input_size))
    h0 = _random_state(cell, params, jax.random.PRNGKey(3), B)
    ys, final = rnnlab.unroll(cell, params, xs, initial_state=h0, lengths=LENGTHS, method="associative")
    ys_ref, final_ref = rnnlab.unroll(cell, params, xs, initial_state=h0, lengths=LENGTHS, method="scan")
    assert isinstance(final, tuple) and len(final) == 2
    _assert_trees_close(ys, ys_ref, **TOLERANCE)
    _assert_trees_close(final, final_ref, **TOLERANCE)


@pytest.mark.parametrize("num_steps", [0, 1, T])
@pytest.mark.parametrize("name", LINEAR_SPACE_CELLS)
def test_hoisted_scan_with_unroll_in_a_mixed_stack(name, num_steps):
    """In a stack with an LSTM, the linear layer's hoisted scan (`unroll=3`, lengths,
    reverse) gives the numbers of the cell's step in the loop, down to one and zero steps."""
    make_cell, input_size = CELLS[name]
    linear = make_cell()
    cell = rnnlab.stack([lstm(linear.output_size), linear])
    params = cell.init(jax.random.PRNGKey(14), input_size)
    xs = jax.random.normal(jax.random.PRNGKey(15), (B, num_steps, input_size))
    lengths = np.minimum(LENGTHS, num_steps)

    def run(hoist):
        return rnnlab.unroll(cell, params, xs, lengths=lengths, reverse=True, unroll=3, hoist=hoist)

    ys, final = run(True)
    ys_ref, final_ref = run(False)
    _assert_trees_close(ys, ys_ref, **TOLERANCE)
    _assert_trees_close(final, final_ref, **TOLERANCE)


@pytest.mark.parametrize("method", ["associative", "scan"])
@pytest.mark.parametrize("name", MACHINERY_CELLS)
def test_zero_steps_give_empty_outputs_and_the_initial_state(name, method):
    cell, params, xs, h0 = _setup(name, num_steps=0)
    ys, final = rnnlab.unroll(cell, params, xs, initial_state=h0, lengths=np.zeros(B, np.int32), method=method)
    assert ys.shape == (B, 0, cell.output_size)
    _assert_trees_close(final, h0, rtol=0, atol=0)


@pytest.mark.parametrize("name", CELLS)
def test_gradients_match_scan(name):
    cell, params, xs, h0 = _setup(name, seed=4)

    def loss(params, xs, h0, method, hoist, block_size):
        ys, final = rnnlab.unroll(
            cell, params, xs, initial_state=h0, lengths=LENGTHS, method=method, hoist=hoist, block_size=block_size
        )
        return jnp.sum(jnp.sin(ys)) + _squared_norm(final)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=(3, 4, 5))
    grads_ref = grad(params, xs, h0, "scan", False, None)  # the cell's step in the loop
    # All states at once: the plain associative scan, the blocked one, the sequential scan.
    for method, block_size in [("associative", 1), ("associative", 2), ("scan", None)]:
        _assert_trees_close(grad(params, xs, h0, method, None, block_size), grads_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MACHINERY_CELLS)
def test_forward_mode_matches_scan(name):
    """Forward mode through the log-space scan's custom JVP (`log_space=True`) and the
    `custom_linear_solve` of the associative and the hoisted sequential scan matches the
    cell's step in the loop."""
    cell, params, xs, h0 = _setup(name, seed=12)
    direction = jax.random.normal(jax.random.PRNGKey(13), xs.shape)

    def outputs(method, hoist=None, block_size=None):
        return lambda xs: rnnlab.unroll(
            cell, params, xs, initial_state=h0, lengths=LENGTHS, method=method, hoist=hoist, block_size=block_size
        )[0]

    _, tangent_ref = jax.jvp(outputs("scan", hoist=False), (xs,), (direction,))
    for method, block_size in [("associative", 1), ("associative", 2), ("scan", None)]:
        _, tangent = jax.jvp(outputs(method, block_size=block_size), (xs,), (direction,))
        np.testing.assert_allclose(np.asarray(tangent), np.asarray(tangent_ref), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MACHINERY_CELLS)
def test_step_continues_an_associative_unroll(name):
    """Generation: `cell.step` from the associative state after `T − 1` steps gives the
    output of step `T − 1` of the full associative unroll."""
    cell, params, xs, h0 = _setup(name, seed=5)
    ys, _ = rnnlab.unroll(cell, params, xs, initial_state=h0, method="associative")
    prefix = np.full((B,), T - 1, np.int32)
    _, state = rnnlab.unroll(cell, params, xs, initial_state=h0, lengths=prefix, method="associative")
    _, y_last = jax.vmap(cell.step, in_axes=(None, 0, 0))(params, state, xs[:, T - 1])
    np.testing.assert_allclose(np.asarray(y_last), np.asarray(ys[:, T - 1]), **TOLERANCE)


@pytest.mark.parametrize("name", ["min_gru_log", "min_lstm_log"])
def test_log_coefficients_are_logs_of_coefficients(name):
    cell, params, xs, _ = _setup(name)
    recurrence = cell.linear_recurrence
    x = 3.0 * xs[0, 0]
    log_a, log_b = recurrence.log_coefficients(params, x)
    _assert_trees_close((jnp.exp(log_a), jnp.exp(log_b)), recurrence.coefficients(params, x), **TOLERANCE)
    linear_space_cell = CELLS[name.removesuffix("_log")][0]()
    assert linear_space_cell.linear_recurrence.log_coefficients is None  # linear space by default


# -- float64 NumPy references written from the papers' equations ----------------------


def _sigmoid(v):
    return 1.0 / (1.0 + np.exp(-v))


def _g(v):
    return np.where(v >= 0, v + 0.5, _sigmoid(v))


def _reference_min_gru(p, xs, h):
    """minGRU: z = σ(W_z x + b_z), h̃ = g(W_h x + b_h), h = (1 − z) h + z h̃; y = h."""
    size = h.shape[0]
    w_z, w_h, b_z, b_h = p["w_x"][:, :size], p["w_x"][:, size:], p["b"][:size], p["b"][size:]
    ys = []
    for x in xs:
        z = _sigmoid(x @ w_z + b_z)
        h = (1 - z) * h + z * _g(x @ w_h + b_h)
        ys.append(h)
    return np.stack(ys), h


def _reference_min_lstm(p, xs, h):
    """minLSTM: f, i = σ(·), f' = f/(f+i), i' = i/(f+i), h = f' h + i' g(W_h x + b_h)."""
    size = h.shape[0]
    w, b = p["w_x"], p["b"]
    ys = []
    for x in xs:
        f = _sigmoid(x @ w[:, :size] + b[:size])
        i = _sigmoid(x @ w[:, size : 2 * size] + b[size : 2 * size])
        h = f / (f + i) * h + i / (f + i) * _g(x @ w[:, 2 * size :] + b[2 * size :])
        ys.append(h)
    return np.stack(ys), h


def _reference_lru(p, xs, h):
    """LRU: h = λ h + γ (B x), y = Re(C h) + D x, λ = exp(−exp(ν) + i exp(θ)), γ = exp(γ_log)."""
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
    b = (p["B_re"] + 1j * p["B_im"]) * np.exp(p["gamma_log"])
    c = p["C_re"] + 1j * p["C_im"]
    ys = []
    for x in xs:
        h = lam * h + x @ b
        ys.append((h @ c).real + p["D"] * x)
    return np.stack(ys), h


def _reference_rg_lru(p, xs, h):
    """RG-LRU: `numpy_reference.rg_lru_step` over the steps."""
    _, ys = ref.run(ref.rg_lru_step, p, h, xs)
    return ys, ys[-1]


REFERENCES = {
    "min_gru": _reference_min_gru,
    "min_lstm": _reference_min_lstm,
    "lru": _reference_lru,
    "rg_lru": _reference_rg_lru,
}


def _reference_unroll(name, params, xs, h0):
    """The reference over each example of `xs: [B, T, I]` in float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    h0 = np.asarray(h0).astype(np.complex128 if np.iscomplexobj(h0) else np.float64)
    reference = REFERENCES[name.removesuffix("_log")]  # the log-space form computes the same
    results = [reference(p, np.asarray(x, np.float64), h) for x, h in zip(xs, h0)]
    return np.stack([ys for ys, _ in results]), np.stack([h for _, h in results])


@pytest.mark.parametrize("method", ["associative", "scan"])
@pytest.mark.parametrize("name", CELLS)
def test_matches_numpy_reference(name, method):
    cell, params, xs, h0 = _setup(name, seed=6)
    ys, final = rnnlab.unroll(cell, params, 2.0 * xs, initial_state=h0, method=method)
    ys_ref, final_ref = _reference_unroll(name, params, 2.0 * xs, h0)
    np.testing.assert_allclose(np.asarray(ys), ys_ref, **TOLERANCE)
    np.testing.assert_allclose(np.asarray(final), final_ref, **TOLERANCE)


@pytest.mark.parametrize(
    "name, method, block_size",
    [(name, "associative", None) for name in CELLS]
    + [(name, "associative", 1) for name in LINEAR_SPACE_CELLS]
    + [(name, "scan", None) for name in LINEAR_SPACE_CELLS],
)
def test_long_sequence_is_stable(name, method, block_size):
    """T = 10k: outputs match float64 and are finite, and so are the gradients; by blocks
    (the default on CPU, 100 blocks of 100 steps) and by the plain associative scan."""
    num_steps = 10_000
    cell, params, xs, h0 = _setup(name, seed=7, num_steps=num_steps, batch_size=1)
    xs = 3.0 * xs  # saturating gates: a_t near 0 and near 1

    def loss(params):
        ys, final = rnnlab.unroll(cell, params, xs, initial_state=h0, method=method, block_size=block_size)
        return jnp.mean(ys**2) + _squared_norm(final), ys

    (value, ys), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    ys_ref, _ = _reference_unroll(name, params, xs, h0)
    np.testing.assert_allclose(np.asarray(ys), ys_ref, rtol=1e-4, atol=1e-4)
    assert np.isfinite(float(value))
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# -- the LRU --------------------------------------------------------------------------


@pytest.mark.parametrize("r_min, r_max, max_phase", [(0.0, 1.0, 2 * math.pi), (0.4, 0.9, math.pi / 3)])
def test_lru_ring_initialisation(r_min, r_max, max_phase):
    params = lru(3, 4000, r_min=r_min, r_max=r_max, max_phase=max_phase).init(jax.random.PRNGKey(8), 3)
    lam = np.asarray(lru_eigenvalues(params))
    radius, phase = np.abs(lam), np.exp(np.asarray(params["theta_log"]))
    assert r_min <= radius.min() and radius.max() <= r_max
    assert 0.0 <= phase.min() and phase.max() <= max_phase
    # Uniform on the ring: |λ|² is uniform in [r_min², r_max²].
    np.testing.assert_allclose(np.mean(radius**2), (r_min**2 + r_max**2) / 2, atol=0.02)
    np.testing.assert_allclose(np.mean(phase), max_phase / 2, rtol=0.05)
    # γ = sqrt(1 − |λ|²), with 1 − |λ|² = −expm1(−2 exp(ν_log)) in float64.
    one_minus_squared_radius = -np.expm1(-2 * np.exp(np.asarray(params["nu_log"], np.float64)))
    gamma = np.exp(np.asarray(params["gamma_log"]))
    np.testing.assert_allclose(gamma, np.sqrt(one_minus_squared_radius), rtol=1e-4)
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree.leaves(params))


def test_lru_projections_have_the_papers_scales():
    """Orvieto et al.: `B`'s real and imaginary parts have standard deviation
    `1/sqrt(2 I)`, `C`'s `1/sqrt(N)`."""
    size, state_size = 256, 512
    params = lru(size, state_size).init(jax.random.PRNGKey(0), size)
    for name in ("B_re", "B_im"):
        np.testing.assert_allclose(np.std(params[name]), 1 / np.sqrt(2 * size), rtol=0.03)
    for name in ("C_re", "C_im"):
        np.testing.assert_allclose(np.std(params[name]), 1 / np.sqrt(state_size), rtol=0.03)


def test_lru_complex_state_under_dropout():
    cell, params, xs, _ = _setup("lru")
    cell = rnnlab.dropout(cell, state_keep=0.8, output_keep=0.9)
    ys, final = rnnlab.unroll(cell, params, xs, lengths=LENGTHS, rng=jax.random.PRNGKey(11))
    assert final.cell.dtype == jnp.complex64 and ys.dtype == jnp.float32
    assert np.isfinite(np.asarray(ys)).all()


def test_lru_argument_errors():
    with pytest.raises(ValueError, match="r_min"):
        lru(4, 3, r_min=0.9, r_max=0.5)
    with pytest.raises(ValueError, match="max_phase"):
        lru(4, 3, max_phase=0.0)
    with pytest.raises(ValueError, match="input_size"):
        lru(4, 3).init(jax.random.PRNGKey(0), 5)


# -- the RG-LRU -----------------------------------------------------------------------


def test_sqrt_bounded_derivative_is_sqrt_with_a_capped_slope():
    """Values are `sqrt`; the derivative is exact down to `1/(4·M²)` and `M` below it, in
    reverse and forward mode."""
    v = jnp.array([0.0, 1e-12, 1.0 / (4 * SQRT_DERIVATIVE_BOUND**2), 0.25, 4.0])
    expected = np.array([SQRT_DERIVATIVE_BOUND, SQRT_DERIVATIVE_BOUND, SQRT_DERIVATIVE_BOUND, 1.0, 0.25])
    np.testing.assert_array_equal(sqrt_bounded_derivative(v), jnp.sqrt(v))
    np.testing.assert_allclose(jax.vmap(jax.grad(sqrt_bounded_derivative))(v), expected, rtol=1e-6)
    _, tangent = jax.jvp(sqrt_bounded_derivative, (v,), (jnp.ones_like(v),))
    np.testing.assert_allclose(tangent, expected, rtol=1e-6)


@pytest.mark.parametrize("method", ["associative", "scan"])
def test_rg_lru_gradients_stay_finite_when_the_recurrence_gate_closes(method):
    """A recurrence gate r = σ(−1000) = 0 gives a = 1 and 1 − a² = 0, where `sqrt` has an
    infinite slope (times σ'(−1000) = 0: NaN). The bounded slope keeps the gradients
    finite, and they are the exact ones: the state stays h0, so only h0 has a gradient."""
    cell, params, xs, h0 = _setup("rg_lru", seed=17)
    units = cell.output_size
    params = dict(params, b=params["b"].at[:units].set(-1e3))

    def loss(params, xs, h0):
        ys, final = rnnlab.unroll(cell, params, xs, initial_state=h0, lengths=LENGTHS, method=method)
        return jnp.sum(jnp.sin(ys)) + _squared_norm(final), ys

    (_, ys), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, xs, h0)
    valid = np.arange(T)[None, :] < LENGTHS[:, None]
    np.testing.assert_array_equal(np.asarray(ys), np.where(valid[..., None], h0[:, None], 0.0))
    grad_params, grad_xs, grad_h0 = grads
    assert all(np.all(np.asarray(g) == 0.0) for g in jax.tree.leaves((grad_params, grad_xs)))
    expected_h0 = LENGTHS[:, None] * np.cos(h0) + 2 * h0
    np.testing.assert_allclose(np.asarray(grad_h0), expected_h0, **TOLERANCE)


@pytest.mark.parametrize("min_radius, max_radius", [(0.9, 0.999), (0.3, 0.6)])
def test_rg_lru_initialisation(min_radius, max_radius):
    """Griffin's ring: σ(Λ) in [min_radius, max_radius] with σ(Λ)² uniform (for (0.3, 0.6)
    E[σ(Λ)²] is 0.225; a uniform σ(Λ) would give 0.21); kernels N(0, 1/I), zero biases."""
    input_size = 64
    params = rg_lru(4000, min_radius=min_radius, max_radius=max_radius).init(jax.random.PRNGKey(8), input_size)
    radius = 1.0 / (1.0 + np.exp(-np.asarray(params["lambda"], np.float64)))
    assert min_radius - 1e-6 <= radius.min() and radius.max() <= max_radius + 1e-6
    np.testing.assert_allclose(np.mean(radius**2), (min_radius**2 + max_radius**2) / 2, atol=0.004)
    np.testing.assert_allclose(np.std(params["w_x"]), 1 / np.sqrt(input_size), rtol=0.02)
    np.testing.assert_array_equal(params["b"], 0.0)
    assert {k: v.shape for k, v in params.items()} == {"w_x": (64, 12000), "b": (12000,), "lambda": (4000,)}


# -- cells that are not linear recurrences --------------------------------------------


def _trace_associative_unroll(cell) -> None:
    """Traces `unroll(method="associative")` without compiling anything."""
    xs = jnp.zeros((2, 5, 3))
    jax.eval_shape(lambda: rnnlab.unroll(cell, cell.init(jax.random.PRNGKey(0), 3), xs, method="associative"))


@pytest.mark.parametrize(
    "cell, name", [(basic_rnn(4), r"basic_rnn\(4\)"), (indrnn(4), r"indrnn\(4\)")], ids=["basic_rnn", "indrnn"]
)
def test_nonlinear_cell_raises(cell, name):
    with pytest.raises(ValueError, match=rf"{name} is not a linear recurrence; use method='scan'") as error:
        _trace_associative_unroll(cell)
    assert "\n" not in str(error.value)


def test_stack_with_a_nonlinear_layer_raises():
    with pytest.raises(ValueError, match=r"layer 1: basic_rnn\(4\) is not a linear recurrence"):
        _trace_associative_unroll(rnnlab.stack([min_gru(4), basic_rnn(4)]))


@pytest.mark.parametrize("name", MACHINERY_CELLS)
def test_residual_linear_cell_runs_associative(name):
    """`residual` keeps the linear recurrence: the associative and the hoisted scan
    unrolls add the input to the inner cell's outputs (run by the static loop, which
    does not go through the linear-recurrence path)."""
    inner = CELLS[name][0]()
    cell = rnnlab.residual(inner)
    input_size = cell.output_size  # the residual adds the input to the output
    params = cell.init(jax.random.PRNGKey(8), input_size)
    xs = jax.random.normal(jax.random.PRNGKey(9), (B, T, input_size))
    inner_ys, final_ref = rnnlab.unroll(inner, params, xs, lengths=LENGTHS, method="static")
    valid = (np.arange(T)[None, :] < LENGTHS[:, None])[..., None]
    ys_ref = jnp.where(valid, xs + inner_ys, 0.0)
    for method in ("associative", "scan"):
        ys, final = rnnlab.unroll(cell, params, xs, lengths=LENGTHS, method=method)
        _assert_trees_close(ys, ys_ref, **TOLERANCE)
        _assert_trees_close(final, final_ref, **TOLERANCE)
