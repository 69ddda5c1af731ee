"""Optimizer step benchmark: ``python benchmarks/bench_optim.py [--device cpu|cuda] [--quick]``.

A thin script over fusedreg/bench/optim.py (``python -m fusedreg.bench --ops optim`` runs the
same module through the suite's driver); prints one line per row with GB/s and the fraction
of the copy bandwidth measured first.
"""
import argparse

import torch

from fusedreg.bench import optim
from fusedreg.bench.harness import Context, measure_copy_bandwidth


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds per measurement")
    ap.add_argument("--sizes", type=int, nargs="*", help="elements of the single-tensor case")
    args = ap.parse_args()
    device = torch.device(args.device)
    ctx = Context(device, [torch.float32], args.quick, measure_copy_bandwidth(device),
                  budget_s=args.budget, sizes=args.sizes)
    print(f"device {device}, copy bandwidth {ctx.copy_gbps:.1f} GB/s, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    rows = optim.benchmark(ctx)
    base = {}
    for r in rows:
        base.setdefault((r.op, r.case), {})[r.impl] = r.median_ms
    for r in rows:
        ref = base[(r.op, r.case)]
        sp = "  ".join(f"{v / r.median_ms:.2f}x vs {k}" for k, v in ref.items()
                       if k != r.impl and not r.impl.startswith("torch"))
        print(f"{r.op:13s} {r.case:28s} {r.impl:30s} {r.median_ms:8.2f} ms "
              f"[{r.p10_ms:.2f}, {r.p90_ms:.2f}]  {r.gbps:6.1f} GB/s  {r.frac_copy_bw:5.2f} of copy  {sp}")


if __name__ == "__main__":
    main()
