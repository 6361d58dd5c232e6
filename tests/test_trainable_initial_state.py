"""`rnnlab.trainable_initial_state`: a learned initial state, against the plain cell
started from that state by hand, for every unroll method, with lengths, dropout keys,
resets and stacks; and its gradients."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import rnnlab
from rnnlab import cells
from rnnlab.cells.base import RNNCell
from rnnlab.cells.lstm import LSTMState
from rnnlab.wrappers import DropoutState
from test_unroll import assert_trees_close, loop_reference

B, T, I = 3, 6, 3
LENGTHS = np.array([6, 2, 0])

PLAIN_CELLS: dict[str, Callable[[], RNNCell]] = {
    "lstm": lambda: cells.lstm(4, peepholes=True),  # runs its fused scan
    "gru": lambda: cells.gru(4),
    "min_gru": lambda: cells.min_gru(4),
    "lru": lambda: cells.lru(I, state_size=4),  # a complex state
    "dropout": lambda: rnnlab.dropout(cells.lstm(4), output_keep=0.7, state_keep=0.8, variational=True),
}


def wrapped(name: str) -> RNNCell:
    return rnnlab.trainable_initial_state(PLAIN_CELLS[name]())


def moved_params(cell: RNNCell, seed: int) -> Any:
    """The wrapper's params with the learned state moved off its (zero) init."""
    params = cell.init(jax.random.PRNGKey(seed), I)
    leaves, treedef = jax.tree.flatten(params["initial_state"])
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    moved = [leaf + jax.random.normal(k, leaf.shape).astype(leaf.dtype) for leaf, k in zip(leaves, keys)]
    return {"cell": params["cell"], "initial_state": jax.tree.unflatten(treedef, moved)}


def by_hand(learned: Any, plain: RNNCell, cell_params: Any, rng: Any) -> Any:
    """The batched state that the wrapper should start from, built without it: the
    learned values for every example, with the dropout keys the plain cell draws."""
    tile = lambda leaf: jnp.broadcast_to(leaf, (B,) + leaf.shape)
    if rng is None:
        return jax.tree.map(tile, learned)
    keys = rnnlab.batched_initial_state(plain, cell_params, B, rng).key
    return DropoutState(jax.tree.map(tile, learned.cell), keys)


def methods(name: str) -> list[str]:
    return ["scan", "static", "associative"] if name in ("min_gru", "lru") else ["scan", "static"]


CASES = [(name, method) for name in PLAIN_CELLS for method in methods(name)]


@pytest.mark.parametrize("name, method", CASES)
def test_unroll_starts_from_the_learned_state(name: str, method: str) -> None:
    cell, plain = wrapped(name), PLAIN_CELLS[name]()
    params = moved_params(cell, seed=0)
    xs = jax.random.normal(jax.random.PRNGKey(2), (B, T, I))
    rng = jax.random.PRNGKey(3) if name == "dropout" else None
    ys, final = rnnlab.unroll(cell, params, xs, lengths=LENGTHS, method=method, rng=rng)
    start = by_hand(params["initial_state"], plain, params["cell"], rng)
    ys_ref, final_ref = loop_reference(plain, params["cell"], xs, lengths=LENGTHS, initial_state=start)
    np.testing.assert_allclose(ys, ys_ref, rtol=1e-5, atol=1e-6)
    assert_trees_close(final, final_ref, rtol=1e-5, atol=1e-6)


def test_init_holds_the_cells_own_initial_state_without_keys() -> None:
    lstm_params = wrapped("lstm").init(jax.random.PRNGKey(0), I)
    assert isinstance(lstm_params["initial_state"], LSTMState)
    assert_trees_close(lstm_params["initial_state"], LSTMState(jnp.zeros(4), jnp.zeros(4)), rtol=0, atol=0)
    lru_state = wrapped("lru").init(jax.random.PRNGKey(0), I)["initial_state"]
    assert lru_state.dtype == jnp.complex64 and lru_state.shape == (4,)
    dropout_params = wrapped("dropout").init(jax.random.PRNGKey(0), I)
    assert dropout_params["initial_state"].key is None  # keys are drawn per sequence, not learned


def test_resets_restart_from_the_learned_state() -> None:
    resets = np.zeros((B, T), bool)
    resets[0, 3] = resets[1, 1] = True
    xs = jax.random.normal(jax.random.PRNGKey(4), (B, T, I))
    for name in ("lstm", "lru"):
        cell = wrapped(name)
        params = moved_params(cell, seed=5)
        # the reference loop resets to `cell.initial_state(params)`: check what that is
        assert_trees_close(cell.initial_state(params), params["initial_state"], rtol=0, atol=0)
        ys, final = rnnlab.unroll(cell, params, xs, resets=resets)
        ys_ref, final_ref = loop_reference(cell, params, xs, resets=resets)
        np.testing.assert_allclose(ys, ys_ref, rtol=1e-5, atol=1e-6)
        assert_trees_close(final, final_ref, rtol=1e-5, atol=1e-6)


def test_a_stack_gets_a_learned_state_per_layer_and_runs_layer_by_layer() -> None:
    stack = rnnlab.trainable_initial_state(rnnlab.stack([PLAIN_CELLS["lstm"](), PLAIN_CELLS["gru"]()]))
    layers = list(stack.layers)
    assert [layer.name for layer in layers] == [wrapped("lstm").name, wrapped("gru").name]
    params = stack.init(jax.random.PRNGKey(6), I)
    params = [moved_params(layer, seed=7 + i) | {"cell": p["cell"]} for i, (layer, p) in enumerate(zip(layers, params))]
    xs = jax.random.normal(jax.random.PRNGKey(8), (B, T, I))
    ys, _ = rnnlab.unroll(stack, tuple(params), xs, lengths=LENGTHS)
    plain = rnnlab.stack([PLAIN_CELLS["lstm"](), PLAIN_CELLS["gru"]()])
    start = tuple(by_hand(p["initial_state"], None, None, None) for p in params)
    ys_ref, _ = loop_reference(plain, tuple(p["cell"] for p in params), xs, lengths=LENGTHS, initial_state=start)
    np.testing.assert_allclose(ys, ys_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name, method", [("lstm", "scan"), ("lru", "associative"), ("gru", "scan")])
def test_gradient_of_the_learned_state_sums_the_examples_gradients(name: str, method: str) -> None:
    cell, plain = wrapped(name), PLAIN_CELLS[name]()
    params = moved_params(cell, seed=9)
    xs = jax.random.normal(jax.random.PRNGKey(10), (B, T, I))

    def loss(ys: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(ys))

    grads = jax.grad(lambda p: loss(rnnlab.unroll(cell, p, xs, lengths=LENGTHS, method=method)[0]))(params)
    start = by_hand(params["initial_state"], None, None, None)
    state_grads = jax.grad(
        lambda s: loss(rnnlab.unroll(plain, params["cell"], xs, initial_state=s, lengths=LENGTHS, method=method)[0])
    )(start)
    summed = jax.tree.map(lambda g: jnp.sum(g, axis=0), state_grads)
    assert_trees_close(grads["initial_state"], summed, rtol=1e-5, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(summed)) > 1e-3  # the state matters
    if name == "lstm":  # the fused scan's hand-written backward pass, against finite differences
        check_grads(
            lambda state: loss(rnnlab.unroll(cell, {"cell": params["cell"], "initial_state": state}, xs)[0]),
            (params["initial_state"],), order=1, modes=["rev"], eps=1e-3, atol=1e-3, rtol=1e-3,
        )


def test_bad_input_is_refused_in_one_line() -> None:
    with pytest.raises(TypeError, match="trainable_initial_state needs an rnnlab RNNCell, got str"):
        rnnlab.trainable_initial_state("lstm")
    plain_params = PLAIN_CELLS["lstm"]().init(jax.random.PRNGKey(0), I)  # the plain cell's params
    with pytest.raises(ValueError, match=r"params do not fit trainable_initial_state\(lstm.*missing \['cell'\]"):
        rnnlab.unroll(wrapped("lstm"), plain_params, jnp.ones((B, T, I)))
