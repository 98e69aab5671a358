"""ohotorch.finite_differences: the step size, the HVP against autograd, and closure isolation."""
import math

import pytest
import torch
from torch import nn

from ohotorch.finite_differences import (LOW_PRECISION_STEP, BufferSnapshot, ClosureIsolation, GradSnapshot,
                                         StepRollback, check_loss, fd_hvp, module_buffers, perturbation_scale,
                                         relative_step)


def test_relative_step_and_scale():
    assert relative_step(torch.float64, "forward") == math.sqrt(torch.finfo(torch.float64).eps)
    assert relative_step(torch.float32, "central") == pytest.approx(torch.finfo(torch.float32).eps ** (1 / 3))
    assert relative_step(torch.bfloat16, "forward") == LOW_PRECISION_STEP
    assert perturbation_scale(3.0, 2.0, 0.1) == pytest.approx(0.1 * 4.0 / 2.0)


def _setup(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.Tanh(), nn.Dropout(dropout), nn.Linear(7, 3)).double()
    x, y = torch.randn(11, 5, dtype=torch.float64), torch.randn(11, 3, dtype=torch.float64)
    params = list(model.parameters())

    def loss_fn():
        return ((model(x) - y) ** 2).mean()

    def closure():
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        return loss

    return model, params, loss_fn, closure


@pytest.mark.parametrize("scheme, tolerance", [("forward", 1e-6), ("central", 1e-9)])
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_fd_hvp_matches_autograd_in_float64(scheme, tolerance, foreach):
    model, params, loss_fn, closure = _setup()
    model.eval()  # a fixed function of the weights (BatchNorm uses its running statistics)
    with torch.enable_grad():
        closure()
        train_grads = [p.grad for p in params]
        vs = [torch.randn_like(p) for p in params]
        grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
        expected = torch.autograd.grad(grads, params, vs)
    weights_before = [p.detach().clone() for p in params]
    eps = perturbation_scale(float(torch.cat([p.detach().flatten() for p in params]).norm()),
                             float(torch.cat([v.flatten() for v in vs]).norm()), relative_step(torch.float64, scheme))
    with torch.no_grad(), ClosureIsolation(params, weights=params, foreach=foreach) as isolation:
        got = fd_hvp(isolation, closure, vs, train_grads, eps=eps, scheme=scheme)
    scale = max(float(e.abs().max()) for e in expected)
    for a, b in zip(got, expected):
        assert float((a - b).abs().max()) < tolerance * scale
    for p, w, g in zip(params, weights_before, train_grads):
        assert torch.equal(p, w) and p.grad is g


def _user_view(model):
    """Weights, grads (tensor identity and values), RNG and buffers as the user sees them."""
    return ([p.detach().clone() for p in model.parameters()], [p.grad for p in model.parameters()],
            [None if p.grad is None else p.grad.clone() for p in model.parameters()],
            torch.get_rng_state(), [b.clone() for b in model.buffers()])


def _assert_same_view(before, after):
    for a, b in zip(before[0], after[0]):
        assert torch.equal(a, b)
    assert all(a is b for a, b in zip(before[1], after[1]))
    for a, b in zip(before[2], after[2]):
        assert torch.equal(a, b)
    assert torch.equal(before[3], after[3])
    for a, b in zip(before[4], after[4]):
        assert torch.equal(a, b)


class Injected(Exception):
    pass


@pytest.mark.parametrize("error", [Injected, KeyboardInterrupt])
@pytest.mark.parametrize("call", [1, 2])
def test_isolation_restores_everything_on_an_exception(error, call):
    model, params, _, closure = _setup(dropout=0.3)
    model.train()
    with torch.enable_grad():
        closure()
    calls = []

    def failing():
        calls.append(1)
        loss = closure()
        if len(calls) == call:
            raise error("injected")
        return loss

    vs = [torch.randn_like(p) for p in params]
    before = _user_view(model)
    with pytest.raises(error):
        with torch.no_grad(), ClosureIsolation(params, weights=params,
                                               buffers=BufferSnapshot(model.buffers())) as isolation:
            fd_hvp(isolation, failing, vs, [p.grad for p in params], eps=1e-3, scheme="central")
    assert len(calls) == call
    _assert_same_view(before, _user_view(model))


def test_isolation_restores_after_a_validation_evaluation():
    model, params, _, closure = _setup(dropout=0.3)
    model.train()
    with torch.enable_grad():
        closure()
    before = _user_view(model)
    with torch.no_grad(), ClosureIsolation(params, buffers=BufferSnapshot(model.buffers())) as isolation:
        loss, grads = isolation.evaluate(closure, "val_closure")
    assert isinstance(loss, torch.Tensor) and all(g is not None for g in grads)
    assert all(g is not k for g, k in zip(grads, before[1]))
    _assert_same_view(before, _user_view(model))


def test_replay_gives_every_evaluation_the_same_dropout_and_buffers():
    from ohotorch.finite_differences import RNGSnapshot

    model, params, _, closure = _setup(dropout=0.5)
    model.train()
    rng, buffers = RNGSnapshot().capture(), BufferSnapshot(model.buffers())
    with torch.enable_grad():
        closure()
    first = [p.grad.clone() for p in params]
    with torch.no_grad(), ClosureIsolation(params, replay=(rng, buffers)) as isolation:
        _, again = isolation.evaluate(closure, "closure")
        _, third = isolation.evaluate(closure, "closure")
    for a, b, c in zip(first, again, third):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_gradient_written_into_a_kept_view_is_restored_and_copied_out():
    param = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    bucket = torch.arange(8, dtype=torch.float64)
    param.grad = bucket[:4]  # a view, as DDP's gradient_as_bucket_view makes
    kept_values = param.grad.clone()

    def closure():  # writes its gradient into the same bucket memory
        bucket[:4] = 7.0
        param.grad = bucket[:4]
        return torch.tensor(1.0)

    with torch.no_grad(), ClosureIsolation([param]) as isolation:
        _, (grad,) = isolation.evaluate(closure, "closure")
        assert torch.equal(grad, torch.full((4,), 7.0, dtype=torch.float64))
    assert torch.equal(param.grad, kept_values) and param.grad.data_ptr() == bucket.data_ptr()


def test_gradient_written_into_unforeseen_memory_is_refused():
    param = nn.Parameter(torch.zeros(4, dtype=torch.float64))
    param.grad = torch.ones(4, dtype=torch.float64)  # not a view: no backup kept
    grad = param.grad

    def closure():
        grad.fill_(3.0)
        param.grad = grad
        return torch.tensor(1.0)

    with pytest.raises(RuntimeError, match="not a view OHO could have foreseen"):
        with torch.no_grad(), ClosureIsolation([param]) as isolation:
            isolation.evaluate(closure, "closure")
    assert param.grad is grad


@pytest.mark.parametrize("loss, match", [(None, "returned no loss"), ("x", "must return the loss")])
def test_check_loss(loss, match):
    with pytest.raises(TypeError, match=match):
        check_loss(loss, "closure")
    check_loss(torch.tensor(1.0), "closure")
    check_loss(1.5, "closure")


def test_evaluations_start_from_the_given_gradients_and_differences_cancel_them():
    """``start``: every evaluation gets fresh copies of the starting gradients, so a closure that
    accumulates (no zero_grad) adds to the same point each time; the forward-difference HVP of such a
    closure equals the one of a clearing closure, and the starting tensors are never written."""
    model, params, loss_fn, closure = _setup()

    def accumulating():
        loss = loss_fn()
        loss.backward()
        return loss

    earlier = [torch.full_like(p, 0.5) for p in params]  # an earlier micro-batch's gradient
    for p, g in zip(params, earlier):
        p.grad = g
    snapshot = GradSnapshot(params, values=True)
    accumulating()
    start = snapshot.starts()  # the closure kept (added to) every gradient: all of them are starts
    assert all(g is not None for g in start)
    train = [p.grad.clone() for p in params]  # earlier + this batch
    v = [torch.randn_like(p) for p in params]
    with torch.no_grad(), ClosureIsolation(params, weights=params, start=start) as isolation:
        got = fd_hvp(isolation, accumulating, v, train, eps=1e-6, scheme="forward")
    for p in params:
        p.grad = None
    closure()
    clean = [p.grad.clone() for p in params]
    with torch.no_grad(), ClosureIsolation(params, weights=params) as isolation:
        want = fd_hvp(isolation, closure, v, clean, eps=1e-6, scheme="forward")
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-8)
    assert all(torch.equal(g, torch.full_like(g, 0.5)) for g in start)  # copies handed out, never these


@pytest.mark.parametrize("set_to_none", [True, False])
def test_step_rollback_restores_grads_rng_and_buffers(set_to_none):
    """StepRollback with values: the same grad tensors with the same values (even when a closure zeroed
    them in place), the RNG and the buffers, after a closure that changed all of them."""
    model, params, loss_fn, closure = _setup(dropout=0.3)
    closure()
    grads = [p.grad for p in params]
    values = [g.clone() for g in grads]
    buffers = [b.clone() for b in model.buffers()]
    rng = torch.get_rng_state()
    rollback = StepRollback(params, grad_values=True, buffers=BufferSnapshot(model.buffers()))
    if set_to_none:
        closure()
    else:
        for g in grads:
            g.zero_()
        loss_fn().backward()
    torch.rand(3)
    rollback.restore()
    assert all(p.grad is g for p, g in zip(params, grads))
    assert all(torch.equal(g, v) for g, v in zip(grads, values))
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), buffers))
    assert torch.equal(torch.get_rng_state(), rng)


def test_grad_snapshot_without_values_restores_the_objects():
    model, params, loss_fn, closure = _setup()
    closure()
    grads = [p.grad for p in params]
    values = [g.clone() for g in grads]
    snapshot = GradSnapshot(params, values=False)
    closure()  # replaces the gradients (set_to_none): the kept ones are intact
    snapshot.restore()
    assert all(p.grad is g and torch.equal(g, v) for p, g, v in zip(params, grads, values))


def test_zero_size_gradients_are_not_taken_for_aliases():
    """Zero-size tensors all have data_ptr 0; they never count as written into a kept gradient."""
    empty = nn.Parameter(torch.zeros(0, dtype=torch.float64))
    w = nn.Parameter(torch.ones(3, dtype=torch.float64))
    params = [w, empty]

    def closure():
        for p in params:
            p.grad = None
        loss = (w ** 2).sum() + empty.sum()
        loss.backward()
        return loss

    closure()
    kept = [p.grad for p in params]
    with ClosureIsolation(params) as isolation:
        _, grads = isolation.evaluate(closure, "closure")
    assert grads[1].numel() == 0 and torch.equal(grads[0], 2 * w.detach())
    assert all(p.grad is g for p, g in zip(params, kept))


def test_starts_are_the_saved_values_only_where_the_closure_kept_the_gradient():
    """A closure that replaced a gradient (set_to_none) does not depend on it: its re-evaluations start
    cleared; where it kept the tensor (zeroed in place or accumulated) they start from the saved value."""
    model, params, loss_fn, closure = _setup()
    closure()
    snapshot = GradSnapshot(params, values=True)
    closure()  # replaces every gradient
    assert snapshot.starts() == [None] * len(params)
    snapshot.restore()
    params[0].grad.zero_()  # keeps params[0]'s tensor; the others are replaced
    for p in params[1:]:
        p.grad = None
    loss_fn().backward()
    starts = snapshot.starts()
    assert starts[0] is snapshot.values[0] and starts[1:] == [None] * (len(params) - 1)


class _ListsItsOwnBuffers(nn.Module):
    """A module class that overrides how its members are listed: module_buffers must defer to it."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shown", torch.zeros(2))
        self.register_buffer("hidden", torch.ones(2))

    def named_buffers(self, *args, **kwargs):  # type: ignore[override]
        return iter([("shown", self.shown)])


def test_module_buffers_lists_what_module_buffers_lists():
    shared = nn.BatchNorm1d(3)
    model = nn.Sequential(nn.Linear(2, 3), shared, nn.Sequential(shared, nn.BatchNorm1d(3)), nn.ReLU())
    model.register_buffer("none", None)
    model[0].register_buffer("tied", shared.running_mean)  # one tensor under two names: listed once
    model.add_module("empty", None)
    expected = list(model.buffers())
    assert len(expected) == 6
    found = module_buffers(model)
    assert len(found) == len(expected) and all(a is b for a, b in zip(found, expected))
    inner = nn.Sequential(nn.BatchNorm1d(2), _ListsItsOwnBuffers())
    assert [id(b) for b in module_buffers(inner)] == [id(b) for b in inner.buffers()]
    own = _ListsItsOwnBuffers()
    assert [id(b) for b in module_buffers(own)] == [id(own.shown)]


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_weights_are_copied_back_only_after_they_moved(foreach, monkeypatch):
    """K HVPs in one isolation copy the weights back only after they moved: not before the first
    perturbation of each HVP, nor again on exit; the results are those of a fresh isolation per HVP, bit
    for bit, and a closure that writes the weights itself still leaves them restored."""
    model, params, _, closure = _setup()
    model.eval()
    with torch.enable_grad():
        closure()
    train_grads = [p.grad for p in params]
    weights = [p.detach().clone() for p in params]
    vs = [[torch.randn_like(p) for p in params] for _ in range(3)]
    separate = []
    for v in vs:
        with torch.no_grad(), ClosureIsolation(params, weights=params, foreach=foreach) as isolation:
            separate.append(fd_hvp(isolation, closure, v, train_grads, eps=1e-4, scheme="central"))
    copies = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_",
                        lambda dst, src, **kw: (copies.append(len(dst)), real_copy(dst, src, **kw)))
    with torch.no_grad(), ClosureIsolation(params, weights=params, foreach=foreach) as isolation:
        together = [fd_hvp(isolation, closure, v, train_grads, eps=1e-4, scheme="central") for v in vs]
    assert all(torch.equal(a, b) for one, other in zip(separate, together) for a, b in zip(one, other))
    assert all(torch.equal(p, w) for p, w in zip(params, weights))
    if foreach:  # the snapshot, then per central HVP: before the second perturbation, after the evaluations
        assert copies == [len(params)] * (1 + 2 * len(vs))

    def writes_weights():
        loss = closure()
        with torch.no_grad():
            params[0].mul_(2.0)
        return loss

    with torch.no_grad(), ClosureIsolation(params, weights=params, foreach=foreach) as isolation:
        isolation.evaluate(writes_weights, "closure")
    assert all(torch.equal(p, w) for p, w in zip(params, weights))


def test_gradient_copies_reuse_the_storage_they_are_lent():
    model, params, loss_fn, closure = _setup()
    closure()
    storage = []
    first = GradSnapshot(params, values=True, storage=storage)
    assert len(storage) == len(params) and all(a is b for a, b in zip(first.values, storage))
    closure()
    grads = [p.grad for p in params]
    values = [g.clone() for g in grads]
    second = GradSnapshot(params, values=True, storage=storage)
    assert all(a is b for a, b in zip(second.values, first.values))  # the same memory, no new allocation
    for g in grads:
        g.zero_()
    second.restore()
    assert all(p.grad is g and torch.equal(g, v) for p, g, v in zip(params, grads, values))


def test_buffer_snapshot_copies_once_per_dtype(monkeypatch):
    """Mixed float and int64 buffers (BatchNorm's counters): one multi-tensor copy per dtype, each over
    one dtype (CUDA's multi-tensor kernels need that; a mixed list takes one kernel per tensor)."""
    model = nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 3), nn.BatchNorm1d(3))
    calls = []
    real_copy = torch._foreach_copy_
    monkeypatch.setattr(torch, "_foreach_copy_",
                        lambda dst, src, **kw: (calls.append({t.dtype for t in dst}), real_copy(dst, src, **kw)))
    storage = []
    before = [b.clone() for b in model.buffers()]
    snapshot = BufferSnapshot(model.buffers(), storage)
    snapshot = BufferSnapshot(model.buffers(), storage)  # reusing the storage
    with torch.no_grad():
        model(torch.randn(4, 3))
    snapshot.restore()
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(model.buffers(), before))
    assert calls == [{torch.float32}, {torch.int64}] * 3
