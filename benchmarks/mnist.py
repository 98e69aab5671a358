"""OHO against the paper's baselines on MNIST, the paper's protocol.

torchvision's MNIST (downloaded into ``--data-dir`` unless ``--download false``): the 60,000 training
images split at random (fixed ``data_seed``) into 50,000 training and 10,000 validation images, the
10,000 test images for reporting only; pixels scaled to [0, 1]. Models: the 4-layer MLP with 128 units
(``--model mlp``) or a 4-layer CNN (``--model cnn``), ReLU. The data lives on the device as tensors.

    python benchmarks/mnist.py --model mlp
    python benchmarks/mnist.py --model cnn --epochs 20
    python benchmarks/mnist.py --synthetic --epochs 2    # no download: generated 28x28 images
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
    depth: int = 4
    data_dir: str = "data"
    download: bool = True
    synthetic: bool = False  # generated images of MNIST's shape with a learnable class signal
    n_train: int = 50000
    n_val: int = 10000
    n_test: int = 10000
    data_seed: int = 0
    epochs: int = 100
    batch_size: int = 100
    val_batch_size: int = 100

    PRESETS = {"quick": {"epochs": 3, "n_train": 10000}}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.model not in ("mlp", "cnn"):
            raise ValueError(f"Unknown model {self.model!r} (mlp or cnn)")


def _mnist_tensors(cfg: Config):
    """(train+validation images, labels, test images, labels) from torchvision, pixels in [0, 1]."""
    from torchvision import datasets

    try:
        train = datasets.MNIST(cfg.data_dir, train=True, download=cfg.download)
        test = datasets.MNIST(cfg.data_dir, train=False, download=cfg.download)
    except (RuntimeError, OSError) as error:
        raise SystemExit(f"MNIST is not available under {cfg.data_dir!r} ({error}); "
                         "pass --synthetic true to run the pipeline on generated data") from None

    def scale(ds):
        return ds.data.unsqueeze(1).float() / 255.0, ds.targets.long()

    return (*scale(train), *scale(test))


def load_data(cfg: Config, device: torch.device) -> common.Data:
    """Train / validation / test tensors on ``device`` (real MNIST or its synthetic stand-in)."""
    if cfg.synthetic:
        # One draw, so that the test images come from the same class prototypes as the training ones.
        n = cfg.n_train + cfg.n_val
        x, y = common.synthetic_images(n + cfg.n_test, (1, 28, 28), 10, seed=cfg.data_seed)
        x, y, x_test, y_test = x[:n], y[:n], x[n:], y[n:]
        source = "synthetic"
    else:
        x, y, x_test, y_test = _mnist_tensors(cfg)
        x_test, y_test = x_test[:cfg.n_test], y_test[:cfg.n_test]
        source = "torchvision MNIST"
    val, train = common.split_indices(len(y), (cfg.n_val, cfg.n_train), cfg.data_seed)
    splits = {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x_test, y_test)}
    return common.tensor_data(splits, cfg, device, num_classes=10, synthetic=cfg.synthetic,
                              info={"dataset": source})


def build_model(cfg: Config, data: common.Data) -> nn.Module:
    if cfg.model == "cnn":
        return common.small_cnn(1, 28, cfg.width // 4, data.num_classes)
    return common.mlp(28 * 28, cfg.width, cfg.depth, data.num_classes)


TASK = common.Task("mnist", Config, load_data, build_model)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return common.compare_main(TASK, argv)


if __name__ == "__main__":
    main()
