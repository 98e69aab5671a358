r"""``Options``: the single home of the meta-update and influence options, their defaults and checks.

Every inner optimizer (:class:`ohotorch.OHO`, :class:`ohotorch.OHOAdam`, :class:`ohotorch.OHOAdamW`)
takes the same keyword options; their meaning is documented on :class:`ohotorch.OHO`. Constructing an
``Options`` validates and normalises them: ``meta_lr`` becomes ``{name: float}`` and ``bounds`` the
complete ``{name: (low, high)}`` map.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from . import averaging, meta

__all__ = ["Options", "real", "canonical_tune"]


def real(value: Any, what: str) -> float:
    """``value`` as a float, refusing tensors and non-numbers with an error naming ``what``."""
    if isinstance(value, Tensor):
        raise TypeError(f"{what} must be a Python number, got a Tensor (tensor {what} is not supported)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    return float(value)


def canonical_tune(tune: Any, allowed: Tuple[str, ...] = meta.HYPERPARAMETERS) -> Tuple[str, ...]:
    """``tune`` as a tuple of names in the canonical order of ``allowed``; unknown names refused."""
    if isinstance(tune, str):
        tune = (tune,)
    try:
        names = tuple(tune)
    except TypeError:
        raise TypeError(f"tune must be a collection of hyperparameter names, got {tune!r}") from None
    for name in names:
        if not isinstance(name, str) or name not in allowed:
            raise ValueError(f"Unknown hyperparameter in tune: {name!r}; tunable ones are {allowed}")
    return tuple(n for n in allowed if n in names)


@dataclass
class Options:
    """The options shared by every inner optimizer, validated on construction (see :class:`ohotorch.OHO`).

    After construction ``meta_lr`` maps every hyperparameter that has a meta learning rate to it: all of
    them for a float or a default, only the given names for a mapping when ``(meta_optimizer, space)``
    has no default (a tuned name without one is refused by :meth:`check_tuned`).
    """

    meta_lr: Union[None, float, Mapping[str, float]] = None
    meta_optimizer: str = "adam"
    meta_betas: Tuple[float, float] = (0.9, 0.999)
    meta_eps: float = 1e-15
    space: str = "log"
    bounds: Optional[Mapping[str, Tuple[float, float]]] = None
    influence: str = "exact"
    hvp: str = "forward"
    fd_rel: Optional[float] = None
    compute_dtype: Optional[torch.dtype] = None
    reset_every: Optional[int] = None
    discount: float = 0.0
    growth_cap: Optional[float] = None
    average: Optional[float] = None
    module: Optional[nn.Module] = None
    foreach: Optional[bool] = None
    fast_start: Union[None, float, str] = "auto"
    fast_start_growth: Optional[float] = 10.0
    lr_down: Union[float, str] = "auto"

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def __post_init__(self) -> None:
        if self.meta_optimizer not in ("adam", "sgd"):
            raise ValueError(f"Invalid meta_optimizer: {self.meta_optimizer!r} (use 'adam' or 'sgd')")
        if self.space not in ("log", "raw"):
            raise ValueError(f"Invalid space: {self.space!r} (use 'log' or 'raw')")
        if self.influence not in ("exact", "blockwise"):
            raise ValueError(f"Invalid influence: {self.influence!r} (use 'exact' or 'blockwise')")
        if self.hvp not in ("forward", "central", "none"):
            raise ValueError(f"Invalid hvp: {self.hvp!r} (use 'forward', 'central' or 'none')")
        beta1, beta2 = self.meta_betas
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"Invalid meta_betas: {self.meta_betas!r} (each in [0, 1))")
        if not (self.meta_eps >= 0.0 and math.isfinite(self.meta_eps)):
            raise ValueError(f"Invalid meta_eps: {self.meta_eps!r}")
        if self.fd_rel is not None and not (math.isfinite(self.fd_rel) and self.fd_rel > 0.0):
            raise ValueError(f"Invalid fd_rel: {self.fd_rel!r} (a positive number)")
        if self.compute_dtype is not None and not (isinstance(self.compute_dtype, torch.dtype)
                                                   and self.compute_dtype.is_floating_point):
            raise TypeError("compute_dtype must be a floating torch.dtype (e.g. torch.bfloat16), "
                            f"got {self.compute_dtype!r}")
        if self.reset_every is not None and (
            isinstance(self.reset_every, bool) or not isinstance(self.reset_every, int) or self.reset_every < 1
        ):
            raise ValueError(f"Invalid reset_every: {self.reset_every!r} (a positive integer or None)")
        if not (0.0 <= real(self.discount, "discount") <= 1.0):
            raise ValueError(f"Invalid discount: {self.discount!r} (gamma in [0, 1])")
        if self.growth_cap is not None:
            cap = real(self.growth_cap, "growth_cap")
            if not (math.isfinite(cap) and cap >= 0.0):
                raise ValueError(f"Invalid growth_cap: {self.growth_cap!r} (a finite number >= 0, or None)")
            self.growth_cap = cap
        self.average = averaging.check_power(self.average)
        if self.module is not None and not isinstance(self.module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(self.module).__name__}")
        if isinstance(self.fast_start, str) and self.fast_start == "auto":  # on where it means the same everywhere
            self.fast_start = meta.DEFAULT_FAST_START.get((self.meta_optimizer, self.space))
        if self.fast_start is not None:
            fast = real(self.fast_start, "fast_start")
            if not (math.isfinite(fast) and fast > 0.0):
                raise ValueError(f"Invalid fast_start: {self.fast_start!r} (a meta learning rate > 0, or None)")
            if (self.meta_optimizer, self.space) != ("adam", "log"):
                raise ValueError(
                    f"fast_start needs meta_optimizer='adam', space='log' (got {self.meta_optimizer!r}, "
                    f"{self.space!r}): only there is a meta learning rate a relative step size, the same "
                    "for every problem")
            self.fast_start = fast
        if self.fast_start_growth is not None:
            growth = real(self.fast_start_growth, "fast_start_growth")
            if not (math.isfinite(growth) and growth > 1.0):
                raise ValueError(f"Invalid fast_start_growth: {self.fast_start_growth!r} (a factor > 1, or None)")
            self.fast_start_growth = growth
        if isinstance(self.lr_down, str) and self.lr_down == "auto":
            self.lr_down = meta.DEFAULT_LR_DOWN.get((self.meta_optimizer, self.space), 1.0)
        down = real(self.lr_down, "lr_down")
        if not (0.0 < down <= 1.0):
            raise ValueError(f"Invalid lr_down: {self.lr_down!r} (a factor in (0, 1]; 1 for symmetric steps)")
        self.lr_down = down
        self.meta_lr = _check_meta_lr(self.meta_lr, self.meta_optimizer, self.space)
        self.meta_betas = (float(beta1), float(beta2))
        self.meta_eps = float(self.meta_eps)
        self.bounds = _check_bounds(self.bounds)
        self.discount = float(self.discount)

    def check_tuned(self, tune: Tuple[str, ...]) -> None:
        """Refuse tuned names that have no meta learning rate (a partial mapping without a default)."""
        missing = [name for name in tune if name not in self.meta_lr]  # type: ignore[operator]
        if missing:
            raise ValueError(
                f"meta_lr has no value for {missing}: with meta_optimizer={self.meta_optimizer!r}, "
                f"space={self.space!r} there is no default meta learning rate, so a meta_lr mapping must name "
                "every tuned hyperparameter"
            )


def _check_meta_lr(meta_lr: Any, meta_optimizer: str, space: str) -> Dict[str, float]:
    default = meta.DEFAULT_META_LR.get((meta_optimizer, space))
    if meta_lr is None:
        if default is None:
            raise ValueError(
                f"meta_lr is required with meta_optimizer={meta_optimizer!r}, space={space!r}: "
                "its scale depends on the problem (the OHO paper used 1e-5 for CIFAR10, 1e-4 for MNIST)"
            )
        return {name: default for name in meta.HYPERPARAMETERS}
    if isinstance(meta_lr, Mapping):
        unknown = set(meta_lr) - set(meta.HYPERPARAMETERS)
        if unknown:
            raise ValueError(f"Unknown hyperparameter in meta_lr: {sorted(unknown)}")
        # Names left out take this (meta_optimizer, space)'s default; without one they stay absent.
        base = {} if default is None else {name: default for name in meta.HYPERPARAMETERS}
        values = {**base, **{k: real(v, f"meta_lr[{k!r}]") for k, v in meta_lr.items()}}
    else:
        values = {name: real(meta_lr, "meta_lr") for name in meta.HYPERPARAMETERS}
    for name, value in values.items():
        if not (math.isfinite(value) and value >= 0.0):
            raise ValueError(f"Invalid meta_lr for {name}: {value}")
    return {name: values[name] for name in meta.HYPERPARAMETERS if name in values}


def _check_bounds(bounds: Optional[Mapping[str, Tuple[float, float]]]) -> Dict[str, Tuple[float, float]]:
    result = dict(meta.DEFAULT_BOUNDS)
    for name, pair in (bounds or {}).items():
        if name not in meta.HYPERPARAMETERS:
            raise ValueError(f"Unknown hyperparameter in bounds: {name!r}")
        low, high = (real(v, f"bounds[{name!r}]") for v in pair)
        default_low, default_high = meta.DEFAULT_BOUNDS[name]
        if math.isnan(low) or math.isnan(high) or low > high or low < default_low or high > default_high:
            raise ValueError(
                f"Invalid bounds for {name}: ({low}, {high}); they must satisfy "
                f"{default_low} <= low <= high <= {default_high}"
            )
        result[name] = (low, high)
    return result
