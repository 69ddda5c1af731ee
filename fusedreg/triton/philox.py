"""The dropout mask function (docs/design.md, "The dropout mask") as Triton helpers.

``tl.philox`` is called with explicit uint32 counter words (g_lo, g_hi, 0, 0): its handling
of the words is stable across Triton releases, unlike ``tl.randint4x`` with int64 offsets.
"""
import triton
import triton.language as tl


@triton.jit
def uniform_from_words(w):
    """Triton's uint_to_uniform_float for uint32 words: a float32 in [0, 1)."""
    x = w.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _philox_words(seed, group):
    # group: int64 tensor of Philox counters (flat index // 4)
    c0 = group.to(tl.uint32)
    c1 = (group >> 32).to(tl.uint32)
    zero = c0 * 0
    return tl.philox(seed, c0, c1, zero, zero)


@triton.jit
def dropout_uniform(seed, offs):
    """u(seed, i) for an int64 tensor of flat indices, one Philox call per element."""
    r0, r1, r2, r3 = _philox_words(seed, offs >> 2)
    lane = offs & 3
    w = tl.where(lane == 0, r0, tl.where(lane == 1, r1, tl.where(lane == 2, r2, r3)))
    return uniform_from_words(w)


@triton.jit
def dropout_uniform_x4(seed, group):
    """u(seed, 4g + k), k = 0..3, for an int64 tensor of groups of shape [..., K]: returns
    shape [..., 4K] in flat order, one Philox call per four elements."""
    r0, r1, r2, r3 = _philox_words(seed, group)
    u0 = uniform_from_words(r0)
    u1 = uniform_from_words(r1)
    u2 = uniform_from_words(r2)
    u3 = uniform_from_words(r3)
    return tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))
