"""OHOAdam / OHOAdamW: the same battery as SGD (exactness against autograd in float64, torch.optim
equivalence bit for bit, checkpoint resume, validation)."""
import itertools

import pytest
import torch

import ohotorch
from helpers import (batches, closures, digits, mlp, oracle_hypergradients, param_index_groups,
                     relative_error, run_oho)

CLASSES = {"adam": (ohotorch.OHOAdam, torch.optim.Adam), "adamw": (ohotorch.OHOAdamW, torch.optim.AdamW)}
T = 15


@pytest.mark.parametrize("rule", sorted(CLASSES))
@pytest.mark.parametrize("layerwise", [False, True], ids=["global", "layerwise"])
@pytest.mark.parametrize("hvp", ["central", "none"])
def test_hypergradients_match_autograd(rule, layerwise, hvp):
    """The full horizon against autograd through the unrolled Adam steps; with hvp="none" (the
    first-order influence) against the unrolled steps whose gradients are constants, to rounding."""
    xt, yt, xv, yv = digits()
    train = batches(xt, yt, 32, T, seed=1)
    val = (xv[:300], yv[:300])
    model = mlp()
    params = ohotorch.layerwise(model) if layerwise else model.parameters()
    opt = CLASSES[rule][0](params, lr=0.01, weight_decay=1e-2, hvp=hvp, meta_lr=0.0, discount=1.0)
    if layerwise:
        for i, g in enumerate(opt.param_groups):
            g["lr"] = 0.005 * (i + 1)
            g["weight_decay"] = 1e-2 * (i + 1)
    hypers = [{n: g[n] for n in ("lr", "weight_decay")} for g in opt.param_groups]
    expected = oracle_hypergradients(model, param_index_groups(model, opt.param_groups), hypers, train, val,
                                     rule=rule, first_order=hvp == "none")
    run_oho(model, opt, train)
    got = opt.hypergradient(closures(opt, model, val))
    worst = 0.0
    for e, g in zip(expected, got):
        for name in ("lr", "weight_decay"):
            err = relative_error(float(g[name]), e[name])
            worst = max(worst, err)
            assert err < (1e-6 if hvp == "central" else 1e-10), (name, float(g[name]), e[name])
    print(f"{rule} {'layerwise' if layerwise else 'global'}: worst relative error {worst:.2e}")


@pytest.mark.parametrize("rule", sorted(CLASSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("weight_decay, foreach", list(itertools.product((0.0, 1e-2), (False, True))))
@pytest.mark.parametrize("mode", ["meta_lr=0", "tune=()"])
def test_reproduces_torch_adam(rule, dtype, weight_decay, foreach, mode):
    ours, theirs = CLASSES[rule]
    extra = dict(meta_lr=0.0, discount=1.0) if mode == "meta_lr=0" else dict(tune=())
    xt, yt, _, _ = digits(dtype)
    runs = []
    for make in (lambda m: theirs(m.parameters(), lr=3e-3, weight_decay=weight_decay, foreach=foreach),
                 lambda m: ours(m.parameters(), lr=3e-3, weight_decay=weight_decay, foreach=foreach, **extra)):
        model = mlp(dtype=dtype)
        opt = make(model)
        for b in batches(xt, yt, 32, 10):
            opt.step(closures(opt, model, b))
        runs.append((model, opt))
    (ref, ref_opt), (got, got_opt) = runs
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b), (a - b).abs().max()
    for pa, pb in zip(ref.parameters(), got.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(ref_opt.state[pa][key], got_opt.state[pb][key]), key


@pytest.mark.parametrize("rule", sorted(CLASSES))
def test_state_dict_round_trip_continues_identically(rule, tmp_path):
    cls = CLASSES[rule][0]
    xt, yt, xv, yv = digits(torch.float32)
    train, val = batches(xt, yt, 32, 20), batches(xv, yv, 64, 20, seed=7)

    def train_steps(model, opt, steps):
        for i in steps:
            opt.step(closures(opt, model, train[i]))
            opt.hyper_step(closures(opt, model, val[i]))

    model = mlp(dtype=torch.float32)
    opt = cls(model.parameters(), lr=3e-3, weight_decay=1e-2, discount=1.0)
    train_steps(model, opt, range(8))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    train_steps(model, opt, range(8, 20))
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model2 = mlp(dtype=torch.float32, seed=3)
    model2.load_state_dict(ckpt["model"])
    opt2 = cls(model2.parameters(), lr=3e-3, weight_decay=1e-2, discount=1.0)
    opt2.load_state_dict(ckpt["opt"])
    train_steps(model2, opt2, range(8, 20))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    assert opt.param_groups[0]["weight_decay"] == opt2.param_groups[0]["weight_decay"]


def test_adamw_learns_a_poor_lr():
    xt, yt, xv, yv = digits(torch.float32)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = ohotorch.OHOAdamW(model.parameters(), lr=1e-5)
    for b, vb in zip(batches(xt, yt, 50, 300), batches(xv, yv, 50, 300, seed=3)):
        opt.step(closures(opt, model, b))
        opt.hyper_step(closures(opt, model, vb))
    assert opt.param_groups[0]["lr"] > 1e-4


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(lr=-1.0), ValueError, "Invalid learning rate"),
    (dict(betas=(0.9, 1.0)), ValueError, "Invalid betas"),
    (dict(eps=-1.0), ValueError, "Invalid epsilon"),
    (dict(weight_decay=-1e-2), ValueError, "Invalid weight_decay"),
    (dict(tune=("momentum",)), ValueError, "Unknown hyperparameter in tune: 'momentum'"),
    (dict(amsgrad=True), ValueError, "OHOAdam does not support amsgrad=True"),
    (dict(nonsense=True), TypeError, "unexpected keyword"),
])
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ohotorch.OHOAdam(torch.nn.Linear(3, 2).parameters(), **kwargs)


@pytest.mark.parametrize("foreach", [False, True])
def test_tangent_update_takes_the_groups_foreach_path(foreach, monkeypatch):
    import ohotorch.rules as rules_module

    seen = []
    real = rules_module.adam_tangent_update_

    def spy(*args, **kwargs):
        seen.append(kwargs["foreach"])
        return real(*args, **kwargs)

    monkeypatch.setattr(rules_module, "adam_tangent_update_", spy)
    xt, yt, _, _ = digits()
    model = mlp()
    opt = ohotorch.OHOAdam(model.parameters(), lr=3e-3, weight_decay=1e-2, foreach=foreach, discount=1.0)
    run_oho(model, opt, batches(xt, yt, 32, 2))
    assert seen and set(seen) == {foreach}


@pytest.mark.parametrize("rule", sorted(CLASSES))
@pytest.mark.parametrize("discount", [0.0, 1.0], ids=["greedy_fresh", "full_horizon"])
def test_foreach_and_per_tensor_hypergradients_agree(rule, discount):
    xt, yt, xv, yv = digits()
    train, val = batches(xt, yt, 32, 6), (xv[:300], yv[:300])
    got = []
    for foreach in (False, True):
        model = mlp()
        opt = CLASSES[rule][0](model.parameters(), lr=0.01, weight_decay=1e-2, meta_lr=0.0, discount=discount,
                               foreach=foreach)
        run_oho(model, opt, train)
        got.append(opt.hypergradient(closures(opt, model, val))[0])
    for name in ("lr", "weight_decay"):
        assert relative_error(float(got[1][name]), float(got[0][name])) < 1e-10, name
