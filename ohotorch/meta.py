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
problems of very different scale.

**Robustness.** Two guards bound what one hyper-step can do. The meta-Adam gradient is clipped to
:math:`\pm\max(k\sqrt{\hat v_{t-1}},\ \sqrt{g\, v_{t-1} / (1-\beta_2)})` (:data:`META_CLIP` = k = 5,
:data:`META_V_GROWTH` = g = 0.4; from the second step on, where :math:`v_{t-1} > 0`): one outlier
validation batch (a loss 1e19 times larger, say) then raises the second moment by a bounded factor
(at most 1 + g once Adam's average holds many steps, :math:`k^2`-limited in its first steps) instead of
freezing tuning for the ~1/(1-beta2) steps that an inflated second moment takes to decay, while the
ordinary heavy tail of hypergradients is left alone late in a run. And :math:`\phi` is clamped into the bounds mapped into meta
space before :math:`f` is applied (in log space at most :data:`LOG_SPACE_MAX`, float32's largest
value), so no meta learning rate, however large, overflows the map.

Two implementations of the same arithmetic: :func:`meta_update_` on Python floats (CPU parameters, where
reading a value costs nothing), and :class:`DeviceMeta`, every tuned value of the optimizer in one
float64 vector on the parameters' device, updated by a fixed sequence of tensor ops with
``torch.where`` for the all-or-nothing rule, so that a hyper-step never waits for the device.

:func:`meta_update_` is the whole policy of one hyper-step: a value changed from outside since the last
hyper-step (by the user, a scheduler, a checkpoint edit) is the new starting point and its meta-optimizer
state restarts; ``meta_lr = 0`` leaves the value bit-identical; the result is projected onto the bounds;
and nothing is written (values nor meta-optimizer state) unless every hypergradient, the loss and every
new value are finite.

**Fast start** (``fast_start``; by default :data:`DEFAULT_FAST_START`, 0.1 with meta-Adam in log space).
Meta-Adam in log space moves a value by at most about its meta learning rate (relatively) per
hyper-step, so from a small initial lr the climb is slow. With ``fast_start = a``,
each tuned ``lr`` / ``lr_scale`` is stepped with meta learning rate ``a`` instead of its ``meta_lr``
while it is in its fast phase. The phase ends, for the rest of the run, at the first hyper-step after
which either

* the value is below :data:`FAST_START_DROP` (0.9) times the largest value a hyper-step has given it
  (the climb has turned), or
* (``fast_start_growth = F``, default 10) the value is at least ``F`` times its value when the phase
  began (the climb has gone far enough for a fast phase; from there on ``meta_lr`` carries it on).

The second rule is a guard: a value that climbs fast while the model still sits on its initial plateau
(where a larger step barely changes the loss) overshoots when the plateau ends, and a network that a
too-large lr has killed does not come back. Its meta state holds ``"peak"`` (the running maximum),
``"fast"`` (1.0 while fast, 0.0 once done; never fast again) and ``"start"`` (the value when the phase
began; -1 until the first hyper-step); an outside write restarts the moments but keeps all three, and a
meta state without them (an older checkpoint, or one made without ``fast_start``) counts as done (a state
with the phase but no ``"start"`` takes the value at its next hyper-step). ``meta_lr = 0`` still freezes
the value. Other hyperparameters are unaffected. Cost: a few scalar operations per hyper-step.

**Slower decrease** (``lr_down``; by default :data:`DEFAULT_LR_DOWN`, 0.5 with meta-Adam in log space).
Once its fast phase is over (or always, without fast start), a step that would *lower* a tuned ``lr`` /
``lr_scale`` is scaled by ``d``: :math:`\phi \leftarrow \phi + d\,(\phi' - \phi)` where :math:`\phi'` is
the meta-optimizer's proposal; steps up are unchanged. A bias correction, chosen by measurement: the
greedy hypergradient pulls the lr down systematically (the short-horizon bias), and ended every suite
task below the lr that a tuned grid picks. The meta-optimizer's state is unchanged by it. ``d = 1``:
symmetric steps.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = [
    "HYPERPARAMETERS",
    "DEFAULT_BOUNDS",
    "DEFAULT_META_LR",
    "DEFAULT_FAST_START",
    "DEFAULT_LR_DOWN",
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
    "META_CLIP",
    "META_V_GROWTH",
    "LOG_SPACE_MAX",
    "meta_bounds",
    "DeviceMeta",
    "FAST_START_DROP",
    "FAST_START_NAMES",
    "FAST_START_PHASE_KEYS",
    "fast_start_phase",
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
# The offset of any other name (a loss hyperparameter, see :mod:`ohotorch.loss_hyperparameters`).
DEFAULT_LOG_OFFSET = 1e-8

# Default meta learning rate per (meta_optimizer, space); None means there is no safe default.
# Evidence: benchmarks/defaults.py and benchmarks/results/defaults/.
DEFAULT_META_LR: Dict[Tuple[str, str], float] = {("adam", "log"): 0.02}

# fast_start="auto" (the default) per (meta_optimizer, space): only where a meta learning rate is a relative
# step size. Evidence: benchmarks/suite.py, benchmarks/results/suite/ (the README's tuning-quality section).
DEFAULT_FAST_START: Dict[Tuple[str, str], float] = {("adam", "log"): 0.1}
# lr_down="auto" (the default) per (meta_optimizer, space); 1.0 (symmetric) elsewhere. Evidence: as above.
DEFAULT_LR_DOWN: Dict[Tuple[str, str], float] = {("adam", "log"): 0.5}

# The meta-Adam gradient is clipped to +-max(META_CLIP * sqrt(v_hat), sqrt(META_V_GROWTH * v / (1 - beta2)))
# of the previous step (module docstring): never tighter than META_CLIP standard deviations, and once Adam's
# average holds many steps, only values that would raise v by more than META_V_GROWTH (40%) at once. Any
# clip costs some signal: on digits (benchmarks/digits.py, oho_global, 3 seeds) the test loss is 0.151
# with this bound (0.136 unclipped, 0.155 with a fixed 5 sigma, in one-off checks), which still stops one
# outlier batch from freezing tuning (tests/test_reliability.py). Telling an outlier from early growth is
# open work.
META_CLIP = 5.0
META_V_GROWTH = 0.4

# The largest phi of the log-space maps: theta stays below float32's largest value (~3.4e38), whatever the
# meta learning rate (exp of a larger phi would overflow float64 at ~709, or float32 tensors before that).
LOG_SPACE_MAX = math.log(torch.finfo(torch.float32).max)

# Fast start (module docstring): the fast phase of a value ends when it first falls below this fraction
# of its running maximum (or grows fast_start_growth-fold); the names it applies to; its meta state keys.
FAST_START_DROP = 0.9
FAST_START_NAMES: Tuple[str, ...] = ("lr", "lr_scale")
FAST_START_PHASE_KEYS: Tuple[str, ...] = ("peak", "fast", "start")
_UNSET = -1.0  # "start" before the first hyper-step of the phase (values tuned with fast start are >= 0)


def fast_start_phase(state: Mapping[str, float]) -> Dict[str, float]:
    """The fast-start phase of a meta state (:data:`FAST_START_PHASE_KEYS`): its own (a missing start is
    taken at the next hyper-step), else fast from nothing for a fresh (empty) state, else done (a meta
    state kept without it: an older checkpoint, or a run that started without fast_start)."""
    if "fast" in state:
        return {"peak": float(state["peak"]), "fast": float(state["fast"]),
                "start": float(state.get("start", _UNSET))}
    return {"peak": 0.0, "fast": 0.0 if state else 1.0, "start": _UNSET}


def _fast_phase_state(state: Mapping[str, float]) -> Dict[str, float]:
    """What an outside write keeps of a meta state with fast start on: the phase, not the moments."""
    if not state:
        return {}
    return fast_start_phase(state)


def _fast_start_next(phase: Mapping[str, float], theta: float, new_theta: float,
                     growth: Optional[float]) -> Dict[str, float]:
    """The phase after a committed hyper-step that moved the value from ``theta`` to ``new_theta``."""
    peak = max(phase["peak"], new_theta)
    start = theta if phase["start"] < 0.0 else phase["start"]
    fast = phase["fast"]
    if new_theta < FAST_START_DROP * peak:
        fast = 0.0
    if growth is not None and start > 0.0 and new_theta >= growth * start:
        fast = 0.0
    return {"peak": peak, "fast": fast, "start": start}


def to_meta(name: str, theta: float, space: str) -> float:
    """phi for ``theta`` (clamped into the map's domain)."""
    if space == "raw":
        return theta
    if name == "momentum":
        return -math.log(max(1.0 - theta, 1e-12))
    return math.log(max(theta, 0.0) + LOG_OFFSET.get(name, DEFAULT_LOG_OFFSET))


def from_meta(name: str, phi: float, space: str) -> float:
    """theta for ``phi`` (before projection)."""
    if space == "raw":
        return phi
    if name == "momentum":
        return 1.0 - math.exp(-phi)
    return math.exp(phi) - LOG_OFFSET.get(name, DEFAULT_LOG_OFFSET)


def meta_derivative(name: str, theta: float, space: str) -> float:
    """d theta / d phi at ``theta``."""
    if space == "raw":
        return 1.0
    if name == "momentum":
        return max(1.0 - theta, 1e-12)
    return max(theta, 0.0) + LOG_OFFSET.get(name, DEFAULT_LOG_OFFSET)


def meta_bounds(name: str, bounds: Tuple[float, float], space: str) -> Tuple[float, float]:
    """The bounds mapped into meta space: ``phi`` is clamped into them before ``from_meta``."""
    if space == "raw":
        return bounds
    low, high = bounds
    return (to_meta(name, low, space) if math.isfinite(low) else -math.inf,
            min(to_meta(name, high, space), LOG_SPACE_MAX) if math.isfinite(high) else LOG_SPACE_MAX)


def _from_meta_clamped(name: str, phi: float, config: "MetaConfig") -> float:
    """P(f(phi)) with phi clamped into the meta bounds first; a phi at a bound maps to the bound itself."""
    low, high = config.bounds[name]
    phi_low, phi_high = meta_bounds(name, (low, high), config.space)
    if phi <= phi_low:
        return low
    if phi >= phi_high:
        if math.isfinite(high) and (config.space == "raw" or to_meta(name, high, config.space) <= LOG_SPACE_MAX):
            return high
        phi = phi_high
    return project(from_meta(name, phi, config.space), (low, high))


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

    From the second step on, ``grad`` is first clipped to :math:`\pm` :data:`META_CLIP` :math:`\sqrt{\hat v}`
    of the previous step (where that is positive).

    .. math:: m \leftarrow \beta_1 m + (1-\beta_1) g,\ v \leftarrow \beta_2 v + (1-\beta_2) g^2,\
              \phi \leftarrow \phi - \alpha \frac{m / (1-\beta_1^t)}{\sqrt{v / (1-\beta_2^t)} + \epsilon}
    """
    b1, b2 = betas
    t_previous = state.get("t", 0.0)
    if t_previous > 0.0:  # clip to META_CLIP * sqrt(v_hat) of the previous step (module docstring)
        v_previous = state.get("v", 0.0)
        bound = max(META_CLIP * math.sqrt(v_previous / (1.0 - b2**t_previous)),
                    math.sqrt(META_V_GROWTH * v_previous / (1.0 - b2)))
        if bound > 0.0:
            grad = min(max(grad, -bound), bound)
    t = t_previous + 1.0
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
    fast_start: Optional[float] = None  # the meta learning rate of lr / lr_scale while fast (docstring)
    fast_start_growth: Optional[float] = None  # the growth F that ends the fast phase (docstring); None: no bound
    lr_down: float = 1.0  # the scale of a decreasing step of lr / lr_scale after the fast phase (docstring)

    def slowed(self, name: str) -> bool:
        """Whether ``name``'s decreasing steps are scaled by ``lr_down``."""
        return self.lr_down != 1.0 and name in FAST_START_NAMES

    def fast(self, name: str) -> bool:
        """Whether fast start applies to ``name``."""
        return self.fast_start is not None and name in FAST_START_NAMES


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
    last wrote; with ``config.fast_start``, the phase (:data:`FAST_START_PHASE_KEYS`) for lr and lr_scale). Returns
    :data:`COMMITTED`, or :data:`NONFINITE_HYPERGRADIENT` / :data:`NONFINITE_RESULT` when it changed
    nothing at all (neither values nor state).
    """
    if not (math.isfinite(loss) and all(math.isfinite(h) for _, _, h in hypergradients)):
        return NONFINITE_HYPERGRADIENT
    proposals: List[Tuple[int, str, float, Dict[str, float]]] = []
    for index, name, h in hypergradients:
        if name not in config.meta_lr:
            raise ValueError(f"meta_lr has no value for {name!r} (tuned in param group {index})")
        theta = float(param_groups[index][name])
        key = f"{index}/{name}"
        original = meta_state.get(key, {})
        state = dict(original)  # a copy: committed only with the new value
        previous = state.get("written", theta)
        if previous != theta:
            # Set from outside: the moments measured at the old scale would freeze or fling it.
            state.clear()  # (fast start's phase is read from the original below)
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
        if config.fast(name):
            phase = fast_start_phase(original)
            for key in FAST_START_PHASE_KEYS:
                state.pop(key, None)  # set below, after the step
            if phase["fast"] == 1.0:
                lr = config.fast_start  # type: ignore[assignment]
        if config.optimizer == "adam":
            new_phi = meta_adam_step(phi, grad, state, lr=lr, betas=config.betas, eps=config.eps)
        else:
            new_phi = meta_sgd_step(phi, grad, lr=lr)
        if config.slowed(name) and new_phi < phi and not (config.fast(name) and phase["fast"] == 1.0):
            new_phi = phi + config.lr_down * (new_phi - phi)  # slower decrease (module docstring)
        new_theta = _from_meta_clamped(name, new_phi, config)
        if config.meta_lr[name] == 0.0:
            new_theta = theta  # meta_lr = 0: hypergradients only, bit-identical hyperparameters
        if config.fast(name):
            state.update(_fast_start_next(phase, theta, new_theta, config.fast_start_growth))
        proposals.append((index, name, new_theta, state))
    if not all(math.isfinite(theta) and all(math.isfinite(v) for v in state.values())
               for _, _, theta, state in proposals):
        return NONFINITE_RESULT
    for index, name, theta, state in proposals:
        param_groups[index][name] = theta
        state["written"] = theta
        meta_state[f"{index}/{name}"] = state
    return COMMITTED


class DeviceMeta:
    r"""The tuned values and their meta-optimizer state as float64 vectors on the device.

    The same arithmetic as :func:`meta_update_` (map, clip, Adam or SGD, clamp in meta space,
    projection, all or nothing) as a fixed sequence of tensor ops: :meth:`update` never reads a value
    on the host. ``entries`` lists ``(group index, name)``; ``values`` their current values; ``states``
    their meta-optimizer states (keys m, v, t, and fast start's phase; empty for a fresh start).
    ``state`` is one ``(7, n)`` tensor, rows theta, m, v, t and the phase (:data:`ROWS`; all 0 for an
    entry without fast start, whose meta learning rate is then always its ``meta_lr``);
    ``written`` (host floats) the value last written into
    ``param_groups`` for each entry, ``generation`` how often each was restarted by an outside write.
    """

    ROWS = ("theta", "m", "v", "t") + FAST_START_PHASE_KEYS

    def __init__(self, entries: Sequence[Tuple[int, str]], values: Sequence[float],
                 states: Sequence[Mapping[str, float]], config: MetaConfig, device: torch.device) -> None:
        self.entries = list(entries)
        self.config = config
        names = [name for _, name in self.entries]
        for index, name in self.entries:
            if name not in config.meta_lr:
                raise ValueError(f"meta_lr has no value for {name!r} (tuned in param group {index})")
        phases = [fast_start_phase(s) if config.fast(name) else dict.fromkeys(FAST_START_PHASE_KEYS, 0.0)
                  for name, s in zip(names, states)]
        rows = [[float(v) for v in values], [float(s.get("m", 0.0)) for s in states],
                [float(s.get("v", 0.0)) for s in states], [float(s.get("t", 0.0)) for s in states],
                *[[phase[key] for phase in phases] for key in FAST_START_PHASE_KEYS]]
        bounds = [config.bounds[name] for name in names]
        phi_bounds = [meta_bounds(name, b, config.space) for name, b in zip(names, bounds)]
        high_exact = [math.isfinite(high) and (config.space == "raw" or to_meta(name, high, config.space) <= LOG_SPACE_MAX)
                      for name, (_, high) in zip(names, bounds)]
        fast_lr = [config.fast_start if config.fast(name) else config.meta_lr[name] for name in names]
        constants = [[config.meta_lr[name] for name in names], fast_lr, [b[0] for b in bounds], [b[1] for b in bounds],
                     [b[0] for b in phi_bounds], [b[1] for b in phi_bounds],
                     [float(exact) for exact in high_exact], [float(name == "momentum") for name in names],
                     [LOG_OFFSET.get(name, 0.0) for name in names]]
        # Built once (two host-to-device copies); every later operation stays on the device.
        self.state = torch.tensor(rows, dtype=torch.float64).to(device)
        (self.meta_lr, self.fast_lr, self.low, self.high, self.phi_low, self.phi_high, high_exact_t, momentum_t,
         self.offset) = torch.tensor(constants, dtype=torch.float64).to(device).unbind(0)
        self.high_exact, self.momentum = high_exact_t.bool(), momentum_t.bool()
        self.frozen = self.meta_lr == 0.0
        slowed = [config.slowed(name) for name in names]
        self.slowed = torch.tensor(slowed, device=device) if any(slowed) else None
        # The log-space maps in one form: with q = max(a theta + b, floor) (lr-like: a = 1, b = floor = c;
        # momentum: a = -1, b = 1, floor = 1e-12), phi = s log q, d theta / d phi = q and
        # theta = (exp(s phi) - b) / a (s = 1, or -1 for momentum).
        self.sign = torch.where(self.momentum, -1.0, 1.0)
        self.shift = torch.where(self.momentum, 1.0, self.offset)
        self.floor = torch.where(self.momentum, 1e-12, self.offset)
        self.written = [float(v) for v in values]
        self.generation = [0] * len(self.entries)

    def restart(self, i: int, value: float) -> None:
        """Entry ``i`` was set from outside to ``value``: start from it with a fresh meta state."""
        self.state[0, i].fill_(value)
        self.state[1:4, i].zero_()  # the moments; fast start's phase stays
        self.written[i] = value
        self.generation[i] += 1

    def _from_meta(self, phi: Tensor) -> Tensor:
        if self.config.space == "raw":
            return phi
        return (torch.exp(phi * self.sign) - self.shift) * self.sign  # 1 / a = a = s

    def update(self, hypergradients: Tensor, loss: Tensor) -> Tensor:
        """One hyper-step on the device; returns ``[state (6n), h (n), loss, finite input, committed]``.

        ``hypergradients`` (n,) and ``loss`` (0-d) are float64 tensors on the device.
        """
        theta, m, v, t, peak, fast, start = self.state.unbind(0)
        meta_lr = torch.where(fast == 1.0, self.fast_lr, self.meta_lr)  # fast start (no host read)
        h = hypergradients
        if self.config.space == "raw":
            grad, phi = h, theta
        else:
            q = torch.maximum(torch.addcmul(self.shift, self.sign, theta), self.floor)  # = d theta / d phi
            grad = h * q
            phi = torch.log(q) * self.sign
        if self.config.optimizer == "adam":
            b1, b2 = self.config.betas
            v_hat_previous = torch.where(t > 0, v / (1.0 - torch.pow(b2, t)), 0.0)
            bound = torch.maximum(META_CLIP * torch.sqrt(v_hat_previous),
                                  torch.sqrt(META_V_GROWTH * v / (1.0 - b2)))
            grad = torch.where(bound > 0, torch.minimum(torch.maximum(grad, -bound), bound), grad)
            t_new = t + 1.0
            m_new = b1 * m + (1.0 - b1) * grad
            v_new = b2 * v + (1.0 - b2) * grad * grad
            m_hat = m_new / (1.0 - torch.pow(b1, t_new))
            v_hat = v_new / (1.0 - torch.pow(b2, t_new))
            phi_new = phi - meta_lr * m_hat / (torch.sqrt(v_hat) + self.config.eps)
        else:
            t_new, m_new, v_new = t, m, v
            phi_new = phi - meta_lr * grad
        if self.slowed is not None:  # slower decrease of lr / lr_scale after the fast phase (module docstring)
            step = phi_new - phi
            phi_new = torch.where(self.slowed & (step < 0) & (fast != 1.0), phi + self.config.lr_down * step, phi_new)
        at_low = phi_new <= self.phi_low
        at_high = phi_new >= self.phi_high
        theta_new = self._from_meta(torch.minimum(phi_new, self.phi_high)).clamp(self.low, self.high)
        theta_new = torch.where(at_high & self.high_exact, self.high, theta_new)
        theta_new = torch.where(at_low, self.low, theta_new)
        theta_new = torch.where(self.frozen, theta, theta_new)
        # fast start's phase (_fast_start_next, on the device)
        peak_new = torch.maximum(peak, theta_new)
        start_new = torch.where(start < 0.0, theta, start)
        turned = theta_new < FAST_START_DROP * peak_new
        growth = self.config.fast_start_growth
        if growth is not None:
            turned = turned | ((start_new > 0.0) & (theta_new >= growth * start_new))
        fast_new = torch.where(turned, 0.0, fast)
        new_state = torch.stack([theta_new, m_new, v_new, t_new, peak_new, fast_new, start_new])
        # x * 0 is 0 exactly when x is finite (inf * 0 and nan * 0 are nan), and a sum of zeros is 0 while
        # a sum with a nan is not: every value finite in 2-3 kernels instead of isfinite's 4 and all's one.
        finite_input = (loss * 0.0 + (h * 0.0).sum()) == 0.0
        committed = finite_input & ((new_state * 0.0).sum() == 0.0)
        self.state.copy_(torch.where(committed, new_state, self.state))
        return torch.cat([self.state.flatten(), h, loss.reshape(1), finite_input.reshape(1).double(),
                          committed.reshape(1).double()])
