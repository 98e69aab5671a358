"""Checkpoints: a round trip into a fresh model and optimizer continues bit-identically."""
import copy

import pytest
import torch

import ohotorch
from helpers import batches, closures, digits, mlp

CONFIGS = {
    "global-default": dict(momentum=0.9),
    "global-full-adam-log": dict(momentum=0.9, discount=1.0),
    "global-full-sgd-raw": dict(momentum=0.9, meta_optimizer="sgd", space="raw", meta_lr=1e-4, discount=1.0),
    "layerwise-exact-momentum": dict(momentum=0.5, tune=("lr", "weight_decay", "momentum"), layerwise=True,
                                     discount=1.0),
    "layerwise-blockwise": dict(influence="blockwise", layerwise=True, reset_every=7),
    "discount-central": dict(discount=0.9, hvp="central"),
    "greedy-sgd-log": dict(discount=0.0, meta_optimizer="sgd", meta_lr=0.01),
    "lr-scale-full": dict(momentum=0.9, tune=("lr_scale", "weight_decay"), discount=1.0),
}


def _make(config, model):
    config = dict(config)
    params = ohotorch.layerwise(model) if config.pop("layerwise", False) else model.parameters()
    return ohotorch.OHO(params, lr=0.05, weight_decay=1e-3, **config)


def _train(model, opt, train, val):
    for i, b in enumerate(train):
        opt.step(closures(opt, model, b))
        opt.hyper_step(closures(opt, model, val[i % len(val)]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_then_identical_continuation(name, tmp_path):
    config = CONFIGS[name]
    xt, yt, xv, yv = digits(torch.float32)
    train = batches(xt, yt, 32, 30)
    val = batches(xv, yv, 64, 30, seed=7)

    model = mlp(dtype=torch.float32)
    opt = _make(config, model)
    _train(model, opt, train[:10], val)

    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    _train(model, opt, train[10:], val)  # the uninterrupted run

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    model2 = mlp(dtype=torch.float32, seed=123)
    model2.load_state_dict(ckpt["model"])
    opt2 = _make(config, model2)
    opt2.load_state_dict(ckpt["opt"])
    _train(model2, opt2, train[10:], val)

    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    for g1, g2 in zip(opt.param_groups, opt2.param_groups):
        for key in ("lr", "weight_decay", "momentum"):
            assert g1[key] == g2[key]
    for p1, p2 in zip(model.parameters(), model2.parameters()):
        for key, value in opt.state[p1].items():
            assert torch.equal(value, opt2.state[p2][key]), key
    assert opt.counters == opt2.counters


def test_state_dict_holds_influence_meta_state_and_counters():
    xt, yt, xv, yv = digits(torch.float32)
    model = mlp(dtype=torch.float32)
    opt = ohotorch.OHO(model.parameters(), lr=0.05, momentum=0.9)
    _train(model, opt, batches(xt, yt, 32, 3), batches(xv, yv, 32, 3))
    sd = opt.state_dict()
    # The greedy default never reads b' after a step, so it keeps none; a longer horizon does.
    assert set(sd["state"][0]) == {"momentum_buffer", "tangent_w"}
    model2 = mlp(dtype=torch.float32)
    full = ohotorch.OHO(model2.parameters(), lr=0.05, momentum=0.9, discount=1.0)
    _train(model2, full, batches(xt, yt, 32, 1), batches(xv, yv, 32, 1))
    assert set(full.state_dict()["state"][0]) == {"momentum_buffer", "tangent_w", "tangent_b"}
    assert sd["oho"]["steps"] == 3 and sd["oho"]["hyper_steps"] == 3
    assert sd["oho"]["meta_state"]  # Adam moments of the meta-optimizer
    assert sd["param_groups"][0]["tune"] == ("lr",)  # weight decay starts at 0: tuned only when asked


def test_influence_dtype_survives_load_state_dict_casting():
    """torch casts loaded state to the parameter's dtype; the influence keeps its saved precision."""
    model = mlp(dtype=torch.float32)
    opt = ohotorch.OHO(model.parameters(), lr=0.05)
    xt, yt, _, _ = digits(torch.float32)
    for b in batches(xt, yt, 32, 2):
        opt.step(closures(opt, model, b))
    sd = copy.deepcopy(opt.state_dict())
    for s in sd["state"].values():
        s["tangent_w"] = s["tangent_w"].double()
    opt2 = ohotorch.OHO(model.parameters(), lr=0.05)
    opt2.load_state_dict(sd)
    assert all(s["tangent_w"].dtype == torch.float64 for s in opt2.state.values())


def test_distributed_checkpoint_initialisation_step_changes_nothing():
    """DCP creates optimizer state with zero grads, lr = 0 and step(closure=None)."""
    model = mlp(dtype=torch.float32)
    opt = ohotorch.OHO(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:
        g["lr"] = 0.0
    assert opt.step() is None
    for g in opt.param_groups:
        g["lr"] = 0.05
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)
    for s in opt.state.values():
        assert not s["tangent_w"].any() and not s["momentum_buffer"].any()
    assert opt.counters["steps"] == 0
