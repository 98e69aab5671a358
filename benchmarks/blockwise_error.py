"""How far the blockwise influence is from the exact one, per layer, on a small model and real data.

``influence="exact"`` carries one tangent per (layer, hyperparameter); ``"blockwise"`` one per
hyperparameter, summed over layers and read out per layer (cost independent of the number of layers).
The two agree when layers do not interact through the Hessian; here they do. For the paper's 4-layer
MLP on scikit-learn's digits, in float64 with central differences, after T steps of SGD with momentum
(no meta-update, so both see the same trajectory), it prints and records for each T: the relative
error ||h_block - h_exact|| / ||h_exact|| over all (layer, name) hypergradients, their cosine, and the
fraction of hypergradients whose sign differs.

    python benchmarks/blockwise_error.py
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

import common



@dataclass
class Config:
    steps: Tuple[int, ...] = (1, 15, 100, 300)
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 50
    seed: int = 0
    out: str = ""  # default: benchmarks/results/blockwise/blockwise_error.json


def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x = torch.tensor(x / 16.0, dtype=torch.float64)[perm]
    y = torch.tensor(y)[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def _hypergradients(influence: str, cfg: Config, steps: int) -> torch.Tensor:
    torch.manual_seed(cfg.seed)
    model = common.mlp(64, 128, 4, 10).double()
    settings = common.OptimizerSettings(lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, hvp="central",
                                        meta_lr=0.0)  # hyperparameters frozen: only the hypergradients matter
    opt, _ = common.build_optimizer(f"oho_layer_{influence}_full", model, settings)
    xt, yt, xv, yv = _digits()
    g = torch.Generator().manual_seed(cfg.seed + 1)

    def closure_for(x, y):
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return closure

    for _ in range(steps):
        idx = torch.randint(0, len(xt), (cfg.batch_size,), generator=g)
        opt.step(closure_for(xt[idx], yt[idx]))
    hyper = opt.hypergradient(closure_for(xv, yv))
    return torch.stack([h for group in hyper for h in group.values()])


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    cfg = common.parse_config(argv, Config)
    torch.set_num_threads(1)
    rows = []
    print(f"{'steps':>6s} {'rel. error':>11s} {'cosine':>8s} {'sign flips':>11s}")
    for steps in cfg.steps:
        exact = _hypergradients("exact", cfg, steps)
        block = _hypergradients("blockwise", cfg, steps)
        row = {"steps": steps,
               "relative_error": float((block - exact).norm() / exact.norm()),
               "cosine": float(F.cosine_similarity(block, exact, dim=0)),
               "sign_flip_fraction": float((torch.sign(block) != torch.sign(exact)).double().mean()),
               "exact": exact.tolist(), "blockwise": block.tolist()}
        rows.append(row)
        print(f"{steps:6d} {row['relative_error']:11.3e} {row['cosine']:8.4f} {row['sign_flip_fraction']:11.2f}")
    payload = {"kind": "blockwise_error", "config": cfg.__dict__,
               "environment": common.environment(torch.device("cpu")), "results": rows}
    path = Path(cfg.out) if cfg.out else common.RESULTS_DIR / "blockwise" / "blockwise_error.json"
    common.write_results(payload, path)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
