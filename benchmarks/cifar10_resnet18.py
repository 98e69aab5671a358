"""OHO against the paper's baselines on CIFAR10 with ResNet18, the paper's protocol.

torchvision's CIFAR10 (downloaded into ``--data-dir`` unless ``--download false``): the 50,000 training
images split at random (fixed ``data_seed``) into 45,000 training and 5,000 validation images, the
10,000 test images for reporting only. Pixels are scaled to [0, 1] (``ToTensor``, no normalisation);
random crop (padding 4) and horizontal flip apply to the training subset only: the validation subset
and every evaluation read a second dataset object whose transform does not augment. The model is
torchvision's ResNet18 adapted to 32x32 inputs (3x3 stride-1 stem, no max-pool, 10 classes); OHO gets
``module=model`` so that its extra evaluations leave the BatchNorm statistics as one training step would.

    python benchmarks/cifar10_resnet18.py --methods oho_global,sgd,cosine            # 300 epochs
    python benchmarks/cifar10_resnet18.py --epochs 30 --bf16 true --methods oho_layer_blockwise
    python benchmarks/cifar10_resnet18.py --synthetic --epochs 1 --n-train 512       # no download

``oho_layer_exact`` carries one tangent per (layer, hyperparameter): 124 for ResNet18 with lr and weight
decay, each costing one extra gradient per step; it is in the default method list for completeness, not
for 300-epoch runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

import common


@dataclass
class Config(common.TrainConfig):
    model: str = "resnet18"
    data_dir: str = "data"
    download: bool = True
    synthetic: bool = False  # generated 32x32 RGB images with a learnable class signal
    image_size: int = 32  # synthetic only: smaller images make CPU smoke tests fast
    n_train: int = 45000
    n_val: int = 5000
    n_test: int = 10000
    train_eval_size: int = 5000  # un-augmented training images evaluated each epoch (0: none)
    data_seed: int = 0
    workers: int = 4  # DataLoader worker processes
    epochs: int = 300
    batch_size: int = 100
    val_batch_size: int = 1000  # the OHO reference code's validation batch
    eval_batch_size: int = 1000
    weight_decay: float = 5e-4

    PRESETS = {"quick": {"epochs": 5}}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size != 32 and not self.synthetic:
            raise ValueError("--image-size applies to --synthetic data only (CIFAR10 images are 32x32)")


class ImageArray(Dataset):
    """CIFAR10's interface (uint8 HWC ``data``, ``targets``, PIL images through ``transform``) over
    arrays in memory: the ``--synthetic`` stand-in runs exactly the pipeline of the real data."""

    def __init__(self, data: np.ndarray, targets: Sequence[int], transform: Optional[Callable] = None) -> None:
        self.data, self.targets, self.transform = data, list(targets), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Any:
        from PIL import Image

        image = Image.fromarray(self.data[index])
        return (self.transform(image) if self.transform else image), self.targets[index]


def _transforms(size: int):
    """(training transform with augmentation, evaluation transform): both scale pixels to [0, 1]."""
    from torchvision import transforms

    train = transforms.Compose([transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor()])
    return train, transforms.ToTensor()


def _datasets(cfg: Config):
    """(augmented training-set view, plain training-set view, plain test set): two views of the same
    50,000 images with separate transform objects, so the validation subset is never augmented."""
    augment, plain = _transforms(cfg.image_size)
    if cfg.synthetic:
        n = cfg.n_train + cfg.n_val
        images, labels = common.synthetic_images(n + cfg.n_test, (3, cfg.image_size, cfg.image_size), 10,
                                                 seed=cfg.data_seed, as_uint8=True)
        data, targets = images.permute(0, 2, 3, 1).contiguous().numpy(), labels.tolist()
        return (ImageArray(data[:n], targets[:n], augment), ImageArray(data[:n], targets[:n], plain),
                ImageArray(data[n:], targets[n:], plain))
    from torchvision import datasets

    try:
        train_augmented = datasets.CIFAR10(cfg.data_dir, train=True, transform=augment, download=cfg.download)
        train_plain = datasets.CIFAR10(cfg.data_dir, train=True, transform=plain)
        test = datasets.CIFAR10(cfg.data_dir, train=False, transform=plain, download=cfg.download)
    except (RuntimeError, OSError) as error:
        raise SystemExit(f"CIFAR10 is not available under {cfg.data_dir!r} ({error}); "
                         "pass --synthetic true to run the pipeline on generated data") from None
    return train_augmented, train_plain, test


def load_data(cfg: Config, device: torch.device) -> common.Data:
    """DataLoaders over the 45,000 / 5,000 / 10,000 split (augmenting the training subset only)."""
    train_augmented, train_plain, test = _datasets(cfg)
    val_idx, train_idx = common.split_indices(len(train_plain), (cfg.n_val, cfg.n_train), cfg.data_seed)
    test_idx = np.arange(min(cfg.n_test, len(test)))
    pin = device.type == "cuda"

    def loader(dataset: Dataset, indices: Any, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(Subset(dataset, indices.tolist()), batch_size=batch_size, shuffle=shuffle,
                          drop_last=shuffle, num_workers=cfg.workers, pin_memory=pin,
                          generator=torch.Generator() if shuffle else None)

    evals = {"val": loader(train_plain, val_idx, cfg.eval_batch_size, False),
             "test": loader(test, test_idx, cfg.eval_batch_size, False)}
    if cfg.train_eval_size:
        evals = {"train": loader(train_plain, train_idx[:cfg.train_eval_size], cfg.eval_batch_size, False), **evals}
    return common.Data(
        train=loader(train_augmented, train_idx, cfg.batch_size, True),
        val=loader(train_plain, val_idx, cfg.val_batch_size, True),
        evals=evals,
        num_classes=10,
        synthetic=cfg.synthetic,
        info={"dataset": "synthetic" if cfg.synthetic else "torchvision CIFAR10",
              "sizes": {"train": len(train_idx), "val": len(val_idx), "test": len(test_idx),
                        "train_eval": min(cfg.train_eval_size, len(train_idx))},
              "augmentation": "RandomCrop(32, padding=4) + RandomHorizontalFlip on train only"},
    )


def build_model(cfg: Config, data: common.Data) -> nn.Module:
    """torchvision's ResNet18 with a 3x3 stride-1 stem and no max-pool, for 32x32 images."""
    from torchvision.models import resnet18

    model = resnet18(weights=None, num_classes=data.num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


TASK = common.Task("cifar10", Config, load_data, build_model)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return common.compare_main(TASK, argv)


if __name__ == "__main__":
    main()
