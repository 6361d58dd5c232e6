"""The basic RNN, LSTM, GRU, IndRNN and RG-LRU cells against the NumPy float64 reference."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from jax.test_util import check_grads

from rnnlab.cells.gru import gru
from rnnlab.cells.indrnn import indrnn
from rnnlab.cells.griffin import rg_lru
from rnnlab.cells.lstm import LSTMState, lstm
from rnnlab.cells.rnn import basic_rnn

I, H, P, T, B = 3, 4, 2, 5, 2
ACTIVATIONS = {
    "tanh": (jnp.tanh, np.tanh),
    "softsign": (jax.nn.soft_sign, ref.softsign),
    "relu": (jax.nn.relu, ref.relu),
}

LSTM_OPTIONS = {
    "plain": {},
    "forget_bias0_softsign": dict(forget_bias=0.0, activation="softsign"),
    "peepholes": dict(peepholes=True),
    "cell_clip": dict(cell_clip=0.5),
    "proj": dict(num_proj=P),
    "proj_clip": dict(num_proj=P, proj_clip=0.2),
    "peep_proj_clips": dict(peepholes=True, num_proj=P, cell_clip=0.5, proj_clip=0.2),
    "cifg": dict(coupled_input_forget=True),
    "cifg_peep": dict(coupled_input_forget=True, peepholes=True),
    "cifg_peep_proj_clip": dict(
        coupled_input_forget=True, peepholes=True, num_proj=P, cell_clip=0.2
    ),
    "ln": dict(layer_norm=True),
    "ln_cell": dict(layer_norm=True, layer_norm_cell=True),
    "ln_cell_proj": dict(layer_norm=True, layer_norm_cell=True, num_proj=P),
    "ln_all": dict(
        layer_norm=True,
        layer_norm_cell=True,
        peepholes=True,
        coupled_input_forget=True,
        cell_clip=0.5,
        num_proj=P,
        proj_clip=0.2,
    ),
}
GRU_OPTIONS = {
    "tf1": {},
    "tf1_softsign": dict(activation="softsign"),
    "reset_after": dict(reset_after=True),
    "reset_after_bias": dict(reset_after=True, gate_bias_init=0.5),
}
INDRNN_OPTIONS = {
    "relu": dict(activation="relu"),
    "relu_clip": dict(activation="relu", recurrent_max_abs=0.5),  # `_params` puts some |u| beyond it
    "tanh_signed_init": dict(activation="tanh", recurrent_max_abs=0.5, recurrent_init_range=(-0.5, 0.5)),
}
RG_LRU_OPTIONS = {
    "griffin": {},
    "c4_wide_ring": dict(c=4.0, min_radius=0.3, max_radius=0.95),
}


def _split_activation(options: dict) -> tuple[dict, dict]:
    """`(rnnlab kwargs, reference kwargs)` with the activation name resolved."""
    jax_act, np_act = ACTIVATIONS[options.get("activation", "tanh")]
    return {**options, "activation": jax_act}, {**options, "activation": np_act}


def _make(family: str, options: dict):
    """`(cell, reference step)` for a cell family and its options."""
    if family == "rg_lru":  # no activation; the reference needs `c` only
        return rg_lru(H, **options), functools.partial(ref.rg_lru_step, c=options.get("c", 8.0))
    cell_kwargs, ref_kwargs = _split_activation(options)
    if family == "lstm":
        return lstm(H, **cell_kwargs), functools.partial(ref.lstm_step, **ref_kwargs)
    if family == "gru":
        ref_kwargs.pop("gate_bias_init", None)  # init only: `_params` perturbs the biases
        return gru(H, **cell_kwargs), functools.partial(ref.gru_step, **ref_kwargs)
    if family == "indrnn":
        ref_kwargs.pop("recurrent_init_range", None)  # init only
        return indrnn(H, **cell_kwargs), functools.partial(ref.indrnn_step, **ref_kwargs)
    return basic_rnn(H, cell_kwargs["activation"]), functools.partial(
        ref.basic_rnn_step, activation=ref_kwargs["activation"]
    )


def _params(cell, seed: int = 0) -> dict:
    """`cell.init` params with every vector (bias, peephole, gain, shift) perturbed."""
    params = cell.init(jax.random.PRNGKey(seed), I)
    rng = np.random.default_rng(seed)
    return {
        k: v + jnp.asarray(rng.normal(0.0, 0.5, v.shape), v.dtype) if v.ndim == 1 else v
        for k, v in params.items()
    }


def _inputs(seed: int = 1, shape: tuple[int, ...] = (T, I), scale: float = 2.0) -> np.ndarray:
    return (scale * np.random.default_rng(seed).normal(size=shape)).astype(np.float32)


def _run_cell(cell, params, xs):
    """Steps the jitted cell over `xs: [T, I]`; returns `(states, outputs)`."""
    step = jax.jit(cell.step)
    state = cell.initial_state(params)
    states, outputs = [], []
    for x in xs:
        state, y = step(params, state, x)
        states.append(state)
        outputs.append(y)
    return states, np.stack(outputs)


def _plain(state):
    """An `LSTMState` as the reference's `(c, h)` tuple; other states unchanged."""
    return tuple(state) if isinstance(state, LSTMState) else state


def _run_reference(cell, ref_step, params, xs):
    init_state = jax.tree_util.tree_map(
        lambda a: np.asarray(a, np.float64), _plain(cell.initial_state(params))
    )
    return ref.run(ref_step, ref.to_float64(params), init_state, xs)


def _assert_matches_reference(family: str, options: dict) -> None:
    cell, ref_step = _make(family, options)
    params, xs = _params(cell), _inputs()
    states, ys = _run_cell(cell, params, xs)
    ref_states, ref_ys = _run_reference(cell, ref_step, params, xs)
    assert ys.dtype == np.float32
    np.testing.assert_allclose(ys, ref_ys, rtol=1e-5, atol=1e-6)
    for state, ref_state in zip(states, ref_states, strict=True):
        jax.tree_util.tree_map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
            _plain(state),
            ref_state,
        )


def test_basic_rnn_matches_reference():
    _assert_matches_reference("rnn", {})


REFERENCE_CASES = {
    f"{kind}-{name}": (kind, options)
    for kind, cases in {"lstm": LSTM_OPTIONS, "gru": GRU_OPTIONS, "indrnn": INDRNN_OPTIONS, "rg_lru": RG_LRU_OPTIONS}.items()
    for name, options in cases.items()
}


@pytest.mark.parametrize("kind, options", REFERENCE_CASES.values(), ids=REFERENCE_CASES.keys())
def test_cell_matches_reference(kind, options):
    _assert_matches_reference(kind, options)


CLIPS = [
    (name, clip)
    for name, options in LSTM_OPTIONS.items()
    for clip in ("cell_clip", "proj_clip")
    if clip in options
]


@pytest.mark.parametrize("config, clip", CLIPS, ids=[f"{n}-{c}" for n, c in CLIPS])
def test_lstm_clips_bind(config, clip):
    """Each clip in the configs above binds: without it the clipped value (c or the
    projected output) exceeds the clip; with it, it reaches the clip."""
    options = LSTM_OPTIONS[config]
    cell, ref_step = _make("lstm", options)
    unclipped_cell, unclipped_ref = _make("lstm", {**options, clip: None})
    params, xs = _params(cell), _inputs()
    clipped_states, _ = _run_reference(cell, ref_step, params, xs)
    unclipped_states, _ = _run_reference(unclipped_cell, unclipped_ref, params, xs)
    field = 0 if clip == "cell_clip" else 1
    clipped = np.abs([s[field] for s in clipped_states]).max()
    unclipped = np.abs([s[field] for s in unclipped_states]).max()
    assert unclipped > 1.2 * options[clip]
    np.testing.assert_allclose(clipped, options[clip])


def test_indrnn_recurrent_clip_binds():
    """The clip of the `relu_clip` config binds: some |u| exceed it, and the step reads
    the clipped weights (its outputs differ from those of the unclipped `u`)."""
    options = INDRNN_OPTIONS["relu_clip"]
    cell, _ = _make("indrnn", options)
    unclipped_cell, _ = _make("indrnn", {**options, "recurrent_max_abs": None})
    params, xs = _params(cell), _inputs()
    assert np.abs(params["u"]).max() > 1.2 * options["recurrent_max_abs"]
    _, ys = _run_cell(cell, params, xs)
    _, unclipped_ys = _run_cell(unclipped_cell, params, xs)
    assert np.abs(ys - unclipped_ys).max() > 1e-2


def test_indrnn_gradient_passes_the_clip_at_the_clipped_weight():
    """Past `recurrent_max_abs`, `u` gets the gradient of the clipped weight it acts with
    (what the authors' clip after each update gives), not the clip's zero derivative: it
    equals the unclipped cell's gradient at `u = clip(u)`."""
    options = INDRNN_OPTIONS["relu_clip"]
    cell, _ = _make("indrnn", options)
    unclipped_cell, _ = _make("indrnn", {**options, "recurrent_max_abs": None})
    params, xs = _params(cell), _inputs()
    bound = options["recurrent_max_abs"]
    beyond = np.abs(np.asarray(params["u"])) > bound
    assert beyond.any() and not beyond.all()

    def loss(cell, params):
        state, total = cell.initial_state(params), 0.0
        for x in xs:
            state, y = cell.step(params, state, x)
            total = total + jnp.sum(jnp.sin(y))
        return total

    grads = jax.grad(functools.partial(loss, cell))(params)
    at_clip = jax.grad(functools.partial(loss, unclipped_cell))({**params, "u": jnp.clip(params["u"], -bound, bound)})
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads, at_clip)
    assert np.all(np.abs(np.asarray(grads["u"])[beyond]) > 0)


@pytest.mark.parametrize(
    "family, options",
    [
        ("rnn", {}),
        ("lstm", LSTM_OPTIONS["peep_proj_clips"]),
        ("lstm", LSTM_OPTIONS["ln_all"]),
        ("lstm", LSTM_OPTIONS["ln_cell_proj"]),
        ("gru", GRU_OPTIONS["tf1"]),
        ("gru", GRU_OPTIONS["reset_after"]),
        ("indrnn", INDRNN_OPTIONS["relu_clip"]),
        ("rg_lru", RG_LRU_OPTIONS["griffin"]),
    ],
    ids=["rnn", "lstm_peep_proj_clips", "lstm_ln_all", "lstm_ln_cell_proj", "gru", "gru_ra", "indrnn", "rg_lru"],
)
def test_step_equals_projected_step_with_leading_axes(family, options):
    cell, _ = _make(family, options)
    params = _params(cell)
    xs = _inputs(shape=(T, B, I))
    z = jax.jit(cell.input_projection)(params, xs)
    assert z.shape[:2] == (T, B)
    np.testing.assert_allclose(z[2, 1], cell.input_projection(params, xs[2, 1]), rtol=1e-6)

    step = jax.jit(jax.vmap(cell.step, in_axes=(None, 0, 0)))
    projected_step = jax.jit(jax.vmap(cell.projected_step, in_axes=(None, 0, 0)))
    state = projected_state = jax.vmap(lambda _: cell.initial_state(params))(jnp.arange(B))
    for t in range(T):
        state, y = step(params, state, xs[t])
        projected_state, projected_y = projected_step(params, projected_state, z[t])
        assert y.shape == (B, cell.output_size)
        np.testing.assert_allclose(projected_y, y, rtol=1e-6, atol=1e-7)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        projected_state,
        state,
    )


@pytest.mark.parametrize(
    "family, options",
    [
        ("lstm", LSTM_OPTIONS["peep_proj_clips"]),
        ("lstm", LSTM_OPTIONS["ln_all"]),
        ("gru", GRU_OPTIONS["tf1"]),
        ("gru", GRU_OPTIONS["reset_after"]),
        ("indrnn", INDRNN_OPTIONS["relu"]),  # the clip's gradient: the test below
        ("rg_lru", RG_LRU_OPTIONS["c4_wide_ring"]),
    ],
    ids=["lstm_peep_proj_clips", "lstm_ln_all", "gru", "gru_ra", "indrnn", "rg_lru"],
)
def test_gradients(family, options):
    """Reverse-mode gradients w.r.t. params and inputs match finite differences."""
    cell, _ = _make(family, options)
    with jax.enable_x64(True):
        params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), _params(cell))
        xs = jnp.asarray(_inputs(shape=(3, I), scale=1.0), jnp.float64)

        @jax.jit
        def run(params, xs):
            state = cell.initial_state(params)
            for x in xs:
                state, _ = cell.step(params, state, x)
            return state

        check_grads(run, (params, xs), order=1, modes=["rev"])


def test_lstm_param_shapes():
    cell = lstm(H, peepholes=True, num_proj=P, layer_norm=True, layer_norm_cell=True)
    shapes = {k: v.shape for k, v in cell.init(jax.random.PRNGKey(0), I).items()}
    assert shapes == {
        "w_x": (I, 4 * H),
        "w_h": (P, 4 * H),
        "ln_scale": (4 * H,),
        "ln_shift": (4 * H,),
        "ln_cell_scale": (H,),
        "ln_cell_shift": (H,),
        "w_i_diag": (H,),
        "w_f_diag": (H,),
        "w_o_diag": (H,),
        "w_proj": (H, P),
    }
    cifg = lstm(H, peepholes=True, coupled_input_forget=True)
    shapes = {k: v.shape for k, v in cifg.init(jax.random.PRNGKey(0), I).items()}
    assert shapes == {
        "w_x": (I, 3 * H),
        "w_h": (H, 3 * H),
        "b": (3 * H,),
        "w_f_diag": (H,),
        "w_o_diag": (H,),
    }


def test_lstm_init_is_orthogonal_per_gate_block():
    params = lstm(H, num_proj=P).init(jax.random.PRNGKey(0), I)
    for k in range(4):
        block = params["w_h"][:, k * H : (k + 1) * H]  # [P, H]
        np.testing.assert_allclose(block @ block.T, np.eye(P), atol=1e-5)
    np.testing.assert_array_equal(params["b"], 0.0)


@pytest.mark.parametrize(
    "reset_after, gate_bias_init, expected",
    [(False, None, 1.0), (True, None, 0.0), (True, 2.0, 2.0)],
)
def test_gru_init(reset_after, gate_bias_init, expected):
    params = gru(H, reset_after=reset_after, gate_bias_init=gate_bias_init).init(
        jax.random.PRNGKey(0), I
    )
    assert {k: v.shape for k, v in params.items()} == {
        "w_x": (I, 3 * H),
        "w_h": (H, 3 * H),
        "b": (3 * H,),
        **({"b_h": (3 * H,)} if reset_after else {}),
    }
    np.testing.assert_array_equal(params["b"][: 2 * H], expected)
    np.testing.assert_array_equal(params["b"][2 * H :], 0.0)
    for k in range(3):
        block = params["w_h"][:, k * H : (k + 1) * H]
        np.testing.assert_allclose(block @ block.T, np.eye(H), atol=1e-5)


@pytest.mark.parametrize(
    "options, low, high",
    [({}, 0.0, 1.0), (dict(recurrent_max_abs=0.25), 0.0, 0.25), (dict(recurrent_init_range=(-0.3, 0.2)), -0.3, 0.2)],
    ids=["default", "cut_to_the_clip", "given"],
)
def test_indrnn_init(options, low, high):
    """`u` fills its init range, `W_x` is Glorot uniform, `b` zero."""
    num_units, input_size = 2000, 64
    params = indrnn(num_units, **options).init(jax.random.PRNGKey(0), input_size)
    assert {k: v.shape for k, v in params.items()} == {"w_x": (64, 2000), "u": (2000,), "b": (2000,)}
    u = np.asarray(params["u"])
    assert low <= u.min() < low + 0.01 * (high - low) and high - 0.01 * (high - low) < u.max() <= high
    limit = np.sqrt(6.0 / (input_size + num_units))
    assert 0.99 * limit < np.abs(np.asarray(params["w_x"])).max() <= limit
    np.testing.assert_array_equal(params["b"], 0.0)


def test_peephole_weights_are_glorot_uniform_vectors():
    """Peephole weights start uniform within Keras' `glorot_uniform` limit for an
    `H x H` matrix, `sqrt(6 / (H + H))`, and fill most of that range."""
    num_units = 512
    params = lstm(num_units, peepholes=True).init(jax.random.PRNGKey(0), I)
    limit = np.sqrt(6.0 / (num_units + num_units))
    for name in ("w_i_diag", "w_f_diag", "w_o_diag"):
        largest = np.abs(np.asarray(params[name])).max()
        assert 0.95 * limit < largest <= limit, name


@pytest.mark.parametrize(
    "cell, state_shapes",
    [
        (lstm(H), ((H,), (H,))),
        (lstm(H, num_proj=P), ((H,), (P,))),
        (gru(H), (H,)),
        (basic_rnn(H), (H,)),
        (indrnn(H), (H,)),
        (rg_lru(H), (H,)),
    ],
    ids=["lstm", "lstm_proj", "gru", "rnn", "indrnn", "rg_lru"],
)
def test_initial_state_and_output_size(cell, state_shapes):
    params = cell.init(jax.random.PRNGKey(0), I)
    state = cell.initial_state(params)
    if isinstance(state, LSTMState):
        assert (state.c.shape, state.h.shape) == state_shapes
        assert cell.output_size == state_shapes[1][0]
    else:
        assert state.shape == state_shapes
        assert cell.output_size == H
    assert all(np.all(a == 0) for a in jax.tree_util.tree_leaves(state))


@pytest.mark.parametrize("factory", [lstm, gru, basic_rnn, indrnn, rg_lru])
def test_step_rejects_bad_input(factory):
    cell = factory(H)
    params = cell.init(jax.random.PRNGKey(0), I)
    state = cell.initial_state(params)
    with pytest.raises(ValueError, match="input_size=3"):
        cell.step(params, state, jnp.zeros(I + 1))
    with pytest.raises(ValueError, match=r"shape \[input_size\]"):
        cell.step(params, state, jnp.zeros((B, I)))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: lstm(0), "num_units"),
        (lambda: lstm(-2), "num_units"),
        (lambda: lstm(2.0), "num_units"),
        (lambda: gru(0), "num_units"),
        (lambda: lstm(H, num_proj=0), "num_proj"),
        (lambda: lstm(H, proj_clip=1.0), "needs num_proj"),
        (lambda: lstm(H, cell_clip=-1.0), "cell_clip must be a positive"),
        (lambda: lstm(H, num_proj=P, proj_clip=-1.0), "proj_clip must be a positive"),
        (lambda: lstm(H, layer_norm_cell=True), "requires layer_norm"),
        (lambda: gru(H, gate_bias_init="one"), "gate_bias_init"),
        (lambda: lstm(H).init(jax.random.PRNGKey(0), 0), "input_size"),
        (lambda: rg_lru(0), "num_units"),
        (lambda: rg_lru(H, c=0.0), r"rg_lru needs a finite c > 0, got 0\.0"),
        (lambda: rg_lru(H, c=float("inf")), "finite c > 0"),
        (lambda: rg_lru(H, c=True), "finite c > 0"),
        (lambda: rg_lru(H, min_radius=0.0), "0 < min_radius <= max_radius < 1"),
        (lambda: rg_lru(H, min_radius=0.99, max_radius=0.9), "min_radius=0.99, max_radius=0.9"),
        (lambda: rg_lru(H, max_radius=1.0), "max_radius < 1"),
        (lambda: rg_lru(H, min_radius=float("nan")), "min_radius=nan"),
        (lambda: rg_lru(H, min_radius="0.5"), "0 < min_radius <= max_radius < 1, got min_radius='0.5'"),
        (lambda: rg_lru(H, max_radius=1.0 - 1e-9), r"squared radii must lie strictly inside \(0, 1\) in float32"),
        (lambda: rg_lru(H, min_radius=1e-30), r"squared radii must lie strictly inside \(0, 1\) in float32"),
        (lambda: rg_lru(H).init(jax.random.PRNGKey(0), 0), "input_size"),
        (lambda: indrnn(0), "num_units"),
        (lambda: indrnn(H, recurrent_max_abs=0.0), r"recurrent_max_abs None or a finite number > 0, got 0\.0"),
        (lambda: indrnn(H, recurrent_max_abs=float("inf")), "recurrent_max_abs None or a finite"),
        (lambda: indrnn(H, recurrent_init_range=(1.0, 0.0)), r"low <= high, got \(1\.0, 0\.0\)"),
        (lambda: indrnn(H, recurrent_init_range=(0.0, float("nan"))), "of finite numbers"),
        (lambda: indrnn(H, recurrent_init_range=0.5), "recurrent_init_range"),
        (lambda: indrnn(H, recurrent_max_abs=0.5, recurrent_init_range=(0.0, 1.0)), r"within the clip \[-0\.5, 0\.5\]"),
        (lambda: indrnn(H).init(jax.random.PRNGKey(0), 0), "input_size"),
    ],
)
def test_invalid_configurations_raise(make, message):
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_names():
    assert lstm(8).name == "lstm(8)"
    assert (
        lstm(8, peepholes=True, num_proj=4, cell_clip=3, proj_clip=1.0).name
        == "lstm(8, peepholes, proj=4, cell_clip=3.0, proj_clip=1.0)"
    )
    assert gru(8, reset_after=True).name == "gru(8, reset_after)"
    assert rg_lru(8).name == "rg_lru(8, c=8, radius=[0.9, 0.999])"
    assert indrnn(8).name == "indrnn(8)"
    assert indrnn(8, recurrent_max_abs=1.25).name == "indrnn(8, recurrent_max_abs=1.25)"
