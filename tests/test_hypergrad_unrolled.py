"""ohotorch.hypergrad.unrolled: reverse (full and truncated) and forward hypergradients against autograd
through the unrolled updates, in float64."""
from __future__ import annotations

import pytest
import torch

from hypergrad_problems import DT, Problem, oracle, relative_error
from ohotorch.hypergrad import SGD, Adam, forward_hypergradient, reverse_hypergradient, unroll

OPTIMIZERS = {
    "sgd": SGD(lr="lr", weight_decay="wd"),
    "momentum": SGD(lr="lr", momentum="mu", weight_decay="wd"),
    "nesterov": SGD(lr="lr", momentum="mu", weight_decay="wd", nesterov=True),
    "adam": Adam(lr="lr", beta1="b1", beta2="b2", eps="eps", weight_decay="wd"),
    "adamw": Adam(lr="lr", beta1="b1", beta2="b2", eps="eps", weight_decay="wd", decoupled=True),
}


def _scaled_init(problem):
    return lambda h: [h["scale"][i] * p for i, p in enumerate(problem.w0)]


@pytest.mark.parametrize("kind", list(OPTIMIZERS))
def test_reverse_equals_forward_equals_autograd(kind):
    # A (T, groups) lr schedule, per-group weight decay, momentum / betas / eps as tensors, per-example loss
    # weights and an L2 coefficient read by the loss, and initial weights scaled by a hyperparameter.
    problem = Problem(steps=4)
    hypers = problem.hypers()
    if kind.startswith("adam"):
        hypers["lr"] = hypers["lr"] * 0.1
    expected = oracle(problem, hypers, kind, init_scaled=True)
    opt = OPTIMIZERS[kind]
    init = _scaled_init(problem)
    rev = reverse_hypergradient(problem.train_loss, problem.val_loss, init, hypers, opt, problem.steps,
                                groups=problem.groups)
    fwd = forward_hypergradient(problem.train_loss, problem.val_loss, init, hypers, opt, problem.steps,
                                groups=problem.groups)
    used = {"lr", "ew", "rho", "scale", "wd"} | ({"mu"} if kind in ("momentum", "nesterov") else set()) \
        | ({"b1", "b2", "eps"} if kind.startswith("adam") else set())
    for name in hypers:
        assert rev.grads[name].shape == hypers[name].shape
        if name not in used:
            assert not rev.grads[name].any() and not fwd.grads[name].any(), name
            continue
        assert expected[name].abs().max() > 0, name
        assert relative_error(rev.grads[name], expected[name]) <= 1e-6, name
        assert relative_error(fwd.grads[name], expected[name]) <= 1e-6, name
        assert relative_error(rev.grads[name], fwd.grads[name]) <= 1e-6, name
    assert torch.allclose(rev.val_loss, fwd.val_loss, rtol=1e-13, atol=0)


@pytest.mark.parametrize("k", [1, 3])
def test_truncated_reverse_is_autograd_with_the_early_state_detached(k):
    problem = Problem(steps=5)
    hypers = problem.hypers()
    expected = oracle(problem, hypers, "momentum", truncate=k)
    res = reverse_hypergradient(problem.train_loss, problem.val_loss, problem.w0, hypers,
                                OPTIMIZERS["momentum"], problem.steps, groups=problem.groups, truncate=k)
    assert res.steps_differentiated == k
    # the lr entries of steps before T - k get no gradient; the others match the oracle
    assert not res.grads["lr"][: problem.steps - k].any()
    for name in ("lr", "mu", "ew", "rho", "wd"):
        assert relative_error(res.grads[name], expected[name]) <= 1e-6, name
    # memory: k stored states of (w, b)
    state_bytes = 2 * sum(p.numel() for p in problem.w0) * 8
    assert res.memory_bytes == k * state_bytes
    full = reverse_hypergradient(problem.train_loss, problem.val_loss, problem.w0, hypers, OPTIMIZERS["momentum"],
                                 problem.steps, groups=problem.groups)
    assert full.memory_bytes == problem.steps * state_bytes
    assert not torch.allclose(full.grads["lr"], res.grads["lr"])


def test_reverse_cost_does_not_depend_on_the_number_of_hyperparameters():
    # the forward mode carries one tangent per scalar; the reverse mode only the trajectory
    problem = Problem(steps=3)
    few = {"lr": torch.tensor(0.3, dtype=DT), "ew": torch.ones(40, dtype=DT), "rho": torch.tensor(0.0, dtype=DT)}
    many = dict(few, lr=torch.full((3, 2), 0.3, dtype=DT))
    opt = SGD(lr="lr")
    a = reverse_hypergradient(problem.train_loss, problem.val_loss, problem.w0, few, opt, 3, groups=problem.groups)
    b = reverse_hypergradient(problem.train_loss, problem.val_loss, problem.w0, many, opt, 3, groups=problem.groups)
    assert a.memory_bytes == b.memory_bytes
    f = forward_hypergradient(problem.train_loss, problem.val_loss, problem.w0, many, opt, 3, groups=problem.groups)
    assert f.info["num_tangents"] == 6 + 40 + 1
    assert f.memory_bytes == 47 * sum(p.numel() for p in problem.w0) * 8
    # a constant lr is the sum of the per-step, per-group schedule entries' hypergradients
    assert torch.allclose(a.grads["lr"], b.grads["lr"].sum(), rtol=1e-12, atol=0)


def test_unroll_final_weights_match_the_hypergradient_run_and_leave_inputs_alone():
    problem = Problem(steps=4)
    hypers = problem.hypers()
    before = {k: v.clone() for k, v in hypers.items()}
    w0_before = [p.clone() for p in problem.w0]
    seen = []
    w = unroll(problem.train_loss, problem.w0, hypers, OPTIMIZERS["momentum"], 4, groups=problem.groups,
               callback=lambda t, s: seen.append(t))
    res = reverse_hypergradient(problem.train_loss, problem.val_loss, problem.w0, hypers, OPTIMIZERS["momentum"], 4,
                                groups=problem.groups)
    assert seen == [0, 1, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(w, res.params))
    assert all(torch.equal(hypers[k], before[k]) for k in hypers)
    assert all(torch.equal(a, b) for a, b in zip(problem.w0, w0_before))


def test_clear_errors():
    problem = Problem(steps=3)
    hypers = problem.hypers()
    run = lambda opt, h=hypers, **kw: reverse_hypergradient(problem.train_loss, problem.val_loss, problem.w0, h,
                                                             opt, kw.pop("steps", 3), groups=kw.pop("groups", [0, 1]),
                                                             **kw)
    with pytest.raises(KeyError, match="missing"):
        run(SGD(lr="missing"))
    with pytest.raises(ValueError, match="does not broadcast"):
        run(SGD(lr="ew"))  # shape (40,) is neither per group nor per step
    with pytest.raises(ValueError, match="does not broadcast"):
        run(SGD(lr="lr"), steps=4)  # a (3, 2) schedule for 4 steps
    with pytest.raises(TypeError, match="floating-point"):
        run(SGD(lr="lr"), h=dict(hypers, ew=torch.ones(40, dtype=torch.long)))
    with pytest.raises(ValueError, match="truncate"):
        run(SGD(lr="lr"), truncate=4)
    with pytest.raises(ValueError, match="steps"):
        run(SGD(lr="lr"), steps=0)
    with pytest.raises(ValueError, match="groups"):
        run(SGD(lr="lr"), groups=[0])
    with pytest.raises(ValueError, match="without parameters"):
        run(SGD(lr="lr"), groups=[0, 2])
    with pytest.raises(TypeError, match="number or the name"):
        SGD(lr=torch.tensor(0.1))
    with pytest.raises(ValueError, match="Invalid lr"):
        SGD(lr=-0.1)
    with pytest.raises(ValueError, match="Nesterov"):
        SGD(lr=0.1, nesterov=True)
