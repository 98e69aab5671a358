r"""Euclidean projections onto constraint sets and projected outer steps (Franceschi et al. 2017).

The outer problem ``min_{h in H} f(h)`` with a constraint set H is solved by projected steps::

    h <- P_H(h - alpha * df/dh)                       (projected gradient descent)
    h <- P_H(h - alpha * m_hat / (sqrt(v_hat) + eps))  (projected Adam: Adam's step, then the projection)

where ``P_H(y) = argmin_{x in H} ||x - y||_2``. Projections here (all O(m log m) or better for m entries,
O(m) memory, applied to the flattened tensor):

* :func:`project_box`: ``lo <= x <= hi`` (clamp).
* :func:`project_simplex`: ``x >= 0, sum x = r`` (sort-based; Held, Wolfe & Crowder 1974, Duchi et al. 2008).
* :func:`project_l1_ball`: ``||x||_1 <= r`` (sign times the simplex projection of |y| when ||y||_1 > r).
* :func:`project_box_budget`: ``lo <= x <= hi, sum x <= r`` (a capped simplex: x = clamp(y - tau, lo, hi)
  with the smallest tau >= 0 meeting the budget, found by bisection to machine precision) - the data
  hyper-cleaning constraint of one weight in [0, 1] per training example with an L1 budget.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor

__all__ = ["project_box", "project_simplex", "project_l1_ball", "project_box_budget", "ProjectedAdam",
           "projected_sgd_step"]

Projection = Callable[[Tensor], Tensor]


def _check_radius(radius: float) -> None:
    if not radius > 0:
        raise ValueError(f"Invalid radius: {radius} (must be > 0)")


def project_box(x: Tensor, lo: Optional[float] = None, hi: Optional[float] = None) -> Tensor:
    """Projection onto ``lo <= x <= hi`` (either bound may be None)."""
    if lo is not None and hi is not None and lo > hi:
        raise ValueError(f"Invalid box: lo = {lo} > hi = {hi}")
    return x.clamp(min=lo, max=hi)


def project_simplex(x: Tensor, radius: float = 1.0) -> Tensor:
    """Projection onto ``{x >= 0, sum x = radius}`` (all entries of the tensor together)."""
    _check_radius(radius)
    y = x.reshape(-1)
    u, _ = torch.sort(y, descending=True)
    cumulative = torch.cumsum(u, 0) - radius
    index = torch.arange(1, y.numel() + 1, dtype=y.dtype, device=y.device)
    rho = int(torch.nonzero(u - cumulative / index > 0).max())
    tau = cumulative[rho] / (rho + 1)
    return (y - tau).clamp(min=0).reshape(x.shape)


def project_l1_ball(x: Tensor, radius: float = 1.0) -> Tensor:
    """Projection onto ``{||x||_1 <= radius}``."""
    _check_radius(radius)
    if x.abs().sum() <= radius:
        return x.clone()
    return torch.sign(x) * project_simplex(x.abs(), radius)


def project_box_budget(x: Tensor, lo: float = 0.0, hi: float = 1.0, radius: float = 1.0, iters: int = 200) -> Tensor:
    """Projection onto ``{lo <= x <= hi, sum x <= radius}``; needs ``lo * numel <= radius``.

    KKT: x = clamp(y - tau, lo, hi) with tau = 0 if that meets the budget, else the tau > 0 where the sum
    equals ``radius`` (the sum is continuous and non-increasing in tau: bisection).
    """
    if lo > hi:
        raise ValueError(f"Invalid box: lo = {lo} > hi = {hi}")
    if lo * x.numel() > radius:
        raise ValueError(f"Empty set: lo * numel = {lo * x.numel()} > radius = {radius}")
    clipped = x.clamp(lo, hi)
    if clipped.sum() <= radius:
        return clipped
    low, high = 0.0, float((x - lo).max())  # at tau = high every entry sits at lo: sum <= radius
    for _ in range(iters):
        mid = 0.5 * (low + high)
        if mid in (low, high):
            break
        if float((x - mid).clamp(lo, hi).sum()) > radius:
            low = mid
        else:
            high = mid
    return (x - high).clamp(lo, hi)


def projected_sgd_step(hypers: Mapping[str, Tensor], grads: Mapping[str, Tensor], lr: float,
                       projections: Optional[Mapping[str, Projection]] = None) -> Dict[str, Tensor]:
    """One projected gradient step on every hyperparameter in ``grads``: P(h - lr * g). Out of place."""
    projections = dict(projections or {})
    out = dict(hypers)
    for name, g in grads.items():
        new = hypers[name] - lr * g
        out[name] = projections[name](new) if name in projections else new
    return out


@dataclass
class ProjectedAdam:
    """Adam on hyperparameters followed by projections: ``step(hypers, grads) -> new hypers``.

    ``lr`` may be a number or a dict name -> number. The moments live in ``state`` (one pair per name).
    A non-finite hypergradient leaves every hyperparameter unchanged and raises ``FloatingPointError``.
    """

    lr: Union[float, Mapping[str, float]] = 1e-2
    betas: Tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    projections: Dict[str, Projection] = field(default_factory=dict)
    state: Dict[str, Dict[str, Tensor]] = field(default_factory=dict)
    steps: int = 0

    def step(self, hypers: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        for name, g in grads.items():
            if not torch.isfinite(g).all():
                raise FloatingPointError(f"non-finite hypergradient for {name!r}; hyperparameters unchanged")
        self.steps += 1
        b1, b2 = self.betas
        out = dict(hypers)
        for name, g in grads.items():
            st = self.state.setdefault(name, {"m": torch.zeros_like(g), "v": torch.zeros_like(g)})
            st["m"] = b1 * st["m"] + (1 - b1) * g
            st["v"] = b2 * st["v"] + (1 - b2) * g * g
            m_hat = st["m"] / (1 - b1 ** self.steps)
            v_hat = st["v"] / (1 - b2 ** self.steps)
            lr = self.lr[name] if isinstance(self.lr, Mapping) else self.lr
            new = hypers[name] - lr * m_hat / (v_hat.sqrt() + self.eps)
            out[name] = self.projections[name](new) if name in self.projections else new
        return out
