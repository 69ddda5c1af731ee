"""Backend dispatch: which implementation serves a call. One registry, one choice.

The registry maps ``(op, backend)`` to the implementation that ``fusedreg/ops/<op>.py``
registered (``register``); every caller — the functional API, the autograd Functions, the
optimizers, the benchmarks and the tests — asks it through the public functions below
(``implementation``, ``implemented_backends``, ``resolve``) and keeps no table of its own.

The choice: ``set_backend`` (or the environment variable ``FUSEDREG_BACKEND`` at import)
sets the process-wide default; ``use_backend`` overrides it inside a block, for the current
thread or asyncio task only (a ``contextvars.ContextVar``), so that blocks in two threads
never see each other's choice and the default is what it was once both have left. With
``auto`` a call gets, per op and device type, the first backend of ``AUTO`` that implements
the op and can run here — never ``reference`` when a fused backend is built.
"""
from __future__ import annotations

import contextlib
import contextvars
import importlib
import os
from typing import Any

import torch

__all__ = [
    "AUTO", "AUTO_TORCH_BELOW", "BACKENDS", "BackendUnavailableError", "auto_torch_limits",
    "available_backends", "backend_status", "extension_available", "get_backend",
    "implementation", "implemented_backends", "register", "registered_backends", "resolve",
    "resolve_type", "set_backend", "triton_available", "triton_interpreter", "use_backend",
    "why_unusable",
]

BACKENDS = ("reference", "cpu", "triton", "cuda")
_CHOICES = ("auto",) + BACKENDS

# auto: the preference order per op and device type. On CPU the C++ kernels serve every op.
# On CUDA the order is cuda, then triton, until GPU measurements justify per-op choices
# (docs/design.md, "The auto table").
_DEFAULT_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
AUTO: dict[str, dict[str, tuple[str, ...]]] = {
    op: dict(_DEFAULT_ORDER) for op in ("bias_dropout", "layer_norm", "adam", "sgd", "lion", "batch_norm")
}

# auto and small plain norms: a ``layer_norm`` / ``rms_norm`` call with no dropout and no
# residual (nothing to fuse) whose input has fewer elements than the limit is served by torch's
# own ATen op, faster there than the fused backend's call (docs/design.md, "Backends and
# dispatch").
# Per norm and device type: (limit without grad, limit with grad); 0: never. Measured on the
# 2-core AMD EPYC machine, fp32, one thread, the fused call of a plain norm made from C++
# (fusedreg._C.torch_norm: the cpu kernel, with grad the C++ autograd node), median of 15
# shuffled interleaved rounds (and ``python benchmarks/overhead.py --crossover``); time ratio
# fused / torch: layer_norm without grad 1.08x at 1x768, 1.02x at 4x768, 0.95x at 8x768 (6144
# elements), 0.88x at 16x768, 0.65-0.80x from 24K with the cpu backend named; under auto, whose
# fused call from the limit up takes a second C++ call (functional._torch_small_norm), 1.07x
# at 4x768, 1.03x at 6x768, 1.01x at 8x768, 0.93x at 16x768 (two threads: 1.00x at 4x768,
# 0.80-0.82x at 6-8x768), hence torch's op below 2**13; with grad the
# forward 1.57x at 1x768, 1.13x at 16x768, 1.04x at 24x768, 0.97-0.99x at 24576 elements
# (32x768, 6x4096), 0.88x at 48x768, 0.68-0.83x from 49K (forward + backward 1.10x, 1.03x,
# 1.00x, 0.93-0.95x, 0.82-0.93x); at two threads (the default here) torch's op gains more
# from the second core with grad: forward + backward 1.14x at 48x768 and 64x768, 1.05x at
# 128x768, 1.04x at 32x4096 (131K), 0.97x at 256x768 (196K), 0.86x at 64x4096 (262K),
# hence torch's op below 2**18 with grad (without grad two threads gave 0.93x at 4x768 and
# 0.69-0.85x from 48x768). rms_norm (torch's is a composite of several ops): the fused call
# 0.44-0.52x at 1..64x768 without grad, forward 0.51x and forward + backward 0.50x at 1x768
# (0.27-0.51x up to 64x4096; at two threads 0.39-0.52x to 256x768): never.
# BatchNorm (CPU, fp32/fp64, no dropout): "batch_norm" is a plain call in training,
# "batch_norm_act" one with a residual and/or relu (torch's composite: ``torch.batch_norm``,
# ``add_``, ``relu_``), "..._eval" the same in eval. Since a training call without dropout is
# one C++ autograd node (``fusedreg._C.batch_norm_train``: kernels, running-stat update,
# backward) and a plain eval call without grad one C++ call (``batch_norm_eval``), the fused
# call's fixed cost is a few us more than torch's at one thread and less at two (where torch's
# own call costs 13-17 us at 64-4096 elements). ``overhead.py --crossover --only batch_norm``,
# 2026-12-06, quiet machine, fused / torch: training, one thread, 1.15-1.47x at 64-1024
# elements, 0.81x (0.86x with grad) at 4096, 0.22-0.57x from 16K; two threads 0.46-0.95x at
# every size; act the same from 1024 (0.93-1.00x there at one thread), hence torch's op below
# 2**12 with and without grad. Eval plain without grad, one thread, 1.22-1.32x up to 4096,
# 1.01x at 16K, 0.86x at 32K, 0.84x at 100K; two threads 0.80-0.92x except 1.11x at 32K:
# hence 2**16. Re-measured 2026-12-07 with the backward of a dense random gradient (the tool
# had timed .sum()'s, an expanded gradient for which torch's backward takes a slower path):
# training with grad 1.05 / 1.08 at 4096 (one / two threads), 0.83 / 0.95 at 16K, hence 2**13
# both ways; eval plain with grad (the C++ node in eval since then) 1.32-1.36 up to 32K, 1.11
# / 1.22 at 100K, 1.02 / 1.03 at 262K, 0.69 / 0.74 at 800K: 2**19; the act call with grad 0.95
# at 1024, 0.90 at 4096 (2**12 kept); the eval act call with grad 1.13 / 1.17 at 262K, 0.74-0.78
# at 800K (2**20 kept), without grad below 262K as before. Re-measured again the same day
# after the eval call (one C++ call, now with a residual and activation too, its float32
# vectors made in one loop) and the node's half-precision weights (fused / torch, one / two
# threads): training no grad 0.83 / 0.84 at 4096, 1.16 / 1.00 at 1024 (2**12); act no grad
# 0.95 / 0.86 at 1024, with grad 0.96 / 0.95 at 1024, but the modules at one thread
# (overhead.py --batch-norm) had BatchNormAct2d at (1, 64, 7, 7) (3136 elements, 49 a
# channel) 1.11-1.17x fused: 2**12 kept; eval no grad 0.96 / 0.83 at 64, 0.95 / 0.84 at 1024
# and below 1.0 at every size, F.batch_norm at (2, 8) 1.06x (4.6 against 4.4 us): 2**10;
# with grad 1.01 / 1.04 at 262K, 0.72 / 0.85 at 800K (2**19 kept); eval act without grad 0.77
# / 0.68 at 64 and below 1.0 at every size (never torch's), with grad 0.92-0.95 / 0.84-0.95
# to 16K, 0.90 / 0.91 at 100K, but BatchNormAct2d 1.01-1.06x at (4, 16, 8, 8) and (1, 64, 7,
# 7), 0.91x at (8, 64, 14, 14): 2**14.
# a limit no tensor reaches: torch's ops at every size
EVERY_SIZE = 1 << 62

# Where the crossover depends on the thread count, an entry has "cpu:1", the limits when torch
# runs one thread, beside "cpu", those for more (table_limits). The fused kernels split a
# small call's rows over the threads with less gain than torch's ops: re-measured 2026-12-07
# on the Intel Xeon VM after the half-precision fused call moved to C++ as float32's
# (overhead.py --crossover --only norms, fused / torch, min of interleaved calls; the
# machine's run-to-run spread is about +-0.1). float32 layer_norm, two threads, no grad 1.32
# at 32x768, 1.38-1.41 at 8x4096 (32K), 1.00-1.04 at 36-49K, 0.85-0.96 at 65K, 0.75-0.93 from
# 131K: hence 2**16; with grad 1.13-1.37 at 32-65K, 1.04-1.20 at 131K, 1.06-1.16 at 196K,
# 0.82-1.04 at 262K, 0.74-1.06 at 393-786K, 0.77 at 1M: 2**18 kept (the one-thread limits as
# measured on the AMD machine above; the Intel VM agrees: no grad 0.99 at 8x768, 0.91 at
# 16x768; with grad 0.94-1.07 from 196K). Measured again after the small calls moved to the
# calling thread (csrc/cpu/layer_norm.cpp: kParallelMinElements), two threads
# (benchmarks/results/cpu/intel-xeon/norm_crossover.txt and the run before it): no grad
# 0.87-0.97 up to 16x768, 1.05-1.23 at 24K-49K, 0.75-0.99 from 65K; with grad 1.00-1.55 at
# 36K-196K, 0.82-1.00 at 262K, 0.91 at 786K. float16/bfloat16: see "layer_norm_half".
AUTO_TORCH_BELOW: dict[str, dict[str, tuple[int, int]]] = {
    "layer_norm": {"cpu": (1 << 16, 1 << 18), "cpu:1": (1 << 13, 1 << 18)},
    "rms_norm": {"cpu": (0, 0)},
    # float16/bfloat16 x (outside CPU autocast), re-measured 2026-12-07 after the half forwards
    # read their rows in place (overhead.py --crossover --only norms --dtype bfloat16 / float16,
    # quiet machine, fused / torch): one thread, no grad 1.04 / 1.23 at 32x768, 0.89-0.94 from
    # 48-64x768, 0.49-0.61 from 256x768; with grad 0.90 / 1.04 at 32x768, 0.60-0.88 from
    # 256x768; two threads, no grad 1.19-1.34 at 64x768 and 1.09-1.32 at 16x4096 (65K), 0.80 /
    # 0.99 at 32x4096 (131K), 0.57-0.79 from 256x768 (196K); with grad 1.03-1.22 at 65K, 0.92 /
    # 1.05 at 131K, 0.82 / 0.95 at 196K: hence 2**17 both ways (it was 2**19, measured with
    # the copy-through rows). With grad timed again with the backward of a dense random
    # gradient (the rows above: of .sum()): bf16 / fp16 one thread 0.90 / 1.22 at 16K, 0.63 /
    # 0.82 at 131K; two threads 0.99 / 1.23 at 65K, 0.87 / 1.03 at 131K, 0.67 / 0.84 at 262K.
    # float32's 2**18 with grad holds likewise (two threads 1.29 at 256x768, 0.74 at 262K).
    # Re-measured 2026-12-07 on the Intel Xeon VM with the fused call from C++ (it had been the
    # Python path's, about 6 us more a call): one thread, bf16 / fp16, no grad 0.93 / 1.03 at
    # 8x768, 0.80 / 0.91 at 16x768, 0.90 / 1.19 at 4x4096 (16K), 0.68 / 0.74 at 32x768 (24K),
    # 0.55-0.65 from 48x768; with grad 0.97 / 1.01 at 16x768, 0.98 / 1.03 at 4x4096, 0.84 /
    # 0.87 at 32x768, 0.60-0.92 from 48x768: hence 3 * 2**13 at one thread; two threads, no
    # grad 0.94-1.25 up to 16x4096 (65K), 0.95 / 0.86 at 32x4096 (131K), 0.55-0.79 from
    # 48x4096; with grad 0.96-1.19 to 65K, 0.94 / 1.06 at 131K, 0.64-0.88 from 196K: 2**17 kept.
    "layer_norm_half": {"cpu": (1 << 17, 1 << 17), "cpu:1": (3 << 13, 3 << 13)},
    "batch_norm": {"cpu": (1 << 12, 1 << 13)},
    "batch_norm_eval": {"cpu": (1 << 10, 1 << 19)},
    "batch_norm_act": {"cpu": (1 << 12, 1 << 12)},
    "batch_norm_act_eval": {"cpu": (0, 1 << 14)},
    # bfloat16 / float16 x (parameters and buffers of its dtype or float32): torch's
    # half-precision batch_norm and the fused kernels differ by dtype, so each has its limits
    # (overhead.py --crossover --only batch_norm --dtype bfloat16 / float16, 2026-12-07, vectors
    # of x's dtype — a model converted with .to(dtype) —, fused / torch, one / two threads; with
    # grad the backward of a dense random gradient). bfloat16: training no grad 1.19 / 1.07 at
    # 4096, 0.99 / 0.99 at 16K; with grad 1.32 / 1.75 at 100K, 0.96 / 1.28 at 262K, 0.73 / 0.89
    # at 800K; eval no grad 1.20 / 1.45 at 32K, 0.84 / 1.07 at 100K, 0.58 / 0.76 at 262K; with
    # grad 1.00 / 1.31 at 262K, 0.78 / 0.94 at 800K; relu + residual training no grad 0.95 / 0.88
    # at 4096; with grad 0.86 / 1.03 at 262K, 0.73 / 0.82 at 800K; eval no grad 0.94 / 1.25 at
    # 100K, 0.58 / 0.77 at 262K; with grad 0.89 / 1.03 at 262K. float16: training no grad 1.04 /
    # 1.05 at 100K, 0.88 / 0.91 at 262K; with grad 1.13 / 1.43 at 262K, 0.89 / 1.06 at 800K, 0.94
    # / 0.90 at 1.6M; eval no grad 1.05 / 1.29 at 262K, 0.91 / 1.25 at 800K, 0.87 / 1.08 at 1.6M;
    # with grad 0.92 / 1.13 at 800K, 0.84 / 0.99 at 1.6M; relu + residual no grad 1.20 / 0.95 at
    # 32K, 0.99 / 0.92 at 100K, 0.78 / 0.76 at 262K; with grad 1.10-1.46 at every size to 6.4M
    # (the fused float16 backward with an activation or residual stages its blocks through
    # float32 copies): torch's composite at every size; eval no grad 1.01 / 1.20 at 262K, 0.76 /
    # 0.86 at 800K, with grad 1.20-1.53 at every size: torch's at every size. Where one and two
    # threads disagree the limit takes the smaller loss. Re-measured the same day after the
    # C++ node took half-precision weights with grad (the figures above with grad are of the
    # Python Function), the eval call residual and activation calls and one-loop vectors, and
    # the float16 passes with an activation or residual their register paths. bfloat16:
    # training no grad 1.01 / 1.00 at 16K (2**14 kept), with grad 0.96 / 1.11 at 32K, 0.80 /
    # 0.94 at 100K (2**16); eval no grad 1.03 / 0.98 at 4096, 0.87 / 0.85 at 16K (2**13), with
    # grad 1.01 / 1.16 at 32K, 0.83 / 0.99 at 100K (2**16); act no grad 0.95 / 0.89 at 4096
    # (2**12 kept, as float32's, for the modules' small maps), with grad 1.02 / 1.02 at 4096,
    # 0.93 / 0.95 at 16K (2**14);
    # eval act no grad 0.86 / 0.77 at 64 (never), with grad 1.03 / 1.02 at 4096, 0.94 / 0.97 at
    # 16K (2**14). float16: training no grad 1.02 / 1.06 at 100K, 0.88 / 0.92 at 262K (2**17
    # kept), with grad 1.10 / 1.17 at 32K, 0.91 / 1.03 at 100K (2**16); eval no grad 1.02 /
    # 1.07 at 32K, 0.90 / 0.99 at 100K (2**16), with grad 0.94 / 1.06 at 100K, 0.89 / 0.93 at
    # 262K (2**17); act no grad 1.04 / 0.98 at 1024, 1.01 / 0.92 at 4096, BatchNormAct2d 1.03x
    # at (4, 16, 8, 8) (2**13), with grad 1.03 / 1.02 at 4096, 0.99 / 1.00 at 16K, 0.96 / 0.95
    # at 32K (2**14); eval act no grad 0.87 / 0.81 at 64 (never), with grad 1.00 / 1.02 at
    # 4096, 0.96 / 1.01 at 16K (2**14).
    "batch_norm_bf16": {"cpu": (1 << 14, 1 << 16)},
    "batch_norm_eval_bf16": {"cpu": (1 << 13, 1 << 16)},
    "batch_norm_act_bf16": {"cpu": (1 << 12, 1 << 14)},
    "batch_norm_act_eval_bf16": {"cpu": (0, 1 << 14)},
    "batch_norm_f16": {"cpu": (1 << 17, 1 << 16)},
    "batch_norm_eval_f16": {"cpu": (1 << 16, 1 << 17)},
    "batch_norm_act_f16": {"cpu": (1 << 13, 1 << 14)},
    "batch_norm_act_eval_f16": {"cpu": (0, 1 << 14)},
    # batch_norm_act with silu, gelu or gelu_tanh (their own entries: the activation's cost
    # decides). The fused forward evaluates GELU with the table form (cpu::gelu_avx512) and wins
    # from 2^11-2^13 elements in every dtype; its backward evaluates act' (silu's exp and
    # division, GELU's exp, division and polynomial) in both passes except in the float32
    # channels-last one-op backward, where torch's silu/gelu backward (one evaluation, oneDNN's
    # GELU for float32/bfloat16) then its batch_norm backward are faster in half precision at
    # every size. overhead.py --crossover --only batch_norm --bn-activation silu / gelu /
    # gelu_tanh --dtype D --threads 1 / 2 [--channels-last], 2026-12-07, after the table
    # forward, no residual (timm's BatchNormAct2d; a residual adds a pass to torch's side only),
    # the dense-gradient backward; fused / torch at 64 ... 6.4M elements; each limit is past the
    # last size slower than 1.02x at either thread count in either layout (EVERY_SIZE: slower at
    # the largest measured). float32: silu no grad 1.29-1.31 at 64-1024 channels-last one
    # thread, 1.13 at 4096, <= 0.96 from 16K; with grad 1.05-1.11 at 1024-4096 channels-last,
    # 0.44-0.96 from 16K; eval with grad 1.03-1.33 at 1024-1.6M (one thread), 0.98 at 6.4M. gelu
    # no grad 1.07-1.28 at 1024-4096 channels-last, <= 0.88 from 16K (0.08-0.51 from 262K); with
    # grad 1.06-1.12 at 1024-4096 channels-last, 1.03 at 100K (NCHW, one thread), <= 0.96 from
    # 262K; eval with grad 1.03-1.79 from 32K to 6.4M. gelu_tanh (torch's tanh form is slow)
    # 0.11-0.88 from 4096, eval fused at every size. bfloat16: silu no grad 1.03-1.47 to 16K, <=
    # 0.98 from 100K; with grad 1.03-1.31 to 1.6M, 0.88-1.01 at 6.4M; eval no grad 1.03-1.26 to
    # 16K channels-last, with grad 1.01-1.73 at every size; gelu no grad 1.02-1.39 at 1024-4096
    # channels-last, 0.46-0.85 from 16K, with grad 1.10-1.72 from 100K (training and eval;
    # 0.98-1.25 at 16K-32K); gelu_tanh 1.05-1.20 to 4096, <= 0.80 from 16K. float16: silu no
    # grad 1.03-1.40 to 100K, <= 1.01 from 262K (eval 1.05-1.08 to 1.6M, 0.96-0.99 at 6.4M);
    # with grad 1.02-1.50 at every size; gelu no grad 1.03-1.38 to 4096, <= 0.92 from 16K, with
    # grad 1.08-1.56 at every size; gelu_tanh 1.01-1.36 to 4096, <= 0.86 from 16K.
    "batch_norm_silu": {"cpu": (1 << 13, 1 << 13)},
    "batch_norm_silu_eval": {"cpu": (0, 1 << 21)},
    "batch_norm_gelu": {"cpu": (1 << 13, 1 << 17)},
    "batch_norm_gelu_eval": {"cpu": (0, EVERY_SIZE)},
    "batch_norm_gelu_tanh": {"cpu": (1 << 11, 1 << 11)},
    "batch_norm_silu_bf16": {"cpu": (1 << 15, 1 << 21)},
    "batch_norm_silu_eval_bf16": {"cpu": (1 << 15, EVERY_SIZE)},
    "batch_norm_gelu_bf16": {"cpu": (1 << 13, EVERY_SIZE)},
    "batch_norm_gelu_eval_bf16": {"cpu": (1 << 11, EVERY_SIZE)},
    "batch_norm_gelu_tanh_bf16": {"cpu": (1 << 13, 1 << 13)},
    "batch_norm_gelu_tanh_eval_bf16": {"cpu": (0, 1 << 13)},
    "batch_norm_silu_f16": {"cpu": (1 << 17, EVERY_SIZE)},
    "batch_norm_silu_eval_f16": {"cpu": (1 << 21, EVERY_SIZE)},
    "batch_norm_gelu_f16": {"cpu": (1 << 13, EVERY_SIZE)},
    "batch_norm_gelu_eval_f16": {"cpu": (1 << 11, EVERY_SIZE)},
    "batch_norm_gelu_tanh_f16": {"cpu": (1 << 11, 1 << 13)},
    "batch_norm_gelu_tanh_eval_f16": {"cpu": (0, 1 << 11)},
}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot serve the call; the message says why."""


# ---- what this build and machine have (probed once, at import) ------------------------------

def _probe_extension() -> tuple[bool, bool, str | None]:
    try:
        importlib.import_module("fusedreg._C")
    except ImportError as e:  # not built, or built against another torch
        return False, False, f"the C++ extension fusedreg._C is not importable ({e})"
    # The CUDA kernels exist if any fusedreg C++ op has one (all .cu files build together).
    has_cuda = any(
        torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
        for name in torch._C._dispatch_get_all_op_names() if name.startswith("fusedreg::")
    )
    return True, has_cuda, None


def _probe_triton() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as e:
        return f"triton is not installed ({e})"
    return None


_EXT_OK, _EXT_CUDA, _EXT_WHY = _probe_extension()
_TRITON_WHY = _probe_triton()
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def extension_available(with_cuda: bool = False) -> bool:
    """True when ``fusedreg._C`` is importable (and, with ``with_cuda``, has CUDA kernels)."""
    return _EXT_OK and (_EXT_CUDA or not with_cuda)


def triton_available() -> bool:
    """True when Triton is installed (whether it can run here is ``backend_status()``'s)."""
    return _TRITON_WHY is None


def triton_interpreter() -> bool:
    """True when Triton kernels run in the interpreter (CPU tensors), set before import."""
    return _INTERPRET


def why_unusable(backend: str, device_type: str | None = None) -> str | None:
    """None if ``backend`` can run on ``device_type`` (any device if None), else the reason."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if not _EXT_OK:
            return _EXT_WHY
        if device_type not in (None, "cpu"):
            return f"the cpu backend runs on CPU tensors, not {device_type}"
        return None
    if backend == "cuda":
        if not _EXT_OK:
            return _EXT_WHY
        if not _EXT_CUDA:
            return "fusedreg._C was built without CUDA kernels (CPU-only torch or no nvcc at build time)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        if device_type not in (None, "cuda"):
            return f"the cuda backend runs on CUDA tensors, not {device_type}"
        return None
    if backend == "triton":
        if _TRITON_WHY:
            return _TRITON_WHY
        if device_type == "cpu" or (device_type is None and not torch.cuda.is_available()):
            if not _INTERPRET:
                return ("triton runs on CUDA tensors; set TRITON_INTERPRET=1 before importing "
                        "fusedreg to run it on CPU tensors in the interpreter")
            return None
        if device_type not in (None, "cuda"):
            return f"the triton backend runs on CUDA tensors, not {device_type}"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
        return None
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(_CHOICES)}")


def backend_status() -> dict[str, str]:
    """For each backend, "available" or the reason it is not usable here."""
    return {b: (why_unusable(b) or "available") for b in BACKENDS}


def available_backends() -> list[str]:
    """The backends that can run here (on some device)."""
    return [b for b in BACKENDS if why_unusable(b) is None]


# ---- the registry -----------------------------------------------------------------------------

_REGISTRY: dict[tuple[str, str], Any] = {}
# resolve() is on every call's path: its answer per (op, device type, choice) is cached and
# the cache is dropped whenever the registry changes.
_RESOLVED: dict[tuple[str, str, str], str] = {}


def register(op: str, backend: str, impl: Any) -> None:
    """Records ``impl`` as ``op``'s implementation in ``backend`` (called by fusedreg/ops)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    _REGISTRY[(op, backend)] = impl
    _RESOLVED.clear()


def implementation(op: str, backend: str) -> Any:
    """What ``register(op, backend, impl)`` recorded; raises with the reason if nothing."""
    try:
        return _REGISTRY[(op, backend)]
    except KeyError:
        known = sorted({o for o, _ in _REGISTRY})
        if op not in known:
            raise ValueError(f"unknown op {op!r}; expected one of {', '.join(known)}") from None
        raise BackendUnavailableError(
            f"{op} has no {backend} implementation in this build: "
            f"{why_unusable(backend) or 'not registered'}") from None


def registered_backends(op: str) -> list[str]:
    """The backends (in ``BACKENDS`` order) that registered ``op`` in this build, whether or
    not they can run here."""
    return [b for b in BACKENDS if (op, b) in _REGISTRY]


def implemented_backends(op: str, device_type: str | None = None) -> list[str]:
    """The backends (in ``BACKENDS`` order) that implement ``op`` and can run on
    ``device_type`` here (on any device if None)."""
    return [b for b in registered_backends(op) if why_unusable(b, device_type) is None]


# ---- the choice ---------------------------------------------------------------------------

def _check_choice(name: str) -> str:
    if not isinstance(name, str) or name not in _CHOICES:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(_CHOICES)}")
    if name != "auto":
        why = why_unusable(name)
        if why:
            raise BackendUnavailableError(f"backend {name!r} is not usable: {why}")
    return name


def _default_from_env() -> str:
    env = os.environ.get("FUSEDREG_BACKEND", "").strip().lower()
    return _check_choice(env) if env else "auto"


_default = _default_from_env()
_scoped: contextvars.ContextVar[str | None] = contextvars.ContextVar("fusedreg_backend", default=None)
# torch.compile traces ContextVar.get (and guards on it) from torch 2.14; older Dynamo cannot,
# so there a compiled function sees the process default only (set_backend / the environment
# variable, guarded as a global), not a use_backend block around the call (docs/design.md,
# "Backends and dispatch").
_COMPILE_SEES_SCOPED = torch.__version__ >= (2, 14)


def set_backend(name: str) -> None:
    """Sets the process-wide default backend: "auto" or one of ``BACKENDS``. A
    ``use_backend`` block that is open in this thread keeps its own choice until it ends."""
    global _default
    _default = _check_choice(name)


def get_backend() -> str:
    """The choice in force here: the innermost ``use_backend`` block's, else the default."""
    if not _COMPILE_SEES_SCOPED and torch.compiler.is_compiling():
        return _default
    scoped = _scoped.get()
    return _default if scoped is None else scoped


@contextlib.contextmanager
def use_backend(name: str):
    """``with fusedreg.use_backend("triton"): ...`` selects a backend inside the block, for
    this thread (or asyncio task) only."""
    token = _scoped.set(_check_choice(name))
    try:
        yield
    finally:
        _scoped.reset(token)


def resolve(op: str, device: torch.device) -> str:
    """The backend that serves ``op`` for tensors on ``device``; raises with the reason."""
    return resolve_type(op, device.type)


def resolve_type(op: str, device_type: str) -> str:
    """``resolve`` for a device type ("cpu", "cuda"): the functional API's hot path, which
    reads the type without making a torch.device."""
    choice = get_backend()
    if torch.compiler.is_compiling():  # a cache read would become a guard on the cache
        return _resolve_uncached(op, device_type, choice)
    key = (op, device_type, choice)
    backend = _RESOLVED.get(key)
    if backend is None:
        backend = _RESOLVED[key] = _resolve_uncached(op, device_type, choice)
    return backend


def auto_torch_limits(norm: str, device_type: str) -> tuple[int, int] | None:
    """``AUTO_TORCH_BELOW``'s (limit without grad, limit with grad) for a plain ``norm``
    ("layer_norm", "rms_norm", or one of the BatchNorm entries) on ``device_type`` when the choice in force is auto: a call
    with fewer elements is served by torch's own op. None under an explicit backend (which
    always runs its kernel) or where the table has no entry."""
    if _COMPILE_SEES_SCOPED:  # get_backend() written out: this is on a small call's path
        scoped = _scoped.get()
        choice = _default if scoped is None else scoped
    else:
        choice = get_backend()
    if choice != "auto":
        return None
    return table_limits(norm, device_type)


_get_num_threads = torch.get_num_threads


def table_limits(norm: str, device_type: str) -> tuple[int, int] | None:
    """``AUTO_TORCH_BELOW[norm]``'s limits on ``device_type`` (None without an entry) for the
    thread count in force: on CPU its ``"cpu:1"`` entry, where there is one, when torch runs
    one thread, else its ``"cpu"`` entry."""
    per_device = AUTO_TORCH_BELOW.get(norm)
    if not per_device:
        return None
    if device_type == "cpu":
        one = per_device.get("cpu:1")
        if one is not None and _get_num_threads() == 1:
            return one
    return per_device.get(device_type)


def _resolve_uncached(op: str, device_type: str, choice: str) -> str:
    if choice != "auto":
        why = why_unusable(choice, device_type)
        if why is None and (op, choice) not in _REGISTRY:
            why = f"{op} has no {choice} implementation in this build"
        if why:
            raise BackendUnavailableError(f"{op}: backend {choice!r} cannot run here: {why}")
        return choice
    order = AUTO.get(op, {}).get(device_type, ("reference",))
    for backend in order:
        if (op, backend) in _REGISTRY and why_unusable(backend, device_type) is None:
            return backend
    return "reference"
