"""Synthetic training data (Maclaurin, Duvenaud & Adams 2015, section 3.4) on digits.

Ten training images, one per class, start blank (all pixels 0) and are the hyperparameters: a model
trains T full-batch steps of SGD with momentum on those ten images only, and reverse-mode hypergradients
of its loss on real digits (the "validation" set: here the training split of the real data) move every
pixel. The model is a linear softmax classifier (the images then read as class templates) from zero
weights. Compared by test accuracy on held-out real digits with the same training (same T, lr):

* ten real images, one per class, drawn at random (``real_one_per_class``; mean over ``draws``);
* the ten class-mean images of the real training split (``class_means``);
* the ten learned images (``learned``).

    python benchmarks/hypergrad_synthetic_data.py              # benchmarks/results/hypergrad/hypergrad_synthetic_data.json
    python benchmarks/hypergrad_synthetic_data.py --quick true
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
    n_real: int = 1000  # real digits the synthetic images are fitted to
    steps: int = 50  # T
    lr: float = 0.5
    momentum: float = 0.875
    outer_steps: int = 150
    outer_lr: float = 0.05  # Adam step on the pixels
    draws: int = 20  # random one-per-class real training sets for the baseline

    PRESETS = {"quick": {"n_real": 200, "steps": 5, "outer_steps": 2, "draws": 2}}


def main(argv: Optional[Sequence[str]] = None) -> dict:
    cfg = common.parse_config(argv, Config)
    payload = hc.header(cfg, "hypergrad_synthetic_data")
    (xr, yr), (xt, yt) = hc.digits((cfg.n_real, 0), cfg.seed, standardise=False)  # pixels in [0, 1]
    labels = torch.arange(10)
    w0 = [torch.zeros(64, 10, dtype=hc.DT), torch.zeros(10, dtype=hc.DT)]
    opt = hypergrad.SGD(lr=cfg.lr, momentum=cfg.momentum)

    def train_loss(w, h, t):
        return F.cross_entropy(h["images"] @ w[0] + w[1], labels)

    def val_loss(w, h):
        return F.cross_entropy(xr @ w[0] + w[1], yr)

    def test_of(images: torch.Tensor) -> Dict[str, float]:
        w = hypergrad.unroll(train_loss, w0, {"images": images}, opt, cfg.steps)
        return {"real_loss": float(val_loss(w, {})), "test_acc": hc.accuracy(xt @ w[0] + w[1], yt),
                "test_loss": float(F.cross_entropy(xt @ w[0] + w[1], yt))}

    g = torch.Generator().manual_seed(cfg.seed)
    draws = []
    for _ in range(cfg.draws):
        picks = [int(torch.nonzero(yr == c)[torch.randint(int((yr == c).sum()), (1,), generator=g)]) for c in range(10)]
        draws.append(test_of(xr[picks]))
    real = {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}
    real["test_acc_std"] = float(np.std([d["test_acc"] for d in draws]))
    means = torch.stack([xr[yr == c].mean(0) for c in range(10)])
    class_means = test_of(means)

    images = torch.zeros(10, 64, dtype=hc.DT)
    outer = hypergrad.ProjectedAdam(lr=cfg.outer_lr, projections={"images": lambda v: hypergrad.project_box(v, 0.0, 1.0)})
    curve = []
    for k in range(cfg.outer_steps):
        res = hypergrad.reverse_hypergradient(train_loss, val_loss, w0, {"images": images}, opt, cfg.steps)
        curve.append(float(res.val_loss))
        images = outer.step({"images": images}, res.grads)["images"]
        if k % 25 == 0:
            print(f"outer step {k}: loss on real digits {curve[-1]:.4f}", flush=True)
    learned = dict(test_of(images), real_loss_curve=curve)
    payload.update(real_one_per_class=real, class_means=class_means, learned=learned, images=images.tolist(),
                   class_mean_images=means.tolist())
    rows = [dict(method=m, **{k: v for k, v in r.items() if isinstance(v, float)})
            for m, r in (("real_one_per_class", real), ("class_means", class_means), ("learned", learned))]
    print(common.format_table(rows, [("method", "10 training images", "s"), ("real_loss", "loss on real", ".4f"),
                                     ("test_loss", "test loss", ".4f"), ("test_acc", "test acc", ".4f")]))
    path = hc.write(payload, cfg, "hypergrad_synthetic_data")
    plot(payload, hc.figure_path(path))
    return payload


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 10, figsize=(13, 3.2))
    for row, (key, name) in enumerate((("images", "learned"), ("class_mean_images", "class mean"))):
        for c in range(10):
            ax = axes[row, c]
            ax.imshow(np.array(payload[key][c]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, fontsize=8)
    acc = {k: payload[k]["test_acc"] for k in ("learned", "class_means", "real_one_per_class")}
    fig.suptitle(f"ten training images learned from blank pixels (digits, T = {payload['config']['steps']}); test acc "
                 f"learned {acc['learned']:.3f}, class means {acc['class_means']:.3f}, "
                 f"one real per class {acc['real_one_per_class']:.3f}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main(sys.argv[1:])
