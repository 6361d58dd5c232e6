"""Peer LSTM implementations for `rnnlab.bench`: the same model in other frameworks.

Every peer builds the benchmark's classifier — one LSTM layer over `[B, T, I]`
batch-major inputs, a linear head on the last output, softmax cross-entropy, Adam —
from the SAME weights as rnnlab's `lstm` (transplanted into the peer's layout), so its
outputs can be checked against rnnlab's before it is timed. JAX peers are jitted as a
whole (train step: forward + backward + Adam, params and optimiser state donated);
PyTorch runs eagerly with `torch.set_num_threads(os.cpu_count())` unless told otherwise,
on the GPU (cuDNN's LSTM) when JAX's default backend is a GPU and PyTorch sees one.

A peer whose framework is not installed raises `ImportError` from `build_peer`; the
benchmark reports it as skipped.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rnnlab.bench.timing import Program, jax_program

LEARNING_RATE = 1e-3

PEER_LABELS = {
    "flax_lstm": "Flax nn.RNN(LSTMCell)",
    "flax_optimized_lstm": "Flax nn.RNN(OptimizedLSTMCell)",
    "haiku_lstm": "Haiku dynamic_unroll(LSTM)",
    "keras_lstm": "Keras 3 LSTM (JAX backend)",
    "torch_lstm": "PyTorch nn.LSTM",
}


class LSTMWeights(NamedTuple):
    """The classifier's weights in rnnlab's layout (gate columns `i, j, f, o`, where
    `j` is the candidate that other frameworks call `g`).

    Attributes:
      w_x: `[I, 4H]`. w_h: `[H, 4H]`. b: `[4H]`.
      forget_bias: the constant rnnlab adds to the forget gate's pre-activation.
      head_w: `[H, C]`. head_b: `[C]`.
    """

    w_x: np.ndarray
    w_h: np.ndarray
    b: np.ndarray
    forget_bias: float
    head_w: np.ndarray
    head_b: np.ndarray

    def gate(self, array: np.ndarray, name: str) -> np.ndarray:
        """The columns (last axis) of gate `name` (`"i"`, `"j"`, `"f"` or `"o"`)."""
        width = array.shape[-1] // 4
        index = "ijfo".index(name)
        return array[..., index * width : (index + 1) * width]

    def bias(self, name: str) -> np.ndarray:
        """Gate `name`'s bias with the forget bias folded in."""
        return self.gate(self.b, name) + (self.forget_bias if name == "f" else 0.0)


def build_peer(
    name: str, mode: str, weights: LSTMWeights, x: np.ndarray, labels: np.ndarray, torch_threads: int = 0
) -> Program:
    """The compiled (or eager) forward pass or train step of peer `name`.

    The checked outputs are the forward `"outputs"` `[B, T, H]` and the first train
    step's `"loss"`. `torch_threads` sets PyTorch's intra-op threads (0: all cores).
    Raises `ImportError` when the peer's framework is missing.
    """
    builders: dict[str, Callable[..., Program]] = {
        "flax_lstm": lambda *a: _flax(False, *a),
        "flax_optimized_lstm": lambda *a: _flax(True, *a),
        "haiku_lstm": _haiku,
        "keras_lstm": _keras,
        "torch_lstm": lambda *a: _torch(torch_threads or os.cpu_count() or 1, *a),
    }
    if name not in builders:
        raise ValueError(f"unknown peer {name!r}; peers are {', '.join(builders)}.")
    return builders[name](mode, weights, x, labels)


def _jax_classifier_program(
    apply: Callable[[Any, Any], tuple[Any, Any]], params: Any, mode: str, x: np.ndarray, labels: np.ndarray
) -> Program:
    """Forward pass or jitted train step of a JAX classifier `apply(params, x) ->
    (outputs [B, T, H], logits [B, C])`."""

    params = jax.tree.map(jnp.asarray, params)
    x = jnp.asarray(x)
    if mode == "forward":
        return jax_program(lambda p, x: apply(p, x)[0], (params, x), lambda outputs: {"outputs": outputs})

    optimizer = optax.adam(LEARNING_RATE)

    def loss_fn(params, x, labels):
        logits = apply(params, x)[1]
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    def train_step(params, opt_state, x, labels):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    args = (params, optimizer.init(params), x, jnp.asarray(labels))
    return jax_program(train_step, args, lambda r: {"loss": r[2]}, carry=2)


def _flax(optimized: bool, mode: str, weights: LSTMWeights, x: np.ndarray, labels: np.ndarray) -> Program:
    """Flax `nn.RNN` over `nn.LSTMCell` or `nn.OptimizedLSTMCell` (gates `i, f, g, o`)."""
    import flax.linen as nn

    cell_type = nn.OptimizedLSTMCell if optimized else nn.LSTMCell
    num_units, num_classes = weights.w_h.shape[0], weights.head_w.shape[1]

    class Classifier(nn.Module):
        @nn.compact
        def __call__(self, inputs):
            outputs = nn.RNN(cell_type(features=num_units, name="cell"))(inputs)
            return outputs, nn.Dense(num_classes, name="head")(outputs[:, -1])

    cell = {}
    for flax_gate, gate in zip("ifgo", "ifjo"):
        cell[f"i{flax_gate}"] = {"kernel": weights.gate(weights.w_x, gate)}
        cell[f"h{flax_gate}"] = {"kernel": weights.gate(weights.w_h, gate), "bias": weights.bias(gate)}
    params = {
        "params": {
            "cell": cell,
            "head": {"kernel": weights.head_w, "bias": weights.head_b},
        }
    }
    model = Classifier()
    _check_same_structure(jax.eval_shape(model.init, _key(), x[:1]), params, "flax")
    return _jax_classifier_program(model.apply, params, mode, x, labels)


def _haiku(mode: str, weights: LSTMWeights, x: np.ndarray, labels: np.ndarray) -> Program:
    """Haiku `hk.dynamic_unroll(hk.LSTM)`: one linear over `[x, h]` with gates `i, g, f, o`
    and a built-in forget bias of 1."""
    import haiku as hk

    batch_size, num_units, num_classes = x.shape[0], weights.w_h.shape[0], weights.head_w.shape[1]

    def classifier(inputs):
        core = hk.LSTM(num_units, name="lstm")
        outputs, _ = hk.dynamic_unroll(core, inputs, core.initial_state(batch_size), time_major=False)
        return outputs, hk.Linear(num_classes, name="head")(outputs[:, -1])

    model = hk.without_apply_rng(hk.transform(classifier))
    bias = weights.b.copy()
    weights.gate(bias, "f")[...] += weights.forget_bias - 1.0
    params = {
        "lstm/linear": {"w": np.concatenate([weights.w_x, weights.w_h], axis=0), "b": bias},
        "head": {"w": weights.head_w, "b": weights.head_b},
    }
    _check_same_structure(jax.eval_shape(model.init, _key(), x), params, "haiku")
    return _jax_classifier_program(model.apply, params, mode, x, labels)


def _keras(mode: str, weights: LSTMWeights, x: np.ndarray, labels: np.ndarray) -> Program:
    """Keras 3's `layers.LSTM` (gates `i, f, c, o`) on its JAX backend, called through
    `Model.stateless_call` so that the step is jitted like the other JAX peers'.

    Keras fixes its backend when first imported: this sets `KERAS_BACKEND=jax` for the
    process unless the environment already names one (so a later `tf.keras` in the same
    process runs on JAX too), and refuses a Keras imported on another backend.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"Keras runs on its {keras.backend.backend()!r} backend in this process; the keras_lstm "
            "peer needs KERAS_BACKEND=jax before Keras is first imported."
        )
    num_units, num_classes = weights.w_h.shape[0], weights.head_w.shape[1]
    inputs = keras.Input(x.shape[1:])
    outputs = keras.layers.LSTM(num_units, return_sequences=True, name="lstm")(inputs)
    model = keras.Model(inputs, [outputs, keras.layers.Dense(num_classes, name="head")(outputs[:, -1])])
    order = "ifjo"  # Keras's i, f, c, o
    params = [
        np.concatenate([weights.gate(weights.w_x, g) for g in order], 1),
        np.concatenate([weights.gate(weights.w_h, g) for g in order], 1),
        np.concatenate([weights.bias(g) for g in order]),
        weights.head_w,
        weights.head_b,
    ]
    _check_same_structure([variable.value for variable in model.trainable_variables], params, "keras")
    state = [variable.value for variable in model.non_trainable_variables]  # its dropout seed, unused
    return _jax_classifier_program(lambda p, x: model.stateless_call(p, state, x)[0], params, mode, x, labels)


def _torch(threads: int, mode: str, weights: LSTMWeights, x: np.ndarray, labels: np.ndarray) -> Program:
    """PyTorch `nn.LSTM` (gates `i, f, g, o`, biases `b_ih + b_hh`), eager, on `threads`
    intra-op threads, or on the GPU (cuDNN) when JAX runs on one."""
    import torch

    torch.set_num_threads(threads)
    device = torch.device("cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu")
    num_units, num_classes = weights.w_h.shape[0], weights.head_w.shape[1]

    class Classifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = torch.nn.LSTM(x.shape[-1], num_units, batch_first=True)
            self.head = torch.nn.Linear(num_units, num_classes)

        def forward(self, inputs):
            outputs, _ = self.lstm(inputs)
            return outputs, self.head(outputs[:, -1])

    model = Classifier()
    order = "ifjo"  # torch's i, f, g, o
    with torch.no_grad():
        model.lstm.weight_ih_l0.copy_(torch.tensor(np.concatenate([weights.gate(weights.w_x, g) for g in order], 1).T))
        model.lstm.weight_hh_l0.copy_(torch.tensor(np.concatenate([weights.gate(weights.w_h, g) for g in order], 1).T))
        model.lstm.bias_ih_l0.copy_(torch.tensor(np.concatenate([weights.bias(g) for g in order])))
        model.lstm.bias_hh_l0.zero_()
        model.head.weight.copy_(torch.tensor(weights.head_w.T))
        model.head.bias.copy_(torch.tensor(weights.head_b))
    model.to(device)
    inputs, targets = torch.tensor(x, device=device), torch.tensor(labels.astype(np.int64), device=device)

    if mode == "forward":

        def call():
            with torch.no_grad():
                return {"outputs": model(inputs)[0]}

    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)

        def call():
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(inputs)[1], targets)
            loss.backward()
            optimizer.step()
            return {"loss": loss.detach()}

    start = time.perf_counter()
    outputs = {key: value.cpu().numpy() for key, value in call().items()}
    first_call_s = time.perf_counter() - start

    def run() -> None:
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()

    return Program(run, outputs, None, first_call_s)


def _key():
    return jax.random.PRNGKey(0)


def _check_same_structure(initialised: Any, transplanted: Any, framework: str) -> None:
    """Raises if the transplanted params do not match the shapes of the peer's own init."""
    shapes = jax.tree.map(lambda leaf: tuple(leaf.shape), initialised)
    if shapes != jax.tree.map(lambda leaf: tuple(np.shape(leaf)), transplanted):
        raise RuntimeError(f"{framework} param layout changed: expected {shapes}")
