"""``python -m fusedreg.bench`` (console script ``fusedreg-bench``): the project's main job.

1. measures the device's copy bandwidth (bytes read + written by ``dst.copy_(src)``);
2. runs every benchmark module ``fusedreg/bench/<name>.py`` that defines ``OP`` and
   ``benchmark(ctx)`` (found by listing the package, so a new op needs no change here);
3. fills each fusedreg row's speedup over every baseline of the same op/case/dtype/pass,
   prints one table, appends the rows to a CSV (device, versions, commit, time) and draws
   PNG plots of speedup and % of copy bandwidth against size, by default under
   ``results/<device-slug>/``.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import pkgutil
import sys
import time
import traceback

import torch

from . import report
from .harness import Context, measure_copy_bandwidth

# Modules of this package that are not benchmarks.
_NOT_BENCHMARKS = {"harness", "report"}
# Order of the table when present; any other benchmark module follows, alphabetically.
_PREFERRED_ORDER = ("bias_dropout", "layer_norm", "rms_norm", "optim")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}
_DEFAULT_DTYPES = {"cpu": ["float32"], "cuda": ["bfloat16"]}


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
                    "and as a fraction of the device copy bandwidth measured first.")
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


def main(argv=None) -> int:
    modules, broken = discover()
    args = build_parser(list(modules)).parse_args(argv)
    for name, why in broken.items():
        print(f"warning: benchmark module fusedreg.bench.{name} cannot be imported, skipped: {why}",
              file=sys.stderr)
    if args.replot:
        if not os.path.isfile(args.replot):
            print(f"error: --replot: no such file {args.replot}", file=sys.stderr)
            return 2
        written = report.plot_csv(args.replot, args.plots or os.path.dirname(os.path.abspath(args.replot)))
        print("plots: " + (", ".join(written) if written else "none (matplotlib missing or no rows)"))
        return 0
    if not modules:
        print("error: no benchmark modules found in fusedreg.bench", file=sys.stderr)
        return 2
    device = args.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    dtypes = [DTYPES[d] for d in (args.dtypes or _DEFAULT_DTYPES[device.type])]
    ops = args.ops or list(modules)

    copy_gbps = measure_copy_bandwidth(device)
    meta = report.run_metadata(device, copy_gbps)
    print(f"fusedreg-bench on {meta['device']}: copy bandwidth {copy_gbps:.1f} GB/s "
          f"(read + write); torch {meta['torch']}, triton {meta['triton']}, commit {meta['commit']}",
          file=sys.stderr, flush=True)

    progress = _Progress(ops, enabled=not args.no_progress)
    ctx = _ProgressContext(device=device, dtypes=dtypes, quick=args.quick, copy_gbps=copy_gbps,
                           budget_s=args.budget, sizes=args.sizes, on_time=progress.tick)
    rows, failed = [], []
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
            progress.done(op, len(new), time.perf_counter() - t0)
    finally:
        progress.close()

    report.fill_speedups(rows)
    records = [report.to_record(r, meta) for r in rows]
    print(f"\ncopy bandwidth {copy_gbps:.1f} GB/s on {meta['device']}; GB/s counts the minimal "
          "bytes of each pass; saved MB = bytes saved for backward beyond the inputs")
    print(report.format_table(records) if records else "(no rows)")

    folder = args.results or os.path.join("results", meta["device_slug"])
    if records and not args.no_csv:
        path = report.append_csv(args.csv or os.path.join(folder, "bench.csv"), records)
        print(f"\n{len(records)} rows appended to {path}")
    if records and not args.no_plots:
        written = report.plot_records(records, args.plots or folder)
        print("plots: " + (", ".join(written) if written else "none (matplotlib is not installed)"))
    if failed:
        print(f"error: these benchmarks failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
