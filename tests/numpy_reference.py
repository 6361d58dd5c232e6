"""Step-by-step NumPy float64 reference implementations of the rnnlab cells.

Written from the cell equations (TF1 semantics), gate by gate, without rnnlab code.
Each takes the cell's param dict (converted to float64) and steps one example.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

LAYER_NORM_EPSILON = 1e-5


def sigmoid(v: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-v))


def softsign(v: np.ndarray) -> np.ndarray:
    return v / (1.0 + np.abs(v))


def relu(v: np.ndarray) -> np.ndarray:
    return np.maximum(v, 0.0)


def to_float64(params: dict) -> dict:
    return {k: np.asarray(v, np.float64) for k, v in params.items()}


def _block(a: np.ndarray, k: int, size: int) -> np.ndarray:
    """The k-th block of `size` columns (or entries) of `a`."""
    return a[..., k * size : (k + 1) * size]


def _layer_norm(v: np.ndarray, gain: np.ndarray, shift: np.ndarray) -> np.ndarray:
    return (v - v.mean()) / np.sqrt(v.var() + LAYER_NORM_EPSILON) * gain + shift


def basic_rnn_step(params, h, x, activation: Callable = np.tanh):
    h = activation(x @ params["w_x"] + h @ params["w_h"] + params["b"])
    return h, h


def indrnn_step(params, h, x, *, activation: Callable = relu, recurrent_max_abs: float | None = None):
    """One IndRNN step `h' = act(x·W_x + u⊙h + b)`, `u` clipped to `±recurrent_max_abs`."""
    u = params["u"] if recurrent_max_abs is None else np.clip(params["u"], -recurrent_max_abs, recurrent_max_abs)
    h = activation(x @ params["w_x"] + u * h + params["b"])
    return h, h


def lstm_step(
    params,
    state,
    x,
    *,
    forget_bias: float = 1.0,
    peepholes: bool = False,
    cell_clip: float | None = None,
    num_proj: int | None = None,
    proj_clip: float | None = None,
    coupled_input_forget: bool = False,
    layer_norm: bool = False,
    layer_norm_cell: bool = False,
    activation: Callable = np.tanh,
):
    """One LSTM step; `state = (c, h)`. Returns `((c', out), out)`."""
    c, h = state
    num_units = c.shape[0]
    names = ["j", "f", "o"] if coupled_input_forget else ["i", "j", "f", "o"]
    pre = {}
    for k, gate in enumerate(names):
        w_x = _block(params["w_x"], k, num_units)
        w_h = _block(params["w_h"], k, num_units)
        v = x @ w_x + h @ w_h
        if layer_norm:
            v = _layer_norm(
                v,
                _block(params["ln_scale"], k, num_units),
                _block(params["ln_shift"], k, num_units),
            )
        else:
            v = v + _block(params["b"], k, num_units)
        pre[gate] = v

    f_pre = pre["f"] + forget_bias
    if peepholes:
        f_pre = f_pre + params["w_f_diag"] * c
    f = sigmoid(f_pre)
    if coupled_input_forget:
        i = 1.0 - f
    else:
        i_pre = pre["i"] + (params["w_i_diag"] * c if peepholes else 0.0)
        i = sigmoid(i_pre)
    new_c = f * c + i * activation(pre["j"])
    if cell_clip is not None:
        new_c = np.clip(new_c, -cell_clip, cell_clip)

    o_pre = pre["o"] + (params["w_o_diag"] * new_c if peepholes else 0.0)
    cell_out = new_c
    if layer_norm_cell:
        cell_out = _layer_norm(new_c, params["ln_cell_scale"], params["ln_cell_shift"])
    out = sigmoid(o_pre) * activation(cell_out)
    if num_proj is not None:
        out = out @ params["w_proj"]
        if proj_clip is not None:
            out = np.clip(out, -proj_clip, proj_clip)
    return (new_c, out), out


def gru_step(params, h, x, *, reset_after: bool = False, activation: Callable = np.tanh):
    """One GRU step (gate columns r, u, c). Returns `(h', h')`."""
    n = h.shape[0]
    w_x = {g: _block(params["w_x"], k, n) for k, g in enumerate("ruc")}
    w_h = {g: _block(params["w_h"], k, n) for k, g in enumerate("ruc")}
    b = {g: _block(params["b"], k, n) for k, g in enumerate("ruc")}
    if reset_after:
        b_h = {g: _block(params["b_h"], k, n) for k, g in enumerate("ruc")}
        r = sigmoid(x @ w_x["r"] + b["r"] + h @ w_h["r"] + b_h["r"])
        u = sigmoid(x @ w_x["u"] + b["u"] + h @ w_h["u"] + b_h["u"])
        candidate = activation(x @ w_x["c"] + b["c"] + r * (h @ w_h["c"] + b_h["c"]))
    else:
        # TF1's form: kernels acting on the concatenation [x, h].
        xh = np.concatenate([x, h])
        r = sigmoid(xh @ np.concatenate([w_x["r"], w_h["r"]]) + b["r"])
        u = sigmoid(xh @ np.concatenate([w_x["u"], w_h["u"]]) + b["u"])
        xrh = np.concatenate([x, r * h])
        candidate = activation(xrh @ np.concatenate([w_x["c"], w_h["c"]]) + b["c"])
    h = u * h + (1.0 - u) * candidate
    return h, h


def rg_lru_step(params, h, x, *, c: float = 8.0):
    """One RG-LRU step (columns of `w_x`, `b`: recurrence gate r, input gate i, value u):
    `a = σ(Λ)^(c·r)`, `h' = a·h + sqrt(1 − a²)·(i·u)`. Returns `(h', h')`."""
    n = h.shape[0]
    pre = x @ params["w_x"] + params["b"]
    r, i, u = sigmoid(_block(pre, 0, n)), sigmoid(_block(pre, 1, n)), _block(pre, 2, n)
    a = sigmoid(params["lambda"]) ** (c * r)
    h = a * h + np.sqrt(1.0 - a**2) * (i * u)
    return h, h


def run(step: Callable, params, state, xs):
    """Steps over `xs: [T, I]`; returns `(states, outputs)` per step."""
    states, outputs = [], []
    for x in xs:
        state, y = step(params, state, np.asarray(x, np.float64))
        states.append(state)
        outputs.append(y)
    return states, np.stack(outputs)
