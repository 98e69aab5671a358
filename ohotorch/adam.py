r"""``OHOAdam`` and ``OHOAdamW``: torch.optim.Adam / AdamW with lr and weight decay tuned online.

Same method, closures, influence modes, horizons, meta-update and guarantees as :class:`ohotorch.OHO`;
only the inner rule differs (:class:`ohotorch.rules.AdamRule`, whose update and tangents are in
:mod:`ohotorch.adam_tangents`).
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Tuple

from .compat import check_torch_arguments
from .hyper_groups import DEFAULT_TUNE
from .optimizer import OHO
from .options import Options
from .rules import AdamRule

__all__ = ["OHOAdam", "OHOAdamW"]


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
        params, lr, betas, eps, weight_decay: as torch.optim.Adam.
        amsgrad, maximize, capturable, differentiable, fused, decoupled_weight_decay: torch.optim's
            arguments, accepted at their default values (``False``; ``fused`` also ``None``); other
            values are refused with what to do instead (:mod:`ohotorch.compat`). ``foreach`` is an option.
        tune: any subset of ``("lr", "lr_scale", "weight_decay")`` (``lr_scale``: a tuned multiplier
            on a scheduled lr, see :class:`ohotorch.OHO`); a weight decay that starts at 0 is tuned only
            when asked (see :class:`ohotorch.OHO`).
        **options: OHO's meta-update and influence options (``meta_lr``, ``meta_optimizer``, ``space``,
            ``bounds``, ``influence``, ``hvp``, ``fd_rel``, ``compute_dtype``, ``reset_every``, ``discount``,
            ``growth_cap``, ``average``, ``module``, ``foreach``, ``fast_start``, ``fast_start_growth``, ``lr_down``), with
            OHO's defaults (:class:`ohotorch.options.Options`).

    Guarantees, refusals and warnings as :class:`ohotorch.OHO` (strong exception safety of ``step()``).
    **Copies:** ``copy.deepcopy``, ``pickle`` and ``torch.save`` keep every option and continue exactly
    like the original (copy the model with it: ``deepcopy((model, opt))``). **state_dict:** a
    torch.optim.Adam / AdamW state_dict loads (``tune``, ``lr_scale`` keep this optimizer's values); an
    SGD-family one (torch.optim.SGD, :class:`ohotorch.OHO`) is refused with a ValueError naming both,
    before anything changes (OHOAdam and OHOAdamW load each other's, as torch.optim's Adam and AdamW
    do). Complex parameters are refused at construction (use :class:`ohotorch.OHO`).
    """

    _rule = AdamRule(decoupled=False)
    TUNABLE = AdamRule.tunable
    _LEGACY_GROUP_DEFAULTS: Dict[str, Any] = {"lr_scale": 1.0, "tune": ("lr", "weight_decay")}
    decoupled = False

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        decoupled_weight_decay: bool = False,
        tune: Iterable[str] = DEFAULT_TUNE,
        **options: Any,
    ) -> None:
        unknown = sorted(set(options) - set(Options.names()))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected keyword arguments: {unknown}")
        torch_arguments = dict(amsgrad=amsgrad, maximize=maximize, capturable=capturable,
                               differentiable=differentiable, fused=fused)
        if not self.decoupled:
            torch_arguments["decoupled_weight_decay"] = decoupled_weight_decay
        check_torch_arguments(type(self).__name__, **torch_arguments)
        defaults = dict(lr=lr, lr_scale=1.0, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        tune=self._default_tune(tune))
        self._setup(params, defaults, Options(**options))


class OHOAdamW(OHOAdam):
    r"""torch.optim.AdamW (decoupled weight decay, :math:`w \leftarrow (1-\eta\lambda) w` before the Adam
    step) whose lr and weight decay tune themselves. Everything else as :class:`OHOAdam`; torch's
    default weight decay of 0.01."""

    _rule = AdamRule(decoupled=True)
    decoupled = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        tune: Iterable[str] = DEFAULT_TUNE,
        **options: Any,
    ) -> None:
        if "decoupled_weight_decay" in options:  # as torch.optim.AdamW, which has no such argument
            raise TypeError(f"{type(self).__name__} got an unexpected keyword argument 'decoupled_weight_decay' "
                            "(its weight decay is decoupled; ohotorch.OHOAdam's is L2)")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         maximize=maximize, capturable=capturable, differentiable=differentiable, fused=fused,
                         tune=tune, **options)
