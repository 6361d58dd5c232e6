"""Reusing freed host memory, so that XLA:CPU's temporaries cost no page faults.

Every call of a program compiled by XLA:CPU allocates its temporaries as one block
(25 MB for the train step of a one-layer LSTM at B=128, T=28, H=128; 88 MB at B=64,
T=100, H=256) and frees it when the call ends. By default glibc's `malloc` gives a
block over 32 MB back to the operating system when it is freed, so the next call
faults every page of it in again: 21,500 page faults per train step at the second
shape, 12-15% of its time on a 2-core CPU (docs/benchmarks.md, "Host memory").
PyTorch's CPU tensors come from the same allocator and pay the same.

    import rnnlab
    rnnlab.host_memory.reuse_freed_memory()   # first, before any JAX computation

`launch.py` and `python -m rnnlab.bench` call it unless told `--reuse_host_memory=false`.
"""

from __future__ import annotations

import ctypes
import platform
import warnings

import jax

# `mallopt` parameters, from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

_MALLOPT_SETTINGS = (
    (_M_MMAP_MAX, 0),  # no block gets a mapping of its own, which `free` would unmap
    (_M_TRIM_THRESHOLD, 2**31 - 1),  # the free top of the heap is never given back
)

_reused = False


def reuse_freed_memory() -> bool:
    """Makes this process keep the host memory it frees, and reuse it.

    Two settings, both for the whole process and for good:
    * glibc's `malloc` serves every block from its heaps and gives no freed memory back
      to the operating system, so the resident memory stays at its peak;
    * JAX runs CPU computations on the thread that calls them
      (`jax_cpu_enable_async_dispatch=False`), so their temporaries come from the main
      heap: the heap of any other thread is limited to 64 MB, and glibc maps a larger
      block anew on every call whatever its settings. The calling thread then waits for
      each result, which left training as fast (docs/benchmarks.md).

    Call it before the first JAX computation: JAX reads its setting when it starts the
    CPU backend (a warning says so if it has already started).

    Returns:
      True if glibc now keeps freed memory; False where the C library is not glibc
      (macOS, Windows, musl): that process is left as it is.
    """
    global _reused
    if _reused:  # applied before: calling again changes nothing
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if not all(mallopt(parameter, value) == 1 for parameter, value in _MALLOPT_SETTINGS):
        return False
    if _backends_started():
        warnings.warn(
            "rnnlab.host_memory.reuse_freed_memory() was called after JAX started its backends: CPU "
            "computations keep being dispatched to worker threads, whose temporaries over 64 MB are "
            "still mapped anew on every call. Call it before the first JAX computation.",
            stacklevel=2,
        )
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    _reused = True
    return True


def _backends_started() -> bool:
    """Whether JAX has started its backends (False where this JAX cannot tell)."""
    from jax._src import xla_bridge  # no public API says it

    return getattr(xla_bridge, "backends_are_initialized", lambda: False)()


def freed_memory_reused() -> bool:
    """Whether `reuse_freed_memory` has been applied in this process."""
    return _reused
