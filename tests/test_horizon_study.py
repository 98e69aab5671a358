"""The long-horizon research harness (benchmarks/horizon_study.py): its stabilisers are what they claim.

* every switch off: bit-identical to ``ohotorch.OHO`` with the same horizon;
* the growth cap's homogeneous part is exact: with ``growth_cap=0`` (gamma = 0 every step) the full
  horizon collapses to its direct terms, i.e. the greedy horizon's hypergradients, to float64 rounding;
  with a cap that never engages (a huge c) it is the plain full horizon, bit for bit;
* the spike back-off halves lr and zeroes the influence on a non-finite loss;
* the ``--quick`` grid runs end to end and the report script reads its results file.
"""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import horizon_study as hs  # noqa: E402
from ohotorch import OHO  # noqa: E402


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(3, (64,), generator=gen)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    return model, x, y


def _train(opt_factory, steps: int = 12, seed: int = 0):
    model, x, y = _problem(seed)
    opt = opt_factory(model)
    hypers = []
    for t in range(steps):
        xb, yb = x[(t * 8) % 64:(t * 8) % 64 + 16], y[(t * 8) % 64:(t * 8) % 64 + 16]
        xv, yv = x[48:], y[48:]

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            return loss

        def val_closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(xv), yv)
            loss.backward()
            return loss

        opt.step(closure)
        h = opt.hyper_step(val_closure)
        hypers.append({k: float(v) for k, v in h[0].items()})
    return model, opt, hypers


KW = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)


@pytest.mark.parametrize("discount", [0.0, 1.0])
def test_switches_off_is_oho_bit_for_bit(discount):
    m1, o1, h1 = _train(lambda m: OHO(m.parameters(), discount=discount, **KW))
    m2, o2, h2 = _train(lambda m: hs.StableOHO(m.parameters(), discount=discount, **KW))
    assert h1 == h2
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"]


def test_growth_cap_never_engaged_is_full_horizon():
    _, o1, h1 = _train(lambda m: OHO(m.parameters(), discount=1.0, **KW))
    _, o2, h2 = _train(lambda m: hs.StableOHO(m.parameters(), discount=1.0, growth_cap=1e300, **KW))
    # the capped update is split (homogeneous part, then the direct terms): equal to float64 rounding
    for a, b in zip(h1, h2):
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12), (k, a[k], b[k])
    assert o2.study["gamma_applied"] == 0


def test_growth_cap_zero_is_greedy_horizon():
    """gamma = 0 removes the homogeneous part A z exactly: what is left is the direct term, the greedy
    horizon's tangent. Agreement to float64 rounding checks the homogeneous transition computed by the
    growth cap (H w' + wd w' + mu b', then w' - lr b'), since any error in it would survive."""
    _, o1, h1 = _train(lambda m: OHO(m.parameters(), discount=0.0, **KW))
    _, o2, h2 = _train(lambda m: hs.StableOHO(m.parameters(), discount=1.0, growth_cap=0.0, **KW))
    assert o2.study["gamma_applied"] > 0
    for a, b in zip(h1, h2):
        for k in a:
            assert math.isclose(a[k], b[k], rel_tol=1e-9, abs_tol=1e-12), (k, a[k], b[k])
    assert math.isclose(o1.param_groups[0]["lr"], o2.param_groups[0]["lr"], rel_tol=1e-9)


def test_backoff_on_nonfinite_loss_halves_lr_and_zeroes_influence():
    _, opt, _ = _train(lambda m: hs.StableOHO(m.parameters(), discount=1.0, backoff=2.0, **KW), steps=3)
    lr = opt.param_groups[0]["lr"]
    assert any(t.any() for t in opt._tangent_tensors())
    opt._check_spike(float("nan"))
    assert opt.param_groups[0]["lr"] == lr * 0.5
    assert opt.study["backoffs"] == 1
    assert all(not t.any() for t in opt._tangent_tensors())


def test_noisy_small_loss_is_not_a_spike():
    model, _, _ = _problem()
    opt = hs.StableOHO(model.parameters(), discount=1.0, backoff=2.0, **KW)
    gen = torch.Generator().manual_seed(0)
    for t in range(200):  # a minibatch loss around 0.05 that often doubles: noise, not divergence
        opt._bookkeeping.steps = t + 1
        opt._check_spike(0.05 * float(torch.empty(1).exponential_(generator=gen)))
    assert opt.study["backoffs"] == 0
    opt._bookkeeping.steps = 201
    opt._check_spike(2.3)  # a jump to chance is
    assert opt.study["backoffs"] == 1


def test_quick_grid_and_report(tmp_path):
    hs.main(["--quick", "--workers", "1", "--steps", "6", "--tasks", "digits", "--candidates",
             "greedy,full_growth_mlr005_backoff", "--out", str(tmp_path)])
    path = tmp_path / "runs.jsonl"
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    header, runs = lines[0], lines[1:]
    assert header["kind"] == "header" and header["environment"]["torch"] == torch.__version__
    assert not [r for r in runs if "error" in r]
    assert {r["method"] for r in runs} == {"greedy", "full_growth_mlr005_backoff", "fixed", "cosine"}
    assert len(runs) == 2 * 3 + 2 * 5
    for r in runs:
        assert r["steps"] == 6 and len(r["curve"]["lr"]) >= 2 and math.isfinite(r["wall_s"])
    import horizon_report
    summary = horizon_report.summarise(str(path))
    assert set(summary["tasks"]["digits"]["candidates"]) == {"greedy", "full_growth_mlr005_backoff"}
    assert (tmp_path / "lr_trajectories.png").stat().st_size > 0
