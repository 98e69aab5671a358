"""Models shared by the small tasks."""
from __future__ import annotations

from typing import List

from torch import nn


def mlp(in_features: int, width: int, depth: int, num_classes: int) -> nn.Sequential:
    """``depth`` linear layers (depth - 1 hidden layers of ``width`` units, ReLU) on flattened input."""
    if depth < 1:
        raise ValueError(f"Invalid depth: {depth}")
    layers: List[nn.Module] = [nn.Flatten()]
    features = in_features
    for _ in range(depth - 1):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    layers.append(nn.Linear(features, num_classes))
    return nn.Sequential(*layers)


def small_cnn(in_channels: int, image_size: int, width: int, num_classes: int) -> nn.Sequential:
    """Four layers: two 3x3 conv + ReLU + 2x2 max-pool blocks (width, 2 * width channels), a hidden
    fully connected layer of 4 * width units and the classifier."""
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(2 * width * side * side, 4 * width), nn.ReLU(),
        nn.Linear(4 * width, num_classes),
    )
