"""Benchmark of the fused optimizer steps against torch's optimizers (and apex when installed).

Cases: one big tensor (64M elements on a GPU, 16M on a CPU) and a GPT-2-small-like list of
148 tensors (124M parameters on a GPU; on a CPU the same structure scaled to ~16M). Each
impl steps the same parameters (of each --dtypes dtype) with fixed gradients. Minimal bytes
per parameter: AdamW reads p, g, m, v and writes p, m, v (28 B in fp32, with or without
l1); SGD with momentum reads p, g, buf and writes p, buf (20 B). With float16/bfloat16
parameters torch keeps the state in the parameters' dtype (AdamW 14 B, SGD 10 B) and
fusedreg by default in float32 (22 B and 14 B: more bytes, more accurate moments); the
rows "fusedreg[...] param-dtype state" are fusedreg with ``state_dtype="param"``, torch's
bytes. The limit of a pass whose arrays differ in width is measured for arrays of their
average width (the same bytes in all).

Rows per case: fusedreg AdamW (l1 = 0 and l1 > 0), torch AdamW (foreach, fused), torch
AdamW fused followed by the soft-threshold in torch ops (the composite that l1 replaces),
apex FusedAdam (GPU, if installed), fusedreg SGD and torch SGD (foreach, fused), momentum 0.9.
Each step is an in-place pass (fusedreg/bench/limits.py): AdamW reads 4 arrays and rewrites
3 of them, SGD with momentum reads 3 and rewrites 2; the limit is that pattern's, measured
for arrays of the case's total parameter count: one buffer per array, while a step walks 148
tensors of each — a fair limit for the list, since fusedreg's step over one tensor of 15.8M
parameters takes the same time as over the 148 (docs/design.md, "Optimizers"). The in-place
limit's probes include ones that software-prefetch, as the optimizer kernels do (fusedreg/
bench/limits.py): without them the optimizers beat the limit by up to 1.5x at 15.8M.

--sweep: model-like tensor lists from 10 to 10^7 parameters (10^8 with --sweep-max): a small
MLP (weight and bias per layer) below 10^4, GPT-2-like lists (embeddings, 12 tensors per
block) above.
"""
from __future__ import annotations

import torch

from .. import backends
from ..optim import SGD, AdamW
from .harness import Context, Row
from .limits import Pattern

OP = "optim"

LR, L1 = 1e-4, 1e-3


def gpt2_shapes(d: int, n_layer: int, vocab: int, n_ctx: int) -> list[tuple[int, ...]]:
    """The parameter shapes of GPT-2 (wte, wpe, 12 tensors per block, final LayerNorm)."""
    shapes = [(vocab, d), (n_ctx, d)]
    for _ in range(n_layer):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
                   (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def mlp_shapes(target: int) -> list[tuple[int, ...]]:
    """A 2-layer MLP (in -> hidden -> 1) of about ``target`` parameters."""
    h = max(1, int((target / 2) ** 0.5))
    return [(h, h), (h,), (1, h), (1,)]


def sweep_shapes(target: int) -> list[tuple[int, ...]]:
    """A realistic tensor list of about ``target`` parameters."""
    if target < 10**4:
        return mlp_shapes(target)
    n_layer = 2 if target < 10**6 else (6 if target < 10**7 else 12)
    # GPT-2 layout with vocab = 8 d and n_ctx = d: about (12 n_layer + 9) d^2 parameters
    d = max(8, int((target / (12 * n_layer + 9)) ** 0.5) // 8 * 8)
    return gpt2_shapes(d, n_layer, 8 * d, d)


SWEEP = [10, 100, 10**3, 10**4, 10**5, 10**6, 10**7, 10**8]


def _sweep_cases(ctx: Context):
    top = 10**8 if (ctx.sweep_max or ctx.device.type == "cuda") else 10**7
    for target in (t for t in SWEEP if t <= top):
        shapes = sweep_shapes(target)
        n = sum(torch.Size(s).numel() for s in shapes)
        yield f"{len(shapes)} tensors {n:,} params", shapes


def _cases(ctx: Context):
    if ctx.sweep:
        return list(_sweep_cases(ctx))
    gpu = ctx.device.type == "cuda"
    big = 64 * 2**20 if gpu else 16 * 2**20
    if ctx.sizes:  # --sizes: the single tensor's element count (or shape); the list stays
        s = ctx.sizes[0]
        big = s if isinstance(s, int) else torch.Size(s).numel()
    if ctx.quick:
        big //= 4
    # GPT-2 small: d=768, vocab 50257 (124M). CPU: d=288, vocab 12288 (~15.7M), same 148 tensors.
    gpt = gpt2_shapes(768, 12, 50257, 1024) if gpu else gpt2_shapes(288, 12, 12288, 1024)
    label = f"{big / 2**20:.0f}M" if big % 2**20 == 0 else f"{big:,}"
    return [(f"1 tensor {label}", [(big,)]),
            (f"gpt2-like {len(gpt)} tensors {sum(torch.Size(s).numel() for s in gpt) / 1e6:.1f}M", gpt)]


def _params(shapes, device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    ps = []
    for s in shapes:
        p = (torch.randn(s, generator=gen, dtype=torch.float32) * 0.02).to(device, dtype).requires_grad_()
        p.grad = (torch.randn(s, generator=gen, dtype=torch.float32) * 1e-3).to(device, dtype)
        ps.append(p)
    return ps


def _soft_threshold_(params, thr):
    with torch.no_grad():
        for p in params:
            p.copy_(torch.sign(p) * torch.clamp(p.abs() - thr, min=0))


def _candidates(ctx: Context, ps):
    """(op, impl, step function, bytes per parameter, arrays read, arrays written) for every
    available candidate."""
    dev = ctx.device
    backend = backends.resolve("adam", dev)
    fr = f"fusedreg[{backend}]"
    half = ps[0].dtype in (torch.float16, torch.bfloat16)
    w = ps[0].element_size()          # parameter and gradient bytes
    sw = 4 if half else w             # fusedreg's default state bytes (float32 for 16-bit)
    adam_fr, adam_torch = 3 * w + 4 * sw, 7 * w   # p, g, m, v read; p, m, v written
    sgd_fr, sgd_torch = 3 * w + 2 * sw, 5 * w     # p, g, buf read; p, buf written
    out = []

    def opt(factory):
        o = factory()
        return o.step

    out.append(("adamw", fr, opt(lambda: AdamW(ps, lr=LR)), adam_fr, 4, 3))
    if half:
        out.append(("adamw", f"{fr} param-dtype state",
                    opt(lambda: AdamW(ps, lr=LR, state_dtype="param")), adam_torch, 4, 3))
    out.append(("adamw", "torch foreach", opt(lambda: torch.optim.AdamW(ps, lr=LR, foreach=True)), adam_torch, 4, 3))
    out.append(("adamw", "torch fused", opt(lambda: torch.optim.AdamW(ps, lr=LR, fused=True)), adam_torch, 4, 3))
    try:
        from apex.optimizers import FusedAdam  # noqa: F401

        if dev.type == "cuda":
            out.append(("adamw", "apex FusedAdam", opt(lambda: FusedAdam(ps, lr=LR, adam_w_mode=True)), adam_torch, 4, 3))
    except ImportError:
        pass
    out.append(("adamw_l1", fr, opt(lambda: AdamW(ps, lr=LR, l1=L1)), adam_fr, 4, 3))
    tf = torch.optim.AdamW(ps, lr=LR, fused=True)

    def composite():
        tf.step()
        _soft_threshold_(ps, LR * L1)

    out.append(("adamw_l1", "torch fused + soft-threshold", composite, adam_torch, 4, 3))
    out.append(("sgd_momentum", fr, opt(lambda: SGD(ps, lr=LR, momentum=0.9)), sgd_fr, 3, 2))
    if half:
        out.append(("sgd_momentum", f"{fr} param-dtype state",
                    opt(lambda: SGD(ps, lr=LR, momentum=0.9, state_dtype="param")), sgd_torch, 3, 2))
    out.append(("sgd_momentum", "torch foreach",
                opt(lambda: torch.optim.SGD(ps, lr=LR, momentum=0.9, foreach=True)), sgd_torch, 3, 2))
    out.append(("sgd_momentum", "torch fused",
                opt(lambda: torch.optim.SGD(ps, lr=LR, momentum=0.9, fused=True)), sgd_torch, 3, 2))
    return out


def benchmark(ctx: Context) -> list[Row]:
    rows = []
    for case, shapes in _cases(ctx):
        for dtype in ctx.dtypes:
            if dtype not in (torch.float32, torch.float16, torch.bfloat16):
                continue  # float64 optimizers are not a target
            ps = _params(shapes, ctx.device, dtype)
            n = sum(p.numel() for p in ps)
            for op, impl, step, bpp, reads, writes in _candidates(ctx, ps):
                if not ctx.wants(impl, "step") or ctx.skip_case(op, case):
                    continue
                try:
                    step()  # allocate state outside the timing
                    t = ctx.time(step)
                except (RuntimeError, ValueError) as e:  # e.g. a baseline this torch lacks
                    print(f"[bench optim] {op} {case} {impl} skipped: {e}".splitlines()[0])
                    continue
                # arrays of the average width: the pass's bytes, in reads + writes arrays
                rows.append(ctx.row(op, case, dtype, impl, "step", t, n * bpp,
                                    pattern=Pattern("inplace", reads, writes),
                                    array_bytes=n * bpp // (reads + writes)))
            del ps
    return rows
