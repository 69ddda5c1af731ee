"""torch.func transforms and forward-mode AD over fusedreg's batch_norm / batch_norm_act and
the BatchNorm modules, against what the same transforms give with torch's F.batch_norm and
nn.BatchNorm2d (and torch's composite act(bn(x) + residual)) in the same situations: eval;
training without running stats; training with running stats (updated in place as torch's
kernel updates them, except under vmap of a batched input, which torch and fusedreg refuse).
float64, so that the composite and ATen's kernel agree to a few ulps."""
import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import forward_ad as fwAD
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vmap

import fusedreg
from fusedreg import functional as F

TOL = dict(rtol=1e-9, atol=1e-10)  # float64: the composite and ATen's kernel round differently
C = 3
SITUATIONS = ["eval", "train", "train-stats"]  # running stats: eval and train-stats only


def _data(shape, seed, offset=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64) * 1.5 + offset  # mean != 0


def _setup(situation):
    """(training, running_mean, running_var, weight, bias): fresh buffers each call."""
    w, b = _data((C,), 1, 1.0), _data((C,), 2, 0.0)
    if situation == "train":
        return True, None, None, w, b
    rm, rv = _data((C,), 3, 0.5), _data((C,), 4, 0.0).abs() + 0.5
    return situation != "eval", rm, rv, w, b


def _torch_act(act):
    return {None: lambda t: t, "relu": torch.relu, "silu": TF.silu}[act]


def _pair(situation, act=None, res=None):
    """(fusedreg fn, torch fn, fusedreg buffers, torch buffers): fn(x, w, b) -> y with x
    (N, C, L), each side with its own copy of the running stats."""
    training, rm, rv, w, b = _setup(situation)
    bufs = [(rm, rv), (None if rm is None else rm.clone(), None if rv is None else rv.clone())]

    def ours(x, w, b, r=res):
        return F.batch_norm_act(x, *bufs[0], w, b, training, activation=act, residual=r)

    def theirs(x, w, b, r=res):
        y = TF.batch_norm(x, *bufs[1], w, b, training)
        return _torch_act(act)(y + r if r is not None else y)

    return ours, theirs, bufs, (w, b)


def _same(a, c):
    if isinstance(a, (tuple, list)):
        for u, v in zip(a, c):
            _same(u, v)
    else:
        torch.testing.assert_close(a, c, **TOL)


def _check_buffers(bufs):
    for u, v in zip(*bufs):
        if u is not None:
            torch.testing.assert_close(u, v, **TOL)


def _loss(f):
    def loss(x, w, b):
        y = f(x, w, b)
        return (y.sin() * torch.arange(1.0, y.numel() + 1, dtype=y.dtype).view(y.shape)).sum()
    return loss


@pytest.mark.parametrize("act,residual", [(None, False), ("relu", True), ("silu", True)])
@pytest.mark.parametrize("situation", SITUATIONS)
def test_transforms_match_torch(situation, act, residual):
    """grad, jacrev, jacfwd, jvp, hessian and forward_ad give torch's results, and the running
    stats (train-stats) end where torch's end."""
    x = _data((4, C, 2), 5)
    r = _data((4, C, 2), 6, -1.0) if residual else None
    ours, theirs, bufs, (w, b) = _pair(situation, act, r)
    for f in (ours, theirs):
        assert f(x, w, b).shape == x.shape
    _check_buffers(bufs)
    _same(grad(_loss(ours), argnums=(0, 1, 2))(x, w, b),
          grad(_loss(theirs), argnums=(0, 1, 2))(x, w, b))
    _same(jacrev(ours, argnums=(0, 1))(x, w, b), jacrev(theirs, argnums=(0, 1))(x, w, b))
    _same(jacfwd(ours, argnums=(0, 2))(x, w, b), jacfwd(theirs, argnums=(0, 2))(x, w, b))
    tangents = (_data(x.shape, 7, 0.0), _data((C,), 8, 0.0), _data((C,), 9, 0.0))
    _same(jvp(ours, (x, w, b), tangents), jvp(theirs, (x, w, b), tangents))
    xs = x[:2, :, :1].contiguous()  # hessian: keep it small
    rs = r[:2, :, :1].contiguous() if residual else None
    _same(hessian(_loss(lambda x, w, b: ours(x, w, b, rs)))(xs, w, b),
          hessian(_loss(lambda x, w, b: theirs(x, w, b, rs)))(xs, w, b))
    with fwAD.dual_level():
        outs = [fwAD.unpack_dual(f(fwAD.make_dual(x, tangents[0]), w,
                                   fwAD.make_dual(b, tangents[2]))) for f in (ours, theirs)]
    _same(tuple(outs[0]), tuple(outs[1]))
    _check_buffers(bufs)
    if situation == "train-stats":
        assert not torch.equal(bufs[0][0], _setup(situation)[1]), "running_mean was not updated"


@pytest.mark.parametrize("act,residual", [(None, False), ("relu", True)])
@pytest.mark.parametrize("situation", SITUATIONS)
def test_vmap_matches_torch(situation, act, residual):
    """vmap over a stack of batches (and per-sample gradients, vmap(grad)): torch's results in
    eval and in training without running stats; with running stats in training both refuse
    (RuntimeError) and neither buffer is written."""
    xb = _data((3, 4, C, 2), 10)
    rb = _data((3, 4, C, 2), 11, 0.0) if residual else None
    ours, theirs, bufs, (w, b) = _pair(situation, act)
    before = [t.clone() if t is not None else None for t in bufs[0]]
    in_dims = (0, None, None, 0 if residual else None)
    if situation == "train-stats":
        for f in (ours, theirs):
            with pytest.raises(RuntimeError):
                vmap(f, in_dims=in_dims)(xb, w, b, rb)
        for t, u in zip(bufs[0], before):
            assert torch.equal(t, u)
        return
    _same(vmap(ours, in_dims=in_dims)(xb, w, b, rb), vmap(theirs, in_dims=in_dims)(xb, w, b, rb))

    def per_sample(f):
        return vmap(grad(lambda x, w, b, r: _loss(lambda x, w, b: f(x, w, b, r))(x, w, b),
                         argnums=(0, 1)), in_dims=in_dims)(xb, w, b, rb)
    _same(per_sample(ours), per_sample(theirs))


def test_vmap_with_batched_running_stats_updates_each_entry():
    """Running stats batched along with the input (one set per vmap entry) are updated per
    entry, as torch's batch_norm updates them."""
    xb = _data((2, 4, C, 2), 12)
    w, b = _data((C,), 1, 1.0), _data((C,), 2, 0.0)
    stats = [(torch.zeros(2, C, dtype=torch.float64), torch.ones(2, C, dtype=torch.float64))
             for _ in range(2)]
    ys = [vmap(lambda x, rm, rv: f(x, rm, rv, w, b, True))(xb, *s)
          for f, s in ((F.batch_norm, stats[0]), (TF.batch_norm, stats[1]))]
    _same(ys[0], ys[1])
    _same(stats[0], stats[1])
    assert not torch.equal(stats[0][0][0], stats[0][0][1])


def test_dropout_under_vmap_follows_randomness():
    """batch_norm_act with dropout draws its seed with a torch random op: vmap's randomness
    "error" (the default) raises as torch's dropout does, "different" gives each entry its own
    mask, "same" one mask; an explicit seed is the seeded mask of every backend."""
    x = _data((4, C, 5), 13).expand(2, 4, C, 5).contiguous()  # the same batch twice
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)

    def f(x, seed=None):
        return F.batch_norm_act(x, None, None, training=True, activation="relu", p=0.5,
                                seed=seed)
    with pytest.raises(RuntimeError):
        vmap(f)(x)
    with pytest.raises(RuntimeError):
        vmap(lambda x: TF.dropout(x, 0.5))(x)
    diff = vmap(f, randomness="different")(x)
    same = vmap(f, randomness="same")(x)
    assert not torch.equal(diff[0] == 0, diff[1] == 0)
    assert torch.equal(same[0], same[1])
    seeded = vmap(lambda x: f(x, 123))(x)
    want = F.batch_norm_act(x[0], rm.clone(), rv.clone(), training=True, activation="relu", p=0.5,
                            seed=123)
    _same(seeded[0], want)
    _same(seeded[1], want)
    keep = F.dropout_mask(x[0].shape, 0.5, 123)
    plain = torch.relu(TF.batch_norm(x[0], None, None, training=True))
    _same(want, torch.where(keep, plain * 2.0, torch.zeros_like(plain)))


@pytest.mark.parametrize("situation", ["eval", "train"])
def test_modules_under_transforms_match_torch(situation):
    """vmap of a module and functional_call + grad over its parameters (per-sample too) give
    torch's BatchNorm2d results; track_running_stats=False in training (batch statistics, no
    buffers), running stats in eval."""
    kwargs = dict(track_running_stats=False) if situation == "train" else {}
    theirs = torch.nn.BatchNorm2d(C, **kwargs).double()
    ours = fusedreg.nn.BatchNorm2d(C, **kwargs).double()
    with torch.no_grad():
        theirs.weight.copy_(_data((C,), 1, 1.0))
        theirs.bias.copy_(_data((C,), 2, 0.0))
        if situation == "eval":
            theirs.running_mean.copy_(_data((C,), 3, 0.5))
            theirs.running_var.copy_(_data((C,), 4, 0.0).abs() + 0.5)
    ours.load_state_dict(theirs.state_dict())
    for m in (ours, theirs):
        m.train(situation == "train")
    xb = _data((2, 3, C, 2, 2), 14)
    _same(vmap(ours)(xb), vmap(theirs)(xb))

    def loss(m):
        def fn(params, x):
            return _loss(lambda x, w, b: functional_call(m, params, (x,)))(x, None, None)
        return fn
    params = [dict(m.named_parameters()) for m in (ours, theirs)]
    _same(grad(loss(ours))(params[0], xb[0]), grad(loss(theirs))(params[1], xb[0]))
    _same(vmap(grad(loss(ours)), in_dims=(None, 0))(params[0], xb),
          vmap(grad(loss(theirs)), in_dims=(None, 0))(params[1], xb))


def test_module_training_with_running_stats_refuses_vmap_like_torch():
    xb = _data((2, 3, C, 2, 2), 15)
    for m in (torch.nn.BatchNorm2d(C).double(), fusedreg.nn.BatchNorm2d(C).double(),
              fusedreg.nn.BatchNormAct2d(C).double()):
        with pytest.raises(RuntimeError):
            vmap(m)(xb)
