"""The CPU's AVX-512 Philox kernel (fusedreg/cpu/uniforms.h) against the reference Philox.

The kernel takes rounds 0 and 1 with constant operands when a call's groups share the high
word of their counter, and falls back to the full rounds per 16-group block when they do not
(a call or a block that straddles a multiple of 2^32 groups, i.e. of 2^34 elements). The
mask tests (tests/test_bias_dropout.py, tests/test_fidelity.py) start at element 0, where
every call takes the constant path; these ranges reach the others: calls whose blocks sit
on either side of a 2^32-group boundary, a block that straddles one, and starts that are not
a multiple of four elements (scalar head and tail around the vector blocks).
"""
import pytest
import torch

try:
    import fusedreg._C  # noqa: F401  (registers the C++ ops)
    HAVE_CPU = True
except ImportError:
    HAVE_CPU = False

from fusedreg.reference.philox import philox4x32_10, uint_to_uniform

pytestmark = pytest.mark.skipif(not HAVE_CPU, reason="cpu backend not built")

# a zero key, keys with only one half set, all-ones, and keys at and past 2^63 (negative as int64)
SEEDS = [0, 12345, 2**32 - 1, 2**32, 2**63 + 5, 2**64 - 1]
BOUNDARY = 2**34  # element index of group 2^32: the counter's high word steps from 0 to 1
STARTS = [
    0,                     # every block with high word 0
    BOUNDARY - 64 * 16,    # 16 blocks below the boundary, then the rest above it
    BOUNDARY - 32,         # the first vector block straddles the boundary (groups 2^32 - 8 ..)
    BOUNDARY - 40 + 3,     # unaligned start: scalar head, a straddling block, scalar tail
    3 * BOUNDARY - 6,      # high word 2 -> 3
    2**62 + 1,             # a large high word, all blocks above it
]


def _ref_uniform_at(seed, start, count):
    idx = torch.arange(start, start + count, dtype=torch.int64)
    words = torch.stack(philox4x32_10(seed, idx // 4), dim=1)
    return uint_to_uniform(words.gather(1, (idx % 4)[:, None])[:, 0])


@pytest.mark.parametrize("start", STARTS)
def test_uniforms_across_counter_high_words(start):
    for seed in SEEDS:
        for count in (64, 131, 2048 + 5):
            got = torch.ops.fusedreg.dropout_uniform(
                torch.tensor(seed - 2**64 if seed >= 2**63 else seed), start, count, torch.empty(0))
            assert torch.equal(got, _ref_uniform_at(seed, start, count)), (seed, start, count)
