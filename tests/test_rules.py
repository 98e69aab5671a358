"""ohotorch.rules: the inner-rule protocol, run for SGD, Adam and AdamW through the same battery.

A rule step is checked (a) against torch.optim (bit for bit) and (b) in its tangent: after
``update_tangent`` with the exact H w' (autograd), the tangents (w', and b' or m', v') are the derivative
of one whole rule step along (theta, w, state) in the tangent's direction, measured by float64 central
differences of the rule itself.
"""
import copy

import pytest
import torch

from ohotorch.rules import AdamRule, SGDRule, effective_lr, lr_derivative

DT = torch.float64
SHAPES = [(3, 2), (4,)]


def _group(rule_name, tune):
    if rule_name.startswith("sgd"):
        return dict(lr=0.1, lr_scale=0.7, momentum=0.8, dampening=0.0, nesterov=rule_name == "sgd_nesterov",
                    weight_decay=0.03, tune=tune)
    return dict(lr=0.05, lr_scale=0.7, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.03, tune=tune)


RULES = {
    "sgd": SGDRule(), "sgd_nesterov": SGDRule(), "adam": AdamRule(decoupled=False), "adamw": AdamRule(decoupled=True),
}
NAMES = {"sgd": ("lr", "lr_scale", "weight_decay", "momentum"), "sgd_nesterov": ("lr", "weight_decay", "momentum"),
         "adam": ("lr", "lr_scale", "weight_decay"), "adamw": ("lr", "lr_scale", "weight_decay")}
CASES = [(r, n) for r in RULES for n in NAMES[r] + ("other_group",)]
STATE_KEYS = {"tangent_b": "momentum_buffer", "tangent_m": "exp_avg", "tangent_v": "exp_avg_sq"}


def loss_fn(ws):
    """A smooth loss whose Hessian couples entries and parameters."""
    return sum(0.3 * (w ** 2).sum() + torch.sin(w).sum() + 0.2 * (w ** 3).sum() for w in ws) \
        + 0.1 * ws[0].sum() * ws[1].sum()


def _grads(ws):
    ws = [w.detach().requires_grad_(True) for w in ws]
    with torch.enable_grad():
        return [g.detach() for g in torch.autograd.grad(loss_fn(ws), ws)]


def _hvp(ws, vs):
    ws = [w.detach().requires_grad_(True) for w in ws]
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(ws), ws, create_graph=True)
        return [h.detach() for h in torch.autograd.grad(grads, ws, vs)]


def _warm_state(rule, group, seed=0):
    """Weights and rule state after two steps (momentum buffers and moments not zero)."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(s, generator=g, dtype=DT) for s in SHAPES]
    states = [{} for _ in ws]
    for _ in range(2):
        for w, grad in zip(ws, _grads(ws)):
            w.grad = grad
        rule.apply(group, rule.prepare(group, ws, states, foreach=False))
    return ws, states


def _step(rule, group, ws, states):
    """One whole rule step on copies; returns (new weights, new states)."""
    ws = [w.clone() for w in ws]
    states = copy.deepcopy(states)
    for w, grad in zip(ws, _grads(ws)):
        w.grad = grad
    rule.apply(group, rule.prepare(group, ws, states, foreach=False))
    return ws, states


@pytest.mark.parametrize("rule_name, name", CASES)
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_tangent_is_the_derivative_of_one_step(rule_name, name, foreach):
    rule = RULES[rule_name]
    tuned = name if name != "other_group" else "lr"
    group = _group(rule_name, (tuned,))
    ws, states = _warm_state(rule, group)
    g = torch.Generator().manual_seed(1)
    companions = rule.companions(group)
    for w, s in zip(ws, states):
        s["tangent_w"] = torch.randn((1, *w.shape), generator=g, dtype=DT)
        for c in companions:
            s[c] = torch.randn((1, *w.shape), generator=g, dtype=DT)
            if c == "tangent_v":  # keep v + h v' > 0 along the difference
                s[c].mul_(0.1 * s["exp_avg_sq"].min())
    direct = name != "other_group"

    # Central differences of the whole step along (theta, w, state) in the tangent's direction.
    def shifted(h):
        shifted_group = dict(group)
        if direct:
            shifted_group[tuned] = group[tuned] + h
        shifted_ws = [w + h * s["tangent_w"][0] for w, s in zip(ws, states)]
        shifted_states = copy.deepcopy(states)
        for s in shifted_states:
            for c in companions:
                s[STATE_KEYS[c]] = s[STATE_KEYS[c]] + h * s[c][0]
        return _step(rule, shifted_group, shifted_ws, shifted_states)

    h = 1e-5
    (w_plus, s_plus), (w_minus, s_minus) = shifted(h), shifted(-h)
    expected_w = [(a - b) / (2 * h) for a, b in zip(w_plus, w_minus)]
    expected_c = {c: [(a[STATE_KEYS[c]] - b[STATE_KEYS[c]]) / (2 * h) for a, b in zip(s_plus, s_minus)]
                  for c in companions}

    hvp = _hvp(ws, [s["tangent_w"][0].clone() for s in states])
    work_ws = [w.clone() for w in ws]
    for w, grad in zip(work_ws, _grads(ws)):
        w.grad = grad
    work = rule.prepare(group, work_ws, states, foreach=foreach)
    rule.update_tangent(group, work, 0, (None, tuned), direct, hvp)
    for got, want in zip([s["tangent_w"][0] for s in states], expected_w):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    for c in companions:
        for got, want in zip([s[c][0] for s in states], expected_c[c]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("rule_name", list(RULES))
def test_update_from_zero_needs_no_hvp(rule_name):
    """hvp=None (tangents zero on entry) is the generic update from zero tangents with H w' = 0."""
    rule = RULES[rule_name]
    for name in NAMES[rule_name]:
        group = _group(rule_name, (name,))
        ws, states = _warm_state(rule, group)
        results = []
        for fresh in (True, False):
            run_states = copy.deepcopy(states)
            for w, s in zip(ws, run_states):
                s["tangent_w"] = torch.full((1, *w.shape), float("nan"), dtype=DT) if fresh \
                    else torch.zeros((1, *w.shape), dtype=DT)
                for c in rule.companions(group):
                    s[c] = torch.zeros((1, *w.shape), dtype=DT)
            work_ws = [w.clone() for w in ws]
            for w, grad in zip(work_ws, _grads(ws)):
                w.grad = grad
            work = rule.prepare(group, work_ws, run_states, foreach=False)
            hvp = None if fresh else [torch.zeros_like(w) for w in ws]
            rule.update_tangent(group, work, 0, (None, name), True, hvp)
            results.append([s["tangent_w"][0] for s in run_states])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert any(float(t.abs().max()) > 0 for t in results[0]), name


def _torch_optimizer(rule_name, params, group):
    if rule_name.startswith("sgd"):
        return torch.optim.SGD(params, lr=group["lr"] * group["lr_scale"], momentum=group["momentum"],
                               dampening=group["dampening"], nesterov=group["nesterov"],
                               weight_decay=group["weight_decay"], foreach=False)
    cls = torch.optim.AdamW if rule_name == "adamw" else torch.optim.Adam
    return cls(params, lr=group["lr"] * group["lr_scale"], betas=group["betas"], eps=group["eps"],
               weight_decay=group["weight_decay"], foreach=False)


@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_prepare_then_apply_is_torch_optim_bit_for_bit(rule_name, foreach):
    rule = RULES[rule_name]
    group = _group(rule_name, ())
    g = torch.Generator().manual_seed(3)
    ours = [torch.randn(s, generator=g, dtype=torch.float32) for s in SHAPES]
    theirs = [w.clone().requires_grad_(True) for w in ours]
    reference = _torch_optimizer(rule_name, theirs, group)
    states = [{} for _ in ours]
    for _ in range(4):
        grads = [torch.randn(s, generator=g, dtype=torch.float32) for s in SHAPES]
        for w, t, grad in zip(ours, theirs, grads):
            w.grad, t.grad = grad.clone(), grad.clone()
        rule.apply(group, rule.prepare(group, ours, states, foreach=foreach))
        reference.step()
    for a, b in zip(ours, theirs):
        assert torch.equal(a, b.detach())


def test_effective_lr_and_its_derivative():
    group = dict(lr=0.2, lr_scale=0.5)
    assert effective_lr(group) == 0.1
    assert lr_derivative(group, "lr") == 0.5 and lr_derivative(group, "lr_scale") == 0.2


@pytest.mark.parametrize("rule_name", list(RULES))
def test_group_checks(rule_name):
    rule = RULES[rule_name]
    for key, value, match in [("lr", -1.0, "Invalid learning rate"), ("weight_decay", -1.0, "Invalid weight_decay"),
                              ("lr_scale", float("nan"), "Invalid lr_scale")]:
        group = _group(rule_name, ())
        group[key] = value
        with pytest.raises(ValueError, match=match):
            rule.check_group(group)
    group = _group(rule_name, ("lr", "lr_scale"))
    with pytest.raises(ValueError, match="not both"):
        rule.check_group(group)


@pytest.mark.parametrize("cls_name", ["OHO", "OHOAdam"])
@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_the_shell_decides_foreach_once_for_every_call(cls_name, foreach, monkeypatch):
    """One foreach decision per step reaches the direction, the tangent updates, the HVP isolation and the
    weight update alike."""
    import ohotorch
    import ohotorch.optimizer as optimizer_module
    import ohotorch.rules as rules_module
    from helpers import batches, digits, mlp, run_oho

    seen = []
    for module, name in [(rules_module, "sgd_direction_"), (rules_module, "sgd_tangent_update_"),
                         (rules_module, "sgd_apply_"), (rules_module, "adam_direction_"),
                         (rules_module, "adam_tangent_update_"), (rules_module, "adam_apply_")]:
        real = getattr(module, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            seen.append((_name, kwargs["foreach"]))
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, spy)
    real_isolation = optimizer_module.ClosureIsolation

    def isolation_spy(*args, **kwargs):
        if "weights" in kwargs:
            seen.append(("ClosureIsolation", kwargs["foreach"]))
        return real_isolation(*args, **kwargs)

    monkeypatch.setattr(optimizer_module, "ClosureIsolation", isolation_spy)
    xt, yt, _, _ = digits()
    model = mlp()
    if cls_name == "OHO":
        opt = ohotorch.OHO(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=1e-2, foreach=foreach,
                           discount=1.0)
    else:
        opt = ohotorch.OHOAdam(model.parameters(), lr=1e-3, weight_decay=1e-2, foreach=foreach, discount=1.0)
    run_oho(model, opt, batches(xt, yt, 32, 3))
    names = {name for name, _ in seen}
    prefix = "sgd" if cls_name == "OHO" else "adam"
    assert {f"{prefix}_direction_", f"{prefix}_tangent_update_", f"{prefix}_apply_", "ClosureIsolation"} <= names
    assert {value for _, value in seen} == {foreach}
