"""The fused scans of the LSTM (`rnnlab.cells.lstm_scan`: TF1's options, CIFG, layer
norm of the gates and of the cell), the GRU (`rnnlab.cells.gru_scan`, both forms) and the
basic RNN (`rnn_scan`): the same values and gradients as autodiff of the step under
`lax.scan`, numerical gradients, and when they run.
(`tests/test_unroll.py` also checks them against the per-example loop.)"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.core
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnlab
import rnnlab.linen
from rnnlab.cells import basic_rnn, gru, lstm
from rnnlab.cells import lstm_scan
from rnnlab.cells.fused import blocks

B, T, I, H = 4, 6, 3, 5
LENGTHS = jnp.array([6, 0, 2, 4], jnp.int32)


def _setup(cell, seed=0):
    k_params, k_xs, k_state = jax.random.split(jax.random.PRNGKey(seed), 3)
    params = cell.init(k_params, I)
    xs = jax.random.normal(k_xs, (B, T, I))
    leaves, treedef = jax.tree.flatten(rnnlab.batched_initial_state(cell, params, B))
    keys = jax.random.split(k_state, len(leaves))
    state = jax.tree.unflatten(treedef, [jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])
    return params, xs, state


def _loss(cell, fused, **options):
    def loss(params, xs, state):
        ys, final = rnnlab.unroll(cell, params, xs, initial_state=state, fused=fused, **options)
        final_term = sum(jnp.sum(leaf * jnp.arange(1, leaf.shape[-1] + 1)) for leaf in jax.tree.leaves(final))
        return jnp.sum(jnp.sin(3 * ys)) + final_term

    return loss


def _perturbed(params):
    """Params with every leaf moved off its initial value (layer-norm gains of one)."""
    keys = jax.random.split(jax.random.PRNGKey(7), len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    return jax.tree.unflatten(treedef, [p + 0.2 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


# name -> a cell of width H with a fused scan
FUSED_CELLS = {
    "lstm": lambda: lstm(H, forget_bias=0.7),
    "ln_lstm": lambda: lstm(H, forget_bias=0.7, layer_norm=True),
    "lstm_peepholes_cell_clip": lambda: lstm(H, forget_bias=0.7, peepholes=True, cell_clip=0.6),
    "lstm_proj_clip": lambda: lstm(H, num_proj=3, proj_clip=0.3),
    "ln_lstm_peepholes_proj": lambda: lstm(H, layer_norm=True, peepholes=True, num_proj=4),
    "lstm_cifg": lambda: lstm(H, forget_bias=0.7, coupled_input_forget=True),
    "lstm_cifg_peepholes_cell_clip": lambda: lstm(H, coupled_input_forget=True, peepholes=True, cell_clip=0.6),
    "ln_lstm_cell": lambda: lstm(H, forget_bias=0.7, layer_norm=True, layer_norm_cell=True),
    "ln_lstm_cell_peepholes_cifg_proj_clip": lambda: lstm(
        H, layer_norm=True, layer_norm_cell=True, peepholes=True, coupled_input_forget=True, num_proj=3, proj_clip=0.3
    ),
    "gru": lambda: gru(H),
    "gru_reset_after": lambda: gru(H, reset_after=True),
    "basic_rnn": lambda: basic_rnn(H),
    "basic_rnn_relu": lambda: basic_rnn(H, activation=jax.nn.relu),
}


@pytest.mark.parametrize("name", FUSED_CELLS)
@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(lengths=LENGTHS),
        dict(lengths=LENGTHS, reverse=True, unroll=2),
        dict(time_major=True),
        dict(lengths=LENGTHS, hoist=True),
    ],
    ids=["full", "lengths", "lengths_reverse_unroll2", "time_major", "lengths_hoisted"],
)
def test_values_and_gradients_match_autodiff_of_the_step(options, name):
    cell = FUSED_CELLS[name]()
    params, xs, state = _setup(cell)
    params = _perturbed(params)
    if options.get("time_major"):
        xs = jnp.swapaxes(xs, 0, 1)
    fused = jax.jit(jax.value_and_grad(_loss(cell, True, **options), argnums=(0, 1, 2)))
    autodiff = jax.jit(jax.value_and_grad(_loss(cell, False, **options), argnums=(0, 1, 2)))
    (value, grads), (value_ref, grads_ref) = fused(params, xs, state), autodiff(params, xs, state)
    np.testing.assert_allclose(value, value_ref, rtol=1e-5)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        # float32 rounding scales with the largest entries (the layer norms divide by small spreads)
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(g_ref).max())))
    if "lengths" in options:  # nothing flows into the padding
        pad = np.arange(T)[None, :] >= np.asarray(LENGTHS)[:, None]
        assert np.all(np.asarray(grads[1])[pad] == 0.0)


@pytest.mark.parametrize(
    "cell",
    [
        lstm(H),
        lstm(H, peepholes=True, cell_clip=0.6, num_proj=3, proj_clip=0.3),
        lstm(H, coupled_input_forget=True, layer_norm=True, layer_norm_cell=True, peepholes=True),
    ],
    ids=["lstm", "lstm_tf1", "ln_lstm_cell_cifg_peepholes"],
)
def test_one_loop_bidirectional_and_stack_match_autodiff(cell, monkeypatch):
    """Both directions vmapped over one fused scan (as on a GPU; on CPU a fused scan
    keeps two loops), and a stack whose LSTM layer is fused."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    params = rnnlab.init_bidirectional(cell, cell, jax.random.PRNGKey(1), I)
    _, xs, _ = _setup(cell)

    def bidi_loss(params, xs, fused):
        outputs, _ = rnnlab.bidirectional(cell, cell, params, xs, lengths=LENGTHS, fused=fused)
        return jnp.sum(jnp.sin(3 * outputs))

    stack = rnnlab.stack([cell, gru(4)])
    stack_params = stack.init(jax.random.PRNGKey(2), I)

    def stack_loss(params, xs, fused):
        return jnp.sum(jnp.sin(3 * rnnlab.unroll(stack, params, xs, lengths=LENGTHS, fused=fused)[0]))

    for loss, p in [(bidi_loss, params), (stack_loss, stack_params)]:
        grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
        for g, g_ref in zip(jax.tree.leaves(grad(p, xs, None)), jax.tree.leaves(grad(p, xs, False)), strict=True):
            np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make_cell",
    [
        lambda: lstm(3, forget_bias=0.3),
        lambda: lstm(3, layer_norm=True),
        lambda: lstm(3, peepholes=True, cell_clip=0.6, num_proj=2, proj_clip=0.4),
        lambda: lstm(3, forget_bias=0.3, coupled_input_forget=True, peepholes=True),
        lambda: lstm(3, layer_norm=True, layer_norm_cell=True, peepholes=True),
        lambda: lstm(3, layer_norm=True, layer_norm_cell=True, coupled_input_forget=True, num_proj=2),
        lambda: gru(3),
        lambda: gru(3, reset_after=True),
        lambda: basic_rnn(3),
    ],
    ids=[
        "lstm",
        "ln_lstm",
        "lstm_tf1_options",
        "lstm_cifg_peepholes",
        "ln_lstm_cell_peepholes",
        "ln_lstm_cell_cifg_proj",
        "gru",
        "gru_reset_after",
        "basic_rnn",
    ],
)
def test_numerical_gradients_in_float64(make_cell):
    with jax.enable_x64(True):
        cell = make_cell()
        params = _perturbed(cell.init(jax.random.PRNGKey(3), 2))
        params = jax.tree.map(lambda p: p.astype(jnp.float64), params)
        xs = jax.random.normal(jax.random.PRNGKey(4), (2, 3, 2), jnp.float64)
        state = rnnlab.batched_initial_state(cell, params, 2)
        state = jax.tree.map(lambda s: s + 0.5, state)
        loss = jax.jit(_loss(cell, True, lengths=jnp.array([3, 2]), reverse=True))
        check_grads(loss, (params, xs, state), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_value_exactly_on_a_clip_gets_autodiffs_half_slope(dtype):
    """`jnp.clip`'s derivative is ½ where the value equals the bound (ties are common in
    bfloat16); the slope by which the fused backward pass multiplies, for the cell and
    the projection clip alike, must be the same. (Checked on the clip itself: the two
    paths' forward values need not agree to the last bit, so a tie in one is not
    always a tie in the other; the next test builds ties exact in both.)"""
    v = jnp.array([-2.0, -1.5, -1.0, 0.0, 0.3, 1.5, 2.0], dtype)
    clipped, slope = lstm_scan._clipped(v, 1.5)
    np.testing.assert_array_equal(clipped, jnp.clip(v, -1.5, 1.5))
    autodiff_slope = jax.vmap(jax.grad(lambda x: jnp.clip(x, -1.5, 1.5)))(v)
    np.testing.assert_array_equal(slope, autodiff_slope)
    assert slope.dtype == dtype and float(slope[1]) == float(slope[5]) == 0.5


def _saturated(params, dtype):
    """`params` with zero kernels and a bias of 100: every gate is exactly 1 (σ(100) and
    tanh(100) round to 1 in float32 and bfloat16), so the cell adds exactly 1 per step."""
    params = {**params, "w_x": jnp.zeros_like(params["w_x"]), "w_h": jnp.zeros_like(params["w_h"])}
    params["b"] = jnp.full_like(params["b"], 100.0)
    return jax.tree.map(lambda p: p.astype(dtype), params)


@pytest.mark.parametrize("fused", [None, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_sequence_that_ends_exactly_on_a_clip_gets_half_the_gradient(fused, dtype):
    """End to end, with exact ties in both paths: saturated gates make `c_t = c_{t-1} + 1`
    exactly, and `m = o·tanh(c) = 1` exactly once `c` is large. From `c_0 = -1` the
    third step lands on `cell_clip = 2`, so `∂c_3/∂c_0 = ½` (no clip is active before);
    a projection of ones by `W_proj = ¼` lands on `proj_clip = 1`, so each example adds
    `½·m = ½` to every entry of `∂h/∂W_proj`."""
    num_units, batch = 4, 2
    xs = jnp.ones((batch, 3, 2), dtype)

    cell = lstm(num_units, forget_bias=0.0, cell_clip=2.0)
    params = _saturated(cell.init(jax.random.PRNGKey(0), 2), dtype)
    state = rnnlab.batched_initial_state(cell, params, batch)
    state = state._replace(c=jnp.full_like(state.c, -1.0))

    def final_cell(c0):
        return jnp.sum(rnnlab.unroll(cell, params, xs, initial_state=state._replace(c=c0), fused=fused)[1].c)

    np.testing.assert_array_equal(rnnlab.unroll(cell, params, xs, initial_state=state, fused=fused)[1].c, 2.0)
    np.testing.assert_array_equal(jax.grad(final_cell)(state.c), 0.5)

    cell = lstm(num_units, forget_bias=0.0, num_proj=3, proj_clip=1.0)
    params = _saturated(cell.init(jax.random.PRNGKey(0), 2), dtype)
    params["w_proj"] = jnp.full_like(params["w_proj"], 0.25)
    state = rnnlab.batched_initial_state(cell, params, batch)
    state = state._replace(c=jnp.full_like(state.c, 50.0))

    def final_output(w_proj):
        final = rnnlab.unroll(cell, {**params, "w_proj": w_proj}, xs, initial_state=state, fused=fused)[1]
        return jnp.sum(final.h)

    np.testing.assert_array_equal(rnnlab.unroll(cell, params, xs, initial_state=state, fused=fused)[1].h, 1.0)
    np.testing.assert_array_equal(jax.grad(final_output)(params["w_proj"]), 0.5 * batch)


@pytest.mark.parametrize("name", ["lstm", "gru", "basic_rnn"])
def test_forward_mode_needs_fused_false_and_matches_the_fused_reverse_mode(name):
    cell = FUSED_CELLS[name]()
    params, xs, state = _setup(cell)
    direction = jax.random.normal(jax.random.PRNGKey(5), xs.shape)

    def outputs(fused):
        return lambda xs: rnnlab.unroll(cell, params, xs, initial_state=state, lengths=LENGTHS, fused=fused)[0]

    with pytest.raises(TypeError, match="pass fused=False"):
        jax.jvp(outputs(None), (xs,), (direction,))
    _, tangent = jax.jvp(outputs(False), (xs,), (direction,))
    jacobian = jax.jacrev(outputs(None))(xs)  # [B, T, H, B, T, I], by the fused backward pass
    expected = jnp.tensordot(jacobian, direction, axes=3)
    np.testing.assert_allclose(tangent, expected, rtol=1e-4, atol=1e-5)


def test_which_cells_have_a_fused_scan():
    assert all(make_cell().fused_scan is not None for make_cell in FUSED_CELLS.values())
    without = [
        lstm(4, activation=jax.nn.relu),
        lstm(4, coupled_input_forget=True, layer_norm=True, layer_norm_cell=True, activation=jax.nn.soft_sign),
        gru(4, activation=jax.nn.relu),
        basic_rnn(4, activation=jax.nn.sigmoid),
        rnnlab.dropout(lstm(4), output_keep=0.5),
    ]
    for cell in without:
        assert cell.fused_scan is None, cell.name


@pytest.mark.parametrize(
    "cell, options, message",
    [
        (lstm(H, coupled_input_forget=True, activation=jax.nn.relu), dict(), "has no fused scan"),
        (lstm(H), dict(remat=True), "without remat"),
        (lstm(H), dict(method="static"), "without remat"),
    ],
)
def test_fused_true_where_it_cannot_run_raises(cell, options, message):
    params, xs, _ = _setup(cell)
    with pytest.raises(ValueError, match=message):
        rnnlab.unroll(cell, params, xs, fused=True, **options)
    with pytest.raises(ValueError, match=message):  # the Flax module passes it on
        rnnlab.linen.RNN(cell, fused=True, **options).init(jax.random.PRNGKey(0), xs)


@pytest.mark.parametrize("name", FUSED_CELLS)
def test_bfloat16_inputs_with_float32_params(name):
    """Gradients come back in each input's dtype, and the values match autodiff of the
    step (float32 compute, since the params are float32)."""
    cell = FUSED_CELLS[name]()
    params, xs, _ = _setup(cell)
    xs = xs.astype(jnp.bfloat16)

    def loss(params, xs, fused):
        return jnp.sum(jnp.sin(3 * rnnlab.unroll(cell, params, xs, lengths=LENGTHS, fused=fused)[0]))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)
    grads, grads_ref = grad(params, xs, None), grad(params, xs, False)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        assert g.dtype == g_ref.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32), rtol=2e-2, atol=2e-2)


def test_frozen_params_and_a_traced_forget_bias():
    """Params in a Flax `FrozenDict` get gradients of the same container; a `forget_bias`
    traced by `jit` (a sweep) runs the step, since the fused scan needs a number."""
    cell = lstm(H)
    params, xs, _ = _setup(cell)
    frozen = flax.core.freeze(params)
    grads = jax.grad(lambda p: jnp.sum(rnnlab.unroll(cell, p, xs)[0]))(frozen)
    assert isinstance(grads, flax.core.FrozenDict)
    grads_ref = jax.grad(lambda p: jnp.sum(rnnlab.unroll(cell, p, xs, fused=False)[0]))(params)
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref), strict=True):
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)

    swept = jax.jit(lambda bias: rnnlab.unroll(lstm(H, forget_bias=bias), params, xs)[0])(0.3)
    np.testing.assert_allclose(swept, rnnlab.unroll(lstm(H, forget_bias=0.3), params, xs)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend, hoisted", [("cpu", False), ("gpu", True), ("tpu", True)])
def test_the_default_runs_the_fused_scan_hoisted_on_accelerators_only(monkeypatch, backend, hoisted):
    calls = []
    cell = lstm(H)
    spy = cell._replace(fused_scan=lambda *args: calls.append(args[-1]) or cell.fused_scan(*args))
    params, xs, _ = _setup(cell)
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    rnnlab.unroll(spy, params, xs)
    rnnlab.unroll(spy, params, xs, hoist=not hoisted)
    rnnlab.unroll(spy, params, xs, remat=True)  # rematerialised: autodiff of the step
    rnnlab.unroll(spy, params, xs, fused=False)
    assert calls == [hoisted, not hoisted]


@pytest.mark.parametrize("count", [1, 3, 4])
def test_blocks_equals_concatenate(count):
    values = [jax.random.normal(jax.random.PRNGKey(k), (B, H)) for k in range(count)]
    np.testing.assert_array_equal(blocks(values), jnp.concatenate(values, axis=-1))
