"""examples/train_gpt.py under FSDP2: two gloo ranks launched with torchrun
reach the losses of one process over a few steps, for both runs (plain torch with
torch.optim.AdamW, and the patched model with fusedreg.optim.AdamW stepping the DTensor
parameters on their local shards)."""
import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from test_train_gpt import ROOT, TINY, load_example

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch built without distributed")

FSDP_TINY = TINY + ["--batch", "4"]  # the global batch: 2 rows per rank (the last --batch wins)


def torchrun(args, out, nproc=2):
    """Runs the example under torchrun with ``nproc`` gloo ranks; returns {run: [losses]}
    from the CSV rank 0 writes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.join(ROOT, "examples", "train_gpt.py"), "--fsdp", *args, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert f"FSDP2 over {nproc} ranks" in proc.stdout
    losses = {}
    with open(out / "train_gpt_loss.csv", newline="") as f:
        for row in csv.DictReader(f):
            losses.setdefault(row["run"], []).append(float(row["loss"]))
    return losses


@pytest.mark.slow  # torchrun, two gloo ranks
def test_two_ranks_reach_the_losses_of_one_process(tmp_path):
    # no dropout: the masks of 2 ranks (per-rank seeds over half batches) cannot equal those of
    # one process over the whole batch; everything else (weights, batches) is the same
    args = FSDP_TINY + ["--dropout", "0", "--steps", "4"]
    got = torchrun(args, tmp_path / "fsdp")
    one = {r["run"]: r["losses"] for r in load_example().main(args + ["--out", str(tmp_path / "one")])}
    assert set(got) == set(one) == {"torch", "fusedreg"}
    for run in one:
        # The forward matmuls see the same weights (all-gathered exactly) and half the rows;
        # the gradients differ only in summation order (two half-batch sums, then the
        # reduce-scatter, against one sum), ~1e-7 relative, which AdamW's normalized steps
        # carry into the weights at about lr x that; the CSV keeps 5 decimals (5e-6 absolute).
        torch.testing.assert_close(torch.tensor(got[run]), torch.tensor(one[run]), atol=2e-5, rtol=1e-5)
    assert one["torch"][-1] < one["torch"][0]  # it trains


@pytest.mark.slow  # torchrun, two gloo ranks
def test_fsdp_with_dropout_and_l1_trains(tmp_path):
    # dropout masks per rank, the l1 step of fusedreg.optim.AdamW on the local shards
    got = torchrun(FSDP_TINY + ["--dropout", "0.1", "--l1", "1e-4", "--runs", "fusedreg"], tmp_path)
    assert list(got) == ["fusedreg"] and len(got["fusedreg"]) == 3
    assert all(torch.isfinite(torch.tensor(got["fusedreg"])))


def test_fsdp_outside_torchrun_says_how_to_launch(monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(SystemExit, match="torchrun --nproc_per_node=2"):
        load_example().main(TINY + ["--fsdp", "--out", str(tmp_path)])
