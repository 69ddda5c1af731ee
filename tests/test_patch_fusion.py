"""The fusions without rewriting the model (fusedreg/patching/fx.py): dropout -> residual add
(-> LayerNorm/RMSNorm) and bias -> activation (-> dropout) fused in the graphs Dynamo captures,
run eagerly (``fusedreg.patch(model, fuse=True)``) or by Inductor (``fusedreg.compile``).

Checked on a small block and on GPT-2, BERT, Llama, T5 (transformers) and ViT (timm) at tiny
configs: losses at dropout 0 equal the unpatched model's to rounding, the fused ops ran
(counted per pattern), gradients flow, and with dropout the masks are fusedreg's seeded ones
(the fused graph gives what the patched model gives eagerly from the same torch seed)."""
import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import fusedreg
from fusedreg import backends
from fusedreg.patching import fx, report
from tolerances import PATCHED_MODEL


class Block(nn.Module):
    """Pre-norm block: ln -> linear -> gelu (bias) -> dropout -> + residual, then a post-norm
    dropout -> + residual -> LayerNorm, and an add -> RMSNorm."""

    def __init__(self, d=32, p=0.2):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)
        self.drop = nn.Dropout(p)
        self.ln2 = nn.LayerNorm(d)
        self.rms = nn.RMSNorm(d, eps=1e-6)
        self.p = p

    def forward(self, x):
        h = self.down(TF.gelu(self.up(self.ln1(x)), approximate="tanh"))
        x = x + self.drop(h)                                   # dropout + add (+ ln2 below)
        y = self.ln2(x)
        z = TF.dropout(y @ torch.ones(y.shape[-1], y.shape[-1]) / 8, self.p, self.training)
        return self.rms(z + x) + x                             # add + rms (prenorm: x reused)


def make_block(seed=0, p=0.2):
    torch.manual_seed(seed)
    block = Block(p=p)
    with torch.no_grad():
        for n, q in block.named_parameters():
            if "ln" in n or "rms" in n:
                q.add_(torch.randn_like(q) * 0.3)
    return block


def x_of(shape=(3, 7, 32)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 2 + 0.5


@pytest.fixture
def fuse_small_layer_norms(monkeypatch):
    """Small blocks: let the pass fuse add + layer_norm and replace layer_norm at their size
    (auto's size limit, under which torch's nodes stay, is tested on its own below)."""
    monkeypatch.setitem(backends.AUTO_TORCH_BELOW, "layer_norm", {"cpu": (0, 0)})


@pytest.fixture
def fuse_small_activations(monkeypatch):
    """Small blocks: let the pass replace bias + gelu_tanh without a dropout at their size
    (the size limit itself is tested on its own below); the other CPU limits stay."""
    monkeypatch.setitem(fx.ACT_WITHOUT_DROPOUT, "cpu", {**fx.ACT_WITHOUT_DROPOUT["cpu"], "gelu_tanh": 0})


def test_block_patterns_are_fused_and_equal_unpatched_at_dropout_0(fuse_small_layer_norms,
                                                                     fuse_small_activations):
    torch._dynamo.reset()
    block = make_block(p=0.0).train()
    ref = copy.deepcopy(block)
    fusedreg.patch(block, fuse=True)
    x = x_of()
    torch.testing.assert_close(block(x), ref(x), **PATCHED_MODEL[torch.float32])
    fused = report(block).fusions
    assert fused[fx.BIAS_ACT] == 1 and fused[fx.ADD_NORM] == 2 and fused[fx.NORM] == 1


@pytest.mark.parametrize("limit", [0, 1 << 19])
def test_small_layer_norms_stay_torchs_under_auto(monkeypatch, limit):
    # under auto, a layer_norm (or add + layer_norm without a dropout) with fewer elements
    # than AUTO_TORCH_BELOW's limit keeps torch's nodes (faster there); at the limit it fuses;
    # an explicit backend always fuses; the outputs equal the unpatched block's either way
    monkeypatch.setitem(backends.AUTO_TORCH_BELOW, "layer_norm", {"cpu": (0, limit)})
    for backend in ("auto", "cpu"):
        torch._dynamo.reset()
        block = make_block(p=0.0).train()
        ref = copy.deepcopy(block)
        fusedreg.patch(block, fuse=True)
        x = x_of()
        with fusedreg.use_backend(backend):
            torch.testing.assert_close(block(x), ref(x), **PATCHED_MODEL[torch.float32])
        fused = report(block).fusions
        kept = backend == "auto" and x.numel() < limit
        # ln1 and the add + ln2 kept (torch's add + layer_norm); the add + RMSNorm fuses at
        # every size (torch's rms_norm is a composite the fused call beats)
        assert fused.get(fx.SMALL_NORM, 0) == (2 if kept else 0)
        assert fused.get(fx.ADD_NORM, 0) == (1 if kept else 2)
        assert fused.get(fx.NORM, 0) == (0 if kept else 1)


def test_block_masks_are_fusedregs_seeded_ones(fuse_small_activations):
    # the fused graph draws one seed per dropout in the model's order, like eager fusedreg
    torch._dynamo.reset()
    eager, fused = fusedreg.patch(make_block()).train(), fusedreg.patch(make_block(), fuse=True).train()
    x = x_of().requires_grad_()
    outs = []
    for m in (eager, fused):
        torch.manual_seed(3)
        out = m(x)
        out.square().sum().backward()
        outs.append((out, [p.grad for p in m.parameters()]))
    torch.testing.assert_close(outs[1][0], outs[0][0], **PATCHED_MODEL[torch.float32])
    for a, b in zip(outs[0][1], outs[1][1]):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)  # tolerances.REDUCTION[float32]
    stats = report(fused).fusions
    assert stats[fx.DROPOUT_ADD_NORM] == 2 and stats[fx.BIAS_ACT] == 1
    assert not torch.equal(outs[0][0], make_block().eval()(x))  # dropout acted


@pytest.mark.parametrize("rows", [7, 600])
def test_bias_activation_without_dropout_replaced_from_its_size_limit(rows, monkeypatch):
    # bias + gelu_tanh with no dropout after it: torch's nodes below the CPU limit (fusedreg's
    # call costs more than torch's activation there), fusedreg's fused op from it up; the
    # result is the unpatched block's either way (the limits of kernels at AVX2 or above,
    # whatever this machine's level)
    monkeypatch.setitem(fx.ACT_WITHOUT_DROPOUT, "cpu", fx._cpu_activation_limits("avx2"))
    torch._dynamo.reset()
    limit = fx.ACT_WITHOUT_DROPOUT["cpu"]["gelu_tanh"]
    block = make_block(p=0.0).train()
    ref = copy.deepcopy(block)
    fusedreg.patch(block, fuse=True)
    x = x_of((1, rows, 32))
    assert (rows * 64 >= limit) == (rows == 600)  # the up projection's output: 64 wide
    torch.testing.assert_close(block(x), ref(x), **PATCHED_MODEL[torch.float32])
    assert report(block).fusions.get(fx.BIAS_ACT, 0) == (1 if rows * 64 >= limit else 0)


def test_unpatch_removes_the_fusion():
    block = fusedreg.patch(make_block(), fuse=True)
    fusedreg.unpatch(block)
    assert block._compiled_call_impl is None and report(block).fusions == {}


def test_autocast_dtype_change_is_left_alone():
    # under CPU autocast the graph's layer_norm returns float32 for bfloat16 input, which no
    # fusedreg call returns: that norm stays in torch (and is counted)
    torch._dynamo.reset()
    block = fusedreg.patch(make_block(p=0.0), fuse=True).train()
    ref = make_block(p=0.0).train()
    x = x_of()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = block(x), ref(x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=2e-2)  # bf16 matmuls, 2 roundings


# ---- real models --------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")


def build(name, p):
    torch.manual_seed(0)
    if name == "vit":
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                 embed_dim=32, depth=2, num_heads=2, num_classes=10, drop_rate=p,
                                 pos_drop_rate=p, proj_drop_rate=p, attn_drop_rate=0.0)
    small = dict(vocab_size=64)
    if name == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=32, resid_pdrop=p,
                                      embd_pdrop=p, attn_pdrop=0.0, **small)
        return transformers.GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, hidden_dropout_prob=p,
                                      attention_probs_dropout_prob=0.0, max_position_embeddings=32, **small)
        return transformers.BertForMaskedLM(cfg)
    if name == "llama":
        cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2,
                                       max_position_embeddings=32, attention_dropout=p, **small)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.T5Config(d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, dropout_rate=p,
                                decoder_start_token_id=0, pad_token_id=0, **small)
    return transformers.T5ForConditionalGeneration(cfg)


def loss_of(name, model):
    g = torch.Generator().manual_seed(4)
    if name == "vit":
        return TF.cross_entropy(model(torch.randn(2, 3, 32, 32, generator=g) + 0.5), torch.tensor([1, 7]))
    ids = torch.randint(0, 64, (2, 12), generator=g)
    return model(input_ids=ids, labels=ids).loss


# name -> patterns the fused graphs must contain at least once (tiny configs, training)
EXPECTED = {
    "gpt2": {fx.BIAS_ACT, fx.DROPOUT_ADD_NORM},   # c_fc + gelu_tanh; resid dropout + add + ln
    "bert": {fx.DROPOUT_ADD_NORM},                # post-norm output (+ intermediate's bias + gelu below)
    "llama": {fx.ADD_NORM, fx.ATTENTION},         # residual add + RMSNorm; SDPA's dropout
    "t5": {fx.BIAS_ACT, fx.DROPOUT_ADD_NORM},     # relu + dropout (no bias); dropout + add + norm
    "vit": {fx.BIAS_ACT, fx.DROPOUT_ADD_NORM},    # fc1 + gelu + drop1; proj_drop + add + norm2
}


# GPT-2 and T5 take the longest to capture: they run with the slow tests
CHEAP = ("bert", "llama", "vit")


@pytest.mark.parametrize("name", [n if n in CHEAP else pytest.param(n, marks=pytest.mark.slow)
                                  for n in EXPECTED])
def test_real_model_fused_eagerly(name, fuse_small_activations):
    # with dropout, training: the fused graph's loss equals the patched eager model's from the
    # same torch seed (same seeded masks, one seed per dropout in the model's order) and,
    # through it, the unpatched model's function; the fused ops ran; gradients flow
    torch._dynamo.reset()
    eager, model = fusedreg.patch(build(name, 0.1)).train(), build(name, 0.1).train()
    fusedreg.patch(model, fuse=True)
    torch.manual_seed(8)
    loss = loss_of(name, model)
    torch.manual_seed(8)
    torch.testing.assert_close(loss, loss_of(name, eager), **PATCHED_MODEL[torch.float32])
    loss.backward()
    stats = report(model).fusions
    missing = {k for k in EXPECTED[name] if not stats.get(k)}
    assert not missing, stats
    if name == "bert":  # bias + gelu (erf) with no dropout: fused where the CPU kernels run AVX-512
        assert bool(stats.get(fx.BIAS_ACT)) == ("gelu" in fx.ACT_WITHOUT_DROPOUT["cpu"]), stats
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    assert sum(g is not None for g in grads) >= len(grads) - 1  # T5's tied/unused at most one


def test_real_model_at_dropout_0_equals_unpatched(fuse_small_layer_norms):
    torch._dynamo.reset()
    model, ref = build("bert", 0.0).train(), build("bert", 0.0).train()
    fusedreg.patch(model, fuse=True)
    torch.testing.assert_close(loss_of("bert", model), loss_of("bert", ref), **PATCHED_MODEL[torch.float32])
    assert report(model).fusions[fx.ADD_NORM] >= 4  # dropout 0: the adds + norms still fused


@pytest.mark.parametrize("rows, limit, replaced", [(63, None, False), (64, None, True),
                                                  (3, 0, True)])
def test_inductor_leaves_small_dropouts_to_inductor(monkeypatch, rows, limit, replaced):
    # the pass as fusedreg.compile runs it (inductor=True), without Inductor's code generation:
    # a dropout of fewer than INDUCTOR_DROPOUT_FROM elements stays in the graph (Inductor fuses
    # it), counted; from the limit up it is replaced. Block: 32 features, so 63 rows are 2016
    # elements and 64 rows 2048.
    if limit is not None:
        monkeypatch.setattr(fx, "INDUCTOR_DROPOUT_FROM", limit)
    assert fx.INDUCTOR_DROPOUT_FROM == (2048 if limit is None else limit)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(fx.rewrite(gm, inductor=True))
        return gm.forward
    torch._dynamo.reset()
    block = make_block(p=0.2).train()
    out = torch.compile(block, backend=backend)(x_of((rows, 32)))
    assert out.shape == (rows, 32)
    stats = fx._total(graphs)
    if replaced:
        assert stats.get(fx.DROPOUT_ADD_NORM) == 2 and fx.SMALL_DROPOUT not in stats, stats
    else:
        assert stats.get(fx.SMALL_DROPOUT) == 2 and fx.DROPOUT_ADD_NORM not in stats, stats


@pytest.mark.parametrize("length, replaced", [(8, False), (32, True)])
def test_inductor_leaves_small_attention_dropout_to_inductor(length, replaced):
    # SDPA's dropout under the pass as fusedreg.compile runs it: 2 x 2 x L x L scores, 256 at
    # L = 8 (left to Inductor, counted) and 4096 at L = 32 (fusedreg's chain)
    class Attn(nn.Module):
        def forward(self, q, k, v):
            return TF.scaled_dot_product_attention(q, k, v, dropout_p=0.1)

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(fx.rewrite(gm, inductor=True))
        return gm.forward
    torch._dynamo.reset()
    q, k, v = (torch.randn(2, 2, length, 16) for _ in range(3))
    out = torch.compile(Attn(), backend=backend)(q, k, v)
    assert out.shape == q.shape
    stats = fx._total(graphs)
    if replaced:
        assert stats.get(fx.ATTENTION) == 1 and fx.SMALL_DROPOUT not in stats, stats
    else:
        assert stats.get(fx.SMALL_DROPOUT) == 1 and fx.ATTENTION not in stats, stats


@pytest.mark.slow
def test_fusedreg_compile_with_inductor_matches_eager(monkeypatch):
    monkeypatch.setattr(fx, "INDUCTOR_DROPOUT_FROM", 0)  # a small block: replace its dropouts
    torch._dynamo.reset()
    block, ref = make_block(p=0.0).train(), make_block(p=0.0).train()
    compiled = fusedreg.compile(block)
    x = x_of()
    torch.testing.assert_close(compiled(x), ref(x), **PATCHED_MODEL[torch.float32])
    # no dropout to fuse: Inductor fuses the bias + gelu and the adds + norms itself
    assert report(block).fusions == {}
    block.p = 0.2  # dropout on (a recompile): trains, masks from fusedreg's seeded function
    block.drop.p = 0.2
    out = compiled(x)
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in block.parameters())
    assert report(block).fusions[fx.DROPOUT_ADD_NORM] >= 1


def test_compile_backend_alone_and_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fusedreg.compile(lambda x: x)
    with pytest.raises(TypeError, match="chooses the backend"):
        fusedreg.compile(nn.Linear(2, 2), backend="eager")
    with pytest.raises(TypeError, match="fuse must be True or False"):
        fusedreg.patch(nn.Linear(2, 2), fuse=1)


def test_gpt2_under_bf16_autocast_matches_unpatched():
    # autocast: bf16 matmul outputs meet the fp32 residual stream and fp32 norm weights (the
    # fused graph under autocast: test_autocast_dtype_change_is_left_alone)
    model, ref = build("gpt2", 0.0).train(), build("gpt2", 0.0).train()
    fusedreg.patch(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, expected = loss_of("gpt2", model), loss_of("gpt2", ref)
    assert loss.dtype == expected.dtype
    torch.testing.assert_close(loss, expected, atol=2e-2, rtol=1e-2)  # bf16 matmuls: ~2^-8 each
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


class Attention(nn.Module):
    def __init__(self, p=0.3):
        super().__init__()
        self.proj = nn.Linear(16, 16)
        self.p = p

    def forward(self, x, mask):
        q = self.proj(x).unflatten(-1, (2, 8)).transpose(1, 2)  # (B, heads, L, 8)
        a = TF.scaled_dot_product_attention(q, q, q, attn_mask=mask,
                                            dropout_p=self.p if self.training else 0.0)
        return a.transpose(1, 2).flatten(2)


@pytest.mark.parametrize("how", ["patch(fuse=True)",
                                 pytest.param("fusedreg.compile", marks=pytest.mark.slow)])
def test_attention_dropout_in_graphs_uses_the_seeded_mask(how, monkeypatch):
    # SDPA's dropout (CPU: torch's math kernel) in a captured graph runs the chain of
    # _attention.py with fusedreg's dropout, eagerly or compiled by Inductor: the same output
    # and gradients as the patched eager model from the same torch seed (Inductor drawing its
    # random numbers from torch's generator, fallback_random, so that the seeds are the same)
    import torch._inductor.config as inductor_config
    from fusedreg.patching import _attention
    monkeypatch.setattr(_attention, "MIN_SCORES", 0)  # a small call: the chain at every size
    monkeypatch.setattr(fx, "INDUCTOR_DROPOUT_FROM", 0)  # and under Inductor
    with inductor_config.patch(fallback_random=True):
        _attention_dropout_in_graphs(how)


def _attention_dropout_in_graphs(how):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = fusedreg.patch(Attention()).train()
    model = copy.deepcopy(eager)
    run = fusedreg.patch(model, fuse=True) if how == "patch(fuse=True)" else fusedreg.compile(model)
    x = x_of((3, 7, 16))
    mask = torch.rand(7, 7, generator=torch.Generator().manual_seed(2)) > 0.2
    outs = []
    for m in (eager, run):
        torch.manual_seed(5)
        out = m(x, mask)
        out.square().sum().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], **PATCHED_MODEL[torch.float32])
    for a, b in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-4, rtol=1e-4)  # tolerances.REDUCTION
    assert report(model).fusions[fx.ATTENTION] >= 1
    assert report(eager).dropout_calls == {
        "attention dropout inside scaled_dot_product_attention": {"fused": 1, "left in torch": 0}}


def test_activation_size_limits_and_symbolic_sizes(monkeypatch):
    # a limit of 0 (every CUDA activation) holds at every size, a symbolic one included; a
    # positive limit (CPU gelu_tanh) needs a concrete size at or above it. The CPU limits of
    # kernels at AVX-512, whatever this machine's level (the level's choice: tested below).
    monkeypatch.setitem(fx.ACT_WITHOUT_DROPOUT, "cpu", fx._cpu_activation_limits("avx512"))
    from types import SimpleNamespace
    def traced(device, n):
        return SimpleNamespace(device=SimpleNamespace(type=device), numel=lambda: n)
    symbolic = object()  # stands for a SymInt: not an int
    limit = fx.ACT_WITHOUT_DROPOUT["cpu"]["gelu_tanh"]
    assert fx._activation_faster("gelu", traced("cuda", symbolic))
    assert fx._activation_faster("gelu_tanh", traced("cpu", limit))
    assert not fx._activation_faster("gelu_tanh", traced("cpu", limit - 1))
    assert not fx._activation_faster("gelu_tanh", traced("cpu", symbolic))
    # erf gelu on CPU at AVX-512: fusedreg's at every size
    assert fx._activation_faster("gelu", traced("cpu", symbolic))
    assert fx._activation_faster("gelu", traced("cpu", 1))
    monkeypatch.setitem(fx.ACT_WITHOUT_DROPOUT, "cpu", fx._cpu_activation_limits("baseline"))
    assert not fx._activation_faster("gelu_tanh", traced("cpu", 1 << 20))


@pytest.mark.parametrize("level", ["baseline", "avx2"])
def test_cpu_gelu_limit_follows_the_kernels_level(level, monkeypatch):
    # FUSEDREG_CPU_ISA below avx512 (what the kernels read once, fusedreg/cpu/isa.h): no
    # AVX-512 GELU table, and torch's gelu is the faster one
    monkeypatch.setenv("FUSEDREG_CPU_ISA", level)
    assert not fx._cpu_kernels_at_avx512()
    assert fx._cpu_kernels_level() == (level if torch.cpu._is_avx2_supported() else "baseline")
    monkeypatch.setenv("FUSEDREG_CPU_ISA", "avx512")
    assert fx._cpu_kernels_at_avx512() == torch.cpu._is_avx512_supported()


def test_cpu_activation_limits_per_level():
    # erf gelu fused from AVX-512 (its GELU table), gelu_tanh from AVX2, nothing at baseline
    assert fx._cpu_activation_limits("avx512") == {"gelu_tanh": 1 << 14, "gelu": 0}
    assert fx._cpu_activation_limits("avx2") == {"gelu_tanh": 1 << 14}
    assert fx._cpu_activation_limits("baseline") == {}
    assert fx.ACT_WITHOUT_DROPOUT["cpu"] == fx._cpu_activation_limits(fx._cpu_kernels_level())
