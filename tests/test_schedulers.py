"""OHO with a torch.optim.lr_scheduler: the scheduler owns group["lr"], OHO tunes the multiplier
group["lr_scale"], the step uses their product. Exactness, torch equivalence, and the refusal to let a
scheduler and a tuned lr overwrite each other."""
import math

import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LambdaLR

import ohotorch
from helpers import batches, closures, digits, mlp, oracle_hypergradients, relative_error

T = 15


def warmup_cosine(total: int, warmup: int = 4):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))
    return factor


OPTIMIZERS = {
    "sgd_momentum": (lambda p, **kw: ohotorch.OHO(p, lr=0.1, momentum=0.9, weight_decay=1e-3, **kw),
                     lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-3), "sgd"),
    "adam": (lambda p, **kw: ohotorch.OHOAdam(p, lr=0.01, weight_decay=1e-3, **kw),
             lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3), "adam"),
    "adamw": (lambda p, **kw: ohotorch.OHOAdamW(p, lr=0.01, weight_decay=1e-2, **kw),
              lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=1e-2), "adamw"),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_lr_scale_hypergradient_matches_autograd_under_a_schedule(name):
    """dL_val/d lr_scale through T steps whose lr follows warmup + cosine, float64, full horizon."""
    make_oho, _, rule = OPTIMIZERS[name]
    xt, yt, xv, yv = digits()
    train = batches(xt, yt, 32, T)
    val = (xv[:300], yv[:300])
    model = mlp()
    opt = make_oho(model.parameters(), tune=("lr_scale", "weight_decay"), meta_lr=0.0, discount=1.0,
                   hvp="central")
    scheduler = LambdaLR(opt, warmup_cosine(T))
    scheduled = []
    base = {"lr": opt.param_groups[0]["lr"], "lr_scale": 1.0, "weight_decay": opt.param_groups[0]["weight_decay"],
            "momentum": opt.param_groups[0].get("momentum", 0.0)}
    expected_model = mlp()
    expected_model.load_state_dict(model.state_dict())
    for b in train:
        scheduled.append(opt.param_groups[0]["lr"])
        opt.step(closures(opt, model, b))
        scheduler.step()
    got = opt.hypergradient(closures(opt, model, val))[0]
    expected = oracle_hypergradients(
        expected_model, [list(range(len(list(expected_model.parameters()))))], [base], train, val,
        use_buffer=rule == "sgd", rule=rule, scheduled_lr=scheduled)[0]
    assert set(got) == {"lr_scale", "weight_decay"}
    for key in got:
        assert relative_error(float(got[key]), expected[key]) < 1e-6, (key, float(got[key]), expected[key])


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_untuned_multiplier_reproduces_torch_with_the_same_scheduler(name):
    """meta_lr = 0: the weights and the scheduled lr follow torch.optim + the scheduler bit for bit."""
    make_oho, make_torch, _ = OPTIMIZERS[name]
    xt, yt, _, _ = digits(torch.float32)
    model, ref = mlp(dtype=torch.float32), mlp(dtype=torch.float32)
    opt = make_oho(model.parameters(), tune=("lr_scale",), meta_lr=0.0, discount=1.0)
    plain = make_torch(ref.parameters())
    schedules = [CosineAnnealingLR(opt, T_max=10), CosineAnnealingLR(plain, T_max=10)]
    for b in batches(xt, yt, 32, 12):
        opt.step(closures(opt, model, b))
        plain.step(closures(plain, ref, b))
        for s in schedules:
            s.step()
        assert opt.param_groups[0]["lr"] == plain.param_groups[0]["lr"]
    for a, b in zip(model.parameters(), ref.parameters()):
        assert torch.equal(a, b)


def test_scheduler_shapes_lr_while_oho_tunes_the_multiplier():
    xt, yt, xv, yv = digits(torch.float32)
    model = mlp(dtype=torch.float32)
    opt = ohotorch.OHO(model.parameters(), lr=0.02, momentum=0.9, tune=("lr_scale",))
    steps = 60
    scheduler = LambdaLR(opt, warmup_cosine(steps, warmup=10))
    factor = warmup_cosine(steps, warmup=10)
    val = batches(xv, yv, 64, steps, seed=5)
    for i, b in enumerate(batches(xt, yt, 32, steps)):
        opt.step(closures(opt, model, b))
        opt.hyper_step(closures(opt, model, val[i]))
        scheduler.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.02 * factor(i + 1), rel=1e-12)
    scale = opt.param_groups[0]["lr_scale"]
    assert scale != 1.0 and math.isfinite(scale) and scale > 0
    assert opt.counters["hyper_steps"] == steps


def test_tuning_lr_under_a_scheduler_is_refused():
    model = mlp(dtype=torch.float32)
    opt = ohotorch.OHO(model.parameters(), lr=0.1)  # tunes "lr" by default
    CosineAnnealingLR(opt, T_max=10)
    xt, yt, _, _ = digits(torch.float32)
    with pytest.raises(RuntimeError, match="lr_scale"):
        opt.step(closures(opt, model, batches(xt, yt, 32, 1)[0]))


def test_lr_and_lr_scale_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        ohotorch.OHO(mlp().parameters(), lr=0.1, tune=("lr", "lr_scale"))
    with pytest.raises(ValueError, match="lr_scale"):
        ohotorch.OHO([{"params": mlp().parameters(), "lr_scale": -1.0}], lr=0.1)


def test_outside_write_to_a_tuned_lr_warns():
    """ReduceLROnPlateau marks nothing; its writes are caught when they happen."""
    xt, yt, xv, yv = digits(torch.float32)
    model = mlp(dtype=torch.float32)
    opt = ohotorch.OHO(model.parameters(), lr=0.1)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    train, val = batches(xt, yt, 32, 3), batches(xv, yv, 64, 3)
    with pytest.warns(UserWarning, match="tune 'lr_scale'"):
        for i, b in enumerate(train):
            opt.step(closures(opt, model, b))
            opt.hyper_step(closures(opt, model, val[i]))
            plateau.step(1.0)  # a loss that never improves: halves lr every step
