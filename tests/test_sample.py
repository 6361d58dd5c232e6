"""Tests of rnnlab.sample: determinism, top-k, greedy decoding, temperature, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments import char_lm
from rnnlab import sample
from rnnlab.data.text import Vocabulary

VOCAB = Vocabulary.from_text("abcdefgh \n:")


def bigram_apply(table, carry, ids):
    """A toy LM whose next-token logits are `table[last token]`; carry counts tokens."""
    return table[ids], carry + ids.shape[1]


@pytest.fixture(scope="module")
def bigram_table():
    return jax.random.normal(jax.random.PRNGKey(1), (VOCAB.size, VOCAB.size)) * 3.0


@pytest.fixture(scope="module")
def tiny_lm():
    config = ml_collections.ConfigDict(
        dict(cell="gru", num_layers=2, width=16, embed_dim=8, dropout_keep=1.0, gru_reset_after=True, unroll=1)
    )
    model = char_lm.build_model(config, VOCAB.size)
    return model, jax.jit(model.init)(jax.random.PRNGKey(0))


def greedy_reference(model, params, prompt_ids, num_tokens):
    """Argmax decoding from Python: one `apply` call per token, the argmax on the host."""
    apply = jax.jit(model.apply)
    logits, carry = apply(params, model.init_carry(1), jnp.asarray(prompt_ids)[None])
    tokens = []
    for _ in range(num_tokens):
        token = int(np.argmax(np.asarray(logits[0, -1])))
        tokens.append(token)
        logits, carry = apply(params, carry, jnp.asarray([[token]], jnp.int32))
    return tokens


def test_the_first_token_follows_the_last_prompt_token(bigram_table):
    first, last = VOCAB.encode("ab")
    assert np.argmax(bigram_table[first]) != np.argmax(bigram_table[last])  # the test can tell them apart
    ids = sample.sample_ids(bigram_apply, bigram_table, jnp.zeros((2,), jnp.int32), [first, last],
                            jax.random.PRNGKey(0), 1, temperature=0.0)
    np.testing.assert_array_equal(np.asarray(ids)[:, 0], int(np.argmax(bigram_table[last])))


def test_same_key_same_samples_and_other_key_other_samples(bigram_table):
    carry = jnp.zeros((4,), jnp.int32)
    prompt = VOCAB.encode("ab")
    first = sample.sample_ids(bigram_apply, bigram_table, carry, prompt, jax.random.PRNGKey(3), 40)
    again = sample.sample_ids(bigram_apply, bigram_table, carry, prompt, jax.random.PRNGKey(3), 40)
    other = sample.sample_ids(bigram_apply, bigram_table, carry, prompt, jax.random.PRNGKey(4), 40)
    assert first.shape == (4, 40) and first.dtype == jnp.int32
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    assert len({tuple(row) for row in np.asarray(first)}) > 1  # rows draw independently


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_every_sampled_token_is_among_the_top_k(bigram_table, top_k):
    ids = sample.sample_ids(
        bigram_apply, bigram_table, jnp.zeros((8,), jnp.int32), VOCAB.encode("a"), jax.random.PRNGKey(0), 60,
        temperature=2.0, top_k=top_k,
    )
    table = np.asarray(bigram_table)
    previous = np.concatenate([np.full((8, 1), VOCAB.encode("a")[0]), np.asarray(ids)[:, :-1]], axis=1)
    allowed = np.argsort(-table, axis=1)[:, :top_k]  # [V, k]
    for prev, token in zip(previous.ravel(), np.asarray(ids).ravel()):
        assert token in allowed[prev]
    if top_k > 1:  # at temperature 2 more than the argmax actually gets drawn
        assert not np.array_equal(allowed[previous.ravel(), 0], np.asarray(ids).ravel())


def test_top_1_and_temperature_zero_equal_independent_greedy_decoding(tiny_lm):
    model, params = tiny_lm
    prompt = VOCAB.encode("ab:\n")
    expected = greedy_reference(model, params, prompt, 25)
    carry = model.init_carry(2)
    top_1 = sample.sample_ids(model.apply, params, carry, prompt, jax.random.PRNGKey(5), 25, top_k=1)
    cold = sample.sample_ids(model.apply, params, carry, prompt, jax.random.PRNGKey(6), 25, temperature=0.0)
    for row in list(np.asarray(top_1)) + list(np.asarray(cold)):
        assert row.tolist() == expected


def test_temperature_to_zero_approaches_greedy(tiny_lm):
    model, params = tiny_lm
    prompt = VOCAB.encode("h")
    expected = greedy_reference(model, params, prompt, 25)
    ids = sample.sample_ids(
        model.apply, params, model.init_carry(3), prompt, jax.random.PRNGKey(7), 25, temperature=1e-4
    )
    for row in np.asarray(ids):
        assert row.tolist() == expected


def test_temperature_scales_the_logits():
    logits = jnp.log(jnp.asarray([0.5, 0.3, 0.2]))
    num_draws = 20_000
    draws = sample.next_token(jnp.broadcast_to(logits, (num_draws, 3)), jax.random.PRNGKey(0), 2.0, None)
    expected = np.asarray(jax.nn.softmax(logits / 2.0))
    frequencies = np.bincount(np.asarray(draws), minlength=3) / num_draws
    np.testing.assert_allclose(frequencies, expected, atol=0.015)


def test_the_generated_tokens_come_from_one_scan():
    traces = []

    def counting_apply(table, carry, ids):
        traces.append(ids.shape)
        return bigram_apply(table, carry, ids)

    table = jnp.zeros((VOCAB.size, VOCAB.size))
    jaxpr = jax.make_jaxpr(
        lambda key: sample.sample_ids(counting_apply, table, jnp.zeros((1,), jnp.int32), VOCAB.encode("ab"), key, 100)
    )(jax.random.PRNGKey(0))
    assert traces == [(1, 2), (1, 1)]  # the prompt once, the loop body once: not 100 calls
    assert "scan" in str(jaxpr)


def test_generate_text_returns_decoded_continuations(tiny_lm):
    model, params = tiny_lm
    texts = sample.generate_text(
        model.apply, params, model.init_carry(3), VOCAB, "ab", jax.random.PRNGKey(0), 12, temperature=0.7, top_k=4
    )
    assert len(texts) == 3 and all(len(text) == 12 and set(text) <= set(VOCAB.chars) for text in texts)


def test_prompt_outside_the_vocabulary_raises(tiny_lm):
    model, params = tiny_lm
    with pytest.raises(ValueError, match="outside the vocabulary.*'Z'"):
        sample.generate_text(model.apply, params, model.init_carry(1), VOCAB, "abZ", jax.random.PRNGKey(0), 5)


@pytest.mark.parametrize(
    "prompt, options, message",
    [
        ("", {}, "prompt is empty"),
        ("a", {"temperature": -1.0}, "temperature"),
        ("a", {"temperature": float("nan")}, "temperature must be a finite number"),
        ("a", {"top_k": 0}, "top_k"),
    ],
)
def test_bad_sampling_options_raise(tiny_lm, prompt, options, message):
    model, params = tiny_lm
    with pytest.raises(ValueError, match=message):
        sample.generate_text(model.apply, params, model.init_carry(1), VOCAB, prompt, jax.random.PRNGKey(0), 5, **options)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temperature": -1.0}, "temperature must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"top_k": 0}, "top_k must be a positive integer"),
        ({"top_k": -1}, "top_k must be a positive integer"),
        ({"top_k": True}, "top_k must be a positive integer"),
        ({"num_tokens": -1}, "integer >= 0, got -1"),
    ],
)
def test_sample_ids_checks_its_options_itself(bigram_table, options, message):
    arguments = {"num_tokens": 5, **options}
    num_tokens = arguments.pop("num_tokens")
    with pytest.raises(ValueError, match=message):
        sample.sample_ids(bigram_apply, bigram_table, jnp.zeros((2,), jnp.int32), VOCAB.encode("a"),
                          jax.random.PRNGKey(0), num_tokens, **arguments)


def test_numpy_options_are_accepted_and_a_tiny_temperature_is_greedy(bigram_table):
    carry, prompt = jnp.zeros((3,), jnp.int32), VOCAB.encode("ab")
    run = lambda **options: np.asarray(sample.sample_ids(bigram_apply, bigram_table, carry, prompt,
                                                         jax.random.PRNGKey(5), 30, **options))
    np.testing.assert_array_equal(run(top_k=np.int64(2), temperature=np.float32(0.5)), run(top_k=2, temperature=0.5))
    # logits / 1e-39 overflows unless taken from the row's maximum
    np.testing.assert_array_equal(run(temperature=1e-39), run(temperature=0.0))


def test_every_step_draws_with_its_own_key():
    # Uniform logits: a key shared by all steps would repeat one token along each row.
    uniform = jnp.zeros((VOCAB.size, VOCAB.size))
    tokens = np.asarray(sample.sample_ids(bigram_apply, uniform, jnp.zeros((4,), jnp.int32), VOCAB.encode("a"),
                                          jax.random.PRNGKey(2), 64))
    for row in tokens:
        assert len(set(row.tolist())) > VOCAB.size // 2


def test_top_k_keeps_every_token_tied_at_the_kth_value():
    logits = jnp.log(jnp.asarray([2.0, 2.0, 2.0, 1.0]))  # three tied maxima, k = 1
    draws = sample.next_token(jnp.broadcast_to(logits, (3000, 4)), jax.random.PRNGKey(0), 1.0, 1)
    counts = np.bincount(np.asarray(draws), minlength=4)
    assert counts[3] == 0 and np.all(counts[:3] > 800)
