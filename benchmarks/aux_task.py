"""Hyperparameters inside the loss, tuned online: an auxiliary-task weight and per-layer L2 strengths.

In the spirit of Franceschi et al. 2017's real-time experiment (primary phone classification plus a
secondary regression on a shared trunk; learning rate, momentum and the auxiliary weight rho tuned
together, against a grid search on rho), on data available offline: scikit-learn's digits. A small
training set (``n_train`` images) trains an MLP trunk with two heads:

* primary: classify the digit (cross-entropy), the task whose validation loss drives the tuning;
* auxiliary: regress the image downsampled to 4x4 (16 values, mean squared error), weighted by rho.

Methods (every run from the same initial weights and batch order for a given seed):

* ``grid``: SGD with fixed lr and momentum, one run per rho of ``rho_grid``; the rho with the best
  validation accuracy (then loss) is chosen. Its cost is the whole grid.
* ``oho_aux_discount<g>``: one run of ohotorch.OHO tuning lr, momentum and rho online
  (``opt.hyperparameter``), for each horizon ``g`` of ``discounts`` (0: greedy, the default; 0.9).
* ``oho_l2``: one run tuning lr, momentum and one L2 strength per weight matrix (a loss hyperparameter
  vector: ``loss += sum_l l2[l] ||W_l||^2``) together with rho, at the first horizon.

Times are wall-clock seconds of the training loops on this machine (the grid's: the sum of its runs).

    python benchmarks/aux_task.py            # benchmarks/results/aux_task/aux_task.json (about 3 min, 2 CPU cores)
    python benchmarks/aux_task.py --quick    # a smoke run
"""
from __future__ import annotations

import math
from pathlib import Path
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import common

ohotorch = common.import_ohotorch()


@dataclass
class Config:
    """The auxiliary-task benchmark (module docstring)."""

    n_train: int = 300  # training images (small: the auxiliary task matters there)
    n_val: int = 300  # validation images (the hyper-steps' batches and the grid's selection)
    data_seed: int = 0
    width: int = 64  # hidden units of the two trunk layers
    epochs: int = 40
    batch_size: int = 30
    val_batch_size: int = 100
    lr: float = 0.05  # the grid's lr and OHO's initial lr
    momentum: float = 0.9  # the grid's momentum and OHO's initial momentum
    rho_grid: Tuple[float, ...] = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
    rho0: float = 0.1  # OHO's initial rho
    l2_0: float = 1e-4  # OHO's initial per-layer L2 strength
    discounts: Tuple[float, ...] = (0.0, 0.9)  # OHO's horizons for lr, momentum, rho (0: greedy, the default)
    hvp: str = "forward"
    meta_lr: float = 0.02
    seeds: int = 3
    seed: int = 0
    threads: int = 1
    out: str = ""  # default benchmarks/results/aux_task/aux_task[_quick].json
    quick: bool = False

    PRESETS = {"quick": {"epochs": 3, "seeds": 1, "rho_grid": (0.0, 1.0), "discounts": (0.0,)}}


def load(cfg: Config) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(x, digit, 4x4 image) for train / val / test (the test split is every image left)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32) / 16.0  # (N, 8, 8)
    x = images.reshape(len(images), 64)
    small = F.avg_pool2d(images.unsqueeze(1), 2).reshape(len(images), 16)  # the auxiliary target
    y = torch.tensor(bunch.target, dtype=torch.int64)
    n_test = len(y) - cfg.n_train - cfg.n_val
    train, val, test = common.split_indices(len(y), (cfg.n_train, cfg.n_val, n_test), cfg.data_seed)
    return {name: (x[idx], y[idx], small[idx]) for name, idx in (("train", train), ("val", val), ("test", test))}


class TwoHeads(nn.Module):
    """A shared trunk (64 -> width -> width, tanh) with a 10-class head and a 16-value regression head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh())
        self.classify = nn.Linear(width, 10)
        self.regress = nn.Linear(width, 16)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(x)
        return self.classify(h), self.regress(h)

    def weights(self) -> List[torch.Tensor]:
        """The weight matrices that take a per-layer L2 strength (trunk and primary head)."""
        return [self.trunk[0].weight, self.trunk[2].weight, self.classify.weight]


def evaluate(model: TwoHeads, split: Tuple[torch.Tensor, ...]) -> Dict[str, float]:
    x, y, _ = split
    with torch.no_grad():
        logits, _ = model(x)
        return {"loss": float(F.cross_entropy(logits, y)), "acc": float((logits.argmax(1) == y).float().mean())}


def train_one(cfg: Config, data: Dict[str, Any], seed: int, *, rho: Optional[float] = None,
              tuned: bool = False, per_layer_l2: bool = False, discount: float = 0.0) -> Dict[str, Any]:
    """One run: fixed rho with plain SGD (``rho`` given, ``tuned`` false), or OHO tuning lr, momentum, rho
    (and the per-layer L2 strengths)."""
    torch.manual_seed(seed)
    model = TwoHeads(cfg.width)
    if tuned:
        opt = ohotorch.OHO(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, tune=("lr", "momentum"),
                           meta_lr=cfg.meta_lr, discount=discount, hvp=cfg.hvp)
        aux = opt.hyperparameter("aux_weight", cfg.rho0, bounds=(0.0, 100.0))
        l2 = (opt.hyperparameter("l2", torch.full((len(model.weights()),), cfg.l2_0), bounds=(0.0, 1.0))
              if per_layer_l2 else None)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum)
        aux, l2 = None, None
    x_train, y_train, z_train = data["train"]
    x_val, y_val, _ = data["val"]
    g = torch.Generator().manual_seed(seed)
    val_g = torch.Generator().manual_seed(seed + 10_000)
    trace: List[Dict[str, Any]] = []
    start = time.perf_counter()
    steps = 0
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(y_train), generator=g)
        for first in range(0, len(order) - cfg.batch_size + 1, cfg.batch_size):
            idx = order[first:first + cfg.batch_size]
            x, y, z = x_train[idx], y_train[idx], z_train[idx]

            def closure() -> torch.Tensor:
                opt.zero_grad()
                logits, regression = model(x)
                weight = aux.value if aux is not None else rho
                loss = F.cross_entropy(logits, y) + weight * F.mse_loss(regression, z)
                if l2 is not None:
                    strengths = l2.value
                    loss = loss + sum(strengths[i] * w.pow(2).sum() for i, w in enumerate(model.weights()))
                loss.backward()
                return loss

            if tuned:
                opt.step(closure)
                v = torch.randint(0, len(y_val), (cfg.val_batch_size,), generator=val_g)

                def val_closure() -> torch.Tensor:
                    opt.zero_grad()
                    loss = F.cross_entropy(model(x_val[v])[0], y_val[v])
                    loss.backward()
                    return loss

                opt.hyper_step(val_closure)
            else:
                closure()
                opt.step()
            steps += 1
        if tuned:
            trace.append({"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
                          "momentum": opt.param_groups[0]["momentum"], "rho": aux.item(),
                          "l2": None if l2 is None else l2.current.tolist()})
    wall = time.perf_counter() - start
    val, test = evaluate(model, data["val"]), evaluate(model, data["test"])
    diverged = not all(math.isfinite(v) for v in (val["loss"], test["loss"]))
    result = {"seed": seed, "steps": steps, "wall_time_s": wall, "val_loss": val["loss"], "val_acc": val["acc"],
              "test_loss": test["loss"], "test_acc": test["acc"], "diverged": diverged}
    if tuned:
        result.update(final_lr=opt.param_groups[0]["lr"], final_momentum=opt.param_groups[0]["momentum"],
                      final_rho=aux.item(), final_l2=None if l2 is None else l2.current.tolist(), trace=trace)
    else:
        result["rho"] = rho
    return result


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> Optional[float]:
    if len(values) < 2:
        return None
    m = _mean(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg = common.parse_config(argv, Config)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    device = torch.device("cpu")
    env = common.environment(device)
    data = load(cfg)
    seeds = [cfg.seed + i for i in range(cfg.seeds)]
    oho_methods = [f"oho_aux_discount{d:g}" for d in cfg.discounts]
    runs: Dict[str, List[Dict[str, Any]]] = {"grid": [], **{m: [] for m in oho_methods}, "oho_l2": []}
    chosen: List[Dict[str, Any]] = []
    for seed in seeds:
        grid = [train_one(cfg, data, seed, rho=rho) for rho in cfg.rho_grid]
        runs["grid"] += grid
        best = max(grid, key=lambda r: (r["val_acc"], -r["val_loss"]))
        chosen.append({**{k: best[k] for k in ("seed", "rho", "val_acc", "val_loss", "test_acc", "test_loss")},
                       "grid_wall_time_s": sum(r["wall_time_s"] for r in grid)})
        for method, discount in zip(oho_methods, cfg.discounts):
            runs[method].append(train_one(cfg, data, seed, tuned=True, discount=discount))
        runs["oho_l2"].append(train_one(cfg, data, seed, tuned=True, per_layer_l2=True, discount=cfg.discounts[0]))
        line = [f"seed {seed}: grid rho={best['rho']} test acc {best['test_acc']:.4f} ({chosen[-1]['grid_wall_time_s']:.1f} s)"]
        for method in oho_methods + ["oho_l2"]:
            r = runs[method][-1]
            line.append(f"{method} rho={r['final_rho']:.3g} test acc {r['test_acc']:.4f} ({r['wall_time_s']:.1f} s)")
        print(" | ".join(line), flush=True)
    by_rho = {rho: [r for r in runs["grid"] if r["rho"] == rho] for rho in cfg.rho_grid}
    summary = {
        "grid_search_on_rho": {
            "test_acc": _mean([c["test_acc"] for c in chosen]), "test_acc_std": _std([c["test_acc"] for c in chosen]),
            "test_loss": _mean([c["test_loss"] for c in chosen]),
            "total_time_s": _mean([c["grid_wall_time_s"] for c in chosen]), "runs_per_seed": len(cfg.rho_grid),
            "chosen_rho": [c["rho"] for c in chosen]},
        "grid_each_rho": {str(rho): {"test_acc": _mean([r["test_acc"] for r in rs]),
                                     "val_acc": _mean([r["val_acc"] for r in rs]),
                                     "wall_time_s": _mean([r["wall_time_s"] for r in rs])} for rho, rs in by_rho.items()},
    }
    for method in oho_methods + ["oho_l2"]:
        rs = runs[method]
        summary[method] = {"test_acc": _mean([r["test_acc"] for r in rs]), "test_acc_std": _std([r["test_acc"] for r in rs]),
                           "test_loss": _mean([r["test_loss"] for r in rs]),
                           "total_time_s": _mean([r["wall_time_s"] for r in rs]),
                           "final_rho": [r["final_rho"] for r in rs], "final_lr": [r["final_lr"] for r in rs],
                           "final_momentum": [r["final_momentum"] for r in rs],
                           "final_l2": [r["final_l2"] for r in rs], "diverged": sum(r["diverged"] for r in rs)}
    rows = [{"method": f"grid search on rho (SGD, {len(cfg.rho_grid)} runs)", **summary["grid_search_on_rho"]}]
    rows += [{"method": f"OHO: lr, momentum, rho (discount {d:g})", **summary[m]}
             for m, d in zip(oho_methods, cfg.discounts)]
    rows.append({"method": f"OHO: lr, momentum, rho, per-layer L2 (discount {cfg.discounts[0]:g})", **summary["oho_l2"]})
    print(common.format_table(rows, [("method", "method", "s"), ("test_acc", "test acc", ".4f"),
                                     ("test_acc_std", "std", ".4f"), ("test_loss", "test loss", ".4f"),
                                     ("total_time_s", "time (s)", ".1f")]))
    payload = {"kind": "aux_task", "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__},
               "environment": env, "data": {"dataset": "sklearn digits", "n_test": len(data["test"][1])},
               "summary": summary, "chosen": chosen, "runs": runs}
    name = "aux_task" + ("_quick" if cfg.quick else "") + ".json"
    path = common.write_results(payload, Path(cfg.out) if cfg.out else common.RESULTS_DIR / "aux_task" / name)
    print(f"results: {path}")
    return payload


if __name__ == "__main__":
    main()
