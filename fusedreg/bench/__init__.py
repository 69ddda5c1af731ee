"""The benchmark suite: ``python -m fusedreg.bench`` (console script ``fusedreg-bench``)."""
