"""The averaged target (ohotorch.averaging, option average=p): exactness against autograd through the
unrolled updates in float64 (full and greedy horizons, SGD with momentum, Adam, AdamW, per-layer groups,
growth_cap, loss hyperparameters), the averages themselves, averaged(), exception safety, state_dict and
copies, the foreach and sync-free paths, and the refusals."""
import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F

import ohotorch
from ohotorch import averaging
from helpers import (batches, closures, digits, mlp, oracle_hypergradients, param_index_groups, relative_error)

T = 8
POWER = 3.0
CASES = {
    "momentum": (ohotorch.OHO, dict(lr=0.1, momentum=0.9, weight_decay=1e-3, tune=("lr", "weight_decay", "momentum")),
                 dict(rule="sgd", use_buffer=True)),
    "nesterov": (ohotorch.OHO, dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-3,
                                    tune=("lr", "weight_decay")), dict(rule="sgd", use_buffer=True, nesterov=True)),
    "adam": (ohotorch.OHOAdam, dict(lr=1e-2, weight_decay=1e-3, tune=("lr", "weight_decay")), dict(rule="adam")),
    "adamw": (ohotorch.OHOAdamW, dict(lr=1e-2, weight_decay=1e-2, tune=("lr", "weight_decay")), dict(rule="adamw")),
}


def _data(steps=T, seed=0):
    xt, yt, xv, yv = digits()
    return batches(xt, yt, 32, steps, seed=seed + 1), (xv[:300], yv[:300])


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _bits_equal(a, b):
    return all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


def _compare(model, opt, train, val, oracle_options, *, greedy, rtol):
    values = [{n: g[n] for n in ("lr", "weight_decay", "momentum") if n in g} for g in opt.param_groups]
    expected = oracle_hypergradients(copy.deepcopy(model), param_index_groups(model, opt.param_groups), values,
                                     train, val, average=opt.average, greedy=greedy, **oracle_options)
    for b in train:
        opt.step(closures(opt, model, b))
    got = opt.hypergradient(closures(opt, model, val))
    worst = 0.0
    for k, (e, g) in enumerate(zip(expected, got)):
        assert set(g) == set(opt.param_groups[k]["tune"]) and g
        for name in g:
            assert e[name] != 0.0
            err = relative_error(float(g[name]), e[name])
            worst = max(worst, err)
            assert err <= rtol, f"group {k} {name}: oho {float(g[name])!r} vs autograd {e[name]!r} (rel {err:.2e})"
    return worst


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("case", sorted(CASES))
def test_full_horizon_matches_autograd_through_the_averaged_unrolled_updates(case):
    cls, kwargs, oracle_options = CASES[case]
    train, val = _data()
    model = mlp()
    opt = cls(model.parameters(), hvp="central", meta_lr=0.0, discount=1.0, average=POWER, **kwargs)
    worst = _compare(model, opt, train, val, oracle_options, greedy=False, rtol=1e-8)
    print(f"{case}: worst relative error {worst:.2e}")


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_horizon_matches_the_average_of_one_step_influences(case):
    """Greedy: each w'_t is the one-step direct term, w_bar' their average (the oracle detaches every step)."""
    cls, kwargs, oracle_options = CASES[case]
    train, val = _data()
    model = mlp()
    opt = cls(model.parameters(), meta_lr=0.0, discount=0.0, average=POWER, **kwargs)
    _compare(model, opt, train, val, oracle_options, greedy=True, rtol=1e-10)


@pytest.mark.parametrize("influence", ["exact", "blockwise"])
def test_per_layer_groups_match_autograd(influence):
    train, val = _data()
    model = mlp((64, 16, 10))
    groups = ohotorch.layerwise(model, tune=("lr", "weight_decay"))
    for i, g in enumerate(groups):
        g["lr"], g["weight_decay"] = 0.05 + 0.03 * i, 1e-3 * (i + 1)
    opt = ohotorch.OHO(groups, momentum=0.9, hvp="central", meta_lr=0.0, discount=1.0, influence=influence,
                       average=1.0)
    if influence == "exact":
        _compare(model, opt, train, val, dict(use_buffer=True), greedy=False, rtol=1e-8)
    else:  # blockwise: the per-group read-out of the summed tangents, at the average, equals ...
        for b in train:
            opt.step(closures(opt, model, b))
        got = opt.hypergradient(closures(opt, model, val))
        # ... <grad L_val(w_bar) restricted to group g, w_bar'_name restricted to g>, computed here by hand
        with opt.averaged():
            opt.zero_grad()
            F.cross_entropy(model(val[0]), val[1]).backward()
            for g, hyper in zip(opt.param_groups, got):
                for k, name in enumerate(("lr", "weight_decay")):
                    by_hand = sum(float((p.grad * opt.state[p]["average_tangent_w"][k]).sum()) for p in g["params"])
                    assert relative_error(float(hyper[name]), by_hand) <= 1e-12


def test_shared_hyper_group_and_growth_cap_that_never_binds_match_autograd():
    train, val = _data()
    model = mlp((64, 16, 10))
    groups = ohotorch.share(ohotorch.layerwise(model, lr=0.1, weight_decay=1e-3, tune=("lr", "weight_decay")))
    opt = ohotorch.OHO(groups, momentum=0.9, hvp="central", meta_lr=0.0, discount=1.0, growth_cap=1e30,
                       average=POWER)
    tied = [[(k, name) for k in range(len(groups))] for name in ("lr", "weight_decay")]
    _compare(model, opt, train, val, dict(use_buffer=True, tied=tied), greedy=False, rtol=1e-8)


def test_loss_hyperparameter_matches_finite_differences_of_the_whole_run():
    """d L_val(w_bar_T) / d rho for J = CE + rho * ||w||^2 / 2 (full horizon), against a central finite
    difference of the whole float64 training run in rho (no autograd in the loop: an independent check)."""
    train, val = _data(6)

    def run(rho_value, tuned):
        model = mlp((64, 16, 10))
        opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, tune=("lr",) if tuned else (),
                           hvp="central", meta_lr=0.0, discount=1.0, average=POWER)
        rho = opt.hyperparameter("l2", rho_value) if tuned else None
        for x, y in train:
            def closure():
                opt.zero_grad()
                value = rho.value if tuned else rho_value
                loss = F.cross_entropy(model(x), y) + value * 0.5 * sum(p.pow(2).sum() for p in model.parameters())
                loss.backward()
                return loss
            opt.step(closure)
        with opt.averaged():
            loss = float(F.cross_entropy(model(val[0]), val[1]).detach())
        if tuned:
            opt.hypergradient(closures(opt, model, val))  # stores d L_val(w_bar) / d rho in rho.grad
        return loss, (None if rho is None else float(rho.grad))

    rho0, h = 1e-2, 1e-5
    _, got = run(rho0, True)
    expected = (run(rho0 + h, False)[0] - run(rho0 - h, False)[0]) / (2 * h)
    assert expected != 0.0 and relative_error(got, expected) <= 1e-6, (got, expected)


# ---------------------------------------------------------------------------------------------- the averages
def test_weight_by_hand():
    assert averaging.weight(1, 3.0) == 1.0 and averaging.weight(1, 0.0) == 1.0
    assert averaging.weight(2, 3.0) == 4.0 / 5.0 and averaging.weight(5, 3.0) == 0.5
    assert averaging.weight(4, 0.0) == 0.25


@pytest.mark.parametrize("power", [0.0, 3.0])
def test_averages_are_the_polynomial_average_of_the_iterates(power):
    """w_bar_1 = w_1 exactly; then the recursion; p = 0 is the uniform mean of the iterates. Tuning off:
    the weights are bit-identical to torch.optim.SGD's (the average is side state only)."""
    train, _ = _data(6)
    model = mlp()
    reference = copy.deepcopy(model)
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, tune=(), average=power)
    torch_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    iterates, expected = [], None
    for t, b in enumerate(train, start=1):
        opt.step(closures(opt, model, b))
        torch_opt.step(closures(torch_opt, reference, b))
        assert _bits_equal(_params(model), _params(reference))
        iterates.append(_params(model))
        a = min(1.0, (1.0 + power) / (t + power))
        expected = iterates[-1] if expected is None else [m + a * (x - m) for m, x in zip(expected, iterates[-1])]
        averages = [opt.state[p]["average_w"] for p in model.parameters()]
        if t == 1:
            assert _bits_equal(averages, iterates[0])
        assert all(torch.allclose(m, e, rtol=0, atol=1e-14) for m, e in zip(averages, expected))
        assert all("average_tangent_w" not in opt.state[p] for p in model.parameters())  # no tangents: none
    if power == 0.0:
        mean = [torch.stack(ws).mean(0) for ws in zip(*iterates)]
        assert all(torch.allclose(m, e, rtol=0, atol=1e-14)
                   for m, e in zip((opt.state[p]["average_w"] for p in model.parameters()), mean))


@pytest.mark.parametrize("cls", [ohotorch.OHO, ohotorch.OHOAdam])
def test_average_none_is_todays_optimizer_and_averaging_does_not_touch_the_trajectory(cls):
    train, val = _data(5)
    runs = {}
    for average in (None, "default", POWER):
        model = mlp()
        kwargs = {} if average == "default" else {"average": average}
        opt = cls(model.parameters(), lr=0.05, weight_decay=1e-3, discount=1.0, **kwargs)
        hypers = []
        for b in train:
            opt.step(closures(opt, model, b))
            hypers.append([float(h) for h in opt.hyper_step(closures(opt, model, val))[0].values()])
        runs[average] = (_params(model), hypers, opt)
    none, default, averaged = runs[None], runs["default"], runs[POWER]
    assert _bits_equal(none[0], default[0]) and none[1] == default[1]
    assert all(not any(k.startswith("average") for k in s) for s in none[2].state.values())
    assert averaged[1][0] == none[1][0] and averaged[1][1:] != none[1][1:]  # a_1 = 1: the first hyper-step agrees


def test_first_hyper_step_equals_the_unaveraged_one_then_they_differ():
    """a_1 = 1: the first hypergradient is today's exactly; later ones are taken at the average."""
    train, val = _data(3)
    got = {}
    for average in (None, POWER):
        model = mlp()
        opt = ohotorch.OHO(model.parameters(), lr=0.05, weight_decay=1e-3, discount=1.0, meta_lr=0.0, average=average)
        hypers = []
        for b in train:
            opt.step(closures(opt, model, b))
            hypers.append([float(h) for h in opt.hypergradient(closures(opt, model, val))[0].values()])
        got[average] = (hypers, _params(model))
    assert got[None][0][0] == got[POWER][0][0]
    assert got[None][0][1] != got[POWER][0][1]
    assert _bits_equal(got[None][1], got[POWER][1])  # meta_lr = 0: the same trajectory


# ---------------------------------------------------------------------------------------------- averaged()
def _trained(steps=4, **kwargs):
    train, val = _data(steps)
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, discount=1.0,
                       average=kwargs.pop("average", POWER), **kwargs)
    for b in train:
        opt.step(closures(opt, model, b))
        opt.hyper_step(closures(opt, model, val))
    return model, opt, val


def test_averaged_puts_the_average_in_and_restores_the_weights_bitwise():
    model, opt, _ = _trained()
    before, objects = _params(model), list(model.parameters())
    averages = [opt.state[p]["average_w"].clone() for p in model.parameters()]
    assert not _bits_equal(before, averages)
    with opt.averaged():
        assert _bits_equal(_params(model), averages)
    assert _bits_equal(_params(model), before) and list(model.parameters()) == objects
    with pytest.raises(KeyError):
        with opt.averaged():
            raise KeyError("inside")
    assert _bits_equal(_params(model), before)
    assert _bits_equal([opt.state[p]["average_w"] for p in model.parameters()], averages)


def test_averaged_before_the_first_step_keeps_the_weights():
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.1, average=POWER)
    before = _params(model)
    with opt.averaged():
        assert _bits_equal(_params(model), before)


def test_averaged_needs_average_and_refuses_a_step_inside():
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="needs average=p"):
        with opt.averaged():
            pass
    model, opt, val = _trained(2)
    before, state = _params(model), copy.deepcopy(opt.state_dict())
    with opt.averaged():
        with pytest.raises(RuntimeError, match="inside averaged"):
            opt.step(closures(opt, model, val))
    assert _bits_equal(_params(model), before)
    assert opt.state_dict()["oho"]["steps"] == state["oho"]["steps"]
    opt.step(closures(opt, model, val))  # outside again: allowed


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), True, "3", torch.tensor(3.0)])
def test_invalid_average_is_refused(bad):
    with pytest.raises((ValueError, TypeError), match="average"):
        ohotorch.OHO(mlp().parameters(), lr=0.1, average=bad)
    with pytest.raises((ValueError, TypeError), match="average"):
        ohotorch.OHOAdamW(mlp().parameters(), lr=0.1, average=bad)


def test_option_is_public_state():
    opt = ohotorch.OHOAdam(mlp().parameters(), lr=1e-3, average=2)
    assert opt.average == 2.0 and isinstance(opt.average, float) and opt.options.average == 2.0


# ---------------------------------------------------------------------------------------------- exception safety
def _state_tensors(model, opt):
    return {f"{i}/{key}": value for i, p in enumerate(model.parameters())
            for key, value in opt.state[p].items() if torch.is_tensor(value)}


def _snapshot(model, opt):
    return (_params(model), [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            [p.grad for p in model.parameters()],
            {key: value.clone() for key, value in _state_tensors(model, opt).items()})


def _unchanged(model, opt, saved):
    params, grad_values, grad_objects, state = saved
    assert _bits_equal(_params(model), params)
    assert all(g is o for g, o in zip((p.grad for p in model.parameters()), grad_objects))
    assert all((a is None and b is None) or torch.equal(a, b)
               for a, b in zip((p.grad for p in model.parameters()), grad_values))
    now = _state_tensors(model, opt)
    assert now.keys() == state.keys() and all(torch.equal(now[k], state[k]) for k in state)


def test_raising_validation_closure_changes_nothing():
    model, opt, val = _trained(3)
    counters = opt.counters
    saved = _snapshot(model, opt)
    groups = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])

    def bad():
        opt.zero_grad()
        F.cross_entropy(model(val[0]), val[1]).backward()
        raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError, match="validation failed"):
        opt.hyper_step(bad)
    _unchanged(model, opt, saved)
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups
    assert opt.counters == counters


@pytest.mark.parametrize("fail_at", [1, 2])  # the training evaluation, or the Hessian-vector product's
def test_raising_training_closure_leaves_the_averages_unchanged(fail_at):
    model, opt, val = _trained(3)
    saved = _snapshot(model, opt)
    calls = []
    x, y = val

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = F.cross_entropy(model(x[:32]), y[:32])
        loss.backward()
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return loss

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    _unchanged(model, opt, saved)
    assert opt.counters["steps"] == 3


# ---------------------------------------------------------------------------------------------- state and copies
@pytest.mark.parametrize("cls, kwargs", [(ohotorch.OHO, dict(lr=0.1, momentum=0.9, weight_decay=1e-3)),
                                         (ohotorch.OHOAdamW, dict(lr=1e-2))])
def test_state_dict_round_trip_continues_bit_exactly(cls, kwargs):
    train, val = _data(7)

    def make(model):
        return cls(model.parameters(), discount=1.0, growth_cap=1.0, average=POWER, **kwargs)

    def go(model, opt, part):
        for b in part:
            opt.step(closures(opt, model, b))
            opt.hyper_step(closures(opt, model, val))

    model = mlp()
    opt = make(model)
    go(model, opt, train[:4])
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    assert all("average_w" in s and "average_tangent_w" in s for s in saved["state"].values())
    go(model, opt, train[4:])
    resumed = mlp(seed=5)
    resumed.load_state_dict(weights)
    opt2 = make(resumed)
    opt2.load_state_dict(saved)
    go(resumed, opt2, train[4:])
    _same(model, opt, resumed, opt2)
    for copy_model, copy_opt in _copies(model, opt):
        _same(model, opt, copy_model, copy_opt)


def _same(model, opt, copy_model, copy_opt):
    assert _bits_equal(_params(copy_model), _params(model))
    for p, q in zip(model.parameters(), copy_model.parameters()):
        for key in ("average_w", "average_tangent_w"):
            assert torch.equal(opt.state[p][key], copy_opt.state[q][key])
    with opt.averaged(), copy_opt.averaged():
        assert _bits_equal(_params(copy_model), _params(model))
    assert copy_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def _copies(model, opt):
    """deepcopy and pickle of (model, opt), then continued like the original for one step (checked by
    the caller against the original after the same step)."""
    train, val = _data(9)
    out = []
    copies = [copy.deepcopy((model, opt)), pickle.loads(pickle.dumps((model, opt)))]
    for m, o in [(model, opt)] + copies:
        o.step(closures(o, m, train[8]))
        o.hyper_step(closures(o, m, val))
    out.extend(copies)
    return out


def test_float32_averages_of_bfloat16_parameters_keep_their_dtype_through_a_state_dict():
    model = mlp(dtype=torch.bfloat16)
    opt = ohotorch.OHO(model.parameters(), lr=0.1, discount=1.0, average=POWER)
    xt, yt, _, _ = digits(dtype=torch.bfloat16)
    opt.step(closures(opt, model, (xt[:32], yt[:32])))
    assert all(opt.state[p]["average_w"].dtype == torch.float32 for p in model.parameters())
    opt2 = ohotorch.OHO(model.parameters(), lr=0.1, discount=1.0, average=POWER)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))
    for p in model.parameters():
        for key in ("average_w", "average_tangent_w"):
            assert opt2.state[p][key].dtype == torch.float32 and torch.equal(opt2.state[p][key], opt.state[p][key])


def test_checkpoint_without_averages_starts_them_at_the_next_iterate():
    model, opt, val = _trained(3, average=None)
    saved = copy.deepcopy(opt.state_dict())
    opt2 = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, discount=1.0, average=POWER)
    opt2.load_state_dict(saved)
    with opt2.averaged():
        pass
    first = opt2.hypergradient(closures(opt2, model, val))  # no average yet: at w with w'
    assert first == opt.hypergradient(closures(opt, model, val))
    train, _ = _data(2, seed=3)
    opt2.step(closures(opt2, model, train[0]))
    first = _params(model)
    assert _bits_equal([opt2.state[p]["average_w"] for p in model.parameters()], first)  # the next iterate
    assert all(torch.equal(s["average_tangent_w"], s["tangent_w"]) for s in opt2.state.values())
    opt2.step(closures(opt2, model, train[1]))
    a = averaging.weight(5, POWER)
    for p, w in zip(model.parameters(), first):
        assert torch.allclose(opt2.state[p]["average_w"], w + a * (p.detach() - w), rtol=0, atol=1e-15)


def test_initialise_state_creates_the_averages():
    """The distributed-checkpoint idiom (step() with zero grads and lr 0) lays out every state key."""
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.0, discount=1.0, average=POWER)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all({"average_w", "average_tangent_w"} <= set(opt.state[p]) for p in model.parameters())


# ---------------------------------------------------------------------------------------------- fast paths
def _run_paths(sync_free=False, foreach=None, steps=5, **kwargs):
    train, val = _data(steps)
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, discount=1.0, meta_lr=0.0,
                       average=POWER, foreach=foreach, **kwargs)
    opt._sync_free = sync_free
    hypers = []
    for b in train:
        opt.step(closures(opt, model, b))
        hypers.append([float(h) for h in opt.hyper_step(closures(opt, model, val))[0].values()])
    return model, opt, hypers


def _averages(model, opt):
    return [opt.state[p][k] for p in model.parameters() for k in ("average_w", "average_tangent_w")]


def test_sync_free_path_gives_the_same_numbers():
    host = _run_paths(sync_free=False)
    device = _run_paths(sync_free=True)
    for a, b in zip(host[2], device[2]):
        assert all(math.isclose(x, y, rel_tol=1e-12) for x, y in zip(a, b)), (a, b)
    assert all(torch.allclose(x, y, rtol=1e-12, atol=1e-300) for x, y in zip(_averages(*host[:2]), _averages(*device[:2])))


def test_foreach_lerp_gives_the_same_bits_and_is_used(monkeypatch):
    calls = []
    original = torch._foreach_lerp_

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "_foreach_lerp_", counting)
    reference = _run_paths(foreach=False, steps=3)
    assert not calls
    fast = _run_paths(foreach=True, steps=3)
    assert len(calls) == 2 * 3  # weights and tangents, once a step
    assert _bits_equal(_averages(*reference[:2]), _averages(*fast[:2])) and reference[2] == fast[2]


@pytest.mark.parametrize("sync_free", [False, True])
def test_nonfinite_tangent_resets_its_average_too(sync_free):
    train, val = _data(6)
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.05, momentum=0.9, discount=1.0, average=POWER)
    opt._sync_free = sync_free
    opt.step(closures(opt, model, train[0]))
    state = next(iter(opt.state.values()))
    for key in ("tangent_w", "average_tangent_w"):  # as a step whose tangent update overflowed leaves them
        state[key][0].fill_(float("nan"))
    with pytest.warns(UserWarning, match="non-finite"):
        for b in train[1:]:
            opt.step(closures(opt, model, b))
            opt.hyper_step(closures(opt, model, val))
        opt.state_dict()  # the sync-free path applies its deferred resets
    assert all(torch.isfinite(s["average_tangent_w"]).all() for s in opt.state.values())
    assert math.isfinite(float(opt.hypergradient(closures(opt, model, val))[0]["lr"]))


def test_hypergradient_inside_averaged_is_the_same_and_both_restore():
    model, opt, val = _trained(3)
    before = _params(model)
    outside = opt.hypergradient(closures(opt, model, val))
    with opt.averaged():
        averages = _params(model)
        inside = opt.hypergradient(closures(opt, model, val))
        assert _bits_equal(_params(model), averages)
    assert inside == outside and _bits_equal(_params(model), before)
