"""fusedreg.patch reaches dropout call sites that are functions, not modules
(fusedreg/patching/_calls.py): ``nn.functional.dropout`` / ``dropout1d/2d/3d`` called inside a
patched model's forward run fusedreg's seeded mask, only there, and ``report`` counts per
call-site kind what ran fused and what stayed in torch."""
import threading

import pytest
import torch
import torch.nn.functional as TF
import torch.utils.checkpoint
from torch import nn

import fusedreg
from fusedreg.patching import _calls, report
from torch.nn.functional import dropout as dropout_alias  # a name bound at import (Aliased)


def torchs_own(fn) -> bool:
    """``fn`` is torch's function itself, not the router that stands in for it during a
    patched forward."""
    return _calls.original(fn) is fn


class Functional(nn.Module):
    """Dropouts called as functions, the way Hugging Face forwards call them."""

    def __init__(self, d=24, p=0.3, kind="dropout"):
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.p, self.kind = p, kind

    def forward(self, x):
        h = self.fc(x)
        if self.kind == "dropout":
            return TF.dropout(h, self.p, training=self.training)
        if self.kind == "dropout2d":
            return TF.dropout2d(h, self.p, self.training)
        if self.kind == "torch.dropout":
            return torch.dropout(h, self.p, self.training)
        raise AssertionError(self.kind)


def x_of(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(3)) + 0.5


def test_functional_dropout_in_forward_uses_the_seeded_mask():
    model = Functional().train()
    x = x_of(37, 24)
    fusedreg.patch(model)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)  # the seed is drawn from torch's generator, then fusedreg's mask
    expected = fusedreg.functional.dropout(model.fc(x), 0.3)
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    calls = report(model).dropout_calls
    assert calls == {"functional dropout": {"fused": 1, "left in torch": 0}}
    # eval: identity, nothing counted as dropping
    model.eval()
    torch.testing.assert_close(model(x), model.fc(x), atol=0, rtol=0)
    assert report(model).dropout_calls == {}


def test_torch_dropout_is_routed_too_and_gradients_flow():
    model = fusedreg.patch(Functional(kind="torch.dropout")).train()
    x = x_of(9, 24).requires_grad_()
    torch.manual_seed(1)
    out = model(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, fusedreg.functional.dropout(model.fc(x), 0.3), atol=0, rtol=0)
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and model.fc.weight.grad is not None


def test_only_inside_the_patched_forward():
    model = fusedreg.patch(Functional()).train()
    seen = []
    model.fc.register_forward_hook(lambda *a: seen.append(torchs_own(TF.dropout)))
    model(x_of(4, 24))
    assert seen == [False]  # during the forward the name holds the router
    for fn in (TF.dropout, TF.dropout2d, TF.scaled_dot_product_attention, torch.dropout):
        assert torchs_own(fn)  # and torch's functions are back after it
    torch.manual_seed(2)
    a = TF.dropout(x_of(64, 24), 0.5)
    torch.manual_seed(2)
    b = fusedreg.functional.dropout(x_of(64, 24), 0.5)
    assert not torch.equal(a, b)  # outside the forward torch's own dropout runs


def test_names_are_restored_when_forward_raises():
    model = fusedreg.patch(Functional()).train()
    with pytest.raises(RuntimeError):
        model(torch.randn(3, 5))  # wrong width: the Linear raises inside the forward
    assert torchs_own(TF.dropout) and torchs_own(dropout_alias)
    model(x_of(3, 24))  # and the next forward works and counts again
    assert report(model).dropout_calls["functional dropout"]["fused"] == 1


def test_other_threads_are_not_affected():
    model = fusedreg.patch(Functional()).train()
    seen = []
    x = x_of(64, 24)

    def other_thread():
        torch.manual_seed(2)
        seen.append((torchs_own(TF.dropout), TF.dropout(x, 0.5)))

    class Probe(nn.Module):
        def forward(self, h):  # while the patched forward runs, another thread calls dropout
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
            return h

    model.fc = nn.Sequential(nn.Linear(24, 24), Probe())
    model(x_of(3, 24))
    torch.manual_seed(2)
    expected = TF.dropout(x, 0.5)  # torch's own dropout, after the forward
    [(own, out)] = seen
    assert not own  # the other thread called through the router...
    torch.testing.assert_close(out, expected, atol=0, rtol=0)  # ...and got torch's dropout
    assert report(model).dropout_calls == {"functional dropout": {"fused": 1, "left in torch": 0}}


class Aliased(nn.Module):
    """A forward calling dropout by a name bound at import (``from torch.nn.functional import
    dropout as ...``): the name in this module's namespace is routed too."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(24, 24)

    def forward(self, x):
        return dropout_alias(self.fc(x), 0.3, self.training)


def test_a_dropout_bound_under_another_name_is_routed():
    model = fusedreg.patch(Aliased()).train()
    x = x_of(17, 24)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    torch.testing.assert_close(out, fusedreg.functional.dropout(model.fc(x), 0.3), atol=0, rtol=0)
    assert report(model).dropout_calls == {"functional dropout": {"fused": 1, "left in torch": 0}}
    assert torchs_own(dropout_alias)  # the module's own name is back after the forward


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_torchscript_still_scripts_dropout_after_a_patched_forward():
    fusedreg.patch(Functional()).train()(x_of(3, 24))
    scripted = torch.jit.script(Functional().train())  # F.dropout is torch's function again
    x = x_of(5, 24)
    torch.manual_seed(3)
    a = scripted(x)
    torch.manual_seed(3)
    torch.testing.assert_close(a, TF.dropout(scripted.fc(x), 0.3), atol=0, rtol=0)


@pytest.mark.parametrize("shape", [(4, 6, 5, 3), (2, 3, 1, 7)])
def test_dropout2d_drops_whole_channels_with_the_seeded_mask(shape):
    model = fusedreg.patch(Functional(kind="dropout2d", d=shape[-1], p=0.4)).train()
    x = x_of(*shape)
    torch.manual_seed(11)
    out = model(x)
    h = model.fc(x)
    torch.manual_seed(11)
    mask = fusedreg.functional.dropout(torch.ones(shape[:2] + (1, 1)), 0.4)
    torch.testing.assert_close(out, h * mask, atol=0, rtol=0)
    kept = (out != 0).flatten(2).any(-1)
    assert torch.equal(kept, mask[..., 0, 0] != 0)  # a channel is all kept or all dropped
    assert report(model).dropout_calls == {"functional dropout1d/2d/3d": {"fused": 1, "left in torch": 0}}


def test_bad_probability_raises_torchs_error():
    model = fusedreg.patch(Functional(p=1.5)).train()
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1"):
        model(x_of(2, 24))


class Attention(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, q):
        a = TF.scaled_dot_product_attention(q, q, q, dropout_p=self.p if self.training else 0.0)
        return TF.alpha_dropout(a, 0.2, self.training)


@pytest.fixture
def chain_at_every_size(monkeypatch):
    """These calls are small: let _attention.py's chain take them (MIN_SCORES is a speed
    choice, tested on its own below)."""
    from fusedreg.patching import _attention
    monkeypatch.setattr(_attention, "MIN_SCORES", 0)


def test_sdpa_dropout_runs_fused_on_cpu_and_alpha_dropout_is_left_in_torch(chain_at_every_size):
    model = fusedreg.patch(Attention(0.1)).train()
    model(x_of(2, 3, 5, 8))
    calls = report(model).dropout_calls
    assert calls == {"alpha dropout": {"fused": 0, "left in torch": 1},
                     "attention dropout inside scaled_dot_product_attention": {"fused": 1, "left in torch": 0}}
    assert "left in torch" in report(model).summary()
    # bfloat16: torch's own call (not one _attention.py takes), counted as left in torch
    model(x_of(2, 3, 5, 8).bfloat16())
    assert report(model).dropout_calls["attention dropout inside scaled_dot_product_attention"] == \
        {"fused": 0, "left in torch": 1}


def attention_reference(q, k, v, mask, p, causal, scale, seed):
    """softmax(q k^T * scale + mask) with fusedreg's mask of ``seed``, then @ v (float64)."""
    q, k, v = q.double(), k.double(), v.double()
    a = q @ k.transpose(-2, -1) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if causal:
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    if mask is not None:
        a = a + (torch.where(mask, 0.0, -torch.inf) if mask.dtype == torch.bool else mask.double())
    dead = torch.isneginf(a).all(-1, keepdim=True)  # a row that is all -inf: 0, as in torch
    a = torch.softmax(torch.where(dead, 0.0, a), -1) * ~dead
    keep = fusedreg.functional.dropout_mask(a.shape, p, seed)
    return (a * keep * float(torch.tensor(1 / (1 - p), dtype=torch.float32))) @ v  # fp32 scale,
                                                                                # as every dropout


@pytest.mark.parametrize("case", ["plain", "causal", "bool mask", "float mask", "float64",
                                  "head-transposed views", "3-D", "negative scale"])
def test_sdpa_dropout_is_torchs_math_with_the_seeded_mask(case, chain_at_every_size):
    # scaled_dot_product_attention with dropout on CPU (torch's math kernel) runs the same chain
    # with fusedreg's seeded dropout: output and gradients against a float64 reference with the
    # mask of the seed drawn from torch's generator; a fully masked row gives 0 as in torch
    g = torch.Generator().manual_seed(11)
    dtype = torch.float64 if case == "float64" else torch.float32
    L, S = 7, (7 if case == "causal" else 9)
    q = torch.randn(2, 3, L, 8, generator=g, dtype=dtype) + 0.5
    k = torch.randn(2, 3, S, 8, generator=g, dtype=dtype) - 0.3
    v = torch.randn(2, 3, S, 5, generator=g, dtype=dtype)
    mask, scale = None, None
    if case == "bool mask":
        mask = torch.rand(L, S, generator=g) > 0.3
        mask[2] = False
    elif case == "float mask":
        mask, scale = torch.randn(2, 1, L, S, generator=g, dtype=dtype), 0.2
    elif case == "negative scale":
        scale = -0.3
    elif case == "3-D":  # no head dim
        q, k, v = q[0], k[0], v[0]
    qkv = [t.clone().requires_grad_() for t in (q, k, v)]
    args = qkv
    if case == "head-transposed views":
        # as Hugging Face's models pass them: (batch, length, heads * dim) projections viewed
        # as (batch, heads, length, dim), strided, not contiguous
        args = [t.transpose(1, 2).contiguous().view(2, t.shape[2], -1)
                .view(2, t.shape[2], 3, t.shape[3]).transpose(1, 2) for t in qkv]
        assert not any(a.is_contiguous() for a in args)
    model = fusedreg.patch(nn.Module())  # the call-site routing runs during its forward
    model.forward = lambda: TF.scaled_dot_product_attention(*args, attn_mask=mask, dropout_p=0.3,
                                                            is_causal=case == "causal", scale=scale)
    torch.manual_seed(6)
    out = model()
    torch.manual_seed(6)
    seed = int(torch.randint(2**63 - 1, ()))  # the draw fusedreg's dropout makes
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_in, mask, 0.3, case == "causal", scale, seed)
    assert report(model).dropout_calls == {
        "attention dropout inside scaled_dot_product_attention": {"fused": 1, "left in torch": 0}}
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-5)
    torch.testing.assert_close(out, ref.to(dtype), **tol)  # matmuls and softmax in fp32
    grad = torch.randn(out.shape, generator=g, dtype=dtype)
    out.backward(grad)
    ref.backward(grad.double())
    for a, b in zip(qkv, ref_in):
        torch.testing.assert_close(a.grad, b.grad.to(dtype), **tol)
    if case == "bool mask":
        assert (out[:, :, 2] == 0).all()


def test_sdpa_calls_torch_refuses_or_does_not_run_in_its_math_kernel_stay_in_torch():
    q = x_of(2, 4, 5, 8)
    kv = x_of(2, 2, 5, 8)
    model = fusedreg.patch(nn.Module())
    model.forward = lambda *a, **k: TF.scaled_dot_product_attention(*a, **k)
    torch.manual_seed(2)
    out = model(q, kv, kv, dropout_p=0.2, enable_gqa=True)  # GQA: torch's own call
    torch.manual_seed(2)
    torch.testing.assert_close(out, TF.scaled_dot_product_attention(q, kv, kv, dropout_p=0.2,
                                                                    enable_gqa=True), atol=0, rtol=0)
    assert report(model).dropout_calls == {
        "attention dropout inside scaled_dot_product_attention": {"fused": 0, "left in torch": 1}}
    with pytest.raises(RuntimeError):  # torch's error: a mask with is_causal
        model(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), dropout_p=0.2, is_causal=True)
    with pytest.raises(TypeError):  # torch's error: an argument it does not take
        model(q, q, q, dropout=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: torch's own policy
        assert model(q, q, q, dropout_p=0.2).dtype == torch.bfloat16
    with torch.no_grad():  # eval-style call without dropout: torch's call, nothing counted
        torch.testing.assert_close(model(q, q, q), TF.scaled_dot_product_attention(q, q, q),
                                   atol=0, rtol=0)
    assert report(model).dropout_calls == {}


@pytest.mark.parametrize("heads,L", [(4, 31), (4, 32)])  # 15376 and 16384 scores
def test_small_sdpa_calls_stay_torchs_own(heads, L):
    # under MIN_SCORES attention scores torch's call is faster than the chain: it runs,
    # bit for bit what torch gives from the same generator state, counted as left in torch
    from fusedreg.patching import _attention
    assert _attention.MIN_SCORES == 1 << 14
    q = x_of(2, heads, L, 8)
    model = fusedreg.patch(nn.Module())
    model.forward = lambda q: TF.scaled_dot_product_attention(q, q, q, dropout_p=0.2)
    torch.manual_seed(9)
    out = model(q)
    fused = 2 * heads * L * L >= _attention.MIN_SCORES
    torch.manual_seed(9)
    if fused:
        seed = int(torch.randint(2**63 - 1, ()))
        expected = attention_reference(q, q, q, None, 0.2, False, None, seed).float()
        torch.testing.assert_close(out, expected, atol=2e-6, rtol=2e-5)
    else:
        torch.testing.assert_close(out, TF.scaled_dot_product_attention(q, q, q, dropout_p=0.2),
                                   atol=0, rtol=0)
    assert report(model).dropout_calls == {
        "attention dropout inside scaled_dot_product_attention":
            {"fused": int(fused), "left in torch": int(not fused)}}


class Blocks(nn.Module):
    """Functional dropout inside ModuleList blocks, optionally checkpointed."""

    def __init__(self, checkpoint):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Functional(p=0.5) for _ in range(2)])
        self.checkpoint = checkpoint

    def forward(self, x):
        for b in self.blocks:
            x = torch.utils.checkpoint.checkpoint(b, x, use_reentrant=False) if self.checkpoint else b(x)
        return x


def test_gradient_checkpointing_recomputes_the_same_masks():
    # backward recomputes each checkpointed block outside the root's forward: the block's own
    # hook must route its dropout to fusedreg again, with the same seed, or the grads are wrong
    x = x_of(16, 24)
    grads = []
    for checkpoint in (False, True):
        model = fusedreg.patch(Blocks(checkpoint)).train()
        torch.manual_seed(5)
        model(x).square().sum().backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_unpatch_removes_the_hooks():
    model = fusedreg.patch(Functional()).train()
    fusedreg.unpatch(model)
    assert not model._forward_pre_hooks and not model._forward_hooks
    torch.manual_seed(4)
    a = model(x_of(8, 24))
    torch.manual_seed(4)
    assert torch.equal(a, TF.dropout(model.fc(x_of(8, 24)), 0.3))  # torch's dropout again
    assert report(model).dropout_calls == {}


def test_hugging_face_eager_attention_dropout_is_fused():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                   max_position_embeddings=32, attention_dropout=0.1,
                                   attn_implementation="eager")
    torch.manual_seed(0)
    model = fusedreg.patch(transformers.LlamaForCausalLM(cfg)).train()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    # the eager attention calls nn.functional.dropout on the attention weights, once per layer
    assert report(model).dropout_calls == {"functional dropout": {"fused": 2, "left in torch": 0}}
    assert all(p.grad is not None for p in model.parameters())


def test_a_model_that_runs_compiled_has_no_hooks_on_its_root():
    # patch(fuse=True) and fusedreg.compile run the root compiled, where the hooks never route
    # and hooks on the root would make Dynamo compile the hooks and the forward as three frames
    # (each looked up on every call): none there; the blocks keep theirs (inlined in the graph,
    # and routing an eager call of a block, as checkpointing's recompute makes)
    def hooked(m):
        return _calls.HOOKS in m.__dict__ and bool(m._forward_pre_hooks) and bool(m._forward_hooks)

    eager = fusedreg.patch(Blocks(False))
    assert hooked(eager) and all(hooked(b) for b in eager.blocks)
    torch._dynamo.reset()
    for make in (lambda m: fusedreg.patch(m, fuse=True), fusedreg.compile,
                 lambda m: fusedreg.patch(fusedreg.patch(m), fuse=True)):  # hooked, then fused
        model = Blocks(False)
        run = make(model)
        assert not hooked(model) and not model._forward_pre_hooks and not model._forward_hooks
        assert all(hooked(b) for b in model.blocks)
        fusedreg.patch(model)  # patched again: still none on the root
        assert not hooked(model)
        x = x_of(16, 24).requires_grad_()
        run.train()(x).square().sum().backward()
        assert torch.isfinite(x.grad).all()
    fusedreg.unpatch(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
