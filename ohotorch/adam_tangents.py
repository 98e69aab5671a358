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
tangent update is 10-12 ``foreach`` kernels plus one Hessian-vector product; from zero tangents (the
greedy horizon) 2-3 kernels and no HVP, except Adam's weight-decay tangent (9). Memory is three tensors
(:math:`\dot w, \dot m, \dot v`) per tangent; the update from zero tangents needs no :math:`\dot m,
\dot v`, so a caller that restarts them every step may keep :math:`\dot w` alone. Every function has
a per-tensor reference path and a ``foreach`` path (``torch._foreach_*``) that give the same numbers.
Functions ending in ``_`` write into their arguments.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

__all__ = ["AdamDirection", "adam_direction_", "adam_apply_", "adam_tangent_update_", "adam_direct_terms_",
           "adam_state_sq_norm"]


class AdamDirection(NamedTuple):
    """What one Adam step computed before moving the weights, per parameter."""

    d: List[Tensor]  # the gradient the moments saw (g + lam w for Adam, g for AdamW)
    denom: List[Tensor]  # delta_t = sqrt(v_t) / sqrt(c_2) + eps
    bc1: List[float]  # c_1 = 1 - beta1^t
    bc2_sqrt: List[float]  # sqrt(c_2) = sqrt(1 - beta2^t)


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
) -> AdamDirection:
    """Advance step counts and moments in place and compute the denominators (torch.optim.Adam's ops).

    Returns an :class:`AdamDirection` (``d``, ``denom`` :math:`\\delta_t`, ``bc1``, ``bc2_sqrt`` per
    parameter); the weights are not moved (see :func:`adam_apply_`).
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
    return AdamDirection(d=d, denom=denom, bc1=bc1, bc2_sqrt=bc2_sqrt)


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
    tangent_m: Optional[List[Tensor]],
    tangent_v: Optional[List[Tensor]],
    hvp: Optional[List[Tensor]],
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
    foreach: bool,
    lr_derivative: float = 1.0,
) -> None:
    r"""Advance one tangent triple :math:`(\dot w, \dot m, \dot v)` by one Adam step, in place.

    ``hvp`` holds :math:`H_t \dot w_t` (overwritten as scratch); ``params`` are :math:`w_t` before the
    step; ``exp_avgs``/``exp_avg_sqs``/``denom`` are :math:`m_t, v_t, \delta_t` after it.
    ``lr_derivative`` is :math:`d\eta/d\theta` for the lr tangent (1 for lr, the scheduled lr for the
    multiplier ``lr_scale``): it scales the :math:`[\theta=\eta]` terms.

    ``hvp=None`` is the *fresh* update: the tangents are zero on entry (greedy horizon, reset step), so
    their memory is overwritten, never read, and :math:`H_t \dot w_t = 0`. Then ``tangent_m`` and
    ``tangent_v`` may be ``None`` (the greedy horizon keeps no :math:`\dot m, \dot v`); given, they
    receive their values. With :math:`\dot d = [\theta=\lambda] w_t` (Adam) or 0 (AdamW):

    .. math::
        \dot w_{t+1} = -\frac{\eta}{c_1}\Big(\frac{(1-\beta_1)\dot d}{\delta_t}
                       - \frac{1-\beta_2}{\sqrt{c_2}}\,\frac{m_t d_t \dot d}{\sqrt{v_t}\,\delta_t^2}\Big)
                       - [\theta=\eta]\frac{u_t}{c_1}
                       - (\text{AdamW})\big([\theta=\eta]\lambda + [\theta=\lambda]\eta\big) w_t

    Cost, in kernels over the whole list on the ``foreach`` path: 10 to 12 (Adam lr 11 or 10 without
    decay, Adam wd 11, AdamW lr 12, AdamW wd 11); fresh, with no companions: Adam lr 2, Adam wd 9,
    AdamW lr 3, AdamW wd 2, one of them a fill with zeros, plus a fill per companion given (and one
    more pass each for the Adam wd tangent, the only one whose :math:`\dot m, \dot v` are not zero).
    """
    if hvp is None:
        _fresh_tangent_update_(
            tangent_w, tangent_m, tangent_v, params, d, exp_avgs, exp_avg_sqs, denom, bc1, bc2_sqrt,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, decoupled=decoupled,
            direct_lr=direct_lr, direct_weight_decay=direct_weight_decay, foreach=foreach,
            lr_derivative=lr_derivative,
        )
        return
    if tangent_m is None or tangent_v is None:
        raise ValueError("adam_tangent_update_ needs tangent_m and tangent_v unless hvp is None (fresh update)")
    if foreach:
        _tangent_update_foreach_(
            tangent_w, tangent_m, tangent_v, hvp, params, d, exp_avgs, exp_avg_sqs, denom, bc1, bc2_sqrt,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, decoupled=decoupled,
            direct_lr=direct_lr, direct_weight_decay=direct_weight_decay, lr_derivative=lr_derivative,
        )
        return
    # The reference: the equations of the module docstring, one tensor and one op at a time.
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
        # Divided step by step: root * 2 sqrt(1 - beta2) can be subnormal where v = 0, and with
        # flush-to-zero on (torch.set_flush_denormal) the product would be 0 and give 0/0. v' = 0 there too.
        denom_dot = tv / root / (2 * bc2_sqrt[i])
        u = exp_avgs[i] / denom[i]
        u_dot = (tm - u * denom_dot) / denom[i]
        if kappa != 1.0:
            tw.mul_(kappa)
        tw.add_(u_dot, alpha=-lr / bc1[i])
        if direct_lr:
            tw.add_(u, alpha=-lr_derivative / bc1[i])
            if decoupled and weight_decay != 0:
                tw.add_(w, alpha=-weight_decay * lr_derivative)
        if direct_weight_decay and decoupled:
            tw.add_(w, alpha=-lr)


def _tangent_update_foreach_(
    tangent_w, tangent_m, tangent_v, hvp, params, d, exp_avgs, exp_avg_sqs, denom, bc1, bc2_sqrt, *,
    lr, beta1, beta2, weight_decay, decoupled, direct_lr, direct_weight_decay, lr_derivative,
) -> None:
    # The reference's maths, one kernel per op for the whole list, regrouped to fuse ops:
    #   q = v' / (sqrt(v) delta) = 2 c2s delta' / delta,  so  u delta' = m q / (2 c2s)  and
    #   w' += -(lr/c1) (m' - m q / (2 c2s)) / delta:
    # u and delta' are never formed (5 kernels from sqrt(v) to m' - u delta' where the reference has 8,
    # and at most 2 temporary lists alive at once).
    d_dot = hvp
    if not decoupled:
        if weight_decay != 0:
            torch._foreach_add_(d_dot, tangent_w, alpha=weight_decay)
        if direct_weight_decay:
            torch._foreach_add_(d_dot, params)
    torch._foreach_lerp_(tangent_m, d_dot, 1 - beta1)  # torch's own m update: one pass, not mul + add
    torch._foreach_mul_(tangent_v, beta2)
    torch._foreach_addcmul_(tangent_v, d, d_dot, 2 * (1 - beta2))
    root = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_clamp_min_(root, [torch.finfo(r.dtype).tiny for r in root])  # v = 0: v' = 0, q = 0
    q = torch._foreach_div(tangent_v, root)
    del root
    torch._foreach_div_(q, denom)
    step = torch._foreach_addcmul(tangent_m, exp_avgs, q, [-0.5 / c for c in bc2_sqrt])  # m' - u delta'
    del q
    if decoupled and weight_decay != 0:
        torch._foreach_mul_(tangent_w, 1 - lr * weight_decay)
    torch._foreach_addcdiv_(tangent_w, step, denom, [-lr / c for c in bc1])
    del step
    _foreach_direct_terms_(tangent_w, params, exp_avgs, denom, bc1, lr=lr, weight_decay=weight_decay,
                           decoupled=decoupled, direct_lr=direct_lr, direct_weight_decay=direct_weight_decay,
                           lr_derivative=lr_derivative)


def _foreach_direct_terms_(
    tangent_w, params, exp_avgs, denom, bc1, *, lr, weight_decay, decoupled, direct_lr, direct_weight_decay,
    lr_derivative,
) -> None:
    """w' -= [theta = lr] (dlr/dtheta) (u / c1 + AdamW: lambda w) + AdamW: [theta = lambda] lr w."""
    if direct_lr:
        torch._foreach_addcdiv_(tangent_w, exp_avgs, denom, [-lr_derivative / c for c in bc1])  # - u / c1
        if decoupled and weight_decay != 0:
            torch._foreach_add_(tangent_w, params, alpha=-weight_decay * lr_derivative)
    if direct_weight_decay and decoupled:
        torch._foreach_add_(tangent_w, params, alpha=-lr)


def _fresh_tangent_update_(
    tangent_w, tangent_m, tangent_v, params, d, exp_avgs, exp_avg_sqs, denom, bc1, bc2_sqrt, *,
    lr, beta1, beta2, weight_decay, decoupled, direct_lr, direct_weight_decay, foreach, lr_derivative,
    accumulate=False,
) -> None:
    # The tangents are zero on entry but their memory may hold anything (a NaN included): every
    # buffer is zero-filled first and only added to afterwards. Both paths run the same ops.
    # accumulate=True (adam_direct_terms_): no zero-fill, the direct terms are added to the tangents.
    weight_dot = direct_weight_decay and not decoupled  # d' = w; otherwise d' = 0, so m' = v' = u' = 0
    kept = [] if accumulate else [t for t in (tangent_w, tangent_m, tangent_v) if t is not None]
    if foreach:
        for t in kept:
            torch._foreach_zero_(t)
        if weight_dot:
            if tangent_m is not None:
                torch._foreach_add_(tangent_m, params, alpha=1 - beta1)
            if tangent_v is not None:
                torch._foreach_addcmul_(tangent_v, d, params, 2 * (1 - beta2))
            # q = m d w / (sqrt(v) delta) = u delta' c2s / (1-beta2), 0 where v = 0. Formed as
            # (d w / sqrt(v)) m / delta, each step bounded, so low-precision weights do not overflow.
            root = torch._foreach_sqrt(exp_avg_sqs)
            torch._foreach_clamp_min_(root, [torch.finfo(r.dtype).tiny for r in root])
            q = torch._foreach_mul(d, params)
            torch._foreach_div_(q, root)
            del root
            torch._foreach_mul_(q, exp_avgs)
            torch._foreach_div_(q, denom)
            torch._foreach_addcdiv_(tangent_w, params, denom, [-(lr / c) * (1 - beta1) for c in bc1])
            torch._foreach_addcdiv_(tangent_w, q, denom,
                                    [(lr / c) * (1 - beta2) / s for c, s in zip(bc1, bc2_sqrt)])
            del q
        _foreach_direct_terms_(tangent_w, params, exp_avgs, denom, bc1, lr=lr, weight_decay=weight_decay,
                               decoupled=decoupled, direct_lr=direct_lr, direct_weight_decay=direct_weight_decay,
                               lr_derivative=lr_derivative)
        return
    for i, (tw, w) in enumerate(zip(tangent_w, params)):
        for t in kept:
            t[i].zero_()
        c1, c2s = bc1[i], bc2_sqrt[i]
        if weight_dot:
            if tangent_m is not None:
                tangent_m[i].add_(w, alpha=1 - beta1)
            if tangent_v is not None:
                tangent_v[i].addcmul_(d[i], w, value=2 * (1 - beta2))
            root = exp_avg_sqs[i].sqrt().clamp_min_(torch.finfo(exp_avg_sqs[i].dtype).tiny)
            q = (d[i] * w).div_(root).mul_(exp_avgs[i]).div_(denom[i])
            tw.addcdiv_(w, denom[i], value=-(lr / c1) * (1 - beta1))
            tw.addcdiv_(q, denom[i], value=(lr / c1) * (1 - beta2) / c2s)
        if direct_lr:
            tw.addcdiv_(exp_avgs[i], denom[i], value=-lr_derivative / c1)
            if decoupled and weight_decay != 0:
                tw.add_(w, alpha=-weight_decay * lr_derivative)
        if direct_weight_decay and decoupled:
            tw.add_(w, alpha=-lr)


def adam_direct_terms_(
    tangent_w: List[Tensor],
    tangent_m: List[Tensor],
    tangent_v: List[Tensor],
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
    foreach: bool,
    lr_derivative: float = 1.0,
) -> None:
    r"""Add the direct terms :math:`c_t` of one Adam tangent step to :math:`(\dot w, \dot m, \dot v)`.

    The tangent step is linear, :math:`z_{t+1} = A_t z_t + c_t`: :func:`adam_tangent_update_` with
    ``direct_lr = direct_weight_decay = False`` computes :math:`A_t z_t` in place, this adds
    :math:`c_t` (the fresh update's values, see :func:`adam_tangent_update_`), so that the two calls
    reproduce the full update up to rounding. Arguments as :func:`adam_tangent_update_`. Cost: the fresh
    update's kernels without its zero-fills (none when nothing is direct).
    """
    _fresh_tangent_update_(
        tangent_w, tangent_m, tangent_v, params, d, exp_avgs, exp_avg_sqs, denom, bc1, bc2_sqrt,
        lr=lr, beta1=beta1, beta2=beta2, weight_decay=weight_decay, decoupled=decoupled,
        direct_lr=direct_lr, direct_weight_decay=direct_weight_decay, foreach=foreach,
        lr_derivative=lr_derivative, accumulate=True,
    )


def adam_state_sq_norm(
    tangent_w: List[Tensor],
    tangent_m: List[Tensor],
    tangent_v: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    denom: List[Tensor],
    bc1: List[float],
    bc2_sqrt: List[float],
    *,
    lr: float,
) -> Tensor:
    r"""The squared norm of the Adam tangent state, as a 0-d float64 tensor (no host sync).

    Each companion is measured by the displacement of :math:`\dot w` it causes at the next step
    (the analogue of SGD's :math:`\eta \dot b`), with step :math:`t`'s moments:

    .. math::
        \lVert z\rVert^2 = \lVert \dot w\rVert^2
          + \Big\lVert \frac{\eta}{c_1}\frac{\dot m}{\delta_t}\Big\rVert^2
          + \Big\lVert \frac{\eta}{c_1}\frac{m_t\,\dot v}{2\sqrt{c_2}\sqrt{v_t}\,\delta_t^2}\Big\rVert^2

    (:math:`\dot w_{t+1} \ni -\frac{\eta}{c_1}(\dot m/\delta - m \dot\delta/\delta^2)` with
    :math:`\dot\delta = \dot v/(2\sqrt{c_2}\sqrt{v})`; 0 where :math:`v_t = 0`). The same metric (step
    :math:`t`'s) measures the state before and after the step, so their ratio is the growth of the
    homogeneous map alone. Cost: about 8 elementwise passes and 3 norms per parameter.
    """
    total = torch.zeros((), dtype=torch.float64, device=tangent_w[0].device if tangent_w else None)
    for i, tw in enumerate(tangent_w):
        total = total + _sq_norm(tw)
        if lr == 0.0:
            continue
        scale = lr / bc1[i]
        total = total + (scale * scale) * _sq_norm(tangent_m[i] / denom[i])
        root = exp_avg_sqs[i].sqrt().clamp_min_(torch.finfo(exp_avg_sqs[i].dtype).tiny)
        pv = (tangent_v[i] / root).div_(denom[i]).mul_(exp_avgs[i]).div_(denom[i])
        total = total + (scale * 0.5 / bc2_sqrt[i]) ** 2 * _sq_norm(pv)
    return total


def _sq_norm(t: Tensor) -> Tensor:
    """The sum of squares of ``t``'s entries, accumulated in float64 (a 0-d tensor)."""
    return torch.linalg.vector_norm(t, dtype=torch.float64).square()
