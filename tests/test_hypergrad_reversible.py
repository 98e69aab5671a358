"""ohotorch.hypergrad.reversible: exact reversal of SGD with momentum, bit for bit, and its hypergradient
against autograd through the unrolled floating-point updates (float64)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hypergrad_problems import DT, Problem, oracle, relative_error
from ohotorch.hypergrad import SGD, Adam, exact_reverse_hypergradient, reverse_hypergradient
from ohotorch.hypergrad.reversible import FixedPoint, exact_divide_, exact_multiply_


def test_exact_multiply_then_divide_restores_values_and_empties_the_buffer():
    rng = np.random.default_rng(0)
    c0 = rng.integers(-2**50, 2**50, size=1000).astype(object)
    c, buf = c0.copy(), np.zeros(1000, dtype=object)
    ratios = [(int(n), 2**16) for n in rng.integers(1, 2**16, size=50)]
    for n, d in ratios:
        expected = c * n / d  # floats: the product the integers approximate
        c = exact_multiply_(c, buf, n, d)
        assert max(abs(float(a) - float(e)) for a, e in zip(c, expected)) <= n  # off by at most one grid digit * n/d
    assert any(buf)
    for n, d in reversed(ratios):
        c = exact_divide_(c, buf, n, d)
    assert all(a == b for a, b in zip(c, c0))
    assert not any(buf)


@pytest.mark.parametrize("momentum", ["mu", 0.5])
def test_reversal_recovers_the_initial_weights_bit_for_bit(momentum):
    problem = Problem(steps=12)
    fixed = FixedPoint(40)
    # initial weights on the fixed-point grid: the reversal must give back the very same floats
    w0 = [fixed.to_float(fixed.to_fixed(p)) for p in problem.w0]
    hypers = problem.hypers(lr=torch.full((12, 2), 0.3, dtype=DT))
    res = exact_reverse_hypergradient(problem.train_loss, problem.val_loss, w0, hypers,
                                      SGD(lr="lr", momentum=momentum, weight_decay="wd"), 12, groups=problem.groups)
    assert res.info["recovered_initial"] is True
    assert res.info["initial_max_rounding"] == 0.0
    for a, b in zip(res.info["recovered_w0"], w0):
        assert torch.equal(a, b)
    assert not torch.equal(res.params[0], w0[0])  # training did move the weights


def test_off_grid_initial_weights_are_rounded_to_the_grid_and_recovered():
    problem = Problem(steps=6)
    res = exact_reverse_hypergradient(problem.train_loss, problem.val_loss, problem.w0, problem.hypers(),
                                      SGD(lr="lr", momentum="mu"), 6, groups=problem.groups, radix_bits=30)
    assert res.info["recovered_initial"] is True
    assert 0 < res.info["initial_max_rounding"] <= 2.0 ** -31
    for a, b in zip(res.info["recovered_w0"], problem.w0):
        assert torch.equal(a, torch.round(b * 2.0 ** 30) / 2.0 ** 30)


@pytest.mark.parametrize("schedule", [False, True])
def test_exact_reverse_hypergradient_equals_autograd_and_stored_trajectory(schedule):
    problem = Problem(steps=8)
    hypers = problem.hypers()  # mu = 0.875 is on the momentum grid: the oracle sees the same momentum
    if schedule:  # momentum per step and per group, every value on the grid
        hypers["mu"] = torch.tensor([[0.5, 0.75], [0.875, 0.9375]] * 4, dtype=DT)
    expected = oracle(problem, hypers, "momentum", init_scaled=True)
    opt = SGD(lr="lr", momentum="mu", weight_decay="wd")
    init = lambda h: [h["scale"][i] * p for i, p in enumerate(problem.w0)]
    res = exact_reverse_hypergradient(problem.train_loss, problem.val_loss, init, hypers, opt, 8,
                                      groups=problem.groups, radix_bits=52)
    stored = reverse_hypergradient(problem.train_loss, problem.val_loss, init, hypers, opt, 8, groups=problem.groups)
    assert res.info["recovered_initial"] is True
    for name in ("lr", "mu", "wd", "ew", "rho", "scale"):
        assert expected[name].abs().max() > 0
        assert relative_error(res.grads[name], expected[name]) <= 1e-6, name
        assert relative_error(res.grads[name], stored.grads[name]) <= 1e-6, name


def test_memory_is_the_bits_momentum_destroys_not_the_trajectory():
    problem = Problem(steps=40)
    hypers = problem.hypers(lr=torch.full((40, 2), 0.1, dtype=DT), mu=torch.tensor(0.9, dtype=DT))
    res = exact_reverse_hypergradient(problem.train_loss, problem.val_loss, problem.w0, hypers,
                                      SGD(lr="lr", momentum="mu"), 40, groups=problem.groups)
    mu = res.info["momentum_used"].item()
    assert mu == round(0.9 * 2**16) / 2**16
    bits = res.info["bits_per_weight_per_step"]
    assert 0.5 * math.log2(1 / mu) < bits < 1.5 * math.log2(1 / mu) + 0.05
    n = sum(p.numel() for p in problem.w0)
    assert res.info["trajectory_bytes"] == 40 * 2 * n * 8
    assert res.memory_bytes == math.ceil(res.info["buffer_bits"] / 8) + 2 * n * 8
    assert res.memory_bytes < res.info["trajectory_bytes"] / 10


def test_refusals():
    problem = Problem(steps=3)
    run = lambda opt, **kw: exact_reverse_hypergradient(problem.train_loss, problem.val_loss, problem.w0,
                                                         problem.hypers(**kw), opt, 3, groups=problem.groups)
    with pytest.raises(ValueError, match="SGD with momentum only"):
        run(Adam(lr=0.1))
    with pytest.raises(ValueError, match="Nesterov"):
        run(SGD(lr=0.1, momentum=0.9, nesterov=True))
    with pytest.raises(ValueError, match="momentum > 0"):
        run(SGD(lr=0.1))
    with pytest.raises(ValueError, match="0 < momentum <= 1"):
        run(SGD(lr=0.1, momentum="mu"), mu=torch.tensor(1.5, dtype=DT))
    with pytest.raises(OverflowError, match="fixed-point range"):
        FixedPoint(40).to_fixed(torch.tensor([2.0 ** 30], dtype=DT))
