"""ohotorch.adam_tangents: the foreach path equals the reference path, and the update from zero tangents
(hvp=None) equals the generic update (exactness of whole runs against autograd: test_adam.py; of one
rule step: test_rules.py)."""
import pytest
import torch

RULES = ["adam", "adamw"]


def _adam_tangent_case(dtype, rule, seed=0):
    """A small Adam state after a few steps (step counts differ per parameter, so do c1 and c2; one
    parameter has entries whose gradient is always 0, so v = 0 there) and random tangents
    (w', m', v', H w'), consistent with that state."""
    from ohotorch.adam_tangents import adam_direction_

    g = torch.Generator().manual_seed(seed)
    shapes = [(5, 3), (7,), (2, 3, 4)]
    params = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    steps = [torch.tensor(float(t)) for t in (0, 3, 7)]
    hyper = dict(lr=3e-2, beta1=0.9, beta2=0.99, weight_decay=0.1, decoupled=rule == "adamw")
    for _ in range(3):
        grads = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
        grads[1][:3] = 0.0
        params[1][:3] = 0.0  # keeps d = g + lam w = 0 there, so v = 0 for Adam too
        work = adam_direction_(params, grads, m, v, steps, eps=1e-8, foreach=False, **hyper)
    tangents = [[torch.randn(s, generator=g, dtype=dtype) for s in shapes] for _ in range(4)]
    tangents[2][1][:3] = 0.0  # v' = 0 where v = 0 (d = 0 there at every step)
    return dict(params=params, exp_avgs=m, exp_avg_sqs=v, **work._asdict()), tangents, hyper


def _run_tangent(case, tangents, hyper, key, *, foreach, fresh=False, companions=True):
    """Copies of (w', m', v') after one adam_tangent_update_ for tangent ``key`` ("lr", "weight_decay"
    or None for another group's hyperparameter)."""
    from ohotorch.adam_tangents import adam_tangent_update_

    tw, tm, tv, hvp = ([t.clone() for t in ts] for ts in tangents)
    adam_tangent_update_(
        tw, tm if companions else None, tv if companions else None, None if fresh else hvp,
        case["params"], case["d"], case["exp_avgs"], case["exp_avg_sqs"], case["denom"], case["bc1"],
        case["bc2_sqrt"], lr=hyper["lr"], beta1=hyper["beta1"], beta2=hyper["beta2"],
        weight_decay=hyper["weight_decay"], decoupled=hyper["decoupled"], direct_lr=key == "lr",
        direct_weight_decay=key == "weight_decay", foreach=foreach,
    )
    return tw, tm, tv


def _assert_lists_close(got, expected, rel):
    # Relative to each tensor's largest entry: m' - u delta' cancels, so entrywise relative error of
    # values near 0 says nothing.
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("key", ["lr", "weight_decay", None], ids=["lr", "weight_decay", "other_group"])
@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)], ids=["f64", "f32"])
def test_tangent_update_foreach_matches_reference(rule, key, dtype, rel):
    case, tangents, hyper = _adam_tangent_case(dtype, rule)
    expected = _run_tangent(case, tangents, hyper, key, foreach=False)
    got = _run_tangent(case, tangents, hyper, key, foreach=True)
    for a, b in zip(got, expected):
        _assert_lists_close(a, b, rel)
    assert any(float(t.abs().max()) > 0 for t in expected[0])


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("key", ["lr", "weight_decay", None], ids=["lr", "weight_decay", "other_group"])
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("companions", [True, False], ids=["companions", "no_companions"])
def test_fresh_tangent_update_is_the_update_from_zero(rule, key, foreach, companions):
    """hvp=None is the generic update (reference path) from zero tangents with H w' = 0."""
    case, tangents, hyper = _adam_tangent_case(torch.float64, rule)
    zeros = [[torch.zeros_like(t) for t in ts] for ts in tangents]
    expected = _run_tangent(case, zeros, hyper, key, foreach=False)
    got = _run_tangent(case, tangents, hyper, key, foreach=foreach, fresh=True, companions=companions)
    for a, b in zip(got if companions else got[:1], expected):
        _assert_lists_close(a, b, 1e-12)
    if not companions:  # never read nor written
        for a, b in zip(got[1:], tangents[1:3]):
            assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("key", ["lr", "weight_decay", None], ids=["lr", "weight_decay", "other_group"])
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_fresh_tangent_update_ignores_stale_memory(rule, key, foreach):
    case, tangents, hyper = _adam_tangent_case(torch.float64, rule)
    clean = _run_tangent(case, [[torch.zeros_like(t) for t in ts] for ts in tangents], hyper, key,
                         foreach=foreach, fresh=True)
    for ts in tangents[:3]:
        for i, t in enumerate(ts):
            t.fill_((float("nan"), float("inf"), -1e300)[i % 3])
    stale = _run_tangent(case, tangents, hyper, key, foreach=foreach, fresh=True)
    for a, b in zip(stale, clean):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_fresh_tangent_update_needs_no_companions_only_when_fresh():
    case, tangents, hyper = _adam_tangent_case(torch.float64, "adam")
    with pytest.raises(ValueError, match="tangent_m and tangent_v"):
        _run_tangent(case, tangents, hyper, "lr", foreach=False, companions=False)


@pytest.mark.parametrize("foreach", [False, True], ids=["reference", "foreach"])
@pytest.mark.parametrize("rule", RULES)
def test_tangent_update_is_finite_with_flush_to_zero(rule, foreach):
    """Where v = 0, sqrt(v) is clamped to the smallest normal number; with denormals flushed to zero
    (torch.set_flush_denormal, which some compiled kernels leave switched on) a product of it with
    2 sqrt(1 - beta2) is 0 and the tangent of the denominator would be 0/0."""
    case, tangents, hyper = _adam_tangent_case(torch.float32, rule)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        tw, tm, tv = _run_tangent(case, tangents, hyper, "lr", foreach=foreach)
    finally:
        torch.set_flush_denormal(False)
    for t in (*tw, *tm, *tv):
        assert torch.isfinite(t).all()
