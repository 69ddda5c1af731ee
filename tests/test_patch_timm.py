"""fusedreg.patch on a timm Vision Transformer, built with
``timm.create_model(..., pretrained=False)`` from a small config: random weights, no
downloads. Runs when timm is installed (the ``test`` extra installs it).

timm builds its ViT norms from ``timm.layers.LayerNorm``, a torch.nn.LayerNorm subclass with its
own ``forward``: patch recognizes it by what it computes (fusedreg/patching/_norms.py) and
gives it a fused class; with ``norm_layer=torch.nn.LayerNorm`` (a timm option) the norms are
torch's and are swapped like any torch LayerNorm."""
import copy
import sys

import pytest
import torch
from torch import nn

timm = pytest.importorskip("timm")

import fusedreg  # noqa: E402
from tolerances import PATCHED_MODEL  # noqa: E402

patched_modules = sys.modules["fusedreg.patching"].patched_modules
FUSED_CLASSES = {s.torch_class: s.fused_class for s in fusedreg.patching.SWAPS.values()}

# 32x32 images in 8x8 patches: 16 tokens + the class token; every dropout rate non-zero so
# that each Dropout site is a module (timm makes Identity for rate 0)
SMALL = dict(pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4,
             num_classes=10, drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1,
             attn_drop_rate=0.1)
# norm_layer -> {class patch must replace: count}. Dropouts: pos_drop, head_drop and per block
# attn_drop, attn proj_drop, mlp drop1, drop2; LayerNorms: norm1, norm2 per block + final norm.
CONFIGS = {
    "timm_norms": (None, {nn.Dropout: 10, timm.layers.LayerNorm: 5}),
    "torch_norms": (nn.LayerNorm, {nn.Dropout: 10, nn.LayerNorm: 5}),
}


def build(config, seed=0):
    norm_layer, _ = CONFIGS[config]
    torch.manual_seed(seed)
    extra = {"norm_layer": norm_layer} if norm_layer is not None else {}
    model = timm.create_model("vit_tiny_patch16_224", **SMALL, **extra)
    with torch.no_grad():  # norm weights and biases away from 1 and 0 so that a wrong one would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    return model


def images(batch=3):
    g = torch.Generator().manual_seed(5)
    return torch.randn(batch, 3, 32, 32, generator=g) + 0.5  # non-zero mean


@pytest.mark.parametrize("config", list(CONFIGS))
def test_patch_replaces_the_torch_modules_of_a_vit(config):
    model = build(config)
    expected = CONFIGS[config][1]
    params = {n: id(p) for n, p in model.named_parameters()}
    keys = list(model.state_dict())
    fusedreg.patch(model)
    replaced = patched_modules(model)
    got = {}
    for original, _ in replaced.values():
        got[original] = got.get(original, 0) + 1
    assert got == expected
    assert [n for n, m in model.named_modules() if type(m) in (nn.LayerNorm, nn.Dropout)] == []
    assert all(type(m) is FUSED_CLASSES[orig] for m, (orig, _) in
               ((model.get_submodule(n), v) for n, v in replaced.items()) if orig in FUSED_CLASSES)
    assert {n: id(p) for n, p in model.named_parameters()} == params
    assert list(model.state_dict()) == keys
    if config == "timm_norms":  # timm's own LayerNorm subclass: recognized, same objects
        assert sum(isinstance(m, timm.layers.LayerNorm) and type(m) is not timm.layers.LayerNorm
                   for m in model.modules()) == 5


@pytest.mark.parametrize("config", list(CONFIGS))
def test_patched_vit_eval_output_equals_unpatched(config):
    model = build(config).eval()
    ref = copy.deepcopy(model)
    fusedreg.patch(model)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **PATCHED_MODEL[torch.float32])


@pytest.mark.parametrize("config", list(CONFIGS))
def test_vit_training_step_runs_with_optimizer_built_before_patch(config):
    model = build(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    fusedreg.patch(model)
    x, y = images(), torch.arange(3) % 10
    for _ in range(2):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == set(before)  # every parameter, the norms' included, was trained


def test_vit_train_mode_dropout_is_fusedreg_and_unpatch_restores():
    model = build("torch_norms").train()
    x = images()
    fusedreg.patch(model)
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(1)
    assert torch.equal(model(x), a)  # fusedreg masks come from torch's seed: reproducible
    assert not torch.equal(a, model.eval()(x))  # and dropout did act in train mode
    fusedreg.unpatch(model)
    assert patched_modules(model) == {}
    assert {type(m) for m in model.modules()} >= {nn.LayerNorm, nn.Dropout}
