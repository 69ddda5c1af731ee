"""fusedreg.patch on real model code that nobody here wrote: Hugging Face
transformers GPT-2, BERT and Llama built from small configs with random weights (no
downloads). Runs when transformers is installed (the ``test`` extra installs it)."""
import copy
import sys

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

import fusedreg  # noqa: E402
from tolerances import PATCHED_MODEL  # noqa: E402

patched_modules = sys.modules["fusedreg.patching"].patched_modules
SMALL = dict(vocab_size=128, max_position_embeddings=64)


def gpt2():
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=128,
                                  resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, hidden_dropout_prob=0.1, **SMALL)
    return transformers.BertForMaskedLM(cfg)


def llama():
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, **SMALL)
    return transformers.LlamaForCausalLM(cfg)


# model -> {class the patch must replace: how many the config has}
MODELS = {
    "gpt2": (gpt2, {nn.LayerNorm: 5, nn.Dropout: 7}),   # ln_1, ln_2 per layer + ln_f; drop + 3/layer
    "bert": (bert, {nn.LayerNorm: 6, nn.Dropout: 7}),   # embeddings + 2/layer + MLM head transform
    "llama": (llama, {"LlamaRMSNorm": 5}),              # 2 per layer + final; no Dropout modules
}


def build(name, seed=0):
    torch.manual_seed(seed)
    model = MODELS[name][0]()
    with torch.no_grad():  # norm weights away from 1 so that a wrong weight would show
        for pname, p in model.named_parameters():
            if "norm" in pname.lower() or "ln_" in pname:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def tokens(batch=3, seq=17):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(5))


def logits(model, ids):
    return model(input_ids=ids).logits


def class_key_of(t):
    return t if t in (nn.LayerNorm, nn.Dropout, nn.RMSNorm) else t.__name__


def class_key(m):
    return class_key_of(type(m))


@pytest.mark.parametrize("name", list(MODELS))
def test_patch_replaces_norms_and_dropout_keeping_parameters(name):
    model = build(name)
    counts = {}
    for m in model.modules():
        counts[class_key(m)] = counts.get(class_key(m), 0) + 1
    expected = MODELS[name][1]
    assert {k: counts.get(k, 0) for k in expected} == expected
    params = {n: id(p) for n, p in model.named_parameters()}
    keys = list(model.state_dict())

    fusedreg.patch(model)
    replaced = patched_modules(model)
    kinds = [k for k in (class_key_of(orig) for orig, _ in replaced.values()) if k in expected]
    assert len(kinds) == sum(expected.values())
    left = [n for n, m in model.named_modules() if class_key(m) in expected and n not in replaced]
    assert left == []  # nothing of the replaced kinds is left in the model
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert list(model.state_dict()) == keys


@pytest.mark.parametrize("name", list(MODELS))
def test_patched_eval_output_equals_unpatched(name):
    model = build(name).eval()
    ref = copy.deepcopy(model)
    fusedreg.patch(model)
    ids = tokens()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), logits(ref, ids), **PATCHED_MODEL[torch.float32])


@pytest.mark.parametrize("name", list(MODELS))
def test_training_step_runs_with_optimizer_built_before_patch(name):
    model = build(name).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fusedreg.patch(model)
    ids = tokens()
    for _ in range(2):
        opt.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    norm_weights = [n for n in before if ("norm" in n.lower() or "ln_" in n) and n.endswith("weight")]
    assert norm_weights and set(norm_weights) <= set(moved)


@pytest.mark.parametrize("name", list(MODELS))
def test_unpatch_restores_the_original_modules(name):
    model = build(name).eval()
    objects = {n: m for n, m in model.named_modules()}
    kinds = {n: type(m) for n, m in objects.items()}
    ids = tokens()
    with torch.no_grad():
        expected = logits(model, ids)
    fusedreg.unpatch(fusedreg.patch(model))
    assert {n: type(m) for n, m in model.named_modules()} == kinds
    # class swaps keep the object; rebuilt Llama norms get their original object back
    assert all(m is objects[n] for n, m in model.named_modules())
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), expected, atol=0, rtol=0)


def test_llama_norms_stay_the_same_objects_with_a_fused_class():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    model = build("llama")
    norm = model.model.layers[1].post_attention_layernorm
    weight = norm.weight
    fusedreg.patch(model)
    assert model.model.layers[1].post_attention_layernorm is norm and norm.weight is weight
    assert isinstance(norm, LlamaRMSNorm) and type(norm) is not LlamaRMSNorm
    spec = norm._fusedreg_norm_spec
    assert spec.rms and not spec.offset and spec.eps == norm.variance_epsilon and spec.shape == (64,)
    assert spec.out == "promote"  # weight * x.to(input dtype): the output dtype promotes


def test_gemma_norm_is_recognized_as_one_plus_weight():
    gemma = pytest.importorskip("transformers.models.gemma.modeling_gemma")
    model = nn.Sequential(nn.Linear(8, 8), gemma.GemmaRMSNorm(8))
    fusedreg.patch(model)
    assert isinstance(model[1], gemma.GemmaRMSNorm) and set(patched_modules(model)) == {"1"}
    assert model[1]._fusedreg_norm_spec.offset and model[1]._fusedreg_norm_spec.out == "input"


def test_compile_fullgraph_of_patched_gpt2_matches_eager():
    torch._dynamo.reset()
    model = fusedreg.patch(build("gpt2")).eval()
    ids = tokens()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        out = compiled(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(out, model(input_ids=ids, use_cache=False).logits,
                                   **PATCHED_MODEL[torch.float32])
