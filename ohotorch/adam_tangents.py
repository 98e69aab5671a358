r"""Pure functions: torch.optim.Adam / AdamW's update and its forward-mode tangents.

One Adam step (``decoupled`` = AdamW), elementwise, with :math:`c_1 = 1-\beta_1^t`, :math:`c_2 = 1-\beta_2^t`:

.. math::
    d_t = g_t + \lambda w_t \ (\text{Adam; AdamW: } d_t = g_t),\quad
    m_t = \beta_1 m_{t-1} + (1-\beta_1) d_t,\quad
    v_t = \beta_2 v_{t-1} + (1-\beta_2) d_t^2 \\
    \delta_t = \sqrt{v_t}/\sqrt{c_2} + \epsilon,\quad u_t = m_t / \delta_t,\quad
    w_{t+1} = \kappa\, w_t - \frac{\eta}{c_1} u_t,\quad \kappa = 1 - \eta\lambda \ (\text{AdamW}) \text{ or } 1

Tangents with respect to one scalar :math:`\theta` (``[theta = x]`` as in :mod:`ohotorch.sgd_tangents`):

.. math::
    \dot d_t = H_t \dot w_t + \lambda \dot w_t + [\theta=\lambda] w_t \quad(\text{AdamW: } H_t \dot w_t) \\
    \dot m_t = \beta_1 \dot m_{t-1} + (1-\beta_1)\dot d_t,\quad
    \dot v_t = \beta_2 \dot v_{t-1} + 2(1-\beta_2)\, d_t \dot d_t \\
    \dot\delta_t = \dot v_t / (2\sqrt{v_t}\sqrt{c_2})\ (0 \text{ where } v_t = 0),\quad
    \dot u_t = \dot m_t/\delta_t - m_t \dot\delta_t/\delta_t^2 \\
    \dot w_{t+1} = \kappa \dot w_t - \frac{\eta}{c_1}\dot u_t - [\theta=\eta]\frac{u_t}{c_1}
                   - (\text{AdamW}) \big([\theta=\eta]\lambda + [\theta=\lambda]\eta\big) w_t

Cost: the weight update is torch's, op for op (bit-identical trajectories when nothing is tuned). A
tangent update is ~12 elementwise passes plus one Hessian-vector product; memory is three tensors
(:math:`\dot w, \dot m, \dot v`) per tangent. Functions ending in ``_`` write into their arguments.
"""
from __future__ import annotations

from typing import Any, Dict, List

import torch
from torch import Tensor

__all__ = ["adam_direction_", "adam_apply_", "adam_tangent_update_"]


def adam_direction_(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    steps: List[Tensor],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled: bool,
    foreach: bool,
) -> Dict[str, Any]:
    """Advance step counts and moments in place and compute the denominators (torch.optim.Adam's ops).

    Returns ``d`` (the gradient the moments saw), ``denom`` (:math:`\\delta_t`), ``bc1`` and
    ``bc2_sqrt`` per parameter; the weights are not moved (see :func:`adam_apply_`).
    """
    if weight_decay != 0 and not decoupled:
        if foreach:
            d = list(torch._foreach_add(grads, params, alpha=weight_decay))
        else:
            d = [g.add(p, alpha=weight_decay) for g, p in zip(grads, params)]
    else:
        d = list(grads)
    if foreach:
        torch._foreach_add_(steps, 1)
        torch._foreach_lerp_(exp_avgs, d, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, d, d, 1 - beta2)
    else:
        for s, m, v, di in zip(steps, exp_avgs, exp_avg_sqs, d):
            s += 1
            m.lerp_(di, 1 - beta1)
            v.mul_(beta2).addcmul_(di, di, value=1 - beta2)
    counts = [float(s) for s in steps]  # torch reads the CPU step tensors the same way
    bc1 = [1 - beta1**t for t in counts]
    bc2_sqrt = [(1 - beta2**t) ** 0.5 for t in counts]
    if foreach:
        denom = list(torch._foreach_sqrt(exp_avg_sqs))
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
    else:
        denom = [(v.sqrt() / c).add_(eps) for v, c in zip(exp_avg_sqs, bc2_sqrt)]
    return dict(d=d, denom=denom, bc1=bc1, bc2_sqrt=bc2_sqrt)


def adam_apply_(
    params: List[Tensor], exp_avgs: List[Tensor], denom: List[Tensor], bc1: List[float], *, lr: float,
    weight_decay: float, decoupled: bool, foreach: bool,
) -> None:
    r""":math:`w \leftarrow \kappa w - (\eta/c_1)\, m/\delta` in place (torch's decay then addcdiv)."""
    if foreach:
        if decoupled and weight_decay != 0:
            torch._foreach_mul_(params, 1 - lr * weight_decay)
        torch._foreach_addcdiv_(params, exp_avgs, denom, [(lr / c) * -1 for c in bc1])
    else:
        for p, m, dn, c in zip(params, exp_avgs, denom, bc1):
            if decoupled and weight_decay != 0:
                p.mul_(1 - lr * weight_decay)
            p.addcdiv_(m, dn, value=-(lr / c))


def adam_tangent_update_(
    tangent_w: List[Tensor],
    tangent_m: List[Tensor],
    tangent_v: List[Tensor],
    hvp: List[Tensor],
    params: List[Tensor],
    d: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    denom: List[Tensor],
    bc1: List[float],
    bc2_sqrt: List[float],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    decoupled: bool,
    direct_lr: bool,
    direct_weight_decay: bool,
) -> None:
    r"""Advance one tangent triple :math:`(\dot w, \dot m, \dot v)` by one Adam step, in place.

    ``hvp`` holds :math:`H_t \dot w_t` (overwritten as scratch); ``params`` are :math:`w_t` before the
    step; ``exp_avgs``/``exp_avg_sqs``/``denom`` are :math:`m_t, v_t, \delta_t` after it.
    Per-tensor (elementwise math of this size gains little from foreach).
    """
    kappa = 1 - lr * weight_decay if decoupled else 1.0
    for i, d_dot in enumerate(hvp):
        tw, tm, tv, w = tangent_w[i], tangent_m[i], tangent_v[i], params[i]
        if not decoupled:
            if weight_decay != 0:
                d_dot.add_(tw, alpha=weight_decay)
            if direct_weight_decay:
                d_dot.add_(w)
        tm.mul_(beta1).add_(d_dot, alpha=1 - beta1)
        tv.mul_(beta2).addcmul_(d[i], d_dot, value=2 * (1 - beta2))
        root = exp_avg_sqs[i].sqrt().clamp_min_(torch.finfo(exp_avg_sqs[i].dtype).tiny)
        denom_dot = tv / (root * (2 * bc2_sqrt[i]))  # where v = 0, v' = 0 too: 0, not 0/0
        u = exp_avgs[i] / denom[i]
        u_dot = (tm - u * denom_dot) / denom[i]
        if kappa != 1.0:
            tw.mul_(kappa)
        tw.add_(u_dot, alpha=-lr / bc1[i])
        if direct_lr:
            tw.add_(u, alpha=-1 / bc1[i])
            if decoupled and weight_decay != 0:
                tw.add_(w, alpha=-weight_decay)
        if direct_weight_decay and decoupled:
            tw.add_(w, alpha=-lr)
