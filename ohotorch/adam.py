r"""``OHOAdam`` and ``OHOAdamW``: torch.optim.Adam / AdamW with lr and weight decay tuned online.

Same method, closures, influence modes, horizons, meta-update and guarantees as :class:`ohotorch.OHO`;
only the inner optimizer differs (its update and tangents are in :mod:`ohotorch.adam_tangents`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, List, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .adam_tangents import adam_apply_, adam_direction_, adam_tangent_update_
from .optimizer import OHO, _real

__all__ = ["OHOAdam", "OHOAdamW"]

# OHO's keyword options (the meta-update and influence), with OHO's defaults.
_OPTIONS = dict(meta_lr=None, meta_optimizer="adam", meta_betas=(0.9, 0.999), meta_eps=1e-15, space="log",
                bounds=None, influence="exact", hvp="forward", fd_rel=None, compute_dtype=None,
                reset_every=None, discount=0.0,
                module=None, foreach=None)


class OHOAdam(OHO):
    r"""torch.optim.Adam (L2 weight decay through the gradient) whose lr and weight decay tune themselves.

    .. math::
        m_t = \beta_1 m_{t-1} + (1-\beta_1)(g_t + \lambda w_t),\quad
        v_t = \beta_2 v_{t-1} + (1-\beta_2)(g_t + \lambda w_t)^2,\quad
        w_{t+1} = w_t - \frac{\eta}{1-\beta_1^t}\,\frac{m_t}{\sqrt{v_t/(1-\beta_2^t)} + \epsilon}

    and the influence :math:`(\dot w, \dot m, \dot v)` of every tuned scalar is carried by the
    derivative of that update (:mod:`ohotorch.adam_tangents`). Cost per step as :class:`OHO`; memory: 3
    tangent tensors per tuned scalar (1 with the greedy default, which keeps no m', v'). Drop-in:
    replace ``torch.optim.Adam(params, lr=...)`` by ``ohotorch.OHOAdam(params, lr=...)`` and use
    closures as shown in :class:`OHO`.

    Args:
        params, lr, betas, eps, weight_decay: as torch.optim.Adam (amsgrad, maximize, fused and
            capturable are not supported).
        tune: any subset of ``("lr", "lr_scale", "weight_decay")`` (``lr_scale``: a tuned multiplier
            on a scheduled lr, see :class:`ohotorch.OHO`).
        **options: OHO's meta-update and influence options (``meta_lr``, ``meta_optimizer``, ``space``,
            ``bounds``, ``influence``, ``hvp``, ``fd_rel``, ``compute_dtype``, ``reset_every``, ``discount``, ``module``,
            ``foreach``), with OHO's defaults.
    """

    TUNABLE = ("lr", "lr_scale", "weight_decay")
    decoupled = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        *,
        tune: Iterable[str] = ("lr", "weight_decay"),
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(_OPTIONS))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments: {unknown}")
        defaults = dict(lr=lr, lr_scale=1.0, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        tune=self._canonical_tune(tune))
        self._configure(**{**_OPTIONS, **options})
        Optimizer.__init__(self, params, defaults)

    def _check_group(self, group: Dict[str, Any]) -> None:
        self._check_lr_and_weight_decay(group)
        eps = _real(group["eps"], "eps")
        if not (math.isfinite(eps) and eps >= 0.0):
            raise ValueError(f"Invalid epsilon value: {group['eps']}")
        b1, b2 = (_real(b, "betas") for b in group["betas"])
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Invalid betas: {group['betas']} (each in [0, 1))")
        group["tune"] = self._canonical_tune(group["tune"])

    def __setstate__(self, state: Dict[str, Any]) -> None:
        Optimizer.__setstate__(self, state)
        for group in self.param_groups:
            group.setdefault("lr_scale", 1.0)
            group.setdefault("tune", ("lr", "weight_decay"))

    def _tangent_buffers(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        return ("tangent_m", "tangent_v")

    def _initialise_inner_state(self, group: Dict[str, Any], p: Tensor, state: Dict[str, Any]) -> None:
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)  # torch.optim.Adam's CPU step counter
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _prepare(self, group: Dict[str, Any], params: List[Tensor], states: List[Dict[str, Any]]) -> Dict[str, Any]:
        for p, s in zip(params, states):
            self._initialise_inner_state(group, p, s)
        foreach = self._use_foreach(params)
        beta1, beta2 = group["betas"]
        work = adam_direction_(
            params, [p.grad for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states], lr=self._lr(group), beta1=beta1, beta2=beta2, eps=group["eps"],
            weight_decay=group["weight_decay"], decoupled=self.decoupled, foreach=foreach,
        )
        work.update(params=params, states=states, foreach=foreach)
        return work

    def _apply(self, group: Dict[str, Any], w: Dict[str, Any]) -> None:
        adam_apply_(w["params"], [s["exp_avg"] for s in w["states"]], w["denom"], w["bc1"], lr=self._lr(group),
                    weight_decay=group["weight_decay"], decoupled=self.decoupled, foreach=w["foreach"])

    def _update_tangent(self, group, w, j, key, g, hv) -> None:
        states = w["states"]
        beta1, beta2 = group["betas"]

        def companion(name):  # m', v' are not kept when the tangents restart from zero every step
            return [s[name][j] for s in states] if all(name in s for s in states) else None

        adam_tangent_update_(
            [s["tangent_w"][j] for s in states], companion("tangent_m"), companion("tangent_v"),
            None if hv is None else [h.to(s["tangent_w"].dtype) for h, s in zip(hv, states)],
            w["params"], w["d"], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
            w["denom"], w["bc1"], w["bc2_sqrt"],
            lr=self._lr(group), beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
            decoupled=self.decoupled,
            direct_lr=key[1] in ("lr", "lr_scale") and self._direct(key, g),
            lr_derivative=self._lr_derivative(group, key),
            direct_weight_decay=key[1] == "weight_decay" and self._direct(key, g),
            foreach=w["foreach"],
        )


class OHOAdamW(OHOAdam):
    r"""torch.optim.AdamW (decoupled weight decay, :math:`w \leftarrow (1-\eta\lambda) w` before the Adam
    step) whose lr and weight decay tune themselves. Everything else as :class:`OHOAdam`; torch's
    default weight decay of 0.01."""

    decoupled = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        tune: Iterable[str] = ("lr", "weight_decay"),
        **options: Any,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, tune=tune, **options)
