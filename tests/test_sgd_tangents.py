"""ohotorch.sgd_tangents: the foreach path equals the reference path, the update from zero tangents
equals the generic update, and the direction is torch.optim.SGD's (the exactness of a whole tangent step
is tested in test_rules.py, of whole runs against autograd in test_exactness.py)."""
import pytest
import torch

from ohotorch.sgd_tangents import sgd_apply_, sgd_direction_, sgd_tangent_update_

SHAPES = [(5, 3), (7,), (2, 3, 4)]
SETTINGS = {
    "plain": dict(momentum=0.0, dampening=0.0, nesterov=False, use_buffer=False),
    "momentum": dict(momentum=0.9, dampening=0.1, nesterov=False, use_buffer=True),
    "nesterov": dict(momentum=0.9, dampening=0.0, nesterov=True, use_buffer=True),
}
KEYS = ["lr", "weight_decay", "momentum", None]


def _case(dtype, setting, first_step, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    grads = [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]
    hyper = SETTINGS[setting]
    buffers = [None if first_step or not hyper["use_buffer"] else torch.randn(s, generator=g, dtype=dtype)
               for s in SHAPES]
    direction, previous = sgd_direction_(
        params, grads, buffers, weight_decay=0.01, momentum=hyper["momentum"], dampening=hyper["dampening"],
        nesterov=hyper["nesterov"], use_buffer=hyper["use_buffer"], keep_previous_buffer=True, foreach=False)
    tangents = [[torch.randn(s, generator=g, dtype=dtype) for s in SHAPES] for _ in range(3)]  # w', b', H w'
    return dict(params=params, buffers=buffers, previous=previous, direction=direction), tangents, hyper


def _run(case, tangents, hyper, key, first_step, *, foreach, fresh=False, keep_tangent_b=True):
    tw, tb, hvp = ([t.clone() for t in ts] for ts in tangents)
    use_buffer = hyper["use_buffer"]
    sgd_tangent_update_(
        tw, tb if use_buffer and keep_tangent_b else None, None if fresh else hvp, case["params"],
        case["buffers"] if use_buffer else None, case["previous"], case["direction"],
        lr=0.1, weight_decay=0.01, momentum=hyper["momentum"], dampening=hyper["dampening"],
        nesterov=hyper["nesterov"], first_step=first_step, direct_lr=key == "lr",
        direct_weight_decay=key == "weight_decay", direct_momentum=key == "momentum", foreach=foreach,
        use_buffer=use_buffer, lr_derivative=0.7,
    )
    return tw, tb


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("key", KEYS, ids=["lr", "weight_decay", "momentum", "other_group"])
@pytest.mark.parametrize("first_step", [True, False], ids=["first_step", "later_step"])
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-6)], ids=["f64", "f32"])
def test_foreach_matches_reference(setting, key, first_step, dtype, rel):
    case, tangents, hyper = _case(dtype, setting, first_step)
    expected = _run(case, tangents, hyper, key, first_step, foreach=False)
    got = _run(case, tangents, hyper, key, first_step, foreach=True)
    for a, b in zip(got, expected):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=rel, atol=rel * float(y.abs().max()))
    assert any(float(t.abs().max()) > 0 for t in expected[0])


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("key", KEYS, ids=["lr", "weight_decay", "momentum", "other_group"])
@pytest.mark.parametrize("first_step", [True, False], ids=["first_step", "later_step"])
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_update_from_zero_is_the_generic_update_from_zero(setting, key, first_step, foreach):
    """hvp=None equals the reference update from zero tangents with H w' = 0, and stale memory (NaN,
    inf) in the tangents it overwrites does not survive."""
    case, tangents, hyper = _case(torch.float64, setting, first_step)
    zeros = [[torch.zeros_like(t) for t in ts] for ts in tangents]
    expected = _run(case, zeros, hyper, key, first_step, foreach=False)
    for ts in tangents[:2]:
        for i, t in enumerate(ts):
            t.fill_((float("nan"), float("inf"), -1e300)[i % 3])
    got = _run(case, tangents, hyper, key, first_step, foreach=foreach, fresh=True)
    for a, b in zip(got[0], expected[0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    if hyper["use_buffer"]:
        for a, b in zip(got[1], expected[1]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # Without b' kept (the greedy horizon), w' is the same.
    alone = _run(case, tangents, hyper, key, first_step, foreach=foreach, fresh=True, keep_tangent_b=False)
    for a, b in zip(alone[0], expected[0]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_direction_and_apply_are_torch_sgd_bit_for_bit(setting, foreach):
    hyper = SETTINGS[setting]
    g = torch.Generator().manual_seed(2)
    ours = [torch.randn(s, generator=g) for s in SHAPES]
    theirs = [w.clone().requires_grad_(True) for w in ours]
    reference = torch.optim.SGD(theirs, lr=0.1, momentum=hyper["momentum"], dampening=hyper["dampening"],
                                nesterov=hyper["nesterov"], weight_decay=0.01, foreach=False)
    buffers = [None] * len(ours)
    for _ in range(3):
        grads = [torch.randn(s, generator=g) for s in SHAPES]
        for t, grad in zip(theirs, grads):
            t.grad = grad.clone()
        direction, _ = sgd_direction_(ours, grads, buffers, weight_decay=0.01, momentum=hyper["momentum"],
                                      dampening=hyper["dampening"], nesterov=hyper["nesterov"],
                                      use_buffer=hyper["use_buffer"], keep_previous_buffer=False, foreach=foreach)
        sgd_apply_(ours, direction, lr=0.1, foreach=foreach)
        reference.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b.detach())


def test_previous_buffer_is_a_copy_of_b_before_the_step():
    params, grads = [torch.ones(3)], [torch.full((3,), 2.0)]
    buffers = [torch.full((3,), 5.0)]
    _, previous = sgd_direction_(params, grads, buffers, weight_decay=0.0, momentum=0.5, dampening=0.0,
                                 nesterov=False, use_buffer=True, keep_previous_buffer=True, foreach=False)
    assert torch.equal(previous[0], torch.full((3,), 5.0)) and torch.equal(buffers[0], torch.full((3,), 4.5))
