"""What the fused scans of the LSTM and the GRU (`lstm_scan`, `gru_scan`) share."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import jax


def like(values: Any, references: Any) -> Any:
    """Each array of `values` cast to the dtype of the matching array of `references`:
    a custom VJP's cotangents must have their primals' dtypes (e.g. bfloat16 inputs
    with float32 params)."""
    return jax.tree.map(lambda value, reference: value.astype(reference.dtype), values, references)


@contextlib.contextmanager
def reverse_mode_only() -> Iterator[None]:
    """Turns JAX's error for forward-mode differentiation of a `jax.custom_vjp` into one
    that says what to do."""
    try:
        yield
    except TypeError as error:
        if "forward-mode" not in str(error):
            raise
        raise TypeError(
            "rnnlab's fused scans (lstm, gru) are differentiated in reverse mode only; for "
            "jax.jvp or jax.jacfwd through rnnlab.unroll pass fused=False."
        ) from error
