"""Tests of the char_lm experiment: truncated-BPTT plumbing, exact evaluation, and
train / resume / eval / sample end to end on a tiny corpus."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import char_lm
from rnnlab import train
from rnnlab.checkpoint import CheckpointError
from rnnlab.data.text import Vocabulary
from data_fixtures import shakespeare_like_text, write_text_corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    config = char_lm.get_config()
    config.update(
        dict(cell="lstm", num_layers=2, width=16, embed_dim=8, batch_size=4, eval_batch_size=2, bptt_steps=16,
             num_steps=6, warmup_steps=2, log_every_steps=2, eval_every_steps=0, checkpoint_every_steps=3,
             time_budget_s=0.0, progress_bar=False)
    )
    config.sample.update(num_chars=40, num_samples=2, prompt="MENENIUS:\n")
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def corpus():
    text = shakespeare_like_text(3000)
    return text, Vocabulary.from_text(text)


def model_and_params(corpus, **overrides):
    _, vocab = corpus
    model = char_lm.build_model(tiny_config(**overrides), vocab.size)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0))


def test_train_rows_put_window_w_of_stream_s_at_row_w_times_b_plus_s():
    ids = np.arange(203, dtype=np.int32)
    rows = char_lm.train_rows(ids, batch_size=4, bptt_steps=10)  # streams of 50: 4 windows
    assert rows["inputs"].shape == (16, 10)
    for window in range(4):
        for stream in range(4):
            start = stream * 50 + window * 10
            np.testing.assert_array_equal(rows["inputs"][window * 4 + stream], ids[start : start + 10])
            np.testing.assert_array_equal(rows["targets"][window * 4 + stream], ids[start + 1 : start + 11])
    np.testing.assert_allclose(rows["weights"], 0.1)


def test_two_windows_with_carried_state_equal_one_window_of_double_length(corpus):
    text, vocab = corpus
    model, params = model_and_params(corpus, cell="gru")
    task = char_lm.make_task(model)
    loss = jax.jit(task.loss)
    ids = vocab.encode(text)
    short = char_lm.train_rows(ids, batch_size=3, bptt_steps=20)
    long = char_lm.train_rows(ids, batch_size=3, bptt_steps=40)
    window = lambda rows, w: {k: v[w * 3 : (w + 1) * 3] for k, v in rows.items()}
    np.testing.assert_array_equal(
        np.concatenate([window(short, 0)["inputs"], window(short, 1)["inputs"]], axis=1), window(long, 0)["inputs"]
    )

    loss_0, (carry, metrics_0) = loss(params, model.init_carry(3), window(short, 0), None)
    loss_1, (carry_short, metrics_1) = loss(params, carry, window(short, 1), None)
    loss_long, (carry_long, metrics_long) = loss(params, model.init_carry(3), window(long, 0), None)

    np.testing.assert_allclose((loss_0 + loss_1) / 2, loss_long, rtol=1e-5)
    np.testing.assert_allclose((metrics_0["loss"] + metrics_1["loss"]) / 2, metrics_long["loss"], rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), carry_short, carry_long)
    # Without the carry, the second window starts cold and its loss differs.
    loss_cold, _ = loss(params, model.init_carry(3), window(short, 1), None)
    assert abs(float(loss_cold) - float(loss_1)) > 1e-4


def test_evaluation_is_the_exact_mean_over_every_character(corpus):
    text, vocab = corpus
    num_streams = 3
    model, params = model_and_params(corpus, cell="ln_lstm", num_layers=1)
    ids = vocab.encode(text[:997])  # 996 predictions: not a multiple of streams x window
    rows = char_lm.eval_rows(ids, batch_size=num_streams, bptt_steps=16)
    values = train.evaluate(char_lm.make_task(model), params, rows, batch_size=num_streams)

    # Independently: each stream read as one sequence from a zero state.
    pairs = len(ids) - 1
    stream_len = -(-pairs // (num_streams * 16)) * 16
    total, apply = 0.0, jax.jit(model.apply)
    for stream in range(num_streams):
        lo, hi = stream * stream_len, min((stream + 1) * stream_len, pairs)
        logits, _ = apply(params, model.init_carry(1), jnp.asarray(ids[lo:hi])[None])
        log_probs = jax.nn.log_softmax(logits[0])
        total -= float(jnp.sum(log_probs[jnp.arange(hi - lo), ids[lo + 1 : hi + 1]]))
    np.testing.assert_allclose(values["loss"], total / pairs, rtol=1e-5)
    np.testing.assert_allclose(values["bits_per_char"], values["loss"] / math.log(2), rtol=1e-6)


@pytest.mark.parametrize("cell", ["rnn", "gru", "ln_lstm"])  # "lstm": end to end below
def test_every_cell_type_gives_finite_loss_and_gradients_with_dropout(corpus, cell):
    text, vocab = corpus
    model, params = model_and_params(corpus, cell=cell, num_layers=1, dropout_keep=0.8, gru_reset_after=False)
    rows = char_lm.train_rows(vocab.encode(text), batch_size=2, bptt_steps=8)
    batch = {k: v[:2] for k, v in rows.items()}
    grad_fn = jax.jit(jax.grad(char_lm.make_task(model).loss, has_aux=True))
    grads, (carry, metrics) = grad_fn(params, model.init_carry(2), batch, jax.random.PRNGKey(1))
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert metrics["loss"].shape == (2,)
    assert jax.tree.structure(carry) == jax.tree.structure(model.init_carry(2))


def test_training_with_dropout_starts_each_window_from_the_carried_state(corpus):
    """With dropout on (an rng given), as without: another carry gives other logits,
    the same carry and key the same ones."""
    _, vocab = corpus
    model, params = model_and_params(corpus, cell="gru", dropout_keep=0.8)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, vocab.size, (3, 5)), jnp.int32)
    rng = jax.random.PRNGKey(1)
    zero = model.init_carry(3)
    other = jax.tree.map(lambda leaf: leaf + 0.5, zero)
    from_zero, _ = model.apply(params, zero, ids, rng)
    from_other, _ = model.apply(params, other, ids, rng)
    np.testing.assert_array_equal(model.apply(params, other, ids, rng)[0], from_other)
    assert np.abs(np.asarray(from_zero) - np.asarray(from_other)).max() > 1e-3


def test_unknown_cell_type_raises():
    with pytest.raises(ValueError, match="unknown cell type 'transformer'"):
        char_lm.make_cell("transformer", 8)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    write_text_corpus(data_dir, num_chars=5000)
    workdir = str(tmp_path_factory.mktemp("run"))
    results = char_lm.run(tiny_config(num_layers=1, dropout_keep=0.9), workdir, data_dir=str(data_dir))
    return str(data_dir), workdir, results


def test_training_writes_results_samples_and_vocabulary(trained_run):
    _, workdir, results = trained_run
    with open(os.path.join(workdir, "results.json")) as f:
        written = json.load(f)
    assert written["steps"] == 6 and written["stop_reason"] == "done"
    for split in ("val", "test"):
        assert math.isfinite(written[f"{split}_loss"])
        np.testing.assert_allclose(written[f"{split}_bits_per_char"], written[f"{split}_loss"] / math.log(2), rtol=1e-6)
    with open(os.path.join(workdir, "samples.txt"), encoding="utf-8") as f:
        samples = f.read()
    assert samples.count("MENENIUS:\n") == 2
    assert os.path.exists(os.path.join(workdir, "curves.png"))
    with open(os.path.join(workdir, "vocab.json"), encoding="utf-8") as f:
        assert "\n" in json.load(f)


def test_resume_continues_to_more_steps(trained_run):
    """As in the README: resuming needs no model fields; they come from config.json."""
    data_dir, workdir, _ = trained_run
    config = char_lm.get_config()
    config.update(num_steps=8, time_budget_s=0.0, progress_bar=False)
    config.sample.update(tiny_config().sample)  # sample.* comes from the given config (the tiny corpus has no 'R')
    results = char_lm.run(config, workdir, data_dir=data_dir, resume=True)
    assert results["steps"] == 8


def test_a_refused_rerun_leaves_the_vocabulary_alone(trained_run, tmp_path):
    """Training again into a workdir with checkpoints is refused before anything is
    written: vocab.json still fits the checkpoints (here the new corpus has a '~')."""
    _, workdir, _ = trained_run
    other = tmp_path / "tiny_shakespeare" / "input.txt"
    other.parent.mkdir(parents=True)
    other.write_text("~" + shakespeare_like_text(5000), encoding="utf-8")
    before = (Path(workdir) / "vocab.json").read_bytes()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        char_lm.run(tiny_config(num_layers=1, dropout_keep=0.9), workdir, data_dir=str(tmp_path))
    assert (Path(workdir) / "vocab.json").read_bytes() == before


def test_eval_mode_uses_the_trained_config(trained_run):
    data_dir, workdir, _ = trained_run
    # A different width on the command line must not break restoring the trained model.
    results = char_lm.run(tiny_config(width=99), workdir, mode="eval", data_dir=data_dir)
    assert set(results) >= {"step", "val_loss", "test_loss", "val_bits_per_char", "test_bits_per_char"}


def test_sample_mode_from_the_command_line(trained_run):
    _, workdir, _ = trained_run
    command = [sys.executable, "launch.py", "--experiment=char_lm", "--mode=sample", f"--workdir={workdir}",
               "--config.sample.prompt=All:", "--config.sample.num_chars=30", "--config.sample.num_samples=1",
               "--config.sample.top_k=3"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["samples"][0].startswith("All:"), "stdout is one JSON document"
    assert "All:" in done.stderr
    with open(os.path.join(workdir, "samples.txt"), encoding="utf-8") as f:
        assert "top_k 3 ===\nAll:" in f.read()


def test_sample_mode_rejects_a_prompt_outside_the_vocabulary(trained_run):
    _, workdir, _ = trained_run
    config = tiny_config()
    config.sample.prompt = "All~"
    with pytest.raises(ValueError, match="outside the vocabulary.*'~'"):
        char_lm.run(config, workdir, mode="sample")


@pytest.mark.parametrize("field, value, message", [("prompt", "All~", "outside the vocabulary.*'~'"),
                                                   ("temperature", -0.5, "temperature must be a finite number >= 0"),
                                                   ("temperature", float("inf"), "temperature must be a finite"),
                                                   ("top_k", -1, "top_k must be an integer")])
def test_bad_sample_options_fail_before_training(trained_run, tmp_path, field, value, message):
    data_dir, _, _ = trained_run
    config = tiny_config()
    config.sample[field] = value
    with pytest.raises(ValueError, match=message):
        char_lm.run(config, str(tmp_path / "run"), data_dir=data_dir)
    assert not (tmp_path / "run").exists(), "nothing trained or written"


@pytest.mark.parametrize("field, value, message", [
    ("dropout_keep", 1.5, r"must be a keep probability in \(0, 1\] \(1.0: no dropout\), got 1.5\.$"),
    ("dropout_keep", 0.0, r"must be a keep probability in \(0, 1\]"),
    ("unroll", 0, "must be a positive integer, got 0"),
    ("bptt_steps", 0, "must be a positive integer, got 0"),
    ("embed_dim", 0, "must be a positive integer, got 0"),
    ("num_layers", 0, "must be a positive integer, got 0"),
    ("cell", "transformer", ": unknown cell type 'transformer'"),
    ("shuffle", True, "must be False"),
])
def test_bad_model_fields_fail_before_data_or_workdir(field, value, message, tmp_path, monkeypatch):
    def load_corpus(*args, **kwargs):
        raise AssertionError("data was loaded before the config was checked")
    monkeypatch.setattr(char_lm, "load_corpus", load_corpus)
    with pytest.raises(ValueError, match=rf"^config\.{field} ?{message}"):
        char_lm.run(tiny_config(**{field: value}), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()
