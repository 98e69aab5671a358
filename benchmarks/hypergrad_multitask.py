"""Multitask relation learning (Franceschi et al. 2017, section 5.2) on digits.

K = 10 class models w_k (the columns of a linear softmax classifier on the 64 standardised pixels, plus
an unregularised bias) learn from a tiny training set, with the regulariser

    R(W) = sum_jk A_jk ||w_j - w_k||^2 + rho sum_k ||w_k||^2

and T steps of gradient descent with momentum. A small validation set drives the hyperparameters. Four
ways to set them, compared by the test accuracy on the held-out rest of the digits:

* single task (STL): A = 0, rho chosen on the validation loss from a grid;
* naive MTL: A = a * ones, (a, rho) chosen on the validation loss from a grid;
* learned A: from the naive MTL optimum, ``outer_steps`` projected Adam steps on the full matrix A with
  reverse-mode hypergradients of the validation loss, A projected onto A >= 0;
* learned A, L1: the same, projected onto {A >= 0, sum A <= sum A_naive} (project_box_budget).

    python benchmarks/hypergrad_multitask.py              # benchmarks/results/hypergrad/hypergrad_multitask.json
    python benchmarks/hypergrad_multitask.py --quick true
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import common
import hypergrad_common as hc

ohotorch = common.import_ohotorch()
from ohotorch import hypergrad  # noqa: E402


@dataclass
class Config(hc.BaseConfig):
    n_train: int = 50
    n_val: int = 50
    splits: int = 5  # random train / validation / test splits (data seeds seed, seed + 1, ...)
    steps: int = 60  # T inner steps (full batch)
    lr: float = 0.1
    momentum: float = 0.875
    rho_grid: Tuple[float, ...] = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    a_grid: Tuple[float, ...] = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2)
    outer_steps: int = 60
    outer_lr: float = 0.1  # Adam step on A, relative to the naive optimum's a

    PRESETS = {"quick": {"splits": 1, "steps": 10, "outer_steps": 3, "rho_grid": (1e-3, 1e-2), "a_grid": (1e-3,)}}


def make_problem(cfg: Config, split: int):
    (x, y), (xv, yv), (xt, yt) = hc.digits((cfg.n_train, cfg.n_val, 0), cfg.seed + split)
    g = torch.Generator().manual_seed(cfg.seed + split)
    w0 = [torch.randn(64, 10, generator=g, dtype=hc.DT) * 0.01, torch.zeros(10, dtype=hc.DT)]

    def regulariser(W, h):
        cols = W.T  # (10, 64): one model per class
        sq = (cols[:, None, :] - cols[None, :, :]).pow(2).sum(-1)
        return (h["A"] * sq).sum() + h["rho"] * W.pow(2).sum()

    def train_loss(w, h, t):
        return F.cross_entropy(x @ w[0] + w[1], y) + regulariser(w[0], h)

    def val_loss(w, h):
        return F.cross_entropy(xv @ w[0] + w[1], yv)

    def test_acc(w):
        return hc.accuracy(xt @ w[0] + w[1], yt)

    return train_loss, val_loss, test_acc, w0


def evaluate(cfg: Config, problem, A: torch.Tensor, rho: float) -> Tuple[float, float]:
    train_loss, val_loss, test_acc, w0 = problem
    hypers = {"A": A, "rho": torch.tensor(rho, dtype=hc.DT)}
    w = hypergrad.unroll(train_loss, w0, hypers, hypergrad.SGD(lr=cfg.lr, momentum=cfg.momentum), cfg.steps)
    return float(val_loss(w, hypers)), test_acc(w)


def learn_A(cfg: Config, problem, A0: torch.Tensor, rho: float, radius: Optional[float]) -> Dict[str, Any]:
    train_loss, val_loss, test_acc, w0 = problem
    if radius is None:
        project = lambda a: hypergrad.project_box(a, lo=0.0)
    else:
        project = lambda a: hypergrad.project_box_budget(a, 0.0, float("inf"), radius)
    scale = max(float(A0.max()), 1e-3)
    outer = hypergrad.ProjectedAdam(lr=cfg.outer_lr * scale, projections={"A": project})
    hypers = {"A": A0.clone(), "rho": torch.tensor(rho, dtype=hc.DT)}
    opt = hypergrad.SGD(lr=cfg.lr, momentum=cfg.momentum)
    val_curve = []
    for _ in range(cfg.outer_steps):
        res = hypergrad.reverse_hypergradient(train_loss, val_loss, w0, hypers, opt, cfg.steps)
        val_curve.append(float(res.val_loss))
        hypers = outer.step(hypers, {"A": res.grads["A"]})
    val, acc = evaluate(cfg, problem, hypers["A"], rho)
    return {"A": hypers["A"].tolist(), "val_loss": val, "test_acc": acc, "val_curve": val_curve + [val],
            "sum_A": float(hypers["A"].sum())}


def run_split(cfg: Config, split: int) -> Dict[str, Any]:
    problem = make_problem(cfg, split)
    zeros = torch.zeros(10, 10, dtype=hc.DT)
    stl = min(((evaluate(cfg, problem, zeros, rho), rho) for rho in cfg.rho_grid), key=lambda r: r[0][0])
    naive = min(((evaluate(cfg, problem, a * torch.ones(10, 10, dtype=hc.DT), rho), rho, a)
                 for rho in cfg.rho_grid for a in cfg.a_grid), key=lambda r: r[0][0])
    (val_n, acc_n), rho_n, a_n = naive
    A_naive = a_n * torch.ones(10, 10, dtype=hc.DT)
    learned = learn_A(cfg, problem, A_naive, rho_n, None)
    learned_l1 = learn_A(cfg, problem, A_naive, rho_n, float(A_naive.sum()))
    out = {"split": split,
           "single_task": {"rho": stl[1], "val_loss": stl[0][0], "test_acc": stl[0][1]},
           "naive_mtl": {"rho": rho_n, "a": a_n, "val_loss": val_n, "test_acc": acc_n},
           "learned_A": learned, "learned_A_l1": learned_l1}
    print({k: v["test_acc"] for k, v in out.items() if isinstance(v, dict)}, flush=True)
    return out


METHODS = ("single_task", "naive_mtl", "learned_A", "learned_A_l1")


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = common.parse_config(argv, Config)
    payload = hc.header(cfg, "hypergrad_multitask")
    runs = [run_split(cfg, s) for s in range(cfg.splits)]
    summary = {}
    for m in METHODS:
        accs = np.array([r[m]["test_acc"] for r in runs])
        vals = np.array([r[m]["val_loss"] for r in runs])
        summary[m] = {"test_acc_mean": float(accs.mean()), "test_acc_std": float(accs.std()),
                      "val_loss_mean": float(vals.mean())}
    payload["runs"] = runs
    payload["summary"] = summary
    print(common.format_table([dict(method=m, **summary[m]) for m in METHODS],
                              [("method", "method", "s"), ("test_acc_mean", "test acc", ".4f"),
                               ("test_acc_std", "std", ".4f"), ("val_loss_mean", "val loss", ".4f")]))
    path = hc.write(payload, cfg, "hypergrad_multitask")
    plot(payload, hc.figure_path(path))
    return payload


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    s = payload["summary"]
    axes[0].bar(range(len(METHODS)), [s[m]["test_acc_mean"] for m in METHODS],
                yerr=[s[m]["test_acc_std"] for m in METHODS], color="C0")
    axes[0].set_xticks(range(len(METHODS)), ["STL", "naive MTL", "learned A", "learned A, L1"])
    lo = min(s[m]["test_acc_mean"] - s[m]["test_acc_std"] for m in METHODS)
    axes[0].set_ylim(max(0.0, lo - 0.05), 1.0)
    axes[0].set_ylabel(f"test accuracy (mean over {len(payload['runs'])} splits)")
    for ax, key, title in ((axes[1], "learned_A", "learned A (split 0)"), (axes[2], "learned_A_l1", "learned A, L1")):
        im = ax.imshow(np.array(payload["runs"][0][key]["A"]), cmap="viridis")
        ax.set_title(title)
        ax.set_xlabel("class k")
        ax.set_ylabel("class j")
        fig.colorbar(im, ax=ax)
    cfg = payload["config"]
    fig.suptitle(f"multitask relation learning, digits, {cfg['n_train']} train + {cfg['n_val']} val, "
                 f"T = {cfg['steps']}, {payload['environment']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
