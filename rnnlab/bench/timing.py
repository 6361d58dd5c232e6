"""Compiling and timing: `Program` (a ready-to-call target), `compile_jax`, interleaved
timing rounds and summary statistics."""

from __future__ import annotations

import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import numpy as np


class Program(NamedTuple):
    """A target ready to be timed.

    Attributes:
      run: one call; returns once the result is computed (blocks on the device).
      outputs: numpy arrays from the first call, keyed by what they are (`"outputs"`,
        `"final"`, `"loss"`, `"grads"`), for the equality check against a reference.
      compile_s: trace + lower + compile seconds (`None` for eager peers).
      first_call_s: the first call, compile included.
    """

    run: Callable[[], None]
    outputs: dict[str, np.ndarray]
    compile_s: Optional[float]
    first_call_s: float


class Stats(NamedTuple):
    """Summary of timed calls, in milliseconds."""

    median: float
    min: float
    max: float
    q25: float
    q75: float
    count: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> "Stats":
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        q25, median, q75 = np.percentile(ms, [25, 50, 75])
        return cls(float(median), float(ms.min()), float(ms.max()), float(q25), float(q75), len(ms))


def compile_jax(fn: Callable, args: Sequence[Any], donate_argnums: tuple[int, ...] = ()):
    """AOT-compiles `jax.jit(fn)` for `args`; returns `(compiled, seconds)`."""
    start = time.perf_counter()
    compiled = jax.jit(fn, donate_argnums=donate_argnums).lower(*args).compile()
    return compiled, time.perf_counter() - start


def jax_program(
    fn: Callable,
    args: Sequence[Any],
    outputs_of: Callable[[Any], dict[str, Any]],
    carry: int = 0,
) -> Program:
    """A `Program` calling `jax.jit(fn)` on `args`.

    Args:
      fn: the function to compile.
      args: its arguments; the first `carry` of them are donated and replaced by the
        first `carry` results after every call (a train step's params and optimiser
        state), so repeated calls continue training like a real loop.
      outputs_of: picks the arrays to check from the first call's results.
      carry: how many leading arguments are carried from call to call.
    """
    args = list(args)
    compiled, compile_s = compile_jax(fn, args, tuple(range(carry)))
    start = time.perf_counter()
    results = jax.block_until_ready(compiled(*args))
    first_call_s = compile_s + time.perf_counter() - start
    outputs = jax.tree.map(np.asarray, outputs_of(results))
    if carry:
        args[:carry] = results[:carry]

    def run() -> None:
        results = jax.block_until_ready(compiled(*args))
        if carry:
            args[:carry] = results[:carry]

    return Program(run, outputs, compile_s, first_call_s)


def time_interleaved(
    programs: dict[str, Program], rounds: int, calls: int, warmup: int
) -> dict[str, list[float]]:
    """Times every program `rounds * calls` times, in turns.

    After `warmup` untimed calls each, every round times `calls` consecutive calls of
    each program; the order rotates from round to round, so slow periods of a shared
    machine spread over all programs instead of hitting one.

    Returns:
      Seconds per call, per program.
    """
    names = list(programs)
    for name in names:
        for _ in range(warmup):
            programs[name].run()
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % max(len(names), 1)
        for name in names[shift:] + names[:shift]:
            run = programs[name].run
            for _ in range(calls):
                start = time.perf_counter()
                run()
                seconds[name].append(time.perf_counter() - start)
    return seconds
