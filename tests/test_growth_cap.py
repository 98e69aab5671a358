"""The growth-capped influence (ohotorch.growth_cap, the ``growth_cap`` option).

* ``growth_cap=None`` never takes the split path (today's full horizon, bit for bit);
* a cap that never binds (huge c) gives the exact hypergradients (float64, autograd through the unrolled
  updates), for SGD (momentum, nesterov, dampening, layerwise exact influence), Adam and AdamW;
* the split (homogeneous update, then the direct terms) reproduces the unsplit update when gamma = 1, on
  both the reference and the foreach paths of the pure functions;
* gamma < 1 is applied exactly as specified: the EMA / gamma function on hand-computed values, and a
  one-parameter quadratic whose influence is computed by hand;
* state_dict round trip (bit-identical continuation; old checkpoints without the EMA load), strong
  exception safety, the sync-free path's numbers, and argument checks.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ohotorch
from helpers import (batches, closures, digits, mlp, oracle_hypergradients, param_index_groups, relative_error,
                     run_oho)
from ohotorch.adam_tangents import adam_direct_terms_, adam_tangent_update_
from ohotorch.growth_cap import GROWTH_BETA, growth_gamma
from ohotorch.sgd_tangents import sgd_direct_terms_, sgd_tangent_update_

T = 15
HUGE = 1e300


def _setup(seed=0):
    xt, yt, xv, yv = digits()
    return batches(xt, yt, 32, T, seed=seed + 1), (xv[:300], yv[:300])


def _tangents(opt):
    return [t.clone() for s in opt.state.values() for k, t in sorted(s.items()) if k.startswith("tangent_")]


# ---------------------------------------------------------------------------------------------- None
@pytest.mark.parametrize("cls, kwargs", [(ohotorch.OHO, dict(momentum=0.9)), (ohotorch.OHOAdamW, {})])
def test_none_never_takes_the_split_path(monkeypatch, cls, kwargs):
    """growth_cap=None: the rule's split methods are never called, so the update is today's, bit for bit
    (same weights, tangents and hypergradients as an optimizer built without the argument)."""
    train, val = _setup()
    results = []
    for explicit in (False, True):
        model = mlp()
        extra = dict(growth_cap=None) if explicit else {}
        opt = cls(model.parameters(), lr=0.05, weight_decay=1e-3, discount=1.0, meta_lr=0.01, **kwargs, **extra)
        if explicit:
            def refuse(*args, **kw):
                raise AssertionError("the growth cap's split path ran with growth_cap=None")
            monkeypatch.setattr(type(opt._rule), "state_sq_norm", refuse)
            monkeypatch.setattr(type(opt._rule), "add_direct_terms", refuse)
        for b in train[:6]:
            opt.step(closures(opt, model, b))
            opt.hyper_step(closures(opt, model, val))
        results.append(([p.detach().clone() for p in model.parameters()], _tangents(opt),
                         dict(opt.param_groups[0]), opt.state_dict()["oho"]))
    (w0, t0, g0, oho0), (w1, t1, g1, oho1) = results
    assert all(torch.equal(a, b) for a, b in zip(w0, w1))
    assert all(torch.equal(a, b) for a, b in zip(t0, t1))
    assert g0["lr"] == g1["lr"] and g0["weight_decay"] == g1["weight_decay"]
    assert "growth_ema" not in oho0 and "growth_ema" not in oho1  # the state_dict format is unchanged


# ---------------------------------------------------------------------------------------------- exactness
SGD_CASES = {
    "sgd": dict(momentum=0.0, tune=("lr", "weight_decay")),
    "momentum": dict(momentum=0.9, tune=("lr", "weight_decay", "momentum")),
    "nesterov": dict(momentum=0.8, nesterov=True, tune=("lr", "weight_decay", "momentum")),
    "dampening": dict(momentum=0.5, dampening=0.3, tune=("lr", "weight_decay", "momentum")),
}


@pytest.mark.parametrize("case", sorted(SGD_CASES))
@pytest.mark.parametrize("foreach", [False, True])
def test_cap_that_never_binds_is_exact_sgd(case, foreach):
    options = SGD_CASES[case]
    train, val = _setup()
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.1, weight_decay=1e-3, hvp="central", meta_lr=0.0, discount=1.0,
                       growth_cap=HUGE, foreach=foreach, **options)
    hypers = [{n: opt.param_groups[0][n] for n in ("lr", "weight_decay", "momentum")}]
    use_buffer = options["momentum"] != 0
    expected = oracle_hypergradients(model, param_index_groups(model, opt.param_groups), hypers, train, val,
                                     dampening=options.get("dampening", 0.0),
                                     nesterov=options.get("nesterov", False), use_buffer=use_buffer)
    run_oho(model, opt, train)
    got = opt.hypergradient(closures(opt, model, val))
    for name in options["tune"]:
        assert relative_error(float(got[0][name]), expected[0][name]) < 1e-6, name
    assert set(opt.diagnostics["growth_gamma"].values()) == {1.0}


def test_cap_that_never_binds_is_exact_layerwise():
    """Exact influence over several groups: the norm spans every group a tangent touches."""
    train, val = _setup()
    model = mlp()
    groups = ohotorch.layerwise(model)
    for i, g in enumerate(groups):
        g["lr"], g["weight_decay"] = 0.05 + 0.03 * i, 1e-3 * (i + 1)
    opt = ohotorch.OHO(groups, momentum=0.9, hvp="central", meta_lr=0.0, influence="exact", discount=1.0,
                       growth_cap=HUGE)
    hypers = [{n: g[n] for n in ("lr", "weight_decay", "momentum")} for g in opt.param_groups]
    expected = oracle_hypergradients(model, param_index_groups(model, opt.param_groups), hypers, train, val,
                                     use_buffer=True)
    run_oho(model, opt, train)
    got = opt.hypergradient(closures(opt, model, val))
    for e, g in zip(expected, got):
        for name in g:
            assert relative_error(float(g[name]), e[name]) < 1e-6


@pytest.mark.parametrize("rule, cls", [("adam", ohotorch.OHOAdam), ("adamw", ohotorch.OHOAdamW)])
@pytest.mark.parametrize("foreach", [False, True])
def test_cap_that_never_binds_is_exact_adam(rule, cls, foreach):
    train, val = _setup()
    model = mlp()
    opt = cls(model.parameters(), lr=0.01, weight_decay=1e-2, hvp="central", meta_lr=0.0, discount=1.0,
              growth_cap=HUGE, foreach=foreach)
    hypers = [{n: opt.param_groups[0][n] for n in ("lr", "weight_decay")}]
    expected = oracle_hypergradients(model, param_index_groups(model, opt.param_groups), hypers, train, val,
                                     rule=rule)
    run_oho(model, opt, train)
    got = opt.hypergradient(closures(opt, model, val))
    for name in ("lr", "weight_decay"):
        assert relative_error(float(got[0][name]), expected[0][name]) < 1e-6, name


# ---------------------------------------------------------------------------------------------- split
def _lists(n, seed, shapes=((3, 4), (5,))):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(n)]


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("first_step", [False, True])
@pytest.mark.parametrize("variant", ["plain", "momentum", "nesterov", "dampening"])
@pytest.mark.parametrize("direct", ["lr", "weight_decay", "momentum"])
def test_sgd_split_reproduces_the_unsplit_update(foreach, first_step, variant, direct):
    momentum = {"plain": 0.0, "momentum": 0.9, "nesterov": 0.8, "dampening": 0.5}[variant]
    if variant == "plain" and direct == "momentum":
        momentum = 0.0  # tuned from 0: a buffer is still kept
    dampening = 0.3 if variant == "dampening" else 0.0
    tw, tb, hvp, params, bufs, prev, direction = _lists(7, seed=3)
    kw = dict(lr=0.07, momentum=momentum, dampening=dampening, nesterov=variant == "nesterov",
              first_step=first_step, foreach=foreach, use_buffer=True, lr_derivative=0.6)
    flags = dict(direct_lr=direct == "lr", direct_weight_decay=direct == "weight_decay",
                 direct_momentum=direct == "momentum")
    full_w, full_b = [t.clone() for t in tw], [t.clone() for t in tb]
    sgd_tangent_update_(full_w, full_b, [h.clone() for h in hvp], params, bufs, prev, direction,
                        weight_decay=1e-2, **kw, **flags)
    split_w, split_b = [t.clone() for t in tw], [t.clone() for t in tb]
    sgd_tangent_update_(split_w, split_b, [h.clone() for h in hvp], params, bufs, prev, direction,
                        weight_decay=1e-2, direct_lr=False, direct_weight_decay=False, direct_momentum=False, **kw)
    homogeneous_w = [t.clone() for t in split_w]
    sgd_direct_terms_(split_w, split_b, params, bufs, prev, direction, **kw, **flags)
    for a, b in zip(full_w + full_b, split_w + split_b):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)
    if not (direct == "momentum" and first_step and variant != "nesterov"):  # there c_t = -lr b_0 = 0
        assert any(not torch.equal(a, b) for a, b in zip(homogeneous_w, split_w))  # c_t is not zero here


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("direct", ["lr", "weight_decay"])
def test_adam_split_reproduces_the_unsplit_update(foreach, decoupled, direct):
    tw, tm, tv, hvp, params, d, m = _lists(7, seed=4)
    v = [x.square() + 0.1 for x in _lists(1, seed=5)[0]]
    for x in (v, d, m, tv):  # where v = 0 every gradient seen was 0 (so are m and v'); sqrt(v)' is 0 there
        x[1][0] = 0.0
    denom = [x.sqrt() / 0.3 + 1e-8 for x in v]
    kw = dict(lr=0.01, beta1=0.9, beta2=0.999, weight_decay=1e-2, decoupled=decoupled, foreach=foreach,
              lr_derivative=0.7)
    flags = dict(direct_lr=direct == "lr", direct_weight_decay=direct == "weight_decay")
    moments = (params, d, m, v, denom, [0.19, 0.19], [0.3, 0.3])
    full = [[t.clone() for t in x] for x in (tw, tm, tv)]
    adam_tangent_update_(*full, [h.clone() for h in hvp], *moments, **kw, **flags)
    split = [[t.clone() for t in x] for x in (tw, tm, tv)]
    adam_tangent_update_(*split, [h.clone() for h in hvp], *moments, **kw, direct_lr=False, direct_weight_decay=False)
    adam_direct_terms_(*split, *moments, **kw, **flags)
    for a, b in zip(sum(full, []), sum(split, [])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------------------------------- gamma < 1
def _t(x):
    return torch.tensor(x, dtype=torch.float64)


def test_growth_gamma_by_hand():
    nan = _t(math.nan)
    # first observation: the EMA starts at log rho; rho = sqrt(16 / 4) = 2, gamma = 1 / 2
    ema, gamma = growth_gamma(_t(4.0), _t(16.0), nan, cap=1.0)
    assert float(ema) == pytest.approx(math.log(2.0), rel=1e-15) and float(gamma) == pytest.approx(0.5, rel=1e-15)
    # then e <- 0.9 e + 0.1 log rho: a non-expanding step (rho = 1) gives e = 0.9 log 2, gamma = 2^-0.9
    ema, gamma = growth_gamma(_t(9.0), _t(9.0), ema, cap=1.0)
    assert GROWTH_BETA == 0.9
    assert float(ema) == pytest.approx(0.9 * math.log(2.0), rel=1e-15)
    assert float(gamma) == pytest.approx(2.0 ** -0.9, rel=1e-14)
    # the cap c scales gamma, capped at 1
    assert float(growth_gamma(_t(1.0), _t(4.0), nan, cap=1.5)[1]) == pytest.approx(0.75, rel=1e-15)
    assert float(growth_gamma(_t(1.0), _t(4.0), nan, cap=3.0)[1]) == 1.0
    assert float(growth_gamma(_t(4.0), _t(1.0), nan, cap=1.0)[1]) == 1.0  # contracting
    assert float(growth_gamma(_t(4.0), _t(1.0), nan, cap=0.0)[1]) == 0.0  # c = 0: the greedy horizon
    # a zero state or a non-finite image changes nothing: gamma = 1, the EMA kept
    for before, after in ((0.0, 1.0), (1.0, math.inf), (1.0, math.nan)):
        ema, gamma = growth_gamma(_t(before), _t(after), _t(0.3), cap=1.0)
        assert float(ema) == 0.3 and float(gamma) == 1.0
    ema, gamma = growth_gamma(_t(0.0), _t(0.0), nan, cap=1.0)
    assert math.isnan(float(ema)) and float(gamma) == 1.0
    # an image of norm 0 counts as log(1e-300)
    assert float(growth_gamma(_t(1.0), _t(0.0), nan, cap=1.0)[0]) == pytest.approx(0.5 * math.log(1e-300))


def test_quadratic_influence_by_hand():
    """L_t(w) = a_t w^2 / 2 (one parameter, SGD without momentum, lr tuned, meta_lr 0): the lr tangent is
    w'_{t+1} = gamma_t (1 - lr a_t) w'_t - u_t with rho_t = |1 - lr a_t| and the EMA of log rho_t."""
    curv = [1.0, 30.0, 25.0, 0.5, 40.0]
    lr, cap = 0.1, 1.0
    w = torch.nn.Parameter(torch.tensor([0.7], dtype=torch.float64))
    opt = ohotorch.OHO([w], lr=lr, tune=("lr",), meta_lr=0.0, discount=1.0, growth_cap=cap, hvp="central")
    w_ref, tangent, ema, gammas = 0.7, 0.0, None, []
    for t, a in enumerate(curv):
        def closure():
            opt.zero_grad()
            loss = 0.5 * a * (w * w).sum()
            loss.backward()
            return loss
        opt.step(closure)
        u = a * w_ref
        homogeneous = (1.0 - lr * a) * tangent
        gamma = 1.0
        if tangent != 0.0:
            log_rho = math.log(abs(1.0 - lr * a))
            ema = log_rho if ema is None else 0.9 * ema + 0.1 * log_rho
            gamma = min(1.0, cap / math.exp(ema))
        gammas.append(gamma)
        tangent = gamma * homogeneous - u
        w_ref = w_ref - lr * u
        got = float(opt.state[w]["tangent_w"][0, 0])
        assert got == pytest.approx(tangent, rel=1e-9), t
        assert opt.diagnostics["growth_gamma"]["0/lr"] == pytest.approx(gamma, rel=1e-9)
    assert max(gammas[1:]) < 0.6  # the cap really binds in this case
    assert float(opt._bookkeeping.growth_ema[0]) == pytest.approx(ema, rel=1e-9)


# ---------------------------------------------------------------------------------------------- state
def _train(opt, model, data, val):
    for b in data:
        opt.step(closures(opt, model, b))
        opt.hyper_step(closures(opt, model, val))


@pytest.mark.parametrize("cls, kwargs", [(ohotorch.OHO, dict(momentum=0.9)), (ohotorch.OHOAdam, {})])
def test_state_dict_round_trip_continues_bit_identically(cls, kwargs):
    train, val = _setup()
    model = mlp()
    make = lambda m: cls(m.parameters(), lr=0.05, weight_decay=1e-3, discount=1.0, growth_cap=1.0, meta_lr=0.01,
                         **kwargs)
    opt = make(model)
    _train(opt, model, train[:5], val)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert len(saved["oho"]["growth_ema"]) == len(opt._bookkeeping.keys)
    assert all(math.isfinite(e) for e in saved["oho"]["growth_ema"])
    _train(opt, model, train[5:10], val)

    other = mlp(seed=7)
    other.load_state_dict(saved_model)
    resumed = make(other)
    resumed.load_state_dict(saved)
    assert torch.equal(resumed._bookkeeping.growth_ema, torch.tensor(saved["oho"]["growth_ema"], dtype=torch.float64))
    _train(resumed, other, train[5:10], val)
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(_tangents(opt), _tangents(resumed)))
    assert torch.equal(opt._bookkeeping.growth_ema, resumed._bookkeeping.growth_ema)
    assert opt.param_groups[0]["lr"] == resumed.param_groups[0]["lr"]


def test_old_checkpoint_without_the_ema_loads():
    train, val = _setup()
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.05, momentum=0.9, discount=1.0, growth_cap=1.0)
    _train(opt, model, train[:3], val)
    saved = opt.state_dict()
    del saved["oho"]["growth_ema"]
    opt.load_state_dict(saved)
    assert opt._bookkeeping.growth_ema is None
    _train(opt, model, train[3:5], val)  # the EMA restarts from its first observation
    assert torch.isfinite(opt._bookkeeping.growth_ema).all()


def test_failed_closure_commits_nothing():
    """Strong exception safety: a closure that fails in a Hessian-vector product leaves the influence, the
    growth EMA, the weights and the counters as they were."""
    train, val = _setup()
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3, discount=1.0, growth_cap=1.0)
    _train(opt, model, train[:4], val)
    before = ([p.detach().clone() for p in model.parameters()], _tangents(opt),
              opt._bookkeeping.growth_ema.clone(), opt.counters)
    calls = [0]
    x, y = train[4]

    def failing():
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("boom")
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(failing)
    assert all(torch.equal(a, b) for a, b in zip(before[0], model.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before[1], _tangents(opt)))
    assert torch.equal(before[2], opt._bookkeeping.growth_ema)
    assert before[3] == opt.counters


@pytest.mark.parametrize("cls", [ohotorch.OHO, ohotorch.OHOAdamW])
def test_sync_free_path_gives_the_same_numbers(cls):
    """The device path (forced on CPU tensors) keeps the EMA and gamma as tensors: same influence."""
    train, val = _setup()
    results = []
    for sync_free in (False, True):
        model = mlp()
        opt = cls(model.parameters(), lr=0.05, weight_decay=1e-3, discount=1.0, growth_cap=1.0, meta_lr=0.0)
        opt._sync_free = sync_free
        run_oho(model, opt, train[:6])
        results.append((_tangents(opt), opt._bookkeeping.growth_ema.clone()))
    # (the two paths' finite-difference scales differ in rounding: equal to float64 rounding, as without the cap)
    for a, b in zip(results[0][0], results[1][0]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-9, atol=1e-12)
    assert torch.isfinite(results[1][1]).all()


def test_greedy_horizon_ignores_the_cap():
    train, val = _setup()
    out = []
    for cap in (None, 1.0):
        model = mlp()
        opt = ohotorch.OHO(model.parameters(), lr=0.05, momentum=0.9, growth_cap=cap)
        run_oho(model, opt, train[:4])
        out.append((_tangents(opt), opt._bookkeeping.growth_ema))
    assert all(torch.equal(a, b) for a, b in zip(out[0][0], out[1][0]))
    assert out[1][1] is None


@pytest.mark.parametrize("bad", [-1.0, math.nan, math.inf, True, "1", torch.tensor(1.0)])
def test_invalid_growth_cap_is_refused(bad):
    with pytest.raises((ValueError, TypeError), match="growth_cap"):
        ohotorch.OHO(torch.nn.Linear(2, 1).parameters(), lr=0.1, discount=1.0, growth_cap=bad)
    with pytest.raises((ValueError, TypeError), match="growth_cap"):
        ohotorch.OHOAdam(torch.nn.Linear(2, 1).parameters(), discount=1.0, growth_cap=bad)


def test_option_is_public_state():
    opt = ohotorch.OHOAdamW(torch.nn.Linear(2, 1).parameters(), discount=1.0, growth_cap=2)
    assert opt.growth_cap == 2.0 and isinstance(opt.options.growth_cap, float)
