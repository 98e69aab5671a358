"""ohotorch.hyper_groups: param groups that share one tuned value (exact against autograd in float64),
weight decay tuned from 0 only when asked, and the effective lr shown in the param groups."""
import copy
import math
import pickle

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

import ohotorch
from ohotorch import hyper_groups
from helpers import (batches, closures, digits, mlp, oracle_hypergradients, param_index_groups, relative_error,
                     run_oho)

T = 15


def _data():
    xt, yt, xv, yv = digits()
    return batches(xt, yt, 32, T, seed=1), (xv[:300], yv[:300])


def _check(expected, got, opt, rtol):
    worst = 0.0
    for k, (e, g) in enumerate(zip(expected, got)):
        assert set(g) == set(opt.param_groups[k]["tune"])
        for name in g:
            err = relative_error(float(g[name]), e[name])
            worst = max(worst, err)
            assert err <= rtol, f"group {k} {name}: oho {float(g[name])!r} vs autograd {e[name]!r} (rel {err:.2e})"
    return worst


def _tied(opt):
    """The oracle's ties: every hyper variable's members, from the labels (independently of OHO's code)."""
    by_label = {}
    for k, g in enumerate(opt.param_groups):
        for name in g["tune"]:
            if g.get("hyper_group") is not None:
                by_label.setdefault((g["hyper_group"], name), []).append((k, name))
    return [pairs for pairs in by_label.values() if len(pairs) > 1]


# ---------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("influence", ["exact", "blockwise"])
def test_global_share_over_layer_groups_matches_autograd(influence):
    """One hyper group over every layer's param group: one lr, wd, momentum; blockwise is exact here too."""
    train, val = _data()
    model = mlp()
    tune = ("lr", "weight_decay", "momentum")
    opt = ohotorch.OHO(ohotorch.share(ohotorch.layerwise(model)), lr=0.1, momentum=0.9, weight_decay=1e-3,
                       tune=tune, hvp="central", meta_lr=0.0, discount=1.0, influence=influence)
    hypers = [{n: g[n] for n in tune} for g in opt.param_groups]
    expected = oracle_hypergradients(model, param_index_groups(model, opt.param_groups), hypers, train, val,
                                     use_buffer=True, tied=_tied(opt))
    run_oho(model, opt, train)
    got = opt.hypergradient(closures(opt, model, val))
    worst = _check(expected, got, opt, 1e-6)
    for name in tune:  # the members report the one value
        assert len({float(g[name]) for g in got}) == 1
    print(f"global share, {influence}: worst relative error {worst:.2e}")


def test_partly_shared_groups_match_autograd_exact():
    """Layers 0 and 2 share one set, layer 1 has its own: three tangents per name become two."""
    train, val = _data()
    model = mlp()
    groups = ohotorch.layerwise(model)
    groups[0].update(hyper_group="outer", lr=0.08, weight_decay=2e-3)
    groups[1].update(lr=0.05, weight_decay=1e-3)
    groups[2].update(hyper_group="outer", lr=0.08, weight_decay=2e-3)
    opt = ohotorch.OHO(groups, momentum=0.8, nesterov=True, tune=("lr", "weight_decay", "momentum"),
                       hvp="central", meta_lr=0.0, discount=1.0, influence="exact")
    hypers = [{n: g[n] for n in ("lr", "weight_decay", "momentum")} for g in opt.param_groups]
    expected = oracle_hypergradients(model, param_index_groups(model, opt.param_groups), hypers, train, val,
                                     nesterov=True, use_buffer=True, tied=_tied(opt))
    run_oho(model, opt, train)
    assert opt._oho["keys"] == [[0, "lr"], [0, "weight_decay"], [0, "momentum"],
                                [1, "lr"], [1, "weight_decay"], [1, "momentum"]]
    assert opt.state[groups[0]["params"][0]]["tangent_w"].shape[0] == 6
    got = opt.hypergradient(closures(opt, model, val))
    _check(expected, got, opt, 1e-6)
    # the shared value is not the sum of separate groups' values: layer 1 differs from the pair
    assert float(got[0]["lr"]) == float(got[2]["lr"]) != float(got[1]["lr"])


def _decay_split(model, decay=0.1):
    params = list(model.parameters())
    return [dict(params=[p for p in params if p.dim() >= 2], weight_decay=decay),
            dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]


def warmup_cosine(total, warmup=4):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    return factor


@pytest.mark.parametrize("influence", ["exact", "blockwise"])
def test_nanogpt_decay_split_matches_autograd(influence):
    """nanoGPT's AdamW param groups (decay / no decay), warmup + cosine: one tuned lr_scale over both,
    one weight decay tuned in the decay group only."""
    train, val = _data()
    model = mlp()
    reference = mlp()
    reference.load_state_dict(model.state_dict())
    opt = ohotorch.OHOAdamW(ohotorch.share(_decay_split(model)), lr=0.01, betas=(0.9, 0.95), fused=False,
                            tune=("lr_scale", "weight_decay"), hvp="central", meta_lr=0.0, discount=1.0,
                            influence=influence)
    assert [g["tune"] for g in opt.param_groups] == [("lr_scale", "weight_decay"), ("lr_scale",)]
    scheduler = LambdaLR(opt, warmup_cosine(T))
    scheduled = []
    for b in train:
        scheduled.append(opt.param_groups[0]["lr"])
        opt.step(closures(opt, model, b))
        scheduler.step()
    got = opt.hypergradient(closures(opt, model, val))
    hypers = [{"lr": g["lr"], "lr_scale": 1.0, "weight_decay": g["weight_decay"]} for g in opt.param_groups]
    expected = oracle_hypergradients(reference, param_index_groups(model, opt.param_groups), hypers, train, val,
                                     rule="adamw", betas=(0.9, 0.95), scheduled_lr=scheduled,
                                     tied=[[(0, "lr_scale"), (1, "lr_scale")]])
    worst = _check(expected, got, opt, 1e-6)
    print(f"nanoGPT decay split, {influence}: worst relative error {worst:.2e}")


class TwoTowers(torch.nn.Module):
    """Two MLPs whose losses add: a block-diagonal Hessian, where blockwise influence is exact."""

    def __init__(self):
        super().__init__()
        self.a, self.b = mlp(seed=0), mlp(seed=1)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 0)


def test_blockwise_reads_each_hyper_group_block_exactly_when_they_do_not_interact():
    """A decay split in each of two towers, one hyper group per tower: the weight decay of a tower also
    moves that tower's biases (through the Hessian), which its block includes."""
    train, val = _data()
    train = [(x, torch.cat([y, y])) for x, y in train]
    val = (val[0], torch.cat([val[1], val[1]]))
    model = TwoTowers()
    groups = []
    for label, tower, lr in (("a", model.a, 0.1), ("b", model.b, 0.05)):
        for g in _decay_split(tower, 1e-3):
            groups.append(dict(g, lr=lr, hyper_group=label))
    opt = ohotorch.OHO(groups, momentum=0.9, tune=("lr", "weight_decay"), hvp="central", meta_lr=0.0,
                       influence="blockwise", discount=1.0)
    assert [g["tune"] for g in opt.param_groups] == [("lr", "weight_decay"), ("lr",)] * 2
    hypers = [{n: g[n] for n in ("lr", "weight_decay", "momentum")} for g in opt.param_groups]
    expected = oracle_hypergradients(model, param_index_groups(model, opt.param_groups), hypers, train, val,
                                     use_buffer=True, tied=_tied(opt))
    run_oho(model, opt, train)
    _check(expected, opt.hypergradient(closures(opt, model, val)), opt, 1e-6)


# ---------------------------------------------------------------------------- one set, one state
@pytest.mark.parametrize("discount", [0.0, 1.0])
def test_global_share_trains_like_one_param_group(discount):
    """Tuning one shared set over three param groups is tuning one param group: same trajectory."""
    xt, yt, xv, yv = digits()
    train, val = batches(xt, yt, 32, 8, seed=1), batches(xv, yv, 64, 8, seed=2)
    runs = []
    for make in (lambda m: m.parameters(), lambda m: ohotorch.share(ohotorch.layerwise(m))):
        model = mlp()
        opt = ohotorch.OHO(make(model), lr=0.1, momentum=0.9, weight_decay=1e-3, discount=discount, meta_lr=0.05,
                           tune=("lr", "weight_decay", "momentum"))
        for b, v in zip(train, val):
            opt.step(closures(opt, model, b))
            opt.hyper_step(closures(opt, model, v))
        runs.append((model, opt))
    (one, one_opt), (shared, shared_opt) = runs
    for name in ("lr", "weight_decay", "momentum"):
        values = {g[name] for g in shared_opt.param_groups}
        assert len(values) == 1
        assert values.pop() == pytest.approx(one_opt.param_groups[0][name], rel=1e-9)
    for a, b in zip(one.parameters(), shared.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    assert sorted(shared_opt._oho["meta_state"]) == ["0/lr", "0/momentum", "0/weight_decay"]
    assert set(shared_opt.diagnostics["hypergradient"]) == {"global/lr", "global/weight_decay", "global/momentum"}


def test_shared_state_dict_round_trip(tmp_path):
    xt, yt, xv, yv = digits()
    train, val = batches(xt, yt, 32, 6, seed=1), batches(xv, yv, 64, 6, seed=2)

    def make(model):
        return ohotorch.OHO(ohotorch.share(_decay_split(model, 1e-3)), lr=0.1, momentum=0.9, discount=0.9)

    model = mlp()
    opt = make(model)
    for b, v in zip(train[:3], val[:3]):
        opt.step(closures(opt, model, b))
        opt.hyper_step(closures(opt, model, v))
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")  # weights_only: the param groups hold plain values
    model2 = mlp(seed=5)
    model2.load_state_dict(saved["model"])
    opt2 = make(model2)
    opt2.load_state_dict(saved["opt"])
    for m, o in ((model, opt), (model2, opt2)):
        for b, v in zip(train[3:], val[3:]):
            o.step(closures(o, m, b))
            o.hyper_step(closures(o, m, v))
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"] == opt2.param_groups[1]["lr"]


# ---------------------------------------------------------------------------- pure helpers
def test_leaders_members_and_names():
    groups = [dict(tune=("lr", "weight_decay"), hyper_group="a"), dict(tune=("lr",), name="head"),
              dict(tune=("lr",), hyper_group="a"), dict(tune=("weight_decay",), hyper_group="a")]
    assert hyper_groups.leaders(groups) == [{"lr": 0, "weight_decay": 0}, {"lr": 1}, {"lr": 0},
                                            {"weight_decay": 0}]
    assert hyper_groups.members(groups) == {(0, "lr"): [0, 2], (0, "weight_decay"): [0, 3], (1, "lr"): [1]}
    assert hyper_groups.variable_name(groups, 0, "lr") == "a/lr"
    assert hyper_groups.variable_name(groups, 1, "lr") == "head/lr"
    # a label equal to another group's index is still a label, not that group
    assert hyper_groups.leaders([dict(tune=("lr",)), dict(tune=("lr",), hyper_group=0)]) == [{"lr": 0}, {"lr": 1}]


def test_read_out_sums_hyper_group_blocks_and_exact_totals():
    groups = [dict(tune=("lr", "weight_decay"), hyper_group="a"), dict(tune=("lr",)),
              dict(tune=("lr",), hyper_group="a")]
    per_group = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, 20.0]), torch.tensor([4.0, 40.0])]
    blockwise = hyper_groups.read_out(groups, [(None, "lr"), (None, "weight_decay")], per_group)
    # group 2 does not tune weight decay but is in its block: the decay's influence on it counts
    assert [{n: float(h) for n, h in g.items()} for g in blockwise] == [
        {"lr": 5.0, "weight_decay": 50.0}, {"lr": 2.0}, {"lr": 5.0}]
    per_group = [torch.tensor([1.0, 10.0, 100.0]), torch.tensor([2.0, 20.0, 200.0]),
                 torch.tensor([4.0, 40.0, 400.0])]
    exact = hyper_groups.read_out(groups, [(0, "lr"), (0, "weight_decay"), (1, "lr")], per_group)
    assert [{n: float(h) for n, h in g.items()} for g in exact] == [
        {"lr": 7.0, "weight_decay": 70.0}, {"lr": 700.0}, {"lr": 7.0}]


def test_split_decay_presets():
    model = mlp()
    weights = [p for p in model.parameters() if p.dim() == 2]
    biases = [p for p in model.parameters() if p.dim() == 1]
    groups = ohotorch.split_decay([dict(params=model.parameters(), weight_decay=0.1)])
    assert [(g["hyper_group"], g["weight_decay"]) for g in groups] == [("0", 0.1), ("0", 0.0)]
    assert groups[0]["params"] == weights and groups[1]["params"] == biases
    opt = ohotorch.OHOAdamW(groups, tune=("lr_scale", "weight_decay"))
    assert _tunes(opt) == [("lr_scale", "weight_decay"), ("lr_scale",)]
    layers = ohotorch.split_decay(ohotorch.layerwise(model, weight_decay=0.1, tune=("lr", "weight_decay")))
    assert [(g["hyper_group"], g["weight_decay"], g["tune"]) for g in layers] == [
        (name, wd, tune) for name in ("0", "2", "4")
        for wd, tune in ((0.1, ("lr", "weight_decay")), (0.0, ("lr",)))]
    opt = ohotorch.OHO(layers, lr=0.1, discount=1.0)
    xt, yt, _, _ = digits()
    opt.step(closures(opt, model, (xt[:16], yt[:16])))
    assert len(opt._oho["keys"]) == 6  # 3 layers x (lr, weight decay): the biases add none
    only_biases = ohotorch.split_decay([dict(params=biases, name="b")])
    assert len(only_biases) == 1 and only_biases[0]["hyper_group"] == "b"
    with pytest.raises(TypeError, match="split_decay: expected param groups"):
        ohotorch.split_decay(model.parameters())


def test_members_must_start_equal():
    model = mlp()
    groups = ohotorch.share(ohotorch.layerwise(model))
    groups[1]["lr"] = 0.2
    with pytest.raises(ValueError, match=r"param groups 0 and 1 share hyper_group 'global' and both tune 'lr'"):
        ohotorch.OHO(groups, lr=0.1)
    # different values of a name only one of them tunes are fine (the decay split)
    ohotorch.OHO(ohotorch.share(_decay_split(model)), lr=0.1)
    opt = ohotorch.OHO([dict(params=list(model[0].parameters()), hyper_group="x")], lr=0.1)
    with pytest.raises(ValueError, match="share hyper_group 'x'"):
        opt.add_param_group(dict(params=list(model[2].parameters()), hyper_group="x", lr=0.3))


@pytest.mark.parametrize("label", [["a"], 1.5, True, torch.tensor(1)])
def test_bad_labels_are_refused(label):
    with pytest.raises(TypeError, match="hyper_group must be a label"):
        ohotorch.OHO([dict(params=mlp().parameters(), hyper_group=label)], lr=0.1)


def test_share_copies_and_refuses_non_groups():
    groups = [dict(params=[torch.nn.Parameter(torch.zeros(2))], lr=0.1)]
    shared = ohotorch.share(groups, "body")
    assert shared == [dict(groups[0], hyper_group="body")] and "hyper_group" not in groups[0]
    with pytest.raises(TypeError, match="share: expected param groups"):
        ohotorch.share(mlp().parameters())
    with pytest.raises(ValueError, match="no param groups"):
        ohotorch.share([])


def test_meta_update_writes_every_member_and_one_state():
    xt, yt, xv, yv = digits()
    model = mlp()
    groups = ohotorch.layerwise(model)
    for g in groups[::2]:
        g["hyper_group"] = "ends"
    opt = ohotorch.OHO(groups, lr=0.1, weight_decay=1e-3, meta_lr=0.1)
    opt.step(closures(opt, model, (xt[:32], yt[:32])))
    opt.hyper_step(closures(opt, model, (xv[:64], yv[:64])))
    assert opt.param_groups[0]["lr"] == opt.param_groups[2]["lr"] != 0.1
    assert opt.param_groups[1]["lr"] not in (0.1, opt.param_groups[0]["lr"])
    assert sorted(opt._oho["meta_state"]) == ["0/lr", "0/weight_decay", "1/lr", "1/weight_decay"]
    assert set(opt.diagnostics["hypergradient"]) == {"ends/lr", "ends/weight_decay", "2/lr", "2/weight_decay"}


# ---------------------------------------------------------------------------- weight decay from 0
def _tunes(opt):
    return [g["tune"] for g in opt.param_groups]


def test_weight_decay_from_zero_only_when_asked():
    a, b = (list(torch.nn.Linear(3, 2).parameters()) for _ in range(2))
    assert _tunes(ohotorch.OHO(a, lr=0.1)) == [("lr",)]  # default tune, weight decay 0
    assert _tunes(ohotorch.OHO(a, lr=0.1, weight_decay=1e-4)) == [("lr", "weight_decay")]
    assert _tunes(ohotorch.OHO(a, lr=0.1, tune=("lr", "weight_decay"))) == [("lr", "weight_decay")]
    assert _tunes(ohotorch.OHOAdam(a)) == [("lr",)]
    assert _tunes(ohotorch.OHOAdamW(a)) == [("lr", "weight_decay")]
    def split():  # fresh dicts: torch.optim fills the defaults into the dicts it is given
        return [dict(params=a), dict(params=b, weight_decay=0.0)]

    # a group that sets its own weight_decay=0 keeps it, even when the constructor names weight_decay
    assert _tunes(ohotorch.OHO(split(), lr=0.1, weight_decay=0.1)) == [("lr", "weight_decay"), ("lr",)]
    assert _tunes(ohotorch.OHO(split(), lr=0.1, weight_decay=0.1, tune=("lr", "weight_decay"))) == [
        ("lr", "weight_decay"), ("lr",)]
    # ... unless its own tune asks
    asked = [dict(params=a), dict(params=b, weight_decay=0.0, tune=("weight_decay", "lr"))]
    assert _tunes(ohotorch.OHO(asked, lr=0.1, weight_decay=0.1)) == [("lr", "weight_decay")] * 2
    opt = ohotorch.OHO(a, lr=0.1, weight_decay=0.1)
    opt.add_param_group(dict(params=b, weight_decay=0.0))
    assert _tunes(opt) == [("lr", "weight_decay"), ("lr",)]


def test_default_tune_is_told_apart_from_the_same_names():
    for copied in (copy.deepcopy(hyper_groups.DEFAULT_TUNE), pickle.loads(pickle.dumps(hyper_groups.DEFAULT_TUNE))):
        assert isinstance(copied, hyper_groups.DefaultTune) and copied == ("lr", "weight_decay")
    assert not isinstance(("lr", "weight_decay"), hyper_groups.DefaultTune)
    opt = ohotorch.OHO(torch.nn.Linear(3, 2).parameters(), lr=0.1, weight_decay=0.1)
    assert type(opt.param_groups[0]["tune"]) is tuple  # what state_dict saves: a plain tuple
    opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], weight_decay=0.0))
    opt.add_param_group(dict(params=[torch.nn.Parameter(torch.zeros(2))], lr=0.2))
    assert _tunes(opt) == [("lr", "weight_decay"), ("lr",), ("lr", "weight_decay")]


def test_untuned_zero_weight_decay_costs_no_tangent():
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.1, discount=1.0)
    xt, yt, _, _ = digits()
    opt.step(closures(opt, model, (xt[:16], yt[:16])))
    assert opt._oho["keys"] == [[0, "lr"]]
    assert opt.state[next(model.parameters())]["tangent_w"].shape[0] == 1


# ---------------------------------------------------------------------------- the effective lr
def test_effective_lr_is_shown_and_is_what_the_step_uses():
    xt, yt, xv, yv = digits()
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.2, tune=("lr_scale",), meta_lr=0.1)
    assert opt.param_groups[0]["effective_lr"] == 0.2
    scheduler = LambdaLR(opt, lambda step: 0.5 ** step)
    for step in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        lr, scale = opt.param_groups[0]["lr"], opt.param_groups[0]["lr_scale"]
        opt.step(closures(opt, model, (xt[:32], yt[:32])))
        group = opt.param_groups[0]
        assert group["effective_lr"] == lr * scale == opt.diagnostics["effective_lr"]["0"]
        for w0, p in zip(before, model.parameters()):  # plain SGD: w1 = w0 - effective_lr * g
            torch.testing.assert_close(p.detach(), w0 - group["effective_lr"] * p.grad, rtol=0, atol=1e-15)
        opt.hyper_step(closures(opt, model, (xv[:64], yv[:64])))
        assert group["lr_scale"] != scale
        assert group["effective_lr"] == lr * group["lr_scale"] == opt.diagnostics["effective_lr"]["0"]
        scheduler.step()
    assert opt.state_dict()["param_groups"][0]["effective_lr"] == opt.param_groups[0]["effective_lr"]


def test_effective_lr_refreshed_by_load_state_dict_of_older_checkpoints():
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.2, tune=("lr_scale",))
    old = opt.state_dict()
    old["param_groups"][0]["lr_scale"] = 0.5
    del old["param_groups"][0]["effective_lr"]
    other = ohotorch.OHO(mlp().parameters(), lr=0.2, tune=("lr_scale",))
    other.load_state_dict(old)
    assert other.param_groups[0]["effective_lr"] == 0.1


def test_effective_lr_names_groups_in_diagnostics():
    model = mlp()
    opt = ohotorch.OHO(ohotorch.layerwise(model), lr=0.1, tune=())
    xt, yt, _, _ = digits()
    opt.step(closures(opt, model, (xt[:16], yt[:16])))
    assert opt.diagnostics["effective_lr"] == {"0": 0.1, "2": 0.1, "4": 0.1}
