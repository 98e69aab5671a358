r"""The meta-update: how a hypergradient moves one hyperparameter.

Each tuned scalar :math:`\theta` is updated through a reparameterisation :math:`\theta = f(\phi)`:

* ``space="raw"``: :math:`\phi = \theta` (the OHO paper's update :math:`\theta \leftarrow P(\theta - \alpha h)`).
* ``space="log"``: relative steps. lr and weight decay use :math:`\phi = \log(\theta + c)` with a small
  offset ``c`` (so that 0 is reachable and an initial 0 can grow); momentum uses
  :math:`\phi = -\log(1 - \mu)`, relative steps on :math:`1 - \mu`.

The gradient in :math:`\phi` is :math:`h\, d\theta/d\phi`; a meta-optimizer (``"sgd"`` or ``"adam"``)
steps :math:`\phi`, and :math:`P` projects :math:`f(\phi)` onto the bounds. Adam on a log-space
parameter moves :math:`\theta` by a bounded *relative* amount per step whatever the scale of the loss,
of the hyperparameter, or of the influence: the default, and the reason one meta learning rate serves
problems of very different scale. All of this is scalar work on Python floats, once per hyper-step.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple

__all__ = [
    "HYPERPARAMETERS",
    "DEFAULT_BOUNDS",
    "DEFAULT_META_LR",
    "LOG_OFFSET",
    "to_meta",
    "from_meta",
    "meta_derivative",
    "project",
    "meta_sgd_step",
    "meta_adam_step",
]

# lr_scale multiplies a scheduled lr (the effective lr is group["lr"] * group["lr_scale"]): tuning it
# lets a torch.optim.lr_scheduler own group["lr"] while OHO tunes the multiplier.
HYPERPARAMETERS: Tuple[str, ...] = ("lr", "lr_scale", "weight_decay", "momentum")

DEFAULT_BOUNDS: Dict[str, Tuple[float, float]] = {
    "lr": (0.0, math.inf),
    "lr_scale": (0.0, math.inf),
    "weight_decay": (0.0, math.inf),
    "momentum": (0.0, 0.999),
}

# Offsets of the log-space map theta = exp(phi) - c. Far below any value a run would use, large enough
# that a hyperparameter started at 0 leaves it in a few hundred Adam steps (c * e^(steps * meta_lr)).
LOG_OFFSET: Dict[str, float] = {"lr": 1e-8, "lr_scale": 1e-8, "weight_decay": 1e-6}

# Default meta learning rate per (meta_optimizer, space); None means there is no safe default.
# Evidence: benchmarks/defaults.py and benchmarks/results/defaults/.
DEFAULT_META_LR: Dict[Tuple[str, str], float] = {("adam", "log"): 0.02}


def to_meta(name: str, theta: float, space: str) -> float:
    """phi for ``theta`` (clamped into the map's domain)."""
    if space == "raw":
        return theta
    if name == "momentum":
        return -math.log(max(1.0 - theta, 1e-12))
    return math.log(max(theta, 0.0) + LOG_OFFSET[name])


def from_meta(name: str, phi: float, space: str) -> float:
    """theta for ``phi`` (before projection)."""
    if space == "raw":
        return phi
    if name == "momentum":
        return 1.0 - math.exp(-phi)
    return math.exp(phi) - LOG_OFFSET[name]


def meta_derivative(name: str, theta: float, space: str) -> float:
    """d theta / d phi at ``theta``."""
    if space == "raw":
        return 1.0
    if name == "momentum":
        return max(1.0 - theta, 1e-12)
    return max(theta, 0.0) + LOG_OFFSET[name]


def project(theta: float, bounds: Tuple[float, float]) -> float:
    """P: clip into ``[low, high]``."""
    low, high = bounds
    return min(max(theta, low), high)


def meta_sgd_step(phi: float, grad: float, *, lr: float) -> float:
    """phi - lr * grad."""
    return phi - lr * grad


def meta_adam_step(
    phi: float, grad: float, state: Dict[str, float], *, lr: float, betas: Tuple[float, float], eps: float
) -> float:
    r"""One Adam step on a scalar; ``state`` (keys m, v, t) is updated in place.

    .. math:: m \leftarrow \beta_1 m + (1-\beta_1) g,\ v \leftarrow \beta_2 v + (1-\beta_2) g^2,\
              \phi \leftarrow \phi - \alpha \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}
    """
    b1, b2 = betas
    t = state.get("t", 0.0) + 1.0
    m = b1 * state.get("m", 0.0) + (1.0 - b1) * grad
    v = b2 * state.get("v", 0.0) + (1.0 - b2) * grad * grad
    state.update(m=m, v=v, t=t)
    m_hat = m / (1.0 - b1**t)
    v_hat = v / (1.0 - b2**t)
    return phi - lr * m_hat / (math.sqrt(v_hat) + eps)
