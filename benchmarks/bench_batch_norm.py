"""batch_norm benchmark (BatchNorm training and eval, fused with residual + ReLU, timm resnet18 step):
``python benchmarks/bench_batch_norm.py [driver options]``.

A thin entry to the driver (``python -m fusedreg.bench --ops batch_norm ...``); the benchmark
itself is ``fusedreg/bench/batch_norm.py``. Any driver option passes through.
"""
import os
import sys

try:
    import fusedreg  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusedreg.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "batch_norm", *sys.argv[1:]]))
