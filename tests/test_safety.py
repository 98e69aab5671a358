"""Nothing the user had is silently changed: weights, BatchNorm buffers, dropout RNG, .grad."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ohotorch
from helpers import batches, closures as _closure, digits, oracle_hypergradients, param_index_groups, relative_error


def bn_dropout_net(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(32, 10)).to(dtype)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_batchnorm_dropout_step_equals_torch_sgd(momentum):
    """meta_lr = 0: same weights, buffers, .grad and RNG stream as torch.optim.SGD, hyper-steps included."""
    xt, yt, xv, yv = digits(torch.float32)
    train = batches(xt, yt, 32, 8)
    val = batches(xv, yv, 64, 8, seed=5)
    runs = []
    for use_oho in (False, True):
        model = bn_dropout_net()
        if use_oho:
            opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3,
                               meta_lr=0.0, module=model, discount=1.0)
        else:
            opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3)
        torch.manual_seed(42)
        for b, vb in zip(train, val):
            opt.step(_closure(opt, model, b))
            if use_oho:
                opt.hyper_step(_closure(opt, model, vb))
        runs.append((model, torch.get_rng_state()))
    (ref, ref_rng), (got, got_rng) = runs
    for a, b in zip(ref.parameters(), got.parameters()):
        assert torch.equal(a, b)
        assert torch.equal(a.grad, b.grad)  # the training gradient at the pre-step weights
    for a, b in zip(ref.buffers(), got.buffers()):
        assert torch.equal(a, b)
    assert torch.equal(ref_rng, got_rng)


@pytest.mark.filterwarnings("ignore:OHO. the closure updates module buffers")
def test_without_module_buffers_see_every_evaluation():
    """Documented behaviour: without module=, each extra closure evaluation updates BatchNorm again."""
    xt, yt, _, _ = digits(torch.float32)
    train = batches(xt, yt, 32, 3)
    tracked = []
    for module in (True, False):
        model = bn_dropout_net()
        opt = ohotorch.OHO(model.parameters(), lr=0.1, meta_lr=0.0, discount=1.0,
                           module=model if module else None)
        for b in train:
            opt.step(_closure(opt, model, b))
        tracked.append(int(model[1].num_batches_tracked))
    assert tracked[0] == 3 and tracked[1] > 3


def test_hypergradient_leaves_grads_buffers_and_rng_untouched():
    xt, yt, xv, yv = digits(torch.float32)
    model = bn_dropout_net()
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, module=model, discount=1.0)
    for b in batches(xt, yt, 32, 3):
        opt.step(_closure(opt, model, b))
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    weights = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    opt.hypergradient(_closure(opt, model, (xv[:64], yv[:64])))
    assert torch.equal(rng, torch.get_rng_state())
    for a, p in zip(grads, model.parameters()):
        assert torch.equal(a, p.grad)
    for a, p in zip(weights, model.parameters()):
        assert torch.equal(a, p)
    for a, b in zip(buffers, model.buffers()):
        assert torch.equal(a, b)


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Dropout(0.25), nn.Linear(16, 10)).double()

    def forward(self, x):
        return self.net(x)


def test_fd_hvps_with_dropout_equal_the_fixed_mask_hessian():
    """Every FD evaluation replays the training step's dropout mask: the hypergradient through T steps
    with dropout matches autograd through the same steps with those masks (float64, central)."""
    xt, yt, xv, yv = digits()
    train = batches(xt, yt, 32, 10)
    val = (xv[:200], yv[:200])
    model = DropoutMLP()
    opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3, hvp="central", meta_lr=0.0,
                       discount=1.0)
    hypers = [{n: opt.param_groups[0][n] for n in ("lr", "weight_decay", "momentum")}]
    groups = param_index_groups(model, opt.param_groups)

    seeds = iter(range(100, 200))
    expected_seeds = list(range(100, 100 + len(train) + 1))
    original = torch.func.functional_call

    def seeded_call(*args, **kwargs):  # the oracle draws each step's mask from that step's seed
        torch.manual_seed(next(seeds))
        return original(*args, **kwargs)

    torch.func.functional_call = seeded_call
    try:
        expected = oracle_hypergradients(model, groups, hypers, train, val, use_buffer=True)
    finally:
        torch.func.functional_call = original
    for seed, b in zip(expected_seeds, train):
        torch.manual_seed(seed)
        opt.step(_closure(opt, model, b))
    torch.manual_seed(expected_seeds[-1])
    got = opt.hypergradient(_closure(opt, model, val))
    for name in ("lr", "weight_decay"):
        assert relative_error(float(got[0][name]), expected[0][name]) < 1e-6


def test_params_without_grad_are_skipped():
    xt, yt, _, _ = digits(torch.float32)
    model = nn.Sequential(nn.Linear(64, 10), nn.Linear(3, 3))  # the second layer is never used
    unused = [p.detach().clone() for p in model[1].parameters()]
    opt = ohotorch.OHO(model.parameters(), lr=0.1)
    for x, y in batches(xt, yt, 32, 3):
        opt.step(_closure(opt, model[0], (x, y)))
    for a, p in zip(unused, model[1].parameters()):
        assert torch.equal(a, p) and p.grad is None and p not in opt.state


def test_nonfinite_hypergradient_changes_nothing():
    xt, yt, xv, yv = digits(torch.float32)
    model = nn.Sequential(nn.Linear(64, 10))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, weight_decay=1e-3)
    for b in batches(xt, yt, 32, 3):
        opt.step(_closure(opt, model, b))
    before = [dict(g) for g in opt.param_groups]
    tangents = [s["tangent_w"].clone() for s in opt.state.values()]

    def nan_closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(xv[:8]), yv[:8]) * float("nan")
        loss.backward()
        return loss

    with pytest.warns(UserWarning, match="non-finite"):
        opt.hyper_step(nan_closure)
    assert opt.counters["nonfinite_hypergradients"] == 1
    for b, g in zip(before, opt.param_groups):
        assert b["lr"] == g["lr"] and b["weight_decay"] == g["weight_decay"]
    for t, s in zip(tangents, opt.state.values()):
        assert torch.equal(t, s["tangent_w"])


def test_huge_hypergradient_keeps_hyperparameters_finite_and_in_bounds():
    xt, yt, xv, yv = digits(torch.float32)
    model = nn.Sequential(nn.Linear(64, 10))
    opt = ohotorch.OHO(model.parameters(), lr=0.1, meta_optimizer="sgd", space="raw", meta_lr=1e6,
                       bounds={"lr": (1e-4, 1.0)})
    for b, vb in zip(batches(xt, yt, 32, 5), batches(xv, yv, 32, 5)):
        opt.step(_closure(opt, model, b))
        opt.hyper_step(_closure(opt, model, vb))
        lr = opt.param_groups[0]["lr"]
        assert 1e-4 <= lr <= 1.0
        assert 0.0 <= opt.param_groups[0]["weight_decay"] < float("inf")


class _Injected(Exception):
    pass


@pytest.mark.parametrize("cls", [ohotorch.OHO, ohotorch.OHOAdam], ids=["OHO", "OHOAdam"])
@pytest.mark.parametrize("hvp", ["forward", "central"])
@pytest.mark.parametrize("error", [_Injected, KeyboardInterrupt])
def test_exception_in_an_hvp_evaluation_restores_the_users_tensors(cls, hvp, error):
    """The closure raises on its 2nd call of a step (the first HVP evaluation): the weights, .grad (the
    same tensors, with the values from before the call, not the training evaluation's), module buffers,
    RNG and the optimizer's state (rule state, tangents, counters) are bit-identical to what they were
    before step() was called (the strong guarantee)."""
    xt, yt, _, _ = digits(torch.float32)
    train = batches(xt, yt, 32, 3)
    model = bn_dropout_net()
    opt = cls(model.parameters(), lr=0.05, weight_decay=1e-3, discount=1.0, hvp=hvp, module=model, meta_lr=0.0)
    for b in train[:2]:
        opt.step(_closure(opt, model, b))
    calls = []
    inner = _closure(opt, model, train[2])

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise error("injected")
        return inner()

    weights = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    grad_values = [g.clone() for g in grads]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()} for p, s in opt.state.items()}
    steps = opt.counters["steps"]
    with pytest.raises(error):
        opt.step(closure)
    assert len(calls) == 2
    for p, w in zip(model.parameters(), weights):
        assert torch.equal(p, w)
    for p, g, v in zip(model.parameters(), grads, grad_values):
        assert p.grad is g and torch.equal(p.grad, v)
    for b, v in zip(model.buffers(), buffers):
        assert torch.equal(b, v)
    assert torch.equal(torch.get_rng_state(), rng)
    for p, saved in state.items():
        assert set(opt.state[p]) == set(saved)
        for k, v in saved.items():
            assert torch.equal(opt.state[p][k], v) if torch.is_tensor(v) else opt.state[p][k] == v, k
    assert opt.counters["steps"] == steps
