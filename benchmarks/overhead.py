"""Per-call overhead at a small shape: each fusedreg functional and module against torch's
equivalent (torch's composite for the fused ops), forward, forward under no_grad, and
forward + backward; one thread; min of N calls, the pairs interleaved so that load from
other processes hits both sides alike.

    python benchmarks/overhead.py [--rows 4] [--cols 768] [--calls 300] [--backend auto]
    python benchmarks/overhead.py --crossover   # torch's norm vs the fused kernel, by size

``--crossover`` times torch's own ``layer_norm`` / ``rms_norm`` against fusedreg's fused kernel
(the cpu backend named explicitly) over a range of sizes, without and with grad: the measurement
behind ``fusedreg.backends.AUTO_TORCH_BELOW`` (under auto, smaller plain norms are torch's op).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as TF

import fusedreg
from fusedreg import functional as F


def _cases(rows, cols):
    x = torch.randn(rows, cols)
    r = torch.randn(rows, cols)
    w, b = torch.randn(cols), torch.randn(cols)
    xg = x.clone().requires_grad_()
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    tln, fln = torch.nn.LayerNorm(cols), fusedreg.nn.LayerNorm(cols)
    trms, frms = torch.nn.RMSNorm(cols), fusedreg.nn.RMSNorm(cols)
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


def _min_time(fn, calls):
    best = float("inf")
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(rows=4, cols=768, calls=300, rounds=5):
    cases, plain, grads = _cases(rows, cols)
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
                f(*grads).sum().backward()
            return run

        for mode, wrap in (("fwd", fwd), ("no_grad", nograd), ("fwd+bwd", fwdbwd)):
            t_torch = t_fused = float("inf")
            for _ in range(rounds):  # interleaved: torch, fusedreg, torch, ...
                t_torch = min(t_torch, _min_time(wrap(tfn), calls // rounds))
                t_fused = min(t_fused, _min_time(wrap(ffn), calls // rounds))
            rows_out.append((name, mode, t_torch * 1e6, t_fused * 1e6, t_fused / t_torch))
    return rows_out


def crossover(calls=200, rounds=3, cols=(768, 4096), rows=(1, 2, 4, 8, 16, 64, 256, 1024)):
    """Rows (norm, rows, cols, numel, mode, torch us, fused us, ratio): torch's op against the
    fused kernel of the cpu backend, each timed as in ``measure`` (min of N, interleaved)."""
    out = []
    for norm in ("layer_norm", "rms_norm"):
        for n in cols:
            for m in rows:
                x, w, b = torch.randn(m, n), torch.randn(n), torch.randn(n)
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
                    def run(f, args=args, mode=mode):
                        if mode == "no_grad":
                            return lambda: f(*args)
                        return lambda: f(*args).sum().backward()
                    t_torch = t_fused = float("inf")
                    with fusedreg.use_backend("cpu"):
                        for _ in range(rounds):
                            t_torch = min(t_torch, _min_time(run(tfn), reps))
                            t_fused = min(t_fused, _min_time(run(ffn), reps))
                    out.append((norm, m, n, m * n, mode, t_torch * 1e6, t_fused * 1e6,
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
                    help="torch's layer_norm/rms_norm against the fused cpu kernel, by size")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.crossover:
        print(f"torch's norm vs the fused cpu kernel, fp32, {args.threads} thread(s), torch "
              f"{torch.__version__}; min of N calls, interleaved; ratio = fused / torch")
        print(f"{'norm':10s} {'shape':>12s} {'numel':>9s} {'mode':8s} {'torch us':>9s} "
              f"{'fused us':>9s} {'ratio':>6s}")
        for norm, m, n, numel, mode, t, f, ratio in crossover():
            print(f"{norm:10s} {f'{m}x{n}':>12s} {numel:9d} {mode:8s} {t:9.1f} {f:9.1f} {ratio:6.2f}")
        return
    fusedreg.set_backend(args.backend)
    for _ in range(2):  # warm up caches and lazy initialisation
        measure(args.rows, args.cols, calls=10, rounds=1)
    rows = measure(args.rows, args.cols, args.calls)
    print(f"per-call time at ({args.rows}, {args.cols}) fp32, {args.threads} thread(s), backend "
          f"{args.backend}, torch {torch.__version__}; min of {args.calls} calls, interleaved")
    print(f"{'call':28s} {'mode':8s} {'torch us':>9s} {'fusedreg us':>12s} {'ratio':>6s}")
    for name, mode, t, f, ratio in rows:
        print(f"{name:28s} {mode:8s} {t:9.1f} {f:12.1f} {ratio:6.2f}")


if __name__ == "__main__":
    main()
