"""examples/train_gpt.py runs end to end on a tiny configuration: both runs,
the loss CSV, and the same starting point for plain torch and fusedreg."""
import csv
import importlib.util
import math
import os

import torch

from tolerances import PATCHED_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example():
    spec = importlib.util.spec_from_file_location("train_gpt", os.path.join(ROOT, "examples", "train_gpt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--steps", "3", "--layers", "2", "--width", "32", "--heads", "4", "--seq", "16",
        "--batch", "3", "--val-batches", "1", "--device", "cpu"]


def test_three_steps_of_both_runs_write_the_loss_csv(tmp_path):
    results = load_example().main(TINY + ["--out", str(tmp_path)])
    assert [r["run"] for r in results] == ["torch", "fusedreg"]
    for r in results:
        assert len(r["losses"]) == 3 and all(math.isfinite(x) for x in r["losses"])
        assert r["tokens_per_s"] > 0 and r["saved_mb"] > 0 and math.isfinite(r["val_loss"])
    assert "patched" in results[1]["notes"]
    with open(tmp_path / "train_gpt_loss.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], int(r["step"])) for r in rows] == [(run, s) for run in ("torch", "fusedreg") for s in range(3)]


def test_without_dropout_both_runs_start_from_the_same_loss(tmp_path):
    # same initial weights and batches: the first loss differs only by the fused norms' rounding
    results = load_example().main(TINY + ["--dropout", "0", "--steps", "1", "--out", str(tmp_path)])
    first = [torch.tensor(r["losses"][0]) for r in results]
    torch.testing.assert_close(first[1], first[0], **PATCHED_MODEL[torch.float32])


def test_interleaved_runs_see_the_same_masks_as_runs_alone(tmp_path):
    # each run keeps its own RNG state: stepping the runs in turn changes no run's losses
    example = load_example()
    alone = example.main(TINY + ["--no-interleave", "--out", str(tmp_path / "a")])
    interleaved = example.main(TINY + ["--interleave", "--out", str(tmp_path / "b")])
    for a, b in zip(alone, interleaved):
        assert a["run"] == b["run"] and a["losses"] == b["losses"]
