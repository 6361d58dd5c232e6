"""`bench_unroll`: times rnnlab's unroll methods (compile and run, forward and train
step) across sequence lengths, against Flax, Haiku and PyTorch LSTMs.

    python launch.py --experiment=bench_unroll --workdir=runs/bench_unroll \
        --config.cell=lstm --config.seq_lengths=28,100,300,1000

The workdir receives `results.json`, `report.md` and the plots (see docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import ml_collections

from experiments import registry
from rnnlab import bench


def get_config() -> ml_collections.ConfigDict:
    """The fields of `rnnlab.bench.BenchConfig`, with its defaults."""
    return ml_collections.ConfigDict(dataclasses.asdict(bench.BenchConfig()))


def run(config: ml_collections.ConfigDict, workdir: str, mode: str = "train", **launch_options: Any) -> dict[str, Any]:
    """Runs the benchmark; `launch.py`'s data and resume options do not apply.

    Returns a summary: the peak GFLOP/s, the paths written, and per shape and mode the
    fastest timed target with its median milliseconds.
    """
    del launch_options
    if mode != "train":
        raise ValueError(f"bench_unroll only runs (mode 'train'), got mode {mode!r}.")
    # Progress and tables on stderr: launch.py's stdout is the results' one JSON document.
    log = lambda line: print(line, file=sys.stderr)
    payload = bench.run_benchmark(bench.BenchConfig.from_dict(config.to_dict()), workdir, log=log)
    fastest: dict[str, dict[str, Any]] = {}
    for record in payload["results"]:
        if record["time_ms"] is None or record["kind"] in ("peak", "floor"):
            continue
        key = f"{bench.Shape(**record['shape'])} {record['mode']}"
        if key not in fastest or record["time_ms"]["median"] < fastest[key]["median_ms"]:
            fastest[key] = {"target": record["target"], "median_ms": round(record["time_ms"]["median"], 2)}
    return {"workdir": workdir, "peak_gflops": payload["peak_gflops"], "fastest": fastest}


registry.register(
    "bench_unroll",
    "Unroll methods (scan, unroll=k, static, associative) and peer LSTMs: compile and run time vs length.",
    get_config,
    run,
    modes=("train",),
    resumable=False,
)
