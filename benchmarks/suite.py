"""The development suite for tuning quality: does one OHO run match a learning-rate sweep?

For every task of benchmarks/suite_tasks.py (digits MLP and CNN, a data-rich teacher-student ResNet
task, a character-level transformer LM trained with AdamW) it runs, with 3 seeds each:

* the sweep OHO has to match: fixed-lr and cosine-annealed grids (5 lrs) of the task's optimizer
  (SGD momentum 0.9 or AdamW), and an AdamW grid (+ cosine) as a cross-check on the SGD tasks;
* what a user would pick instead of tuning: schedule-free SGD / AdamW (``schedulefree``, library
  defaults: lr 1.0 / 0.0025, 5% warmup) and Prodigy (``prodigyopt``: lr 1, bias correction, safeguard
  warmup, cosine annealing, decoupled weight decay 0.01);
* OHO (``ohotorch.OHO``; ``OHOAdamW`` on AdamW tasks) from three initial lrs spanning 100x, with the
  library's defaults (``oho``) and named variants: ``oho_d09`` (discount 0.9), ``oho_full`` (discount 1,
  the full RTRL horizon), ``oho_paper`` (SGD tasks: full horizon, raw-space SGD meta-update, meta_lr
  1e-4). ``--oho-variant NAME='{"discount": 1.0, ...}'`` adds a method ``oho_NAME`` with those OHO
  keyword arguments; ``--oho-kwargs '{...}'`` adds keyword arguments to every OHO method. Six keys are
  read by the benchmark instead of OHO: ``hyper_every`` (a hyper-step every k steps), ``val_batches``
  (the validation loss of each hyper-step averaged over that many batches), ``schedule``
  (``"cosine"``: a CosineAnnealingLR over the run drives ``lr`` while OHO tunes ``lr_scale``) and
  ``fast_stop_drop`` (a prototype guard for ``fast_start``: the fast phase ends once the training loss,
  an EMA over 10 steps, has fallen that fraction below its first value; host path only) and
  ``fast_stop_growth`` (the prototype of ``fast_start_growth``: the fast phase ends once the value is
  that many times the initial lr; host path only) and ``fast_spike`` (a prototype spike guard for
  ``fast_start``: a hyper-step whose validation loss exceeds that factor times the first hyper-step's, while
  the lr is above its value when the fast phase began, ends the phase and puts the lr back to that value,
  where OHO restarts its meta state; host path only; ``fast_spikes`` in a run's record counts them). A run
  with OHO's ``average`` option is evaluated at the average of its iterates (``opt.averaged()``; with
  BatchNorm, running statistics recomputed for it from 20 training batches and put back afterwards).

Each run is one task in a process pool (``--workers``, default every core; one torch thread each).
The results file holds the configuration, versions, device, and every run with its final test loss,
wall time, final lr / weight decay and trajectories (lr, weight decay, training loss, hyper-step
validation loss, periodic validation / test loss). The summary, printed and written next to it as
Markdown, gives mean +- std over seeds per method and lr, the best fixed and cosine grid points, OHO's
median over its three initial lrs against both, and pass / fail for each goal. Figures:
``python benchmarks/suite_plot.py RESULTS.json``.

    python benchmarks/suite.py --quick --workers 2                # smoke run, well under a minute
    python benchmarks/suite.py                                    # the full suite (~10 min on 16 cores)
    python benchmarks/suite.py --tasks teacher --methods sgd,cosine,oho --seeds 1
    python benchmarks/suite.py --methods oho,oho_mine --oho-variant mine='{"discount": 1.0}'
    python benchmarks/suite.py --summarise benchmarks/results/suite/suite.json   # re-summarise a file
"""
from __future__ import annotations

import argparse
import contextlib
import concurrent.futures as futures
import fnmatch
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

import common  # noqa: E402
import suite_tasks  # noqa: E402

RESULTS_DIR = common.RESULTS_DIR / "suite"

# OHO keyword arguments of each named variant (the library's defaults for "oho")
OHO_VARIANTS: Dict[str, Dict[str, Any]] = {
    "oho": {},
    "oho_d09": {"discount": 0.9},
    "oho_full": {"discount": 1.0},
    "oho_paper": {"discount": 1.0, "meta_optimizer": "sgd", "space": "raw", "meta_lr": 1e-4},
}
SGD_ONLY_VARIANTS = ("oho_paper",)  # the paper's raw-space meta-update is for SGD's lr scale
# variant keys read by the benchmark, not by OHO: hyper-step every N steps, validation batches per hyper-step,
# and "schedule": "cosine" (a CosineAnnealingLR drives group["lr"] to 0 over the run while OHO tunes the
# multiplier lr_scale, and weight decay when the task starts it above 0)
LOOP_KEYS = ("hyper_every", "val_batches", "schedule", "fast_stop_drop", "fast_stop_growth", "fast_spike")

BASELINES_BY_FAMILY = {
    "sgd": ("sgd", "cosine", "adamw", "adamw_cosine", "sf_sgd", "sf_adamw", "prodigy"),
    "adamw": ("adamw", "adamw_cosine", "sf_adamw", "prodigy"),
}
# the grids OHO must match (fixed, cosine) and the schedule-free method a user of the family would pick
GRIDS = {"sgd": ("sgd", "cosine"), "adamw": ("adamw", "adamw_cosine")}
SCHEDULE_FREE = {"sgd": "sf_sgd", "adamw": "sf_adamw"}
PLAIN = {"sgd": "sgd", "adamw": "adamw"}  # one plain run, for the cost ratio
GOAL_RATIO = 1.05
GOAL_COST = 3.3
TRACE_POINTS = 100


# ---------------------------------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------------------------------
def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def build_optimizer(method: str, model: nn.Module, task: suite_tasks.Task, lr: Optional[float],
                    oho_kwargs: Dict[str, Any], schedule: Optional[str] = None) -> Tuple[torch.optim.Optimizer, Any]:
    """The optimizer and per-step lr scheduler (or None) of one method (``schedule="cosine"``: OHO tunes
    ``lr_scale`` under a cosine schedule of ``lr``)."""
    params = list(model.parameters())
    total = task.steps
    cosine = lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)  # noqa: E731
    if method in ("sgd", "cosine"):
        opt = torch.optim.SGD(params, lr=lr, momentum=task.momentum, weight_decay=task.weight_decay)
        return opt, cosine(opt) if method == "cosine" else None
    if method in ("adamw", "adamw_cosine"):
        wd = task.weight_decay if task.family == "adamw" else task.adamw_weight_decay
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=wd)
        return opt, cosine(opt) if method == "adamw_cosine" else None
    if method in ("sf_sgd", "sf_adamw"):
        import schedulefree

        warmup = max(1, total // 20)
        if method == "sf_sgd":
            return schedulefree.SGDScheduleFree(params, lr=1.0, momentum=task.momentum,
                                                weight_decay=task.weight_decay, warmup_steps=warmup), None
        wd = task.weight_decay if task.family == "adamw" else task.adamw_weight_decay
        return schedulefree.AdamWScheduleFree(params, lr=0.0025, weight_decay=wd, warmup_steps=warmup), None
    if method == "prodigy":
        from prodigyopt import Prodigy

        wd = task.weight_decay if task.family == "adamw" else task.adamw_weight_decay
        opt = Prodigy(params, lr=1.0, weight_decay=wd, use_bias_correction=True, safeguard_warmup=True)
        return opt, cosine(opt)
    if method.startswith("oho"):
        ohotorch = common.import_ohotorch()
        module = model if _has_batchnorm(model) else None
        if schedule not in (None, "cosine"):
            raise ValueError(f"Unknown schedule {schedule!r} (known: 'cosine')")
        if schedule == "cosine" and "tune" not in oho_kwargs:
            oho_kwargs = {**oho_kwargs, "tune": ("lr_scale", "weight_decay") if task.weight_decay > 0 else ("lr_scale",)}
        if task.family == "adamw":
            opt = ohotorch.OHOAdamW(params, lr=lr, weight_decay=task.weight_decay, module=module, **oho_kwargs)
        else:
            opt = ohotorch.OHO(params, lr=lr, momentum=task.momentum, weight_decay=task.weight_decay, module=module,
                               **oho_kwargs)
        return opt, cosine(opt) if schedule == "cosine" else None
    raise ValueError(f"Unknown method {method!r}")


def _geo(values: Sequence[float]) -> float:
    positive = [v for v in values if v > 0]
    if not positive:
        return 0.0
    return math.exp(sum(math.log(v) for v in positive) / len(positive))


def effective_hypers(opt: torch.optim.Optimizer) -> Tuple[float, float]:
    """The lr a step uses (Prodigy: d * lr; schedule-free: its warmup-scheduled lr; OHO: lr * lr_scale)
    and the weight decay, as geometric means over param groups."""
    lrs, wds = [], []
    for g in opt.param_groups:
        lr = float(g.get("scheduled_lr", g["lr"]))
        lr *= float(g.get("d", 1.0)) * float(g.get("lr_scale", 1.0))
        lrs.append(lr)
        wds.append(float(g.get("weight_decay", 0.0)))
    return _geo(lrs), _geo(wds)


def _r(x: Optional[float], digits: int = 6) -> Optional[float]:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def _closure(opt: torch.optim.Optimizer, task: suite_tasks.Task, model: nn.Module,
             batches: Sequence[Tuple[torch.Tensor, torch.Tensor]]):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros(())
        for x, y in batches:
            loss = task.loss(model, x, y) / len(batches)
            loss.backward()
            total = total + loss.detach()
        return total
    return closure


def run_one(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Train one model with one method (spec: task, method, lr, seed, quick, oho_kwargs, threads)."""
    torch.set_num_threads(spec.get("threads", 1))
    record: Dict[str, Any] = {k: spec[k] for k in ("task", "method", "lr", "seed")}
    record["family"] = suite_tasks.get_task(spec["task"], spec.get("quick", False)).family
    record["oho_kwargs"] = spec.get("oho_kwargs") or {}
    try:
        record.update(_train(spec))
    except Exception as error:  # a failing method must not take the suite down; it is reported
        record.update(error=f"{type(error).__name__}: {error}", traceback=traceback.format_exc(limit=8),
                      diverged=True, test_loss=None)
    return record


def _train(spec: Dict[str, Any]) -> Dict[str, Any]:
    task = suite_tasks.get_task(spec["task"], spec.get("quick", False))
    method, seed = spec["method"], spec["seed"]
    kwargs = dict(spec.get("oho_kwargs") or {})
    hyper_every = int(kwargs.pop("hyper_every", 1))
    val_batches = int(kwargs.pop("val_batches", 1))
    schedule = kwargs.pop("schedule", None)
    # prototype guard for fast_start (host path only): end the fast phase of every lr once the training
    # loss (EMA over 10 steps) has fallen this fraction below its first value, i.e. at the plateau's exit
    fast_stop_drop = kwargs.pop("fast_stop_drop", None)
    # prototype of fast_start_growth (host path only): end the fast phase of every tuned value once it is
    # this many times the initial lr (the library's option measures from the value at the phase's start)
    fast_stop_growth = kwargs.pop("fast_stop_growth", None)
    # prototype spike guard for fast_start (host path only): a hyper-step validation loss above this factor
    # times the first one, while a value is above its fast phase's start, ends the phase and returns it there
    fast_spike = kwargs.pop("fast_spike", None)
    first_val = None
    spikes = 0
    torch.manual_seed(seed)
    model = task.model_fn()
    model.train()
    opt, scheduler = build_optimizer(method, model, task, spec["lr"], kwargs, schedule)
    is_oho = method.startswith("oho")
    schedule_free = method.startswith("sf_")
    # OHO with average=p tunes for, and is evaluated at, the average of its iterates
    averaged = is_oho and getattr(opt, "average", None) is not None
    train, val = task.train_stream(seed), task.val_stream(seed)
    steps = task.steps
    eval_at = {max(1, round(steps * k / task.evals)) for k in range(1, task.evals + 1)}
    log_every = max(1, steps // TRACE_POINTS)

    trace: Dict[str, List[Any]] = {"step": [], "lr": [], "weight_decay": [], "train_loss": []}
    if is_oho:
        trace["hyper_val_loss"] = []
    evals: Dict[str, List[Any]] = {"step": [], "wall_time": [], "val_loss": [], "test_loss": [], "test_acc": []}

    def evaluate(step: int, wall: float) -> None:
        with opt.averaged() if averaged else contextlib.nullcontext():
            if schedule_free:
                opt.eval()
            if step > 0 and _has_batchnorm(model) and (schedule_free or averaged):
                # the averaged weights need their own BN statistics
                saved = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "batches" in k}
                with torch.no_grad():
                    calib = task.train_stream(seed + 7919)
                    for _ in range(20):
                        model(next(calib)[0])
            val_metrics, test_metrics = task.evaluate(model, "val"), task.evaluate(model, "test")
            if averaged and step > 0 and _has_batchnorm(model):  # the running statistics belong to w
                model.load_state_dict(saved, strict=False)
        if schedule_free:
            opt.train()
        evals["step"].append(step)
        evals["wall_time"].append(_r(wall))
        evals["val_loss"].append(_r(val_metrics["loss"]))
        evals["test_loss"].append(_r(test_metrics["loss"]))
        evals["test_acc"].append(_r(test_metrics["acc"]))

    if schedule_free:
        opt.train()
    evaluate(0, 0.0)
    initial_test_loss = evals["test_loss"][0]
    wall, cpu, diverged = 0.0, 0.0, False
    window, window_n, val_window, val_n = 0.0, 0, 0.0, 0
    step = 0
    ema_loss = first_loss = math.inf  # the fast_stop_drop guard's training-loss EMA and its first value
    start, cpu_start = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        x, y = next(train)
        loss = float(opt.step(_closure(opt, task, model, [(x, y)])))
        if is_oho and (step - 1) % hyper_every == 0:
            batches = [next(val) for _ in range(val_batches)]
            opt.hyper_step(_closure(opt, task, model, batches))
            value = getattr(opt, "diagnostics", {}).get("val_loss")
            if value is not None:
                val_window += float(value)
                val_n += 1
            if fast_spike is not None and value is not None:
                value = float(value)
                if first_val is None:
                    first_val = value
                elif not math.isfinite(value) or value > float(fast_spike) * first_val:
                    for key, state in opt._bookkeeping.meta_state.items():
                        index, name = key.split("/")
                        if "fast" in state and 0.0 < state.get("start", -1.0) < opt.param_groups[int(index)][name]:
                            state["fast"] = 0.0
                            # an outside write: the next hyper-step restarts the meta state from it (with a warning)
                            opt.param_groups[int(index)][name] = float(state["start"])
                            spikes += 1
        if scheduler is not None:
            scheduler.step()
        if fast_stop_growth is not None:
            for key, state in opt._bookkeeping.meta_state.items():
                index, name = key.split("/")
                if "fast" in state and opt.param_groups[int(index)][name] >= float(fast_stop_growth) * spec["lr"]:
                    state["fast"] = 0.0
        if fast_stop_drop is not None and math.isfinite(loss):
            ema_loss = loss if step == 1 else 0.9 * ema_loss + 0.1 * loss
            if step == 1:
                first_loss = ema_loss
            if step > 10 and ema_loss < (1.0 - float(fast_stop_drop)) * first_loss:
                for state in opt._bookkeeping.meta_state.values():
                    if "fast" in state:
                        state["fast"] = 0.0
                fast_stop_drop = None
        window += loss
        window_n += 1
        if not math.isfinite(loss):
            diverged = True
        if step % log_every == 0 or step == steps or diverged:
            lr, wd = effective_hypers(opt)
            trace["step"].append(step)
            trace["lr"].append(_r(lr))
            trace["weight_decay"].append(_r(wd))
            trace["train_loss"].append(_r(window / window_n))
            if is_oho:
                trace["hyper_val_loss"].append(_r(val_window / val_n) if val_n else None)
            window, window_n, val_window, val_n = 0.0, 0, 0.0, 0
        if diverged:
            break
        if step in eval_at:
            wall += time.perf_counter() - start
            cpu += time.process_time() - cpu_start
            evaluate(step, wall)
            start, cpu_start = time.perf_counter(), time.process_time()
    if diverged or step not in eval_at:
        wall += time.perf_counter() - start
        cpu += time.process_time() - cpu_start
    lr, wd = effective_hypers(opt)
    final = {"steps": step, "diverged": diverged, "wall_time_s": _r(wall), "cpu_time_s": _r(cpu), "final_lr": _r(lr),
             "final_weight_decay": _r(wd), "initial_test_loss": initial_test_loss}
    if diverged:
        final.update(test_loss=None, test_acc=None, val_loss=None)
    else:
        final.update(test_loss=evals["test_loss"][-1], test_acc=evals["test_acc"][-1], val_loss=evals["val_loss"][-1])
    if is_oho and hasattr(opt, "counters"):
        final["oho_counters"] = {k: int(v) for k, v in dict(opt.counters).items()}
    if fast_spike is not None:
        final["fast_spikes"] = spikes
    return {**final, "trace": trace, "evals": evals}


# ---------------------------------------------------------------------------------------------------
# The plan: which runs
# ---------------------------------------------------------------------------------------------------
def methods_of(task: suite_tasks.Task, variants: Dict[str, Dict[str, Any]]) -> List[str]:
    oho = [name for name in variants if not (task.family != "sgd" and name in SGD_ONLY_VARIANTS)]
    return list(BASELINES_BY_FAMILY[task.family]) + oho


def lrs_of(method: str, task: suite_tasks.Task) -> List[Optional[float]]:
    if method in ("sgd", "cosine") or (task.family == "adamw" and method in ("adamw", "adamw_cosine")):
        return list(task.grid_lrs)
    if method in ("adamw", "adamw_cosine"):
        return list(task.adamw_lrs)
    if method.startswith("oho"):
        return list(task.oho_lr0s)
    return [None]  # schedule-free and Prodigy: their recommended settings, no lr to choose


def _relative_cost(spec: Dict[str, Any], task: suite_tasks.Task) -> float:
    """A rough cost to start the expensive runs first (better packing of the pool)."""
    kwargs = spec.get("oho_kwargs") or {}
    factor = 1.0
    if spec["method"].startswith("oho"):
        factor = 1.5 if float(kwargs.get("discount", 0.0)) == 0.0 else 3.0
    per_step = {"digits_mlp": 1.0, "digits_cnn": 5.0, "teacher": 4.0, "charlm": 6.0}.get(task.name, 1.0)
    return task.steps * per_step * factor


def plan(args: argparse.Namespace, variants: Dict[str, Dict[str, Any]]) -> List[Dict[str, Any]]:
    specs = []
    for name in args.tasks:
        task = suite_tasks.get_task(name, args.quick)
        for method in methods_of(task, variants):
            if not any(fnmatch.fnmatchcase(method, pattern) for pattern in args.methods):
                continue
            kwargs = {**variants[method], **args.oho_kwargs} if method.startswith("oho") else {}
            for lr in lrs_of(method, task):
                for seed in range(args.seed, args.seed + args.seeds):
                    specs.append({"task": name, "method": method, "lr": lr, "seed": seed, "quick": args.quick,
                                  "oho_kwargs": kwargs, "threads": args.threads})
    specs.sort(key=lambda s: -_relative_cost(s, suite_tasks.get_task(s["task"], args.quick)))
    return specs


# ---------------------------------------------------------------------------------------------------
# Summary
# ---------------------------------------------------------------------------------------------------
def _failed(run: Dict[str, Any]) -> bool:
    """Diverged (non-finite), crashed, or ended no better than it started (stuck at chance)."""
    loss = run.get("test_loss")
    if run.get("diverged") or run.get("error") or loss is None:
        return True
    initial = run.get("initial_test_loss")
    return initial is not None and loss >= 0.9 * initial


def _score(runs: List[Dict[str, Any]]) -> float:
    """Mean final test loss over seeds; a run without a finite loss makes it infinite."""
    losses = [r.get("test_loss") for r in runs]
    if not losses or any(v is None for v in losses):
        return math.inf
    return statistics.fmean(losses)


def _mean_std(values: List[Optional[float]]) -> Tuple[Optional[float], Optional[float]]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    return statistics.fmean(finite), (statistics.stdev(finite) if len(finite) > 1 else None)


def summarise(runs: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Per task: a row per (method, lr), the best grid points, OHO's goals; across tasks: geometric means."""
    tasks: Dict[str, Any] = {}
    for name in dict.fromkeys(r["task"] for r in runs):
        mine = [r for r in runs if r["task"] == name]
        family = mine[0]["family"]
        rows = []
        for method in dict.fromkeys(r["method"] for r in mine):
            for lr in dict.fromkeys(r["lr"] for r in mine if r["method"] == method):
                cell = [r for r in mine if r["method"] == method and r["lr"] == lr]
                mean, std = _mean_std([r.get("test_loss") for r in cell])
                rows.append({
                    "method": method, "lr": lr, "seeds": len(cell), "test_loss": _r(mean), "test_loss_std": _r(std),
                    "score": _r(_score(cell)), "failed": sum(_failed(r) for r in cell),
                    "test_acc": _r(_mean_std([r.get("test_acc") for r in cell])[0]),
                    "wall_time_s": _r(_mean_std([r.get("wall_time_s") for r in cell])[0], 4),
                    "cpu_time_s": _r(_mean_std([r.get("cpu_time_s") for r in cell])[0], 4),
                    "final_lr": _r(_geo([r["final_lr"] for r in cell if r.get("final_lr")])),
                    "final_weight_decay": _r(_geo([r["final_weight_decay"] for r in cell
                                                   if r.get("final_weight_decay")])),
                })
        entry: Dict[str, Any] = {"family": family, "rows": rows}
        fixed, cosine = GRIDS[family]
        for key, grid in (("best_fixed", fixed), ("best_cosine", cosine)):
            points = [row for row in rows if row["method"] == grid]
            if points:
                best = min(points, key=lambda row: row["score"] if row["score"] is not None else math.inf)
                entry[key] = {"method": grid, "lr": best["lr"], "test_loss": best["score"]}
        # cost: CPU time of the training loop (one thread per run), which a shared machine's load does not
        # inflate the way it inflates wall time; the two agree on a dedicated core
        plain = [r.get("cpu_time_s") for r in mine if r["method"] == PLAIN[family] and not r.get("diverged")
                 and r.get("cpu_time_s")]
        entry["plain_cpu_time_s"] = _r(statistics.fmean(plain), 4) if plain else None
        oho = {}
        for method in dict.fromkeys(r["method"] for r in mine if r["method"].startswith("oho")):
            cells = {}
            for lr in dict.fromkeys(r["lr"] for r in mine if r["method"] == method):
                cells[lr] = _score([r for r in mine if r["method"] == method and r["lr"] == lr])
            median = statistics.median(cells.values())
            costs = [r.get("cpu_time_s") for r in mine if r["method"] == method and r.get("cpu_time_s")
                     and not r.get("diverged")]
            result: Dict[str, Any] = {
                "per_lr0": {str(k): _r(v) for k, v in cells.items()}, "median_test_loss": _r(median),
                "failed": sum(_failed(r) for r in mine if r["method"] == method),
                "runs": sum(1 for r in mine if r["method"] == method),
            }
            result["goal_no_failure"] = result["failed"] == 0
            for key in ("best_fixed", "best_cosine"):
                if key in entry and entry[key]["test_loss"] and math.isfinite(median):
                    ratio = median / entry[key]["test_loss"]
                    result[f"ratio_{key}"] = _r(ratio, 4)
                    result[f"goal_{key}"] = ratio <= GOAL_RATIO
            if costs and entry["plain_cpu_time_s"]:
                result["cost_ratio"] = _r(statistics.fmean(costs) / entry["plain_cpu_time_s"], 3)
                result["goal_cost"] = result["cost_ratio"] <= GOAL_COST
            oho[method] = result
        entry["oho"] = oho
        tasks[name] = entry

    # across tasks: geometric mean of each single-run method's test loss (OHO: median over lr0)
    per_method: Dict[str, Dict[str, float]] = {}
    for name, entry in tasks.items():
        for row in entry["rows"]:
            if row["lr"] is None and row["score"] is not None:
                per_method.setdefault(row["method"], {})[name] = row["score"]
        sf = SCHEDULE_FREE[entry["family"]]
        sf_rows = [row for row in entry["rows"] if row["method"] == sf]
        if sf_rows and sf_rows[0]["score"] is not None:
            per_method.setdefault("schedule_free", {})[name] = sf_rows[0]["score"]
        for key in ("best_fixed", "best_cosine"):
            if key in entry:
                per_method.setdefault(key, {})[name] = entry[key]["test_loss"]
        for method, result in entry["oho"].items():
            if result["median_test_loss"] is not None:
                per_method.setdefault(method, {})[name] = result["median_test_loss"]
            else:
                per_method.setdefault(method, {})[name] = math.inf
    all_tasks = list(tasks)
    geo = {}
    for method, values in per_method.items():
        complete = len(values) == len(all_tasks)
        value = math.inf if any(not math.isfinite(v) for v in values.values()) else _geo(list(values.values()))
        geo[method] = {"geomean_test_loss": _r(value), "tasks": sorted(values), "complete": complete}
    for method in (m for m in geo if m.startswith("oho")):
        mine = geo[method]["geomean_test_loss"]
        for rival in ("schedule_free", "prodigy"):
            if rival in geo and geo[method]["complete"] and geo[rival]["complete"]:
                theirs = geo[rival]["geomean_test_loss"]
                geo[method][f"goal_ahead_of_{rival}"] = mine is not None and theirs is not None and mine < theirs
    return {"tasks": tasks, "geomean": geo}


def _fmt(value: Optional[float], spec: str = ".4f") -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def _yes(flag: Optional[bool]) -> str:
    return "-" if flag is None else ("pass" if flag else "FAIL")


def markdown(summary: Dict[str, Any], header: str) -> str:
    """The summary as Markdown tables (what the README shows)."""
    lines = [header, ""]
    for name, entry in summary["tasks"].items():
        lines += [f"### {name} ({entry['family']})", "",
                  "| method | lr (lr0 for OHO) | test loss (mean ± std) | test acc | failed | wall s | cpu s "
                  "| final lr | final wd |", "|---|---|---|---|---|---|---|---|---|"]
        for row in entry["rows"]:
            std = f" ± {row['test_loss_std']:.4f}" if row["test_loss_std"] is not None else ""
            lines.append(f"| {row['method']} | {_fmt(row['lr'], 'g')} | {_fmt(row['test_loss'])}{std} | "
                         f"{_fmt(row['test_acc'], '.3f')} | {row['failed']}/{row['seeds']} | "
                         f"{_fmt(row['wall_time_s'], '.1f')} | {_fmt(row['cpu_time_s'], '.1f')} | "
                         f"{_fmt(row['final_lr'], '.3g')} | "
                         f"{_fmt(row['final_weight_decay'], '.3g')} |")
        lines.append("")
        best = [f"best {k.split('_')[1]} grid point: {v['method']} lr {v['lr']:g}, test loss {_fmt(v['test_loss'])}"
                for k, v in entry.items() if k in ("best_fixed", "best_cosine")]
        lines += ["; ".join(best) + ".", ""]
        lines += ["| OHO method | median test loss over lr0 | vs best fixed | vs best cosine | failed runs "
                  "| cost x plain |", "|---|---|---|---|---|---|"]
        for method, result in entry["oho"].items():
            lines.append(
                f"| {method} | {_fmt(result['median_test_loss'])} | {_fmt(result.get('ratio_best_fixed'), '.3f')} "
                f"{_yes(result.get('goal_best_fixed'))} | {_fmt(result.get('ratio_best_cosine'), '.3f')} "
                f"{_yes(result.get('goal_best_cosine'))} | {result['failed']}/{result['runs']} "
                f"{_yes(result['goal_no_failure'])} | {_fmt(result.get('cost_ratio'), '.2f')} "
                f"{_yes(result.get('goal_cost'))} |")
        lines.append("")
    lines += ["### Geometric mean of the final test loss over tasks", "",
              "| method | geometric mean | tasks | ahead of schedule-free | ahead of Prodigy |",
              "|---|---|---|---|---|"]
    for method, g in summary["geomean"].items():
        lines.append(f"| {method} | {_fmt(g['geomean_test_loss'])} | {len(g['tasks'])} | "
                     f"{_yes(g.get('goal_ahead_of_schedule_free'))} | {_yes(g.get('goal_ahead_of_prodigy'))} |")
    lines += ["", "Failed: diverged (non-finite loss) or final test loss >= 0.9x the initial one. OHO rows: "
              "median over the three initial lrs of the mean over seeds; goals: within "
              f"{GOAL_RATIO}x of the best fixed and cosine grid points, no failed run, at most {GOAL_COST}x the "
              "training time of a plain run (fixed-lr SGD / AdamW), measured as CPU time of one-thread runs."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------
def _json_dict(text: str) -> Dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _variant(text: str) -> Tuple[str, Dict[str, Any]]:
    name, eq, body = text.partition("=")
    if not eq or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=JSON, got {text!r}")
    name = name.strip()
    return (name if name.startswith("oho") else "oho_" + name), _json_dict(body)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=",".join(suite_tasks.TASKS), help="comma list of tasks")
    parser.add_argument("--methods", default="*", help="comma list of methods or patterns (e.g. 'sgd,oho*')")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (1: in this process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run")
    parser.add_argument("--quick", action="store_true", help="tiny tasks, 1 seed, a few steps (smoke test)")
    parser.add_argument("--oho-kwargs", type=_json_dict, default={}, help="JSON object added to every OHO method")
    parser.add_argument("--oho-variant", type=_variant, action="append", default=[],
                        help="NAME=JSON: add method oho_NAME with these OHO keyword arguments (repeatable)")
    parser.add_argument("--no-default-variants", action="store_true",
                        help="run only the library defaults (oho) and the --oho-variant methods")
    parser.add_argument("--out", default="", help="results file (default benchmarks/results/suite/suite[_quick].json)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--summarise", default="", help="re-summarise an existing results file; no training")
    parser.add_argument("--merge", nargs="+", default=[], metavar="RESULTS",
                        help="merge these results files (e.g. one per task) into --out and summarise; no training")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    for name in args.tasks:
        if name not in suite_tasks.TASKS:
            parser.error(f"unknown task {name!r}; choose from {sorted(suite_tasks.TASKS)}")
    args.methods = [m for m in args.methods.split(",") if m]
    if args.quick and "--seeds" not in " ".join(argv if argv is not None else sys.argv):
        args.seeds = 1
    if args.seeds < 1 or args.workers < 1:
        parser.error("--seeds and --workers must be >= 1")
    return args


def _variants(args: argparse.Namespace) -> Dict[str, Dict[str, Any]]:
    variants = {"oho": {}} if args.no_default_variants else dict(OHO_VARIANTS)
    for name, kwargs in args.oho_variant:
        variants[name] = kwargs
    return variants


def _execute(specs: List[Dict[str, Any]], workers: int, progress: bool,
             checkpoint) -> Iterator[Dict[str, Any]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(specs), desc="suite", disable=not progress, dynamic_ncols=True)
    if workers == 1:
        for spec in specs:
            yield run_one(spec)
            bar.update()
    else:
        context = multiprocessing.get_context("spawn")
        with futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            pending = [pool.submit(run_one, spec) for spec in specs]
            for k, done in enumerate(futures.as_completed(pending)):
                record = done.result()
                yield record
                bar.update()
                bar.set_postfix_str(f"{record['task']} {record['method']}", refresh=False)
                if k % 20 == 19:
                    checkpoint()
    bar.close()


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, Path(args.out) if args.out else RESULTS_DIR / "suite.json")
    if args.summarise:
        path = Path(args.summarise)
        payload = json.loads(path.read_text())
        payload["summary"] = summarise(payload["runs"])
        common.write_results(payload, path)
        path.with_suffix(".md").write_text(markdown(payload["summary"], _header(payload)))
        print(markdown(payload["summary"], _header(payload)))
        return payload

    variants = _variants(args)
    specs = plan(args, variants)
    if not specs:
        raise SystemExit("no run matches --tasks / --methods")
    env = common.environment(torch.device("cpu"))
    for name in ("schedulefree", "prodigyopt"):
        env["versions"][name] = common.package_version(name)
    out = Path(args.out) if args.out else RESULTS_DIR / ("suite_quick.json" if args.quick else "suite.json")
    config = {k: v for k, v in vars(args).items() if k not in ("summarise",)}
    config["oho_variant"] = dict(args.oho_variant)
    payload: Dict[str, Any] = {
        "kind": "suite", "config": config, "variants": variants, "environment": env,
        "tasks": {name: suite_tasks.task_summary(suite_tasks.get_task(name, args.quick)) for name in args.tasks},
        "complete": False, "runs": [],
    }
    start = time.perf_counter()

    def checkpoint() -> None:
        payload["total_wall_time_s"] = _r(time.perf_counter() - start, 4)
        common.write_results(payload, out)

    for record in _execute(specs, args.workers, not args.no_progress, checkpoint):
        payload["runs"].append(record)
        if record.get("error") and not args.no_progress:
            print(f"\n{record['task']} {record['method']} lr={record['lr']} seed={record['seed']}: "
                  f"{record['error']}", file=sys.stderr)
    payload["runs"].sort(key=lambda r: (args.tasks.index(r["task"]), r["method"],
                                        r["lr"] if r["lr"] is not None else 0, r["seed"]))
    payload["complete"] = True
    payload["summary"] = summarise(payload["runs"])
    checkpoint()
    text = markdown(payload["summary"], _header(payload))
    out.with_suffix(".md").write_text(text)
    print(text)
    print(f"results: {out} ({payload['total_wall_time_s']:.0f} s, {len(specs)} runs, {args.workers} workers)")
    payload["path"] = str(out)
    return payload


def merge(paths: Sequence[str], out: Path) -> Dict[str, Any]:
    """One results file from several (runs concatenated, each part's configuration kept under "parts")."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    payload = dict(parts[0])
    payload["runs"] = [r for part in parts for r in part["runs"]]
    payload["tasks"] = {k: v for part in parts for k, v in part["tasks"].items()}
    payload["variants"] = {k: v for part in parts for k, v in part["variants"].items()}
    payload["parts"] = []
    for path, part in zip(paths, parts):  # a merged file brings its own parts
        payload["parts"] += part.get("parts") or [{
            "file": Path(path).name, "config": part["config"], "total_wall_time_s": part.get("total_wall_time_s"),
            "environment": part["environment"], "complete": part.get("complete")}]
    payload["complete"] = all(part.get("complete") for part in parts)
    payload["total_wall_time_s"] = _r(sum(part.get("total_wall_time_s") or 0.0 for part in parts), 4)
    payload["summary"] = summarise(payload["runs"])
    common.write_results(payload, out)
    text = markdown(payload["summary"], _header(payload))
    out.with_suffix(".md").write_text(text)
    print(text)
    payload["path"] = str(out)
    return payload


def _header(payload: Dict[str, Any]) -> str:
    env = payload["environment"]
    cfg = payload["config"]
    return (f"## Suite results: {len(payload['runs'])} runs, seeds {cfg['seed']}..{cfg['seed'] + cfg['seeds'] - 1}, "
            f"{cfg['workers']} workers on {env['device_name']} ({env['cpu_count']} cores), "
            f"{payload.get('total_wall_time_s', 0):.0f} s in all{' (quick mode)' if cfg['quick'] else ''}")


if __name__ == "__main__":
    main()
