"""fast_start: the lr's (and lr_scale's) fast first climb and its growth bound, on the host and device
meta-updates, through the optimizer (both paths), state_dict, outside writes and non-finite hyper-steps."""
import contextlib
import copy
import math

import pytest
import torch

import ohotorch
from ohotorch import meta
from ohotorch.options import Options
from helpers import batches, closures, digits, mlp

FAST = 0.05
SLOW = 0.02
CONFIG = meta.MetaConfig(meta_lr={name: SLOW for name in meta.HYPERPARAMETERS}, optimizer="adam",
                         betas=(0.9, 0.999), eps=1e-15, space="log", bounds=dict(meta.DEFAULT_BOUNDS),
                         fast_start=FAST)
# lr climbs for 10 hyper-steps, falls for 12 (crossing 0.9 x its peak on the way), then climbs again
H_SEQUENCE = [-1.0] * 10 + [1.0] * 12 + [-1.0] * 30


def _expected_step(theta, h, adam, lr):
    """The value one log-space meta-Adam step with meta learning rate ``lr`` gives (``adam`` updated)."""
    phi = meta.to_meta("lr", theta, "log")
    new_phi = meta.meta_adam_step(phi, h * meta.meta_derivative("lr", theta, "log"), adam, lr=lr,
                                  betas=CONFIG.betas, eps=CONFIG.eps)
    return meta.project(meta.from_meta("lr", new_phi, "log"), CONFIG.bounds["lr"])


def test_phase_switches_once_when_the_value_first_falls_below_0p9_of_its_peak():
    """Before the switch every step is the fast meta lr's Adam step, after it the configured one's;
    the switch is the first hyper-step whose value is below FAST_START_DROP x the running maximum, and
    the fast phase never returns (the value later climbs past its old peak)."""
    groups = [{"lr": 1e-3, "weight_decay": 1e-4}]
    state, adam = {}, {}
    theta, peak, fast, switched_at = 1e-3, 0.0, True, None
    for k, h in enumerate(H_SEQUENCE):
        expected = _expected_step(theta, h, adam, FAST if fast else SLOW)
        assert meta.meta_update_(groups, [(0, "lr", h)], 1.0, state, CONFIG) == meta.COMMITTED
        assert groups[0]["lr"] == expected, k  # bit for bit: the meta lr of the phase before this step
        theta = expected
        peak = max(peak, theta)
        if fast and theta < meta.FAST_START_DROP * peak:
            fast, switched_at, peak_at_switch = False, k, peak
        elif fast:
            assert theta >= meta.FAST_START_DROP * peak
        assert state["0/lr"]["peak"] == peak and state["0/lr"]["fast"] == float(fast), k
    assert switched_at is not None and 10 < switched_at < 22
    assert groups[0]["lr"] > peak_at_switch and state["0/lr"]["fast"] == 0.0  # climbed past it: still done
    # the first fast steps move phi by the fast meta lr (Adam's first step is lr * sign)
    probe = [{"lr": 1e-3}]
    meta.meta_update_(probe, [(0, "lr", -1.0)], 1.0, {}, CONFIG)
    assert math.log(probe[0]["lr"] + 1e-8) - math.log(1e-3 + 1e-8) == pytest.approx(FAST, rel=1e-9)


def test_other_hyperparameters_and_lr_scale():
    """weight decay and momentum step with meta_lr as without fast_start; lr_scale is fast like lr."""
    start = {"lr_scale": 1.0, "weight_decay": 1e-4, "momentum": 0.5}
    plain = meta.MetaConfig(**{**CONFIG.__dict__, "fast_start": None})
    hs = [(0, name, -1.0) for name in start]
    with_fast, without = [dict(start)], [dict(start)]
    state_fast, state_plain = {}, {}
    meta.meta_update_(with_fast, hs, 1.0, state_fast, CONFIG)
    meta.meta_update_(without, hs, 1.0, state_plain, plain)
    for name in ("weight_decay", "momentum"):
        assert with_fast[0][name] == without[0][name]
        assert state_fast[f"0/{name}"] == state_plain[f"0/{name}"]  # no fast start state either
    assert math.log(with_fast[0]["lr_scale"] + 1e-8) - math.log(1.0 + 1e-8) == pytest.approx(FAST, rel=1e-9)
    assert state_fast["0/lr_scale"]["fast"] == 1.0


def test_none_leaves_values_and_meta_state_as_before():
    """fast_start=None: no new meta state keys; fast_start equal to meta_lr: the same values as None."""
    plain = meta.MetaConfig(**{**CONFIG.__dict__, "fast_start": None})
    same = meta.MetaConfig(**{**CONFIG.__dict__, "fast_start": SLOW})
    runs = []
    for config in (plain, same):
        groups, state = [{"lr": 1e-3, "weight_decay": 1e-4}], {}
        for h in H_SEQUENCE:
            meta.meta_update_(groups, [(0, "lr", h), (0, "weight_decay", -h)], 1.0, state, config)
        runs.append((groups, state))
    assert runs[0][0] == runs[1][0]
    assert set(runs[0][1]["0/lr"]) == {"m", "v", "t", "written"}
    assert set(runs[1][1]["0/lr"]) == {"m", "v", "t", "written", *meta.FAST_START_PHASE_KEYS}


def test_outside_write_restarts_the_moments_and_keeps_the_phase():
    groups, state = [{"lr": 1e-3}], {}
    for h in H_SEQUENCE[:3]:
        meta.meta_update_(groups, [(0, "lr", h)], 1.0, state, CONFIG)
    peak = state["0/lr"]["peak"]
    groups[0]["lr"] = 2e-3  # from outside, above the peak: still fast
    with pytest.warns(UserWarning, match="changed from outside"):
        meta.meta_update_(groups, [(0, "lr", -1.0)], 1.0, state, CONFIG)
    assert state["0/lr"]["t"] == 1.0 and state["0/lr"]["fast"] == 1.0 and state["0/lr"]["peak"] > peak
    assert math.log(groups[0]["lr"] + 1e-8) - math.log(2e-3 + 1e-8) == pytest.approx(FAST, rel=1e-9)
    groups[0]["lr"] = 1e-4  # far below the peak: this hyper-step (still fast) ends the phase
    with pytest.warns(UserWarning, match="changed from outside"):
        meta.meta_update_(groups, [(0, "lr", -1.0)], 1.0, state, CONFIG)
    assert state["0/lr"]["fast"] == 0.0 and state["0/lr"]["t"] == 1.0


def test_meta_state_without_the_phase_counts_as_done():
    """An older checkpoint's meta state (no peak / fast): the configured meta lr from the first step."""
    fresh = meta.fast_start_phase({})
    assert fresh == {"peak": 0.0, "fast": 1.0, "start": -1.0}
    assert meta.fast_start_phase({"m": 0.1, "v": 0.01, "t": 3.0, "written": 1e-3}) == {**fresh, "fast": 0.0}
    groups = [{"lr": 1e-3}]
    state = {"0/lr": {"m": 0.0, "v": 0.0, "t": 0.0, "written": 1e-3}}
    meta.meta_update_(groups, [(0, "lr", -1.0)], 1.0, state, CONFIG)
    assert math.log(groups[0]["lr"] + 1e-8) - math.log(1e-3 + 1e-8) == pytest.approx(SLOW, rel=1e-9)
    assert state["0/lr"]["fast"] == 0.0


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_non_finite_hyper_step_changes_no_phase(bad):
    groups, state = [{"lr": 1e-3}], {}
    for h in H_SEQUENCE[:14]:
        meta.meta_update_(groups, [(0, "lr", h)], 1.0, state, CONFIG)
    before, value = copy.deepcopy(state), groups[0]["lr"]
    assert meta.meta_update_(groups, [(0, "lr", bad)], 1.0, state, CONFIG) == meta.NONFINITE_HYPERGRADIENT
    assert state == before and groups[0]["lr"] == value
    dm = meta.DeviceMeta([(0, "lr")], [value], [before["0/lr"]], CONFIG, torch.device("cpu"))
    rows = dm.state.clone()
    packed = dm.update(torch.tensor([bad], dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)).tolist()
    assert packed[-1] == 0.0 and torch.equal(dm.state, rows)


def test_device_meta_matches_the_host_meta_update():
    """The same hypergradients through meta_update_ and DeviceMeta: the same values (to rounding of
    exp / log), the same peaks and the same phase at every step, through a switch, a frozen value
    (meta_lr = 0), a non-finite step and an outside write."""
    config = meta.MetaConfig(**{**CONFIG.__dict__, "meta_lr": {**CONFIG.meta_lr, "momentum": 0.0},
                                "fast_start_growth": 1.3})  # lr_scale's phase ends by growth, lr's by its turn
    entries = [(0, "lr"), (0, "weight_decay"), (1, "lr_scale"), (1, "momentum")]
    groups = [{"lr": 1e-3, "weight_decay": 1e-4}, {"lr_scale": 1.0, "momentum": 0.9}]
    dm = meta.DeviceMeta(entries, [groups[i][n] for i, n in entries], [{} for _ in entries], config,
                         torch.device("cpu"))
    n, rows = len(entries), len(meta.DeviceMeta.ROWS)
    state, switched = {}, 0
    for k, h in enumerate(H_SEQUENCE):
        hs = [h, -h, 0.5 * h, h]
        loss = math.nan if k == 12 else 1.0
        if k == 25:  # an outside write of lr: the device restarts it and keeps its phase
            groups[0]["lr"] *= 0.5
            dm.restart(0, groups[0]["lr"])
        with pytest.warns(UserWarning) if k == 25 else contextlib.nullcontext():
            outcome = meta.meta_update_(groups, [(i, name, v) for (i, name), v in zip(entries, hs)], loss,
                                        state, config)
        packed = dm.update(torch.tensor(hs, dtype=torch.float64), torch.tensor(loss, dtype=torch.float64)).tolist()
        assert (packed[-1] == 1.0) == (outcome == meta.COMMITTED)
        for j, (i, name) in enumerate(entries):
            assert math.isclose(packed[j], groups[i][name], rel_tol=1e-12), (k, name)
            if config.fast(name):
                saved = state[f"{i}/{name}"]
                for r, key in enumerate(meta.FAST_START_PHASE_KEYS, start=4):
                    assert math.isclose(packed[r * n + j], saved[key], rel_tol=1e-12), (k, name, key)
                assert packed[5 * n + j] == saved["fast"], (k, name)
                switched += saved["fast"] == 0.0
    assert rows == 7 and groups[1]["momentum"] == 0.9 and switched > 0


def _growth_run(hs, growth, start=1e-3):
    """The lr and its phase after each hyper-step with these hypergradients."""
    config = meta.MetaConfig(**{**CONFIG.__dict__, "fast_start_growth": growth})
    groups, state, run = [{"lr": start}], {}, []
    for h in hs:
        assert meta.meta_update_(groups, [(0, "lr", h)], 1.0, state, config) == meta.COMMITTED
        run.append((groups[0]["lr"], dict(state["0/lr"])))
    return run


def test_growth_bound_ends_the_phase_once_the_value_has_grown_f_fold():
    """The lr climbs without turning: the phase ends at the first hyper-step that leaves it at least F
    times its starting value, and the climb goes on at meta_lr from there (never fast again); without
    the bound only a turn would end it."""
    run = _growth_run([-1.0] * 120, 10.0)
    ended = next(k for k, (_, phase) in enumerate(run) if phase["fast"] == 0.0)
    assert run[ended][0] >= 10.0 * 1e-3 > run[ended - 1][0]
    assert all(phase["start"] == 1e-3 for _, phase in run)
    assert all(phase["fast"] == 0.0 for _, phase in run[ended:])
    theta, adam = 1e-3, {}
    for k, (value, _) in enumerate(run):  # bit for bit: the fast meta lr up to the end, meta_lr after it
        theta = _expected_step(theta, -1.0, adam, FAST if k <= ended else SLOW)
        assert value == theta, k
    assert all(phase["fast"] == 1.0 for _, phase in _growth_run([-1.0] * 120, None))


def test_growth_bound_from_zero_and_a_phase_without_start():
    """A value that starts at 0 has no growth factor (the turn alone ends its phase); a meta state with
    the phase but no start (a checkpoint from before the bound) takes its start at the next hyper-step."""
    run = _growth_run([-1.0] * 30, 10.0, start=0.0)
    assert all(phase["fast"] == 1.0 and phase["start"] == 0.0 for _, phase in run)
    groups = [{"lr": 2e-3}]
    state = {"0/lr": {"m": 0.0, "v": 0.0, "t": 0.0, "written": 2e-3, "peak": 2e-3, "fast": 1.0}}
    config = meta.MetaConfig(**{**CONFIG.__dict__, "fast_start_growth": 10.0})
    meta.meta_update_(groups, [(0, "lr", -1.0)], 1.0, state, config)
    assert state["0/lr"]["fast"] == 1.0 and state["0/lr"]["start"] == 2e-3
    assert math.log(groups[0]["lr"] + 1e-8) - math.log(2e-3 + 1e-8) == pytest.approx(FAST, rel=1e-9)


@pytest.mark.parametrize("bad", [1.0, 0.5, 0.0, -2.0, math.inf, math.nan])
def test_bad_growth_bounds_are_refused(bad):
    with pytest.raises(ValueError, match="Invalid fast_start_growth"):
        Options(fast_start_growth=bad)
    with pytest.raises(ValueError, match="Invalid fast_start_growth"):
        ohotorch.OHO(mlp().parameters(), lr=0.01, fast_start=0.05, fast_start_growth=bad)
    with pytest.raises(TypeError, match="fast_start_growth"):
        Options(fast_start_growth="10")
    assert Options(fast_start_growth=None).fast_start_growth is None


@pytest.mark.parametrize("sync_free", [False, True])
def test_growth_bound_through_the_optimizer(sync_free):
    """On digits from a small lr with a fast climb: the phase ends where the lr first reaches 3x its
    start (replayed from the recorded hypergradients), before the climb turns; without the bound the
    climb goes further."""
    runs = {}
    for growth in (3.0, None):
        model = mlp()
        opt = ohotorch.OHO(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-3, fast_start=0.3,
                           fast_start_growth=growth)
        opt._sync_free = sync_free
        hypers = _train(opt, model, 30)
        runs[growth] = (opt.state_dict()["oho"]["meta_state"]["0/lr"], hypers, opt._meta_config())
    saved, hypers, config = runs[3.0]
    groups, state, ended = [{"lr": 1e-3, "weight_decay": 1e-3}], {}, None
    for k, hyper in enumerate(hypers):
        meta.meta_update_(groups, [(0, name, hyper[name]) for name in ("lr", "weight_decay")], 1.0, state, config)
        if ended is None and state["0/lr"]["fast"] == 0.0:
            ended = k
            assert groups[0]["lr"] >= 3e-3 and groups[0]["lr"] >= meta.FAST_START_DROP * state["0/lr"]["peak"]
    assert ended is not None and saved["fast"] == 0.0 and saved["start"] == 1e-3
    for key in meta.FAST_START_PHASE_KEYS:
        assert math.isclose(saved[key], state["0/lr"][key], rel_tol=1e-10), key
    assert runs[None][0]["peak"] > saved["peak"]  # unbounded, the climb went further


@pytest.mark.parametrize("bad", [0.0, -0.05, math.inf, math.nan])
def test_bad_values_are_refused(bad):
    with pytest.raises(ValueError, match="Invalid fast_start"):
        Options(fast_start=bad)
    with pytest.raises(ValueError, match="Invalid fast_start"):
        ohotorch.OHO(mlp().parameters(), lr=0.01, fast_start=bad)


def test_wrong_types_and_meta_optimizers_are_refused():
    for bad in ("0.05", True, torch.tensor(0.05)):
        with pytest.raises(TypeError, match="fast_start"):
            Options(fast_start=bad)
    for kwargs in ({"meta_optimizer": "sgd", "meta_lr": 1e-3}, {"space": "raw", "meta_lr": 1e-3}):
        with pytest.raises(ValueError, match="fast_start needs meta_optimizer='adam', space='log'"):
            ohotorch.OHO(mlp().parameters(), lr=0.01, fast_start=0.05, **kwargs)
    assert Options(fast_start=1).fast_start == 1.0


def test_default_is_on_only_where_a_meta_learning_rate_is_relative():
    """fast_start="auto" (the default): DEFAULT_FAST_START with meta-Adam in log space (with the growth
    bound), off for the paper's raw-space SGD meta-update, which it must not refuse."""
    opt = ohotorch.OHO(mlp().parameters(), lr=0.01)
    assert opt.fast_start == meta.DEFAULT_FAST_START[("adam", "log")] == 0.1 and opt.fast_start_growth == 10.0
    assert ohotorch.OHOAdamW(mlp().parameters(), lr=1e-3).fast_start == 0.1
    paper = ohotorch.OHO(mlp().parameters(), lr=0.01, meta_optimizer="sgd", space="raw", meta_lr=1e-5, discount=1.0)
    assert paper.fast_start is None
    assert ohotorch.OHO(mlp().parameters(), lr=0.01, fast_start=None).fast_start is None
    assert Options().fast_start == 0.1 and Options(meta_optimizer="sgd", meta_lr=1e-3).fast_start is None


def _train(opt, model, steps, start=0, losses=None):
    """``steps`` steps and hyper-steps; the hypergradients (and in ``losses`` the validation losses)."""
    xt, yt, xv, yv = digits()
    evaluate = closures(opt, model, (xv[:128], yv[:128]))

    def val():
        loss = evaluate()
        if losses is not None:
            losses.append(float(loss.detach()))
        return loss

    hypers = []
    for b in batches(xt, yt, 32, start + steps)[start:]:
        opt.step(closures(opt, model, b))
        hypers.append({k: float(v) for k, v in opt.hyper_step(val)[0].items()})
    return hypers


def _make(sync_free=False, **kw):
    model = mlp()
    opt = ohotorch.OHO(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3, fast_start=0.3, **kw)
    opt._sync_free = sync_free
    return model, opt


@pytest.mark.parametrize("sync_free", [False, True])
def test_resume_continues_bit_exactly(sync_free):
    model, opt = _make(sync_free)
    _train(opt, model, 6)
    saved = copy.deepcopy(opt.state_dict())
    assert set(meta.FAST_START_PHASE_KEYS) <= set(saved["oho"]["meta_state"]["0/lr"])
    assert "peak" not in saved["oho"]["meta_state"]["0/weight_decay"]
    model2, opt2 = _make(sync_free)
    model2.load_state_dict(copy.deepcopy(model.state_dict()))
    opt2.load_state_dict(saved)
    _train(opt, model, 6, start=6)
    _train(opt2, model2, 6, start=6)
    assert opt.state_dict()["oho"]["meta_state"] == opt2.state_dict()["oho"]["meta_state"]
    assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_sync_free_settles_the_host_meta_updates_phase():
    """The forced sync-free path (CUDA's, on CPU): its settled values and phase are the host
    meta-update's of the same hypergradients, through the switch."""
    model, opt = _make(sync_free=True)
    losses = []
    hypers = _train(opt, model, 20, losses=losses)
    assert len(losses) == len(hypers)  # one validation evaluation per hyper-step
    settled = opt.state_dict()["oho"]["meta_state"]
    groups, state = [{"lr": 0.01, "weight_decay": 1e-3}], {}
    for hyper, loss in zip(hypers, losses):
        meta.meta_update_(groups, [(0, name, hyper[name]) for name in ("lr", "weight_decay")], loss, state,
                          opt._meta_config())
    assert math.isclose(opt.param_groups[0]["lr"], groups[0]["lr"], rel_tol=1e-10)
    for key in meta.FAST_START_PHASE_KEYS:
        assert math.isclose(settled["0/lr"][key], state["0/lr"][key], rel_tol=1e-10), key
    assert settled["0/lr"]["fast"] == state["0/lr"]["fast"]
    assert set(settled["0/weight_decay"]) == {"m", "v", "t", "written"}


def _resume_alongside(model, opt, saved, steps, start):
    """A sync-free run resumed from ``saved`` (with ``model``'s weights) trained beside the original for
    ``steps`` steps: the same meta state and weights bit for bit. Returns the resumed optimizer."""
    model2, opt2 = _make(sync_free=True)
    model2.load_state_dict(copy.deepcopy(model.state_dict()))
    opt2.load_state_dict(saved)
    _train(opt, model, steps, start=start)
    _train(opt2, model2, steps, start=start)
    assert opt.state_dict()["oho"]["meta_state"] == opt2.state_dict()["oho"]["meta_state"]
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    return opt2


def test_sync_free_outside_write_keeps_the_phase_in_the_checkpoint():
    """An outside write on the sync-free path (with hyper-steps still pending): the saved meta state of
    that value is the device's phase alone (its moments restart), and a resumed run continues exactly."""
    model, opt = _make(sync_free=True)
    _train(opt, model, 4)
    opt.param_groups[0]["lr"] = 0.004  # from outside, before the pending results are read
    with pytest.warns(UserWarning, match="changed from outside"):
        saved = copy.deepcopy(opt.state_dict())
    device_rows = opt._device_meta.state[4:, 0].tolist()
    assert saved["oho"]["meta_state"]["0/lr"] == dict(zip(meta.FAST_START_PHASE_KEYS, device_rows))
    assert device_rows[0] > 0.01 and opt._device_meta.state[3, 0] == 0.0  # a peak kept, the moments restarted
    opt2 = _resume_alongside(model, opt, saved, 5, start=4)
    assert opt.state_dict()["oho"]["meta_state"]["0/lr"]["fast"] == 0.0  # 0.004 < 0.9 x the peak
    # an outside write after loading (the device copy is rebuilt from the checkpoint): the phase stays too
    model3, opt3 = _make(sync_free=True)
    before = copy.deepcopy(opt2.state_dict())
    opt3.load_state_dict(before)
    opt3.param_groups[0]["lr"] = 1e-4
    _train(opt3, model3, 1)
    after = opt3.state_dict()["oho"]["meta_state"]["0/lr"]
    assert after["peak"] == before["oho"]["meta_state"]["0/lr"]["peak"] and after["fast"] == 0.0


def test_sync_free_outside_write_before_the_first_result_keeps_the_phase():
    """An outside write before the value's first deferred result has arrived: the checkpoint still
    carries the device's phase (peak, fast, start), and a run resumed from it continues exactly like
    the uninterrupted one."""
    model, opt = _make(sync_free=True)
    _train(opt, model, 1)
    opt.param_groups[0]["lr"] = 0.004
    with pytest.warns(UserWarning, match="changed from outside"):
        saved = copy.deepcopy(opt.state_dict())
    device_rows = opt._device_meta.state[4:, 0].tolist()
    assert saved["oho"]["meta_state"]["0/lr"] == dict(zip(meta.FAST_START_PHASE_KEYS, device_rows))
    assert device_rows[2] == 0.01  # the start is the initial lr, not the written one
    _resume_alongside(model, opt, saved, 5, start=1)


def test_old_checkpoint_loads_as_done():
    model, opt = _make()
    _train(opt, model, 3)
    saved = copy.deepcopy(opt.state_dict())
    for slot in saved["oho"]["meta_state"].values():
        for key in meta.FAST_START_PHASE_KEYS:
            slot.pop(key, None)
    model2, opt2 = _make()
    opt2.load_state_dict(saved)
    lr = opt2.param_groups[0]["lr"]
    hyper = _train(opt2, model2, 1)[0]
    adam = {k: saved["oho"]["meta_state"]["0/lr"][k] for k in ("m", "v", "t")}
    assert opt2.param_groups[0]["lr"] == _expected_step(lr, hyper["lr"], adam, 0.02)
    assert opt2.state_dict()["oho"]["meta_state"]["0/lr"]["fast"] == 0.0


def test_none_is_bit_identical_through_the_optimizer():
    """fast_start=None against fast_start equal to the default meta_lr: the same run bit for bit, and
    None's state_dict carries no fast start state."""
    runs = []
    for fast in (None, 0.02):
        model = mlp()
        opt = ohotorch.OHO(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-3, fast_start=fast)
        _train(opt, model, 5)
        runs.append((model, opt))
    (m1, o1), (m2, o2) = runs
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"]
    assert set(o1.state_dict()["oho"]["meta_state"]["0/lr"]) == {"m", "v", "t", "written"}
