"""FSDP2: fusedreg optimizers step DTensor parameters on their local shards. Two gloo processes
on CPU train a small model with uneven shards (33 and 5 rows over 2 ranks); the gathered
parameters must equal those of the same training in one process."""
import os
import tempfile

import pytest
import torch
import torch.distributed as dist

import fusedreg.optim as fo
from _helpers import spawn_gloo_ranks

STEPS = 8


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(17, 33), torch.nn.GELU(), torch.nn.Linear(33, 5))


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 17, generator=g) + 0.5, torch.randn(16, 5, generator=g)


def _make_opt(cls, params):
    if cls == "adamw":
        return fo.AdamW(params, lr=1e-2, weight_decay=0.1, l1=1.0, amsgrad=True)
    return fo.SGD(params, lr=1e-2, momentum=0.9, l1=1.0)


def _train(model, opt):
    x, y = _data()
    for _ in range(STEPS):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _worker(rank, world, out_file, cls):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = _model()
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = _make_opt(cls, model.parameters())
    _train(model, opt)  # every rank sees the same batch: averaged grads = one process's
    full = [p.full_tensor() for p in model.parameters()]
    sparsity = opt.sparsity()
    if rank == 0:
        torch.save({"params": full, "sparsity": sparsity}, out_file)


@pytest.mark.slow  # two spawned gloo processes
@pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")
@pytest.mark.parametrize("cls", ["adamw", "sgd"])
def test_fsdp2_two_processes_match_one(cls):
    with tempfile.TemporaryDirectory() as d:
        out_file = os.path.join(d, "out.pt")
        spawn_gloo_ranks(_worker, (out_file, cls), d)
        got = torch.load(out_file)
    # One thread here as in the workers: the matmuls then sum in the same order, and Adam's
    # update (≈ sign of tiny gradients) cannot amplify thread-count rounding differences.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = _model()
        opt = _make_opt(cls, model.parameters())
        _train(model, opt)
    finally:
        torch.set_num_threads(threads)
    for p, q in zip(model.parameters(), got["params"]):
        # the all-reduced mean of two equal fp32 gradients is exact; the matmuls of the sharded
        # forward are the same, so only summation-order noise of gloo's reduce remains
        torch.testing.assert_close(q, p.detach(), atol=1e-6, rtol=1e-5)
    assert any((p == 0).any() for p in got["params"])  # the l1 step ran on the shards
