"""Shared pieces of the hypergradient benchmarks (hypergrad_*.py): digits data, a functional MLP, records.

Every experiment runs on scikit-learn's bundled digits (1797 8x8 images; no download), in float64 on the
CPU, and writes one results file under benchmarks/results/hypergrad/ with its configuration, library
versions and machine (common.environment), and a figure beside it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F

import common

RESULTS = common.RESULTS_DIR / "hypergrad"
DT = torch.float64


@dataclass
class BaseConfig:
    """Options every hypergradient benchmark has."""

    seed: int = 0
    threads: int = 1  # torch CPU threads
    out: str = ""  # results file; default benchmarks/results/hypergrad/<script>.json
    quick: bool = False  # a smoke-test size (seconds)


def digits(sizes: Sequence[int], seed: int, standardise: bool = True) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Disjoint random splits of the digits of the given sizes (0: the rest), features in [0, 1] (or
    standardised with the first split's statistics), float64."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.data, dtype=DT) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    sizes = list(sizes)
    if 0 in sizes:
        sizes[sizes.index(0)] = len(y) - sum(sizes)
    parts = [(x[i], y[i]) for i in common.split_indices(len(y), sizes, seed)]
    if standardise:
        mean, std = parts[0][0].mean(0), parts[0][0].std(0) + 0.1
        parts = [((a - mean) / std, b) for a, b in parts]
    return parts


def mlp_init(sizes: Sequence[int], seed: int, scale: float = 1.0) -> List[torch.Tensor]:
    """Weights and biases of a tanh MLP, weights N(0, 1) * scale / sqrt(fan_in), biases 0."""
    g = torch.Generator().manual_seed(seed)
    params = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        params.append(torch.randn(fan_in, fan_out, generator=g, dtype=DT) * scale / math.sqrt(fan_in))
        params.append(torch.zeros(fan_out, dtype=DT))
    return params


def mlp_forward(w: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    for i in range(0, len(w), 2):
        x = x @ w[i] + w[i + 1]
        if i + 2 < len(w):
            x = torch.tanh(x)
    return x


def layer_groups(params: Sequence[torch.Tensor]) -> List[int]:
    """Group index per parameter tensor: one group per layer (weight and bias)."""
    return [i // 2 for i in range(len(params))]


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).double().mean())


def loss_acc(w: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> Dict[str, float]:
    with torch.no_grad():
        out = mlp_forward(w, x)
        return {"loss": float(F.cross_entropy(out, y)), "acc": accuracy(out, y)}


def header(cfg: Any, script: str) -> Dict[str, Any]:
    """The part of a results file every benchmark writes first: what ran, with what, on what."""
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    return {"kind": script, "synthetic": False, "dataset": "sklearn digits (8x8, 1797 images)",
            "config": dataclasses.asdict(cfg), "environment": common.environment(torch.device("cpu")),
            "load_average_at_start": list(os.getloadavg()), "started": time.time()}


def write(payload: Dict[str, Any], cfg: Any, script: str) -> Path:
    payload["seconds"] = time.time() - payload.pop("started")
    payload["load_average_at_end"] = list(os.getloadavg())  # other work on the machine slows wall-clock times
    path = Path(cfg.out) if cfg.out else RESULTS / f"{script}.json"
    common.write_results(payload, path)
    print(f"wrote {path}")
    return path


def figure_path(results: Path) -> Path:
    return results.with_suffix(".png")
