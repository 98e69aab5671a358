"""Truncated horizons: reset every N steps and greedy (gamma = 0) against autograd through the
steps they keep (the earlier weights held constant)."""
import copy

import pytest
import torch

import ohotorch
from helpers import batches, closures, digits, mlp, oracle_hypergradients, param_index_groups, relative_error


def _run(opt_kwargs, steps, keep):
    """Train ``steps`` steps; autograd through only the last ``keep`` of them must agree."""
    xt, yt, xv, yv = digits()
    train = batches(xt, yt, 32, steps)
    val = (xv[:300], yv[:300])
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.1, weight_decay=1e-3, hvp="central", meta_lr=0.0, **opt_kwargs)
    for i, b in enumerate(train):
        if i == steps - keep:
            snapshot = copy.deepcopy(model)
        opt.step(closures(opt, model, b))
    got = opt.hypergradient(closures(opt, model, val))
    hypers = [{n: opt.param_groups[0][n] for n in ("lr", "weight_decay", "momentum")}]
    expected = oracle_hypergradients(snapshot, param_index_groups(model, opt.param_groups), hypers,
                                     train[steps - keep:], val, use_buffer=False)
    return got, expected


@pytest.mark.parametrize("opt_kwargs, steps, keep", [
    (dict(discount=1.0), 6, 6),          # full: every step
    (dict(discount=0.0), 6, 1),          # greedy: one step of memory
    (dict(reset_every=5, discount=1.0), 12, 2),      # reset at step 10: the last two steps
    (dict(reset_every=4, discount=1.0), 8, 4),       # reset at step 4: the last four steps
])
def test_truncated_horizon_matches_autograd_over_what_it_keeps(opt_kwargs, steps, keep):
    got, expected = _run(opt_kwargs, steps, keep)
    for name in ("lr", "weight_decay"):
        assert relative_error(float(got[0][name]), expected[0][name]) < 1e-6


def test_greedy_lr_hypergradient_is_minus_val_grad_dot_step():
    """gamma = 0 is hypergradient descent on the validation loss: dL_val(w_t+1)/d lr = -<g_val, u_t>."""
    xt, yt, xv, yv = digits()
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.1, discount=0.0, meta_lr=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closures(opt, model, (xt[:32], yt[:32])))
    step = [(b - p.detach()) / 0.1 for b, p in zip(before, model.parameters())]  # u_t
    got = opt.hypergradient(closures(opt, model, (xv, yv)))[0]["lr"]
    model.zero_grad()
    torch.nn.functional.cross_entropy(model(xv), yv).backward()
    expected = -sum((p.grad * u).sum() for p, u in zip(model.parameters(), step))
    assert relative_error(float(got), float(expected)) < 1e-9
