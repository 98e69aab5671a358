"""The sync-free path (CUDA's default), run here on CPU tensors by forcing it: deferred read-back,
the one-step lag of param_groups, outside writes, non-finite values; and ohotorch.deferred itself."""
import math
import warnings

import pytest
import torch

import ohotorch
from ohotorch.deferred import Deferred, Readback, Record
from helpers import batches, closures, digits, mlp

MAKERS = {
    "OHO": lambda params, **kw: ohotorch.OHO(params, lr=0.05, momentum=0.9, weight_decay=1e-3, **kw),
    "OHOAdam": lambda params, **kw: ohotorch.OHOAdam(params, lr=1e-3, weight_decay=1e-3, **kw),
}


def _run(name, sync_free, steps=6, **kw):
    xt, yt, xv, yv = digits()
    model = mlp()
    opt = MAKERS[name](model.parameters(), **kw)
    opt._sync_free = sync_free
    val = closures(opt, model, (xv[:128], yv[:128]))
    hypers, lrs = [], []
    for b in batches(xt, yt, 32, steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(closures(opt, model, b))
        hypers.append({k: float(v) for k, v in opt.hyper_step(val)[0].items()})
    return opt, model, hypers, lrs


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("hvp", ["forward", "central"])
def test_sync_free_hypergradients_equal_the_synchronous_path(name, hvp):
    """meta_lr = 0 (no lag to differ by): the device path computes the same hypergradients, float64."""
    got = [_run(name, sync_free, discount=1.0, hvp=hvp, meta_lr=0.0)[2] for sync_free in (False, True)]
    for a, b in zip(*got):
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-12, abs_tol=1e-300), (k, a[k], b[k])


def test_hyperparameters_reach_param_groups_one_step_later():
    """A hyper-step's value is used from the second step after it; state_dict settles everything; the
    settled meta state equals the synchronous meta-update's of the same hypergradients."""
    xt, yt, xv, yv = digits()
    model = mlp()
    opt = MAKERS["OHO"](model.parameters(), discount=1.0)
    opt._sync_free = True
    val = closures(opt, model, (xv[:128], yv[:128]))
    train = batches(xt, yt, 32, 4)
    opt.step(closures(opt, model, train[0]))
    opt.hyper_step(val)
    assert opt.param_groups[0]["lr"] == 0.05  # pending
    opt.step(closures(opt, model, train[1]))
    assert opt.param_groups[0]["lr"] == 0.05  # this step still used the old value
    opt.hyper_step(val)
    opt.step(closures(opt, model, train[2]))
    first = opt.param_groups[0]["lr"]
    assert first != 0.05  # the first hyper-step's value
    saved = opt.state_dict()  # applies the second one too
    assert opt.param_groups[0]["lr"] != first and saved["param_groups"][0]["lr"] == opt.param_groups[0]["lr"]
    assert saved["oho"]["meta_state"]["0/lr"]["t"] == 2.0 and opt.counters["hyper_steps"] == 2


def test_outside_write_wins_over_a_pending_hyper_step():
    xt, yt, xv, yv = digits()
    model = mlp()
    opt = MAKERS["OHO"](model.parameters(), discount=1.0)
    opt._sync_free = True
    val = closures(opt, model, (xv[:128], yv[:128]))
    train = batches(xt, yt, 32, 4)
    for b in train[:2]:
        opt.step(closures(opt, model, b))
        opt.hyper_step(val)
    opt.param_groups[0]["lr"] = 0.5  # while a hyper-step is pending
    with pytest.warns(UserWarning, match="changed from outside"):
        opt.step(closures(opt, model, train[2]))
    opt.step(closures(opt, model, train[3]))
    assert opt.param_groups[0]["lr"] == 0.5
    opt.hyper_step(val)
    opt.state_dict()
    lr = opt.param_groups[0]["lr"]
    # one fresh Adam step from 0.5: at most about the meta learning rate (fast start's while fast)
    assert lr != 0.5 and abs(math.log(lr / 0.5)) < 1.05 * max(opt.meta_lr["lr"], opt.fast_start or 0.0)
    assert opt.state_dict()["oho"]["meta_state"]["0/lr"]["t"] == 1.0


@pytest.mark.parametrize("name", list(MAKERS))
def test_nonfinite_tangent_is_reset_later_and_never_reaches_weights(name):
    xt, yt, xv, yv = digits()
    model = mlp()
    opt = MAKERS[name](model.parameters(), discount=1.0)
    opt._sync_free = True
    val = closures(opt, model, (xv[:128], yv[:128]))
    train = batches(xt, yt, 32, 6)
    opt.step(closures(opt, model, train[0]))
    opt.hyper_step(val)
    next(iter(opt.state.values()))["tangent_w"][0].fill_(float("nan"))
    lr_before = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for b in train[1:]:
            opt.step(closures(opt, model, b))
            opt.hyper_step(val)
        counters = opt.counters
    assert counters["nonfinite_influence"] >= 1 and counters["nonfinite_hypergradients"] >= 1
    assert any("non-finite" in str(w.message) for w in caught)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    opt.state_dict()
    assert all(math.isfinite(v) for v in opt.param_groups[0].values() if isinstance(v, float))
    assert all(torch.isfinite(s["tangent_w"]).all() for s in opt.state.values())  # reset, then finite again
    del lr_before


def test_nonfinite_validation_loss_changes_nothing():
    xt, yt, xv, yv = digits()
    model = mlp()
    opt = MAKERS["OHO"](model.parameters(), discount=1.0)
    opt._sync_free = True
    opt.step(closures(opt, model, (xt[:32], yt[:32])))
    before = dict(opt.param_groups[0])

    def bad():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(xv), yv) * float("nan")
        loss.backward()
        return loss

    opt.hyper_step(bad)
    with pytest.warns(UserWarning, match="non-finite validation loss"):
        opt.state_dict()
    assert opt.param_groups[0] == before and opt.counters["nonfinite_hypergradients"] == 1


def test_deferred_records_are_consumed_once_and_applied_in_order():
    log = []
    deferred = Deferred()
    for created in range(3):
        deferred.add(Record(created, Readback(torch.tensor([float(created)])),
                            consume=lambda v: log.append(("consume", v[0])),
                            apply=lambda v: log.append(("apply", v[0]))))
    deferred.consume_all()
    deferred.apply(before=2)
    assert log == [("consume", 0.0), ("consume", 1.0), ("consume", 2.0), ("apply", 0.0), ("apply", 1.0)]
    assert len(deferred.records) == 1
    deferred.apply()
    assert log[-1] == ("apply", 2.0) and not deferred.records and deferred.waits == 0
    import copy
    assert copy.deepcopy(deferred).records == []
