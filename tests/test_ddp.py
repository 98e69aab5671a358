"""DistributedDataParallel: OHO trains a DDP-wrapped model with no change to the loop.

Two gloo processes on this machine (torch.multiprocessing, start method spawn) each wrap the same
float64 MLP in DDP and see one half of every training and validation batch. DDP averages the gradients
of the two halves, which with cross_entropy's mean reduction is the full-batch gradient, so every
gradient evaluation OHO makes (the training step, the finite-difference HVPs, the validation gradient)
is the full-batch one. After every step both ranks must hold bitwise identical weights,
hyperparameters, hypergradients and tangents, and match a single-process run on the full batches to
float64 tolerance.

One spawn runs every case (process start-up dominates the cost); each rank saves its per-step history
with torch.save and the tests compare the files.
"""
from __future__ import annotations

import datetime
import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ohotorch
from helpers import batches, closures as _closure, digits, mlp

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

WORLD = 2
STEPS = 8
TRAIN_BATCH = 64  # 32 per rank
VAL_BATCH = 128   # 64 per rank
JOIN_TIMEOUT_S = 120

_GREEDY = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
_FULL = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, discount=1.0, hvp="central",
             tune=("lr", "weight_decay", "momentum"))
# plain SGD direction (no momentum, no weight decay: the direction is the gradient itself), forward HVPs
_PLAIN = dict(lr=0.1, discount=1.0, tune=("lr",))
_BUCKET_VIEW = dict(gradient_as_bucket_view=True)  # p.grad is a view into the all-reduce bucket: every
# backward rewrites the same storage, so a gradient kept across closure evaluations must be a copy
# name: (OHO kwargs, DDP kwargs)
CASES = {
    "greedy": (_GREEDY, {}),
    "full_central": (_FULL, {}),
    "full_forward_plain": (_PLAIN, {}),
    "greedy_bucket_view": (_GREEDY, _BUCKET_VIEW),
    "full_central_bucket_view": (_FULL, _BUCKET_VIEW),
    "full_forward_plain_bucket_view": (_PLAIN, _BUCKET_VIEW),
}
HYPERS = ("lr", "weight_decay", "momentum")


def _shard(batch, rank, world):
    x, y = batch
    n = len(x) // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def _snapshot(opt, params):
    def grad(p):
        return None if p.grad is None else p.grad.detach().clone()

    return dict(
        weights=[p.detach().clone() for p in params],
        grads=[grad(p) for p in params],
        tangents=[opt.state[p]["tangent_w"].clone() for p in params],
        hypers=[{n: g[n] for n in HYPERS} for g in opt.param_groups],
    )


def _train(case, rank=None, world=1):
    """The training loop, identical with and without DDP; returns the per-step history."""
    opt_kwargs, ddp_kwargs = CASES[case]
    xt, yt, xv, yv = digits()
    train = batches(xt, yt, TRAIN_BATCH, STEPS, seed=1)
    val = batches(xv, yv, VAL_BATCH, STEPS, seed=2)
    model = mlp()
    net = model
    if rank is not None:
        net = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
        train = [_shard(b, rank, world) for b in train]
        val = [_shard(b, rank, world) for b in val]
    params = list(model.parameters())
    opt = ohotorch.OHO(net.parameters(), **opt_kwargs)
    history = []
    for b, v in zip(train, val):
        loss = opt.step(_closure(opt, net, b))
        after_step = _snapshot(opt, params)
        hyper = opt.hyper_step(_closure(opt, net, v))
        record = _snapshot(opt, params)
        record["loss"] = float(loss.detach())
        record["step_grads"] = after_step["grads"]
        record["step_tangents"] = after_step["tangents"]
        record["hypergradients"] = [{n: float(h) for n, h in d.items()} for d in hyper]
        history.append(record)
    return history


def _worker(rank, world, port, out_dir, cases):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        for case in cases:
            try:
                result = {"history": _train(case, rank, world)}
            except Exception:  # reported by the test of this case; the ranks fail alike, no hang
                result = {"error": traceback.format_exc()}
            torch.save(result, os.path.join(out_dir, f"{case}-rank{rank}.pt"))
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{case: (reference history, [rank 0 result, rank 1 result])}."""
    out_dir = str(tmp_path_factory.mktemp("ddp"))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, WORLD, port, out_dir, list(CASES))) for r in range(WORLD)]
    for p in procs:
        p.start()
    try:
        reference = {case: _train(case) for case in CASES}  # while the workers import torch
        for p in procs:
            p.join(JOIN_TIMEOUT_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join()
    results = {}
    for case in CASES:
        ranks = []
        for r in range(WORLD):
            path = os.path.join(out_dir, f"{case}-rank{r}.pt")
            if not os.path.exists(path):
                codes = [p.exitcode for p in procs]
                pytest.fail(f"rank {r} wrote no result for {case!r} (worker exit codes {codes})")
            ranks.append(torch.load(path, weights_only=False))
        results[case] = (reference[case], ranks)
    return results


def _assert_tensors_close(got, expected, rtol, what):
    for i, (a, b) in enumerate(zip(got, expected)):
        if b is None:
            assert a is None, f"{what}[{i}]: expected None"
            continue
        assert a is not None, f"{what}[{i}] is None"
        scale = float(b.abs().max())
        torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}[{i}]: {m}")


def _assert_ranks_identical(r0, r1, step):
    for key in ("weights", "grads", "tangents", "step_grads", "step_tangents"):
        for i, (a, b) in enumerate(zip(r0[key], r1[key])):
            assert (a is None) == (b is None), f"step {step}: {key}[{i}] None on one rank only"
            if a is not None:
                assert torch.equal(a, b), (f"step {step}: {key}[{i}] differs between ranks by "
                                           f"{float((a - b).abs().max()):.3e}")
    assert r0["hypers"] == r1["hypers"], f"step {step}: hyperparameters differ between ranks"
    assert r0["hypergradients"] == r1["hypergradients"], f"step {step}: hypergradients differ between ranks"


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_two_ranks_match_single_process(runs, case):
    reference, ranks = runs[case]
    for r, result in enumerate(ranks):
        assert "error" not in result, f"rank {r} raised:\n{result['error']}"
    h0, h1 = ranks[0]["history"], ranks[1]["history"]
    assert len(h0) == len(h1) == len(reference) == STEPS
    for t, (r0, r1, ref) in enumerate(zip(h0, h1, reference)):
        _assert_ranks_identical(r0, r1, t)
        # each rank's loss is its half's: their mean is the full batch's
        assert abs((r0["loss"] + r1["loss"]) / 2 - ref["loss"]) <= 1e-12 * abs(ref["loss"]), f"step {t}: loss"
        _assert_tensors_close(r0["weights"], ref["weights"], 1e-9, f"step {t}: weights")
        _assert_tensors_close(r0["step_tangents"], ref["step_tangents"], 1e-7, f"step {t}: tangents")
        for g, (got, exp) in enumerate(zip(r0["hypergradients"], ref["hypergradients"])):
            assert got.keys() == exp.keys()
            for name in exp:
                assert got[name] == pytest.approx(exp[name], rel=1e-7), f"step {t}: hypergradient {g}/{name}"
        for g, (got, exp) in enumerate(zip(r0["hypers"], ref["hypers"])):
            for name in HYPERS:
                assert got[name] == pytest.approx(exp[name], rel=1e-7), f"step {t}: {g}/{name}"
        # step() leaves the training gradient in p.grad, and hyper_step() leaves p.grad as it found it
        _assert_tensors_close(r0["step_grads"], ref["step_grads"], 1e-9, f"step {t}: p.grad after step")
        _assert_tensors_close(r0["grads"], ref["grads"], 1e-9, f"step {t}: p.grad after hyper_step")
    # the hyperparameters did move (the meta-update ran on both ranks alike)
    tuned = CASES[case][0].get("tune", ("lr", "weight_decay"))
    for name in tuned:
        assert h0[-1]["hypers"][0][name] != CASES[case][0][name]
