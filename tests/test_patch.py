"""fusedreg.patch / fusedreg.unpatch on a small torch model: every torch LayerNorm, RMSNorm and
Dropout becomes the fusedreg.nn class of the same name in place (docs/design.md, "Modules and
drop-in use"), and unpatch restores them."""
import copy
import logging
import sys

import pytest
import torch
from torch import nn

import fusedreg
import fusedreg.nn as fnn
from tolerances import PATCHED_MODEL

patch_module = sys.modules["fusedreg.patching"]
patched_modules = patch_module.patched_modules
# torch class -> the class patch swaps in for it
FUSED_CLASSES = {s.torch_class: s.fused_class for s in patch_module.SWAPS.values()}


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)
        self.norm2 = nn.RMSNorm(d, eps=1e-6)

    def forward(self, x):
        return x + self.norm2(self.drop(self.fc(self.norm1(x))))


class Net(nn.Module):
    """LayerNorm/RMSNorm/Dropout nested in Sequential, ModuleList and ModuleDict, one shared
    LayerNorm (two references, one module), a LayerNorm without bias and one without affine
    parameters, and modules patch must leave alone (a LayerNorm subclass, Dropout2d)."""

    class MyLayerNorm(nn.LayerNorm):  # a user subclass computing something else: left alone
        def forward(self, x):
            return super().forward(x) * 2.0

    def __init__(self, d=24):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(7, d), nn.Dropout(0.2), nn.LayerNorm(d, bias=False))
        self.blocks = nn.ModuleList([Block(d) for _ in range(2)])
        self.heads = nn.ModuleDict({"a": nn.Sequential(nn.RMSNorm(d), nn.Linear(d, 3)),
                                    "b": nn.Sequential(nn.LayerNorm(d, elementwise_affine=False),
                                                       nn.Linear(d, 3))})
        self.final_norm = nn.LayerNorm(d, eps=1e-3)
        self.tied = self.final_norm
        self.custom = Net.MyLayerNorm(d)
        self.drop2d = nn.Dropout2d(0.1)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = block(h)
        h = self.custom(self.tied(self.final_norm(h)))
        return self.heads["a"](h) + self.heads["b"](h)


def make_net(seed=0):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():  # non-trivial norm parameters, so that a wrong swap shows
        for name, p in net.named_parameters():
            if "norm" in name or name.startswith("heads"):
                p.add_(torch.randn_like(p) * 0.3)
    return net


def make_input(batch=5):
    # non-zero mean, odd row count
    return torch.randn(batch, 3, 7, generator=torch.Generator().manual_seed(1)) * 2 + 1.5


TORCH_CLASSES = (nn.LayerNorm, nn.RMSNorm, nn.Dropout)


def kinds(model):
    return {name: type(m) for name, m in model.named_modules()}


def test_patch_swaps_every_torch_module_in_place():
    net = make_net()
    before = kinds(net)
    objects = dict(net.named_modules())
    params = [id(p) for p in net.parameters()]
    keys = list(net.state_dict())

    assert fusedreg.patch(net) is net
    after = kinds(net)
    expected = {name: FUSED_CLASSES.get(cls, cls) if cls in TORCH_CLASSES else cls for name, cls in before.items()}
    assert after == expected
    swapped = {n for n, c in before.items() if c in TORCH_CLASSES}
    assert len(swapped) == 11  # 5 LayerNorm + 3 RMSNorm + 3 Dropout
    assert set(patched_modules(net)) == swapped
    assert type(net.custom) is Net.MyLayerNorm and type(net.drop2d) is nn.Dropout2d
    assert net.tied is net.final_norm and type(net.tied) is FUSED_CLASSES[nn.LayerNorm]
    assert dict(net.named_modules()) == objects  # the same objects, nothing rebuilt
    assert [id(p) for p in net.parameters()] == params
    assert list(net.state_dict()) == keys


def test_root_module_is_patched():
    drop = nn.Dropout(0.3)
    assert fusedreg.patch(drop) is drop
    assert type(drop) is FUSED_CLASSES[nn.Dropout] and isinstance(drop, fnn.Dropout) and drop.p == 0.3


def test_eval_outputs_equal_and_state_dict_round_trips():
    net = make_net()
    ref = copy.deepcopy(net).eval()
    fusedreg.patch(net).eval()
    x = make_input()
    torch.testing.assert_close(net(x), ref(x), **PATCHED_MODEL[torch.float32])
    # the state dict moves between patched and unpatched models both ways
    other = make_net(seed=3)
    other.load_state_dict(net.state_dict())
    torch.testing.assert_close(other.eval()(x), ref(x), atol=0, rtol=0)


def test_optimizer_built_before_patch_still_works():
    net = make_net()
    twin = copy.deepcopy(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.1)
    fusedreg.patch(net)
    net.eval(), twin.eval()  # no dropout: the two models compute the same function
    x = make_input()
    for model, o in ((net, opt), (twin, opt_twin)):
        o.zero_grad()
        model(x).square().mean().backward()
        o.step()
    for (name, p), q in zip(net.named_parameters(), twin.parameters()):
        assert p.grad is not None, name
        torch.testing.assert_close(p, q, **PATCHED_MODEL[torch.float32], msg=name)
    # the step moved the norm weights the optimizer was given before the swap
    assert not torch.equal(net.final_norm.weight, make_net().final_norm.weight)


def test_patched_dropout_is_fusedregs_and_trains():
    net = make_net()
    fusedreg.patch(net).train()
    x = torch.randn(64, 24) + 0.5
    drop = net.blocks[0].drop
    torch.manual_seed(123)
    out = drop(x)
    torch.manual_seed(123)  # the same draw of the seed gives fusedreg's mask for that seed
    torch.testing.assert_close(out, fusedreg.functional.dropout(x, 0.1), atol=0, rtol=0)
    loss = net(make_input()).square().mean()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_patch_twice_changes_nothing_and_unpatch_restores():
    net = make_net()
    before = kinds(net)
    dicts = {n: set(vars(m)) for n, m in net.named_modules()}
    params = [id(p) for p in net.parameters()]
    fusedreg.patch(net)
    once = kinds(net), dict(patched_modules(net))
    fusedreg.patch(net)
    assert (kinds(net), dict(patched_modules(net))) == once
    assert fusedreg.unpatch(net) is net
    assert kinds(net) == before
    assert patched_modules(net) == {}
    assert {n: set(vars(m)) for n, m in net.named_modules()} == dicts
    assert [id(p) for p in net.parameters()] == params
    x = make_input()
    torch.testing.assert_close(net.eval()(x), make_net().eval()(x), atol=0, rtol=0)
    assert fusedreg.unpatch(net) is net  # nothing left to restore: a no-op


def test_options_switch_kinds_off():
    net = fusedreg.patch(make_net(), dropout=False, rms_norm=False)
    assert type(net.embed[1]) is nn.Dropout and type(net.blocks[0].norm2) is nn.RMSNorm
    assert type(net.blocks[0].norm1) is FUSED_CLASSES[nn.LayerNorm]
    fusedreg.patch(net, layer_norm=False)  # a second call can add the other kinds
    assert type(net.embed[1]) is FUSED_CLASSES[nn.Dropout] and type(net.blocks[0].norm2) is FUSED_CLASSES[nn.RMSNorm]


def test_patch_logs_every_swap(caplog):
    net = make_net()
    with caplog.at_level(logging.INFO, logger="fusedreg.patch"):
        fusedreg.patch(net)
    assert "blocks.0.drop: torch.nn.Dropout -> fusedreg.patching.Dropout" in caplog.text
    assert "blocks.1.norm2: torch.nn.RMSNorm -> fusedreg.patching.RMSNorm" in caplog.text
    assert "embed.2: torch.nn.LayerNorm -> fusedreg.patching.LayerNorm" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fusedreg.patch"):
        fusedreg.unpatch(net)
    assert "restored 11 module(s) in Net" in caplog.text


def test_patch_logs_a_one_line_summary_at_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="fusedreg.patch"):
        fusedreg.patch(make_net())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "11 module(s) replaced" in warnings[0].getMessage()


def test_patch_swaps_in_the_drop_in_subclasses():
    # what patch swaps in is fusedreg.nn's class of the same name, a subclass of torch's
    for torch_cls, cls in FUSED_CLASSES.items():
        assert issubclass(cls, getattr(fnn, torch_cls.__name__)) and issubclass(cls, torch_cls)
        module = torch_cls(4) if torch_cls is not nn.Dropout else torch_cls(0.25)
        assert type(fusedreg.patch(module)) is cls


def _replace_target(monkeypatch, option, cls):
    """Makes patch swap in ``cls`` for ``option`` (a row of patch's table)."""
    monkeypatch.setitem(patch_module.SWAPS, option, patch_module.SWAPS[option]._replace(fused_class=cls))


def test_fusedreg_constructor_attributes_are_added_and_removed(monkeypatch):
    class WithBackend(nn.LayerNorm):  # a fused class whose __init__ sets a plain attribute
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.backend = "auto"

        def forward(self, x):
            assert self.backend == "auto"
            return super().forward(x)

    _replace_target(monkeypatch, "layer_norm", WithBackend)
    net = fusedreg.patch(make_net())
    assert type(net.final_norm) is WithBackend
    assert net.final_norm.backend == "auto"
    net(make_input())
    fusedreg.unpatch(net)
    assert type(net.final_norm) is nn.LayerNorm
    assert "backend" not in vars(net.final_norm)


@pytest.mark.parametrize("bad", ["not_a_subclass", "extra_parameter"])
def test_fusedreg_class_that_is_no_drop_in_is_refused(monkeypatch, bad):
    if bad == "not_a_subclass":  # cannot be built with LayerNorm's arguments
        cls = type("LayerNorm", (nn.Module,), {})
        match = "cannot build fusedreg.nn.LayerNorm"
    else:
        class cls(nn.LayerNorm):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.scale = nn.Parameter(torch.ones(()))
        match = "scale"
    _replace_target(monkeypatch, "layer_norm", cls)
    net = make_net()
    with pytest.raises(RuntimeError, match=match):
        fusedreg.patch(net, dropout=False, rms_norm=False)


def test_bad_input():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fusedreg.patch([nn.LayerNorm(4)])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fusedreg.unpatch("model")
    with pytest.raises(TypeError, match="unknown option.*'layernorm'.*layer_norm, rms_norm, dropout"):
        fusedreg.patch(nn.Linear(2, 2), layernorm=True)
    with pytest.raises(TypeError, match="dropout must be True or False"):
        fusedreg.patch(nn.Linear(2, 2), dropout="yes")
    net = make_net()
    with pytest.raises(TypeError):  # nothing is swapped when the call is refused
        fusedreg.patch(net, layer_norm=1)
    assert patched_modules(net) == {}


def test_compile_fullgraph_of_patched_model_matches_eager():
    torch._dynamo.reset()
    net = fusedreg.patch(make_net()).eval()
    x = make_input()
    compiled = torch.compile(net, fullgraph=True)
    torch.testing.assert_close(compiled(x), net(x), **PATCHED_MODEL[torch.float32])
    # training mode (fused dropout) compiles without a graph break and trains
    net.train()
    loss = compiled(x).square().mean()
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in net.parameters())


class ConvNet(nn.Module):
    """BatchNorm2d (one with track_running_stats=False, one without affine), BatchNorm1d and a
    SyncBatchNorm (single process: plain batch norm) around convolutions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.bn_batch = nn.BatchNorm2d(8, track_running_stats=False)
        self.bn_plain = nn.BatchNorm2d(8, affine=False, momentum=None)
        self.sync = nn.SyncBatchNorm(8)
        self.fc = nn.Linear(8, 5)
        self.bn1d = nn.BatchNorm1d(5)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = self.sync(self.bn_plain(self.bn_batch(h)))
        return self.bn1d(self.fc(h.mean((2, 3))))


def test_patch_swaps_batch_norms_in_place_and_back():
    torch.manual_seed(0)
    net = ConvNet()
    ref = copy.deepcopy(net)
    keys, params = list(net.state_dict()), [id(p) for p in net.parameters()]
    fusedreg.patch(net)
    for name, cls in (("bn", fnn.BatchNorm2d), ("bn_batch", fnn.BatchNorm2d),
                      ("bn_plain", fnn.BatchNorm2d), ("sync", fnn.SyncBatchNorm),
                      ("bn1d", fnn.BatchNorm1d)):
        assert type(getattr(net, name)) is cls, name
    assert list(net.state_dict()) == keys and [id(p) for p in net.parameters()] == params
    assert fusedreg.patching.report(net).modules["torch.nn.BatchNorm2d"] == 3
    # training (batch statistics, running-stat updates, cumulative average) and eval
    x = torch.randn(6, 3, 9, 9) + 2.0
    for train in (True, True, False):
        net.train(train), ref.train(train)
        torch.testing.assert_close(net(x), ref(x), **PATCHED_MODEL[torch.float32])
    for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, **PATCHED_MODEL[torch.float32])
    fusedreg.unpatch(net)
    assert type(net.bn) is nn.BatchNorm2d and type(net.sync) is nn.SyncBatchNorm


def test_patch_batch_norm_option_leaves_them_alone():
    net = ConvNet()
    fusedreg.patch(net, batch_norm=False)
    assert type(net.bn) is nn.BatchNorm2d and type(net.bn1d) is nn.BatchNorm1d
    assert "batch_norm" in patch_module.OPTIONS
