"""Every operand of every registered op may be a non-contiguous view.

Each backend's op is called twice on the same values: once with every tensor contiguous, once
with one operand replaced by a view of another layout — stepped (``w[::2]``), expanded
(``b[:1].expand(N)``: one value, stride 0), transposed, or at a storage offset (which also
misaligns it). The results must be bitwise equal: same backend, same values, only the memory
layout differs. A kernel that indexes an operand as if it were dense reads the wrong
elements (on a GPU, out of bounds) and fails here. (The reference backend is torch's own ops,
whose reductions may sum in a layout-dependent order: it is held to float32 rounding.)
"""
import pytest
import torch

from fusedreg import backends
from conftest import cpu_backends

SEED = torch.tensor(20260, dtype=torch.int64)


def view_of(t: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal to ``t`` (same shape and values) in ``layout``."""
    if layout == "stepped":
        buf = torch.empty(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        v = buf[..., ::2]
    elif layout == "offset":
        v = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    elif layout == "transposed":
        v = torch.empty(t.shape[::-1], dtype=t.dtype).t()
    else:  # "expanded": t must be constant along its last dim
        assert (t == t[..., :1]).all()
        return t[..., :1].expand(t.shape)
    v.copy_(t)
    assert not v.is_contiguous() or layout == "offset"
    return v


def layouts(t: torch.Tensor) -> list:
    if t.numel() < 2:  # an empty mean (rms) has no layout to vary
        return ["offset"] if t.numel() else []
    out = ["stepped", "offset"]
    if t.dim() == 2 and min(t.shape) > 1:
        out.append("transposed")
    return out


def check_each_operand(op, args: dict, const_ok=(), exact=True):
    """op(**args) with each tensor argument in each layout equals op(**args), bitwise (within
    float32 rounding of the sums when not ``exact``)."""
    want = op(**args)
    want = want if isinstance(want, tuple) else (want,)
    n = 0
    for name, t in args.items():
        if not isinstance(t, torch.Tensor) or t is SEED:
            continue
        cases = [(layout, view_of(t, layout)) for layout in layouts(t)]
        if name in const_ok:  # a constant vector can be an expanded one
            const = torch.full_like(t, t.flatten()[0].item())
            cases.append(("expanded", view_of(const, "expanded")))
        for layout, v in cases:
            base = dict(args)
            if layout == "expanded":
                base[name] = const
                ref = op(**base)
                ref = ref if isinstance(ref, tuple) else (ref,)
            else:
                ref = want
            got = op(**{**base, name: v})
            got = got if isinstance(got, tuple) else (got,)
            for r, g in zip(ref, got):
                if exact:
                    assert torch.equal(r, g), f"{name} {layout}: max diff {(r - g).abs().max()}"
                else:
                    torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6, msg=f"{name} {layout}")
            n += 1
    assert n >= 4


def _data(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) + 0.5).to(dtype)


@pytest.mark.parametrize("backend", cpu_backends("bias_dropout"))
@pytest.mark.parametrize("activation", [0, 2])
def test_bias_dropout_operands(backend, activation):
    k = backends.implementation("bias_dropout", backend)
    M, N = 6, 10
    x, bias, res = _data((M, N)), _data((N,), seed=1), _data((M, N), seed=2)
    check_each_operand(k.fwd, dict(x=x, bias=bias, residual=res, p=0.3, activation=activation,
                                   seed=SEED), const_ok=("bias",))
    check_each_operand(k.bwd, dict(grad_out=_data((M, N), seed=3), x=x, bias=bias, p=0.3,
                                   activation=activation, seed=SEED, need_grad_bias=True),
                       const_ok=("bias",))


@pytest.mark.parametrize("backend", cpu_backends("layer_norm"))
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_layer_norm_operands(backend, rms):
    k = backends.implementation("layer_norm", backend)
    M, N = 5, 12
    x, res = _data((M, N)), _data((M, N), seed=1)
    w, b = _data((N,), seed=2), _data((N,), seed=3)
    fwd = dict(x=x, residual=res, weight=w, bias=b, eps=1e-5, p=0.25, seed=SEED, rms=rms,
               h_dtype=torch.float32, store_h=True)
    check_each_operand(k.fwd, fwd, const_ok=("weight", "bias"))
    _, h, mean, rstd = k.fwd(**fwd)
    bwd = dict(dy=_data((M, N), seed=4), dh_out=_data((M, N), seed=5), h=h, weight=w, bias=b,
               mean=mean, rstd=rstd, p=0.25, seed=SEED, rms=rms, x_dtype=torch.float32,
               need_grad_residual=True, need_grad_weight=True, need_grad_bias=True)
    check_each_operand(k.bwd, bwd, const_ok=("weight",), exact=backend != "reference")
