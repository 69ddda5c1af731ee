"""Optimizer step benchmark: ``python benchmarks/bench_optim.py [driver options]``.

A thin entry to the driver (``python -m fusedreg.bench --ops optim ...``); the benchmark
itself is ``fusedreg/bench/optim.py`` (AdamW with and without l1, SGD with momentum, against
torch foreach/fused, the torch fused + soft-threshold composite and apex FusedAdam). Any
driver option passes through, e.g. ``--quick`` or ``--sizes 67108864`` (the single tensor).
"""
import os
import sys

try:
    import fusedreg  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusedreg.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "optim", *sys.argv[1:]]))
