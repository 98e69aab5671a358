"""Loss hyperparameters (ohotorch.loss_hyperparameters): exactness against autograd through the unrolled
updates in float64 (with lr and momentum, greedy and full horizons), state_dict, exception safety, errors."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import ohotorch
from helpers import batches, digits, mlp, relative_error

T = 12


def _data(seed=0):
    xt, yt, xv, yv = digits()
    return batches(xt, yt, 32, T, seed=seed + 1), (xv[:300], yv[:300])


def aux_target(x):
    """The auxiliary task: predict the mean ink of the image (a transformed target)."""
    return x.mean(1) * 4.0


def objective(out, x, y, rho, l2, weights):
    """J = CE(digit) + rho * MSE(aux) + sum_l l2[l] ||W_l||^2 (rho or l2 may be None)."""
    loss = F.cross_entropy(out[:, :10], y)
    if rho is not None:
        loss = loss + rho * (out[:, 10] - aux_target(x)).pow(2).mean()
    if l2 is not None:
        loss = loss + sum(l2[i] * w.pow(2).sum() for i, w in enumerate(weights))
    return loss


def weight_matrices(params):
    return [p for p in params if p.dim() == 2]


def oracle(model, train, val, *, lr, momentum, nesterov=False, rho=None, l2=None, greedy=False):
    """d L_val(w_T) / d(lr, momentum, rho, l2) by autograd through T unrolled torch.optim.SGD steps.

    ``greedy``: the graph through the last step only (w and the momentum buffer detached before it), which
    is what the greedy horizon (tangents zero before every update) differentiates."""
    names = [n for n, _ in model.named_parameters()]
    theta = {"lr": torch.tensor(lr, dtype=torch.float64, requires_grad=True),
             "momentum": torch.tensor(momentum, dtype=torch.float64, requires_grad=True)}
    if rho is not None:
        theta["rho"] = torch.tensor(rho, dtype=torch.float64, requires_grad=True)
    if l2 is not None:
        theta["l2"] = torch.tensor(l2, dtype=torch.float64, requires_grad=True)
    w = [p.detach().clone().requires_grad_(True) for p in model.parameters()]
    bufs = [None] * len(w)
    use_buffer = momentum != 0.0

    def forward(w, x):
        return torch.func.functional_call(model, dict(zip(names, w)), (x,))

    for step, (x, y) in enumerate(train):
        if greedy and step == len(train) - 1:
            w = [t.detach().requires_grad_(True) for t in w]
            bufs = [None if b is None else b.detach() for b in bufs]
        loss = objective(forward(w, x), x, y, theta.get("rho"), theta.get("l2"), weight_matrices(w))
        grads = torch.autograd.grad(loss, w, create_graph=True)
        new_w = []
        for i, (wi, gi) in enumerate(zip(w, grads)):
            if use_buffer:
                b = gi if bufs[i] is None else theta["momentum"] * bufs[i] + gi
                bufs[i] = b
                u = gi + theta["momentum"] * b if nesterov else b
            else:
                u = gi
            new_w.append(wi - theta["lr"] * u)
        w = new_w
    xv, yv = val
    val_loss = F.cross_entropy(forward(w, xv)[:, :10], yv)
    grads = torch.autograd.grad(val_loss, list(theta.values()), allow_unused=True, materialize_grads=True)
    return dict(zip(theta, grads))


def run(model, opt, train, val, *, rho=None, l2=None):
    for x, y in train:
        def closure():
            opt.zero_grad()
            loss = objective(model(x), x, y, None if rho is None else rho.value, None if l2 is None else l2.value,
                             weight_matrices(model.parameters()))
            loss.backward()
            return loss
        opt.step(closure)
    xv, yv = val

    def val_closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(xv)[:, :10], yv)
        loss.backward()
        return loss
    return opt.hypergradient(val_closure)


HORIZONS = {"full": 1.0, "greedy": 0.0}
CASES = {
    "aux_momentum": dict(momentum=0.9, rho=0.5),
    "aux_sgd": dict(momentum=0.0, rho=0.5),
    "aux_nesterov": dict(momentum=0.8, nesterov=True, rho=0.5),
    "per_layer_l2": dict(momentum=0.9, l2=[1e-3, 3e-3]),
    "aux_and_l2": dict(momentum=0.9, rho=0.5, l2=[1e-3, 3e-3]),
}


@pytest.mark.parametrize("horizon", sorted(HORIZONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_autograd_through_unrolled_updates(case, horizon):
    options = CASES[case]
    train, val = _data()
    model = mlp((64, 16, 11))
    tune = ("lr", "momentum") if options["momentum"] != 0.0 else ("lr",)
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=options["momentum"], nesterov=options.get("nesterov", False),
                       tune=tune, hvp="central", meta_lr=0.0, discount=HORIZONS[horizon])
    rho = opt.hyperparameter("aux_weight", options["rho"]) if "rho" in options else None
    l2 = opt.hyperparameter("l2", torch.tensor(options["l2"], dtype=torch.float64)) if "l2" in options else None
    expected = oracle(copy.deepcopy(model), train, val, lr=0.1, momentum=options["momentum"],
                      nesterov=options.get("nesterov", False), rho=options.get("rho"), l2=options.get("l2"),
                      greedy=horizon == "greedy")
    got = run(model, opt, train, val, rho=rho, l2=l2)[0]
    pairs = [(float(got[name]), float(expected[name])) for name in tune]
    if rho is not None:
        pairs.append((float(rho.grad), float(expected["rho"])))
    if l2 is not None:
        pairs += list(zip(l2.grad.tolist(), expected["l2"].tolist()))
    for value, reference in pairs:
        assert reference != 0.0
        assert relative_error(value, reference) <= 1e-6, (value, reference)


def test_forward_differences_are_close():
    train, val = _data()
    model = mlp((64, 16, 11))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, tune=("lr", "momentum"), meta_lr=0.0, discount=1.0)
    rho = opt.hyperparameter("aux_weight", 0.5)
    expected = oracle(copy.deepcopy(model), train, val, lr=0.1, momentum=0.9, rho=0.5)
    run(model, opt, train, val, rho=rho)
    assert relative_error(float(rho.grad), float(expected["rho"])) <= 1e-4


def test_adam_direct_term_from_zero_matches_one_step_autograd():
    """OHOAdam: the greedy rho tangent after one step is -lr (dg/drho) / (|g| + eps) scaled by Adam's first step."""
    train, val = _data()
    model = mlp((64, 16, 11))
    opt = ohotorch.OHOAdam(model.parameters(), lr=1e-2, tune=(), hvp="central", meta_lr=0.0)
    rho = opt.hyperparameter("aux_weight", 0.5)
    names = [n for n, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    r = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    x, y = train[0]
    g = torch.autograd.grad(objective(torch.func.functional_call(model, dict(zip(names, [t.requires_grad_(True) for t in w0])), (x,)),
                                      x, y, r, None, None), w0, create_graph=True)
    # torch.optim.Adam's first step: m = (1-b1) g, v = (1-b2) g^2, w1 = w0 - lr m/(1-b1) / (sqrt(v/(1-b2)) + eps)
    w1 = [w - 1e-2 * gi / (gi.abs() + 1e-8) for w, gi in zip(w0, g)]
    xv, yv = val
    expected = torch.autograd.grad(F.cross_entropy(torch.func.functional_call(model, dict(zip(names, w1)), (xv,))[:, :10], yv), r)[0]
    run(model, opt, train[:1], val, rho=rho)
    assert relative_error(float(rho.grad), float(expected)) <= 1e-5


def test_tuning_moves_rho_and_state_dict_round_trip():
    train, val = _data()
    model = mlp((64, 16, 11))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, tune=("lr", "momentum"), discount=0.9)
    rho = opt.hyperparameter("aux_weight", 0.5, bounds=(0.0, 10.0))
    state = None
    for step, (x, y) in enumerate(train):
        def closure():
            opt.zero_grad()
            loss = objective(model(x), x, y, rho.value, None, None)
            loss.backward()
            return loss

        def val_closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(val[0])[:, :10], val[1])
            loss.backward()
            return loss
        opt.step(closure)
        opt.hyper_step(val_closure)
        if step == 5:
            state = copy.deepcopy((model.state_dict(), opt.state_dict()))
            twin_model = mlp((64, 16, 11), seed=3)
            twin_model.load_state_dict(state[0])
            twin = ohotorch.OHO(twin_model.parameters(), lr=0.1, momentum=0.9, tune=("lr", "momentum"), discount=0.9)
            twin_rho = twin.hyperparameter("aux_weight", 2.0, bounds=(0.0, 10.0))
            twin.load_state_dict(state[1])
            assert twin_rho.item() == rho.item()
            rest = train[step + 1:]
    assert rho.item() != 0.5
    assert "loss:aux_weight" in opt.diagnostics["hypergradient"]
    assert opt.state_dict()["oho"]["loss_hyperparameters"]["meta_state"]["loss:aux_weight"]["t"] == len(train)
    for x, y in rest:
        def closure():
            twin.zero_grad()
            loss = objective(twin_model(x), x, y, twin_rho.value, None, None)
            loss.backward()
            return loss

        def val_closure():
            twin.zero_grad()
            loss = F.cross_entropy(twin_model(val[0])[:, :10], val[1])
            loss.backward()
            return loss
        twin.step(closure)
        twin.hyper_step(val_closure)
    assert twin_rho.item() == rho.item()
    assert twin.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_old_checkpoint_loads_and_keeps_declared_value():
    model = mlp((64, 16, 11))
    plain = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = ohotorch.OHO(model.parameters(), lr=0.1)
    rho = opt.hyperparameter("aux_weight", 0.25)
    opt.load_state_dict(plain.state_dict())
    assert rho.item() == 0.25
    old = ohotorch.OHO(model.parameters(), lr=0.1).state_dict()
    opt.load_state_dict(old)
    assert rho.item() == 0.25


def test_checkpoint_with_other_loss_hyperparameters_is_refused_before_anything_changes():
    train, val = _data()
    model = mlp((64, 16, 11))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, tune=("lr",))
    rho = opt.hyperparameter("aux_weight", 0.5)
    run(model, opt, train[:2], val, rho=rho)
    saved = opt.state_dict()
    other = ohotorch.OHO(model.parameters(), lr=0.3, tune=("lr",))
    with pytest.raises(ValueError, match="not declared"):
        other.load_state_dict(saved)
    assert other.param_groups[0]["lr"] == 0.3
    fresh = ohotorch.OHO(model.parameters(), lr=0.3, tune=("lr",))
    fresh.hyperparameter("other", 0.5)
    with pytest.raises(ValueError, match="not declared"):
        fresh.load_state_dict(saved)


def test_step_is_strongly_exception_safe():
    train, val = _data()
    model = mlp((64, 16, 11))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, tune=("lr", "momentum"), discount=1.0)
    rho = opt.hyperparameter("aux_weight", 0.5)
    run(model, opt, train[:3], val, rho=rho)
    before = copy.deepcopy((model.state_dict(), opt.state_dict()))
    grads = [p.grad for p in model.parameters()]
    x, y = train[3]
    calls = []

    def failing():  # training, lr's HVP, momentum's HVP, then rho's (perturbed): fails in that one
        calls.append(float(rho.value))
        if len(calls) == 4:
            raise KeyboardInterrupt
        opt.zero_grad()
        loss = objective(model(x), x, y, rho.value, None, None)
        loss.backward()
        return loss
    with pytest.raises(KeyboardInterrupt):
        opt.step(failing)
    assert calls[:3] == [0.5, 0.5, 0.5] and calls[3] > 0.5  # only rho's evaluation read rho + eps
    after = opt.state_dict()
    for a, b in zip(before[0].values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert after["oho"] == before[1]["oho"]
    for key in before[1]["state"]:
        for name, value in before[1]["state"][key].items():
            assert torch.equal(value, after["state"][key][name])
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert rho.item() == 0.5 and rho._shift is None and rho._phase is None


def test_reading_value_outside_a_closure_or_in_val_closure_is_refused():
    train, val = _data()
    model = mlp((64, 16, 11))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, tune=("lr",))
    rho = opt.hyperparameter("aux_weight", 0.5)
    with pytest.raises(RuntimeError, match="outside the training closure"):
        rho.value
    assert rho.item() == 0.5 and float(rho.current) == 0.5
    run(model, opt, train[:1], val, rho=rho)

    def val_closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(val[0])[:, :10], val[1]) + rho.value * 0.0
        loss.backward()
        return loss
    with pytest.raises(RuntimeError, match="inside val_closure"):
        opt.hyper_step(val_closure)
    assert rho.item() == 0.5


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(name="lr", value=0.1), ValueError, "optimizer hyperparameter"),
    (dict(name="", value=0.1), ValueError, "Invalid loss hyperparameter name"),
    (dict(name="a b", value=0.1), ValueError, "Invalid loss hyperparameter name"),
    (dict(name="rho", value=-1.0), ValueError, "outside its bounds"),
    (dict(name="rho", value=20.0, bounds=(0.0, 10.0)), ValueError, "outside its bounds"),
    (dict(name="rho", value=0.1, bounds=(1.0, 0.0)), ValueError, "invalid bounds"),
    (dict(name="rho", value=0.1, bounds=(-1.0, 1.0)), ValueError, "log-space"),
    (dict(name="rho", value=0.1, bounds=3), TypeError, "pair"),
    (dict(name="rho", value=math.nan), ValueError, "non-finite"),
    (dict(name="rho", value="0.1"), TypeError, "number or a tensor"),
    (dict(name="rho", value=True), TypeError, "bool"),
    (dict(name="rho", value=torch.zeros(0)), ValueError, "empty"),
    (dict(name="rho", value=torch.ones(2, requires_grad=True)), ValueError, "require grad"),
    (dict(name="rho", value=0.1, meta_lr=-1.0), ValueError, "meta_lr"),
])
def test_declaration_errors(kwargs, error, match):
    opt = ohotorch.OHO(mlp().parameters(), lr=0.1)
    with pytest.raises(error, match=match):
        opt.hyperparameter(**kwargs)
    assert opt.loss_hyperparameters == {}


def test_duplicate_name_and_late_declaration_are_refused():
    train, val = _data()
    model = mlp((64, 16, 11))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, tune=("lr",))
    rho = opt.hyperparameter("aux_weight", 0.5)
    with pytest.raises(ValueError, match="already declared"):
        opt.hyperparameter("aux_weight", 0.1)
    run(model, opt, train[:1], val, rho=rho)
    with pytest.raises(ValueError, match="after the first step"):
        opt.hyperparameter("other", 0.1)


def test_raw_space_allows_negative_bounds_and_needs_meta_lr():
    opt = ohotorch.OHO(mlp().parameters(), lr=0.1, meta_optimizer="sgd", space="raw", meta_lr={"lr": 1e-3})
    with pytest.raises(ValueError, match="needs a meta_lr"):
        opt.hyperparameter("shift", 0.0, bounds=(-1.0, 1.0))
    item = opt.hyperparameter("shift", 0.0, bounds=(-1.0, 1.0), meta_lr=1e-3)
    assert item.meta_lr == 1e-3


def test_meta_lr_zero_on_the_optimizer_is_the_default_for_rho():
    opt = ohotorch.OHO(mlp().parameters(), lr=0.1, meta_lr=0.0)
    assert opt.hyperparameter("aux_weight", 0.5).meta_lr == 0.0
    assert ohotorch.OHO(mlp().parameters(), lr=0.1).hyperparameter("aux_weight", 0.5).meta_lr == 0.02


def test_without_loss_hyperparameters_nothing_changes():
    """No loss hyperparameter declared: the state_dict carries no new key."""
    train, val = _data()
    model = mlp((64, 16, 11))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, tune=("lr",))
    run(model, opt, train[:2], val)
    assert "loss_hyperparameters" not in opt.state_dict()["oho"]


def test_nonfinite_validation_loss_changes_nothing():
    train, val = _data()
    model = mlp((64, 16, 11))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, tune=("lr",))
    rho = opt.hyperparameter("aux_weight", 0.5)
    run(model, opt, train[:1], val, rho=rho)
    meta_before = copy.deepcopy(opt.state_dict()["oho"])

    def val_closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(val[0])[:, :10], val[1]) * math.nan
        loss.backward()
        return loss
    with pytest.warns(UserWarning, match="non-finite"):
        opt.hyper_step(val_closure)
    assert rho.item() == 0.5 and opt.param_groups[0]["lr"] == 0.1
    after = opt.state_dict()["oho"]
    assert after["loss_hyperparameters"] == meta_before["loss_hyperparameters"]
    assert after["nonfinite_hypergradients"] == 1


def test_deepcopy_continues_like_the_original():
    train, val = _data()
    model = mlp((64, 16, 11))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, tune=("lr", "momentum"), discount=1.0)
    rho = opt.hyperparameter("aux_weight", 0.5)
    run(model, opt, train[:2], val, rho=rho)
    model2, opt2 = copy.deepcopy((model, opt))
    rho2 = opt2.loss_hyperparameters["aux_weight"]
    assert rho2 is not rho and rho2.item() == rho.item()
    a = run(model, opt, train[2:4], val, rho=rho)
    b = run(model2, opt2, train[2:4], val, rho=rho2)
    assert float(rho.grad) == float(rho2.grad) and float(a[0]["lr"]) == float(b[0]["lr"])


@pytest.mark.parametrize("discount", [0.0, 1.0])
def test_training_is_bit_identical_to_torch_sgd_with_meta_lr_zero(discount):
    """The finite-difference evaluations (rho perturbed) leave no trace on the trajectory."""
    train, val = _data()
    model = mlp((64, 16, 11))
    twin = copy.deepcopy(model)
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, tune=("lr", "momentum"), meta_lr=0.0,
                       discount=discount)
    rho = opt.hyperparameter("aux_weight", 0.5)
    l2 = opt.hyperparameter("l2", torch.tensor([1e-3, 3e-3], dtype=torch.float64))
    run(model, opt, train[:4], val, rho=rho, l2=l2)
    sgd = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for x, y in train[:4]:
        sgd.zero_grad()
        objective(twin(x), x, y, torch.tensor(0.5, dtype=torch.float64), torch.tensor([1e-3, 3e-3], dtype=torch.float64),
                  weight_matrices(twin.parameters())).backward()
        sgd.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
