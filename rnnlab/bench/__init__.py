"""rnnlab's unroll benchmark: compile time and run time of every unroll method, against
peer implementations, on one run of a shared machine timed side by side.

    from rnnlab import bench
    payload = bench.run_benchmark(bench.BenchConfig(cell="lstm", seq_lengths="28,100"),
                                  workdir="bench_results/lstm")

or `python -m rnnlab.bench --cell=lstm --seq_lengths=28,100 --workdir=...`, or
`python launch.py --experiment=bench_unroll`. See docs/benchmarks.md.

`run_benchmark` returns (and writes to `workdir/results.json`) a dict with the keys
`RESULT_KEYS`: `complete` (`False` in the file written after each shape but the last,
so that an interrupted run keeps the shapes it finished), `config` (the `BenchConfig`
fields), `environment` (versions, backend, CPU, `XLA_FLAGS`, load average at start and
end), `peak_gflops` (median float32
matmul GFLOP/s over the shapes), `peak_memory_gbps` (median GB/s of the `a*x+y`
bandwidth reference, or `None` when not timed), and `results`: one record per (shape, target, mode)
with the keys `RECORD_KEYS` (see `Result`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import numpy as np

from rnnlab.bench.config import MODES, PEERS, BenchConfig, MethodSpec, Shape, Workload
from rnnlab.bench.report import summary, text_table, write_outputs
from rnnlab.bench.runner import Result, environment, run_shapes
from rnnlab.bench.timing import Program, Stats

RESULT_KEYS = ("complete", "config", "environment", "peak_gflops", "peak_memory_gbps", "results")
RECORD_KEYS = tuple(f.name for f in dataclasses.fields(Result))


def run_benchmark(
    config: BenchConfig, workdir: Optional[str] = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs the benchmark, prints each shape's tables as it finishes, and writes
    `results.json` and `report.md` into `workdir` (when given) after every shape, the
    plots at the end. Returns the `results.json` payload."""
    env = environment()
    num_shapes = len(config.shape_list)
    done_shapes = []

    def after_shape(shape_results: list[Result], results: list[Result]) -> None:
        done_shapes.append(shape_results)
        log("\n" + text_table(shape_results))
        if workdir and len(done_shapes) < num_shapes:
            write_outputs(_payload(config, env, results, complete=False), results, workdir, plots=False)

    results = run_shapes(config, log, after_shape)
    payload = _payload(config, env, results, complete=True)
    if num_shapes > 1:
        log("\n" + "\n".join(summary(results)))
    if workdir:
        paths = write_outputs(payload, results, workdir, config.plots)
        log(f"\nwrote {', '.join(sorted(paths.values()))}")
    return payload


def _payload(config: BenchConfig, env: dict[str, Any], results: list[Result], complete: bool) -> dict[str, Any]:
    """The `results.json` payload of `results` (see the module docstring)."""
    peaks = [r.gflops for r in results if r.kind == "peak" and r.gflops]
    bandwidths = [r.gbytes_per_s for r in results if r.kind == "peak" and r.gbytes_per_s]
    return {
        "complete": complete,
        "config": dataclasses.asdict(config),
        "environment": dict(env, load_average_end=list(os.getloadavg())),
        "peak_gflops": float(np.median(peaks)) if peaks else None,
        "peak_memory_gbps": float(np.median(bandwidths)) if bandwidths else None,
        "results": [r.to_json() for r in results],
    }


__all__ = [
    "MODES",
    "PEERS",
    "RECORD_KEYS",
    "RESULT_KEYS",
    "BenchConfig",
    "MethodSpec",
    "Program",
    "Result",
    "Shape",
    "Stats",
    "Workload",
    "run_benchmark",
]
