r"""Inner optimisers as pure functions of (state, gradients, hyperparameters, step).

An inner optimiser is a frozen description (:class:`SGD`, :class:`Adam`) whose hyperparameter fields are
either a Python number (a constant, not differentiated) or a string naming an entry of the ``hypers``
dictionary (a tensor that hypergradients are taken with respect to). A hyperparameter tensor is
broadcast to shape ``(T, G)`` - T unrolled steps, G parameter groups - so that

* a 0-d tensor is one value for every step and group,
* shape ``(G,)`` (or ``(1, G)``) is one value per group,
* shape ``(T, 1)`` is a per-step schedule shared by the groups,
* shape ``(T, G)`` is a schedule per step and per group (Maclaurin et al. 2015's per-layer,
  per-iteration learning rates).

``groups`` maps each parameter tensor (by position) to its group index; by default every parameter is in
group 0. The update conventions are torch.optim's, so that with constant hyperparameters the unrolled
run is torch.optim's run.

SGD (torch.optim.SGD, dampening 0)::

    d_t = g_t + lambda_t w_t
    b_{t+1} = mu_t b_t + d_t                       (b_0 = 0, so b_1 = d_1 as in torch)
    u_t = d_t + mu_t b_{t+1} if nesterov else b_{t+1}
    w_{t+1} = w_t - eta_t u_t

Adam (torch.optim.Adam; AdamW with ``decoupled=True``)::

    d_t = g_t + lambda_t w_t                       (Adam, L2)      w_t <- w_t (1 - eta_t lambda_t) (AdamW)
    m_{t+1} = beta1_t m_t + (1 - beta1_t) d_t
    v_{t+1} = beta2_t v_t + (1 - beta2_t) d_t^2
    c1_{t+1} = c1_t beta1_t,  c2_{t+1} = c2_t beta2_t    (c1_0 = c2_0 = 1)
    w_{t+1} = w_t - eta_t / (1 - c1_{t+1}) * m_{t+1} / (sqrt(v_{t+1} / (1 - c2_{t+1})) + eps_t)

The bias corrections use the running products of the betas: for constant betas they are torch's
``1 - beta**t``; for scheduled betas they are the exact normalisers of the moving averages.

Cost of one step: O(n) time and memory for n weights (plus one gradient, computed by the caller).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["SGD", "Adam", "InnerOptimizer", "HyperValue", "inner_init", "inner_step", "resolve_groups",
           "check_hypers"]

HyperValue = Union[float, int, str]
State = Dict[str, List[Tensor]]


@dataclass(frozen=True)
class SGD:
    """SGD with optional momentum, weight decay and Nesterov momentum (torch.optim.SGD, dampening 0).

    Each of ``lr``, ``momentum``, ``weight_decay`` is a number or the name of a hyperparameter tensor.
    """

    lr: HyperValue
    momentum: HyperValue = 0.0
    weight_decay: HyperValue = 0.0
    nesterov: bool = False

    hyper_fields = ("lr", "momentum", "weight_decay")

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.nesterov and isinstance(self.momentum, (int, float)) and self.momentum == 0:
            raise ValueError("Nesterov momentum requires a momentum")

    @property
    def has_momentum(self) -> bool:
        return not (isinstance(self.momentum, (int, float)) and self.momentum == 0)


@dataclass(frozen=True)
class Adam:
    """Adam (torch.optim.Adam, L2 weight decay) or AdamW (``decoupled=True``); no amsgrad."""

    lr: HyperValue
    beta1: HyperValue = 0.9
    beta2: HyperValue = 0.999
    eps: HyperValue = 1e-8
    weight_decay: HyperValue = 0.0
    decoupled: bool = False

    hyper_fields = ("lr", "beta1", "beta2", "eps", "weight_decay")

    def __post_init__(self) -> None:
        _check_fields(self)


InnerOptimizer = Union[SGD, Adam]


def _check_fields(opt: InnerOptimizer) -> None:
    for name in opt.hyper_fields:
        value = getattr(opt, name)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise TypeError(f"{type(opt).__name__}.{name} must be a number or the name of a hyperparameter "
                            f"tensor, got {value!r}")
        if isinstance(value, (int, float)) and value < 0:
            raise ValueError(f"Invalid {name}: {value}")


def resolve_groups(groups: Optional[Sequence[int]], num_params: int) -> Tuple[List[int], int]:
    """Validate ``groups`` (one group index per parameter tensor); return it and the number of groups."""
    if groups is None:
        return [0] * num_params, 1
    groups = [int(g) for g in groups]
    if len(groups) != num_params:
        raise ValueError(f"groups has {len(groups)} entries for {num_params} parameter tensors")
    if min(groups) < 0:
        raise ValueError(f"Invalid group index {min(groups)} (must be >= 0)")
    num_groups = max(groups) + 1
    missing = sorted(set(range(num_groups)) - set(groups))
    if missing:
        raise ValueError(f"groups leaves group(s) {missing} without parameters")
    return groups, num_groups


def check_hypers(opt: InnerOptimizer, hypers: Mapping[str, Tensor], steps: int, num_groups: int) -> None:
    """Loud errors for names that do not exist, non-float tensors and schedules of the wrong shape."""
    for name, value in hypers.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"hyperparameter {name!r} must be a floating-point tensor, got {type(value).__name__}")
    for field in opt.hyper_fields:
        key = getattr(opt, field)
        if not isinstance(key, str):
            continue
        if key not in hypers:
            raise KeyError(f"{type(opt).__name__}.{field} names hyperparameter {key!r}, which is not in hypers "
                           f"(has {sorted(hypers)})")
        shape = tuple(hypers[key].shape)
        try:
            fits = len(shape) <= 2 and tuple(torch.broadcast_shapes(shape, (steps, num_groups))) == (steps, num_groups)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"hyperparameter {key!r} ({field}) has shape {shape}, which does not broadcast to "
                             f"(steps, groups) = ({steps}, {num_groups}); use () for a constant, (groups,) per "
                             f"group, (steps, 1) per step, (steps, groups) for both")


def value_at(value: HyperValue, hypers: Mapping[str, Tensor], t: int, steps: int, num_groups: int
             ) -> Union[float, Tensor]:
    """The hyperparameter for step ``t``: a number, or a tensor of shape (G,)."""
    if isinstance(value, str):
        return torch.broadcast_to(hypers[value], (steps, num_groups))[t]
    return float(value)


def _per_param(value: Union[float, Tensor], groups: Sequence[int]) -> List[Union[float, Tensor]]:
    if isinstance(value, Tensor):
        return [value[g] for g in groups]
    return [value] * len(groups)


def inner_init(opt: InnerOptimizer, params: Sequence[Tensor], num_groups: int) -> State:
    """The optimiser state before the first step: ``{"w": params, ...buffers}`` (all tensors)."""
    state: State = {"w": list(params)}
    if isinstance(opt, SGD):
        if opt.has_momentum:
            state["b"] = [torch.zeros_like(p) for p in params]
    elif isinstance(opt, Adam):
        state["m"] = [torch.zeros_like(p) for p in params]
        state["v"] = [torch.zeros_like(p) for p in params]
        ref = params[0]
        state["c"] = [torch.ones(num_groups, dtype=ref.dtype, device=ref.device),
                      torch.ones(num_groups, dtype=ref.dtype, device=ref.device)]
    else:
        raise TypeError(f"Unknown inner optimizer {opt!r}; use hypergrad.SGD or hypergrad.Adam")
    return state


def inner_step(opt: InnerOptimizer, state: State, grads: Sequence[Tensor], hypers: Mapping[str, Tensor], t: int,
               steps: int, groups: Sequence[int], num_groups: int) -> State:
    """One update of ``opt`` at step ``t`` (0-based) from the training gradients ``grads``; returns the new
    state and leaves its arguments unchanged (out of place, so that torch.func can differentiate it)."""
    def hv(field: str) -> List[Union[float, Tensor]]:
        return _per_param(value_at(getattr(opt, field), hypers, t, steps, num_groups), groups)

    w = state["w"]
    lrs, wds = hv("lr"), hv("weight_decay")
    if isinstance(opt, SGD):
        d = [g if _is_zero(wd) else _axpy(g, wd, p) for g, p, wd in zip(grads, w, wds)]
        if not opt.has_momentum:
            return {"w": [_axpy(p, -lr, u) for p, u, lr in zip(w, d, lrs)]}
        mus = hv("momentum")
        b = [mu * bb + dd for bb, dd, mu in zip(state["b"], d, mus)]
        u = [_axpy(dd, mu, bb) for dd, bb, mu in zip(d, b, mus)] if opt.nesterov else b
        return {"w": [_axpy(p, -lr, uu) for p, uu, lr in zip(w, u, lrs)], "b": b}
    if isinstance(opt, Adam):
        b1 = value_at(opt.beta1, hypers, t, steps, num_groups)
        b2 = value_at(opt.beta2, hypers, t, steps, num_groups)
        c1, c2 = state["c"][0] * b1, state["c"][1] * b2
        b1s, b2s, epss = _per_param(b1, groups), _per_param(b2, groups), hv("eps")
        if opt.decoupled:
            w = [p if _is_zero(wd) else p * (1 - lr * wd) for p, lr, wd in zip(w, lrs, wds)]
            d = list(grads)
        else:
            d = [g if _is_zero(wd) else g + wd * p for g, p, wd in zip(grads, w, wds)]
        m = [be1 * mm + (1 - be1) * dd for mm, dd, be1 in zip(state["m"], d, b1s)]
        v = [be2 * vv + (1 - be2) * dd * dd for vv, dd, be2 in zip(state["v"], d, b2s)]
        new_w = []
        for p, mm, vv, lr, eps, g in zip(w, m, v, lrs, epss, groups):
            denom = (vv.sqrt() / (1 - c2[g]).sqrt()) + eps
            new_w.append(p - (lr / (1 - c1[g])) * mm / denom)
        return {"w": new_w, "m": m, "v": v, "c": [c1, c2]}
    raise TypeError(f"Unknown inner optimizer {opt!r}; use hypergrad.SGD or hypergrad.Adam")


def _axpy(x: Tensor, a: Union[float, Tensor], y: Tensor) -> Tensor:
    """x + a * y; for a number ``a`` through torch.add(alpha=a), the kernel torch.optim uses (it may fuse
    the multiply-add), so that constant hyperparameters reproduce torch.optim bit for bit."""
    return x + a * y if isinstance(a, Tensor) else torch.add(x, y, alpha=a)


def _is_zero(value: Union[float, Tensor]) -> bool:
    return not isinstance(value, Tensor) and value == 0


def replace(opt: InnerOptimizer, **changes: HyperValue) -> InnerOptimizer:
    """A copy of ``opt`` with some fields changed (dataclasses.replace)."""
    return dataclasses.replace(opt, **changes)
