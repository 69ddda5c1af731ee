"""layer_norm benchmark (LayerNorm, RMSNorm, dropout + residual + LayerNorm):
``python benchmarks/bench_layer_norm.py [driver options]``.

A thin entry to the driver (``python -m fusedreg.bench --ops layer_norm ...``); the benchmark
itself is ``fusedreg/bench/layer_norm.py``. Without the driver (an older checkout) it runs
the module directly on the default device and prints its rows.
"""
import os
import sys

try:
    import fusedreg  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    from fusedreg.bench.__main__ import main
except ImportError:
    main = None


def _standalone(argv) -> int:
    import torch

    from fusedreg.bench import layer_norm
    from fusedreg.bench.harness import Context, measure_copy_bandwidth

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    copy = measure_copy_bandwidth(device)
    ctx = Context(device=device, dtypes=[dtype], quick="--quick" in argv, copy_gbps=copy)
    print(f"copy bandwidth {copy:.1f} GB/s")
    rows = layer_norm.benchmark(ctx)
    base = {(r.op, r.case, r.pass_): r.median_ms for r in rows if r.impl == "torch eager"}
    for r in rows:
        ref = base.get((r.op, r.case, r.pass_))
        print(f"{r.op:24s} {r.case:18s} {r.impl:18s} {r.pass_:8s} {r.median_ms:9.3f} ms "
              f"{r.gbps:7.1f} GB/s {r.frac_copy_bw:6.1%}  x{ref / r.median_ms:5.2f} vs eager  {r.note}")
    return 0


if __name__ == "__main__":
    if main is not None:
        sys.exit(main(["--ops", "layer_norm", *sys.argv[1:]]))
    sys.exit(_standalone(sys.argv[1:]))
