"""The benchmark command ``python -m fusedreg.bench`` (docs/design.md, "Benchmarks"): it runs,
writes the CSV and plots, discovers benchmark modules generically, and refuses bad options.
Nothing here asserts a timing (timing belongs to benchmarks, not tests)."""
import csv
import math
import os
import subprocess
import sys

import pytest
import torch

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
    assert "bias_dropout" in table and "% copy BW" in table

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
        assert float(r["copy_gbps"]) > 0 and r["dtype"] == "float32"
        assert r["case"].startswith("33x64 ")
        if r["impl"] != "torch.compile" or "failed" not in r["note"]:
            assert float(r["median_ms"]) > 0 and float(r["gbps"]) > 0
    fwd = next(r for r in rows if r["pass"] == "fwd")
    assert int(fwd["bytes"]) == (3 * 33 * 64 + 64) * 4  # read x, residual (and bias), write out
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


def _row(impl, ms, case="8x8 v", pass_="fwd"):
    return Row("op", case, "float32", impl, pass_, ms, ms, ms, 100, 1.0, 0.5)


def test_fill_speedups_pairs_rows_of_the_same_case():
    rows = [_row("fusedreg[cpu]", 2.0), _row("torch eager", 6.0), _row("torch.compile", math.nan),
            _row("torch eager", 1.0, case="16x8 v"), _row("fusedreg[cpu]", 5.0, pass_="bwd")]
    report.fill_speedups(rows)
    assert rows[0].speedup == {"torch eager": 3.0}  # the skipped (NaN) baseline is left out
    assert rows[1].speedup == {} and rows[4].speedup == {}  # baselines get none; no bwd baseline


def test_split_case_and_device_slug():
    assert report.split_case("8192x1024 gelu+bias+res p=0.1") == (8192 * 1024, "gelu+bias+res p=0.1")
    assert report.split_case("adamw 10 params") == (None, "adamw 10 params")
    assert report.device_slug("NVIDIA H200", torch.device("cuda")) == "nvidia-h200"
    assert report.device_slug("Intel Xeon (2 threads)", torch.device("cpu")) == "cpu-intel-xeon"


def test_saved_for_backward_counts_what_autograd_keeps():
    x, b, r = (torch.randn(64, 32, requires_grad=True), torch.randn(32, requires_grad=True),
               torch.randn(64, 32, requires_grad=True))
    # fusedreg keeps the inputs it needs and an 8-byte seed: never a mask
    saved, kept = bench_bd.saved_for_backward(bench_bd._fused("reference", None), (x, b, r))
    assert (saved, kept) == (8, ["bias"])
    saved, kept = bench_bd.saved_for_backward(bench_bd._fused("reference", "gelu"), (x, b, r))
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
