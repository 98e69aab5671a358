r"""Research harness: can the long (full RTRL) horizon be made stable, and does it then beat greedy?

Self-contained (it needs only torch, scikit-learn and ohotorch), so that one batched grid can run on a
many-core machine with one process per run. Two tasks that show the two known failures:

* ``teacher``: data-rich, optimisation-limited classification. A fixed random CNN teacher labels fresh
  Gaussian 12x12 images (a new batch every step, no example seen twice), a small CNN student learns it
  with SGD momentum 0.9. More progress per step wins, so the best lr is large and the greedy one-step
  horizon (short-horizon bias) drives lr down.
* ``digits``: scikit-learn's digits (997 train / 300 val / 500 test), the 4-layer 128-unit ReLU MLP,
  where small data makes the greedy bias act as regularisation.

Candidates for a stable long horizon, each a switch on :class:`StableOHO` (a subclass of the current
``ohotorch.OHO`` that only uses its protected hooks, so it can be ported into the core):

(a) ``growth_cap=c``: adaptive discount from the influence's own growth. With the HVP the full horizon
    already computes, the homogeneous transition :math:`A_t z` of the tangent state
    :math:`z = (\dot w, \eta \dot b)` (SGD momentum: :math:`\dot b_h = \mu \dot b + H\dot w + \lambda \dot w`,
    :math:`\dot w_h = \dot w - \eta \dot b_h`) gives the per-step growth :math:`\rho_t = \lVert A_t z\rVert /
    \lVert z\rVert`; an EMA of :math:`\log\rho_t` (heavy-ball transients average out) sets
    :math:`\gamma_t = \min(1, c / e^{\overline{\log\rho}})` and the update becomes
    :math:`z_{t+1} = \gamma_t A_t z_t + c_t` (the direct term undiscounted). Full horizon wherever the
    dynamics contract; never exponential growth faster than :math:`c` per step. Now the core option
    ``growth_cap`` of ``ohotorch.OHO`` (``ohotorch/growth_cap.py``), which this class passes through.
(b) ``curvature_cap=c``: a persistent power iteration on the training Hessian (one extra finite-difference
    HVP every ``curvature_every`` steps) estimates :math:`\lambda_{max}`; lr is kept below
    :math:`c \cdot 2(1+\mu)/(\lambda_{max} + \lambda_{wd})`, the heavy-ball stability threshold.
(c) ``backoff=f``: a training loss above ``f`` times its EMA (or non-finite) halves lr and zeroes the
    influence.
(d) ``clip=k``: each hypergradient is clipped to ``k`` times its running RMS before the meta-update
    (one outlier validation batch cannot inflate meta-Adam's second moment).
(e) combinations, and ``hyper_every=k`` (a hyper-step every k steps).

    python benchmarks/horizon_study.py --quick                 # a smoke run (seconds)
    python benchmarks/horizon_study.py --workers 16 --out DIR  # the grid (one process per run)
    python benchmarks/horizon_study.py --summarise FILE.jsonl  # tables + figure from a results file
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from ohotorch import OHO, influence  # noqa: E402
from ohotorch.finite_differences import BufferSnapshot, RNGSnapshot, relative_step  # noqa: E402
from ohotorch.growth_cap import GROWTH_BETA  # noqa: E402

__all__ = ["StableOHO", "CANDIDATES", "TASKS", "run_one"]


# ---------------------------------------------------------------------------------------------------
# The candidate pieces, on top of the current OHO
# ---------------------------------------------------------------------------------------------------
class StableOHO(OHO):
    """``OHO`` with switchable stabilisers for long horizons (see the module docstring).

    Study code: one param group, SGD momentum without nesterov / dampening (what the study runs).
    """

    def __init__(self, params, *, growth_cap: Optional[float] = None, growth_beta: float = 0.9,
                 curvature_cap: Optional[float] = None, curvature_every: int = 10, curvature_beta: float = 0.9,
                 backoff: Optional[float] = None, backoff_rule: str = "ratio_and_z", clip: Optional[float] = None,
                 **kwargs: Any) -> None:
        super().__init__(params, growth_cap=growth_cap, **kwargs)
        if len(self.param_groups) != 1:
            raise ValueError("StableOHO (study code) supports one param group")
        group = self.param_groups[0]
        if group["nesterov"] or group["dampening"] != 0:
            raise ValueError("StableOHO (study code) supports SGD momentum without nesterov or dampening")
        if growth_beta != GROWTH_BETA:
            raise ValueError(f"growth_beta: the core's growth cap uses {GROWTH_BETA}")
        self.curvature_cap, self.curvature_every, self.curvature_beta = curvature_cap, curvature_every, curvature_beta
        if backoff_rule not in ("ratio", "ratio_and_z"):
            raise ValueError(f"Invalid backoff_rule: {backoff_rule!r}")
        self.backoff, self.backoff_rule, self.clip = backoff, backoff_rule, clip
        self.study: Dict[str, Any] = {"log_growth": {}, "gamma_min": 1.0, "gamma_applied": 0, "lam": None,
                                      "cap_engaged": 0, "backoffs": 0, "clipped": 0, "h_sq": {}, "h_n": {},
                                      "loss_ema": None, "extra_grads": 0}
        self._probe: Optional[List[torch.Tensor]] = None

    # (a) ------------------------------------------------------------------------------------------
    # The growth cap is the core option ``growth_cap`` of ohotorch.OHO (ohotorch/growth_cap.py), ported
    # from this class; the study keeps only its statistics (gamma per tangent and step, from the
    # diagnostics, and the final log-growth EMA).
    def _note_growth(self) -> None:
        gammas = self.diagnostics.get("growth_gamma") or {}
        for gamma in gammas.values():
            if gamma < 1.0:
                self.study["gamma_applied"] += 1
                self.study["gamma_min"] = min(self.study["gamma_min"], gamma)
        ema = self._bookkeeping.growth_ema
        if ema is not None:
            self.study["log_growth"] = dict(enumerate(ema.tolist()))

    # (b) ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _power_iteration(self, closure) -> None:
        """One power-iteration step H v (forward finite difference) on the current batch."""
        params = [p for p in self.param_groups[0]["params"] if p.requires_grad]
        if self._probe is None:
            gen = torch.Generator().manual_seed(1234)
            self._probe = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
        v = self._probe
        stashed = [p.grad for p in params]
        rng = RNGSnapshot().capture()
        buffers = BufferSnapshot(self.module.buffers()) if self.module is not None else None
        saved = [p.detach().clone() for p in params]
        vnorm = math.sqrt(sum(float(t.pow(2).sum()) for t in v))
        wnorm = math.sqrt(sum(float(t.pow(2).sum()) for t in saved))
        eps = relative_step(torch.float32, "forward") * (1.0 + wnorm) / vnorm

        def grad_at(shift: float) -> List[torch.Tensor]:
            for p, s, t in zip(params, saved, v):
                p.copy_(s).add_(t, alpha=shift)
            rng.restore()
            if buffers is not None:
                buffers.restore()
            for p in params:
                p.grad = None
            with torch.enable_grad():
                closure()
            return [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]

        try:
            g0 = grad_at(0.0)
            g1 = grad_at(eps)
        finally:
            for p, s, gr in zip(params, saved, stashed):
                p.copy_(s)
                p.grad = gr
            rng.restore()
            if buffers is not None:
                buffers.restore()
        self.study["extra_grads"] += 2
        hv = [(a - b) / eps for a, b in zip(g1, g0)]
        lam = sum(float((a * b).sum()) for a, b in zip(v, hv)) / (vnorm * vnorm)
        hnorm = math.sqrt(sum(float(t.pow(2).sum()) for t in hv))
        if not (math.isfinite(lam) and math.isfinite(hnorm)) or hnorm == 0.0:
            return
        self._probe = [t / hnorm for t in hv]
        old = self.study["lam"]
        self.study["lam"] = lam if old is None else self.curvature_beta * old + (1 - self.curvature_beta) * lam

    def _tangent_tensors(self) -> List[torch.Tensor]:
        return influence.tangent_tensors(list(self.state.values()))

    def _zero_influence(self) -> None:
        influence.zero_tangents_(list(self.state.values()))

    def _set_lr(self, value: float) -> None:
        group = self.param_groups[0]
        group["lr"] = value
        state = self._bookkeeping.meta_state.get("0/lr")
        if state is not None:
            state["written"] = value

    def _apply_curvature_cap(self) -> None:
        lam = self.study["lam"]
        if self.curvature_cap is None or lam is None or lam <= 0.0:
            return
        group = self.param_groups[0]
        limit = self.curvature_cap * 2.0 * (1.0 + group["momentum"]) / (lam + group["weight_decay"])
        if group["lr"] > limit:
            self.study["cap_engaged"] += 1
            self._set_lr(limit)

    # (c) + step --------------------------------------------------------------------------------
    def step(self, closure=None):  # type: ignore[override]
        if self.curvature_cap is not None and self._bookkeeping.steps % self.curvature_every == 0:
            self._power_iteration(closure)
            self._apply_curvature_cap()
        loss = super().step(closure)
        if self.growth_cap is not None:
            self._note_growth()
        if self.backoff is not None and loss is not None:
            self._check_spike(float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss))
        return loss

    def _check_spike(self, value: float) -> None:
        """(c) A spike is a non-finite loss, or one above both ``backoff`` times the loss EMA and the EMA
        plus 6 of its running standard deviations (a noisy minibatch loss at a small EMA is not a
        spike). A spike halves lr and zeroes the influence; detection then rests for 20 steps.
        ``backoff_rule="ratio"`` is the first rule measured (ratio alone, no rest), kept to reproduce
        the first grid: it fires on ordinary minibatch noise once the loss is small."""
        if self.backoff_rule == "ratio":
            self._check_spike_ratio(value)
            return
        s = self.study
        ema, var = s["loss_ema"], s.get("loss_var", 0.0)
        steps = self._bookkeeping.steps
        resting = steps < s.get("rest_until", 0)
        spike = not math.isfinite(value) or (
            ema is not None and not resting and steps > 50 and value > self.backoff * ema
            and value > ema + 6.0 * math.sqrt(var))
        if spike:
            s["backoffs"] += 1
            s["rest_until"] = steps + 20
            self._set_lr(self.param_groups[0]["lr"] * 0.5)
            self._zero_influence()
        elif math.isfinite(value):
            if ema is None:
                s["loss_ema"], s["loss_var"] = value, 0.0
            else:
                delta = value - ema
                s["loss_ema"] = ema + 0.05 * delta
                s["loss_var"] = 0.95 * (var + 0.05 * delta * delta)

    def _check_spike_ratio(self, value: float) -> None:
        ema = self.study["loss_ema"]
        spike = not math.isfinite(value) or (ema is not None and self._bookkeeping.steps > 20 and value > self.backoff * ema)
        if spike:
            self.study["backoffs"] += 1
            self._set_lr(self.param_groups[0]["lr"] * 0.5)
            self._zero_influence()
        elif math.isfinite(value):
            self.study["loss_ema"] = value if ema is None else 0.95 * ema + 0.05 * value

    # (d) ------------------------------------------------------------------------------------------
    def _hypergradient(self, val_closure):
        hyper, loss = super()._hypergradient(val_closure)
        if self.clip is None:
            return hyper, loss
        for g, d in enumerate(hyper):
            for name, h in list(d.items()):
                key = f"{g}/{name}"
                value = float(h)
                if not math.isfinite(value):
                    continue
                n = self.study["h_n"].get(key, 0)
                sq = self.study["h_sq"].get(key, 0.0)
                if n >= 10:
                    bound = self.clip * math.sqrt(sq)
                    if abs(value) > bound:
                        self.study["clipped"] += 1
                        value = math.copysign(bound, value)
                        d[name] = torch.as_tensor(value, dtype=h.dtype, device=h.device)
                beta = 0.99 if n >= 10 else 1.0 - 1.0 / (n + 1)
                self.study["h_sq"][key] = beta * sq + (1 - beta) * value * value
                self.study["h_n"][key] = n + 1
        return hyper, loss


# ---------------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------------
class Teacher:
    """Fresh images labelled by a fixed random linear teacher, with a margin.

    Images: N(0, 1) 1x12x12 noise blurred by a Gaussian kernel (sigma 1.5 pixels) and rescaled to unit
    variance: neighbouring pixels are strongly correlated, so the input covariance, and with it the
    loss, is ill-conditioned (slow low-curvature directions, where only a large lr makes progress).
    Labels: argmax of a fixed random linear map, keeping only images whose top-two teacher logits
    differ by more than the median gap, so the labels are learnable to near-zero loss and SGD noise
    vanishes near the optimum: progress per step decides the result. Logits are centred per class on a
    large sample (balanced classes). Every training and validation batch is fresh; test set: 4096
    fixed images."""

    side, classes = 12, 10

    def __init__(self, data_seed: int = 0, sigma: float = 1.5) -> None:
        gen = torch.Generator().manual_seed(1000 + data_seed)
        r = torch.arange(-4, 5, dtype=torch.float32)
        k = torch.exp(-r * r / (2 * sigma * sigma))
        self.kernel = (k[:, None] * k[None, :] / k.sum() ** 2)[None, None]
        self.weight = torch.randn(self.side * self.side, self.classes, generator=gen)
        with torch.no_grad():
            x = self._images(20000, gen, calibrate=True)
            logits = x.flatten(1) @ self.weight
            self.centre = logits.mean(0)
            self.scale = logits.std(0)
            top = ((logits - self.centre) / self.scale).topk(2, dim=1).values
            self.margin = float((top[:, 0] - top[:, 1]).median())
        self.test = self.sample(4096, torch.Generator().manual_seed(2000 + data_seed))

    def _images(self, n: int, gen: torch.Generator, calibrate: bool = False) -> torch.Tensor:
        x = torch.randn(n, 1, self.side, self.side, generator=gen)
        x = F.conv2d(x, self.kernel, padding=4)
        if calibrate:
            self.std = float(x.std())
        return x / self.std

    @torch.no_grad()
    def sample(self, n: int, gen: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
        xs, ys, have = [], [], 0
        while have < n:
            x = self._images(2 * n, gen)
            z = (x.flatten(1) @ self.weight - self.centre) / self.scale
            top = z.topk(2, dim=1).values
            keep = (top[:, 0] - top[:, 1]) > self.margin
            xs.append(x[keep])
            ys.append(z[keep].argmax(1))
            have += int(keep.sum())
        return torch.cat(xs)[:n], torch.cat(ys)[:n]


def student_cnn(batchnorm: bool = True) -> nn.Module:
    """Two conv blocks (8, 16 channels; BatchNorm by default), a hidden layer of 64, the classifier."""
    norm = (lambda c: nn.BatchNorm2d(c)) if batchnorm else (lambda c: nn.Identity())
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), norm(8), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), norm(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 9, 64), nn.ReLU(), nn.Linear(64, 10))


def digits_mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


class TeacherTask:
    name = "teacher"

    def __init__(self, steps: int, batch: int = 64, val_batch: int = 128, sigma: float = 1.5) -> None:
        self.data = Teacher(sigma=sigma)
        self.steps, self.batch, self.val_batch = steps, batch, val_batch
        self.model_fn = student_cnn

    def streams(self, seed: int):
        train = torch.Generator().manual_seed(10_000 + seed)
        val = torch.Generator().manual_seed(20_000 + seed)
        return (lambda: self.data.sample(self.batch, train)), (lambda: self.data.sample(self.val_batch, val))

    def test(self):
        return self.data.test


class DigitsTask:
    name = "digits"

    def __init__(self, steps: int, batch: int = 50, val_batch: int = 100) -> None:
        from sklearn.datasets import load_digits
        bunch = load_digits()
        x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(bunch.target, dtype=torch.int64)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
        val, test, train = perm[:300], perm[300:800], perm[800:]
        self.train, self.val, self.test_set = (x[train], y[train]), (x[val], y[val]), (x[test], y[test])
        self.steps, self.batch, self.val_batch = steps, batch, val_batch
        self.model_fn = digits_mlp

    def streams(self, seed: int):
        gen = torch.Generator().manual_seed(10_000 + seed)
        vgen = torch.Generator().manual_seed(20_000 + seed)
        n = len(self.train[1])
        order: List[torch.Tensor] = []

        def train_batch():
            if len(order) == 0 or order[0].numel() < self.batch:
                order[:] = [torch.randperm(n, generator=gen)]
            idx, order[0] = order[0][:self.batch], order[0][self.batch:]
            return self.train[0][idx], self.train[1][idx]

        def val_batch():
            idx = torch.randint(len(self.val[1]), (self.val_batch,), generator=vgen)
            return self.val[0][idx], self.val[1][idx]

        return train_batch, val_batch

    def test(self):
        return self.test_set


TASKS = {"teacher": lambda steps: TeacherTask(steps or 1500),
         "teacher_s25": lambda steps: TeacherTask(steps or 2000, sigma=2.5),
         "teacher_s35": lambda steps: TeacherTask(steps or 2000, sigma=3.5), "digits": lambda steps: DigitsTask(steps or 1000)}

# name -> StableOHO keyword arguments (+ "hyper_every"): the candidates for the default SGD OHO.
CANDIDATES: Dict[str, Dict[str, Any]] = {
    "greedy": {"discount": 0.0},
    "full": {"discount": 1.0},
    "full_growth": {"discount": 1.0, "growth_cap": 1.0},
    "full_backoff": {"discount": 1.0, "backoff": 2.0, "backoff_rule": "ratio"},
    "full_clip": {"discount": 1.0, "clip": 3.0},
    "full_growth_clip": {"discount": 1.0, "growth_cap": 1.0, "clip": 3.0},
    "full_all": {"discount": 1.0, "growth_cap": 1.0, "curvature_cap": 0.8, "backoff": 2.0, "backoff_rule": "ratio",
                 "clip": 3.0},
    "full_growth_mlr005": {"discount": 1.0, "growth_cap": 1.0, "meta_lr": 0.005},
    "full_all_every5": {"discount": 1.0, "growth_cap": 1.0, "curvature_cap": 0.8, "backoff": 2.0,
                        "backoff_rule": "ratio", "clip": 3.0, "hyper_every": 5},
    "full_curv": {"discount": 1.0, "curvature_cap": 0.8},
    "full_ref_fd": {"discount": 1.0, "hvp": "central", "fd_rel": 1e-3},
    "discount0.9": {"discount": 0.9},
    # follow-ups (after the first grid): the spike rule above replaced "loss > 2 x EMA", which fired
    # on ordinary minibatch noise once the loss was small and drove lr to ~0.
    "full_growth_backoff": {"discount": 1.0, "growth_cap": 1.0, "backoff": 2.0},
    "full_growth_mlr01": {"discount": 1.0, "growth_cap": 1.0, "meta_lr": 0.01},
    "full_growth_mlr005_backoff": {"discount": 1.0, "growth_cap": 1.0, "meta_lr": 0.005, "backoff": 2.0},
}

GRID_LRS = (0.003, 0.01, 0.03, 0.1, 0.3)
OHO_LRS = (1e-3, 1e-2, 1e-1)


def _chance(y: torch.Tensor) -> float:
    p = torch.bincount(y, minlength=10).double() / len(y)
    p = p[p > 0]
    return float(-(p * p.log()).sum())


@torch.no_grad()
def _test_loss(model: nn.Module, xy) -> Tuple[float, float]:
    x, y = xy
    model.eval()
    out = model(x)
    model.train()
    return float(F.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def run_one(task_name: str, method: str, lr0: float, seed: int, steps: int = 0,
            options: Optional[Dict[str, Any]] = None, weight_decay: float = 1e-4, momentum: float = 0.9,
            points: int = 60) -> Dict[str, Any]:
    """One training run; ``method`` is "fixed", "cosine" or a key of :data:`CANDIDATES` (or "oho" with
    ``options``). Returns a JSON-able record."""
    torch.set_num_threads(1)
    task = TASKS[task_name](steps)
    torch.manual_seed(seed)
    model = task.model_fn()
    train_batch, val_batch = task.streams(seed)
    options = dict(CANDIDATES[method] if method in CANDIDATES else (options or {}))
    hyper_every = int(options.pop("hyper_every", 1))
    tuned = method not in ("fixed", "cosine")
    if tuned:
        opt = StableOHO(model.parameters(), lr=lr0, momentum=momentum, weight_decay=weight_decay, module=model,
                        **options)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr0, momentum=momentum, weight_decay=weight_decay)
    record_every = max(1, task.steps // points)
    curve: Dict[str, List[float]] = {"step": [], "lr": [], "weight_decay": [], "train_loss": []}
    diverged_at = None
    loss_ema = None
    start = time.perf_counter()
    for t in range(task.steps):
        x, y = train_batch()
        if method == "cosine":
            opt.param_groups[0]["lr"] = lr0 * 0.5 * (1.0 + math.cos(math.pi * t / task.steps))

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        value = float(loss.detach())
        if tuned and (t + 1) % hyper_every == 0:
            xv, yv = val_batch()

            def val_closure():
                opt.zero_grad()
                loss = F.cross_entropy(model(xv), yv)
                loss.backward()
                return loss

            opt.hyper_step(val_closure)
        loss_ema = value if loss_ema is None or not math.isfinite(loss_ema) else 0.9 * loss_ema + 0.1 * value
        if t % record_every == 0 or t == task.steps - 1:
            curve["step"].append(t)
            curve["lr"].append(float(opt.param_groups[0]["lr"]))
            curve["weight_decay"].append(float(opt.param_groups[0]["weight_decay"]))
            curve["train_loss"].append(loss_ema)
        if not math.isfinite(value) or not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
            diverged_at = t
            break
    wall = time.perf_counter() - start
    test = task.test()
    chance = _chance(test[1])
    if diverged_at is None:
        test_loss, test_acc = _test_loss(model, test)
    else:
        test_loss, test_acc = float("nan"), float("nan")
    at_chance = not math.isfinite(test_loss) or test_loss >= 0.95 * chance
    record = {
        "task": task_name, "method": method, "options": options, "hyper_every": hyper_every, "lr0": lr0,
        "seed": seed, "steps": task.steps, "test_loss": test_loss, "test_acc": test_acc, "chance_loss": chance,
        "diverged": at_chance, "diverged_at": diverged_at, "wall_s": wall,
        "final_lr": float(opt.param_groups[0]["lr"]),
        "final_weight_decay": float(opt.param_groups[0]["weight_decay"]), "curve": curve,
    }
    if tuned:
        study = dict(opt.study)
        study.pop("h_sq"), study.pop("h_n")
        study["log_growth"] = {str(k): v for k, v in study["log_growth"].items()}
        record["study"] = study
        record["counters"] = opt.counters
        record["influence_norm"] = opt.diagnostics.get("influence_norm")
    return record


def jobs(tasks: Sequence[str], candidates: Sequence[str], seeds: int, grids: bool) -> List[Dict[str, Any]]:
    """Grids first (cheap, the reference), then the candidates in the order given (priority)."""
    out = []
    if grids:
        for kind in ("fixed", "cosine"):
            for task in tasks:
                for lr0 in GRID_LRS:
                    for seed in range(seeds):
                        out.append(dict(task_name=task, method=kind, lr0=lr0, seed=seed))
    for cand in candidates:
        for task in tasks:
            for lr0 in OHO_LRS:
                for seed in range(seeds):
                    out.append(dict(task_name=task, method=cand, lr0=lr0, seed=seed))
    return out


_DEADLINE = [math.inf]  # perf_counter time after which queued jobs are skipped (set by run_grid)


def _worker(job: Dict[str, Any]) -> Dict[str, Any]:
    if time.perf_counter() > _DEADLINE[0]:
        return {**job, "error": "skipped: past the grid's time budget"}
    try:
        return run_one(**job)
    except Exception as exc:  # a failed run is a result too (reported, never silently dropped)
        return {**job, "error": repr(exc)}


def environment() -> Dict[str, Any]:
    import ohotorch
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")), cpu)
    except OSError:
        pass
    return {"torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "threads_per_run": 1, "platform": platform.platform(),
            "ohotorch_file": ohotorch.__file__}


def run_grid(args) -> str:
    import multiprocessing as mp
    tasks = args.tasks.split(",")
    candidates = args.candidates.split(",") if args.candidates else list(CANDIDATES)
    todo = jobs(tasks, candidates, args.seeds, not args.no_grids)
    for j in todo:
        if args.steps:
            j["steps"] = args.steps
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "runs.jsonl")
    header = {"kind": "header", "config": vars(args), "environment": environment(), "jobs": len(todo),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with open(path, "w") as f:
        f.write(json.dumps(header) + "\n")
    start = time.perf_counter()
    if args.budget_s:
        _DEADLINE[0] = start + args.budget_s
    ctx = mp.get_context("fork")
    with ctx.Pool(args.workers) as pool, open(path, "a") as f:
        for rec in pool.imap_unordered(_worker, todo):
            f.write(json.dumps(rec) + "\n")
            f.flush()
            print(f"{time.perf_counter() - start:7.1f}s {rec.get('task')} {rec.get('method'):18s} "
                  f"lr0={rec.get('lr0'):<6g} s{rec.get('seed')} test {rec.get('test_loss', float('nan')):.4f} "
                  f"lr {rec.get('final_lr', float('nan')):.4g} wall {rec.get('wall_s', 0):.1f}s "
                  f"{rec.get('error', '')}", flush=True)
    return path


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="teacher,digits")
    parser.add_argument("--candidates", default="")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=0, help="0: each task's default")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 0))
    parser.add_argument("--no-grids", action="store_true")
    parser.add_argument("--budget-s", type=float, default=0.0, help="skip jobs not started within this time")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "horizon"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 30 steps, 1 seed, 2 candidates")
    parser.add_argument("--summarise", default="", help="a runs.jsonl: print tables, write summary + figure")
    args = parser.parse_args(argv)
    if args.summarise:
        from horizon_report import summarise  # type: ignore
        summarise(args.summarise)
        return
    if args.quick:
        args.steps, args.seeds = args.steps or 30, 1
        args.candidates = args.candidates or "greedy,full_all"
        args.out = args.out if args.out != parser.get_default("out") else os.path.join(args.out, "quick")
    print(run_grid(args))


if __name__ == "__main__":
    main()
