"""rnnlab's unroll benchmark: compile time and run time of every unroll method, against
peer implementations, on one run of a shared machine timed side by side.

    from rnnlab import bench
    payload = bench.run_benchmark(bench.BenchConfig(cell="lstm", seq_lengths="28,100"),
                                  workdir="bench_results/lstm")

or `python -m rnnlab.bench --cell=lstm --seq_lengths=28,100 --workdir=...`, or
`python launch.py --experiment=bench_unroll`. See docs/benchmarks.md.

`run_benchmark` returns (and writes to `workdir/results.json`) a dict with the keys
`RESULT_KEYS`: `config` (the `BenchConfig` fields), `environment` (versions, backend,
CPU, `XLA_FLAGS`, load average at start and end), `peak_gflops` (median float32
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
from rnnlab.bench.report import text_table, write_outputs
from rnnlab.bench.runner import Result, environment, run_shapes
from rnnlab.bench.timing import Program, Stats

RESULT_KEYS = ("config", "environment", "peak_gflops", "peak_memory_gbps", "results")
RECORD_KEYS = tuple(f.name for f in dataclasses.fields(Result))


def run_benchmark(
    config: BenchConfig, workdir: Optional[str] = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Runs the benchmark, prints the tables, and writes `results.json`, `report.md` and
    the plots into `workdir` (when given). Returns the `results.json` payload."""
    env = environment()
    results = run_shapes(config, log)
    env["load_average_end"] = list(os.getloadavg())
    peaks = [r.gflops for r in results if r.kind == "peak" and r.gflops]
    bandwidths = [r.gbytes_per_s for r in results if r.kind == "peak" and r.gbytes_per_s]
    payload = {
        "config": dataclasses.asdict(config),
        "environment": env,
        "peak_gflops": float(np.median(peaks)) if peaks else None,
        "peak_memory_gbps": float(np.median(bandwidths)) if bandwidths else None,
        "results": [r.to_json() for r in results],
    }
    log("\n" + text_table(results))
    if workdir:
        paths = write_outputs(payload, results, workdir, config.plots)
        log(f"\nwrote {', '.join(sorted(paths.values()))}")
    return payload


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
