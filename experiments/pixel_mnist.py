"""Pixel-by-pixel MNIST: each image is a sequence of 784 steps of one pixel.

Two orders: the raster order (sequential MNIST) and a fixed random permutation of the
784 pixels (permuted MNIST), drawn from `np.random.default_rng(config.permutation_seed)`
and, in a permuted run, written to `permutation.json` in the workdir (for reading only:
eval and resume take the order from `config.json`). `config.pixel_stride` keeps every
`stride`-th step of that order (1: all 784), which shortens the sequences for tests.

Two models:
* "lstm": one LSTM layer over the pixels, `lax.scan`, its last output classified.
* "lru", "min_gru", "rg_lru": the stack of the LRU paper (Orvieto et al. 2023,
  `experiments.linear_blocks`): a linear encoder `1 -> H`, then `num_layers` residual
  blocks `x + dropout(GLU(GELU(cell(LayerNorm(x)))))` with a linear-recurrence cell
  (`lru(H, N)`, `min_gru(H)` or `rg_lru(H)`), mean pooling over time and a linear
  classifier. The cells are
  unrolled with `config.unroll_method`: "associative", "scan", "static" (slow to
  compile), or "auto" (the default: the associative scan on GPU/TPU, `lax.scan` on
  CPU, where this model's train step with the hoisted sequential scan of the linear
  recurrence measured 1.05-1.3x faster than with the associative scan, and compiles
  faster; docs/benchmarks.md).

The LRU paper trains the recurrence's `ν_log, θ_log, γ_log` with a smaller learning rate:
`config.recurrent_lr_factor` (see `experiments.linear_blocks`).
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

import rnnlab
from rnnlab import distributed, plots, train
from rnnlab.cells.base import Array, Params, PRNGKey, check_positive_int
from rnnlab.cells.lstm import lstm
from rnnlab.metrics import read_metrics

from experiments import common, linear_blocks, mnist, registry
from experiments.linear_blocks import apply_dense, dense

NUM_STEPS = mnist.NUM_ROWS * mnist.NUM_PIXELS  # 784
CELL_TYPES = ("lstm",) + linear_blocks.LINEAR_CELL_TYPES
LINEAR_FIELDS = ("state_size", "num_layers", "r_min", "r_max", "max_phase", "recurrent_lr_factor", "dropout")
"""The config fields of the linear stack only; the LSTM's configs lack them."""
UNROLL_METHODS = {"lstm": ("auto", "scan", "static"), "linear": ("auto", "associative", "scan", "static")}


def get_config(cell: str = "lru", permuted: bool = False) -> ml_collections.ConfigDict:
    """The config of a pixel MNIST experiment.

    Model fields:
      cell: one of `CELL_TYPES`.
      num_units: `H`, the LSTM's width or the linear stack's model width.
      augment_shift: in training, shift each image by up to this many pixels in both
        directions (zero padded) before reading its pixels; 0 disables.
      unroll_method: the linear stack: "auto" (the default: associative on
        accelerators, scan on CPU), "associative", "scan" or "static"; the LSTM:
        "scan" (its default; "auto" means "scan" too) or "static". "static" is a
        Python loop of one graph node per step: a 784-step static unroll compiles for
        minutes.
    Fields of the linear stack only (`LINEAR_FIELDS`; the LSTM's config lacks them):
      state_size: `N`, the LRU's complex state size.
      num_layers: residual blocks (the LSTM has one layer).
      r_min, r_max, max_phase: the LRU's ring initialisation (`r_min`, `r_max`: the
        RG-LRU's too; `min_gru` ignores them).
      recurrent_lr_factor: learning-rate factor of the LRU's `ν_log, θ_log, γ_log` (the
        other linear cells have no such params: it changes nothing for them).
      dropout: drop rate in [0, 1) after every block's GLU (training only).
    Data fields:
      permuted: read the pixels in the order of a fixed random permutation.
      permutation_seed: seed of `np.random.default_rng` drawing that permutation.
      pixel_stride: keep every this many steps of the pixel order (1 keeps all 784).
      num_test_examples: evaluate on the first this many test images (0: all 10,000;
        a forward pass over 784 steps is slow on a CPU, so short runs may use fewer).
    Training fields: see `rnnlab.train.default_config`; `time_budget_s` is 28 minutes,
    so that with the final evaluation on the 10,000 test images a run ends within 30
    minutes on a 2-core CPU, and the cosine schedule is fitted to it. The linear stack's
    defaults are the recipe measured there on permuted pixel MNIST (22,699-image
    subset, about 5.5 epochs on the slower of two VMs, 17 epochs and 94.81% on the
    faster; docs/benchmarks.md): 3 blocks, batch 16 at learning rate
    2e-3 (92.75% at batch 32 and 3e-3, 93.34% at batch 16), AdamW with weight decay
    0.05 on everything but `weight_decay_exclude` (93.83%), no dropout (0.1 cost 12-17%
    of the examples per second and 0.3 points). The LSTM keeps Adam, batch 32, 1e-3.
    """
    config = common.base_config(
        batch_size=16,
        eval_batch_size=500,
        num_epochs=100,
        learning_rate=2e-3,
        optimizer="adamw",
        weight_decay=0.05,
        warmup_steps=300,
        grad_clip_norm=1.0,
        log_every_steps=50,
        eval_every_steps=0,
        checkpoint_every_steps=1000,
        time_budget_s=1680.0,
    )
    config.cell = cell
    config.num_units = 64
    if cell != "lstm":
        config.state_size = 64
        config.num_layers = 3
        config.r_min = 0.9
        config.r_max = 0.999
        config.max_phase = 2 * np.pi
        config.recurrent_lr_factor = 0.5
        config.dropout = 0.0
    config.augment_shift = 0
    # With optimizer="adamw": decay neither the recurrence (decaying ν_log towards 0
    # would pull |λ| = exp(-exp(ν_log)) away from 1 and shorten the memory, and so would
    # decaying the RG-LRU's Λ towards 0, σ(0) = 1/2), nor the LayerNorm params and biases.
    config.weight_decay_exclude = r"nu_log|theta_log|gamma_log|lambda|\['norm'\]|\['b'\]"
    config.unroll_method = "scan" if cell == "lstm" else "auto"
    config.permuted = permuted
    config.permutation_seed = 0
    config.pixel_stride = 1
    config.num_test_examples = 0
    if cell == "lstm":
        config.update(dict(num_units=128, batch_size=32, learning_rate=1e-3, optimizer="adam", weight_decay=0.0))
    return config


def check_config(config: ml_collections.ConfigDict) -> None:
    """Raises a one-line `ValueError` naming a field of `config` out of range; `run`
    calls it before it reads data or writes to the workdir. (The LRU checks `r_min`,
    `r_max` and `max_phase` itself, when `build_model` makes it.)"""
    if config.cell not in CELL_TYPES:
        raise ValueError(f"config.cell: unknown cell type {config.cell!r}; choose from {', '.join(CELL_TYPES)}.")
    linear = config.cell != "lstm"
    methods = UNROLL_METHODS["linear" if linear else "lstm"]
    if config.unroll_method not in methods:
        raise ValueError(f"config.unroll_method must be one of {', '.join(map(repr, methods))} for cell "
                         f"{config.cell!r}, got {config.unroll_method!r}.")
    for name in ("num_units", "pixel_stride"):
        check_positive_int(config[name], f"config.{name}")
    common.check_non_negative_int(config, "augment_shift", " (0: no shifts)")
    common.check_non_negative_int(config, "permutation_seed")
    common.check_non_negative_int(config, "num_test_examples", " (0: all)")
    if not linear:
        return
    missing = [name for name in LINEAR_FIELDS if name not in config]
    if missing:
        raise ValueError(f"config.cell={config.cell!r} needs the linear stack's fields, which this config (an "
                         f"LSTM's) lacks: {', '.join(missing)}; run lru_pixel_mnist with --config.cell={config.cell}.")
    check_positive_int(config.num_layers, "config.num_layers")
    if not 0.0 <= config.dropout < 1.0:  # NaN fails too
        raise ValueError(f"config.dropout must be a drop rate in [0, 1), got {config.dropout!r}.")
    common.check_positive_finite(config, "recurrent_lr_factor")


def pixel_order(config: ml_collections.ConfigDict) -> np.ndarray:
    """The flat pixel index read at each step: int32 `[ceil(784 / pixel_stride)]`.

    Raster order, or with `config.permuted` the permutation drawn from
    `np.random.default_rng(config.permutation_seed)`; then every `pixel_stride`-th step.
    """
    if config.pixel_stride < 1:
        raise ValueError(f"config.pixel_stride must be >= 1, got {config.pixel_stride}.")
    order = np.arange(NUM_STEPS)
    if config.permuted:
        order = np.random.default_rng(config.permutation_seed).permutation(NUM_STEPS)
    return order[:: config.pixel_stride].astype(np.int32)


def pixel_sequences(images: Array, order: np.ndarray) -> Array:
    """uint8 `images: [B, 28, 28]` as float sequences `[B, T, 1]` in `[0, 1]`, step `t`
    being pixel `order[t]` of the flattened image."""
    flat = images.reshape(images.shape[0], NUM_STEPS)
    return (jnp.take(flat, jnp.asarray(order), axis=1).astype(jnp.float32) / 255.0)[..., None]


def build_model(config: ml_collections.ConfigDict) -> mnist.Model:
    """The classifier of `config`: `logits(params, images, lengths=None, rng=None) -> [B, 10]`
    for uint8 `images: [B, 28, 28]` (`lengths` is not supported and must be `None`)."""
    if config.cell not in CELL_TYPES:
        raise ValueError(f"config.cell: unknown cell type {config.cell!r}; choose from {', '.join(CELL_TYPES)}.")
    order = pixel_order(config)
    if config.cell == "lstm":
        return _lstm_model(config, order)
    return _linear_stack_model(config, order)


def _lstm_model(config: ml_collections.ConfigDict, order: np.ndarray) -> mnist.Model:
    cell = lstm(config.num_units)

    def init(key: PRNGKey) -> Params:
        cell_key, out_key = jax.random.split(key)
        return {"rnn": cell.init(cell_key, 1), "classifier": dense(out_key, config.num_units, mnist.NUM_CLASSES)}

    def logits(params: Params, images: Array, lengths: None = None, rng: Optional[PRNGKey] = None) -> Array:
        del lengths, rng
        outputs, _ = rnnlab.unroll(cell, params["rnn"], pixel_sequences(images, order), method=_unroll_method(config))
        return apply_dense(params["classifier"], outputs[:, -1])  # outputs: [B, T, H]

    return mnist.Model(init, logits)


def _linear_stack_model(config: ml_collections.ConfigDict, order: np.ndarray) -> mnist.Model:
    blocks = linear_blocks.residual_blocks(
        linear_blocks.make_linear_cell(config), 1, _unroll_method(config),
        dropout_rate=config.dropout, recurrent_lr_factor=config.recurrent_lr_factor,
    )

    def init(key: PRNGKey) -> Params:
        encoder_key, out_key, *block_keys = jax.random.split(key, 2 + config.num_layers)
        return {**blocks.init(encoder_key, block_keys), "classifier": dense(out_key, config.num_units, mnist.NUM_CLASSES)}

    def logits(params: Params, images: Array, lengths: None = None, rng: Optional[PRNGKey] = None) -> Array:
        del lengths
        pixels = jnp.swapaxes(pixel_sequences(images, order), 0, 1)  # time-major [T, B, 1]
        x = blocks.apply({"encoder": params["encoder"], "blocks": params["blocks"]}, pixels, rng)  # [T, B, H]
        return apply_dense(params["classifier"], jnp.mean(x, axis=0))

    return mnist.Model(init, logits)


def make_task(config: ml_collections.ConfigDict) -> tuple[train.Task, mnist.Model]:
    """The training task (batches `{"image": uint8 [B, 28, 28], "label": int32 [B]}`)
    and its model. Metrics per example: cross-entropy `loss`, `accuracy`."""
    model = build_model(config)
    return mnist.classification_task(model, config.augment_shift), model


PERMUTATION_FILE = "permutation.json"


def permutation_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The contents of `permutation.json`: the seed and the pixel order read (see `pixel_order`)."""
    return {
        "permuted": bool(config.permuted),
        "permutation_seed": int(config.permutation_seed),
        "pixel_stride": int(config.pixel_stride),
        "order": pixel_order(config).tolist(),
    }


def _unroll_method(config: ml_collections.ConfigDict) -> str:
    """Resolves "auto": the associative scan, for the linear stack on parallel hardware
    (where it pays off); otherwise `lax.scan`."""
    if config.unroll_method == "auto":
        linear = config.cell != "lstm"
        return "associative" if linear and jax.default_backend() != "cpu" else "scan"
    return config.unroll_method


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    *,
    mode: str = "train",
    resume: bool = False,
    data_dir: Optional[str] = None,
    tfds_data_dir: Optional[str] = None,
    name: str = "pixel_mnist",
) -> dict[str, Any]:
    """Trains ("train") or evaluates the newest checkpoint ("eval"); see `registry.RunFn`.

    "train" writes what `rnnlab.train.train` writes plus `curves.png` and, when
    `config.permuted`, `permutation.json`; "eval" writes `eval_results.json` (`step`,
    `test_loss`, `test_accuracy`).
    "eval" and `resume` build the model and the pixel order from the run's
    `config.json`, taking only `common.EVAL_FIELDS` / `common.RESUME_FIELDS` from `config`.
    """
    common.check_mode(name, mode, ("train", "eval"))
    config = common.config_for_run(config, workdir, mode, resume)
    check_config(config)
    task, _ = make_task(config)
    test = mnist.load_split("test", data_dir, tfds_data_dir)
    if config.num_test_examples:
        test = {key: values[: config.num_test_examples] for key, values in test.items()}
    if mode == "train":
        train_data = mnist.load_split("train", data_dir, tfds_data_dir)
        # permutation.json is written by train.train after its workdir checks: a refused run keeps the old one.
        files = {PERMUTATION_FILE: permutation_record(config)} if config.permuted else None
        result = train.train(task, config, workdir, train_data, {"test": test}, resume=resume,
                             may_change=common.RESUME_FIELDS, files=files)
        if distributed.is_main_process() and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            plots.plot_training_curves(read_metrics(workdir), os.path.join(workdir, "curves.png"))
        return result.results
    return common.evaluate_newest_checkpoint(task, config, workdir, {"test": test})[1]


EXPERIMENTS = {
    "lstm_pixel_mnist": ("LSTM(128) reading MNIST pixel by pixel (784 steps), lax.scan.",
                         functools.partial(get_config, "lstm")),
    "lru_pixel_mnist": ("3 LRU(64, N=64) residual GLU blocks on pixel MNIST, associative scan on GPU.",
                        functools.partial(get_config, "lru")),
    "lru_ppixel_mnist": ("3 LRU(64, N=64) residual GLU blocks on permuted pixel MNIST, associative scan on GPU.",
                         functools.partial(get_config, "lru", permuted=True)),
    "min_gru_ppixel_mnist": ("3 minGRU(64) residual GLU blocks on permuted pixel MNIST, associative scan on GPU.",
                             functools.partial(get_config, "min_gru", permuted=True)),
}

for _name, (_description, _get_config) in EXPERIMENTS.items():
    registry.register(_name, _description, _get_config, functools.partial(run, name=_name))
