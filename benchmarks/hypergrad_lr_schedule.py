"""Learned learning-rate schedules per layer and per iteration (Maclaurin, Duvenaud & Adams 2015) on digits.

A tanh MLP trains T minibatch steps of SGD with momentum. Three ways to choose its learning rates, all
with the same training budget (T steps, the same batches) and selected on the same validation loss:

* constant: the best lr of a grid;
* cosine: lr_t = peak (1 + cos(pi t / T)) / 2, the best peak of the same grid;
* learned: one lr per layer and per step (a (T, layers) tensor, T * layers hyperparameters; or per block
  of ``block`` steps, T / block * layers hyperparameters) from the best
  constant, ``outer_steps`` Adam steps on log lr with reverse-mode hypergradients of the final validation
  loss (through the exact reversal of SGD with momentum by default: ``--method exact``, or the stored
  trajectory: ``--method reverse``).

With ``resample_orders`` (the default) every outer step draws a new batch order, so that the schedule
cannot fit the noise of one sequence of minibatches; the evaluation orders are never used for tuning.
With ``--resample-orders false`` it tunes on the evaluation order itself (Maclaurin et al.'s setting),
which fits that order's minibatches and the validation set (compare ``test_*_other_order``).

Reported: validation and test loss / accuracy after training on the evaluation batch order, and on a
second order (``*_other_order``).

    python benchmarks/hypergrad_lr_schedule.py              # benchmarks/results/hypergrad/hypergrad_lr_schedule.json
    python benchmarks/hypergrad_lr_schedule.py --quick true
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import common
import hypergrad_common as hc

ohotorch = common.import_ohotorch()
from ohotorch import hypergrad  # noqa: E402


@dataclass
class Config(hc.BaseConfig):
    widths: Tuple[int, ...] = (64, 50, 50, 10)
    n_train: int = 1000
    n_val: int = 400
    batch_size: int = 50
    steps: int = 100  # T
    momentum: float = 0.875  # on the exact reversal's momentum grid
    lr_grid: Tuple[float, ...] = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
    outer_steps: int = 40
    outer_lr: float = 0.05  # Adam step on log lr
    method: str = "exact"  # exact | reverse
    block: int = 1  # steps sharing one learned lr per layer (1: per iteration; 10: T/10 values per layer)
    resample_orders: bool = True  # a new batch order at every outer step (else always the evaluation order)

    PRESETS = {"quick": {"widths": (64, 8, 10), "n_train": 200, "n_val": 50, "steps": 6, "outer_steps": 2,
                         "lr_grid": (0.1, 0.5)}}

    def __post_init__(self) -> None:
        if self.block < 1 or self.steps % self.block:
            raise ValueError(f"Invalid block: {self.block} (must divide steps = {self.steps})")
        if self.method not in ("exact", "reverse"):
            raise ValueError(f"Unknown method {self.method!r} (exact or reverse)")


def make_problem(cfg: Config):
    (x, y), (xv, yv), (xt, yt) = hc.digits((cfg.n_train, cfg.n_val, 0), cfg.seed)
    w0 = hc.mlp_init(cfg.widths, cfg.seed)
    groups = hc.layer_groups(w0)

    def batches(order_seed: int) -> List[torch.Tensor]:
        g = torch.Generator().manual_seed(order_seed)
        per_epoch = cfg.n_train // cfg.batch_size
        out: List[torch.Tensor] = []
        while len(out) < cfg.steps:
            perm = torch.randperm(cfg.n_train, generator=g)
            out += [perm[i * cfg.batch_size:(i + 1) * cfg.batch_size] for i in range(per_epoch)]
        return out[: cfg.steps]

    def train_loss_for(order: List[torch.Tensor]):
        return lambda w, h, t: F.cross_entropy(hc.mlp_forward(w, x[order[t]]), y[order[t]])

    def val_loss(w, h):
        return F.cross_entropy(hc.mlp_forward(w, xv), yv)

    return dict(x=x, y=y, xv=xv, yv=yv, xt=xt, yt=yt, w0=w0, groups=groups, batches=batches,
                train_loss_for=train_loss_for, val_loss=val_loss)


def train_eval(cfg: Config, p: Dict[str, Any], lr: torch.Tensor) -> Dict[str, float]:
    """Train with the (T, layers) schedule on the tuning batch order and on another; evaluate."""
    opt = hypergrad.SGD(lr="lr", momentum=cfg.momentum)
    out: Dict[str, float] = {}
    for suffix, seed in (("", cfg.seed), ("_other_order", cfg.seed + 1000)):
        w = hypergrad.unroll(p["train_loss_for"](p["batches"](seed)), p["w0"], {"lr": lr}, opt, cfg.steps,
                             groups=p["groups"])
        if not all(bool(torch.isfinite(q).all()) for q in w):
            out.update({f"val_loss{suffix}": float("inf"), f"test_loss{suffix}": float("inf"),
                        f"test_acc{suffix}": 0.0})
            continue
        val, test = hc.loss_acc(w, p["xv"], p["yv"]), hc.loss_acc(w, p["xt"], p["yt"])
        out.update({f"val_loss{suffix}": val["loss"], f"val_acc{suffix}": val["acc"],
                    f"test_loss{suffix}": test["loss"], f"test_acc{suffix}": test["acc"]})
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = common.parse_config(argv, Config)
    payload = hc.header(cfg, "hypergrad_lr_schedule")
    p = make_problem(cfg)
    layers, T = max(p["groups"]) + 1, cfg.steps
    cosine = torch.tensor([0.5 * (1 + math.cos(math.pi * t / T)) for t in range(T)], dtype=hc.DT)[:, None]

    def schedule(kind: str, value: float) -> torch.Tensor:
        base = torch.ones(T, 1, dtype=hc.DT) if kind == "constant" else cosine
        return (value * base).expand(T, layers).clone()

    grid = {kind: [dict(lr=v, **train_eval(cfg, p, schedule(kind, v))) for v in cfg.lr_grid]
            for kind in ("constant", "cosine")}
    best = {kind: min(rows, key=lambda r: r["val_loss"]) for kind, rows in grid.items()}
    print({k: (v["lr"], round(v["val_loss"], 4)) for k, v in best.items()}, flush=True)

    opt = hypergrad.SGD(lr="lr", momentum=cfg.momentum)
    # the learned parameters: log lr per layer and per block of ``block`` steps, expanded to (T, layers)
    log_lr = torch.log(schedule("constant", best["constant"]["lr"]))[:: cfg.block].clone()
    expand = lambda v: v.repeat_interleave(cfg.block, 0)
    cap = math.log(2 * max(cfg.lr_grid))  # log lr stays below twice the largest grid value
    outer = hypergrad.ProjectedAdam(lr=cfg.outer_lr, projections={"log_lr": lambda v: hypergrad.project_box(v, hi=cap)})
    compute = hypergrad.exact_reverse_hypergradient if cfg.method == "exact" else hypergrad.reverse_hypergradient
    curve, memory, recovered = [], None, []
    for k in range(cfg.outer_steps):
        train_loss = p["train_loss_for"](p["batches"](cfg.seed + 1 + k if cfg.resample_orders else cfg.seed))
        try:
            res = compute(train_loss, p["val_loss"], p["w0"], {"lr": expand(log_lr).exp()}, opt, T,
                          groups=p["groups"])
        except OverflowError as err:  # the weights left the fixed-point range: keep the last schedule
            print(f"outer step {k}: stopped ({err})")
            break
        curve.append(float(res.val_loss))
        memory = {"memory_bytes": res.memory_bytes, **({"trajectory_bytes": res.info["trajectory_bytes"],
                                                         "buffer_bits": res.info["buffer_bits"]}
                                                        if cfg.method == "exact" else {})}
        if cfg.method == "exact":
            recovered.append(bool(res.info["recovered_initial"]))
        # chain rule: d/d log lr_block = sum over the block's steps of lr_t * d/d lr_t
        g_log = (res.grads["lr"] * expand(log_lr).exp()).reshape(-1, cfg.block, layers).sum(1)
        log_lr = outer.step({"log_lr": log_lr}, {"log_lr": g_log})["log_lr"]
        if k % 5 == 0:
            print(f"outer step {k}: val loss {curve[-1]:.4f}", flush=True)
    learned = dict(train_eval(cfg, p, expand(log_lr).exp()), val_curve=curve, schedule=expand(log_lr).exp().tolist(),
                   hypergradient_memory=memory, all_reversals_exact=all(recovered) if recovered else None)
    payload.update(grid=grid, best_constant=best["constant"], best_cosine=best["cosine"], learned=learned,
                   n_hyperparameters=int(log_lr.numel()))
    rows = [dict(method=m, **{k: v for k, v in r.items() if isinstance(v, float)})
            for m, r in (("constant", best["constant"]), ("cosine", best["cosine"]), ("learned", learned))]
    print(common.format_table(rows, [("method", "schedule", "s"), ("val_loss", "val loss", ".4f"),
                                     ("test_loss", "test loss", ".4f"), ("test_acc", "test acc", ".4f"),
                                     ("test_loss_other_order", "test loss (other order)", ".4f")]))
    path = hc.write(payload, cfg, "hypergrad_lr_schedule")
    plot(payload, hc.figure_path(path))
    return payload


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    sched = np.array(payload["learned"]["schedule"])
    T = sched.shape[0]
    for layer in range(sched.shape[1]):
        axes[0].plot(sched[:, layer], label=f"learned, layer {layer + 1}")
    axes[0].axhline(payload["best_constant"]["lr"], color="k", ls="--", label="best constant")
    peak = payload["best_cosine"]["lr"]
    axes[0].plot([peak * 0.5 * (1 + math.cos(math.pi * t / T)) for t in range(T)], "k:", label="best cosine")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step t")
    axes[0].set_ylabel("learning rate")
    axes[0].legend(fontsize=8)
    axes[1].plot(payload["learned"]["val_curve"], label="learned schedule")
    axes[1].axhline(payload["best_constant"]["val_loss"], color="k", ls="--", label="best constant")
    axes[1].axhline(payload["best_cosine"]["val_loss"], color="k", ls=":", label="best cosine")
    axes[1].set_xlabel("outer step")
    axes[1].set_ylabel("validation loss after T steps")
    axes[1].legend(fontsize=8)
    cfg = payload["config"]
    fig.suptitle(f"learned lr per layer and per {cfg.get('block', 1)} step(s), MLP {cfg['widths']}, T = {cfg['steps']}, "
                 f"{cfg['method']} hypergradients, {payload['environment']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
