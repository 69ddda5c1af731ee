"""Per-call overhead at a small shape: each fusedreg functional and module against torch's
equivalent (torch's composite for the fused ops), forward, forward under no_grad, and
forward + backward; one thread; min of N calls, the pairs interleaved so that load from
other processes hits both sides alike.

    python benchmarks/overhead.py [--rows 4] [--cols 768] [--calls 300] [--backend auto]
    python benchmarks/overhead.py --crossover   # torch's norm vs the fused kernel, by size
    python benchmarks/overhead.py --batch-norm  # BatchNorm calls and modules at CNN shapes

``--crossover`` times torch's own ``layer_norm`` / ``rms_norm`` / ``batch_norm`` (and
``relu(batch_norm(x) + residual)``, torch's eager composite of ``batch_norm_act``) against
fusedreg's fused kernel (the cpu backend named explicitly) over a range of sizes, without and
with grad, in training and eval for BatchNorm: the measurement behind
``fusedreg.backends.AUTO_TORCH_BELOW`` (under auto, smaller calls with nothing to fuse are
torch's ops).

``--batch-norm`` times, at (2, 8), (4, 16, 8, 8), (1, 64, 7, 7), (8, 64, 14, 14) and
(32, 64, 56, 56) (``--bn-shapes`` to choose), ``F.batch_norm`` against torch's,
``nn.BatchNorm2d`` against torch's and ``BatchNormAct2d`` (relu, with a residual) against the
eager composite ``relu(torch.nn.BatchNorm2d(x) + residual)``, in training and eval, forward,
under no_grad and forward + backward, under the chosen backend (auto by default).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as TF

import fusedreg
from fusedreg import functional as F


def _cases(rows, cols, dtype=torch.float32):
    x = torch.randn(rows, cols, dtype=dtype)
    r = torch.randn(rows, cols, dtype=dtype)
    w, b = torch.randn(cols, dtype=dtype), torch.randn(cols, dtype=dtype)
    xg = x.clone().requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    tln, fln = torch.nn.LayerNorm(cols).to(dtype), fusedreg.nn.LayerNorm(cols).to(dtype)
    trms, frms = torch.nn.RMSNorm(cols).to(dtype), fusedreg.nn.RMSNorm(cols).to(dtype)
    tdrop, fdrop = torch.nn.Dropout(0.1), fusedreg.nn.Dropout(0.1)
    # name: (torch call, fusedreg call, inputs that need grads for fwd+bwd)
    return {
        "F.layer_norm": (lambda x, w, b: TF.layer_norm(x, (cols,), w, b),
                         lambda x, w, b: F.layer_norm(x, (cols,), w, b)),
        "F.rms_norm": (lambda x, w, b: TF.rms_norm(x, (cols,), w),
                       lambda x, w, b: F.rms_norm(x, (cols,), w)),
        "F.dropout": (lambda x, w, b: TF.dropout(x, 0.1), lambda x, w, b: F.dropout(x, 0.1)),
        "F.bias_dropout (+residual)": (lambda x, w, b: r + TF.dropout(x + b, 0.1),
                                       lambda x, w, b: F.bias_dropout(x, b, r, p=0.1)),
        "F.dropout_add_layer_norm": (
            lambda x, w, b: TF.layer_norm(r + TF.dropout(x, 0.1), (cols,), w, b),
            lambda x, w, b: F.dropout_add_layer_norm(x, r, w, b, p=0.1)),
        "nn.LayerNorm": (lambda x, w, b: tln(x), lambda x, w, b: fln(x)),
        "nn.RMSNorm": (lambda x, w, b: trms(x), lambda x, w, b: frms(x)),
        "nn.Dropout": (lambda x, w, b: tdrop(x), lambda x, w, b: fdrop(x)),
    }, (x, w, b), (xg, wg, bg)


_DENSE = {}


def _backward(y):
    """y.backward() of a fixed random gradient of y's shape and dtype, as training gives it (a
    dense tensor), not of ``.sum()`` (an expanded tensor of ones, for which some of torch's
    backwards take a slower path)."""
    g = _DENSE.get((y.shape, y.dtype))
    if g is None:
        g = _DENSE.setdefault((y.shape, y.dtype), torch.randn_like(y))
    y.backward(g)


def _min_time(fn, calls):
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _crossover_pair(tfn, ffn, args, mode, reps, rounds, no_grad=False):
    """(torch's, the fused call's) fastest time of ``f(*args)`` ("no_grad": the forward, inside
    ``torch.no_grad()`` when ``no_grad``; "fwd+bwd": forward and backward of a fixed random
    gradient), the two
    interleaved over ``rounds``, with the cpu backend named."""
    def run(f):
        if mode != "no_grad":
            return lambda: _backward(f(*args))
        if not no_grad:
            return lambda: f(*args)

        def ng():
            with torch.no_grad():
                f(*args)
        return ng
    t_torch = t_fused = float("inf")
    with fusedreg.use_backend("cpu"):
        for _ in range(rounds):
            t_torch = min(t_torch, _min_time(run(tfn), reps))
            t_fused = min(t_fused, _min_time(run(ffn), reps))
    return t_torch, t_fused


def measure(rows=4, cols=768, calls=300, rounds=5, dtype=torch.float32):
    cases, plain, grads = _cases(rows, cols, dtype)
    rows_out = []
    for name, (tfn, ffn) in cases.items():
        def fwd(f):
            return lambda: f(*plain)

        def nograd(f):
            def run():
                with torch.no_grad():
                    f(*plain)
            return run

        def fwdbwd(f):
            def run():
                _backward(f(*grads))
            return run

        for mode, wrap in (("fwd", fwd), ("no_grad", nograd), ("fwd+bwd", fwdbwd)):
            t_torch = t_fused = float("inf")
            for _ in range(rounds):  # interleaved: torch, fusedreg, torch, ...
                t_torch = min(t_torch, _min_time(wrap(tfn), calls // rounds))
                t_fused = min(t_fused, _min_time(wrap(ffn), calls // rounds))
            rows_out.append((name, mode, t_torch * 1e6, t_fused * 1e6, t_fused / t_torch))
    return rows_out


def crossover(calls=200, rounds=3, cols=(768, 4096),
              rows=(1, 2, 4, 8, 16, 32, 48, 64, 256, 1024), dtype=torch.float32):
    """Rows (norm, rows, cols, numel, mode, torch us, fused us, ratio): torch's op against the
    fused kernel of the cpu backend, each timed as in ``measure`` (min of N, interleaved).
    float16/bfloat16: layer_norm only (``AUTO_TORCH_BELOW["layer_norm_half"]``; rms_norm is
    fused at every size), x, weight and bias of that dtype."""
    out = []
    norms = ("layer_norm",) if dtype in (torch.float16, torch.bfloat16) else ("layer_norm", "rms_norm")
    for norm in norms:
        for n in cols:
            for m in rows:
                x, w, b = (torch.randn(m, n, dtype=dtype), torch.randn(n, dtype=dtype),
                           torch.randn(n, dtype=dtype))
                grads = tuple(t.clone().requires_grad_() for t in (x, w, b))
                if norm == "layer_norm":
                    def tfn(x, w, b):
                        return TF.layer_norm(x, (n,), w, b)

                    def ffn(x, w, b):
                        return F.layer_norm(x, (n,), w, b)
                else:
                    def tfn(x, w, b):
                        return TF.rms_norm(x, (n,), w)

                    def ffn(x, w, b):
                        return F.rms_norm(x, (n,), w)
                reps = max(5, min(calls, 20_000_000 // (m * n)) // rounds)
                for mode, args in (("no_grad", (x, w, b)), ("fwd+bwd", grads)):
                    t_torch, t_fused = _crossover_pair(tfn, ffn, args, mode, reps, rounds)
                    out.append((norm, m, n, m * n, mode, t_torch * 1e6, t_fused * 1e6,
                                t_fused / t_torch))
    return out


BN_SHAPES = ((2, 8), (4, 16, 8, 8), (1, 64, 7, 7), (8, 64, 14, 14), (32, 64, 56, 56))


def _bn_cases(shape, dtype=torch.float32):
    """name: (torch call, fusedreg call) for one input shape; each call takes (x, residual,
    weight, bias, training). Parameters and buffers in ``dtype`` (a model converted with
    ``.to(dtype)``)."""
    C = shape[1]
    rm, rv = torch.randn(C).to(dtype), (torch.rand(C) + 0.5).to(dtype)
    t2d, f2d = (torch.nn.BatchNorm2d(C), fusedreg.nn.BatchNorm2d(C)) if len(shape) == 4 else \
        (torch.nn.BatchNorm1d(C), fusedreg.nn.BatchNorm1d(C))
    t2d, f2d = t2d.to(dtype), f2d.to(dtype)
    fact = fusedreg.nn.BatchNormAct2d(C).to(dtype) if len(shape) == 4 else None

    def mod(m, *extra):
        def run(x, r, w, b, training):
            m.train(training)
            return m(x, *extra) if not extra else m(x, r)
        return run

    cases = {
        "F.batch_norm": (lambda x, r, w, b, t: TF.batch_norm(x, rm, rv, w, b, t),
                         lambda x, r, w, b, t: F.batch_norm(x, rm, rv, w, b, t)),
        "nn.BatchNorm": (mod(t2d), mod(f2d)),
    }
    if fact is not None:
        def composite(x, r, w, b, training):
            t2d.train(training)
            return torch.relu(t2d(x) + r)
        cases["BatchNormAct2d(relu, +res)"] = (composite, mod(fact, True))
    return cases


def measure_batch_norm(shapes=BN_SHAPES, calls=200, rounds=5, dtype=torch.float32):
    """Rows (call, shape, train/eval, mode, torch us, fusedreg us, ratio), timed as
    ``measure`` (min of N, interleaved) with a per-size number of calls."""
    out = []
    for shape in shapes:
        x, r = (torch.randn(shape) + 1.0).to(dtype), torch.randn(shape).to(dtype)
        C = shape[1]
        w, b = (torch.rand(C) + 0.5).to(dtype), torch.randn(C).to(dtype)
        plain = (x, r, w, b)
        grads = tuple(t.clone().requires_grad_() for t in plain)
        reps = max(5, min(calls, 50_000_000 // x.numel()) // rounds)
        for name, (tfn, ffn) in _bn_cases(shape, dtype).items():
            for training in (True, False):
                for mode in ("fwd", "no_grad", "fwd+bwd"):
                    def run(f, mode=mode, training=training):
                        if mode == "fwd":
                            return lambda: f(*plain, training)
                        if mode == "no_grad":
                            def ng():
                                with torch.no_grad():
                                    f(*plain, training)
                            return ng
                        return lambda: _backward(f(*grads, training))
                    t_torch = t_fused = float("inf")
                    for _ in range(rounds):
                        t_torch = min(t_torch, _min_time(run(tfn), reps))
                        t_fused = min(t_fused, _min_time(run(ffn), reps))
                    out.append((name, shape, "train" if training else "eval", mode,
                                t_torch * 1e6, t_fused * 1e6, t_fused / t_torch))
    return out


BN_CROSSOVER_SHAPES = ((4, 16), (4, 16, 4, 4), (4, 16, 8, 8), (8, 32, 8, 8), (8, 64, 8, 8),
                       (8, 64, 14, 14), (16, 64, 16, 16), (16, 64, 28, 28), (32, 64, 28, 28),
                       (32, 64, 56, 56))


def crossover_batch_norm(calls=200, rounds=3, shapes=BN_CROSSOVER_SHAPES, dtype=torch.float32,
                         activation="relu", channels_last=False):
    """Rows (table, shape, numel, mode, torch us, fused us, ratio) for the BatchNorm entries
    of ``AUTO_TORCH_BELOW``: torch.batch_norm against the cpu backend's fused call, plain
    ("batch_norm") and with a residual and relu ("batch_norm_act", against
    ``relu(batch_norm(x) + r)``), in training and eval ("..._eval"). float16/bfloat16
    (the "..._bf16" / "..._f16" entries): x, parameters and running stats all of that dtype, as in a model
    converted with ``.to(dtype)``. ``activation`` "silu", "gelu" or "gelu_tanh": the fused
    rows are that activation without a residual ("batch_norm_<activation>", against
    ``act(batch_norm(x))``, as timm's ``BatchNormAct2d`` runs it), the plain rows left out.
    ``channels_last``: the 4-d inputs (and residuals) in channels_last memory format."""
    out = []
    suffix = {torch.bfloat16: "_bf16", torch.float16: "_f16"}.get(dtype, "")
    for shape in shapes:
        C = shape[1]
        x, r = (torch.randn(shape) + 1.0).to(dtype), torch.randn(shape).to(dtype)
        if channels_last and x.dim() == 4:
            x, r = (t.contiguous(memory_format=torch.channels_last) for t in (x, r))
        w, b = (torch.rand(C) + 0.5).to(dtype), torch.randn(C).to(dtype)
        rm, rv = torch.randn(C).to(dtype), (torch.rand(C) + 0.5).to(dtype)
        reps = max(5, min(calls, 20_000_000 // x.numel()) // rounds)
        for fused in (False, True) if activation == "relu" else (True,):
            for training in (True, False):
                name = "batch_norm_act" if activation == "relu" else f"batch_norm_{activation}"
                table = (name if fused else "batch_norm") + ("" if training else "_eval") + suffix
                if fused and activation != "relu":
                    act = F._BN_TORCH_ACTIVATIONS[activation]  # torch's silu / gelu, as auto's

                    def tfn(x, r, w, b, training=training, act=act):
                        return act(TF.batch_norm(x, rm, rv, w, b, training))

                    def ffn(x, r, w, b, training=training):
                        return F.batch_norm_act(x, rm, rv, w, b, training, activation=activation)
                elif fused:
                    def tfn(x, r, w, b, training=training):
                        return torch.relu(TF.batch_norm(x, rm, rv, w, b, training) + r)

                    def ffn(x, r, w, b, training=training):
                        return F.batch_norm_act(x, rm, rv, w, b, training, activation="relu",
                                                residual=r)
                else:
                    def tfn(x, r, w, b, training=training):
                        return TF.batch_norm(x, rm, rv, w, b, training)

                    def ffn(x, r, w, b, training=training):
                        return F.batch_norm(x, rm, rv, w, b, training)
                plain = (x, r, w, b)
                grads = tuple(t.clone().requires_grad_() for t in plain)
                for mode, args in (("no_grad", plain), ("fwd+bwd", grads)):
                    t_torch, t_fused = _crossover_pair(tfn, ffn, args, mode, reps, rounds,
                                                       no_grad=True)
                    out.append((table, shape, x.numel(), mode, t_torch * 1e6, t_fused * 1e6,
                                t_fused / t_torch))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--cols", type=int, default=768)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--crossover", action="store_true",
                    help="torch's layer_norm/rms_norm/batch_norm against the fused cpu kernel, "
                         "by size")
    ap.add_argument("--batch-norm", action="store_true",
                    help="BatchNorm functional and modules against torch's at CNN shapes")
    ap.add_argument("--bn-shapes", default=None,
                    help="with --batch-norm: shapes as 2x8,4x16x8x8,... (default: the list above)")
    ap.add_argument("--only", default=None, choices=("norms", "batch_norm"),
                    help="with --crossover: only the norms' rows or only BatchNorm's")
    ap.add_argument("--bn-activation", default="relu",
                    choices=("relu", "silu", "gelu", "gelu_tanh"),
                    help="with --crossover: the fused BatchNorm rows' activation (relu: with a "
                         "residual, and the plain rows; the others: without)")
    ap.add_argument("--channels-last", action="store_true",
                    help="with --crossover: BatchNorm's 4-d inputs in channels_last format")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                    help="the per-call rows' dtype (inputs, module parameters and buffers; "
                         "with --batch-norm and --crossover's BatchNorm rows too)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.batch_norm:
        fusedreg.set_backend(args.backend)
        shapes = BN_SHAPES if args.bn_shapes is None else tuple(
            tuple(int(d) for d in s.split("x")) for s in args.bn_shapes.split(","))
        dtype = getattr(torch, args.dtype)
        measure_batch_norm(shapes=shapes[:1], calls=10, rounds=1, dtype=dtype)  # warm up
        print(f"BatchNorm per-call time, {args.dtype}, {args.threads} thread(s), backend {args.backend}, "
              f"torch {torch.__version__}; min of N calls, interleaved; ratio = fusedreg / torch")
        print(f"{'call':28s} {'shape':>14s} {'':5s} {'mode':8s} {'torch us':>9s} "
              f"{'fusedreg us':>12s} {'ratio':>6s}")
        for name, shape, tr, mode, t, f, ratio in measure_batch_norm(shapes=shapes,
                                                                     calls=args.calls,
                                                                     dtype=dtype):
            print(f"{name:28s} {'x'.join(map(str, shape)):>14s} {tr:5s} {mode:8s} {t:9.1f} "
                  f"{f:12.1f} {ratio:6.2f}")
        return
    if args.crossover and args.only != "norms":
        print(f"torch's batch_norm (and relu(batch_norm(x) + r)) vs the fused cpu kernel, "
              f"{args.dtype}, {args.threads} thread(s), torch {torch.__version__}; min of N "
              f"calls, interleaved; ratio = fused / torch")
        print(f"{'table':25s} {'shape':>14s} {'numel':>9s} {'mode':8s} {'torch us':>9s} "
              f"{'fused us':>9s} {'ratio':>6s}")
        for table, shape, numel, mode, t, f, ratio in crossover_batch_norm(
                dtype=getattr(torch, args.dtype), activation=args.bn_activation,
                channels_last=args.channels_last):
            print(f"{table:25s} {'x'.join(map(str, shape)):>14s} {numel:9d} {mode:8s} {t:9.1f} "
                  f"{f:9.1f} {ratio:6.2f}")
        if args.only == "batch_norm":
            return
    if args.crossover:
        print(f"torch's norm vs the fused cpu kernel, {args.dtype}, {args.threads} thread(s), "
              f"torch {torch.__version__}; min of N calls, interleaved; ratio = fused / torch")
        print(f"{'norm':10s} {'shape':>12s} {'numel':>9s} {'mode':8s} {'torch us':>9s} "
              f"{'fused us':>9s} {'ratio':>6s}")
        for norm, m, n, numel, mode, t, f, ratio in crossover(dtype=getattr(torch, args.dtype)):
            print(f"{norm:10s} {f'{m}x{n}':>12s} {numel:9d} {mode:8s} {t:9.1f} {f:9.1f} {ratio:6.2f}")
        return
    fusedreg.set_backend(args.backend)
    dtype = getattr(torch, args.dtype)
    for _ in range(2):  # warm up caches and lazy initialisation
        measure(args.rows, args.cols, calls=10, rounds=1, dtype=dtype)
    rows = measure(args.rows, args.cols, args.calls, dtype=dtype)
    print(f"per-call time at ({args.rows}, {args.cols}) {args.dtype}, {args.threads} thread(s), backend "
          f"{args.backend}, torch {torch.__version__}; min of {args.calls} calls, interleaved")
    print(f"{'call':28s} {'mode':8s} {'torch us':>9s} {'fusedreg us':>12s} {'ratio':>6s}")
    for name, mode, t, f, ratio in rows:
        print(f"{name:28s} {mode:8s} {t:9.1f} {f:12.1f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
