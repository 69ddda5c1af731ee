"""layer_norm benchmark (LayerNorm, RMSNorm, dropout + residual + LayerNorm):
``python benchmarks/bench_layer_norm.py [driver options]``.

A thin entry to the driver (``python -m fusedreg.bench --ops layer_norm ...``); the benchmark
itself is ``fusedreg/bench/layer_norm.py``. Any driver option passes through.
"""
import os
import sys

try:
    import fusedreg  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusedreg.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "layer_norm", *sys.argv[1:]]))
