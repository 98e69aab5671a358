"""With tuning off (meta_lr = 0, or tune=()), OHO's trajectory is torch.optim.SGD's, bit for bit."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import ohotorch
from helpers import batches, closures, digits, mlp

OPTIONS = [
    dict(momentum=m, dampening=d, nesterov=n, weight_decay=wd)
    for m, d, n, wd in itertools.product((0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 1e-2))
    if not (n and (m == 0 or d != 0))
]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _ids(o):
    return "m{momentum}-d{dampening}-n{nesterov:d}-wd{weight_decay}".format(**o)


def _trajectory(make_opt, device, dtype, steps=12):
    xt, yt, _, _ = digits(dtype)
    model = mlp(dtype=dtype).to(device)
    opt = make_opt(model)
    for x, y in batches(xt.to(device), yt.to(device), 32, steps):
        opt.step(closures(opt, model, (x, y)))
    return [p.detach().cpu() for p in model.parameters()], opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
@pytest.mark.parametrize("mode", ["meta_lr=0", "tune=()"])
def test_reproduces_torch_sgd(options, dtype, device, mode):
    tunable = ("lr", "weight_decay", "momentum")
    if options["momentum"] == 0 and options["dampening"] != 0:
        tunable = ("lr", "weight_decay")  # momentum cannot be tuned from 0 with dampening (validated)
    extra = dict(meta_lr=0.0, tune=tunable, discount=1.0) if mode == "meta_lr=0" else dict(tune=())
    ref, _ = _trajectory(lambda m: torch.optim.SGD(m.parameters(), lr=0.05, **options), device, dtype)
    got, opt = _trajectory(lambda m: ohotorch.OHO(m.parameters(), lr=0.05, **extra, **options), device, dtype)
    for a, b in zip(got, ref):
        assert torch.equal(a, b), (a - b).abs().max()
    if mode == "meta_lr=0":  # the influence was carried (and the hyperparameters stayed put)
        assert opt.counters["steps"] == 12
        assert opt.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("options", OPTIONS, ids=_ids)
def test_foreach_path_gives_the_same_numbers(options):
    """The torch._foreach_* path equals the per-tensor reference path, weights and influence alike."""
    results = []
    for foreach in (False, True):
        tune = ("lr", "weight_decay") if options["dampening"] and not options["momentum"] else \
            ("lr", "weight_decay", "momentum")
        _, opt = _trajectory(lambda m: ohotorch.OHO(m.parameters(), lr=0.05, meta_lr=0.0, foreach=foreach, discount=1.0,
                                                    tune=tune, **options),
                             "cpu", torch.float64)
        results.append([s["tangent_w"].clone() for s in opt.state.values()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_foreach_path_is_used(monkeypatch):
    calls = []
    original = torch._foreach_add_

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_add_", spy)
    _trajectory(lambda m: ohotorch.OHO(m.parameters(), lr=0.05, momentum=0.9, foreach=True), "cpu", torch.float64, 3)
    assert calls, "foreach=True must go through torch._foreach_*"
    calls.clear()
    _trajectory(lambda m: ohotorch.OHO(m.parameters(), lr=0.05, momentum=0.9, foreach=False), "cpu", torch.float64, 3)
    assert not calls


def test_no_closure_without_tuning_is_plain_sgd():
    xt, yt, _, _ = digits()
    models = [mlp(), mlp()]
    opts = [torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9),
            ohotorch.OHO(models[1].parameters(), lr=0.1, momentum=0.9, tune=())]
    for x, y in batches(xt, yt, 32, 5):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        assert torch.equal(a, b)
