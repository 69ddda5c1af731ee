"""fusedreg.patch recognizes norm classes of other libraries by what they compute
(fusedreg/patching/_norms.py): each real class below is patched and checked for eval equality
with the unpatched class (float32 and the half-precision dtype pairs the class accepts,
output dtype included), for gradients, and for unpatch; a class computing something else is
left alone and reported."""
import copy

import pytest
import torch
from torch import nn

import fusedreg
from fusedreg.patching import patched_modules, report
from tolerances import NORM_ATOL, PATCHED_MODEL

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")

from transformers.models.gemma.modeling_gemma import GemmaRMSNorm  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm  # noqa: E402
from transformers.models.t5.modeling_t5 import T5LayerNorm  # noqa: E402

D = 48
# class -> (constructor, input shape): channels-first LayerNorm2d takes (N, C, H, W)
CLASSES = {
    "T5LayerNorm": (lambda: T5LayerNorm(D, eps=1e-6), (5, 7, D)),
    "GemmaRMSNorm": (lambda: GemmaRMSNorm(D, eps=1e-6), (5, 7, D)),
    "Olmo2RMSNorm": (lambda: Olmo2RMSNorm(D, eps=1e-6), (5, 7, D)),
    "LlamaRMSNorm": (lambda: LlamaRMSNorm(D, eps=1e-6), (5, 7, D)),
    "timm.LayerNorm": (lambda: timm.layers.LayerNorm(D), (5, 7, D)),
    "timm.LayerNorm2d": (lambda: timm.layers.LayerNorm2d(D), (3, D, 5, 4)),
    "timm.RmsNorm": (lambda: timm.layers.RmsNorm(D), (5, 7, D)),
}


def make(name, seed=0):
    torch.manual_seed(seed)
    norm = CLASSES[name][0]()
    with torch.no_grad():  # weights and bias away from 1 and 0 (and from 0 for Gemma's 1 + w)
        for p in norm.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + 0.3)
    return norm


def x_of(name, dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(CLASSES[name][1], generator=g) * 3 + 1.5).to(dtype)  # non-zero mean


@pytest.mark.parametrize("name", list(CLASSES))
def test_class_is_patched_in_place_and_eval_output_equals(name):
    norm = make(name)
    ref = copy.deepcopy(norm)
    weight = norm.weight
    model = nn.Sequential(nn.Identity(), norm)
    fusedreg.patch(model)
    assert set(patched_modules(model)) == {"1"}
    assert model[1] is norm and isinstance(norm, type(ref)) and norm.weight is weight
    assert list(norm.state_dict()) == list(ref.state_dict())
    x = x_of(name)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), **PATCHED_MODEL[torch.float32])
    fusedreg.unpatch(model)
    assert type(norm) is type(ref)
    with torch.no_grad():
        torch.testing.assert_close(norm(x), ref(x), atol=0, rtol=0)


@pytest.mark.parametrize("name", list(CLASSES))
@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32),
                                             (torch.float16, torch.float16)])
def test_half_precision_dtype_and_error_follow_the_class(name, x_dtype, w_dtype):
    norm = make(name).to(w_dtype)
    ref = copy.deepcopy(norm)
    fusedreg.patch(norm)
    x = x_of(name, x_dtype)
    with torch.no_grad():
        try:
            expected = ref(x)
        except RuntimeError:
            pytest.skip(f"{name} refuses {x_dtype} input with {w_dtype} weight")
        got = norm(x)
        # the class run in float64 is the oracle; fusedreg's error is at most twice the class's
        oracle = copy.deepcopy(ref).double()(x.double())
    assert got.dtype == expected.dtype
    scale = max(1.0, float(oracle.abs().max()))
    err_ref = float((expected.double() - oracle).abs().max()) / scale
    err = float((got.double() - oracle).abs().max()) / scale
    assert err <= 2 * err_ref + NORM_ATOL["fwd"][x_dtype]


@pytest.mark.parametrize("name", list(CLASSES))
def test_gradients_equal_the_classs(name):
    norm, ref = make(name), make(name)
    fusedreg.patch(norm)
    x = x_of(name)
    grads = []
    for m in (norm, ref):
        xi = x.clone().requires_grad_()
        (m(xi) * torch.linspace(-1, 2, xi.shape[-1])).sum().backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)  # tolerances.REDUCTION[float32]


class ScaledNorm(nn.Module):
    """Named like a norm, computes something else: RMS without the eps inside the root."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))
        self.eps = 1e-6

    def forward(self, x):
        return self.weight * x / (x.pow(2).mean(-1, keepdim=True).sqrt() + self.eps)


def test_class_with_other_semantics_is_left_alone_and_reported():
    model = nn.Sequential(ScaledNorm(), timm.layers.GroupNorm1(4))
    fusedreg.patch(model)
    assert patched_modules(model) == {}
    assert type(model[0]) is ScaledNorm
    left = report(model).left_alone
    assert set(left) == {f"{ScaledNorm.__module__}.ScaledNorm", "timm.layers.norm.GroupNorm1"}
    assert "computes none" in left[f"{ScaledNorm.__module__}.ScaledNorm"]
    assert "left alone" in report(model).summary()


def test_norms_option_switches_it_off():
    model = nn.Sequential(make("T5LayerNorm"))
    fusedreg.patch(model, norms=False)
    assert patched_modules(model) == {}


def _tiny(config_cls, model_cls, **extra):
    cfg = config_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                     max_position_embeddings=32, head_dim=8, **extra)
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    return model


@pytest.mark.parametrize("arch", ["gemma", "olmo2"])
def test_whole_model_logits_equal(arch):
    if arch == "gemma":
        model = _tiny(transformers.GemmaConfig, transformers.GemmaForCausalLM)
    else:
        model = _tiny(transformers.Olmo2Config, transformers.Olmo2ForCausalLM)
    ref = copy.deepcopy(model)
    fusedreg.patch(model)
    n_norms = sum("RMSNorm" in type(m).__name__ for m in ref.modules())
    assert len(patched_modules(model)) >= n_norms > 0
    ids = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits,
                                   **PATCHED_MODEL[torch.float32])
