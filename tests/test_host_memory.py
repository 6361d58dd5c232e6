"""`rnnlab.host_memory`: a program's temporaries are reused without page faults, and
the bench's flag turns it off.

The allocator is changed for the whole process, so the page-fault cases each run in a
subprocess of their own."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

from rnnlab import host_memory
from rnnlab.bench import __main__ as bench_main

TEMPORARY_BYTES = 30 * 2**20 * 4  # 120 MB: over both of glibc's limits, 32 MB (main heap) and 64 MB (other threads)

# A jitted loop whose stacked outputs (`[30, 2**20]`, read strided) are a temporary of
# the program; prints the page faults of each of five calls after two warm-up calls.
_FAULTS_OF_CALLS = textwrap.dedent(
    """
    import resource, sys
    import jax, jax.numpy as jnp
    from rnnlab import host_memory
    if sys.argv[1] == "reuse":
        assert host_memory.reuse_freed_memory()

    @jax.jit
    def strided_sums(x):  # x: [2**20]
        _, rows = jax.lax.scan(lambda c, _: (c + 1.0, x * c), 0.0, None, length=30)
        return rows[:, ::1024].sum(axis=0)

    x = jnp.ones(2**20)
    for _ in range(2):
        strided_sums(x).block_until_ready()
    for _ in range(5):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        strided_sums(x).block_until_ready()
        print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


GLIBC_ONLY = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's allocator only")


def output_of_python(code: str, *args: str) -> str:
    """The stdout of `code` run by a fresh Python process (asserting that it succeeds)."""
    process = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr
    return process.stdout


def fewest_faults_of_a_call(mode: str) -> int:
    """The fewest page faults of one call: a call may still grow the heap once."""
    return min(int(line) for line in output_of_python(_FAULTS_OF_CALLS, mode).split())


@GLIBC_ONLY
def test_a_programs_temporaries_are_reused_without_page_faults():
    pages = TEMPORARY_BYTES // 4096
    reused, default = fewest_faults_of_a_call("reuse"), fewest_faults_of_a_call("default")
    assert reused < pages // 100, (reused, pages)
    assert default > pages // 2, (default, pages)  # glibc's default: unmapped, and faulted in again at every call


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(host_memory.platform, "libc_ver", lambda: ("", ""))
    assert host_memory.reuse_freed_memory() is False
    assert host_memory.freed_memory_reused() is False


@pytest.mark.parametrize("flag, expected", [([], True), (["--reuse_host_memory=false"], False)])
def test_bench_flag_turns_it_off(flag, expected):
    _, _, reuse_host_memory = bench_main.parse_args(["--shapes=8x5x3x4", *flag])
    assert reuse_host_memory is expected


def test_bench_flag_refuses_other_values(capsys):
    with pytest.raises(SystemExit):
        bench_main.parse_args(["--reuse_host_memory=ture"])
    assert "expected true or false, got 'ture'" in capsys.readouterr().err


@GLIBC_ONLY
def test_a_late_call_warns():
    code = textwrap.dedent(
        """
        import warnings
        import jax.numpy as jnp
        from rnnlab import host_memory
        jnp.ones(3).block_until_ready()  # JAX's backends start here
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            host_memory.reuse_freed_memory()
        print("|".join(str(warning.message) for warning in caught))
        """
    )
    assert "before the first JAX computation" in output_of_python(code)


@GLIBC_ONLY
def test_a_second_call_after_an_early_one_does_not_warn():
    code = textwrap.dedent(
        """
        import warnings
        import jax.numpy as jnp
        from rnnlab import host_memory
        first = host_memory.reuse_freed_memory()
        jnp.ones(3).block_until_ready()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            second = host_memory.reuse_freed_memory()
        print(first, second, len(caught))
        """
    )
    assert output_of_python(code).split() == ["True", "True", "0"]
