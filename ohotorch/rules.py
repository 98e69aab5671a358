r"""Inner rules: the optimizer a tuned run follows (SGD, Adam, AdamW), behind one protocol.

The shell (:class:`ohotorch.OHO`) orders one step as: ``prepare`` (advance the rule's state and compute
its direction without moving the weights) for every group, ``update_tangent`` for every tangent of
every group (the tangent recursion needs :math:`w_t`), then ``apply`` (move the weights). A rule keeps
what ``prepare`` computed in a typed work record (:class:`SGDWork`, :class:`AdamWork`) that the two later
calls read; the math is in :mod:`ohotorch.sgd_tangents` and :mod:`ohotorch.adam_tangents`.

``foreach`` is decided once per step and group by the shell and carried in the work record.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Protocol, Tuple

import torch
from torch import Tensor

from .adam_tangents import adam_apply_, adam_direct_terms_, adam_direction_, adam_state_sq_norm, adam_tangent_update_
from .influence import TangentKey, as_dtype, slices_at
from .options import real
from .sgd_tangents import sgd_apply_, sgd_direct_terms_, sgd_direction_, sgd_state_sq_norm, sgd_tangent_update_

__all__ = ["Rule", "SGDRule", "AdamRule", "SGDWork", "AdamWork", "effective_lr", "lr_derivative",
           "check_lr_and_weight_decay"]

Group = Dict[str, Any]


def effective_lr(group: Group) -> float:
    """The lr a step uses: the group's (scheduled) lr times OHO's multiplier (1 unless tuned)."""
    return group["lr"] * group["lr_scale"]


def lr_derivative(group: Group, name: str) -> float:
    """d(effective lr)/d(theta) for the lr-like hyperparameter ``name`` (``"lr"`` or ``"lr_scale"``)."""
    return group["lr"] if name == "lr_scale" else group["lr_scale"]


def check_lr_and_weight_decay(group: Group) -> None:
    """The checks every rule shares (torch.optim's messages)."""
    lr = real(group["lr"], "lr")
    if not (math.isfinite(lr) and lr >= 0.0):
        raise ValueError(f"Invalid learning rate: {group['lr']}")
    group.setdefault("lr_scale", 1.0)
    scale = real(group["lr_scale"], "lr_scale")
    if not (math.isfinite(scale) and scale >= 0.0):
        raise ValueError(f"Invalid lr_scale: {group['lr_scale']} (a finite multiplier >= 0)")
    tune = group.get("tune", ())
    if "lr" in tune and "lr_scale" in tune:
        raise ValueError("tune 'lr' or 'lr_scale', not both: the effective lr is lr * lr_scale, so the two "
                         "hypergradients are the same direction")
    weight_decay = real(group["weight_decay"], "weight_decay")
    if not (math.isfinite(weight_decay) and weight_decay >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")


@dataclass
class SGDWork:
    """What :meth:`SGDRule.prepare` computed for one group (lists aligned with ``params``)."""

    params: List[Tensor]
    states: List[Dict[str, Any]]
    momentum_buffers: List[Optional[Tensor]]  # b_t (None without a buffer)
    first_step: List[bool]  # the buffer was created on this step (b_1 = d_1)
    direction: List[Tensor]  # u_t
    previous_buffers: List[Optional[Tensor]]  # b_{t-1}, kept only while momentum is tuned
    foreach: bool


@dataclass
class AdamWork:
    """What :meth:`AdamRule.prepare` computed for one group (lists aligned with ``params``)."""

    params: List[Tensor]
    states: List[Dict[str, Any]]
    d: List[Tensor]
    denom: List[Tensor]
    bc1: List[float]
    bc2_sqrt: List[float]
    foreach: bool


class Rule(Protocol):
    """An inner optimizer as the shell drives it."""

    tunable: Tuple[str, ...]

    def check_group(self, group: Group) -> None:
        """Validate a param group's values (raise ValueError / TypeError)."""

    def check_complex(self) -> None:
        """Accept complex parameters, or refuse them (raise ValueError)."""

    def companions(self, group: Group) -> Tuple[str, ...]:
        """State keys of the per-tangent companions of ``tangent_w`` (kept only with discount > 0)."""

    def init_state(self, group: Group, param: Tensor, state: Dict[str, Any]) -> None:
        """Create the rule's own state for ``param`` (torch.optim's layout) where missing."""

    def prepare(self, group: Group, params: List[Tensor], states: List[Dict[str, Any]], foreach: bool) -> Any:
        """Advance the rule's state and compute its direction without moving the weights."""

    def update_tangent(self, group: Group, work: Any, index: int, key: TangentKey, direct: bool,
                       hvp: Optional[List[Tensor]]) -> None:
        """Advance tangent ``index`` (key ``key``) of the group's parameters by one step.

        ``direct`` is the indicator [theta = x] on this group; ``hvp`` is H_t w' over the group's
        parameters, or ``None`` when the tangents are zero on entry (greedy horizon, reset step): then
        their memory is overwritten, never read.
        """

    def state_sq_norm(self, group: Group, work: Any, index: int) -> Tensor:
        """The squared norm of tangent ``index``'s state on the group's parameters (0-d float64 tensor,
        no host sync), in the metric the growth cap measures (:mod:`ohotorch.growth_cap`)."""

    def add_direct_terms(self, group: Group, work: Any, index: int, key: TangentKey) -> None:
        """Add the direct terms c_t of tangent ``index`` (``update_tangent`` with ``direct=False`` gave
        the homogeneous part A_t z_t; both together are the full update)."""

    def apply(self, group: Group, work: Any) -> None:
        """Move the weights (after every tangent update, which reads w_t)."""


class SGDRule:
    """torch.optim.SGD (momentum, dampening, nesterov, L2 weight decay)."""

    tunable: Tuple[str, ...] = ("lr", "lr_scale", "weight_decay", "momentum")

    @staticmethod
    def uses_buffer(group: Group) -> bool:
        return group["momentum"] != 0 or "momentum" in group["tune"]

    def check_group(self, group: Group) -> None:
        check_lr_and_weight_decay(group)
        momentum = real(group["momentum"], "momentum")
        if not (0.0 <= momentum < 1.0):
            raise ValueError(f"Invalid momentum value: {group['momentum']} (must be in [0, 1))")
        dampening = real(group["dampening"], "dampening")
        if not math.isfinite(dampening):
            raise ValueError(f"Invalid dampening value: {group['dampening']}")
        if group["nesterov"] and (momentum <= 0.0 or dampening != 0.0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if "momentum" in group["tune"] and momentum == 0.0 and dampening != 0.0:
            raise ValueError(
                "Cannot tune momentum from 0 with dampening != 0: torch.optim.SGD's update jumps at "
                "momentum = 0 (no buffer) when dampening is set; start from momentum > 0 or dampening = 0"
            )

    def check_complex(self) -> None:
        """Complex parameters are supported, as by torch.optim.SGD: the update is linear, so a complex
        parameter is its real and imaginary parts stepped together, and so is its (complex) tangent."""

    def companions(self, group: Group) -> Tuple[str, ...]:
        return ("tangent_b",) if self.uses_buffer(group) else ()

    def init_state(self, group: Group, param: Tensor, state: Dict[str, Any]) -> None:
        if self.uses_buffer(group) and state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(param)

    def prepare(self, group: Group, params: List[Tensor], states: List[Dict[str, Any]], foreach: bool) -> SGDWork:
        buffers = [s.get("momentum_buffer") for s in states]
        first_step = [b is None for b in buffers]
        uses_buffer = self.uses_buffer(group)
        direction, previous = sgd_direction_(
            params, [p.grad for p in params], buffers,
            weight_decay=group["weight_decay"], momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"], use_buffer=uses_buffer,
            keep_previous_buffer="momentum" in group["tune"], foreach=foreach,
        )
        if uses_buffer:
            for s, b in zip(states, buffers):
                s["momentum_buffer"] = b
        return SGDWork(params=params, states=states, momentum_buffers=buffers, first_step=first_step,
                       direction=direction, previous_buffers=previous, foreach=foreach)

    @staticmethod
    def _by_first_step(work: SGDWork, index: int, uses_buffer: bool
                       ) -> Iterator[Tuple[bool, List[int], List[Tensor], Optional[List[Tensor]]]]:
        """The parameters whose momentum buffer was created this step (they follow b'_1 = d'_1), then the
        others: (first_step, their indices, their w'_index, their b'_index or None)."""
        for first_step in (True, False):
            chosen = [i for i, f in enumerate(work.first_step) if f == first_step]
            if not chosen:
                continue
            states = [work.states[i] for i in chosen]
            keeps_tangent_b = uses_buffer and "tangent_b" in states[0]
            yield (first_step, chosen, slices_at([s["tangent_w"] for s in states], index),
                   slices_at([s["tangent_b"] for s in states], index) if keeps_tangent_b else None)

    def update_tangent(self, group: Group, work: SGDWork, index: int, key: TangentKey, direct: bool,
                       hvp: Optional[List[Tensor]]) -> None:
        uses_buffer = self.uses_buffer(group)
        name = key[1]
        for first_step, chosen, tangent_w, tangent_b in self._by_first_step(work, index, uses_buffer):
            sgd_tangent_update_(
                tangent_w, tangent_b,
                None if hvp is None else [as_dtype(hvp[i], work.states[i]["tangent_w"].dtype) for i in chosen],
                [work.params[i] for i in chosen],
                [work.momentum_buffers[i] for i in chosen] if uses_buffer else None,  # type: ignore[misc]
                [work.previous_buffers[i] for i in chosen],
                [work.direction[i] for i in chosen],
                lr=effective_lr(group), weight_decay=group["weight_decay"], momentum=group["momentum"],
                dampening=group["dampening"], nesterov=group["nesterov"], first_step=first_step,
                direct_lr=name in ("lr", "lr_scale") and direct,
                lr_derivative=lr_derivative(group, name),
                direct_weight_decay=name == "weight_decay" and direct,
                direct_momentum=name == "momentum" and direct,
                foreach=work.foreach, use_buffer=uses_buffer,
            )

    def state_sq_norm(self, group: Group, work: SGDWork, index: int) -> Tensor:
        tangent_b = (slices_at([s["tangent_b"] for s in work.states], index)
                     if self.uses_buffer(group) and "tangent_b" in work.states[0] else None)
        return sgd_state_sq_norm(slices_at([s["tangent_w"] for s in work.states], index), tangent_b,
                                 lr=effective_lr(group))

    def add_direct_terms(self, group: Group, work: SGDWork, index: int, key: TangentKey) -> None:
        uses_buffer = self.uses_buffer(group)
        name = key[1]
        for first_step, chosen, tangent_w, tangent_b in self._by_first_step(work, index, uses_buffer):
            sgd_direct_terms_(
                tangent_w, tangent_b,
                [work.params[i] for i in chosen],
                [work.momentum_buffers[i] for i in chosen] if uses_buffer else None,  # type: ignore[misc]
                [work.previous_buffers[i] for i in chosen],
                [work.direction[i] for i in chosen],
                lr=effective_lr(group), momentum=group["momentum"], dampening=group["dampening"],
                nesterov=group["nesterov"], first_step=first_step, use_buffer=uses_buffer,
                direct_lr=name in ("lr", "lr_scale"), lr_derivative=lr_derivative(group, name),
                direct_weight_decay=name == "weight_decay", direct_momentum=name == "momentum",
                foreach=work.foreach,
            )

    def apply(self, group: Group, work: SGDWork) -> None:
        sgd_apply_(work.params, work.direction, lr=effective_lr(group), foreach=work.foreach)


class AdamRule:
    """torch.optim.Adam (``decoupled=False``, L2 decay through the gradient) or AdamW (``True``)."""

    tunable: Tuple[str, ...] = ("lr", "lr_scale", "weight_decay")

    def __init__(self, decoupled: bool) -> None:
        self.decoupled = decoupled

    def check_group(self, group: Group) -> None:
        check_lr_and_weight_decay(group)
        eps = real(group["eps"], "eps")
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        beta1, beta2 = (real(b, "betas") for b in group["betas"])
        if not (0.0 <= beta1 < 1.0 and 0.0 <= beta2 < 1.0):
            raise ValueError(f"Invalid betas: {group['betas']} (each in [0, 1))")

    def check_complex(self) -> None:
        raise ValueError(
            "OHOAdam / OHOAdamW do not support complex parameters (their tangents of the second moment are not "
            "implemented for complex values); use torch.view_as_real parameters, or ohotorch.OHO (SGD), which "
            "supports them."
        )

    def companions(self, group: Group) -> Tuple[str, ...]:
        return ("tangent_m", "tangent_v")

    def init_state(self, group: Group, param: Tensor, state: Dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)  # torch.optim.Adam's CPU step counter
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)

    def prepare(self, group: Group, params: List[Tensor], states: List[Dict[str, Any]], foreach: bool) -> AdamWork:
        for p, s in zip(params, states):
            self.init_state(group, p, s)
        beta1, beta2 = group["betas"]
        direction = adam_direction_(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], lr=effective_lr(group), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=self.decoupled, foreach=foreach,
        )
        return AdamWork(params=params, states=states, d=direction.d, denom=direction.denom, bc1=direction.bc1,
                        bc2_sqrt=direction.bc2_sqrt, foreach=foreach)

    def update_tangent(self, group: Group, work: AdamWork, index: int, key: TangentKey, direct: bool,
                       hvp: Optional[List[Tensor]]) -> None:
        states = work.states
        beta1, beta2 = group["betas"]
        name = key[1]

        def companion(state_key: str) -> Optional[List[Tensor]]:
            # m', v' are not kept when the tangents restart from zero every step
            return (slices_at([s[state_key] for s in states], index) if all(state_key in s for s in states)
                    else None)

        adam_tangent_update_(
            slices_at([s["tangent_w"] for s in states], index), companion("tangent_m"), companion("tangent_v"),
            None if hvp is None else [as_dtype(h, s["tangent_w"].dtype) for h, s in zip(hvp, states)],
            work.params, work.d, [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            work.denom, work.bc1, work.bc2_sqrt,
            lr=effective_lr(group), beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            decoupled=self.decoupled,
            direct_lr=name in ("lr", "lr_scale") and direct,
            lr_derivative=lr_derivative(group, name),
            direct_weight_decay=name == "weight_decay" and direct,
            foreach=work.foreach,
        )

    def state_sq_norm(self, group: Group, work: AdamWork, index: int) -> Tensor:
        states = work.states
        return adam_state_sq_norm(
            slices_at([s["tangent_w"] for s in states], index), slices_at([s["tangent_m"] for s in states], index),
            slices_at([s["tangent_v"] for s in states], index), [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], work.denom, work.bc1, work.bc2_sqrt, lr=effective_lr(group))

    def add_direct_terms(self, group: Group, work: AdamWork, index: int, key: TangentKey) -> None:
        states = work.states
        beta1, beta2 = group["betas"]
        name = key[1]
        adam_direct_terms_(
            slices_at([s["tangent_w"] for s in states], index), slices_at([s["tangent_m"] for s in states], index),
            slices_at([s["tangent_v"] for s in states], index), work.params, work.d,
            [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], work.denom, work.bc1, work.bc2_sqrt,
            lr=effective_lr(group), beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            decoupled=self.decoupled, direct_lr=name in ("lr", "lr_scale"), lr_derivative=lr_derivative(group, name),
            direct_weight_decay=name == "weight_decay", foreach=work.foreach,
        )

    def apply(self, group: Group, work: AdamWork) -> None:
        adam_apply_(work.params, [s["exp_avg"] for s in work.states], work.denom, work.bc1, lr=effective_lr(group),
                    weight_decay=group["weight_decay"], decoupled=self.decoupled, foreach=work.foreach)
