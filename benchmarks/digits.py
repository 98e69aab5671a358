"""OHO against the paper's baselines on scikit-learn's bundled digits (real data, no download, CPU).

1,797 8x8 greyscale digits, pixels scaled to [0, 1], split at random (fixed ``data_seed``) into
validation, test and training sets. The model is the paper's MNIST MLP (4 layers, 128 units, ReLU) or
a small CNN. Every method trains from the same initial weights and batch order.

    python benchmarks/digits.py --quick          # the README's demo: well under 2 minutes on 2 CPU cores
    python benchmarks/digits.py                  # the full comparison, 3 seeds (results/digits/compare_mlp.json)
    python benchmarks/digits.py --model cnn --epochs 20 --methods sgd,oho_global
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

import common


@dataclass
class Config(common.TrainConfig):
    model: str = "mlp"  # mlp | cnn
    width: int = 128
    depth: int = 4  # linear layers of the MLP
    n_val: int = 300
    n_test: int = 500
    n_train: int = 0  # 0: every example not in validation or test (997)
    data_seed: int = 0
    epochs: int = 100
    batch_size: int = 50
    val_batch_size: int = 100
    eval_batch_size: int = 1000
    seeds: int = 3
    threads: int = 1  # a tiny model: one thread is fastest, and immune to a busy second core

    PRESETS = {"quick": {"epochs": 20, "seeds": 1}}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"Unknown model {self.model!r} (mlp or cnn)")


def load_data(cfg: Config, device: torch.device) -> common.Data:
    """The digits split into train / validation / test tensors on ``device``."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(bunch.target, dtype=torch.int64)
    n_train = cfg.n_train or len(y) - cfg.n_val - cfg.n_test
    val, test, train = common.split_indices(len(y), (cfg.n_val, cfg.n_test, n_train), cfg.data_seed)
    splits = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[test], y[test])}
    return common.tensor_data(splits, cfg, device, num_classes=10, info={"dataset": "sklearn digits"})


def build_model(cfg: Config, data: common.Data) -> nn.Module:
    if cfg.model == "cnn":
        return common.small_cnn(1, 8, cfg.width // 4, data.num_classes)
    return common.mlp(64, cfg.width, cfg.depth, data.num_classes)


TASK = common.Task("digits", Config, load_data, build_model)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return common.compare_main(TASK, argv)


if __name__ == "__main__":
    main()
