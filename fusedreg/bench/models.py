"""``python -m fusedreg.bench.models``: fusedreg on real model code, training.

GPT-2, BERT, Llama, T5 (Hugging Face transformers) and ViT-tiny (timm), built from small
configs with random weights (no downloads). For each model one training step (forward,
backward, ``torch.optim.AdamW`` step, the same for every run) is timed in four ways, the
runs interleaved round by round in one process so that the load of a shared machine hits
them alike, in an order shuffled every round (a fixed order favours some position: the run
after another's allocations, or after the same code warmed the caches), medians reported:

- ``torch``: the model as it is, eager;
- ``patch``: ``fusedreg.patch(model, fuse=True)`` (modules, norms, dropout call sites, and
  the dropout/residual/norm and bias/activation fusions, run eagerly);
- ``compile``: ``torch.compile(model)`` (Inductor) of the unpatched model;
- ``fr.compile``: ``fusedreg.compile(model)`` (the fusions, then Inductor);
- ``patch+opt``: ``patch`` with ``fusedreg.optim.AdamW`` (same hyperparameters) in place of
  ``torch.optim.AdamW``: what a user of both parts of fusedreg gets. It is a separate column:
  the other runs all step ``torch.optim.AdamW`` (on CPU its default is the per-tensor loop),
  so their ratios measure the patch alone.

It also reports, from one training forward of ``fusedreg.patch(model)`` (eager, no fusion) at
the timed batch and sequence length,
the dropout calls that ran fused and those left in torch, and the norms patched out of the
norm modules the model has; and the losses at dropout 0 of every run against ``torch``'s.
Needs transformers and timm (the ``test`` extra).
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time

import torch
from torch import nn

import fusedreg
from fusedreg.patching import report

MODELS = ("gpt2", "bert", "llama", "t5", "vit")
RUNS = ("torch", "patch", "compile", "fr.compile", "patch+opt")


def build(name: str, dropout: float = 0.1, width: int = 256, layers: int = 4, seed: int = 0):
    """(model, batch(batch, seq) -> inputs, loss(model, inputs)) for a small config."""
    torch.manual_seed(seed)
    heads = max(1, width // 64)
    if name == "vit":
        import timm
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64,
                                  patch_size=8, embed_dim=width, depth=layers, num_heads=heads,
                                  num_classes=100, drop_rate=dropout, pos_drop_rate=dropout,
                                  proj_drop_rate=dropout, attn_drop_rate=dropout)

        def batch(b, seq, g):
            return {"x": torch.randn(b, 3, 64, 64, generator=g),
                    "y": torch.randint(0, 100, (b,), generator=g)}

        def loss(m, inputs):
            return nn.functional.cross_entropy(m(inputs["x"]), inputs["y"])
        return model, batch, loss, 65  # tokens per image: 64 patches + the class token
    import transformers
    vocab = 1024
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=width, n_layer=layers, n_head=heads, n_positions=512,
                                      vocab_size=vocab, resid_pdrop=dropout, embd_pdrop=dropout,
                                      attn_pdrop=dropout)
        model = transformers.GPT2LMHeadModel(cfg)
    elif name == "bert":
        cfg = transformers.BertConfig(hidden_size=width, num_hidden_layers=layers,
                                      num_attention_heads=heads, intermediate_size=4 * width,
                                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                      vocab_size=vocab, max_position_embeddings=512)
        model = transformers.BertForMaskedLM(cfg)
    elif name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=width, intermediate_size=int(2.75 * width),
                                       num_hidden_layers=layers, num_attention_heads=heads,
                                       num_key_value_heads=heads, vocab_size=vocab,
                                       max_position_embeddings=512, attention_dropout=dropout)
        model = transformers.LlamaForCausalLM(cfg)
    elif name == "t5":
        cfg = transformers.T5Config(d_model=width, d_kv=64, d_ff=4 * width, num_layers=layers,
                                    num_heads=heads, vocab_size=vocab, dropout_rate=dropout,
                                    decoder_start_token_id=0, pad_token_id=0)
        model = transformers.T5ForConditionalGeneration(cfg)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")

    def batch(b, seq, g):
        ids = torch.randint(0, vocab, (b, seq), generator=g)
        return {"input_ids": ids, "labels": ids}

    def loss(m, inputs):
        return m(**inputs).loss
    return model, batch, loss, None


def _norm_modules(model) -> int:
    return sum(1 for m in model.modules()
               if "norm" in type(m).__name__.lower() and "batch" not in type(m).__name__.lower())


def coverage(name: str, width: int, layers: int, batch_size: int, seq: int):
    """Dropout calls fused / left in torch in one training forward of patch(model) at the timed
    batch and sequence length (what is fused can depend on the size: small SDPA calls stay
    torch's), and norms patched / norm modules."""
    model, batch, loss, _ = build(name, 0.1, width, layers)
    norms = _norm_modules(model)
    fusedreg.patch(model)
    model.train()
    loss(model, batch(batch_size, seq, torch.Generator().manual_seed(0)))
    r = report(model)
    fused = sum(v["fused"] for v in r.dropout_calls.values())
    left = sum(v["left in torch"] for v in r.dropout_calls.values())
    patched = sum(1 for orig, _ in fusedreg.patched_modules(model).values()
                  if "norm" in orig.__name__.lower())
    return fused, left, patched, norms, r


def _runs(name, dropout, width, layers, which):
    out = {}
    for run in which:
        model, batch, loss, tokens = build(name, dropout, width, layers)
        model.train()
        if run in ("patch", "patch+opt"):
            fusedreg.patch(model, fuse=True)
            fn = model
        elif run == "compile":
            fn = torch.compile(model)
        elif run == "fr.compile":
            fn = fusedreg.compile(model)
        else:
            fn = model
        if run == "patch+opt":
            opt = fusedreg.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-2)
        out[run] = (model, fn, opt)
    return out, batch, loss, tokens


def measure(name, dropout, width, layers, batch_size, seq, steps, warmup, which=RUNS):
    torch._dynamo.reset()
    runs, batch, loss, tokens = _runs(name, dropout, width, layers, which)
    g = torch.Generator().manual_seed(1)
    inputs = batch(batch_size, seq, g)
    ntok = batch_size * (tokens or seq)
    times = {r: [] for r in runs}

    def step(run):
        model, fn, opt = runs[run]
        opt.zero_grad(set_to_none=True)
        value = loss(fn, inputs)
        value.backward()
        opt.step()
        return float(value.detach())

    for _ in range(warmup):
        for r in runs:
            step(r)
    order = list(runs)
    shuffle = random.Random(0).shuffle  # the same orders every run of the benchmark
    for _ in range(steps):  # interleaved: one step of each run per round, in a shuffled order
        shuffle(order)
        for r in order:
            t0 = time.perf_counter()
            step(r)
            times[r].append(time.perf_counter() - t0)
    return {r: ntok / statistics.median(t) for r, t in times.items()}


def losses_at_dropout_0(name, width, layers, which=("torch", "patch")):
    """First-step loss of the runs against torch's, dropout 0 (eval-equivalent numerics).
    The compiled runs are left out by default (two more Inductor compiles per model; the
    tests check fusedreg.compile's numerics)."""
    torch._dynamo.reset()
    runs, batch, loss, _ = _runs(name, 0.0, width, layers, which)
    inputs = batch(2, 32, torch.Generator().manual_seed(2))
    return {r: float(loss(fn, inputs)) for r, (_, fn, _) in runs.items()}


def routing_cost(calls: int = 200, rounds: int = 40) -> tuple:
    """(us per patched forward, us per other torch call, us per dropout call left to torch)
    that routing functional dropouts (patching/_calls.py) adds: forwards of ``calls`` tiny adds,
    and of ``calls`` dropouts at p=0 (torch's own result), patched vs not, interleaved, medians."""
    class Adds(nn.Module):
        def forward(self, x):
            for _ in range(calls):
                x = x + 1.0
            return x

    class Drops(nn.Module):
        def forward(self, x):
            for _ in range(calls):
                x = nn.functional.dropout(x, 0.0, True)
            return x

    def timed(a, b):
        x = torch.zeros(4)
        ta, tb = [], []
        for _ in range(rounds):
            for m, t in ((a, ta), (b, tb)):
                t0 = time.perf_counter()
                m(x)
                t.append(time.perf_counter() - t0)
        return (statistics.median(tb) - statistics.median(ta)) * 1e6

    class Empty(nn.Module):
        def forward(self, x):
            return x

    per_forward = timed(Empty(), fusedreg.patch(Empty()))
    per_call = (timed(Adds(), fusedreg.patch(Adds())) - per_forward) / calls
    per_dropout = (timed(Drops(), fusedreg.patch(Drops())) - per_forward) / calls
    return per_forward, per_call, per_dropout


def main(argv=None) -> str:
    p = argparse.ArgumentParser(prog="python -m fusedreg.bench.models", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed rounds (each run once per round)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--out", default=None, help="write the markdown table there too")
    args = p.parse_args(argv)
    names = [m for m in args.models.split(",") if m]
    load_before = os.getloadavg()[0]
    lines = [f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
             f"width {args.width}, {args.layers} layers, batch {args.batch} x seq {args.seq} "
             f"(ViT: 64x64 images, 65 tokens), dropout {args.dropout}, median of {args.steps} "
             "interleaved rounds (order shuffled each round) after "
             f"{args.warmup} warm-up rounds; training step = forward + backward + "
             "torch.optim.AdamW (patch+opt: fusedreg.optim.AdamW)",
             "",
             "| model | dropout calls fused / left in torch | norms patched | tokens/s torch | "
             "patch / torch | compile / torch | fr.compile / compile | patch+opt / torch | "
             "loss at p=0: patch - torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    details = []
    for name in names:
        fused, left, patched, norms, r = coverage(name, args.width, args.layers, args.batch, args.seq)
        details.append(f"{name}: {r}")
        tps = measure(name, args.dropout, args.width, args.layers, args.batch, args.seq,
                      args.steps, args.warmup)
        l0 = losses_at_dropout_0(name, args.width, args.layers)
        diff = max(abs(v - l0["torch"]) for v in l0.values())
        lines.append(f"| {name} | {fused} / {left} | {patched} of {norms} | {tps['torch']:.0f} | "
                     f"{tps['patch'] / tps['torch']:.2f}x | {tps['compile'] / tps['torch']:.2f}x | "
                     f"{tps['fr.compile'] / tps['compile']:.2f}x | "
                     f"{tps['patch+opt'] / tps['torch']:.2f}x | {diff:.1e} |")
        print(lines[-1], file=sys.stderr, flush=True)
    fwd_us, call_us, drop_us = routing_cost()
    lines += ["", f"Routing functional dropouts (patching/_calls.py) adds {fwd_us:.1f} us to each "
              f"patched eager forward, {call_us:.2f} us to each other torch call in it and "
              f"{drop_us:.2f} us to each dropout call torch keeps (tiny tensors, medians of "
              "interleaved rounds).",
              "", f"Load average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at "
              "the end (other processes on this machine)."]
    text = "\n".join(lines + ["", "```"] + details + ["```"])
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return text


if __name__ == "__main__":
    main()
