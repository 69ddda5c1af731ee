"""SyncBatchNorm: two gloo processes, each with half of the batch, give what one process gives
on the whole batch — outputs, input gradients, the sum of the ranks' weight/bias gradients
(DDP averages those) and the running statistics, in both memory layouts."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import fusedreg
from _helpers import spawn_gloo_ranks

SHAPE = (8, 3, 4, 5)
STEPS = 2


def _inputs():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(SHAPE, generator=g, dtype=torch.float64).float() * 2 + 3 for _ in range(STEPS)]
    gs = [torch.randn(SHAPE, generator=g) for _ in range(STEPS)]
    return xs, gs


def _module(cls):
    m = cls(3, momentum=0.2)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        m.bias.copy_(torch.tensor([0.1, -0.2, 0.3]))
    return m


def _train(m, xs, gs, layout, lo, hi):
    """STEPS training steps on samples [lo, hi): outputs and input grads of each step, then
    the parameter grads (summed over steps) and the buffers."""
    outs = []
    for x, g in zip(xs, gs):
        x = x[lo:hi].clone()
        if layout == "cl":
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        y = m(x)
        (y * g[lo:hi]).sum().backward()
        outs.append((y.detach().contiguous(), x.grad.contiguous()))
    return outs, [m.weight.grad.clone(), m.bias.grad.clone(), m.running_mean.clone(),
                  m.running_var.clone(), m.num_batches_tracked.clone()]


def _worker(rank, world, out_dir):
    xs, gs = _inputs()
    half = SHAPE[0] // world
    result = {}
    for layout in ("c", "cl"):
        m = fusedreg.nn.SyncBatchNorm.convert_sync_batchnorm(_module(torch.nn.BatchNorm2d))
        result[layout] = _train(m, xs, gs, layout, rank * half, (rank + 1) * half)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.slow  # two spawned gloo processes: ~12 s on 2 shared cores
@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
def test_sync_batch_norm_two_processes_match_one():
    with tempfile.TemporaryDirectory() as d:
        spawn_gloo_ranks(_worker, (d,), d)
        ranks = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(2)]
    xs, gs = _inputs()
    for layout in ("c", "cl"):
        one_outs, one_state = _train(_module(fusedreg.nn.BatchNorm2d), xs, gs, layout, 0, SHAPE[0])
        torch_outs, torch_state = _train(_module(torch.nn.BatchNorm2d), xs, gs, layout, 0, SHAPE[0])
        for step in range(STEPS):
            for k in range(2):  # y, grad x: the ranks' halves together
                got = torch.cat([ranks[0][layout][0][step][k], ranks[1][layout][0][step][k]])
                torch.testing.assert_close(got, one_outs[step][k], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(got, torch_outs[step][k], rtol=1e-5, atol=1e-5)
        wsum = [ranks[0][layout][1][i] + ranks[1][layout][1][i] for i in range(2)]
        for got, one, theirs in zip(wsum, one_state[:2], torch_state[:2]):
            torch.testing.assert_close(got, one, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(got, theirs, rtol=1e-5, atol=1e-5)
        for r in range(2):  # every rank holds the same running stats, those of the whole batch
            for got, one, theirs in zip(ranks[r][layout][1][2:], one_state[2:], torch_state[2:]):
                torch.testing.assert_close(got, one, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(got, theirs, rtol=1e-6, atol=1e-6)
