"""What the benchmark driver does with its rows: speedups, the table, the CSV and the plots.

Rows become flat records (one dict per row, the CSV's columns) so that the table, the CSV
and the plots all read the same thing; ``plot_csv`` redraws the plots of any run from the CSV.
"""
from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import re
import subprocess

import torch

from .harness import Row

CSV_COLUMNS = [
    "run_id", "timestamp", "device", "device_slug", "torch", "triton", "fusedreg", "commit",
    "copy_gbps", "threads", "mode", "op", "case", "dtype", "impl", "pass", "median_ms", "p10_ms",
    "p90_ms", "min_ms", "bytes", "gbps", "limit", "limit_gbps", "frac_limit", "saved_bytes", "note", "speedup",
]


# ---------------------------------------------------------------------------------------------
# Run metadata
# ---------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    # "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz" -> "Intel Xeon Platinum 8481C"
    model = re.sub(r"\((R|TM|tm|r)\)|\bCPU\b|@.*$|\bProcessor\b", "", model)
    model = " ".join(model.split())
    return f"{model} ({torch.get_num_threads()} threads)"


def allocator() -> str:
    """Which malloc serves torch's CPU tensors in this process: a library preloaded with
    LD_PRELOAD (jemalloc, tcmalloc, mimalloc...) or the C library's."""
    preload = [os.path.basename(p) for p in os.environ.get("LD_PRELOAD", "").replace(":", " ").split()]
    return "LD_PRELOAD " + ", ".join(preload) if preload else "the C library's malloc"


def device_slug(name: str, device: torch.device) -> str:
    """Folder-safe name: "nvidia-h200", "cpu-intel-xeon-platinum-8481c"."""
    base = re.sub(r"\(\d+ threads\)", "", name)
    slug = re.sub(r"[^a-z0-9]+", "-", base.lower()).strip("-")
    if device.type == "cpu" and not slug.startswith("cpu"):
        slug = "cpu-" + slug
    return slug or device.type


def git_commit() -> str:
    """Commit of the fusedreg checkout being run, "+dirty" if tracked files changed."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_metadata(device: torch.device, copy_gbps: float) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    import fusedreg

    name = device_name(device)
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "run_id": now.strftime("%Y%m%dT%H%M%SZ"), "timestamp": now.isoformat(timespec="seconds"),
        "device": name, "device_slug": device_slug(name, device), "torch": torch.__version__,
        "triton": triton_version, "fusedreg": fusedreg.__version__, "commit": git_commit(),
        "copy_gbps": f"{copy_gbps:.2f}", "threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# Speedups and records
# ---------------------------------------------------------------------------------------------
def is_fused(impl: str) -> bool:
    return impl.startswith("fusedreg")


def fill_speedups(rows: list[Row]) -> None:
    """Each fusedreg row gets baseline_ms / fused_ms for every baseline of the same
    (op, case, dtype, pass, mode) that was measured (a skipped baseline has a NaN time)."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.op, r.case, r.dtype, r.pass_, r.mode), []).append(r)
    for group in groups.values():
        baselines = [b for b in group if not is_fused(b.impl) and math.isfinite(b.median_ms)
                     and b.median_ms > 0]  # a derived time (fwd+bwd - fwd) can come out <= 0
        for r in group:
            if is_fused(r.impl) and math.isfinite(r.median_ms) and r.median_ms > 0:
                r.speedup = {b.impl: b.median_ms / r.median_ms for b in baselines}


def to_record(row: Row, meta: dict) -> dict:
    rec = dict(meta)
    rec.update({
        "mode": row.mode, "op": row.op, "case": row.case, "dtype": row.dtype, "impl": row.impl, "pass": row.pass_,
        "median_ms": f"{row.median_ms:.6g}", "p10_ms": f"{row.p10_ms:.6g}",
        "p90_ms": f"{row.p90_ms:.6g}", "min_ms": f"{row.min_ms:.6g}", "bytes": row.bytes, "gbps": f"{row.gbps:.5g}",
        "limit": row.limit, "limit_gbps": f"{row.limit_gbps:.5g}",
        "frac_limit": f"{row.frac_limit:.5g}",
        "saved_bytes": "" if row.saved_bytes is None else row.saved_bytes, "note": row.note,
        "speedup": ";".join(f"{k}={v:.3f}" for k, v in row.speedup.items()),
    })
    return rec


def parse_speedup(text: str) -> dict:
    out = {}
    for part in filter(None, (text or "").split(";")):
        k, _, v = part.rpartition("=")
        out[k] = float(v)
    return out


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------
def _num(value: str, fmt: str) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if not math.isfinite(v) else format(v, fmt)


def format_table(records: list[dict]) -> str:
    """The table: each row's % of its own access pattern's limit (and which limit that is:
    the legend below the table), and the speedups over the baselines of the same case."""
    header = ["op", "case", "dtype", "mode", "impl", "pass", "median ms", "p10-p90 ms", "GB/s",
              "% limit", "limit", "saved MB", "speedup"]
    lines, legend = [], {}
    for r in records:
        spread = (f"{_num(r['p10_ms'], '.3g')}-{_num(r['p90_ms'], '.3g')}"
                  if _num(r["median_ms"], "g") != "-" else "-")
        saved = "-" if r["saved_bytes"] in ("", None) else f"{int(r['saved_bytes']) / 1e6:.2f}"
        speed = ", ".join(f"{v:.2f}x {k}" for k, v in parse_speedup(r["speedup"]).items())
        if r["note"]:
            speed = f"{speed} [{r['note']}]" if speed else f"[{r['note']}]"
        frac = _num(float(r["frac_limit"]) * 100 if r["frac_limit"] else "", ".1f")
        limit = r.get("limit", "")
        if limit and limit not in legend:
            legend[limit] = f"L{len(legend) + 1}"
        tag = f"{legend[limit]} {_num(r['limit_gbps'], '.0f')}" if limit else "-"
        lines.append([r["op"], r["case"], r["dtype"], r.get("mode", "loop"), r["impl"], r["pass"],
                      _num(r["median_ms"], ".3f"), spread, _num(r["gbps"], ".1f"), frac, tag,
                      saved, speed])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    widths[-1] = len(header[-1])  # the last column is free text: do not pad
    fmt = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [fmt(header), fmt(["-" * w for w in widths])]
    previous = None
    for cells in lines:
        key = tuple(cells[:4])
        if previous is not None and key != previous:
            out.append("")
        previous = key
        out.append(fmt(cells))
    if legend:
        out.append("")
        out.append("limit column: the access pattern's limit and its GB/s for operands of the "
                   "case's size (R/W = arrays read/written; probe: stores, nt-stores or loads, "
                   "+ prefetch NK: lines prefetched N KiB ahead; torch):")
        out += [f"  {tag}: {label}" for label, tag in legend.items()]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------
def _header(path: str):
    """The CSV header of ``path``, None when it does not exist or is empty."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def append_csv(path: str, records: list[dict]) -> str:
    """Appends to ``path`` (header written when new). A file with other columns (an older
    layout) is left alone and the rows go to ``<name>.2.csv`` (or .3, ...); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    root, ext = os.path.splitext(path)
    i = 2
    while _header(path) not in (None, CSV_COLUMNS):
        path, i = f"{root}.{i}{ext or '.csv'}", i + 1
    new = _header(path) is None
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        if new:
            w.writeheader()
        w.writerows(records)
    return path


def read_csv(path: str, run_id: str | None = None) -> list[dict]:
    """Records of one run of the CSV (the last one if ``run_id`` is None)."""
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    if not records:
        return []
    run_id = run_id or records[-1]["run_id"]
    return [r for r in records if r["run_id"] == run_id]


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\d+(x\d+)*$")


def split_case(case: str) -> tuple[int | None, str]:
    """"8192x1024 gelu p=0.1" -> (8388608, "gelu p=0.1"): the leading shape gives the size."""
    first, _, rest = case.partition(" ")
    if _SIZE.match(first):
        return math.prod(int(d) for d in first.split("x")), rest
    return None, case


_PARAMS = re.compile(r"([\d,]+) params")


def params_of(case: str) -> int | None:
    """"148 tensors 1,000,000 params" -> 1000000 (the optimizers' cases)."""
    m = _PARAMS.search(case)
    return int(m.group(1).replace(",", "")) if m else None


def _plot_series(recs: list, pass_: str, kind: str) -> dict:
    """{label: [(size, value)]} of one pass of one op: speedups over each baseline, or the
    percentage of the limit; rows without a size (a model's step) have no point."""
    series: dict = {}
    for r in recs:
        if r["pass"] != pass_:
            continue
        size, variant = split_case(r["case"])
        x = size if size is not None else params_of(r["case"]) or int(r["bytes"])
        if not x or x <= 0:
            continue
        tag = f" {variant}" if variant and size is not None else ""
        if r.get("mode", "loop") != "loop":
            tag += f" [{r['mode']}]"
        if kind == "speedup":
            for base, s in parse_speedup(r["speedup"]).items():
                series.setdefault(f"{r['impl']} vs {base}{tag} {r['dtype']}", []).append((x, s))
        else:
            series.setdefault(f"{r['impl']}{tag} {r['dtype']}", []).append(
                (x, 100 * float(r["frac_limit"])))
    return series


def plot_records(records: list[dict], folder: str, suffix: str = "") -> list[str]:
    """Two PNGs per op: speedup over each baseline, and % of the access pattern's limit,
    against the problem size (elements of the case's leading shape, parameters of an
    optimizer case, else bytes moved); ``suffix`` ends the file names (e.g. "-sweep").
    Returns the files written; [] when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(folder, exist_ok=True)
    written = []
    for op in dict.fromkeys(r["op"] for r in records):
        recs = [r for r in records if r["op"] == op and _num(r["median_ms"], "g") != "-"]
        passes = list(dict.fromkeys(r["pass"] for r in recs))
        if not passes:
            continue
        device = recs[0]["device"]
        for kind in ("speedup", "bandwidth"):
            per_pass = {p: _plot_series(recs, p, kind) for p in passes}
            per_pass = {p: v for p, v in per_pass.items() if v}  # a pass of sizeless rows: none
            if not per_pass:
                continue
            fig, axes = plt.subplots(1, len(per_pass), figsize=(5.5 * len(per_pass), 4.2),
                                     squeeze=False)
            for ax, pass_ in zip(axes[0], per_pass):
                series = per_pass[pass_]
                for label, pts in series.items():
                    pts.sort()
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
                ax.set_xscale("log")
                ax.set_xlabel("problem size (elements; parameters for optimizers)")
                if kind == "speedup":
                    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
                    ax.set_ylabel("speedup (baseline time / fusedreg time)")
                else:
                    ax.axhline(100.0, color="gray", lw=0.8, ls="--")
                    ax.set_ylabel("% of the access pattern's measured limit")
                ax.set_title(f"{op} {pass_}")
                ax.grid(True, alpha=0.3)
                # below the axes (as many lines as series): the saved image grows to hold them
                ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.2))
            fig.suptitle(f"{op} on {device}", fontsize=10)
            path = os.path.join(folder, f"{op}-{kind}{suffix}.png")
            fig.savefig(path, dpi=110, bbox_inches="tight")
            plt.close(fig)
            written.append(path)
    return written


def plot_csv(path: str, folder: str, run_id: str | None = None, suffix: str = "") -> list[str]:
    return plot_records(read_csv(path, run_id), folder, suffix)
