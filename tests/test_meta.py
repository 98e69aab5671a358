"""ohotorch.meta: the reparameterisation, the scalar meta-optimizers and the whole meta-update policy."""
import math
import warnings

import pytest

from ohotorch import meta

CONFIG = meta.MetaConfig(meta_lr={"lr": 0.1, "lr_scale": 0.1, "weight_decay": 0.1, "momentum": 0.1},
                         optimizer="adam", betas=(0.9, 0.999), eps=1e-15, space="log",
                         bounds=dict(meta.DEFAULT_BOUNDS))


@pytest.mark.parametrize("space", ["log", "raw"])
@pytest.mark.parametrize("name, theta", [("lr", 0.03), ("lr_scale", 1.0), ("weight_decay", 1e-4), ("momentum", 0.9)])
def test_map_round_trip_and_derivative(space, name, theta):
    phi = meta.to_meta(name, theta, space)
    assert math.isclose(meta.from_meta(name, phi, space), theta, rel_tol=1e-12)
    h = 1e-6
    numeric = (meta.from_meta(name, phi + h, space) - meta.from_meta(name, phi - h, space)) / (2 * h)
    assert math.isclose(meta.meta_derivative(name, theta, space), numeric, rel_tol=1e-6)


def test_project_and_sgd_step():
    assert meta.project(-1.0, (0.0, 1.0)) == 0.0 and meta.project(2.0, (0.0, 1.0)) == 1.0
    assert meta.project(0.5, (0.0, 1.0)) == 0.5
    assert meta.meta_sgd_step(1.0, 2.0, lr=0.25) == 0.5


def test_adam_step_hand_values():
    state = {}
    # First step: m_hat = g, v_hat = g^2, so phi moves by lr * sign(g) (eps = 0).
    assert meta.meta_adam_step(1.0, -3.0, state, lr=0.1, betas=(0.9, 0.999), eps=0.0) == pytest.approx(1.1)
    assert state == pytest.approx({"m": -0.3, "v": 0.009, "t": 1.0})
    phi = meta.meta_adam_step(1.1, 1.0, state, lr=0.1, betas=(0.9, 0.999), eps=0.0)
    m, v = 0.9 * -0.3 + 0.1, 0.999 * 0.009 + 0.001
    assert phi == pytest.approx(1.1 - 0.1 * (m / (1 - 0.81)) / math.sqrt(v / (1 - 0.999 ** 2)))


def _groups():
    return [{"lr": 0.1, "weight_decay": 1e-3}, {"lr": 0.2, "weight_decay": 0.0}]


def test_update_moves_every_value_and_records_what_it_wrote():
    groups, state = _groups(), {}
    outcome = meta.meta_update_(groups, [(0, "lr", 1.0), (1, "weight_decay", -1.0)], 0.5, state, CONFIG)
    assert outcome == meta.COMMITTED
    assert groups[0]["lr"] < 0.1 and groups[1]["weight_decay"] > 0.0  # descent on h
    assert math.isclose(math.log(0.1 + 1e-8) - math.log(groups[0]["lr"] + 1e-8), 0.1, rel_tol=1e-9)  # Adam: lr
    assert state["0/lr"]["written"] == groups[0]["lr"] and state["0/lr"]["t"] == 1.0
    assert groups[0]["weight_decay"] == 1e-3 and groups[1]["lr"] == 0.2  # untouched


def test_outside_change_restarts_the_meta_state_with_a_warning_for_lr():
    groups, state = _groups(), {}
    meta.meta_update_(groups, [(0, "lr", 1.0), (0, "weight_decay", 1.0)], 0.5, state, CONFIG)
    meta.meta_update_(groups, [(0, "lr", 1.0), (0, "weight_decay", 1.0)], 0.5, state, CONFIG)
    assert state["0/lr"]["t"] == 2.0
    groups[0]["lr"] = 0.5
    groups[0]["weight_decay"] = 0.01
    with pytest.warns(UserWarning, match="changed from outside") as record:
        meta.meta_update_(groups, [(0, "lr", 1.0), (0, "weight_decay", 1.0)], 0.5, state, CONFIG)
    assert len(record) == 1  # lr only
    assert state["0/lr"]["t"] == 1.0 and state["0/weight_decay"]["t"] == 1.0


def test_zero_meta_lr_keeps_values_bit_identical():
    config = meta.MetaConfig(**{**CONFIG.__dict__, "meta_lr": {"lr": 0.0, "weight_decay": 0.0}})
    groups = [{"lr": 0.1 + 1e-17 * 3, "weight_decay": 3e-4}]
    before = dict(groups[0])
    for space in ("log", "raw"):
        config = meta.MetaConfig(**{**config.__dict__, "space": space})
        assert meta.meta_update_(groups, [(0, "lr", 5.0), (0, "weight_decay", -2.0)], 1.0, {}, config) == meta.COMMITTED
        assert groups[0] == before


def test_projection_onto_bounds():
    config = meta.MetaConfig(**{**CONFIG.__dict__, "optimizer": "sgd", "space": "raw",
                                "bounds": {**meta.DEFAULT_BOUNDS, "lr": (0.05, 0.15)}})
    groups = [{"lr": 0.1, "momentum": 0.99}]
    meta.meta_update_(groups, [(0, "lr", -100.0), (0, "momentum", -100.0)], 1.0, {}, config)
    assert groups[0] == {"lr": 0.15, "momentum": 0.999}


@pytest.mark.parametrize("hypergradient, loss, outcome", [
    (float("nan"), 1.0, meta.NONFINITE_HYPERGRADIENT),
    (1.0, float("inf"), meta.NONFINITE_HYPERGRADIENT),
    (-1e308, 1.0, meta.NONFINITE_RESULT),  # raw SGD step overflows to inf
])
def test_all_or_nothing(hypergradient, loss, outcome):
    config = meta.MetaConfig(**{**CONFIG.__dict__, "optimizer": "sgd", "space": "raw",
                                "meta_lr": {"lr": 10.0, "weight_decay": 0.1}})
    groups = _groups()
    state = {"1/weight_decay": {"written": 0.0}}
    before_groups, before_state = [dict(g) for g in groups], {k: dict(v) for k, v in state.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = meta.meta_update_(groups, [(1, "weight_decay", 1.0), (0, "lr", hypergradient)], loss, state, config)
    assert got == outcome
    assert groups == before_groups and state == before_state


def test_missing_meta_lr_is_refused():
    config = meta.MetaConfig(**{**CONFIG.__dict__, "meta_lr": {"lr": 0.1}})
    with pytest.raises(ValueError, match="meta_lr has no value for 'weight_decay'"):
        meta.meta_update_(_groups(), [(0, "weight_decay", 1.0)], 1.0, {}, config)


def _device_run(config, groups, entries, hypergradients, losses):
    """DeviceMeta over a sequence of hyper-steps; returns the values and states after each."""
    import torch
    dm = meta.DeviceMeta(entries, [groups[i][n] for i, n in entries], [{} for _ in entries], config,
                         torch.device("cpu"))
    out = []
    for h, loss in zip(hypergradients, losses):
        packed = dm.update(torch.tensor(h, dtype=torch.float64), torch.tensor(loss, dtype=torch.float64)).tolist()
        out.append(packed)
    return out


@pytest.mark.parametrize("optimizer, space", [("adam", "log"), ("adam", "raw"), ("sgd", "log"), ("sgd", "raw")])
def test_device_meta_matches_the_float_meta_update(optimizer, space):
    """The same hyper-steps through meta_update_ (floats) and DeviceMeta (tensors): the same values and
    meta states, through clipping (an outlier at step 4), bounds, meta_lr = 0 and a non-finite step."""
    import random
    rng = random.Random(0)
    config = meta.MetaConfig(**{**CONFIG.__dict__, "optimizer": optimizer, "space": space,
                                "meta_lr": {"lr": 0.3 if space == "log" else 0.01, "weight_decay": 0.0,
                                            "momentum": 0.2 if space == "log" else 0.01}})
    entries = [(0, "lr"), (0, "weight_decay"), (1, "momentum")]
    groups = [{"lr": 0.1, "weight_decay": 1e-3}, {"momentum": 0.9}]
    hs = [[rng.gauss(0, 1) for _ in entries] for _ in range(12)]
    hs[4][0] *= 1e6  # an outlier: clipped by Adam
    hs[7][2] = -50.0  # momentum pushed past its bound
    losses = [1.0] * 12
    losses[9] = float("nan")  # refused
    device = _device_run(config, [dict(g) for g in groups], entries, hs, losses)
    state = {}
    n = len(entries)
    for h, loss, packed in zip(hs, losses, device):
        outcome = meta.meta_update_(groups, [(i, name, v) for (i, name), v in zip(entries, h)], loss, state, config)
        assert (packed[-1] == 1.0) == (outcome == meta.COMMITTED)
        for k, (i, name) in enumerate(entries):
            # abs_tol: exp(phi) - c near the log offset c = 1e-8 cancels; 1e-18 is 1e-10 of c
            assert math.isclose(packed[k], groups[i][name], rel_tol=1e-12, abs_tol=1e-18), (name, packed[k])
            saved = state.get(f"{i}/{name}", {})
            for row, key in enumerate(("m", "v", "t"), start=1):
                assert math.isclose(packed[row * n + k], saved.get(key, 0.0), rel_tol=1e-12, abs_tol=1e-300)
    assert 0.0 <= groups[1]["momentum"] <= 0.999 and groups[0]["weight_decay"] == 1e-3


def test_adam_clip_bounds_an_outlier():
    """After an outlier 1e19 times the usual hypergradient, phi moves at most META_CLIP meta learning
    rates and the second moment grows by at most 1 + (1 - beta2)(k^2 - 1)."""
    state = {}
    phi = 0.0
    for _ in range(5):
        phi = meta.meta_adam_step(phi, 1.0, state, lr=0.1, betas=(0.9, 0.999), eps=0.0)
    v_before = state["v"]
    t = state["t"]
    bound = meta.META_CLIP * math.sqrt(v_before / (1 - 0.999 ** t))
    new_phi = meta.meta_adam_step(phi, 1e19, state, lr=0.1, betas=(0.9, 0.999), eps=0.0)
    assert abs(new_phi - phi) <= meta.META_CLIP * 0.1 / (1 - 0.9 ** (t + 1))
    assert state["v"] == pytest.approx(0.999 * v_before + 0.001 * bound ** 2)


def test_huge_meta_lr_is_clamped_in_meta_space():
    config = meta.MetaConfig(**{**CONFIG.__dict__, "meta_lr": {"lr": 1e6, "weight_decay": 1e6}})
    groups = [{"lr": 0.1, "weight_decay": 1e-3}]
    state = {}
    assert meta.meta_update_(groups, [(0, "lr", -1.0), (0, "weight_decay", 1.0)], 1.0, state, config) == meta.COMMITTED
    assert groups[0]["lr"] == pytest.approx(math.exp(meta.LOG_SPACE_MAX)) and groups[0]["weight_decay"] == 0.0
    assert math.isfinite(groups[0]["lr"])


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("where", ["loss", "h", "result"])
def test_device_meta_refuses_every_non_finite_value(bad, where):
    """The all-or-nothing flags of DeviceMeta.update: any infinite or nan loss, hypergradient or result
    leaves the state unchanged and reports why; finite ones commit."""
    import torch
    config = meta.MetaConfig(**{**CONFIG.__dict__, "meta_lr": {"lr": 0.1, "weight_decay": 0.1}})
    entries = [(0, "lr"), (0, "weight_decay")]
    dm = meta.DeviceMeta(entries, [0.1, 1e-3], [{}, {}], config, torch.device("cpu"))
    h = torch.tensor([0.5, -0.25], dtype=torch.float64)
    loss = torch.tensor(1.0, dtype=torch.float64)
    if where == "loss":
        loss = torch.tensor(bad, dtype=torch.float64)
    elif where == "h":
        h[1] = bad
    else:  # finite inputs, a non-finite second moment in the state: the step's result is not finite
        dm.state[2, 0] = bad
    before = dm.state.clone()
    packed = dm.update(h, loss).tolist()
    finite_input, committed = packed[-2] == 1.0, packed[-1] == 1.0
    assert finite_input == (where == "result") and not committed
    assert torch.equal(dm.state.nan_to_num(), before.nan_to_num())  # unchanged
    ok = meta.DeviceMeta(entries, [0.1, 1e-3], [{}, {}], config, torch.device("cpu"))
    packed = ok.update(torch.tensor([0.5, -0.25], dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)).tolist()
    assert packed[-2] == 1.0 and packed[-1] == 1.0


# ---------------------------------------------------------------- lr_down: the slower decrease
def _down_config(down, fast_start=None):
    return meta.MetaConfig(meta_lr={name: 0.02 for name in meta.HYPERPARAMETERS}, optimizer="adam",
                           betas=(0.9, 0.999), eps=1e-15, space="log", bounds=dict(meta.DEFAULT_BOUNDS),
                           fast_start=fast_start, lr_down=down)


def _symmetric_phi(theta, h, adam, lr=0.02):
    phi = meta.to_meta("lr", theta, "log")
    return phi, meta.meta_adam_step(phi, h * meta.meta_derivative("lr", theta, "log"), adam, lr=lr,
                                    betas=(0.9, 0.999), eps=1e-15)


def test_lr_down_scales_the_decreasing_steps_of_lr_only():
    """A step down of lr / lr_scale is d times the symmetric one in meta space (bit for bit, the
    meta-optimizer's state as without it); steps up, weight decay and momentum are untouched."""
    config = _down_config(0.5)
    groups, state, theta, adam = [{"lr": 0.1, "weight_decay": 1e-3, "momentum": 0.5}], {}, 0.1, {}
    symmetric, sym_state = [{"weight_decay": 1e-3, "momentum": 0.5}], {}
    for k, h in enumerate([1.0] * 5 + [-1.0] * 5 + [0.3, -0.2] * 3):
        phi, proposal = _symmetric_phi(theta, h, adam)
        expected_phi = phi + 0.5 * (proposal - phi) if proposal < phi else proposal
        theta = meta.project(meta.from_meta("lr", expected_phi, "log"), (0.0, math.inf))
        hs = [(0, "lr", h), (0, "weight_decay", h), (0, "momentum", h)]
        assert meta.meta_update_(groups, hs, 1.0, state, config) == meta.COMMITTED
        meta.meta_update_(symmetric, hs[1:], 1.0, sym_state, _down_config(1.0))
        assert groups[0]["lr"] == theta, k
        assert {k2: state["0/lr"][k2] for k2 in ("m", "v", "t")} == {k2: adam[k2] for k2 in ("m", "v", "t")}
        assert groups[0]["weight_decay"] == symmetric[0]["weight_decay"]
        assert groups[0]["momentum"] == symmetric[0]["momentum"]


def test_lr_down_waits_for_the_end_of_the_fast_phase():
    """During fast start's phase a step down is the full one; after the phase ends, d times it."""
    config = _down_config(0.5, fast_start=0.05)
    groups, state, theta, adam = [{"lr": 1e-3}], {}, 1e-3, {}
    fast = True
    for k, h in enumerate([-1.0] * 10 + [1.0] * 20):
        phi, proposal = _symmetric_phi(theta, h, adam, lr=0.05 if fast else 0.02)
        if not fast and proposal < phi:
            proposal = phi + 0.5 * (proposal - phi)
        theta = meta.from_meta("lr", proposal, "log")
        meta.meta_update_(groups, [(0, "lr", h)], 1.0, state, config)
        assert groups[0]["lr"] == theta, k
        fast = state["0/lr"]["fast"] == 1.0
    assert not fast


@pytest.mark.parametrize("fast_start", [None, 0.05])
def test_lr_down_on_the_device_matches_the_host(fast_start):
    import torch

    config = _down_config(0.5, fast_start=fast_start)
    entries = [(0, "lr"), (0, "weight_decay"), (1, "lr_scale")]
    groups = [{"lr": 1e-3, "weight_decay": 1e-4}, {"lr_scale": 1.0}]
    dm = meta.DeviceMeta(entries, [groups[i][n] for i, n in entries], [{} for _ in entries], config,
                         torch.device("cpu"))
    state = {}
    for k in range(40):
        h = -1.0 if k < 12 else (1.0 if k % 3 else -0.5)
        hs = [h, -h, 0.7 * h]
        meta.meta_update_(groups, [(i, n, v) for (i, n), v in zip(entries, hs)], 1.0, state, config)
        packed = dm.update(torch.tensor(hs, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)).tolist()
        for j, (i, n) in enumerate(entries):
            assert math.isclose(packed[j], groups[i][n], rel_tol=1e-12), (k, n)


def test_lr_down_defaults_and_refusals():
    from ohotorch.options import Options

    assert Options().lr_down == meta.DEFAULT_LR_DOWN[("adam", "log")] == 0.5
    assert Options(meta_optimizer="sgd", space="raw", meta_lr=1e-5).lr_down == 1.0  # the paper's stays symmetric
    assert Options(lr_down=1).lr_down == 1.0
    for bad in (0.0, -0.5, 1.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="Invalid lr_down"):
            Options(lr_down=bad)
    with pytest.raises(TypeError, match="lr_down"):
        Options(lr_down="0.5")
