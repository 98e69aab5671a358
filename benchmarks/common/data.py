"""Data: in-memory loaders, splits and synthetic images."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F


class TensorLoader:
    """Minibatches of tensors that already live on the device, reshuffled at every pass.

    The small datasets (digits, MNIST) fit in memory, where a DataLoader's per-sample collation would
    cost more than the model. ``generator`` is public so that :meth:`Data.reseed` can give every method
    the same batch order.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, shuffle: bool,
                 drop_last: bool = False) -> None:
        self.x, self.y = x, y
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.generator = torch.Generator()

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.y.device)
        else:
            order = None
        for k in range(len(self)):
            lo, hi = k * self.batch_size, min((k + 1) * self.batch_size, n)
            if order is None:
                yield self.x[lo:hi], self.y[lo:hi]
            else:
                idx = order[lo:hi]
                yield self.x[idx], self.y[idx]


@dataclass
class Data:
    """A task's splits as loaders.

    ``train`` yields shuffled (augmented, where the task augments) training batches; ``val`` yields
    shuffled validation batches, the only data OHO's hypergradients see; ``evals`` maps a split name to a
    fixed-order loader used for reporting (test is only ever reported, never tuned on).
    """

    train: Iterable
    val: Iterable
    evals: Dict[str, Iterable]
    num_classes: int
    synthetic: bool = False
    info: Dict[str, Any] = field(default_factory=dict)

    def reseed(self, seed: int) -> None:
        """Reset the shuffling generators so that every method sees the same batch order."""
        for offset, loader in enumerate((self.train, self.val)):
            generator = getattr(loader, "generator", None)
            if generator is not None:
                generator.manual_seed(seed * 1000 + offset)


def split_indices(n: int, sizes: Sequence[int], seed: int) -> List[torch.Tensor]:
    """Disjoint random index sets of the given sizes (the rest of ``n`` goes unused)."""
    if sum(sizes) > n:
        raise ValueError(f"Split sizes {list(sizes)} exceed the {n} available examples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    bounds = np.cumsum([0, *sizes])
    return [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]


def tensor_data(splits: Dict[str, Tuple[torch.Tensor, torch.Tensor]], cfg: Any, device: torch.device,
                num_classes: int, synthetic: bool = False, info: Optional[Dict[str, Any]] = None) -> Data:
    """:class:`Data` over in-memory ``{"train"|"val"|"test": (x, y)}`` tensors moved to ``device``."""
    on_device = {k: (x.to(device), y.to(device)) for k, (x, y) in splits.items()}
    sizes = {k: len(y) for k, (_, y) in on_device.items()}
    return Data(
        train=TensorLoader(*on_device["train"], cfg.batch_size, shuffle=True, drop_last=True),
        val=TensorLoader(*on_device["val"], cfg.val_batch_size, shuffle=True, drop_last=True),
        evals={k: TensorLoader(x, y, cfg.eval_batch_size, shuffle=False) for k, (x, y) in on_device.items()},
        num_classes=num_classes,
        synthetic=synthetic,
        info={"sizes": sizes, **(info or {})},
    )


def synthetic_images(n: int, shape: Sequence[int], num_classes: int, seed: int, noise: float = 0.35,
                     as_uint8: bool = False, chunk: int = 8192) -> Tuple[torch.Tensor, torch.Tensor]:
    """Images in [0, 1] (or 0..255 bytes) with a learnable class signal, for ``--synthetic`` runs.

    Each class has a smooth random prototype (an upsampled 4x4 random pattern); an example is its class
    prototype plus pixel noise, clipped. Classes overlap, so losses fall over several epochs instead of
    reaching zero at once. Generated ``chunk`` examples at a time to bound memory.
    """
    g = torch.Generator().manual_seed(seed)
    channels, height, width = shape
    coarse = torch.rand(num_classes, channels, 4, 4, generator=g)
    prototypes = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
    labels = torch.randint(num_classes, (n,), generator=g)
    images = torch.empty(n, channels, height, width, dtype=torch.uint8 if as_uint8 else torch.float32)
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        block = prototypes[labels[lo:hi]] * 0.5 + 0.25
        block += noise * torch.randn(hi - lo, channels, height, width, generator=g)
        block.clamp_(0.0, 1.0)
        images[lo:hi] = (block * 255).round() if as_uint8 else block
    return images, labels
