"""Training: closures, evaluation, the Recorder and :func:`run_method`."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .config import TrainConfig
from .data import Data
from .optimizers import HYPER_NAMES, build_optimizer, group_names, hyperparameters, parse_method
from .results import _round
from .runtime import import_ohotorch, resolve_device, seed_everything


def to_device(batch: Sequence[torch.Tensor], device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def autocast(device: torch.device, enabled: bool) -> Any:
    return torch.autocast(device.type, dtype=torch.bfloat16) if enabled else nullcontext()


def make_closure(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                 device: torch.device, bf16: bool) -> Callable[[], torch.Tensor]:
    """The LBFGS-style closure every optimizer here takes: clear grads, loss on one batch, backward."""

    def closure() -> torch.Tensor:
        opt.zero_grad()
        with autocast(device, bf16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, bf16: bool = False,
             max_batches: int = 0) -> Dict[str, float]:
    """Mean cross-entropy and accuracy over a split, in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    count = 0
    for k, batch in enumerate(loader):
        if max_batches and k >= max_batches:
            break
        x, y = to_device(batch, device)
        with autocast(device, bf16):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").double()
        correct += (logits.argmax(1) == y).sum()
        count += len(y)
    model.train(was_training)
    loss = float(loss_sum) / max(count, 1)
    return {"loss": _round(loss), "acc": _round(float(correct) / max(count, 1))}


def evaluate_splits(model: nn.Module, data: Data, device: torch.device,
                    cfg: TrainConfig) -> Dict[str, Dict[str, float]]:
    """:func:`evaluate` on every reporting split of ``data``."""
    return {split: evaluate(model, loader, device, cfg.bf16, cfg.eval_batches) for split, loader in data.evals.items()}


def _summarise_values(values: List[float]) -> str:
    """One number for a progress bar: the value, or the geometric mean over several groups."""
    positive = [v for v in values if v > 0]
    if len(values) == 1 or not positive:
        return f"{values[0]:.3g}"
    return f"~{math.exp(sum(math.log(v) for v in positive) / len(positive)):.3g}"


def _synchronise(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Recorder:
    """Per-epoch curves and a finer per-step trace of hyperparameters, hypergradients and loss."""

    def __init__(self, traced: Sequence[str]) -> None:
        self.traced = tuple(traced)  # hyperparameters worth a per-step trace (the others are in the curves)
        self.curves: Dict[str, Any] = {"epoch": [], "wall_time": [], "train_loss_running": []}
        self.trace: Dict[str, Any] = {"step": [], "epoch": [], "train_loss": [], "hypergradient": {}}

    def epoch(self, epoch: int, wall: float, running: Optional[float], metrics: Dict[str, Dict[str, float]],
              hypers: Dict[str, List[float]]) -> None:
        self.curves["epoch"].append(epoch)
        self.curves["wall_time"].append(_round(wall))
        self.curves["train_loss_running"].append(None if running is None else _round(running))
        for split, values in metrics.items():
            for key, value in values.items():
                self.curves.setdefault(f"{split}_{key}", []).append(value)
        for name, per_group in hypers.items():
            self.curves.setdefault(name, []).append(per_group)

    def step(self, step: int, epoch: float, loss: float, hypers: Dict[str, List[float]],
             hypergrads: Optional[List[Dict[str, torch.Tensor]]], influence: Optional[Dict[str, float]]) -> None:
        self.trace["step"].append(step)
        self.trace["epoch"].append(_round(epoch, 4))
        self.trace["train_loss"].append(_round(loss))
        for name, per_group in hypers.items():
            if name in self.traced:
                self.trace.setdefault(name, []).append(per_group)
        if hypergrads is not None:
            for name in HYPER_NAMES:
                per_group = [float(h[name]) if name in h else None for h in hypergrads]
                if any(v is not None for v in per_group):
                    values = [None if v is None else _round(v) for v in per_group]
                    self.trace["hypergradient"].setdefault(name, []).append(values)
        if influence:  # OHO's diagnostics: the norm of each tangent (column of the influence matrix)
            norms = self.trace.setdefault("influence_norm", {})
            for key, value in influence.items():
                norms.setdefault(key, []).append(_round(float(value)))


def run_method(method: str, model_fn: Callable[[], nn.Module], data: Data, cfg: TrainConfig) -> Dict[str, Any]:
    """Train one model with one method and record everything a results file needs.

    Every method starts from the same seed, initial weights and batch order. OHO methods take one
    hyper-step (on the next validation batch) every ``hyper_every`` steps (every N for a name
    ending in ``_h<N>``). The split losses are evaluated before training and after every ``eval_every``
    epochs; the wall time counts training only.
    A run whose training loss becomes non-finite stops and is marked ``diverged``.
    """
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data.reseed(cfg.seed)
    model = model_fn().to(device)
    opt, scheduler = build_optimizer(method, model, cfg)
    spec = parse_method(method)
    is_oho = spec.oho
    hyper_every = spec.hyper_every or cfg.hyper_every
    val_batches = import_ohotorch().cycle(data.val) if is_oho else None

    steps_per_epoch = min(len(data.train), cfg.steps_per_epoch or len(data.train))
    log_every = cfg.log_every or max(1, cfg.epochs * steps_per_epoch // 300)
    recorder = Recorder(("lr", "weight_decay") + (("momentum",) if "momentum" in cfg.tune else ()))
    recorder.epoch(0, 0.0, None, evaluate_splits(model, data, device, cfg), hyperparameters(opt))

    bar = tqdm(total=cfg.epochs * steps_per_epoch, desc=method, leave=False, disable=not cfg.progress,
               dynamic_ncols=True)
    step, wall, diverged = 0, 0.0, False
    last_hyper = None
    for epoch in range(1, cfg.epochs + 1):
        if cfg.reset_epoch == epoch:
            for group in opt.param_groups:
                group[cfg.reset_name] = cfg.reset_value
        model.train()
        _synchronise(device)
        start = time.perf_counter()
        epoch_loss = torch.zeros((), device=device, dtype=torch.float64)
        window_loss = torch.zeros((), device=device, dtype=torch.float64)
        window = 0
        for k, batch in enumerate(data.train):
            if k >= steps_per_epoch:
                break
            x, y = to_device(batch, device)
            loss = opt.step(make_closure(model, opt, x, y, device, cfg.bf16))
            if is_oho and step % hyper_every == 0:
                xv, yv = to_device(next(val_batches), device)
                last_hyper = opt.hyper_step(make_closure(model, opt, xv, yv, device, cfg.bf16))
            step += 1
            epoch_loss += loss.detach().double()
            window_loss += loss.detach().double()
            window += 1
            if step % log_every == 0 or k == steps_per_epoch - 1:
                mean = float(window_loss) / window
                hypers = hyperparameters(opt)
                influence = getattr(opt, "diagnostics", {}).get("influence_norm") if is_oho else None
                recorder.step(step, step / steps_per_epoch, mean, hypers, last_hyper, influence)
                bar.set_postfix_str(_postfix(hypers, mean, recorder.curves), refresh=False)
                bar.update(window)
                window_loss.zero_()
                window = 0
                if not math.isfinite(mean):
                    diverged = True
                    break
        if scheduler is not None:
            scheduler.step()
        _synchronise(device)
        wall += time.perf_counter() - start
        running = float(epoch_loss) / max(k + 1, 1)
        diverged = diverged or not math.isfinite(running)
        last = epoch == cfg.epochs or diverged
        if epoch % cfg.eval_every == 0 or last:
            recorder.epoch(epoch, wall, running, evaluate_splits(model, data, device, cfg), hyperparameters(opt))
        if diverged:
            break
    bar.close()
    result = {
        "method": method,
        "groups": group_names(opt, model),
        "curves": recorder.curves,
        "trace": recorder.trace,
        "final": final_figures(recorder.curves, wall, step, diverged),
    }
    if is_oho and hasattr(opt, "counters"):
        result["oho_counters"] = dict(opt.counters)
    if cfg.progress:
        tqdm.write(_result_line(f"{method} (seed {cfg.seed})", result["final"]))
    return result


def _postfix(hypers: Dict[str, List[float]], loss: float, curves: Dict[str, Any]) -> str:
    parts = [f"lr={_summarise_values(hypers['lr'])}"]
    if "weight_decay" in hypers:
        parts.append(f"wd={_summarise_values(hypers['weight_decay'])}")
    parts.append(f"loss={loss:.4f}")
    if curves.get("val_loss"):
        parts.append(f"val={curves['val_loss'][-1]:.4f}")
    return " ".join(parts)


def final_figures(curves: Dict[str, Any], wall: float, steps: int, diverged: bool) -> Dict[str, Any]:
    """The numbers a summary reports: last-epoch losses and accuracies, the test loss at the epoch of
    best validation loss, final hyperparameters, training wall time."""
    final: Dict[str, Any] = {"epochs": curves["epoch"][-1], "steps": steps, "wall_time_s": _round(wall),
                             "diverged": diverged}
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "test_loss", "test_acc"):
        if curves.get(key):
            value = curves[key][-1]
            final[key] = value if (value is not None and math.isfinite(value) and not diverged) else None
    val = [v if v is not None and math.isfinite(v) else math.inf for v in curves.get("val_loss", [])]
    if val and "test_loss" in curves:
        best = int(np.argmin(val))
        final["best_val_epoch"] = curves["epoch"][best]
        final["test_loss_at_best_val"] = curves["test_loss"][best]
    for name in HYPER_NAMES:
        if curves.get(name):
            final[name] = curves[name][-1]
    return final


def _result_line(method: str, final: Dict[str, Any]) -> str:
    if final["diverged"]:
        return f"{method}: diverged after {final['steps']} steps"
    return (f"{method}: test loss {final.get('test_loss', float('nan')):.4f}  "
            f"test acc {final.get('test_acc', float('nan')):.4f}  ({final['wall_time_s']:.1f} s)")
