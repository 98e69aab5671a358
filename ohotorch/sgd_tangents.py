r"""Pure functions: torch.optim.SGD's update and its forward-mode tangents.

Notation: ``w`` weights, ``g`` the training gradient at ``w``, ``H`` its Hessian,
``eta`` lr, ``lam`` weight decay, ``mu`` momentum, ``tau`` dampening. One SGD step is

.. math::
    d_t = g_t + \lambda w_t,\quad
    b_t = \mu b_{t-1} + (1-\tau) d_t \ (b_1 = d_1),\quad
    u_t = d_t + \mu b_t \text{ (nesterov) or } b_t,\quad
    w_{t+1} = w_t - \eta u_t .

Differentiating with respect to one scalar hyperparameter :math:`\theta` gives the tangent recursion
(a dot is :math:`d/d\theta`; ``[theta = x]`` is 1 on the parameters whose group owns :math:`\theta`):

.. math::
    \dot d_t = H_t \dot w_t + \lambda \dot w_t + [\theta=\lambda]\, w_t \\
    \dot b_t = \mu \dot b_{t-1} + [\theta=\mu]\, b_{t-1} + (1-\tau)\dot d_t \quad(\dot b_1 = \dot d_1) \\
    \dot u_t = \dot d_t + \mu \dot b_t + [\theta=\mu]\, b_t \text{ (nesterov) or } \dot b_t \\
    \dot w_{t+1} = \dot w_t - \eta \dot u_t - [\theta=\eta]\, u_t

Cost: the weight update is torch.optim.SGD's, op for op (so that an untuned run reproduces it bit for
bit). One tangent update is ~6 elementwise passes over the parameters plus one Hessian-vector product,
which the caller supplies (see :mod:`ohotorch.finite_differences`).

Every function takes lists of tensors (one entry per parameter) and keyword-only hyperparameters, and
has a per-tensor reference path and a ``foreach`` path (``torch._foreach_*``) that give the same numbers.
Functions ending in ``_`` write into their arguments.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["sgd_direction_", "sgd_apply_", "sgd_tangent_update_", "sgd_direct_terms_", "sgd_state_sq_norm"]


def sgd_direction_(
    params: List[Tensor],
    grads: List[Tensor],
    momentum_buffers: List[Optional[Tensor]],
    *,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    use_buffer: bool,
    keep_previous_buffer: bool,
    foreach: bool,
) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    r"""Compute the SGD direction :math:`u_t` and advance the momentum buffers in place.

    ``momentum_buffers`` entries that are ``None`` are created (``b_1 = d_1``) and written back into
    the list. Returns ``(u, previous)`` where ``previous[i]`` is a copy of :math:`b_{t-1}` (``None`` on a
    first step or when ``keep_previous_buffer`` is false): the momentum tangent needs it.
    ``grads`` are never modified. The ops and their order are torch.optim.SGD's.
    """
    if weight_decay != 0:
        if foreach:
            d = list(torch._foreach_add(grads, params, alpha=weight_decay))
        else:
            d = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
    else:
        d = list(grads)
    previous: List[Optional[Tensor]] = [None] * len(params)
    if not use_buffer:
        return d, previous

    first = [i for i, b in enumerate(momentum_buffers) if b is None]
    rest = [i for i, b in enumerate(momentum_buffers) if b is not None]
    for i in first:
        momentum_buffers[i] = torch.clone(d[i]).detach()
    if rest:
        bufs = [momentum_buffers[i] for i in rest]
        if keep_previous_buffer:
            for i, b in zip(rest, bufs):
                previous[i] = b.clone()
        ds = [d[i] for i in rest]
        if foreach:
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_add_(bufs, ds, alpha=1 - dampening)
        else:
            for b, di in zip(bufs, ds):
                b.mul_(momentum).add_(di, alpha=1 - dampening)

    bufs_all = list(momentum_buffers)
    if nesterov:
        if foreach:
            u = list(torch._foreach_add(d, bufs_all, alpha=momentum))
        else:
            u = [di.add(b, alpha=momentum) for di, b in zip(d, bufs_all)]
    else:
        u = bufs_all  # type: ignore[assignment]
    return u, previous


def sgd_apply_(params: List[Tensor], direction: List[Tensor], *, lr: float, foreach: bool) -> None:
    r""":math:`w \leftarrow w - \eta u` in place (torch.optim.SGD's final op)."""
    if foreach:
        torch._foreach_add_(params, direction, alpha=-lr)
    else:
        for p, u in zip(params, direction):
            p.add_(u, alpha=-lr)


def sgd_tangent_update_(
    tangent_w: List[Tensor],
    tangent_b: Optional[List[Tensor]],
    hvp: Optional[List[Tensor]],
    params: List[Tensor],
    buffers: Optional[List[Tensor]],
    previous_buffers: Optional[List[Optional[Tensor]]],
    direction: List[Tensor],
    *,
    lr: float,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first_step: bool,
    direct_lr: bool,
    direct_weight_decay: bool,
    direct_momentum: bool,
    foreach: bool,
    use_buffer: Optional[bool] = None,
    lr_derivative: float = 1.0,
) -> None:
    r"""Advance one tangent pair :math:`(\dot w, \dot b)` by one SGD step, in place.

    ``hvp`` holds :math:`H_t \dot w_t` and is used as scratch (it is overwritten). ``params`` are the
    weights :math:`w_t` *before* the step, ``buffers`` :math:`b_t` (already advanced), ``previous_buffers``
    :math:`b_{t-1}`, ``direction`` :math:`u_t`. ``direct_*`` are the indicators :math:`[\theta = x]` for
    the parameters in these lists; ``lr_derivative`` is :math:`d\eta/d\theta` for the lr tangent (1 for
    lr itself, the scheduled lr for a multiplier on it, ``lr_scale``). ``use_buffer`` says whether the group keeps a momentum buffer
    (default: ``tangent_b is not None``); ``first_step`` means the buffers were created on this step
    (:math:`\dot b_1 = \dot d_1`).

    ``hvp=None`` is the *fresh* update: the tangents are zero on entry (greedy horizon, reset step), so
    their memory is overwritten, never read, and :math:`H_t \dot w_t = 0` needs no evaluation. Then
    ``tangent_b`` may be ``None`` even with a buffer (the greedy horizon keeps no :math:`\dot b`). Cost:
    at most 3 passes (e.g. lr: :math:`\dot w = -u_t`, one pass).
    """
    if use_buffer is None:
        use_buffer = tangent_b is not None
    if hvp is None:
        _fresh_tangent(
            tangent_w, tangent_b, params, buffers, previous_buffers, direction, lr=lr, momentum=momentum,
            dampening=dampening, nesterov=nesterov, first_step=first_step, use_buffer=use_buffer,
            direct_lr=direct_lr, direct_weight_decay=direct_weight_decay, direct_momentum=direct_momentum,
            foreach=foreach, lr_derivative=lr_derivative,
        )
        return
    if foreach:
        _tangent_update_foreach(
            tangent_w, tangent_b, hvp, params, buffers, previous_buffers, direction,
            lr=lr, weight_decay=weight_decay, momentum=momentum, dampening=dampening,
            nesterov=nesterov, first_step=first_step, direct_lr=direct_lr,
            direct_weight_decay=direct_weight_decay, direct_momentum=direct_momentum, lr_derivative=lr_derivative,
        )
        return
    for i, (tw, d_dot) in enumerate(zip(tangent_w, hvp)):
        if weight_decay != 0:
            d_dot.add_(tw, alpha=weight_decay)
        if direct_weight_decay:
            d_dot.add_(params[i])
        if tangent_b is not None:
            tb = tangent_b[i]
            if first_step:
                tb.copy_(d_dot)
            else:
                tb.mul_(momentum).add_(d_dot, alpha=1 - dampening)
                if direct_momentum:
                    tb.add_(previous_buffers[i])  # type: ignore[index,arg-type]
            if nesterov:
                u_dot = d_dot.add_(tb, alpha=momentum)
                if direct_momentum:
                    u_dot.add_(buffers[i])  # type: ignore[index]
            else:
                u_dot = tb
        else:
            u_dot = d_dot
        tw.add_(u_dot, alpha=-lr)
        if direct_lr:
            tw.add_(direction[i], alpha=-lr_derivative)


def _tangent_update_foreach(
    tangent_w, tangent_b, hvp, params, buffers, previous_buffers, direction, *,
    lr, weight_decay, momentum, dampening, nesterov, first_step, direct_lr,
    direct_weight_decay, direct_momentum, lr_derivative,
) -> None:
    # Same ops as the reference loop above, one kernel per op for the whole list.
    d_dot = hvp
    if weight_decay != 0:
        torch._foreach_add_(d_dot, tangent_w, alpha=weight_decay)
    if direct_weight_decay:
        torch._foreach_add_(d_dot, params)
    if tangent_b is not None:
        if first_step:
            torch._foreach_copy_(tangent_b, d_dot)
        else:
            torch._foreach_mul_(tangent_b, momentum)
            torch._foreach_add_(tangent_b, d_dot, alpha=1 - dampening)
            if direct_momentum:
                torch._foreach_add_(tangent_b, previous_buffers)
        if nesterov:
            torch._foreach_add_(d_dot, tangent_b, alpha=momentum)
            if direct_momentum:
                torch._foreach_add_(d_dot, buffers)
            u_dot = d_dot
        else:
            u_dot = tangent_b
    else:
        u_dot = d_dot
    torch._foreach_add_(tangent_w, u_dot, alpha=-lr)
    if direct_lr:
        torch._foreach_add_(tangent_w, direction, alpha=-lr_derivative)


def _fresh_tangent(
    tangent_w, tangent_b, params, buffers, previous_buffers, direction, *, lr, momentum, dampening, nesterov,
    first_step, use_buffer, direct_lr, direct_weight_decay, direct_momentum, foreach, lr_derivative,
    accumulate=False,
) -> None:
    r"""The tangent update from zero tangents: only the direct terms survive.

    lr: :math:`\dot w = -(d\eta/d\theta)\, u_t,\ \dot b = 0`. Weight decay: :math:`\dot d = w_t`,
    :math:`\dot b = \dot d\ (\text{first step}) \text{ or } (1-\tau)\dot d`. Momentum:
    :math:`\dot d = 0,\ \dot b = b_{t-1}` (0 on a first step). Then
    :math:`\dot u = \dot d + \mu \dot b\ (+\,[\theta=\mu] b_t)` (nesterov) or :math:`\dot b`, and
    :math:`\dot w = -\eta \dot u - [\theta=\eta] u_t`. Written with scale-and-copy ops so that no
    stale value (not even NaN) survives.

    ``accumulate=True`` adds these direct terms :math:`c_t` to the tangents instead of writing them
    (:func:`sgd_direct_terms_`).
    """
    def scaled(dst, src, factor):  # dst <- factor * src, or 0 when src is None (accumulate: dst += ...)
        if accumulate:
            if src is not None:
                add(dst, src, factor)
            return
        if src is None:
            if foreach:
                torch._foreach_zero_(dst)
            else:
                for a in dst:
                    a.zero_()
        elif foreach:
            torch._foreach_copy_(dst, src)
            torch._foreach_mul_(dst, factor)
        else:
            for a, b in zip(dst, src):
                a.copy_(b).mul_(factor)

    def add(dst, src, factor):  # dst += factor * src
        if foreach:
            torch._foreach_add_(dst, src, alpha=factor)
        else:
            for a, b in zip(dst, src):
                a.add_(b, alpha=factor)

    # b' (the source of u' for the decay and momentum tangents), as a scale of an existing tensor list.
    if direct_weight_decay:
        b_src, b_scale = params, (1.0 if first_step else 1.0 - dampening)
    elif direct_momentum and use_buffer and not first_step:
        b_src, b_scale = previous_buffers, 1.0
    else:
        b_src, b_scale = None, 0.0
    if tangent_b is not None:
        scaled(tangent_b, b_src, b_scale)

    if direct_lr:
        scaled(tangent_w, direction, -lr_derivative)
    elif direct_weight_decay:
        if not use_buffer:
            scaled(tangent_w, params, -lr)  # u' = d' = w
        elif nesterov:  # u' = d' + mu b' = (1 + mu * b_scale) w
            scaled(tangent_w, params, -lr * (1.0 + momentum * b_scale))
        else:
            scaled(tangent_w, params, -lr * b_scale)
    elif direct_momentum and use_buffer:
        if nesterov:  # u' = mu b' + b_t
            scaled(tangent_w, buffers, -lr)
            if b_src is not None:
                add(tangent_w, b_src, -lr * momentum)
        elif b_src is not None:
            scaled(tangent_w, b_src, -lr)
        else:
            scaled(tangent_w, None, 0.0)
    else:
        scaled(tangent_w, None, 0.0)


def sgd_direct_terms_(
    tangent_w: List[Tensor],
    tangent_b: Optional[List[Tensor]],
    params: List[Tensor],
    buffers: Optional[List[Tensor]],
    previous_buffers: Optional[List[Optional[Tensor]]],
    direction: List[Tensor],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    first_step: bool,
    use_buffer: bool,
    direct_lr: bool,
    direct_weight_decay: bool,
    direct_momentum: bool,
    foreach: bool,
    lr_derivative: float = 1.0,
) -> None:
    r"""Add the direct terms :math:`c_t` of one SGD tangent step to :math:`(\dot w, \dot b)`, in place.

    The tangent step is linear: :math:`z_{t+1} = A_t z_t + c_t` with :math:`z = (\dot w, \dot b)`.
    :func:`sgd_tangent_update_` with every ``direct_*`` false computes the homogeneous part
    :math:`A_t z_t`; this function then adds :math:`c_t`, the update from zero tangents (the
    :math:`[\theta = x]` terms), so that the two calls reproduce the full update up to rounding.
    Arguments as :func:`sgd_tangent_update_`. Cost: at most 2 passes (none when nothing is direct).
    """
    _fresh_tangent(
        tangent_w, tangent_b, params, buffers, previous_buffers, direction, lr=lr, momentum=momentum,
        dampening=dampening, nesterov=nesterov, first_step=first_step, use_buffer=use_buffer,
        direct_lr=direct_lr, direct_weight_decay=direct_weight_decay, direct_momentum=direct_momentum,
        foreach=foreach, lr_derivative=lr_derivative, accumulate=True,
    )


def sgd_state_sq_norm(tangent_w: List[Tensor], tangent_b: Optional[List[Tensor]], *, lr: float) -> Tensor:
    r""":math:`\lVert \dot w\rVert^2 + \eta^2 \lVert \dot b\rVert^2` as a 0-d float64 tensor (no host sync).

    The squared norm of the tangent state :math:`z = (\dot w, \eta \dot b)`: :math:`\eta \dot b` is the
    displacement of :math:`\dot w` that :math:`\dot b` causes at the next step, so both parts are in
    the units of :math:`\dot w`. Complex tangents count their real and imaginary parts. Cost: one
    norm kernel per list.
    """
    total = _sq_norm(tangent_w)
    if tangent_b is not None and lr != 0.0:
        total = total + (lr * lr) * _sq_norm(tangent_b)
    return total


def _sq_norm(tensors: List[Tensor]) -> Tensor:
    """The sum of squares of every entry, accumulated in float64 (0-d tensor on the tensors' device)."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    if not any(t.is_complex() for t in tensors):  # one kernel for the whole list
        return torch.stack(torch._foreach_norm(tensors, 2, dtype=torch.float64)).square().sum()
    return sum(torch.linalg.vector_norm(t, dtype=torch.complex128 if t.is_complex() else torch.float64).square()
               for t in tensors)  # type: ignore[return-value]
