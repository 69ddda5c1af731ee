"""The registered ops check what they are given, in every backend.

User code can call a registered op directly (``torch.ops.fusedreg.bias_dropout_fwd``,
``..._reference``, ``..._triton``), bypassing the functional API's checks: each op then
raises RuntimeError (a C++ TORCH_CHECK, or its Python counterpart in fusedreg/ops/_common.py)
before any kernel runs — never runs a different activation, accepts p = 2, or returns
uninitialized memory. Each bad case is checked against a good call that succeeds, so that a
case fails for the one argument it changes.
"""
import math

import pytest
import torch

from fusedreg import backends
from conftest import cpu_backends

SEED = torch.tensor(7, dtype=torch.int64)
M, N = 3, 8


def _bias_dropout_args():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(M, N, generator=g) + 0.5
    fwd = dict(x=x, bias=torch.randn(N, generator=g), residual=torch.randn(M, N, generator=g),
               p=0.3, activation=2, seed=SEED)
    bwd = dict(grad_out=torch.randn(M, N, generator=g), x=x, bias=fwd["bias"], p=0.3,
               activation=2, seed=SEED, need_grad_bias=True)
    return fwd, bwd


BIAS_DROPOUT_FWD_BAD = {
    "p > 1": dict(p=2.0), "p < 0": dict(p=-0.1), "p nan": dict(p=math.nan),
    "activation 5": dict(activation=5), "activation -1": dict(activation=-1),
    "seed float": dict(seed=torch.tensor(1.0)), "seed 2 elements": dict(seed=torch.tensor([1, 2])),
    "bias (N+1,)": dict(bias=torch.zeros(N + 1)), "bias 2-d": dict(bias=torch.zeros(1, N)),
    "bias float64": dict(bias=torch.zeros(N, dtype=torch.float64)),
    "bias on meta": dict(bias=torch.zeros(N, device="meta")),
    "residual shape": dict(residual=torch.zeros(M + 1, N)),
    "residual float16": dict(residual=torch.zeros(M, N, dtype=torch.float16)),
    "x int64": dict(x=torch.zeros(M, N, dtype=torch.int64), bias=None, residual=None),
}
BIAS_DROPOUT_BWD_BAD = {
    "p > 1": dict(p=1.5), "activation 9": dict(activation=9),
    "x shape": dict(x=torch.zeros(M, N + 1)), "x float64": dict(x=torch.zeros(M, N, dtype=torch.float64)),
    "x missing with activation": dict(x=None),
    "need_grad_bias without bias": dict(bias=None),
    "bias shape": dict(bias=torch.zeros(N - 1)),
    "seed on meta": dict(seed=torch.tensor(1, device="meta")),
}


@pytest.mark.parametrize("case", list(BIAS_DROPOUT_FWD_BAD))
@pytest.mark.parametrize("backend", cpu_backends("bias_dropout"))
def test_bias_dropout_fwd_rejects(backend, case):
    fwd, _ = _bias_dropout_args()
    op = backends.implementation("bias_dropout", backend).fwd
    op(**fwd)
    with pytest.raises(RuntimeError):
        op(**{**fwd, **BIAS_DROPOUT_FWD_BAD[case]})


@pytest.mark.parametrize("case", list(BIAS_DROPOUT_BWD_BAD))
@pytest.mark.parametrize("backend", cpu_backends("bias_dropout"))
def test_bias_dropout_bwd_rejects(backend, case):
    _, bwd = _bias_dropout_args()
    op = backends.implementation("bias_dropout", backend).bwd
    op(**bwd)
    with pytest.raises(RuntimeError):
        op(**{**bwd, **BIAS_DROPOUT_BWD_BAD[case]})


def _layer_norm_args(backend):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(M, N, generator=g) + 0.5
    fwd = dict(x=x, residual=torch.randn(M, N, generator=g), weight=torch.rand(N, generator=g) + 0.5,
               bias=torch.randn(N, generator=g), eps=1e-5, p=0.2, seed=SEED, rms=False,
               h_dtype=torch.float32, store_h=True)
    _, h, mean, rstd = backends.implementation("layer_norm", backend).fwd(**fwd)
    bwd = dict(dy=torch.randn(M, N, generator=g), dh_out=torch.randn(M, N, generator=g), h=h,
               weight=fwd["weight"], bias=fwd["bias"], mean=mean, rstd=rstd, p=0.2, seed=SEED,
               rms=False, x_dtype=torch.float32, need_grad_residual=True, need_grad_weight=True,
               need_grad_bias=True)
    return fwd, bwd


LAYER_NORM_FWD_BAD = {
    "eps inf": dict(eps=math.inf), "eps nan": dict(eps=math.nan),
    "p > 1": dict(p=1.01), "p nan": dict(p=math.nan),
    "x 3-d": dict(x=torch.zeros(1, M, N), residual=None),
    "x 1-d": dict(x=torch.zeros(N), residual=None),
    "x int32": dict(x=torch.zeros(M, N, dtype=torch.int32), residual=None, weight=None, bias=None),
    "weight (N+1,)": dict(weight=torch.ones(N + 1)), "bias 2-d": dict(bias=torch.zeros(1, N)),
    "weight float64": dict(weight=torch.ones(N, dtype=torch.float64)),
    "weight on meta": dict(weight=torch.ones(N, device="meta")),
    "residual dtype": dict(residual=torch.zeros(M, N, dtype=torch.float16)),
    "residual shape": dict(residual=torch.zeros(M, N + 1)),
    "h_dtype int64": dict(h_dtype=torch.int64, residual=None),
    "h_dtype float64": dict(h_dtype=torch.float64, residual=None),
    "seed int32": dict(seed=torch.tensor(3, dtype=torch.int32)),
}
LAYER_NORM_BWD_BAD = {
    "p < 0": dict(p=-1.0),
    "rstd on meta": dict(rstd=torch.ones(M, device="meta")),
    "rstd (M+1,)": dict(rstd=torch.ones(M + 1)),
    "mean float64": dict(mean=torch.zeros(M, dtype=torch.float64)),
    "dy shape": dict(dy=torch.zeros(M, N + 1)), "dy dtype": dict(dy=torch.zeros(M, N, dtype=torch.float16)),
    "dh_out dtype": dict(dh_out=torch.zeros(M, N, dtype=torch.float64)),
    "weight shape": dict(weight=torch.ones(N + 2)),
    "need_grad_weight without weight": dict(weight=None),
    "x_dtype int64": dict(x_dtype=torch.int64),
}


@pytest.mark.parametrize("case", list(LAYER_NORM_FWD_BAD))
@pytest.mark.parametrize("backend", cpu_backends("layer_norm"))
def test_layer_norm_fwd_rejects(backend, case):
    fwd, _ = _layer_norm_args(backend)
    op = backends.implementation("layer_norm", backend).fwd
    with pytest.raises(RuntimeError):
        op(**{**fwd, **LAYER_NORM_FWD_BAD[case]})


@pytest.mark.parametrize("case", list(LAYER_NORM_BWD_BAD))
@pytest.mark.parametrize("backend", cpu_backends("layer_norm"))
def test_layer_norm_bwd_rejects(backend, case):
    _, bwd = _layer_norm_args(backend)
    op = backends.implementation("layer_norm", backend).bwd
    op(**bwd)
    with pytest.raises(RuntimeError):
        op(**{**bwd, **LAYER_NORM_BWD_BAD[case]})


def test_dropout_uniform_rejects_an_index_range_past_2_63():
    if not backends.extension_available():
        pytest.skip("the C++ extension is not built")
    op = torch.ops.fusedreg.dropout_uniform
    like = torch.empty(0)
    start = 2**63 - 16
    ok = op(SEED, start, 15, like)  # the last index is 2^63 - 2: valid
    assert ok.shape == (15,) and ((ok >= 0) & (ok < 1)).all()
    for bad_start, count in ((start, 17), (2**63 - 1, 2), (0, -1), (-4, 8)):
        with pytest.raises(RuntimeError):
            op(SEED, bad_start, count, like)
    with pytest.raises(RuntimeError):
        op(torch.tensor(1.0), 0, 4, like)
