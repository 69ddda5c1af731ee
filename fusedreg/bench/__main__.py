"""``python -m fusedreg.bench`` (console script ``fusedreg-bench``): the project's main job.

1. measures the limits of the three access patterns (out-of-place streaming, in-place
   update, read-only reduction; fusedreg/bench/limits.py) at a reference size, for the
   header; each row's own limit is measured for its operands' size when first needed;
2. runs every benchmark module ``fusedreg/bench/<name>.py`` that defines ``OP`` and
   ``benchmark(ctx)`` (found by listing the package, so a new op needs no change here);
3. with ``--steady``, times every row again the way a training loop runs it: a fresh
   process per (op, case, dtype, impl, pass) that repeats the one call ``--steady-reps``
   times, each output freed before the next (``--steady-worker`` is that process);
4. fills each fusedreg row's speedup over every baseline of the same op/case/dtype/pass/mode,
   prints one table, appends the rows to a CSV (device, versions, commit, time) and draws
   PNG plots of speedup and % of limit against size, by default under
   ``results/<device-slug>/`` (``--sweep``: sweep.csv and ``*-sweep.png``).
"""
from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pkgutil
import subprocess
import sys
import time
import traceback

import torch

from . import report
from .harness import Context, Timing, time_fn
from .limits import REFERENCE_PATTERNS, _probe_ops

# Modules of this package that are not benchmarks.
_NOT_BENCHMARKS = {"harness", "report", "limits"}

# Order of the table when present; any other benchmark module follows, alphabetically.
_PREFERRED_ORDER = ("bias_dropout", "layer_norm", "rms_norm", "optim")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
_DEFAULT_DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16"]}


def kernels_l3(device: torch.device) -> str:
    """"; the CPU kernels count on an L3 of N MiB" (cpu::l3_bytes, which chooses their store
    kinds and steps; FUSEDREG_CPU_L3_MIB overrides it), or "" off the CPU or without the
    extension."""
    if device.type != "cpu":
        return ""
    ops = _probe_ops()
    if ops is None or not hasattr(ops, "l3_bytes"):
        return ""
    return f"; the CPU kernels count on an L3 of {ops.l3_bytes() >> 20} MiB"


def discover() -> tuple[dict, dict]:
    """({OP: module}, {module name: import error}) for the benchmark modules of this package."""
    package = importlib.import_module(__package__)
    names = sorted(m.name for m in pkgutil.iter_modules(package.__path__)
                   if not m.name.startswith("_") and m.name not in _NOT_BENCHMARKS)
    names.sort(key=lambda n: (_PREFERRED_ORDER.index(n) if n in _PREFERRED_ORDER else len(_PREFERRED_ORDER), n))
    found, broken = {}, {}
    for name in names:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except Exception as e:  # a broken module must not take the other benchmarks down
            broken[name] = f"{type(e).__name__}: {e}"
            continue
        op = getattr(module, "OP", None)
        if isinstance(op, str) and callable(getattr(module, "benchmark", None)):
            found[op] = module
    return found, broken


def parse_sizes(text: str) -> list:
    """"4096x1024,8192x1024" -> [(4096, 1024), (8192, 1024)]; "1000000" -> [1000000].
    A plain number stays an int (an element count, e.g. for the optimizers); a shape with
    'x' becomes a tuple (rows x features for bias_dropout and the norms)."""
    sizes = []
    for token in filter(None, (t.strip() for t in text.split(","))):
        try:
            dims = tuple(int(d) for d in token.lower().split("x"))
        except ValueError:
            dims = ()
        if not dims or any(d <= 0 for d in dims):
            raise argparse.ArgumentTypeError(
                f"bad size {token!r}: expected positive integers joined by 'x', e.g. 8192x1024")
        sizes.append(dims if "x" in token.lower() else dims[0])
    if not sizes:
        raise argparse.ArgumentTypeError("--sizes needs at least one size, e.g. 8192x1024")
    return sizes


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"bad device {text!r}: {e}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"device must be cpu or cuda[:N], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("--device cuda asked for, but no CUDA device is available")
    return device


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def build_parser(ops: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fusedreg-bench",
        description="Times fusedreg's ops against their baselines on this device, as speedups "
                    "and as a fraction of the limit of each pass's memory-access pattern, "
                    "measured in the same run.")
    p.add_argument("--ops", nargs="+", choices=ops, metavar="OP",
                   help=f"ops to run (default: all): {', '.join(ops) or 'none found'}")
    p.add_argument("--dtypes", nargs="+", choices=list(DTYPES), metavar="DTYPE",
                   help=f"dtypes to run: {', '.join(DTYPES)} (default: float32 on CPU, "
                        "bfloat16 on CUDA)")
    p.add_argument("--sizes", type=parse_sizes, metavar="AxB,...",
                   help="problem sizes instead of each op's defaults: rows x features for "
                        "bias_dropout and the norms (e.g. 4096x1024,8192x1024), an element "
                        "count for the optimizers (e.g. 16777216)")
    p.add_argument("--quick", action="store_true", help="fewer, smaller cases and shorter timing")
    p.add_argument("--device", type=_device, default=None,
                   help="cpu or cuda[:N] (default: cuda if available, else cpu)")
    p.add_argument("--budget", type=_positive, default=1.0, metavar="SECONDS",
                   help="timing budget per measurement (default 1.0; --quick uses 30%% of it)")
    p.add_argument("--results", default=None, metavar="DIR",
                   help="results folder (default results/<device-slug>/)")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="CSV to append to (default <results>/bench.csv)")
    p.add_argument("--plots", default=None, metavar="DIR", help="folder of the PNG plots (default <results>)")
    p.add_argument("--no-csv", action="store_true", help="do not write the CSV")
    p.add_argument("--no-plots", action="store_true", help="do not draw plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--replot", metavar="CSV", default=None,
                   help="measure nothing: redraw the plots of the last run in CSV (into --plots, "
                        "default the CSV's folder)")
    p.add_argument("--sweep", action="store_true",
                   help="the size sweep: (1, 768) to 8192x4096 for bias_dropout and the norms, "
                        "10 to 10^7 parameters for the optimizers (eager/torch baselines only); "
                        "rows go to <results>/sweep.csv, plots to *-sweep.png")
    p.add_argument("--sweep-max", action="store_true",
                   help="with --sweep on a CPU: up to 32768x4096 and 10^8 parameters (slow, "
                        "several GB of memory)")
    p.add_argument("--steady", action="store_true",
                   help="also time every row (but torch.compile's) in steady state: a fresh "
                        "process per timing, the same call repeated --steady-reps times")
    p.add_argument("--steady-reps", type=int, default=40, metavar="N",
                   help="calls per steady-state timing (default 40; the median is reported)")
    p.add_argument("--steady-worker", default=None, help=argparse.SUPPRESS)
    return p


class _Progress:
    """tqdm over the ops when installed and stderr is a terminal (the postfix counts timings),
    plain lines otherwise (a log file gets no carriage-return noise)."""

    def __init__(self, ops, enabled):
        self.ops, self.timings, self.bar = ops, 0, None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=len(ops), unit="op", file=sys.stderr, dynamic_ncols=True)
            except ImportError:
                pass
        self.plain = enabled and self.bar is None

    def start(self, i, op):
        if self.bar is not None:
            self.bar.set_description(op)
        elif self.plain:
            print(f"[{i + 1}/{len(self.ops)}] {op} ...", file=sys.stderr, flush=True)

    def tick(self):
        self.timings += 1
        if self.bar is not None:
            self.bar.set_postfix_str(f"{self.timings} timings")

    def done(self, op, n_rows, seconds):
        if self.bar is not None:
            self.bar.update(1)
        elif self.plain:
            print(f"      {op}: {n_rows} rows in {seconds:.0f} s", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


class _ProgressContext(Context):
    """The harness Context, reporting each finished timing to the progress bar."""

    def __init__(self, *args, on_time=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_time = on_time

    def time(self, fn, *args, **kwargs):
        t = super().time(fn, *args, **kwargs)
        if self._on_time is not None:
            self._on_time()
        return t


class _SteadyContext(Context):
    """A worker's Context: the one selected timing, as a training loop sees it (no warm-up
    beyond what the loop itself does, ``reps`` calls, each output freed before the next)."""

    def __init__(self, *args, reps=40, **kwargs):
        super().__init__(*args, **kwargs)
        self.reps = reps

    def time(self, fn, setup=None):
        return time_fn(fn, self.device, min_reps=self.reps, max_reps=self.reps, budget_s=0.0,
                       warmup=0, setup=setup)


def steady_worker(spec: dict) -> int:
    """The fresh process of one steady-state timing: prints ``STEADY <json Timing>``."""
    modules, _ = discover()
    device = torch.device(spec["device"])
    sizes = [tuple(s) if isinstance(s, list) else s for s in spec["sizes"]] if spec["sizes"] else None
    ctx = _SteadyContext(device=device, dtypes=[DTYPES[spec["dtype"]]], quick=spec["quick"],
                         copy_gbps=math.nan, sizes=sizes, select_op=spec["op"],
                         select_case=spec["case"], select=(spec["impl"], spec["pass"]),
                         reps=spec["reps"])
    rows = [r for r in modules[spec["module"]].benchmark(ctx)
            if (r.op, r.case, r.impl, r.pass_) == (spec["op"], spec["case"], spec["impl"], spec["pass"])]
    if len(rows) != 1:
        print(f"error: steady-state worker found {len(rows)} rows for {spec}", file=sys.stderr)
        return 1
    r = rows[0]
    print("STEADY " + json.dumps([r.median_ms, r.p10_ms, r.p90_ms, spec["reps"], r.min_ms]), flush=True)
    return 0


def _run_worker(spec: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusedreg.bench", "--steady-worker", json.dumps(spec)],
                          capture_output=True, text=True, timeout=900)


def run_steady(ctx: Context, tagged_rows: list, args, device) -> list:
    """Steady-state rows for every finite loop row but torch.compile's (whose fresh process
    would compile again each time), one fresh process per row."""
    out = []
    todo = [(m, r) for m, r in tagged_rows
            if r.impl != "torch.compile" and math.isfinite(r.median_ms) and r.mode == "loop"]
    for i, (module, r) in enumerate(todo):
        spec = {"module": module, "op": r.op, "case": r.case, "dtype": r.dtype, "impl": r.impl,
                "pass": r.pass_, "device": str(device), "quick": args.quick,
                "sizes": args.sizes, "reps": args.steady_reps}
        if not args.no_progress:
            print(f"  steady [{i + 1}/{len(todo)}] {r.op} {r.case} {r.dtype} {r.impl} {r.pass_}",
                  file=sys.stderr, flush=True)
        try:
            done = _run_worker(spec)
        except subprocess.TimeoutExpired:
            print(f"warning: steady-state worker timed out: {spec}", file=sys.stderr)
            continue
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("STEADY ")), None)
        if done.returncode != 0 or line is None:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            print(f"warning: steady-state worker failed ({tail}): {spec}", file=sys.stderr)
            continue
        median, p10, p90, reps, best = json.loads(line[len("STEADY "):])
        out.append(ctx.retimed(r, Timing(median, p10, p90, reps, best), "steady"))
    return out


def main(argv=None) -> int:
    modules, broken = discover()
    args = build_parser(list(modules)).parse_args(argv)
    if args.steady_worker:
        return steady_worker(json.loads(args.steady_worker))
    for name, why in broken.items():
        print(f"warning: benchmark module fusedreg.bench.{name} cannot be imported, skipped: {why}",
              file=sys.stderr)
    if args.replot:
        if not os.path.isfile(args.replot):
            print(f"error: --replot: no such file {args.replot}", file=sys.stderr)
            return 2
        suffix = "-sweep" if os.path.basename(args.replot).startswith("sweep") else ""
        written = report.plot_csv(args.replot, args.plots or os.path.dirname(os.path.abspath(args.replot)),
                                  suffix=suffix)
        print("plots: " + (", ".join(written) if written else "none (matplotlib missing or no rows)"))
        return 0
    if not modules:
        print("error: no benchmark modules found in fusedreg.bench", file=sys.stderr)
        return 2
    if args.steady_reps < 3:
        print("error: --steady-reps must be at least 3", file=sys.stderr)
        return 2
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    dtypes = [DTYPES[d] for d in (args.dtypes or _DEFAULT_DTYPES[device.type])]
    ops = args.ops or list(modules)

    progress = _Progress(ops, enabled=not args.no_progress)
    ctx = _ProgressContext(device=device, dtypes=dtypes, quick=args.quick, copy_gbps=math.nan,
                           budget_s=args.budget, sizes=args.sizes, sweep=args.sweep,
                           sweep_max=args.sweep_max, on_time=progress.tick)
    # The reference limits (the header line): operands of 256 MB (1 GB on a GPU), past the
    # caches of most CPUs (not all: the last-level cache of some server CPUs holds them).
    ref_bytes = (1 << 30) if device.type == "cuda" else (256 << 20)
    if args.quick:
        ref_bytes //= 8
    ref = [ctx.limits.get(p, ref_bytes) for p in REFERENCE_PATTERNS]
    ctx.copy_gbps = ref[0].gbps
    meta = report.run_metadata(device, ctx.copy_gbps)
    limits_text = ", ".join(f"{lim.pattern.label} {lim.gbps:.1f} GB/s ({lim.probe})" for lim in ref)
    print(f"fusedreg-bench on {meta['device']}: limits for {ref_bytes >> 20} MB operands: "
          f"{limits_text}; torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}",
          file=sys.stderr, flush=True)

    rows, tagged, failed = [], [], []
    try:
        for i, op in enumerate(ops):
            progress.start(i, op)
            t0 = time.perf_counter()
            try:
                new = list(modules[op].benchmark(ctx))
            except Exception as e:  # report it, keep the other ops' results
                failed.append(op)
                new = []
                print(f"\nerror: benchmark {op} failed: {type(e).__name__}: {e}", file=sys.stderr)
                traceback.print_exc(file=sys.stderr)
            rows += new
            tagged += [(op, r) for r in new]
            progress.done(op, len(new), time.perf_counter() - t0)
    finally:
        progress.close()
    if args.steady and not args.sweep:
        rows += run_steady(ctx, tagged, args, device)

    report.fill_speedups(rows)
    records = [report.to_record(r, meta) for r in rows]
    print(f"\nlimits for {ref_bytes >> 20} MB operands on {meta['device']}: {limits_text}; "
          f"allocator: {report.allocator()}{kernels_l3(device)}. "
          "GB/s counts the minimal bytes of each pass (at the median time); % limit is the "
          "fastest repetition's GB/s as a fraction of the limit of the pass's access pattern "
          "(the probes' fastest) for operands of the case's size; mode loop = "
          "repeated in this process, steady = a fresh process per timing (a training loop's "
          "view); saved MB = bytes saved for backward beyond the inputs")
    print(report.format_table(records) if records else "(no rows)")

    folder = args.results or os.path.join("results", meta["device_slug"])
    name, suffix = ("sweep.csv", "-sweep") if args.sweep else ("bench.csv", "")
    if records and not args.no_csv:
        path = report.append_csv(args.csv or os.path.join(folder, name), records)
        print(f"\n{len(records)} rows appended to {path}")
    if records and not args.no_plots:
        written = report.plot_records(records, args.plots or folder, suffix=suffix)
        print("plots: " + (", ".join(written) if written else "none (matplotlib is not installed)"))
    if failed:
        print(f"error: these benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
