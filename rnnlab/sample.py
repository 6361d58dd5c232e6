"""Text generation from a recurrent language model: warm the state on a prompt, then
draw characters one at a time with temperature and top-k, all under one `jit` with
`jax.lax.scan` over the generated characters.

The model is any `apply_fn(params, carry, ids) -> (logits, carry)` with `ids: [B, T]`
int32, `logits: [B, T, V]` and a batched recurrent `carry`, e.g. the char LM of
`experiments.char_lm`:

    ids = sample_ids(model.apply, params, carry, prompt_ids, key, 200, temperature=0.8, top_k=20)
    texts = generate_text(model.apply, params, carry, vocab, "ROMEO:", key, 200)
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Optional, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rnnlab.cells.base import is_real_number

Array = jax.Array
Carry = Any  # a pytree of arrays with a leading batch axis [B]
ApplyFn = Callable[[Any, Carry, Array], tuple[Array, Carry]]


class TextCodec(Protocol):
    """What sampling needs from a vocabulary (e.g. `rnnlab.data.text.Vocabulary`)."""

    def encode(self, text: str) -> Sequence[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


def next_token(logits: Array, key: jax.Array, temperature: float, top_k: Optional[int]) -> Array:
    """Draws one token per row from `softmax(logits / temperature)` restricted to the top k.

    Args:
      logits: `[B, V]`.
      key: PRNG key.
      temperature: `> 0` scales the logits; `0` is greedy (argmax, `key` unused).
      top_k: keep only the `k` most likely tokens (ties at the k-th value are kept);
        `None` keeps all.

    Returns:
      `[B]` int32 token ids.
    """
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    # From the row's maximum, so that a tiny temperature cannot overflow to inf - inf.
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def check_options(temperature: float, top_k: Optional[int], num_tokens: int) -> tuple[float, Optional[int], int]:
    """`(temperature, top_k, num_tokens)` as Python numbers, or a one-line `ValueError`:
    a finite `temperature >= 0`, `top_k` `None` or an integer `>= 1`, `num_tokens >= 0`
    (NumPy numbers accepted; booleans are not numbers here)."""
    if not is_real_number(temperature) or not (
        math.isfinite(temperature) and temperature >= 0
    ):
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}.")
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, numbers.Integral) or num_tokens < 0:
        raise ValueError(f"the number of tokens to generate must be an integer >= 0, got {num_tokens!r}.")
    return float(temperature), None if top_k is None else int(top_k), int(num_tokens)


@functools.partial(jax.jit, static_argnames=("apply_fn", "num_tokens", "temperature", "top_k"))
def sample_ids(
    apply_fn: ApplyFn,
    params: Any,
    carry: Carry,
    prompt_ids: Array,
    key: jax.Array,
    num_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
) -> Array:
    """Continues `prompt_ids` by `num_tokens` sampled tokens in every row of the batch.

    The prompt is read in one `apply_fn` call (which warms the state); each new token is
    then fed back, one `apply_fn` call per token inside `jax.lax.scan`, all under one
    `jit`. The result depends only on the inputs and `key` (deterministic for a given
    key); every step draws with its own key.

    Args:
      apply_fn: the model (static: a hashable function).
      params: the model's params.
      carry: the initial recurrent state for `B` rows.
      prompt_ids: `[P]` (shared by all rows) or `[B, P]` int token ids, `P >= 1`.
      key: PRNG key.
      num_tokens: `N >= 0`, how many tokens to generate.
      temperature: see `next_token`; a finite number `>= 0`, 0 is greedy decoding.
      top_k: see `next_token`; `None` or an integer `>= 1`.

    Returns:
      `[B, N]` int32, the generated tokens (the prompt not included).

    Raises:
      ValueError: for an empty prompt or options out of range (`check_options`).
    """
    temperature, top_k, num_tokens = check_options(temperature, top_k, num_tokens)  # static: checked when traced
    batch_size = jax.tree.leaves(carry)[0].shape[0]
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim == 1:
        prompt_ids = jnp.broadcast_to(prompt_ids, (batch_size, prompt_ids.shape[0]))
    if prompt_ids.shape[1] == 0:
        raise ValueError("sampling needs a non-empty prompt to condition the first token on.")
    logits, carry = apply_fn(params, carry, prompt_ids)

    def body(state, step_key):
        carry, last_logits = state
        token = next_token(last_logits, step_key, temperature, top_k)  # [B]
        logits, carry = apply_fn(params, carry, token[:, None])
        return (carry, logits[:, -1]), token

    _, tokens = jax.lax.scan(body, (carry, logits[:, -1]), jax.random.split(key, num_tokens))
    return tokens.T


def generate_text(
    apply_fn: ApplyFn,
    params: Any,
    carry: Carry,
    vocab: TextCodec,
    prompt: str,
    key: jax.Array,
    num_chars: int,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
) -> list[str]:
    """`sample_ids` on text: one continuation of `prompt` per row of `carry`.

    Raises:
      ValueError: for an empty prompt, or (from `vocab.encode`) a prompt with characters
        outside the vocabulary.
    """
    if not prompt:
        raise ValueError("the prompt is empty: give at least one character to start from.")
    check_options(temperature, top_k, num_chars)  # before encoding: the cheaper errors first
    prompt_ids = np.asarray(vocab.encode(prompt), np.int32)
    ids = sample_ids(apply_fn, params, carry, prompt_ids, key, num_chars, temperature=temperature, top_k=top_k)
    return [vocab.decode(row.tolist()) for row in np.asarray(ids)]
