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

:func:`meta_update_` is the whole policy of one hyper-step: a value changed from outside since the last
hyper-step (by the user, a scheduler, a checkpoint edit) is the new starting point and its meta-optimizer
state restarts; ``meta_lr = 0`` leaves the value bit-identical; the result is projected onto the bounds;
and nothing is written (values nor meta-optimizer state) unless every hypergradient, the loss and every
new value are finite.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, MutableMapping, Sequence, Tuple

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
    "MetaConfig",
    "meta_update_",
    "COMMITTED",
    "NONFINITE_HYPERGRADIENT",
    "NONFINITE_RESULT",
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


@dataclass(frozen=True)
class MetaConfig:
    """The meta-update's constants (validated by :class:`ohotorch.options.Options`)."""

    meta_lr: Mapping[str, float]
    optimizer: str  # "adam" or "sgd"
    betas: Tuple[float, float]
    eps: float
    space: str  # "log" or "raw"
    bounds: Mapping[str, Tuple[float, float]]


COMMITTED = "committed"
NONFINITE_HYPERGRADIENT = "nonfinite_hypergradient"
NONFINITE_RESULT = "nonfinite_result"


def meta_update_(
    param_groups: Sequence[MutableMapping[str, Any]],
    hypergradients: Sequence[Tuple[int, str, float]],
    loss: float,
    meta_state: MutableMapping[str, Dict[str, float]],
    config: MetaConfig,
) -> str:
    """One hyper-step: move every ``param_groups[g][name]`` by its hypergradient, all or nothing.

    ``hypergradients`` lists ``(group index, name, dL/dtheta)``; ``meta_state`` maps ``"g/name"`` to
    the meta-optimizer state of that value (Adam's m, v, t and ``"written"``, the value this function
    last wrote). Returns :data:`COMMITTED`, or :data:`NONFINITE_HYPERGRADIENT` /
    :data:`NONFINITE_RESULT` when it changed nothing at all (neither values nor state).
    """
    if not (math.isfinite(loss) and all(math.isfinite(h) for _, _, h in hypergradients)):
        return NONFINITE_HYPERGRADIENT
    proposals: List[Tuple[int, str, float, Dict[str, float]]] = []
    for index, name, h in hypergradients:
        if name not in config.meta_lr:
            raise ValueError(f"meta_lr has no value for {name!r} (tuned in param group {index})")
        theta = float(param_groups[index][name])
        key = f"{index}/{name}"
        state = dict(meta_state.get(key, {}))  # a copy: committed only with the new value
        previous = state.get("written", theta)
        if previous != theta:
            # Set from outside: the moments measured at the old scale would freeze or fling it.
            state.clear()
            if name == "lr":
                warnings.warn(
                    f"OHO: the lr of param group {index} was changed from outside since the last hyper_step "
                    f"({previous} -> {theta}); OHO continues from the new value. If a "
                    "scheduler (e.g. ReduceLROnPlateau) sets it, tune 'lr_scale' instead of 'lr' so the "
                    "two do not overwrite each other."
                )
        phi = to_meta(name, theta, config.space)
        grad = h * meta_derivative(name, theta, config.space)
        lr = config.meta_lr[name]
        if config.optimizer == "adam":
            new_phi = meta_adam_step(phi, grad, state, lr=lr, betas=config.betas, eps=config.eps)
        else:
            new_phi = meta_sgd_step(phi, grad, lr=lr)
        new_theta = project(from_meta(name, new_phi, config.space), config.bounds[name])
        if lr == 0.0:
            new_theta = theta  # meta_lr = 0: hypergradients only, bit-identical hyperparameters
        proposals.append((index, name, new_theta, state))
    if not all(math.isfinite(theta) for _, _, theta, _ in proposals):
        return NONFINITE_RESULT
    for index, name, theta, state in proposals:
        param_groups[index][name] = theta
        state["written"] = theta
        meta_state[f"{index}/{name}"] = state
    return COMMITTED
