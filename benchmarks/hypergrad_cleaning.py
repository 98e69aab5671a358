"""Data hyper-cleaning (Franceschi et al. 2017, section 5.1) on digits.

A fraction of the training labels is replaced by a different random class. Each training example i gets
a weight sigma_i in [0, 1] on its loss, with an L1 budget sum sigma <= R (R = the number of clean
examples by default); a linear softmax classifier trains T full-batch steps of SGD with momentum on
sum_i sigma_i CE_i / n. Projected Adam on sigma, fed by reverse-mode hypergradients of the loss on a
small clean validation set, learns which examples to switch off.

Reported: test accuracy of training on all the data (sigma = 1), on the oracle-clean subset, and with
the learned weights; precision and recall of the examples the learned weights switch off (sigma <= 0.01)
as detectors of the corrupted labels (and F1).

    python benchmarks/hypergrad_cleaning.py              # benchmarks/results/hypergrad/hypergrad_cleaning.json
    python benchmarks/hypergrad_cleaning.py --quick true
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import common
import hypergrad_common as hc

ohotorch = common.import_ohotorch()
from ohotorch import hypergrad  # noqa: E402


@dataclass
class Config(hc.BaseConfig):
    n_train: int = 400
    n_val: int = 200
    corrupt: float = 0.4  # fraction of training labels replaced by another class
    budget: float = 0.0  # R, the L1 budget on the weights; 0: the number of clean examples
    steps: int = 80  # T inner steps (full batch)
    lr: float = 0.2
    momentum: float = 0.875
    weight_decay: float = 1e-3
    outer_steps: int = 100
    outer_lr: float = 0.05
    off_threshold: float = 0.01  # sigma at or below this counts as switched off

    PRESETS = {"quick": {"n_train": 100, "n_val": 50, "steps": 10, "outer_steps": 3}}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = common.parse_config(argv, Config)
    payload = hc.header(cfg, "hypergrad_cleaning")
    (x, y_clean), (xv, yv), (xt, yt) = hc.digits((cfg.n_train, cfg.n_val, 0), cfg.seed)
    g = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_train
    corrupted = torch.zeros(n, dtype=torch.bool)
    corrupted[torch.randperm(n, generator=g)[: int(round(cfg.corrupt * n))]] = True
    y = y_clean.clone()
    y[corrupted] = (y_clean[corrupted] + torch.randint(1, 10, (int(corrupted.sum()),), generator=g)) % 10
    w0 = [torch.zeros(64, 10, dtype=hc.DT), torch.zeros(10, dtype=hc.DT)]
    opt = hypergrad.SGD(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def train_loss(w, h, t):
        return (F.cross_entropy(x @ w[0] + w[1], y, reduction="none") * h["sigma"]).sum() / n

    def val_loss(w, h):
        return F.cross_entropy(xv @ w[0] + w[1], yv)

    def train_with(sigma: torch.Tensor) -> Dict[str, float]:
        w = hypergrad.unroll(train_loss, w0, {"sigma": sigma}, opt, cfg.steps)
        return {"val_loss": float(val_loss(w, {})), "test_acc": hc.accuracy(xt @ w[0] + w[1], yt)}

    budget = cfg.budget or float((~corrupted).sum())
    project = lambda s: hypergrad.project_box_budget(s, 0.0, 1.0, budget)
    sigma = project(torch.ones(n, dtype=hc.DT))
    outer = hypergrad.ProjectedAdam(lr=cfg.outer_lr, projections={"sigma": project})
    curve = []
    for k in range(cfg.outer_steps):
        res = hypergrad.reverse_hypergradient(train_loss, val_loss, w0, {"sigma": sigma}, opt, cfg.steps)
        curve.append(float(res.val_loss))
        sigma = outer.step({"sigma": sigma}, res.grads)["sigma"]
        if k % 10 == 0:
            print(f"outer step {k}: val loss {curve[-1]:.4f}", flush=True)
    off = sigma <= cfg.off_threshold
    tp = int((off & corrupted).sum())
    precision = tp / max(int(off.sum()), 1)
    recall = tp / max(int(corrupted.sum()), 1)
    results = {
        "all_data": train_with(torch.ones(n, dtype=hc.DT)),
        "oracle_clean": train_with((~corrupted).to(hc.DT)),
        "learned_weights": dict(train_with(sigma), switched_off=int(off.sum()), precision=precision, recall=recall,
                                f1=2 * precision * recall / max(precision + recall, 1e-12),
                                sum_sigma=float(sigma.sum()), val_curve=curve),
    }
    payload.update(results=results, budget=budget, n_corrupted=int(corrupted.sum()), sigma=sigma.tolist(),
                   corrupted=corrupted.tolist())
    rows = [dict(method=m, **{k: v for k, v in r.items() if k != "val_curve"}) for m, r in results.items()]
    print(common.format_table(rows, [("method", "training set", "s"), ("test_acc", "test acc", ".4f"),
                                     ("val_loss", "val loss", ".4f"), ("precision", "precision", ".3f"),
                                     ("recall", "recall", ".3f"), ("f1", "F1", ".3f")]))
    path = hc.write(payload, cfg, "hypergrad_cleaning")
    plot(payload, hc.figure_path(path))
    return payload


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    sigma, bad = np.array(payload["sigma"]), np.array(payload["corrupted"])
    bins = np.linspace(0, 1, 21)
    axes[0].hist([sigma[~bad], sigma[bad]], bins=bins, label=["clean label", "corrupted label"], stacked=True)
    axes[0].set_xlabel("learned weight sigma_i")
    axes[0].set_ylabel("training examples")
    axes[0].legend()
    res = payload["results"]
    names = ["all_data", "oracle_clean", "learned_weights"]
    axes[1].bar(range(3), [res[m]["test_acc"] for m in names])
    axes[1].set_xticks(range(3), ["all data", "oracle clean", "learned weights"])
    axes[1].set_ylim(min(res[m]["test_acc"] for m in names) - 0.05, 1.0)
    axes[1].set_ylabel("test accuracy")
    axes[2].plot(res["learned_weights"]["val_curve"])
    axes[2].set_xlabel("outer step")
    axes[2].set_ylabel("validation loss")
    cfg = payload["config"]
    fig.suptitle(f"data hyper-cleaning, digits, {cfg['n_train']} train ({payload['n_corrupted']} corrupted), "
                 f"T = {cfg['steps']}, {payload['environment']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
