"""A torch.compile'd model inside OHO's closures (CPU, the default inductor backend).

OHO re-runs the user's closure at perturbed weights for its finite-difference Hessian-vector products:
it writes ``w + eps v`` into the parameters in place, evaluates, and copies ``w`` back. A compiled model
must therefore (a) give the numbers the eager model gives - weights, and full-horizon hypergradients,
whose HVPs amplify any difference by 1 / eps - and (b) never recompile because of those writes: dynamo
guards a parameter's shape, dtype, device and requires_grad, not its values.

Training and validation batches have one size, so the model compiles exactly once (a second batch
size would add one dynamic-shape recompile, which has nothing to do with OHO). The first test to run
pays for inductor's C++ compilation (~10 s here with a cold cache); the others hit its on-disk cache.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Tuple

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import ohotorch
from helpers import batches, closures, digits, mlp

STEPS = 6
BATCH = 64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch and counts only its own frames."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def data():
    x, y, xv, yv = digits(torch.float32)
    return batches(x, y, BATCH, STEPS), batches(xv, yv, BATCH, STEPS, seed=2)


def _batchnorm_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.Tanh(), nn.Linear(32, 10))


def _run(data, compiled: bool, model_fn=lambda: mlp(dtype=torch.float32), **options
         ) -> Tuple[List[torch.Tensor], List[Dict[str, float]], ohotorch.OHO]:
    """STEPS of OHO (momentum 0.9) with a hyper-step after each; returns the distance every parameter
    moved, the hypergradients of every step, and the optimizer."""
    model = model_fn()
    start = [p.detach().clone() for p in model.parameters()]
    net = torch.compile(model) if compiled else model
    opt = ohotorch.OHO(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, module=net, **options)
    hypers = []
    for train, val in zip(*data):
        opt.step(closures(opt, net, train))
        hypers.append({k: float(v) for k, v in opt.hyper_step(closures(opt, net, val))[0].items()})
    moved = [p.detach() - s for p, s in zip(model.parameters(), start)]
    return moved, hypers, opt


def _assert_moved_close(compiled: List[torch.Tensor], eager: List[torch.Tensor]) -> None:
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-5 * float(e.abs().max()))


def test_untuned_compiled_model_follows_eager(data):
    eager, _, _ = _run(data, compiled=False, tune=())
    compiled, _, _ = _run(data, compiled=True, tune=())
    assert counters["frames"]["ok"] >= 1  # the compiled run really compiled
    _assert_moved_close(compiled, eager)


def test_full_horizon_hypergradients_match_eager(data):
    options = dict(tune=("lr", "weight_decay"), meta_lr=0.0, discount=1.0, hvp="central")
    eager, eager_hyper, _ = _run(data, compiled=False, **options)
    compiled, compiled_hyper, opt = _run(data, compiled=True, **options)
    assert opt.param_groups[0]["lr"] == 0.1 and min(opt.diagnostics["influence_norm"].values()) > 0
    _assert_moved_close(compiled, eager)
    worst = max(abs(c[k] - e[k]) / abs(e[k]) for c, e in zip(compiled_hyper, eager_hyper) for k in e)
    print(f"\nfull-horizon hypergradients, compiled vs eager: worst relative difference {worst:.1e}")
    assert worst < 1e-4


@pytest.mark.parametrize("model_fn", [lambda: mlp(dtype=torch.float32), _batchnorm_mlp], ids=["mlp", "batchnorm"])
@pytest.mark.parametrize("hvp", ["forward", "central"])
def test_finite_differences_do_not_recompile(data, model_fn, hvp):
    model = model_fn()
    net = torch.compile(model)
    opt = ohotorch.OHO(net.parameters(), lr=0.1, momentum=0.9, discount=1.0, hvp=hvp, module=net)
    (first, *rest), vals = data
    opt.step(closures(opt, net, first))  # compiles; the influence is still zero, so no HVP yet
    opt.hyper_step(closures(opt, net, vals[0]))
    frames = counters["frames"]["total"]
    assert frames >= 1 and counters["frames"]["ok"] == frames
    with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises RecompileError
        for train, val in zip(rest, vals[1:]):
            opt.step(closures(opt, net, train))  # 2 (forward) or 3 (central) evaluations, perturbed in place
            opt.hyper_step(closures(opt, net, val))
    assert counters["frames"]["total"] == frames
    assert min(opt.diagnostics["influence_norm"].values()) > 0 and opt.counters["nonfinite_influence"] == 0
    assert opt.param_groups[0]["lr"] != 0.1  # the hyper-steps acted


def test_buffer_watch_without_module_warns_once_and_does_not_recompile(data):
    """Without module=, OHO watches its first extra evaluations with global module hooks for buffers
    that change: on a compiled BatchNorm model they see the compiled module, warn once naming module=,
    and neither their presence nor their removal recompiles."""
    net = torch.compile(_batchnorm_mlp())
    opt = ohotorch.OHO(net.parameters(), lr=0.1, momentum=0.9, discount=1.0)
    (first, *rest), vals = data
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closures(opt, net, first))  # compiles
        frames = counters["frames"]["total"]
        with torch._dynamo.config.patch(error_on_recompile=True):
            for train, val in zip(rest, vals):
                opt.step(closures(opt, net, train))
                opt.hyper_step(closures(opt, net, val))
    assert counters["frames"]["total"] == frames
    messages = [str(w.message) for w in caught]
    assert len([m for m in messages if "module=" in m]) == 1, messages
    assert not [m for m in messages if "global hooks" in m], messages
