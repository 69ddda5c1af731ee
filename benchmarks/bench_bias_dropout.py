"""bias_dropout benchmark: ``python benchmarks/bench_bias_dropout.py [driver options]``.

A thin entry to the driver (``python -m fusedreg.bench --ops bias_dropout ...``); the
benchmark itself is ``fusedreg/bench/bias_dropout.py``. Any driver option passes through,
e.g. ``--quick``, ``--dtypes float32 bfloat16``, ``--sizes 4096x1024``.
"""
import os
import sys

try:
    import fusedreg  # noqa: F401
except ImportError:  # run from a source checkout without installing: use the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fusedreg.bench.__main__ import main

if __name__ == "__main__":
    sys.exit(main(["--ops", "bias_dropout", *sys.argv[1:]]))
