"""ohotorch.hypergrad.inner: with constant hyperparameters the unrolled inner optimisers are torch.optim's."""
from __future__ import annotations

import pytest
import torch

from hypergrad_problems import Problem
from ohotorch.hypergrad import SGD, Adam, unroll
from ohotorch.hypergrad.inner import inner_init, inner_step, value_at


def _torch_run(problem, w0, make_opt, steps):
    params = [p.clone().requires_grad_(True) for p in w0]
    opt = make_opt(params)
    h = {"ew": torch.ones(40, dtype=w0[0].dtype), "rho": torch.tensor(0.0, dtype=w0[0].dtype)}
    for t in range(steps):
        opt.zero_grad()
        problem.train_loss(params, h, t).backward()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 0.0), (0.9, False, 1e-3), (0.9, True, 1e-3),
                                                  (0.0, False, 1e-2)])
def test_sgd_is_bit_identical_to_torch_optim_sgd(dtype, momentum, nesterov, wd):
    problem = Problem(steps=6, dtype=dtype)
    w0 = problem.w0
    h = {"ew": torch.ones(40, dtype=dtype), "rho": torch.tensor(0.0, dtype=dtype)}
    ours = unroll(problem.train_loss, w0, h, SGD(lr=0.3, momentum=momentum, weight_decay=wd, nesterov=nesterov), 6)
    theirs = _torch_run(problem, w0, lambda p: torch.optim.SGD(p, lr=0.3, momentum=momentum, weight_decay=wd,
                                                                nesterov=nesterov, foreach=False), 6)
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b)
    assert not torch.equal(ours[0], w0[0])


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_matches_torch_optim_adam(decoupled):
    problem = Problem(steps=6)
    h = {"ew": torch.ones(40, dtype=torch.float64), "rho": torch.tensor(0.0, dtype=torch.float64)}
    ours = unroll(problem.train_loss, problem.w0, h, Adam(lr=0.05, weight_decay=0.01, decoupled=decoupled), 6)
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    theirs = _torch_run(problem, problem.w0, lambda p: cls(p, lr=0.05, weight_decay=0.01, foreach=False), 6)
    for a, b, w in zip(ours, theirs, problem.w0):
        assert torch.allclose(a - w, b - w, rtol=1e-12, atol=1e-15)


def test_schedules_broadcast_per_step_and_per_group():
    h = {"c": torch.tensor(0.5), "g": torch.tensor([0.1, 0.2]), "s": torch.tensor([[1.0], [2.0], [3.0]]),
         "sg": torch.arange(6.0).reshape(3, 2)}
    assert value_at("c", h, 1, 3, 2).tolist() == [0.5, 0.5]
    assert value_at("g", h, 2, 3, 2).tolist() == pytest.approx([0.1, 0.2])
    assert value_at("s", h, 1, 3, 2).tolist() == [2.0, 2.0]
    assert value_at("sg", h, 2, 3, 2).tolist() == [4.0, 5.0]
    assert value_at(0.3, h, 0, 3, 2) == 0.3


def test_step_is_out_of_place_and_adam_bias_corrections_follow_scheduled_betas():
    w = [torch.ones(3, dtype=torch.float64)]
    opt = Adam(lr=0.1, beta1="b1")
    h = {"b1": torch.tensor([[0.5], [0.9]], dtype=torch.float64)}
    state = inner_init(opt, w, 1)
    g = [torch.full((3,), 2.0, dtype=torch.float64)]
    s1 = inner_step(opt, state, g, h, 0, 2, [0], 1)
    s2 = inner_step(opt, s1, g, h, 1, 2, [0], 1)
    assert torch.equal(state["w"][0], torch.ones(3, dtype=torch.float64))
    assert s2["c"][0].item() == pytest.approx(0.45)
    # with a constant gradient the bias-corrected first moment is the gradient, whatever the betas
    m_hat = s2["m"][0] / (1 - s2["c"][0])
    assert torch.allclose(m_hat, g[0])
