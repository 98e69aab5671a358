"""Learned per-layer initialisation scales against the 1/sqrt(fan_in) heuristic, on digits.

A deep tanh MLP starts from w0_l = exp(s_l) * N(0, 1) / sqrt(fan_in_l) (s_l = 0 is the heuristic; biases
0) and trains T minibatch steps of SGD with momentum at a fixed lr. The initial weights are a function of
the hyperparameters s (``init`` is a callable), so reverse mode carries the adjoint of w_0 back into
ds. From each starting scale exp(s) in ``starts``, ``outer_steps`` Adam steps on s minimise the
validation loss after T steps; reported: the learned scales and validation / test loss and accuracy
against the heuristic (s = 0), also for another random draw of the N(0, 1) matrices and another batch
order (``*_other_draw``), which the scales were not tuned on.

    python benchmarks/hypergrad_init_scales.py              # benchmarks/results/hypergrad/hypergrad_init_scales.json
    python benchmarks/hypergrad_init_scales.py --quick true
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

import common
import hypergrad_common as hc

ohotorch = common.import_ohotorch()
from ohotorch import hypergrad  # noqa: E402


@dataclass
class Config(hc.BaseConfig):
    widths: Tuple[int, ...] = (64, 64, 64, 64, 10)
    n_train: int = 1000
    n_val: int = 300
    batch_size: int = 50
    steps: int = 60  # T
    lr: float = 0.05
    momentum: float = 0.875
    starts: Tuple[float, ...] = (1.0, 0.25, 4.0)  # initial exp(s), the same for every layer
    outer_steps: int = 30
    outer_lr: float = 0.1  # Adam step on s = log scale

    PRESETS = {"quick": {"widths": (64, 8, 8, 10), "n_train": 200, "n_val": 50, "steps": 5, "outer_steps": 2,
                         "starts": (1.0,)}}


def make_problem(cfg: Config, draw: int):
    (x, y), (xv, yv), (xt, yt) = hc.digits((cfg.n_train, cfg.n_val, 0), cfg.seed)
    base = hc.mlp_init(cfg.widths, cfg.seed + 100 * draw)  # 1/sqrt(fan_in) scaling, biases 0
    g = torch.Generator().manual_seed(cfg.seed + 1 + 100 * draw)
    batches = [torch.randint(0, cfg.n_train, (cfg.batch_size,), generator=g) for _ in range(cfg.steps)]

    def init(h):
        return [torch.exp(h["log_scale"][i // 2]) * p if i % 2 == 0 else p for i, p in enumerate(base)]

    def train_loss(w, h, t):
        return F.cross_entropy(hc.mlp_forward(w, x[batches[t]]), y[batches[t]])

    def val_loss(w, h):
        return F.cross_entropy(hc.mlp_forward(w, xv), yv)

    return dict(init=init, train_loss=train_loss, val_loss=val_loss, xv=xv, yv=yv, xt=xt, yt=yt)


def evaluate(cfg: Config, problems, log_scale: torch.Tensor) -> Dict[str, float]:
    opt = hypergrad.SGD(lr=cfg.lr, momentum=cfg.momentum)
    out = {}
    for suffix, p in zip(("", "_other_draw"), problems):
        w = hypergrad.unroll(p["train_loss"], p["init"], {"log_scale": log_scale}, opt, cfg.steps)
        val, test = hc.loss_acc(w, p["xv"], p["yv"]), hc.loss_acc(w, p["xt"], p["yt"])
        out.update({f"val_loss{suffix}": val["loss"], f"test_loss{suffix}": test["loss"],
                    f"test_acc{suffix}": test["acc"]})
    return out


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = common.parse_config(argv, Config)
    payload = hc.header(cfg, "hypergrad_init_scales")
    problems = [make_problem(cfg, 0), make_problem(cfg, 1)]
    p = problems[0]
    layers = len(cfg.widths) - 1
    opt = hypergrad.SGD(lr=cfg.lr, momentum=cfg.momentum)
    heuristic = evaluate(cfg, problems, torch.zeros(layers, dtype=hc.DT))
    runs = []
    for start in cfg.starts:
        s = torch.full((layers,), math.log(start), dtype=hc.DT)
        before = evaluate(cfg, problems, s)
        outer = hypergrad.ProjectedAdam(lr=cfg.outer_lr,
                                        projections={"s": lambda v: hypergrad.project_box(v, -5.0, 3.0)})
        curve, trajectory = [], [s.tolist()]
        for _ in range(cfg.outer_steps):
            res = hypergrad.reverse_hypergradient(p["train_loss"], p["val_loss"], p["init"], {"log_scale": s}, opt,
                                                  cfg.steps)
            curve.append(float(res.val_loss))
            s = outer.step({"s": s}, {"s": res.grads["log_scale"]})["s"]
            trajectory.append(s.tolist())
        runs.append({"start_scale": start, "before": before, "learned": evaluate(cfg, problems, s),
                     "learned_scales": s.exp().tolist(), "scale_trajectory": np.exp(trajectory).tolist(),
                     "val_curve": curve})
        print(start, runs[-1]["learned_scales"], {k: round(v, 4) for k, v in runs[-1]["learned"].items()}, flush=True)
    payload.update(heuristic=heuristic, runs=runs)
    rows = [dict(method="heuristic 1/sqrt(fan_in)", **heuristic)]
    for r in runs:
        rows.append(dict(method=f"start x{r['start_scale']:g}", **r["before"]))
        rows.append(dict(method=f"learned from x{r['start_scale']:g}", **r["learned"]))
    print(common.format_table(rows, [("method", "init", "s"), ("val_loss", "val loss", ".4f"),
                                     ("test_loss", "test loss", ".4f"), ("test_acc", "test acc", ".4f"),
                                     ("test_loss_other_draw", "test loss (other draw)", ".4f")]))
    path = hc.write(payload, cfg, "hypergrad_init_scales")
    plot(payload, hc.figure_path(path))
    return payload


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, r in enumerate(payload["runs"]):
        traj = np.array(r["scale_trajectory"])
        for layer in range(traj.shape[1]):
            axes[0].plot(traj[:, layer], color=f"C{i}", alpha=0.4 + 0.6 * layer / max(traj.shape[1] - 1, 1),
                         label=f"start x{r['start_scale']:g}" if layer == 0 else None)
        axes[1].plot(r["val_curve"], color=f"C{i}", label=f"start x{r['start_scale']:g}")
    axes[0].axhline(1.0, color="k", ls="--", label="1/sqrt(fan_in)")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("outer step")
    axes[0].set_ylabel("scale of each layer (darker: deeper)")
    axes[0].legend(fontsize=8)
    axes[1].axhline(payload["heuristic"]["val_loss"], color="k", ls="--", label="1/sqrt(fan_in)")
    axes[1].set_xlabel("outer step")
    axes[1].set_ylabel("validation loss after T steps")
    axes[1].legend(fontsize=8)
    cfg = payload["config"]
    fig.suptitle(f"learned per-layer init scales, MLP {cfg['widths']}, T = {cfg['steps']}, "
                 f"{payload['environment']['device_name']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
