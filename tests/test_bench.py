"""The unroll benchmark in tiny configurations: keys of results.json, the output check
before timing, skipped peers and methods, the experiment entry point."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys

import numpy as np
import pytest

from rnnlab import bench
from rnnlab.bench import report, runner, workloads
from rnnlab.bench.config import BenchConfig, MethodSpec, Shape, Workload

TINY = dict(
    batch_size=2,
    input_size=3,
    num_units=4,
    seq_lengths="3",
    rounds=1,
    calls=1,
    warmup=0,
    peak_matmul_size=8,
    peak_bandwidth_mib=1,
    plots=False,
)


def tiny(**overrides) -> BenchConfig:
    return BenchConfig(**{**TINY, **overrides})


def quiet(_: str) -> None:
    pass


def records(payload, **match):
    return [r for r in payload["results"] if all(r[k] == v for k, v in match.items())]


@pytest.fixture(scope="module")
def forward_run(tmp_path_factory):
    """One small forward-only run shared by several tests: two lengths, every method
    kind, a Flax peer, and Haiku made unimportable."""
    workdir = tmp_path_factory.mktemp("bench")
    config = tiny(seq_lengths="2,3", methods="scan,scan:unroll=2,static,associative",
                  peers="flax_lstm,haiku_lstm", modes="forward", static_compile_budget_s=1e-6, plots=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "haiku", None)  # `import haiku` now raises ImportError
        payload = bench.run_benchmark(config, str(workdir), log=quiet)
    return payload, workdir


def test_results_have_the_documented_keys(forward_run):
    payload, workdir = forward_run
    assert set(payload) == set(bench.RESULT_KEYS)
    on_disk = json.loads((workdir / "results.json").read_text())
    assert set(on_disk) == set(bench.RESULT_KEYS)
    assert len(on_disk["results"]) == len(payload["results"]) == 2 * 9  # 7 targets, the bandwidth reference, the matmul floor
    for record in on_disk["results"]:
        assert set(record) == set(bench.RECORD_KEYS)
    for name in ("report.md", "time_forward.png", "compile.png"):
        assert (workdir / name).stat().st_size > 0
    assert payload["peak_gflops"] > 0
    assert payload["peak_memory_gbps"] > 0


def test_an_interrupted_run_keeps_the_shapes_it_finished(tmp_path):
    class Interrupted(Exception):
        pass

    def log(line: str) -> None:
        if line.startswith("shape") and "T=3" in line:
            raise Interrupted  # as a time limit would stop the run before the second shape

    config = tiny(seq_lengths="2,3", methods="scan", peers="", modes="forward", peak_bandwidth_mib=0)
    with pytest.raises(Interrupted):
        bench.run_benchmark(config, str(tmp_path), log=log)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["complete"] is False
    assert {r["shape"]["seq_len"] for r in on_disk["results"]} == {2}
    report = (tmp_path / "report.md").read_text()
    assert "lstm/scan" in report and "Incomplete" in report


def test_every_method_and_peer_is_checked_before_timing(forward_run):
    payload, _ = forward_run
    for reference in records(payload, target="lstm/scan"):
        assert reference["note"] == "reference" and reference["status"] == "ok"
    checked = records(payload, target="lstm/scan:unroll=2") + records(payload, target="peer/flax_lstm")
    checked.append(records(payload, target="lstm/static")[0])
    assert len(checked) == 5
    for record in checked:
        assert record["status"] == "ok", record
        assert record["check"]["passed"] and record["check"]["reference"] == "lstm/scan"
        assert "outputs" in record["check"]["compared"]
        assert record["time_ms"]["count"] == 1 and record["first_call_s"] > 0
        assert record["gflops"] > 0 and record["speedup_vs_best_peer"] > 0


def test_missing_peer_and_inapplicable_methods_are_skipped(forward_run):
    payload, _ = forward_run
    for haiku in records(payload, target="peer/haiku_lstm"):
        assert haiku["status"] == "skipped" and "not installed" in haiku["note"]
        assert haiku["time_ms"] is None
    for associative in records(payload, target="lstm/associative"):
        assert associative["status"] == "skipped" and "not a linear recurrence" in associative["note"]
    short, long = sorted(records(payload, target="lstm/static"), key=lambda r: r["shape"]["seq_len"])
    assert short["status"] == "ok"
    assert long["status"] == "skipped" and "predicted compile" in long["note"]


def test_the_keras_peer_matches_rnnlab_and_refuses_keras_on_another_backend(monkeypatch):
    if importlib.util.find_spec("keras") is None:  # importing it here would fix its backend
        pytest.skip("Keras is not installed")
    config = tiny(methods="scan", peers="keras_lstm", modes="forward,train", matmul_floor=False)
    for record in records(bench.run_benchmark(config, log=quiet), target="peer/keras_lstm"):
        assert record["status"] == "ok" and record["check"]["passed"], record
        assert record["check"]["compared"] == (["outputs"] if record["mode"] == "forward" else ["loss"])
    import keras

    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    (refused,) = records(bench.run_benchmark(dataclasses.replace(config, modes="forward"), log=quiet),
                         target="peer/keras_lstm")
    assert refused["status"] == "error" and "needs KERAS_BACKEND=jax" in refused["note"]


def test_a_long_first_static_length_is_predicted_from_a_probe_compile():
    # No shorter length precedes T=40, so a 16-step compile predicts it.
    config = tiny(seq_lengths="40", methods="scan,static", peers="", modes="forward",
                  static_compile_budget_s=1e-6, peak_bandwidth_mib=0, matmul_floor=False)
    lines = []
    payload = bench.run_benchmark(config, log=lines.append)
    (static,) = records(payload, target="lstm/static")
    assert static["status"] == "skipped", static
    assert f"measured in a probe T={runner.STATIC_PROBE_LEN}:" in static["note"]
    assert any("probing lstm/static" in line for line in lines)


def test_train_step_checks_loss_and_grads():
    payload = bench.run_benchmark(tiny(methods="scan,scan:hoist=0", peers="", modes="train"), log=quiet)
    (record,) = records(payload, target="lstm/scan:hoist=0")
    assert record["status"] == "ok"
    assert record["check"]["compared"] == ["grads", "loss"] and record["check"]["passed"]
    # B=2, T=3, I=3, H=4: W_x's forward and weight-gradient matmuls (x needs no
    # gradient), W_h's forward, weight-gradient and input-gradient matmuls
    assert record["flops"] == pytest.approx(2 * 2 * 3 * (2 * 3 + 3 * 4) * 4 * 4)


def test_the_lstm_matmul_floor_is_timed_in_each_mode_unless_turned_off():
    payload = bench.run_benchmark(tiny(methods="scan", peers="flax_lstm", modes="forward,train"), log=quiet)
    floors = {r["mode"]: r for r in records(payload, target="floor/lstm_matmuls")}
    assert set(floors) == {"forward", "train"}
    b, t, i, h = 2, 3, 3, 4  # the TINY shape
    projection, recurrent = 2 * b * t * i * 4 * h, 2 * b * t * h * 4 * h
    assert floors["forward"]["flops"] == pytest.approx(projection + recurrent)
    # backward: the recurrent chain again, then the gradients of W_x and W_h; no input gradient
    assert floors["train"]["flops"] == pytest.approx(2 * projection + 3 * recurrent)
    for floor in floors.values():
        assert floor["kind"] == "floor" and floor["status"] == "ok"
        assert floor["time_ms"]["median"] > 0 and floor["gflops"] > 0 and floor["speedup_vs_best_peer"] > 0
    results = [runner.Result(**dict(r, shape=Shape(**r["shape"]), time_ms=bench.Stats(**r["time_ms"])))
               for r in payload["results"] if r["time_ms"]]
    lines = report.summary(results)
    assert len(lines) == 2 and all("the LSTM's matmuls alone" in line for line in lines)
    payload = bench.run_benchmark(tiny(methods="scan", peers="", modes="train", matmul_floor=False), log=quiet)
    assert not records(payload, target="floor/lstm_matmuls")


def test_associative_methods_of_a_linear_cell_are_checked_and_timed():
    config = tiny(cell="min_gru", seq_lengths="5", methods="scan,associative,associative:block_size=1",
                  peers="", modes="train")
    payload = bench.run_benchmark(config, log=quiet)
    for target in ("min_gru/associative", "min_gru/associative:block_size=1"):
        (record,) = records(payload, target=target)
        assert record["status"] == "ok" and record["time_ms"]["median"] > 0
        assert record["check"]["compared"] == ["grads", "loss"] and record["check"]["passed"]


def test_rg_lru_and_indrnn_run_in_the_benchmark():
    """rg_lru's associative unroll is checked against its scan and timed; indrnn (an
    extra workload) runs the first method."""
    config = tiny(cell="rg_lru", extra="indrnn", methods="scan,associative", peers="", modes="forward")
    payload = bench.run_benchmark(config, log=quiet)
    for target in ("rg_lru/associative", "indrnn/scan"):
        (record,) = records(payload, target=target)
        assert record["status"] == "ok" and record["time_ms"]["median"] > 0
    (record,) = records(payload, target="rg_lru/associative")
    assert record["check"]["compared"] == ["final", "outputs"] and record["check"]["passed"]


def test_outputs_are_checked_before_timing(monkeypatch):
    build = workloads.build_program

    def wrong_for_unroll_2(cell, workload, method, mode, params, data):
        program = build(cell, workload, method, mode, params, data)
        if method.kwargs.get("unroll") == 2:
            outputs = dict(program.outputs, outputs=program.outputs["outputs"] + 1.0)
            return program._replace(outputs=outputs, run=lambda: pytest.fail("a mismatching method was timed"))
        return program

    monkeypatch.setattr(workloads, "build_program", wrong_for_unroll_2)
    payload = bench.run_benchmark(tiny(methods="scan,scan:unroll=2", peers="", modes="forward"), log=quiet)
    (record,) = records(payload, target="lstm/scan:unroll=2")
    assert record["status"] == "mismatch" and record["time_ms"] is None
    assert not record["check"]["passed"] and record["check"]["max_abs_diff"] == pytest.approx(1.0)


def test_unavailable_cell_and_variants_do_not_crash(monkeypatch):
    # A name the bench knows whose factory this rnnlab lacks is skipped; an unknown
    # name (a typo) is refused before anything runs.
    monkeypatch.setitem(workloads.CELLS, "future_cell", ("no_such_factory", {}))
    config = tiny(cell="gru+lengths", methods="scan", extra="future_cell,lstm+bidirectional,lstmp",
                  peers="flax_lstm", modes="forward")
    with pytest.raises(ValueError, match="unknown cell"):
        workloads.make_cell("no_such_cell", 4)
    with pytest.raises(ValueError, match="unknown cell 'lsmt'"):
        tiny(extra="lsmt")
    payload = bench.run_benchmark(config, log=quiet)
    (skipped,) = records(payload, target="future_cell/scan")
    assert skipped["status"] == "skipped" and "no_such_factory" in skipped["note"]
    for target in ("gru+lengths/scan", "lstm+bidirectional/scan", "lstmp/scan"):
        assert records(payload, target=target)[0]["status"] == "ok"
    (peer,) = records(payload, target="peer/flax_lstm")
    assert peer["check"] is None and peer["note"] == "not checked: a plain LSTM, the swept workload is gru+lengths"


def test_the_summary_reads_the_reference_even_when_the_first_method_is_skipped():
    payload = bench.run_benchmark(
        tiny(methods="associative,scan", extra="gru", peers="flax_lstm", modes="forward", matmul_floor=False),
        log=quiet,
    )
    (reference,) = records(payload, target="lstm/scan")
    assert reference["note"] == "reference" and records(payload, target="lstm/associative")[0]["status"] == "skipped"
    results = [runner.Result(**dict(r, shape=Shape(**r["shape"]), time_ms=bench.Stats(**r["time_ms"]) if r["time_ms"] else None))
               for r in payload["results"]]
    (line,) = report.summary(results)
    assert "lstm/scan" in line and "flax_lstm" in line
    # without the swept workload's time there is no summary, not the extra workload's
    untimed = [r if r.target != "lstm/scan" else dataclasses.replace(r, time_ms=None) for r in results]
    assert report.summary(untimed) == []


def _results_of(payload: dict) -> list:
    return [runner.Result(**dict(r, shape=Shape(**r["shape"]), time_ms=bench.Stats(**r["time_ms"]) if r["time_ms"] else None))
            for r in payload["results"]]


def test_the_summary_says_when_no_peer_ran_and_when_the_peers_do_other_work():
    no_peers = bench.run_benchmark(tiny(methods="scan", peers="", modes="forward"), log=quiet)
    (line,) = report.summary(_results_of(no_peers))
    assert "lstm/scan" in line and "no peers timed" in line and "the LSTM's matmuls alone" in line
    gru = bench.run_benchmark(tiny(cell="gru", methods="scan", peers="flax_lstm", modes="forward"), log=quiet)
    (line,) = report.summary(_results_of(gru))
    assert "gru/scan" in line and "time of the LSTM peers / this time (not the same work): flax_lstm" in line


def test_the_lstm_matmul_floor_is_left_out_when_no_lstm_is_timed():
    payload = bench.run_benchmark(tiny(cell="min_gru", methods="scan", peers="", modes="forward"), log=quiet)
    assert not records(payload, target="floor/lstm_matmuls")
    with_extra = bench.run_benchmark(tiny(cell="min_gru", extra="lstmp", methods="scan", peers="", modes="forward"),
                                     log=quiet)
    assert records(with_extra, target="floor/lstm_matmuls")


def test_parsing_and_validation():
    assert MethodSpec.parse("scan:unroll=4,hoist=0").kwargs == {"unroll": 4, "hoist": False}
    assert str(MethodSpec.parse("scan:unroll=4,hoist=0")) == "scan:unroll=4,hoist=0"
    assert MethodSpec.parse("associative:block_size=16").kwargs == {"block_size": 16}
    specs = BenchConfig(methods="scan,scan:fused=1,hoist=1,scan:unroll=2").method_specs
    assert [str(m) for m in specs] == ["scan", "scan:fused=1,hoist=1", "scan:unroll=2"]
    assert Shape.parse("64x100x64x256") == Shape(64, 100, 64, 256)
    assert Workload.parse("gru+lengths") == Workload("gru", ("lengths",))
    assert [s.seq_len for s in BenchConfig(seq_lengths="28,100").shape_list] == [28, 100]
    for bad in (dict(methods="scan:foo=1"), dict(methods="hoist=1,scan"), dict(modes="backward"), dict(peers="tf"),
                dict(cell="lstm+nope"), dict(shapes="1x2x3"), dict(rounds=0)):
        with pytest.raises(ValueError):
            BenchConfig(**bad)
    refused = {
        "modes must name at least one": dict(modes=""),
        "methods name scan more than once": dict(methods="scan,scan"),
        "cell and extra name lstm more than once": dict(extra="lstm,gru"),
        "peers name haiku_lstm more than once": dict(peers="haiku_lstm,haiku_lstm"),
        "0/1 for the others": dict(methods="scan:hoist=2"),
        "positive integers for unroll": dict(methods="scan:unroll=0"),
        "options follow a colon": dict(methods="scan,unroll=4"),
        "batch_size must be at least 1": dict(batch_size=0),
        "rtol must be >= 0": dict(rtol=-1.0),
        "static_max_seq_len must be >= 0": dict(static_max_seq_len=-3),
        "static_compile_budget_s must be > 0": dict(static_compile_budget_s=-5.0),
    }
    for message, bad in refused.items():
        with pytest.raises(ValueError, match=message):
            BenchConfig(**bad)
    assert BenchConfig(shapes="2x3x3x4", batch_size=0).shape_list == [Shape(2, 3, 3, 4)]  # shapes replace the sweep
    with pytest.raises(ValueError, match="unknown bench config fields"):
        BenchConfig.from_dict({"cells": "lstm"})
    assert runner.predict_static_compile([(10, 1.0), (20, 4.0)], 40) == pytest.approx(16.0)
    assert runner.predict_static_compile([(10, 1.0)], 30) == pytest.approx(3.0)
    # growth exponents are clamped to [STATIC_MIN_EXPONENT, STATIC_MAX_EXPONENT] = [1, 3]
    assert runner.predict_static_compile([(10, 1.0), (20, 64.0)], 40) == pytest.approx(64.0 * 2**3)  # 6 -> 3
    assert runner.predict_static_compile([(10, 1.0), (40, 2.0)], 80) == pytest.approx(4.0)  # 0.5 -> 1
    stats = bench.Stats.of([0.001, 0.002, 0.003])
    assert (stats.median, stats.min, stats.max, stats.count) == (2.0, 1.0, 3.0, 3)
    assert (stats.q25, stats.q75) == pytest.approx((1.5, 2.5))


def test_experiment_runs_from_its_config(tmp_path, capsys):
    pytest.importorskip("ml_collections")
    from experiments import bench as bench_experiment

    config = bench_experiment.get_config()
    config.update(dict(TINY, methods="scan", peers="", modes="forward"))
    summary = bench_experiment.run(config, str(tmp_path), mode="train", resume=False, data_dir=None)
    captured = capsys.readouterr()
    assert captured.out == "" and "lstm/scan" in captured.err  # launch.py's stdout stays one JSON document
    assert summary["fastest"]["B=2 T=3 I=3 H=4 forward"]["target"] == "lstm/scan"
    assert (tmp_path / "results.json").exists()
    assert np.isfinite(summary["peak_gflops"])


def test_every_flag_has_its_description_in_help():
    from rnnlab.bench import __main__ as cli

    descriptions = cli.field_descriptions()
    for field in dataclasses.fields(BenchConfig):
        assert len(descriptions.get(field.name, "")) > 10, field.name
    assert descriptions["rtol"] == descriptions["atol"]
    assert descriptions["matmul_floor"].endswith("(rnnlab's, Flax's, Haiku's).")


def test_train_flops_count_no_gradient_for_the_input():
    shape = Shape(2, 3, 5, 4)
    for name, forward_weights, input_kernels in [("min_gru", 0, 5 * 8), ("gru", 4 * 12, 5 * 12)]:
        cell = workloads.make_cell(name, 4)
        params = workloads.init_classifier(Workload(name), cell, shape, 10, 0)["rnn"]
        per_weight = 2 * 2 * 3  # 2·B·T
        assert workloads.workload_flops(Workload(name), params, shape, "forward") == per_weight * (
            forward_weights + input_kernels
        )
        assert workloads.workload_flops(Workload(name), params, shape, "train") == per_weight * (
            3 * forward_weights + 2 * input_kernels
        )


def test_bidirectional_flops_count_both_directions():
    b, t, i, h = 2, 3, 5, 4
    shape, workload = Shape(b, t, i, h), Workload("lstm", ("bidirectional",))
    params = workloads.init_classifier(workload, workloads.make_cell("lstm", h), shape, 10, 0)["rnn"]
    # each direction as one LSTM: 2·B·T·(I + H)·4H forward, 2·B·T·(2·I + 3·H)·4H a train step
    assert workloads.workload_flops(workload, params, shape, "forward") == 2 * (2 * b * t * (i + h) * 4 * h)
    assert workloads.workload_flops(workload, params, shape, "train") == 2 * (2 * b * t * (2 * i + 3 * h) * 4 * h)


def test_output_check_scales_rtol_by_the_reference_and_adds_atol():
    reference = {"x": np.array([1000.0, 0.0])}

    def passes(x):
        return runner.compare({"x": np.array(x)}, reference, "ref", rtol=1e-4, atol=1e-5)["passed"]

    assert passes([1000.05, 5e-6])  # |diff| <= atol + rtol·|reference| = 1e-5 + 0.1
    assert not passes([1000.2, 0.0])
    assert not passes([1000.0, 5e-5])  # above atol where the reference is 0


def test_output_check_with_nothing_to_compare_does_not_pass():
    check = runner.compare({"loss": np.zeros(())}, {"outputs": np.zeros(2)}, "ref", rtol=1e-4, atol=1e-5)
    assert check["compared"] == [] and not check["passed"]


def timed(target: str, kind: str, median: float, best: float | None = None, flops: float | None = None,
          note: str = "") -> runner.Result:
    """A forward `runner.Result` at the TINY shape, `median` ms a call (`best`: its fastest)."""
    time_ms = bench.Stats(median=median, min=median if best is None else best, max=median, q25=median, q75=median,
                          count=1)
    return runner.Result(target, kind, target, "forward", Shape(2, 3, 3, 4), time_ms=time_ms, flops=flops, note=note)


def test_gflops_take_the_peaks_best_call_and_speedups_are_peer_time_over_ours():
    peak = timed("peak/matmul", "peak", 4.0, best=2.0, flops=2e9)
    ours = timed("lstm/scan", "rnnlab", 1.0, flops=1e8)
    peers = [timed("peer/flax_lstm", "peer", 3.0), timed("peer/torch_lstm", "peer", 2.0)]
    runner._derive([peak, ours, *peers], peak)
    assert peak.gflops == pytest.approx(1000.0)  # 2e9 FLOPs in its best call's 2 ms
    assert ours.gflops == pytest.approx(100.0) and ours.fraction_of_peak == pytest.approx(0.1)
    assert ours.speedup_vs_best_peer == pytest.approx(2.0)  # the fastest peer's 2 ms over our 1 ms


def test_the_summary_ratio_is_peer_time_over_rnnlab_time():
    rows = [timed("lstm/scan", "rnnlab", 1.0, note="reference"), timed("peer/flax_lstm", "peer", 2.5)]
    (line,) = report.summary(rows)
    assert "flax_lstm 2.50x" in line


def test_benchmark_lengths_lie_in_ceil_half_t_to_t():
    for seq_len in (3, 5, 28):
        lengths = workloads.make_data(Shape(4000, seq_len, 1, 1), 10, 0).lengths
        assert (lengths.min(), lengths.max()) == (-(-seq_len // 2), seq_len)


def test_times_keep_the_decimals_their_size_needs():
    assert [report._ms(v) for v in (108.74, 9.843, 0.7812)] == ["108.7", "9.84", "0.781"]
