"""The benchmark command ``python -m fusedreg.bench`` (docs/design.md, "Benchmarks"): it runs,
writes the CSV and plots, discovers benchmark modules generically, and refuses bad options.
Nothing here asserts a timing (timing belongs to benchmarks, not tests)."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import fusedreg
import fusedreg.bench
from fusedreg.bench import bias_dropout as bench_bd
from fusedreg.bench import report
from fusedreg.bench.__main__ import discover, main
from fusedreg.bench.harness import Row, fused_backends

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--quick", "--budget", "0.02", "--no-progress", "--device", "cpu"]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_bias_dropout_run_writes_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["--ops", "bias_dropout", "--sizes", "33x64", "--results", str(out), *TINY]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "bias_dropout" in table and "% limit" in table

    path = out / "bench.csv"
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == report.CSV_COLUMNS
    rows = read_rows(path)
    fused = fused_backends(bench_bd.OP, torch.device("cpu"))
    impls = {f"fusedreg[{b}]" for b in fused} or {"fusedreg[reference]"}
    assert {r["impl"] for r in rows} == impls | {"torch eager", "torch.compile"}
    assert {r["pass"] for r in rows} == {"fwd", "bwd", "fwd+bwd"}
    for r in rows:
        assert r["device"] and r["torch"] == torch.__version__ and r["commit"]
        assert float(r["copy_gbps"]) > 0 and r["dtype"] == "float32" and r["mode"] == "loop"
        assert r["case"].startswith("33x64 ")
        if r["impl"] != "torch.compile" or "failed" not in r["note"]:
            assert float(r["median_ms"]) > 0 and float(r["gbps"]) > 0
    fwd = next(r for r in rows if r["pass"] == "fwd")
    assert int(fwd["bytes"]) == (3 * 33 * 64 + 64) * 4  # read x, residual (and bias), write out
    # each pass is held to its own access pattern's limit, measured in this run
    expected = {"fwd": "stream 2R1W", "bwd": "stream 1R1W", "fwd+bwd": "stream 2R1W"}
    for r in rows:
        assert r["limit"].startswith(expected[r["pass"]]), r["limit"]
        if r["pass"] == "fwd+bwd":
            assert " + stream 1R1W" in r["limit"]
        if math.isfinite(float(r["median_ms"])):
            assert float(r["limit_gbps"]) > 0
            # the fraction compares the fastest repetition with the limit (the probes' fastest)
            assert 0 < float(r["min_ms"]) <= float(r["median_ms"])
            best_gbps = int(r["bytes"]) / (float(r["min_ms"]) * 1e-3) / 1e9
            assert float(r["frac_limit"]) == pytest.approx(best_gbps / float(r["limit_gbps"]), rel=1e-3)
    for r in rows:
        if r["impl"].startswith("fusedreg"):
            assert "torch eager" in report.parse_speedup(r["speedup"])
    if _has("matplotlib"):
        assert (out / "bias_dropout-speedup.png").exists()
        assert (out / "bias_dropout-bandwidth.png").exists()

    # a second run appends under the same header
    assert main(argv + ["--no-plots"]) == 0
    assert len(read_rows(path)) == 2 * len(rows)
    if _has("matplotlib"):  # the plots can be redrawn from the CSV alone
        assert main(["--replot", str(path), "--plots", str(tmp_path / "replot")]) == 0
        assert (tmp_path / "replot" / "bias_dropout-speedup.png").exists()
    assert main(["--replot", str(tmp_path / "missing.csv")]) == 2


def _has(name):
    try:
        __import__(name)
        return True
    except ImportError:
        return False


@pytest.mark.parametrize("argv, valid", [
    (["--ops", "no_such_op"], "bias_dropout"),
    (["--dtypes", "float8"], "float32"),
])
def test_unknown_op_or_dtype_lists_valid_choices(capsys, argv, valid):
    with pytest.raises(SystemExit) as e:
        main(argv + TINY)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and valid in err


@pytest.mark.parametrize("argv, message", [
    (["--sizes", "12xab"], "bad size"),
    (["--sizes", "0x8"], "bad size"),
    (["--budget", "-1"], "positive number"),
    (["--device", "tpu"], "device"),
])
def test_bad_values_are_refused(capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--ops", "bias_dropout", "--no-progress"])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bias_dropout_sizes_must_be_two_dimensional(tmp_path, capsys):
    # the driver reports the op's ValueError and exits 1 instead of a traceback-only crash
    assert main(["--ops", "bias_dropout", "--sizes", "4096", "--results", str(tmp_path), *TINY]) == 1
    assert "rows x features" in capsys.readouterr().err


FAKE = '''
import torch
OP = "{op}"

def benchmark(ctx):
    if {fail}:
        raise RuntimeError("fake failure")
    rows = []
    x = torch.ones(1000)
    for impl, reps in (("fusedreg[fake]", 1), ("baseline", 3), ("slow baseline", 9)):
        t = ctx.time(lambda: [x.add(1) for _ in range(reps * 50)])
        rows.append(ctx.row(OP, "1000 fake", torch.float32, impl, "fwd", t, 8000))
    return rows
'''


def test_modules_are_discovered_generically(tmp_path, monkeypatch, capsys):
    # two new benchmark modules appear in the package: no change to the driver needed
    (tmp_path / "fake_op.py").write_text(FAKE.format(op="fake_op", fail=False))
    (tmp_path / "broken_op.py").write_text(FAKE.format(op="broken_op", fail=True))
    (tmp_path / "helper.py").write_text("X = 1\n")  # no OP/benchmark: not a benchmark
    (tmp_path / "bad_import.py").write_text("import no_such_module_anywhere\n")
    monkeypatch.setattr(fusedreg.bench, "__path__", list(fusedreg.bench.__path__) + [str(tmp_path)])
    for name in ("fake_op", "broken_op", "helper", "bad_import"):
        monkeypatch.delitem(sys.modules, f"fusedreg.bench.{name}", raising=False)

    modules, broken = discover()
    assert list(modules)[0] == "bias_dropout"  # the preferred order first
    assert {"fake_op", "broken_op"} <= set(modules) and "helper" not in modules
    assert "bad_import" in broken

    csv_path = tmp_path / "out.csv"
    code = main(["--ops", "fake_op", "broken_op", "--csv", str(csv_path), "--no-plots", *TINY])
    assert code == 1  # broken_op failed, and the run says so ...
    captured = capsys.readouterr()
    assert "broken_op failed" in captured.err and "fake failure" in captured.err
    assert "bad_import" in captured.err  # the unimportable module is named, not hidden
    rows = read_rows(csv_path)  # ... but fake_op's rows are kept
    assert [r["impl"] for r in rows] == ["fusedreg[fake]", "baseline", "slow baseline"]
    speedup = report.parse_speedup(rows[0]["speedup"])
    assert set(speedup) == {"baseline", "slow baseline"}
    assert all(s > 0 for s in speedup.values())


def _row(impl, ms, case="8x8 v", pass_="fwd", mode="loop"):
    return Row("op", case, "float32", impl, pass_, ms, ms, ms, 100, 1.0, 0.5, mode=mode)


def test_fill_speedups_pairs_rows_of_the_same_case():
    rows = [_row("fusedreg[cpu]", 2.0), _row("torch eager", 6.0), _row("torch.compile", math.nan),
            _row("torch eager", 1.0, case="16x8 v"), _row("fusedreg[cpu]", 5.0, pass_="bwd"),
            _row("fusedreg[cpu]", 4.0, mode="steady"), _row("torch eager", 2.0, mode="steady")]
    report.fill_speedups(rows)
    assert rows[0].speedup == {"torch eager": 3.0}  # the skipped (NaN) baseline is left out
    assert rows[1].speedup == {} and rows[4].speedup == {}  # baselines get none; no bwd baseline
    assert rows[5].speedup == {"torch eager": 0.5}  # steady state against steady state only


def test_split_case_and_device_slug():
    assert report.split_case("8192x1024 gelu+bias+res p=0.1") == (8192 * 1024, "gelu+bias+res p=0.1")
    assert report.split_case("adamw 10 params") == (None, "adamw 10 params")
    assert report.device_slug("NVIDIA H200", torch.device("cuda")) == "nvidia-h200"
    assert report.device_slug("Intel Xeon (2 threads)", torch.device("cpu")) == "cpu-intel-xeon"



def test_allocator_names_the_preloaded_library(monkeypatch):
    """The table's header says which malloc served the run (steady-state timings depend on it)."""
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert report.allocator() == "the C library's malloc"
    monkeypatch.setenv("LD_PRELOAD", "/opt/x/libjemalloc.so.2:/usr/lib/libfoo.so")
    assert report.allocator() == "LD_PRELOAD libjemalloc.so.2, libfoo.so"

def test_saved_for_backward_counts_what_autograd_keeps():
    x, b, r = (torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True),
               torch.randn(64, 32, requires_grad=True))
    # fusedreg keeps the inputs it needs and an 8-byte seed: never a mask
    with fusedreg.use_backend("reference"):
        saved, kept = bench_bd.saved_for_backward(bench_bd._fused(None), (x, b, r))
        assert (saved, kept) == (8, ["bias"])
        saved, kept = bench_bd.saved_for_backward(bench_bd._fused("gelu"), (x, b, r))
        assert (saved, kept) == (8, ["bias", "x"])
    # eager GELU keeps x + bias (a new tensor as large as x) and dropout its mask
    saved, _ = bench_bd.saved_for_backward(bench_bd._eager("gelu"), (x, b, r))
    assert saved > x.numel() * x.element_size()


def test_thin_script_passes_its_arguments_to_the_driver():
    script = os.path.join(ROOT, "benchmarks", "bench_bias_dropout.py")
    done = subprocess.run([sys.executable, script, "--ops", "no_such_op"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_failing_torch_compile_is_skipped_with_a_note(tmp_path, monkeypatch, capsys):
    def broken_compile(*args, **kwargs):
        def fn(*a, **k):
            raise RuntimeError("no C++ compiler for inductor")
        return fn

    monkeypatch.setattr(torch, "compile", broken_compile)
    argv = ["--ops", "bias_dropout", "--sizes", "8x16", "--csv", str(tmp_path / "b.csv"),
            "--no-plots", *TINY]
    assert main(argv) == 0
    assert "torch.compile failed: RuntimeError: no C++ compiler" in capsys.readouterr().out
    rows = read_rows(tmp_path / "b.csv")
    skipped = [r for r in rows if r["impl"] == "torch.compile"]
    assert len(skipped) == 3 and all(math.isnan(float(r["median_ms"])) for r in skipped)
    for r in rows:
        if r["impl"].startswith("fusedreg"):
            assert set(report.parse_speedup(r["speedup"])) == {"torch eager"}


def test_parse_sizes():
    from fusedreg.bench.__main__ import parse_sizes

    assert parse_sizes("4096x1024, 8192X1024") == [(4096, 1024), (8192, 1024)]
    assert parse_sizes("16777216") == [16777216]  # an element count stays a number
    assert parse_sizes("2x3x4,7") == [(2, 3, 4), 7]


def test_spread_stays_within_the_observed_times(monkeypatch):
    # a fake clock: each call of fn takes the next of these durations (s); the default
    # quantile method would put p10 below the fastest run (negative here)
    from fusedreg.bench import harness

    durations = iter([0.005, 0.001, 0.009, 0.001, 0.001, 0.001])
    now = [0.0]
    monkeypatch.setattr(harness.time, "perf_counter", lambda: now[0])

    def fn():
        now[0] += next(durations)

    t = harness.time_fn(fn, torch.device("cpu"), min_reps=6, max_reps=6, warmup=0, budget_s=0)
    assert t.reps == 6
    assert 1.0 - 1e-9 <= t.p10_ms <= t.median_ms <= t.p90_ms <= 9.0 + 1e-9


# ---- limits of the access patterns (fusedreg/bench/limits.py) ---------------------------------

from fusedreg.bench import limits as bench_limits  # noqa: E402
from fusedreg.bench.harness import Context, Timing  # noqa: E402


def _probes():
    import fusedreg._C  # noqa: F401
    return torch.ops.fusedreg_bench


@pytest.mark.parametrize("n", [16, 16 * 1000 + 16 * 3])  # one cache line; many, over 2 threads
def test_probe_kernels_touch_every_byte(n):
    # the probes must really read and write what the limit counts: check their results
    ops = _probes()
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(-2**31, 2**31 - 1, (n,), generator=gen, dtype=torch.int32) for _ in range(3))
    for nontemporal in (False, True):
        w1, w2 = torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
        ops.stream([a, b, c], [w1, w2], nontemporal)
        assert torch.equal(w1, a ^ b ^ c) and torch.equal(w2, a ^ b ^ c)
        rw = [a.clone(), b.clone()]
        ops.update(rw, [c], nontemporal)
        assert torch.equal(rw[0], a ^ c) and torch.equal(rw[1], b ^ c)
    for prefetch in (64, 8192):  # the probes with software prefetch (shorter and longer than
        rw = [a.clone(), b.clone()]  # the arrays)
        ops.update(rw, [c], False, prefetch)
        assert torch.equal(rw[0], a ^ c) and torch.equal(rw[1], b ^ c)
        for nontemporal in (False, True):
            w1, w2 = torch.zeros(n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)
            ops.stream([a, b, c], [w1, w2], nontemporal, prefetch)
            assert torch.equal(w1, a ^ b ^ c) and torch.equal(w2, a ^ b ^ c)
    words = torch.cat([a, b]).view(torch.int64)
    acc = 0
    for w in words.tolist():
        acc ^= w
    assert ops.reduce([a, b]) == acc
    for prefetch in (64, 8192):
        assert ops.reduce([a, b], prefetch) == acc


def test_probe_kernels_refuse_bad_operands():
    ops = _probes()
    with pytest.raises(RuntimeError, match="same size"):
        ops.stream([torch.ones(16)], [torch.ones(32)], False)
    with pytest.raises(RuntimeError, match="multiple of 64"):
        ops.stream([torch.ones(5)], [torch.ones(5)], False)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.reduce([torch.ones(32)[::2]])
    with pytest.raises(RuntimeError, match="at most 4"):
        ops.stream([torch.ones(16)] * 5, [torch.ones(16)], False)
    for bad in (100, -64):  # not a non-negative line multiple
        with pytest.raises(RuntimeError, match="prefetch is a non-negative multiple of 64 bytes"):
            ops.update([torch.ones(16)], [torch.ones(16)], False, bad)
        with pytest.raises(RuntimeError, match="prefetch is a non-negative multiple of 64 bytes"):
            ops.stream([torch.ones(16)], [torch.ones(16)], True, bad)
        with pytest.raises(RuntimeError, match="prefetch is a non-negative multiple of 64 bytes"):
            ops.reduce([torch.ones(16)], bad)
    with pytest.raises(RuntimeError, match="prefetch is with ordinary stores"):
        ops.update([torch.ones(16)], [torch.ones(16)], True, 64)


def test_patterns_validate_and_label():
    assert bench_limits.Pattern("stream", 2, 1).label == "stream 2R1W"
    assert bench_limits.Pattern("inplace", 4, 3).arrays_moved == 7
    for bad in (("copy", 1, 1), ("inplace", 1, 2), ("reduce", 1, 1), ("stream", 0, 0)):
        with pytest.raises(ValueError):
            bench_limits.Pattern(*bad)


def test_limits_are_measured_per_pattern_and_size_and_used(monkeypatch):
    # a fake clock: every probe call "takes" bytes / 10 GB/s, so each limit must come out at
    # 10 GB/s whatever the pattern -- and a second size is measured again, not reused
    calls = []

    def fake_time(fn):
        calls.append(fn)
        return 1.0  # ms

    lim = bench_limits.Limits(torch.device("cpu"), fake_time)
    pat = bench_limits.Pattern("stream", 2, 1)
    one = lim.get(pat, 4096)
    assert one.gbps == pytest.approx(3 * 4096 / 1e-3 / 1e9) and one.probe.split(" +")[0] in ("stores", "nt-stores")
    npf = len(bench_limits.PREFETCH_BYTES)
    stream = 2 * (1 + npf)  # ordinary and non-temporal stores, each plain and prefetching
    assert len(calls) == stream
    assert lim.get(pat, 4096) is one and len(calls) == stream  # kept for the run
    lim.get(pat, 8192)
    assert len(calls) == 2 * stream
    inplace = lim.get(bench_limits.Pattern("inplace", 4, 3), 4096)
    assert inplace.gbps == pytest.approx(7 * 4096 / 1e-3 / 1e9)
    # in place: the two store kinds, and ordinary stores prefetching at each distance
    assert len(calls) == 2 * stream + 2 + npf
    assert lim.get(bench_limits.REDUCE, 4096).probe == "loads"  # the first of equal ones
    assert len(calls) == 2 * stream + 2 + npf + 1 + npf  # loads, plain and prefetching


def test_a_row_above_its_limit_remeasures_the_limit(monkeypatch):
    # the first probe is slow (a noisy moment): the row would be at 200%; the limit is measured
    # again, and the row uses the better measurement
    ctx = Context(device=torch.device("cpu"), dtypes=[torch.float32], quick=True, copy_gbps=1.0)
    probes = 2 * (1 + len(bench_limits.PREFETCH_BYTES))  # two store kinds, plain and prefetching
    times = iter([4.0] * probes + [1.0] * probes)  # ms: the first measurement, then the second
    monkeypatch.setattr(ctx, "_limit_time", lambda fn: next(times))
    ctx.limits._time = ctx._limit_time
    pat = bench_limits.Pattern("stream", 1, 1)
    nbytes = 2 * 1 << 20  # 1 MiB arrays, read + written
    # 2 MiB in 1.5 ms: above the slow limit (2 MiB / 4 ms), below the fast one (2 MiB / 1 ms)
    row = ctx.row("op", "case", torch.float32, "fusedreg[cpu]", "fwd", Timing(1.5, 1.5, 1.5, 1, 1.5),
                  nbytes, pattern=pat, array_bytes=1 << 20)
    assert row.frac_limit == pytest.approx(1.0 / 1.5)
    assert row.limit.startswith("stream 1R1W") and row.limit_gbps == pytest.approx(nbytes / 1e-3 / 1e9)
    # passes run one after the other: the limit time is the sum of theirs
    label, gbps = ctx.limit((pat, pat), 1 << 20)
    assert label.count("stream 1R1W") == 2 and gbps == pytest.approx(nbytes / 1e-3 / 1e9)


def test_sweep_writes_its_own_csv_and_plots_without_compile(tmp_path, capsys):
    out = tmp_path / "res"
    argv = ["--ops", "bias_dropout", "--sweep", "--sizes", "4x768", "--results", str(out), *TINY]
    assert main(argv) == 0
    rows = read_rows(out / "sweep.csv")
    assert {r["impl"] for r in rows} <= {"fusedreg[cpu]", "fusedreg[reference]", "torch eager"}
    assert {r["case"] for r in rows} == {"4x768 bias+res p=0.1"}  # no activation variant
    if _has("matplotlib"):
        assert (out / "bias_dropout-speedup-sweep.png").exists()


def test_optimizer_sweep_lists_are_model_like():
    from fusedreg.bench import optim as bench_optim

    for target in bench_optim.SWEEP:
        shapes = bench_optim.sweep_shapes(target)
        n = sum(torch.Size(s).numel() for s in shapes)
        assert target / 3 <= n <= 3 * target, (target, n)
        assert len(shapes) >= 4 and any(len(s) == 1 for s in shapes)  # weights and biases
    assert bench_optim.sweep_shapes(10**6)[0] == (8 * bench_optim.sweep_shapes(10**6)[1][1],
                                                   bench_optim.sweep_shapes(10**6)[1][1])


def test_steady_state_times_each_row_in_a_fresh_process(tmp_path, monkeypatch, capsys):
    # every row but torch.compile's is timed again by a worker process; here the workers run
    # in this process (the real subprocess is checked once below), with the spec they get
    from fusedreg.bench import __main__ as driver

    specs = []

    def fake_run(spec):
        specs.append(spec)
        code = main(["--steady-worker", json.dumps(spec)])
        return subprocess.CompletedProcess([], code, capsys.readouterr().out, "")

    monkeypatch.setattr(driver, "_run_worker", fake_run)
    argv = ["--ops", "bias_dropout", "--sizes", "8x32", "--steady", "--steady-reps", "3",
            "--csv", str(tmp_path / "s.csv"), "--no-plots", *TINY]
    assert main(argv) == 0
    rows = read_rows(tmp_path / "s.csv")
    steady = [r for r in rows if r["mode"] == "steady"]
    loop = [r for r in rows if r["mode"] == "loop" and r["impl"] != "torch.compile"]
    assert sorted((r["impl"], r["pass"]) for r in steady) == sorted((r["impl"], r["pass"]) for r in loop)
    assert all(s["reps"] == 3 for s in specs) and len(specs) == len(steady)
    for r in steady:
        assert float(r["median_ms"]) > 0 and float(r["limit_gbps"]) > 0
        if r["impl"].startswith("fusedreg"):
            assert set(report.parse_speedup(r["speedup"])) == {"torch eager"}


def test_steady_state_worker_runs_in_a_fresh_process():
    spec = {"module": "layer_norm", "op": "rms_norm", "case": "16x64", "dtype": "float32",
            "impl": "torch eager", "pass": "fwd", "device": "cpu", "quick": True,
            "sizes": [[16, 64]], "reps": 5}
    done = subprocess.run([sys.executable, "-m", "fusedreg.bench", "--steady-worker", json.dumps(spec)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("STEADY "))
    median, p10, p90, reps, best = json.loads(line[len("STEADY "):])
    assert reps == 5 and 0 < best <= p10 <= median <= p90


def test_a_row_still_above_its_limit_says_so(monkeypatch):
    # every probe measurement is slow: three remeasurements, then the row carries a note
    ctx = Context(device=torch.device("cpu"), dtypes=[torch.float32], quick=True, copy_gbps=1.0)
    calls = []
    monkeypatch.setattr(ctx, "_limit_time", lambda fn: calls.append(fn) or 4.0)
    ctx.limits._time = ctx._limit_time
    pat = bench_limits.Pattern("stream", 1, 1)
    row = ctx.row("op", "case", torch.float32, "fusedreg[cpu]", "fwd", Timing(1.0, 1.0, 1.0, 1, 1.0),
                  2 << 20, pattern=pat, array_bytes=1 << 20, note="n")
    probes = 2 * (1 + len(bench_limits.PREFETCH_BYTES))  # two store kinds, plain and prefetching
    assert len(calls) == probes * 4  # the first measurement and three more
    assert row.frac_limit == pytest.approx(4.0) and "above the measured limit" in row.note
    assert row.note.startswith("n; ")


def test_train_steps_are_timed_interleaved_in_shuffled_rounds():
    # every step runs once per round (plus warm-up), and the order changes between rounds
    from fusedreg.bench import batch_norm as bench_bn

    ctx = Context(device=torch.device("cpu"), dtypes=[torch.float32], quick=True, copy_gbps=1.0)
    calls = []
    steps = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    timings = bench_bn._interleaved(ctx, steps)
    assert set(timings) == set(steps)
    rounds = timings["a"].reps
    assert 5 <= rounds <= 60 and all(t.reps == rounds for t in timings.values())
    assert all(calls.count(n) == rounds + 2 for n in steps)  # two warm-up calls each
    timed = calls[6:]
    orders = {tuple(timed[i:i + 3]) for i in range(0, len(timed), 3)}
    assert all(sorted(o) == ["a", "b", "c"] for o in orders) and len(orders) > 1
    assert all(0 <= t.min_ms <= t.p10_ms <= t.median_ms <= t.p90_ms for t in timings.values())
