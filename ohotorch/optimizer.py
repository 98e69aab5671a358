r"""``OHO``: torch.optim.SGD whose lr, weight decay and momentum tune themselves online.

The shell: it validates arguments (:class:`ohotorch.options.Options`, the rule's group checks), owns the
state, and orders the work of one step. The work itself is elsewhere: the inner rule's update and
tangents (:mod:`ohotorch.rules` over :mod:`ohotorch.sgd_tangents` / :mod:`ohotorch.adam_tangents`), the
influence's layout, norms and hypergradient contraction (:mod:`ohotorch.influence`), the closure
evaluations and Hessian-vector products (:mod:`ohotorch.finite_differences`), and the meta-update
(:mod:`ohotorch.meta`).

**Order of one step.** (1) take the norms of the discounted influence (or note that it restarts from
zero), writing nothing; (2) every closure evaluation: the training one, then a Hessian-vector product
per non-zero tangent of the discounted influence inside one
:class:`~ohotorch.finite_differences.ClosureIsolation` (all K products alive at once); (3) commit: the
tangent layout, the discount, ``prepare`` every group (the rule's state and direction, weights
unmoved); (4) advance every tangent; (5) ``apply`` (move the weights); (6) with ``average``, fold the
new iterate and its influence into their averages (:mod:`ohotorch.averaging`). No closure runs after (2), and
nothing of the optimizer's is written before (3): if any evaluation of (2) fails (any exception,
``KeyboardInterrupt`` included, or no loss returned), a
:class:`~ohotorch.finite_differences.StepRollback` taken on entry puts the gradients (the same tensor
objects, their values too when HVPs ran), the RNG and the module's buffers back, and the isolation
the weights: the strong exception guarantee.

**Host syncs.** On CPU parameters the shell reads what it decides on (tangent norms, finiteness of the
training loss, of each HVP, of the hypergradients) as Python values, which costs nothing there. When
every parameter is on CUDA it takes the **sync-free path**, on which a steady-state ``step`` and
``hyper_step`` never make the host wait for the device:

* the perturbation scales are 0-d device tensors computed from the norms (0 for a zero or non-finite
  tangent, whose HVP then reads zero); every tangent gets its HVP (none is skipped for being zero);
* the meta-update runs on the device (:class:`ohotorch.meta.DeviceMeta`, the same arithmetic as
  :func:`ohotorch.meta.meta_update_`, all or nothing by ``torch.where``);
* what Python must know comes back through :mod:`ohotorch.deferred` (pinned memory and an event):
  counters, warnings and diagnostics when they are read; the tuned values into ``param_groups`` at the
  start of the second step after the hyper-step that computed them; the reset of a non-finite tangent
  at the start of the step after the one whose norms found it;
* a non-finite training loss or HVP is not looked at when it happens: it makes the tangents
  non-finite, and the deferred norm check resets them to zero (counted and warned about) within two
  steps; a tangent never moves the weights (the perturbations are undone by copy), and a non-finite
  hypergradient never reaches a hyperparameter.

**The one-step lag** (sync-free path only). A hyper-step's values are computed on the device at once,
and the next hyper-step continues from them, but they reach ``param_groups``, and so the inner step,
one step later than on CPU: the step right after a hyper-step still uses the previous values.
Waiting for them instead would drain the device's queue at every step. What stays exact: a value set
in ``param_groups`` from outside (by the user or a scheduler) between steps is seen at the next step
or hyper-step and wins over any pending result (its meta state restarts, as on CPU); ``state_dict()``
first applies every pending result, so a checkpoint holds the newest values and the resumed run
continues as the original does after the same call; ``counters`` and ``diagnostics`` wait for the
pending results when read (the only blocking reads). ``_sync_free = True`` / ``False`` on an instance
forces the path either way (the tests run the sync-free path on CPU tensors). With ``growth_cap`` the
gammas are read once per step for ``diagnostics["growth_gamma"]`` on the host path only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import averaging, growth_cap, hyper_groups, influence, meta, sync_free, usage
from .compat import check_torch_arguments
from .finite_differences import (BufferSnapshot, ClosureIsolation, StepRollback, check_loss, fd_hvp,
                                 module_buffers, perturbation_scale, relative_step)
from .influence import TangentKey
from .loss_hyperparameters import LossHyperparameter, LossHyperparameters
from .hyper_groups import DEFAULT_TUNE, DefaultTune
from .options import Options, canonical_tune
from .rules import Rule, SGDRule, effective_lr

__all__ = ["OHO"]

Closure = Callable[[], Any]


def _is_sharded(p: Tensor) -> bool:
    """A parameter that FSDP shards: a DTensor (FSDP2, tensor parallel) or FSDP1's FlatParameter."""
    return type(p).__name__ in ("DTensor", "FlatParameter") or type(getattr(p, "data", None)).__name__ == "DTensor"


@dataclass
class Bookkeeping:
    """Counters, the tangent layout and the meta-optimizer state (saved by state_dict under "oho")."""

    steps: int = 0
    hyper_steps: int = 0
    keys: Optional[List[TangentKey]] = None
    meta_state: Dict[str, Dict[str, float]] = field(default_factory=dict)
    nonfinite_hypergradients: int = 0
    nonfinite_influence: int = 0
    # growth_cap: the EMA of each tangent's log-growth (float64, NaN before its first observation),
    # on the tangents' device; None until the cap first runs (ohotorch.growth_cap).
    growth_ema: Optional[Tensor] = None

    def to_state(self) -> Dict[str, Any]:
        state = {
            "steps": self.steps, "hyper_steps": self.hyper_steps,
            "keys": None if self.keys is None else [list(key) for key in self.keys],
            "meta_state": {slot: dict(values) for slot, values in self.meta_state.items()},
            "nonfinite_hypergradients": self.nonfinite_hypergradients,
            "nonfinite_influence": self.nonfinite_influence,
        }
        if self.growth_ema is not None:  # a host sync (state_dict only)
            state["growth_ema"] = self.growth_ema.tolist()
        return state

    @classmethod
    def from_state(cls, saved: Mapping[str, Any]) -> "Bookkeeping":
        keys = saved.get("keys")
        return cls(
            steps=saved.get("steps", 0), hyper_steps=saved.get("hyper_steps", 0),
            keys=None if keys is None else [(key[0], key[1]) for key in keys],
            meta_state={slot: dict(values) for slot, values in saved.get("meta_state", {}).items()},
            nonfinite_hypergradients=saved.get("nonfinite_hypergradients", 0),
            nonfinite_influence=saved.get("nonfinite_influence", 0),
            growth_ema=(None if saved.get("growth_ema") is None
                        else torch.tensor(saved["growth_ema"], dtype=torch.float64)),
        )


class OHO(Optimizer):
    r"""SGD (torch.optim.SGD's exact semantics) with hyperparameters tuned online by forward-mode
    hypergradients of a validation loss (OHO, Im, Savin & Cho 2021; RTRL / Franceschi et al. 2017).

    **Update.** With :math:`d_t = g_t + \lambda w_t`, :math:`b_t = \mu b_{t-1} + (1-\tau) d_t` and
    :math:`u_t = d_t + \mu b_t` (nesterov) or :math:`b_t`, the weights move as in torch.optim.SGD,
    :math:`w_{t+1} = w_t - \eta u_t`. For every tuned scalar :math:`\theta` (lr :math:`\eta`, weight decay
    :math:`\lambda`, momentum :math:`\mu` of one hyper group) a tangent :math:`\dot w = dw/d\theta` is
    carried forward:

    .. math::
        \dot w_{t+1} = \dot w_t - \eta\,\dot u_t - [\theta=\eta]\,u_t,\qquad
        \dot d_t = H_t \dot w_t + \lambda \dot w_t + [\theta=\lambda]\,w_t

    (momentum adds a tangent buffer :math:`\dot b`, see :mod:`ohotorch.sgd_tangents`).
    ``hyper_step(val_closure)`` reads the hypergradient
    :math:`\partial L_{val}(w_{t+1})/\partial\theta = \langle \nabla L_{val}(w_{t+1}), \dot w_{t+1}\rangle`
    and moves :math:`\theta` with the meta-optimizer (:mod:`ohotorch.meta`).

    **Cost per step** with K tangents (``influence="exact"``: one per (group, tuned name);
    ``"blockwise"``: one per tuned name): K Hessian-vector products by finite differences of the closure
    (K extra gradient evaluations with ``hvp="forward"``, 2K with ``"central"``; none while a tangent is
    zero, so none at all with the default greedy horizon ``discount=0``), plus one validation gradient
    per ``hyper_step``. Memory: K tangents (2K with momentum) of the parameters' size, plus, while HVPs
    run, a copy of the weights, a copy of the gradients on entry (for the rollback, and the start of
    every re-evaluation), the K HVPs (all computed before anything is committed), one discounted
    tangent, and a backup of the training gradient where it is a view into a larger buffer (DDP's
    ``gradient_as_bucket_view``). The copies of the weights and gradients keep their memory between
    steps (no allocation per step), as do those of the module's buffers. On CUDA the hypergradient
    contraction of ``hyper_step`` takes one temporary of the parameters' size
    (:func:`ohotorch.influence.contract`).

    **Drop-in change** to an SGD loop::

        - opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        + opt = ohotorch.OHO(model.parameters(), lr=0.1, momentum=0.9, module=model)
          ...
        - loss = F.cross_entropy(model(x), y); opt.zero_grad(); loss.backward(); opt.step()
        + def closure():
        +     opt.zero_grad(); loss = F.cross_entropy(model(x), y); loss.backward(); return loss
        + def val_closure():
        +     opt.zero_grad(); loss = F.cross_entropy(model(xv), yv); loss.backward(); return loss
        + loss = opt.step(closure)
        + opt.hyper_step(val_closure)

    Args:
        params: parameters or param groups (see :func:`ohotorch.layerwise` and :func:`ohotorch.grouped`).
            Groups may override lr, momentum, dampening, nesterov, weight_decay and tune. Each group is
            its own hyper group (its own tuned values, tangents and meta state) unless it carries a
            ``"hyper_group"`` label: groups with the same label share one tuned value per name
            (:func:`ohotorch.share`, :mod:`ohotorch.hyper_groups`).
        lr, momentum, dampening, weight_decay, nesterov: as torch.optim.SGD (initial values), in its
            positional order.
        maximize, differentiable, fused: torch.optim.SGD's arguments, accepted at their default values
            (``False``; ``fused`` also ``None``); other values are refused with what to do instead
            (:mod:`ohotorch.compat`). ``foreach`` is an option (below).
        tune: names tuned online, any subset of ``("lr", "lr_scale", "weight_decay", "momentum")``;
            ``()`` turns OHO into plain SGD. A weight decay that starts at 0 is tuned only when asked:
            by the group's own ``tune``, or by a ``tune`` given here for the groups that take this
            weight_decay; with the default ``tune``, and in a group that sets its own
            ``weight_decay=0`` (a no-decay group), it stays 0. ``"lr_scale"`` is for runs with a
            ``torch.optim.lr_scheduler``: the scheduler owns ``group["lr"]`` exactly as with
            torch.optim, OHO tunes the multiplier ``group["lr_scale"]`` (start 1), and each step uses
            ``lr * lr_scale``, so warmup and decay still shape the lr. Tuning ``"lr"`` while a scheduler
            drives the group is refused (each would overwrite the other).
        meta_lr: meta learning rate, a float or ``{name: float}``. ``None`` takes the scale-free
            default of ``meta_optimizer="adam", space="log"`` (0.02: each hyper-step moves a
            hyperparameter by at most about 2% of its value); ``0`` computes hypergradients but never
            changes a hyperparameter. A mapping's missing names take that default; where there is
            none (``meta_optimizer="sgd"`` or ``space="raw"``) it must name every tuned hyperparameter.
        meta_optimizer: ``"adam"`` (default) or ``"sgd"`` (the paper's; needs an explicit meta_lr).
        meta_betas, meta_eps: Adam's constants for the meta-update.
        space: ``"log"`` (relative steps, default) or ``"raw"`` (the paper's absolute steps).
        bounds: ``{name: (low, high)}`` projection bounds; defaults lr >= 0, weight_decay >= 0,
            0 <= momentum <= 0.999.
        influence: ``"exact"`` (default) or ``"blockwise"`` (one tangent per name summed over groups,
            read out per group: cost independent of the number of groups, exact for one group). With
            the greedy horizon the two coincide and both use the blockwise layout.
        hvp: ``"forward"`` (default, 1 gradient per HVP), ``"central"`` (2, second-order accurate) or
            ``"none"``: the *first-order influence*, :math:`H_t \dot w_t` taken as 0 in the tangent
            recursion (no extra gradient evaluation at all; momentum, weight decay and the direct terms
            stay exact). With ``discount = gamma > 0`` the lr's tangent is then (for plain SGD) the
            discounted sum of past update directions, :math:`\dot w_{t+1} = \gamma \dot w_t - u_t`: a
            longer memory than greedy at greedy's cost, exact where the loss is linear in the weights.
            A loss hyperparameter's tangent keeps its evaluation (it gives its direct term).
        fd_rel: relative finite-difference step ``r``; default sqrt(u) (forward) or u^(1/3) (central)
            for the unit roundoff u of ``compute_dtype``.
        compute_dtype: the precision the closures compute gradients in. Default: the parameters'
            dtype. Under ``torch.autocast(dtype=torch.bfloat16)`` the parameters stay float32 but the
            gradients carry bf16 rounding, so pass ``torch.bfloat16``: the finite-difference step then
            grows to match (0.01 relative instead of float32's 3.5e-4, measured on an H100: see
            :data:`ohotorch.finite_differences.LOW_PRECISION_STEP`). Tangents and hyperparameters stay
            float32 either way.
        reset_every: zero the tangents every N steps (truncated horizon); ``None`` never.
        discount: scale the tangents by gamma in [0, 1] before each update. 0 (default) is the greedy
            one-step horizon: hypergradient descent on the validation loss, no HVP at all. 1 is the full
            horizon of the OHO paper (exact RTRL). The default is measured, not assumed: on real data
            the full and long discounted horizons let the learning rate climb past the edge of
            stability, where the exact influence grows exponentially and its hypergradients are noise
            (benchmarks/defaults.py, benchmarks/results/defaults/defaults.json).
        growth_cap: ``None`` (default: off) or ``c >= 0``: cap the growth of the influence of the full
            or discounted horizon (``discount > 0``). Each tangent step :math:`z_{t+1} = A_t z_t + c_t`
            becomes :math:`\gamma_t A_t z_t + c_t` with :math:`\gamma_t = \min(1, c/\exp e)`, :math:`e`
            an EMA (0.9) of the log-growth :math:`\log(\lVert A_t z_t\rVert/\lVert z_t\rVert)` of the
            tangent state (SGD: :math:`z = (\dot w, \eta\dot b)`), so the influence never grows faster
            than ``c`` per step (``c = 1`` recommended; a study measured it with ``discount=1`` and
            ``meta_lr=0.01``: benchmarks/results/horizon/README.md). No extra HVP: two float64 norms,
            one scaling per tangent and step, no host sync (:mod:`ohotorch.growth_cap`). No effect with
            the greedy horizon (``discount=0``) or on a reset step, where the influence restarts from zero.
        average: ``None`` (default: off) or ``p >= 0``: tune for the validation loss of a polynomial-decay
            average of the iterates, :math:`\bar w_t = (1 - a_t)\bar w_{t-1} + a_t w_t` with
            :math:`a_t = \min(1, (1 + p)/(t + p))` (``p = 3`` a good start; ``0`` the uniform average),
            instead of that of the current weights; the influence is averaged alike, so the hypergradient
            :math:`\langle\nabla L_{val}(\bar w_t), \dot{\bar w}_t\rangle` stays exact. On data-rich tasks,
            where a large lr pays off only after annealing, the average removes the noise that makes the
            current weights' loss drive the lr down. The model to evaluate is :math:`\bar w`:
            ``with opt.averaged(): ...`` (:meth:`averaged`; BatchNorm statistics need recomputing there).
            Cost: one more copy of the weights and of the K weight tangents, one lerp over them per step,
            one copy of the weights in and out per hyper-step (:mod:`ohotorch.averaging`).
        module: the model. When given, its buffers (BatchNorm running statistics) are restored so that
            they end every step exactly as one ordinary training step leaves them, and the validation
            closure leaves them untouched. Without it, each extra closure evaluation updates them again.
        foreach: use the ``torch._foreach_*`` path (default: when every parameter is on CUDA).
        fast_start: ``"auto"`` (default: 0.1 with ``meta_optimizer="adam", space="log"``, else off),
            ``None`` (off) or a meta learning rate ``a > 0`` for a faster first climb of each tuned ``lr``
            / ``lr_scale``: it is stepped with ``a`` instead of its ``meta_lr`` until its value first
            falls below 0.9 times the largest value a hyper-step has given it
            (:data:`ohotorch.meta.FAST_START_DROP`) or reaches ``fast_start_growth`` times its starting
            value, then with ``meta_lr`` for the rest of the run (with the default 0.02 the fast climb is
            ~5 times faster, while the lr settles at the configured pace). Chosen by measurement: the
            greedy hypergradient's short-horizon bias makes the ordinary climb from a small initial lr
            too slow to matter. Weight decay and momentum are unaffected; ``meta_lr = 0`` still freezes.
            The phase is per value and in the meta state (``state_dict``): a resumed run continues
            exactly; a checkpoint without it (older, or made without fast_start) resumes as done. An
            explicit value needs ``meta_optimizer="adam", space="log"``. Cost: a few scalar operations
            per hyper-step, no host sync.
        fast_start_growth: with ``fast_start``, the fast phase also ends once the value has grown this
            many times over its value when the phase began (default 10; ``None``: only the turn ends it).
            A guard: a fast climb that goes on while the model leaves its initial plateau overshoots and
            can kill the network (:mod:`ohotorch.meta` has the rule).
        lr_down: ``"auto"`` (default: 0.5 with ``meta_optimizer="adam", space="log"``, else 1) or a factor
            ``d`` in (0, 1]: once the fast phase is over, a meta-step that lowers ``lr`` / ``lr_scale`` is
            scaled by ``d`` (steps up are not). A correction of the greedy hypergradient's pull toward
            too-small learning rates, chosen by measurement (README, "Tuning quality"); ``1`` is the
            symmetric update. Cost: a few scalar operations per hyper-step, no host sync.

    A hyperparameter changed from outside (by the user, a scheduler) between hyper-steps is taken as
    the new starting point and its meta-optimizer state restarts (with a warning for lr, once per param
    group). Diagnostics after each step and hyper-step are in :attr:`diagnostics`; refusal counts in
    :attr:`counters`.

    **The effective lr** ``lr * lr_scale`` is what a step uses; schedulers and loggers see
    ``group["lr"]``. It is shown in ``group["effective_lr"]`` (set when the group is added, refreshed at
    every ``step()``: the value that step used, and after every committed ``hyper_step()``: the value
    the next step uses unless a scheduler changes ``lr`` first) and in
    ``diagnostics["effective_lr"]`` (``{group name or index: value}``, as of the same moments).

    **Guarantees and refusals.** ``step()`` either completes or, if a closure evaluation raises (any
    exception, ``KeyboardInterrupt`` included) or returns no loss, leaves weights, optimizer state,
    tangents, ``p.grad`` (the same tensors), RNG and module buffers exactly as before the call, so
    ``except KeyboardInterrupt: save_checkpoint()`` saves the state before that step. A training
    closure that does not clear gradients (it adds to an earlier micro-batch's) steps with the
    accumulated gradient as torch.optim does, and every re-evaluation starts from that same earlier
    gradient, so it cancels out of the finite differences: the Hessian-vector products are those of the
    loss the closure computes (put every micro-batch of a window inside the closure for the whole
    window's curvature). Refused with a ValueError / TypeError before anything
    changes: a parameter listed twice, a tuned value outside its ``bounds``, an invalid or sharded
    (FSDP) param group in ``add_param_group`` (``param_groups`` unchanged), ``group["tune"]`` edited
    after the first step, a validation closure that leaves no gradient (no ``backward``, or under
    ``no_grad``), and a state_dict of the other inner rule (an SGD one into an Adam one or back). Warned
    about once: ``hyper_step`` twice without a ``step`` between, 50 steps with tuning on and no
    ``hyper_step``, and (without ``module=``) a model whose buffers change in OHO's extra evaluations.

    **Copies.** ``copy.deepcopy``, ``pickle`` and ``torch.save`` / ``torch.load`` copy everything: the
    options (``module`` included: copy the model and the optimizer together, ``deepcopy((model, opt))``,
    and the copy's ``module`` is the copied model), counters, meta-optimizer state and influence; the
    copy continues exactly like the original. Registered hooks are not copied (as torch.optim).

    **Loss hyperparameters.** ``rho = opt.hyperparameter("aux_weight", 0.1, bounds=(0, 10))`` declares a
    hyperparameter the training closure reads (``loss = main + rho.value * aux``), tuned with the others;
    one extra gradient evaluation per element and step (:mod:`ohotorch.loss_hyperparameters`).

    **state_dict.** torch.optim's, plus ``"oho"`` (counters, tangent layout, meta-optimizer state and the
    class name; the loss hyperparameters' values and meta state under ``"loss_hyperparameters"``). A plain
    torch.optim.SGD state_dict loads into OHO (torch.optim.Adam / AdamW ones into OHOAdam / OHOAdamW);
    param group keys it lacks (``tune``, ``lr_scale``) keep this optimizer's values.

    Complex parameters are supported (as by torch.optim.SGD): a complex parameter is its real and
    imaginary parts, with complex tangents, and its hypergradient contribution is the real dot product.
    """

    _rule: Rule = SGDRule()
    TUNABLE: Tuple[str, ...] = SGDRule.tunable
    # Keys that param groups of earlier versions may lack, with the value they meant.
    _LEGACY_GROUP_DEFAULTS: Dict[str, Any] = {"lr_scale": 1.0, "nesterov": False, "dampening": 0.0,
                                              "tune": ("lr", "weight_decay")}
    # GradScaler then hands step() its scale instead of silently unscaling around it: step() refuses it.
    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        differentiable: bool = False,
        fused: Optional[bool] = None,
        tune: Iterable[str] = DEFAULT_TUNE,
        meta_lr: Union[None, float, Mapping[str, float]] = Options.meta_lr,
        meta_optimizer: str = Options.meta_optimizer,
        meta_betas: Tuple[float, float] = Options.meta_betas,
        meta_eps: float = Options.meta_eps,
        space: str = Options.space,
        bounds: Optional[Mapping[str, Tuple[float, float]]] = Options.bounds,
        influence: str = Options.influence,
        hvp: str = Options.hvp,
        fd_rel: Optional[float] = Options.fd_rel,
        compute_dtype: Optional[torch.dtype] = Options.compute_dtype,
        reset_every: Optional[int] = Options.reset_every,
        discount: float = Options.discount,
        growth_cap: Optional[float] = Options.growth_cap,
        average: Optional[float] = Options.average,
        module: Optional[nn.Module] = Options.module,
        foreach: Optional[bool] = Options.foreach,
        fast_start: Union[None, float, str] = Options.fast_start,
        fast_start_growth: Optional[float] = Options.fast_start_growth,
        lr_down: Union[float, str] = Options.lr_down,
    ) -> None:
        check_torch_arguments(type(self).__name__, maximize=maximize, differentiable=differentiable, fused=fused)
        defaults = dict(lr=lr, lr_scale=1.0, momentum=momentum, dampening=dampening, nesterov=nesterov,
                        weight_decay=weight_decay, tune=self._default_tune(tune))
        options = Options(meta_lr=meta_lr, meta_optimizer=meta_optimizer, meta_betas=meta_betas,
                          meta_eps=meta_eps, space=space, bounds=bounds, influence=influence, hvp=hvp,
                          fd_rel=fd_rel, compute_dtype=compute_dtype, reset_every=reset_every,
                          discount=discount, growth_cap=growth_cap, average=average, module=module,
                          foreach=foreach, fast_start=fast_start, fast_start_growth=fast_start_growth,
                          lr_down=lr_down)
        self._setup(params, defaults, options)

    @property
    def diagnostics(self) -> Dict[str, Any]:
        """Diagnostics of the last step and hyper-step (on the sync-free path, reading them waits for
        the device's results, which are otherwise read later)."""
        sync_free.report(self)
        return self.__dict__.setdefault("_diagnostics", {})

    @diagnostics.setter
    def diagnostics(self, value: Dict[str, Any]) -> None:
        self.__dict__["_diagnostics"] = value

    def _diag(self) -> Dict[str, Any]:
        """The diagnostics dict itself (writing into it reads nothing from the device)."""
        return self.__dict__.setdefault("_diagnostics", {})

    def _setup(self, params: Iterable[Any], defaults: Dict[str, Any], options: Options) -> None:
        """Store the validated options, then let torch.optim build (and check) the param groups."""
        self.options = options
        self.diagnostics: Dict[str, Any] = {}
        self._bookkeeping = Bookkeeping()
        self._usage = usage.Usage()
        self._fixed_tune: Optional[List[Tuple[str, ...]]] = None  # each group's tune at the first step
        self._buffer_storage: Dict[str, List[Tensor]] = {}
        self._loss_hyperparameters = LossHyperparameters()
        Optimizer.__init__(self, params, defaults)

    # ------------------------------------------------------------------ loss hyperparameters
    def hyperparameter(self, name: str, value: Union[float, Tensor], *, bounds: Tuple[float, float] = (0.0, math.inf),
                       meta_lr: Optional[float] = None) -> LossHyperparameter:
        r"""Declare a hyperparameter that the training closure reads (an auxiliary-task weight, a per-layer
        L2 strength, ...), tuned online with lr and weight decay (:mod:`ohotorch.loss_hyperparameters`).

        ``value``: a number or a small tensor (each element its own scalar). ``bounds``: the projection
        bounds (``low >= 0`` with ``space="log"``). ``meta_lr``: default the optimizer's (when it gives every
        hyperparameter the same) or the default 0.02. Read ``.value`` inside the closure::

            rho = opt.hyperparameter("aux_weight", 0.1, bounds=(0.0, 10.0))
            # in the closure:  loss = main + rho.value * aux

        Cost: one extra gradient evaluation per element per step (two with ``hvp="central"``), whatever the
        horizon: with the greedy default it is the evaluation at (w, rho + eps) for dg/drho; with a longer
        one it is the tangent's Hessian-vector product, which gives dg/drho in the same evaluation. Declare
        every loss hyperparameter before the first step (the influence is laid out then).
        """
        if self._bookkeeping.keys is not None:
            raise ValueError(f"{type(self).__name__}.hyperparameter after the first step is not supported: the "
                             "influence tensors are laid out at the first step; declare it before")
        return self._losses().declare(name, value, bounds=bounds, meta_lr=meta_lr, options=self.options,
                                      reserved=meta.HYPERPARAMETERS)

    @property
    def loss_hyperparameters(self) -> Dict[str, LossHyperparameter]:
        """The declared loss hyperparameters by name."""
        return {item.name: item for item in self._losses().items}

    def _losses(self) -> LossHyperparameters:
        """The declared loss hyperparameters (none for an optimizer unpickled from an earlier version)."""
        losses = self.__dict__.get("_loss_hyperparameters")
        if losses is None:
            losses = self.__dict__["_loss_hyperparameters"] = LossHyperparameters()
        return losses

    # ------------------------------------------------------------------ validation
    @classmethod
    def _canonical_tune(cls, tune: Any) -> Tuple[str, ...]:
        return canonical_tune(tune, cls.TUNABLE)

    @classmethod
    def _default_tune(cls, tune: Any) -> Tuple[str, ...]:
        """The constructor's ``tune`` as the groups' default; the default itself stays recognisable."""
        return tune if isinstance(tune, DefaultTune) else cls._canonical_tune(tune)

    def _check_group(self, group: Dict[str, Any]) -> None:
        group["tune"] = self._canonical_tune(group["tune"])
        self._rule.check_group(group)
        if any(isinstance(p, Tensor) and p.is_complex() for p in group["params"]):
            self._rule.check_complex()
        self.options.check_tuned(group["tune"])
        for name in group["tune"]:
            low, high = self.options.bounds[name]  # type: ignore[index]
            if not low <= group[name] <= high:
                raise ValueError(
                    f"The initial {name}={group[name]} of a tuned param group lies outside its bounds "
                    f"[{low}, {high}]: the first hyper-step would jump to the bound. Start inside the bounds "
                    "or widen them."
                )

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """torch.optim's add_param_group, validated before the group is added: a refused group (invalid
        value, duplicate parameter, sharded parameter) leaves ``param_groups`` unchanged."""
        if self._bookkeeping.keys is not None:
            raise ValueError(f"{type(self).__name__}.add_param_group after the first step is not supported: the influence "
                             "tensors are laid out for the groups present at the first step")
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group).__name__}")
        param_group = dict(param_group)
        params = param_group["params"]
        if isinstance(params, Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch.optim refuses sets with its own message
            params = list(params)
        param_group["params"] = params
        tensors = [p[1] if isinstance(p, tuple) and len(p) == 2 else p for p in params]
        if len({id(p) for p in tensors}) != len(tensors):
            raise ValueError(
                "A parameter is listed twice in one param group (duplicate parameters): it would take two "
                "updates per step and two shares of the hypergradient. List each parameter once."
            )
        for p in tensors:
            if _is_sharded(p):
                raise TypeError(
                    f"{type(self).__name__} does not support FSDP (or any sharded {type(p).__name__} "
                    "parameter): the finite-difference step and the hypergradients are norms and dot products "
                    "over whole parameters, which a shard does not hold. Use DistributedDataParallel, "
                    "which OHO supports with no change to the training loop."
                )
        zero_weight_decay_asked = hyper_groups.asks_zero_weight_decay(param_group, self.defaults.get("tune"))
        super().add_param_group(param_group)
        try:
            if not zero_weight_decay_asked:
                hyper_groups.drop_zero_weight_decay_(self.param_groups[-1])
            self._check_group(self.param_groups[-1])
            hyper_groups.check_label(self.param_groups[-1])
            hyper_groups.check_shared_values(self.param_groups)
        except BaseException:
            self.param_groups.pop()
            raise
        hyper_groups.refresh_effective_lr_(self.param_groups[-1:])

    def __getstate__(self) -> Dict[str, Any]:
        """Everything the optimizer holds (torch.optim keeps only defaults, state and param_groups), so
        that ``copy.deepcopy``, ``pickle`` and ``torch.save`` give an optimizer that continues exactly
        like this one. Registered hooks are left out, as torch.optim does; the buffer snapshots' memory
        is re-allocated on the copy's first step."""
        sync_free.settle(self)  # deferred device results reach param_groups; the copy starts with none pending
        state = {key: value for key, value in self.__dict__.items()
                 if not (key.startswith("_optimizer_") and key.endswith("_hooks"))
                 and key not in ("_deferred_results", "_device_meta")}
        state["_buffer_storage"] = {}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # keep checkpoints of earlier versions loadable
            for key, value in self._LEGACY_GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    def _refuse_grad_scaler(self) -> None:
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            self.__dict__.pop("grad_scale", None)  # GradScaler deletes them only when step returns
            self.__dict__.pop("found_inf", None)
            raise RuntimeError(
                f"{type(self).__name__} cannot run under torch.amp.GradScaler (fp16 loss scaling): every OHO "
                "step re-evaluates the closure, which GradScaler can neither scale nor check for infs (it refuses "
                "closures). Train in bf16 instead: torch.autocast(device_type, dtype=torch.bfloat16) inside the "
                f"closures needs no loss scaling; pass compute_dtype=torch.bfloat16 to {type(self).__name__}."
            )

    def _check_no_scheduler_on_tuned_lr(self) -> None:
        # torch.optim.lr_scheduler.LRScheduler marks the groups it drives with "initial_lr".
        for index, group in enumerate(self.param_groups):
            if "initial_lr" in group and "lr" in group["tune"]:
                raise RuntimeError(
                    f"An lr scheduler drives param group {index} while OHO tunes its 'lr': each would overwrite "
                    "the other. Tune the multiplier instead, tune=('lr_scale', ...): the scheduler sets "
                    "group['lr'], OHO tunes group['lr_scale'], and the step uses lr * lr_scale."
                )

    # ------------------------------------------------------------------ small helpers
    def _storage(self, slot: str) -> List[Tensor]:
        """The memory a per-step copy (buffers, weights, gradients) reuses, kept per ``slot`` between steps."""
        return self.__dict__.setdefault("_buffer_storage", {}).setdefault(slot, [])

    def _snapshot(self, slot: str) -> Optional[BufferSnapshot]:
        """The module's buffers now, in memory kept per ``slot`` (none allocated after the first step)."""
        if self.module is None:
            return None
        return BufferSnapshot(module_buffers(self.module), self._storage(slot))

    def _tuning(self) -> bool:
        return any(group["tune"] for group in self.param_groups) or bool(self._losses())

    def _keys(self) -> List[TangentKey]:
        """The tangent keys, fixed at the first step (see :mod:`ohotorch.influence`)."""
        keys = self._layout(True)
        self._commit_layout(keys)
        return keys


    def _use_foreach(self, params: Sequence[Tensor]) -> bool:
        """The ``torch._foreach_*`` path, decided once per step: the option, else every parameter on CUDA."""
        if self.foreach is not None:
            return bool(self.foreach)
        return bool(params) and all(p.is_cuda for p in params)

    def _state_for(self, p: Tensor, group: Dict[str, Any], n_keys: int) -> Dict[str, Any]:
        return self._states_for([p], group, n_keys)[0]

    def _states_for(self, params: Sequence[Tensor], group: Dict[str, Any], n_keys: int) -> List[Dict[str, Any]]:
        """The state of each of ``params`` (of ``group``), with its tangents created where missing."""
        states = [self.state[p] for p in params]
        if not n_keys:
            return states
        # The greedy horizon never reads b' (or m', v') after the step that wrote them: not kept.
        # (A loss hyperparameter's tangent is updated with its direct term even then: companions kept.)
        companions = self._rule.companions(group) if self.discount > 0.0 or self._losses() else ()
        for p, state in zip(params, states):
            if "tangent_w" not in state or any(name not in state for name in companions):
                influence.ensure_tangents(state, p, n_keys, companions)
        return states

    def _all_params(self) -> List[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # ------------------------------------------------------------------ the sync-free (device) path
    # None: sync-free when every parameter that steps is on CUDA; True / False force it (tests run the
    # device path on CPU tensors with True).
    _sync_free: Optional[bool] = None
    # None: the contraction's form by its tensors (multi-tensor on CUDA, see influence.contract); True /
    # False force it (the host-time benchmark measures CUDA's form on the CPU).
    _multi_tensor_contraction: Optional[bool] = None

    def _use_sync_free(self, params: Sequence[Tensor]) -> bool:
        if self._losses():
            return False  # loss hyperparameters take the host path
        if self._sync_free is not None:
            return bool(self._sync_free)
        return bool(params) and all(p.is_cuda for p in params)







    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Optional[Tensor]:  # type: ignore[override]
        """One step of the inner rule and, when tuning, one influence update (re-running ``closure`` for
        the HVPs).

        ``closure`` follows torch's LBFGS convention: clear grads, compute the training loss on one
        batch, backward, return the loss. It is required while anything is tuned. Returns the loss of
        the first evaluation. Afterwards ``p.grad`` holds that evaluation's gradient, the RNG and the
        module's buffers are as one ordinary evaluation leaves them.

        A closure that does not clear gradients (gradient accumulation) is supported: the step uses the
        gradient it leaves (the earlier micro-batches' plus its own, as torch.optim does), and every
        re-evaluation starts from the same earlier gradient, which cancels out of the finite differences:
        the Hessian-vector products are those of the loss the closure itself computes.

        Strong exception safety: if any closure evaluation raises (``KeyboardInterrupt`` included) or
        returns no loss, ``step()`` leaves the weights, the optimizer state, the tangents, the RNG, the
        module's buffers and ``p.grad`` (the same tensor objects) as they were before the call, bit for
        bit. (With the greedy horizon the gradients' values are kept when the closure replaced them,
        ``zero_grad()``'s default; a closure that zeroes them in place loses them as with torch.optim.)
        """
        self._refuse_grad_scaler()
        averaging.refuse_inside_averaged(self)
        tuning = self._tuning()
        if tuning:
            self._check_no_scheduler_on_tuned_lr()
        if closure is None and tuning:
            if self._is_state_initialisation():
                self._initialise_state()
                return None
            raise TypeError(
                f"{type(self).__name__}.step() needs a closure while hyperparameters are tuned: the "
                "Hessian-vector products re-evaluate the training loss on the same batch (or pass tune=() to "
                "tune nothing)"
            )
        keys = self._layout(tuning)  # not committed before the last closure evaluation
        losses = self._losses()
        if closure is not None and losses:
            closure = losses.wrap(closure)  # the closure may read loss hyperparameters' .value
        first_loss = len(keys) - len(losses.keys()) if tuning else 0  # their tangents come last
        on_device = tuning and self._use_sync_free(self._all_params())
        if on_device:  # the results of hyper-steps before the last step reach param_groups now
            sync_free.settle(self, before=self._bookkeeping.steps)
        self._diag()["effective_lr"] = hyper_groups.refresh_effective_lr_(self.param_groups)

        # (1) The influence before this step: discounted (applied in (3)), or restarting from zero.
        norms: List[float] = [0.0] * len(keys)
        weight_norm = 0.0
        nonfinite: List[int] = []  # tangents that became non-finite: zeroed in (3)
        scales: Optional[Tuple[Tensor, Tensor]] = None  # sync-free: (eps, 1/eps) per tangent, on the device
        from_zero = False  # every tangent is zero before this step's update (greedy horizon or a reset)
        if tuning:
            reset = self.reset_every is not None and self._bookkeeping.steps % self.reset_every == 0
            from_zero = reset or self.discount == 0.0
            if not from_zero:
                if on_device:
                    scales = sync_free.tangent_scales(self, keys)
                else:
                    norms, weight_norm, nonfinite = self._tangent_norms(keys)
        if scales is not None:  # every tangent gets an HVP (a zero one costs its evaluation, reads 0)
            nonzero = list(range(len(keys)))
        else:
            nonzero = [index for index, norm in enumerate(norms) if norm > 0.0]  # the tangents that need an HVP
            # A loss hyperparameter's tangent needs its direct term dg/drho even from zero: always evaluated.
            nonzero = sorted(set(nonzero) | set(range(first_loss, len(keys))))
        if self.hvp == "none":  # the first-order influence: H_t w' read as 0, no evaluation (_advance_influence);
            nonzero = [index for index in nonzero if index >= first_loss]  # loss hyperparameters keep theirs

        # (2) Every closure evaluation: the training one, whose gradients, RNG and buffers every HVP
        # evaluation starts from, then the HVPs. Nothing of the user's or the optimizer's changes until all
        # of them succeeded; on any exception, what the evaluations changed is put back.
        rollback = StepRollback(self._all_params(), grad_values=bool(nonzero), buffers=self._snapshot("before"),
                                grad_storage=self._storage("grads"))
        finite = True
        hvps: Dict[int, Optional[List[Tensor]]] = {}
        try:
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
                if tuning:
                    check_loss(loss, "closure")
            active = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            for p in active:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            foreach = self._use_foreach(active)
            if tuning and loss is not None:
                # Sync-free, a non-finite loss is not looked at: it makes the tangents non-finite, which
                # the deferred norm check resets (see sync_free.tangent_scales).
                finite = on_device or bool(torch.isfinite(torch.as_tensor(loss)).all())
                if finite and nonzero:
                    with usage.watch_unseen_buffers(self):
                        hvps = self._hessian_vector_products(closure, norms, weight_norm, nonzero, active,
                                                             rollback, foreach, scales)
        except BaseException:
            rollback.restore()
            raise
        del rollback

        # (3) Commit: the layout, the discount, the rule's state and direction per group (weights unmoved).
        if tuning:
            self._commit_layout(keys)
            if not from_zero:
                if self.discount < 1.0:
                    influence.scale_tangents_(list(self.state.values()), self.discount)
                for tangent_index in nonfinite:
                    self._bookkeeping.nonfinite_influence += 1
                    warnings.warn(f"OHO: the influence for {keys[tangent_index]} became non-finite and was reset "
                                  "to zero")
                    influence.zero_tangent_(list(self.state.values()), tangent_index)
                    averaging.zero_tangent_(list(self.state.values()), tangent_index)
        works: List[Any] = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                works.append(None)
                continue
            states = self._states_for(params, group, len(keys))
            works.append(self._rule.prepare(group, params, states, foreach))
        if tuning and from_zero:  # the loss hyperparameters' tangents are advanced with an HVP: zero them
            for tangent_index in range(first_loss, len(keys)):
                influence.zero_tangent_(list(self.state.values()), tangent_index)

        # (4) The influence. Sync-free, a non-finite loss is not looked at: it makes the tangents
        # non-finite, which the deferred norm check of the next step resets (see sync_free.tangent_scales).
        if tuning and loss is not None:
            if not finite:
                self._bookkeeping.nonfinite_influence += 1
                warnings.warn("OHO: non-finite training loss; the influence was left unchanged this step")
                if from_zero:
                    influence.zero_tangents_(list(self.state.values()))  # what the horizon left of it: nothing
            else:
                self._advance_influence(keys, hvps, works, from_zero)

        # (5) Move the weights.
        for group, work in zip(self.param_groups, works):
            if work is not None:
                self._rule.apply(group, work)
        if self.average is not None:  # (6) fold the new iterate and its influence into the averages
            params = self._all_params()
            averaging.update_(params, self.state, self._bookkeeping.steps + 1, self.average,
                              foreach=self._use_foreach(params))
        self._bookkeeping.steps += 1
        usage.note_step(self, tuning)
        return loss

    def _layout(self, tuning: bool) -> List[TangentKey]:
        """The tangent keys: those fixed at the first step, or the ones the first step will fix.

        Refuses a ``tune`` edited since the layout was fixed (the tangents were laid out for the old one).
        """
        fixed = self.__dict__.get("_fixed_tune")
        if fixed is not None:
            current = [self._canonical_tune(group["tune"]) for group in self.param_groups]
            if current != fixed:
                raise ValueError(
                    f"param_groups' tune changed after the first step ({fixed} -> {current}): the influence is "
                    "laid out for the tuned names of the first step. Build a new optimizer (or load a "
                    "state_dict saved with the new tune) to tune other names."
                )
        if not tuning:
            return []
        losses = self._losses().keys()
        if self._bookkeeping.keys is not None:
            fixed_losses = [key for key in self._bookkeeping.keys if key[1].startswith("loss:")]
            if fixed_losses != losses:
                raise ValueError(f"the loss hyperparameters ({[k for _, k in losses]}) are not those the influence "
                                 f"was laid out for ({[k for _, k in fixed_losses]})")
            return self._bookkeeping.keys
        return influence.tangent_keys(self.param_groups, influence=self.influence, discount=self.discount) + losses


    def _commit_layout(self, keys: List[TangentKey]) -> None:
        if self._bookkeeping.keys is None:
            self._bookkeeping.keys = keys
        if self.__dict__.get("_fixed_tune") is None:
            self._fixed_tune = [self._canonical_tune(group["tune"]) for group in self.param_groups]

    def _fd_dtype(self, active: Sequence[Tensor]) -> torch.dtype:
        """The precision the closure computes gradients in: ``compute_dtype``, else the coarsest parameter dtype."""
        if self.compute_dtype is not None:
            return self.compute_dtype
        dtypes = {p.dtype for p in active if p.is_floating_point()}
        return max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32

    def _fd_rel(self, active: Sequence[Tensor]) -> float:
        """The relative finite-difference step: the option, else that of ``compute_dtype``, else of the
        coarsest parameter dtype present (float32 gradients need float32's step even beside float64)."""
        if self.fd_rel is not None:
            return self.fd_rel
        if self.compute_dtype is not None:
            return relative_step(self.compute_dtype, self.hvp)
        dtypes = {p.dtype for p in active if p.is_floating_point()}
        coarsest = max(dtypes, key=lambda d: torch.finfo(d).eps) if dtypes else torch.float32
        return relative_step(coarsest, self.hvp)


    def _tangent_norms(self, keys: Sequence[TangentKey]) -> Tuple[List[float], float, List[int]]:
        """(||gamma w'_k|| for every tangent, ||w||, the non-finite tangents) in one host sync.

        Nothing is written: a non-finite tangent reads as norm 0 here and is reset to zero by the commit.
        """
        pairs = [(p, s["tangent_w"]) for p, s in self.state.items() if "tangent_w" in s]
        if not keys or not pairs:
            return [0.0] * len(keys), 0.0, []
        norms, weight_norm = influence.tangent_norms(pairs, len(keys))
        norms = [norm * self.discount for norm in norms]  # the discount is applied at the commit
        nonfinite = [index for index, norm in enumerate(norms) if not math.isfinite(norm)]
        for tangent_index in nonfinite:
            norms[tangent_index] = 0.0
        self._diag()["influence_norm"] = {influence.key_name(self.param_groups, key): norm
                                              for key, norm in zip(keys, norms)}
        return norms, weight_norm, nonfinite

    def _hessian_vector_products(self, closure: Closure, norms: List[float], weight_norm: float,
                                 nonzero: List[int], active: List[Tensor], rollback: StepRollback,
                                 foreach: bool, scales: Optional[Tuple[Tensor, Tensor]] = None
                                 ) -> Dict[int, Optional[List[Tensor]]]:
        """H_t (gamma w'_k) over the ``active`` parameters for every tangent ``k`` in ``nonzero`` (``None``
        where it is not finite), changing nothing: the isolation puts weights, grads, RNG and buffers
        back. All of them are computed before anything is committed (K of them alive at once).

        Sync-free (``scales``: eps and 1/eps per tangent on the device) nothing is read on the host: a zero
        or non-finite tangent has eps = 0 and reads 0, and a non-finite HVP makes its tangent non-finite,
        which the deferred norm check of a later step resets."""
        rel = self._fd_rel(active)
        weight_storage = self._storage("weights")
        train_grads = [p.grad for p in active]
        hvps: Dict[int, Optional[List[Tensor]]] = {}
        losses = self._losses()
        first_loss = len(norms) - len(losses.keys())
        with ClosureIsolation(self._all_params(), weights=active, buffers=self._snapshot("after"),
                              replay=(rollback.rng, rollback.buffers), start=rollback.grads.starts(),
                              foreach=foreach, weight_storage=weight_storage) as isolation:
            for tangent_index in nonzero:
                if tangent_index >= first_loss:  # a loss hyperparameter: H (gamma w') + dg/drho in one evaluation
                    element, norm = tangent_index - first_loss, norms[tangent_index]
                    tangent = (self._discounted_tangent(active, tangent_index) if norm > 0.0
                               else [torch.zeros_like(p) for p in active])
                    eps = losses.step_size(element, rel, perturbation_scale(weight_norm, norm, rel) if norm > 0.0
                                           else None, self._fd_dtype(active))
                    hvp = fd_hvp(isolation, closure, tangent, train_grads, eps=eps, scheme=self.hvp,
                                 along=losses.shift(element))
                    del tangent
                    finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(hvp)).sum()))
                    hvps[tangent_index] = hvp if finite else None
                    continue
                tangent = self._discounted_tangent(active, tangent_index)
                if scales is not None:
                    eps_t, inverse = scales
                    hvps[tangent_index] = fd_hvp(isolation, closure, tangent, train_grads, eps=eps_t[tangent_index],
                                                 inverse=inverse[tangent_index], scheme=self.hvp)
                    del tangent
                    continue
                eps = perturbation_scale(weight_norm, norms[tangent_index], rel)
                hvp = fd_hvp(isolation, closure, tangent, train_grads, eps=eps, scheme=self.hvp)
                del tangent
                finite = bool(torch.isfinite(torch.stack(torch._foreach_norm(hvp)).sum()))  # one sync
                hvps[tangent_index] = hvp if finite else None
        return hvps

    def _discounted_tangent(self, active: List[Tensor], tangent_index: int) -> List[Tensor]:
        """gamma w'_k in the parameters' dtypes (zero for a parameter without a tangent yet), the stored
        tangent untouched: the same values the commit's in-place discount gives it."""
        tangents = [self.state.get(p, {}).get("tangent_w") for p in active]
        present = iter(influence.slices_at([t for t in tangents if t is not None], tangent_index))
        stored = [None if t is None else next(present) for t in tangents]
        if self.discount < 1.0:
            present = [t for t in stored if t is not None]
            scaled = iter(torch._foreach_mul(present, self.discount) if present else [])
            stored = [next(scaled) if t is not None else None for t in stored]
        return [torch.zeros_like(p) if t is None else influence.as_dtype(t, p.dtype) for p, t in zip(active, stored)]

    def _advance_influence(self, keys: List[TangentKey], hvps: Dict[int, Optional[List[Tensor]]],
                           works: List[Any], from_zero: bool) -> None:
        """Advance every tangent by one step of the rule: with its HVP where ``hvps`` has one (over the
        parameters with a gradient, in group order), else from zero (``from_zero``) or with a zero HVP
        (a zero tangent). A tangent whose HVP was not finite is left as it is (discounted) this step."""
        stepping_groups = [(group_index, group, work)
                           for group_index, (group, work) in enumerate(zip(self.param_groups, works))
                           if work is not None]
        active = [p for _, _, work in stepping_groups for p in work.params]
        if from_zero and len(active) != len(self.state):  # every active param has state: equal counts, same set
            # The update from zero overwrites the tangents of the parameters that step; those of the
            # others (no gradient this step) must read zero too.
            ids = {id(p) for p in active}
            influence.zero_tangents_([s for p, s in self.state.items() if id(p) not in ids])

        capped = self.growth_cap is not None and not from_zero and bool(stepping_groups)
        gammas: Dict[int, Tensor] = {}  # growth_cap: gamma of each tangent this step

        def update(tangent_index: int, hvp: Optional[List[Tensor]]) -> None:
            """Advance one tangent in every group; ``hvp`` spans all active params (None: from zero)."""
            key = keys[tangent_index]
            offset = 0
            before = self._state_sq_norm(stepping_groups, tangent_index) if capped else None
            for group_index, group, work in stepping_groups:
                n = len(work.params)
                if hvp is not None:
                    part: Optional[List[Tensor]] = hvp[offset:offset + n]
                elif from_zero:
                    part = None  # zero tangents: the update from zero overwrites them, no HVP needed
                else:  # a zero w' whose companions (b', m', v') may not be zero (lr = 0)
                    part = [torch.zeros_like(influence.tangent_slice(s["tangent_w"], tangent_index))
                            for s in work.states]
                # growth_cap: the homogeneous part A z first (direct=False), the direct terms after the cap
                direct = influence.is_direct(self.param_groups, key, group_index)
                self._rule.update_tangent(group, work, tangent_index, key, direct and not capped, part)
                offset += n
            if before is not None:
                self._cap_growth_(stepping_groups, keys, tangent_index, before, gammas)

        for tangent_index in range(len(keys)):
            if tangent_index not in hvps:
                update(tangent_index, None)
                continue
            hvp = hvps.pop(tangent_index)
            if hvp is None:
                self._bookkeeping.nonfinite_influence += 1
                warnings.warn(f"OHO: non-finite Hessian-vector product for {keys[tangent_index]}; that "
                              "tangent was left unchanged this step")
                continue
            # Each tangent is updated as soon as its turn comes (no other update reads its HVP).
            update(tangent_index, hvp)
            del hvp
        if gammas and not self._use_sync_free(active):  # diagnostics: one host read per step
            values = torch.stack([gamma.cpu() for gamma in gammas.values()]).tolist()
            self._diag()["growth_gamma"] = {influence.key_name(self.param_groups, keys[index]): value
                                            for index, value in zip(gammas, values)}

    def _state_sq_norm(self, stepping_groups: Sequence[Tuple[int, Dict[str, Any], Any]], tangent_index: int) -> Tensor:
        """The squared norm of tangent ``tangent_index``'s state over every group that steps (0-d, float64)."""
        norms = [self._rule.state_sq_norm(group, work, tangent_index) for _, group, work in stepping_groups]
        total = norms[0]
        for norm in norms[1:]:
            total = total + norm.to(total.device)
        return total

    def _cap_growth_(self, stepping_groups: Sequence[Tuple[int, Dict[str, Any], Any]], keys: List[TangentKey],
                     tangent_index: int, before: Tensor, gammas: Dict[int, Tensor]) -> None:
        r"""After the homogeneous update :math:`A_t z_t` of one tangent: update its log-growth EMA, scale
        the state by :math:`\gamma_t` and add the direct terms (:mod:`ohotorch.growth_cap`). No host sync."""
        after = self._state_sq_norm(stepping_groups, tangent_index)
        book = self._bookkeeping
        ema = book.growth_ema
        if ema is None or ema.numel() != len(keys) or ema.device != after.device:
            fresh = torch.full((len(keys),), math.nan, dtype=torch.float64, device=after.device)
            if ema is not None and ema.numel() == len(keys):
                fresh.copy_(ema)
            ema = book.growth_ema = fresh
        new_ema, gamma = growth_cap.growth_gamma(before, after, ema[tangent_index], cap=self.growth_cap)
        ema[tangent_index] = new_ema
        slices = [influence.tangent_slice(t, tangent_index)
                  for _, _, work in stepping_groups for t in influence.tangent_tensors(work.states)]
        by_device: Dict[torch.device, List[Tensor]] = {}
        for t in slices:
            by_device.setdefault(t.device, []).append(t)
        for device, tensors in by_device.items():
            torch._foreach_mul_(tensors, gamma.to(device))
        gammas[tangent_index] = gamma
        key = keys[tangent_index]
        for group_index, group, work in stepping_groups:
            if influence.is_direct(self.param_groups, key, group_index):
                self._rule.add_direct_terms(group, work, tangent_index, key)

    # ------------------------------------------------------------------ hypergradients
    def hypergradient(self, val_closure: Closure) -> List[Dict[str, Tensor]]:
        """dL_val(w_t)/dtheta for every tuned hyperparameter, changing nothing.

        ``val_closure`` clears grads, computes the validation loss, calls backward and returns the loss.
        Returns one dict per param group (in ``param_groups`` order) mapping each tuned name to a 0-d
        tensor; the param groups of a shared hyper group all report the derivative by their one shared
        value. Grads, RNG state and module buffers are as they were before the call. The derivatives by the
        loss hyperparameters (:meth:`hyperparameter`) are stored in their ``grad``.
        """
        hyper, _ = self._hypergradient(val_closure)
        return hyper

    @torch.no_grad()
    def _hypergradient(self, val_closure: Closure) -> Tuple[List[Dict[str, Tensor]], Any]:
        if val_closure is None or not callable(val_closure):
            raise TypeError("hypergradient/hyper_step need a validation closure")
        if self._bookkeeping.steps == 0:
            raise ValueError("hyper_step/hypergradient called before any step(): there is no influence yet")
        keys = self._keys() if self._tuning() else []
        if not keys:
            return [{} for _ in self.param_groups], None
        params = self._all_params()
        losses = self._losses()
        if losses:  # the validation loss must not read a loss hyperparameter: .value refuses there
            val_closure = losses.wrap(val_closure, "val")
        with usage.watch_unseen_buffers(self), ClosureIsolation(params, buffers=self._snapshot("hyper")) as isolation, \
                self._at_average(params):
            loss, val_grads = isolation.evaluate(val_closure, "val_closure")
        if all(grad is None for grad in val_grads):
            raise RuntimeError(
                "val_closure left no gradient on any parameter: it must call backward on the validation loss "
                "(outside torch.no_grad), or every hypergradient would read 0"
            )
        self._usage.steps_without_hyper_step = 0
        by_id = {id(p): grad for p, grad in zip(params, val_grads)}
        multi_tensor = self._multi_tensor_contraction
        if multi_tensor is None and not self._use_foreach(params):
            multi_tensor = False  # foreach=False: no multi-tensor op anywhere
        state = self.state if self.average is None else averaging.tangent_view(self.state)
        hyper = influence.contract(self.param_groups, state, keys, by_id, multi_tensor=multi_tensor)
        if losses:  # their keys come last; read_out leaves them out
            n = len(losses.keys())
            values = losses.contract(state, params, len(keys) - n, by_id)
            losses.set_hypergradients(torch.zeros(n, dtype=torch.float64) if values is None else values)
        return hyper, loss

    @torch.no_grad()
    def hyper_step(self, val_closure: Closure) -> List[Dict[str, Tensor]]:
        r"""Compute the hypergradients (see :meth:`hypergradient`) and apply the meta-update.

        Each tuned :math:`\theta` moves to :math:`P(f(\phi - \alpha\,\mathrm{step}(h\,d\theta/d\phi)))`
        (:func:`ohotorch.meta.meta_update_`), once per hyper variable: a shared value moves at its first
        param group and is copied into the others (:mod:`ohotorch.hyper_groups`); ``group["effective_lr"]``
        and ``diagnostics["effective_lr"]`` are refreshed. A non-finite validation loss or hypergradient changes
        nothing, is counted in ``diagnostics["nonfinite_hypergradients"]`` and warned about. Returns the
        hypergradients.

        On CUDA (the sync-free path, see the module docstring) nothing is read on the host: the new
        values reach ``param_groups`` at the start of the second step after this call (or at
        ``state_dict()``), and the counts and warnings come when ``counters`` / ``diagnostics`` are read
        or the values are applied.
        """
        hyper, loss = self._hypergradient(val_closure)
        calls = self._usage
        if calls.hyper_stepped:
            calls.warn_once("hyper_step twice", (
                "OHO: hyper_step called again without a step in between: it applies another meta-update "
                "with the same influence, i.e. the same hypergradient direction twice. Call hyper_step once "
                "after each step (or every k steps)."))
        calls.hyper_stepped = True
        owners = hyper_groups.leaders(self.param_groups)  # one meta-update per hyper variable
        flat = [(index, name, h) for index, by_name in enumerate(hyper) for name, h in by_name.items()
                if owners[index][name] == index]
        if self._losses():
            self._loss_hyper_step(flat, loss)
            return hyper
        if not flat:
            return hyper
        device = flat[0][2].device
        loss_sum = torch.as_tensor(loss).detach().double()
        if loss_sum.dim():  # a 0-d loss is its own sum
            loss_sum = loss_sum.sum()
        loss_sum = loss_sum.to(device, non_blocking=True)
        if self._use_sync_free(self._all_params()):
            sync_free.hyper_step(self, flat, loss_sum)
            return hyper
        *values, loss_value = torch.stack([h.detach().double() for _, _, h in flat] + [loss_sum]).tolist()
        hypergradients = [(index, name, value) for (index, name, _), value in zip(flat, values)]
        with warnings.catch_warnings():
            for index, name, _ in hypergradients:  # a value set from outside: warned once per param group
                written = self._bookkeeping.meta_state.get(f"{index}/{name}", {}).get("written")
                if name == "lr" and written is not None and written != self.param_groups[index]["lr"]:
                    if f"lr/{index}" in calls.warned:
                        warnings.filterwarnings("ignore", message=f"OHO: the lr of param group {index} was changed")
                    calls.warned.add(f"lr/{index}")
            outcome = meta.meta_update_(self.param_groups, hypergradients, loss_value,
                                        self._bookkeeping.meta_state, self._meta_config())
        if outcome == meta.COMMITTED:
            self._publish_hyperparameters()
        self._report_hyper_step(outcome, hypergradients, loss_value)
        return hyper

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        r"""The averaged weights :math:`\bar w` (``average=p``, :mod:`ohotorch.averaging`) in the parameters
        inside the ``with`` block; the current weights :math:`w` back, bit for bit, on exit (also on an
        exception). For evaluation and for checkpoints of the averaged model::

            with opt.averaged():
                evaluate(model)                        # the model to report is the average
                torch.save(model.state_dict(), path)   # a checkpoint of the averaged model

        BatchNorm running statistics belong to :math:`w`, not to :math:`\bar w`: for a model with
        BatchNorm, recompute them inside the block before evaluating (a few forward passes of training
        batches in train mode under ``torch.no_grad()``, after resetting them or with ``momentum=None``)
        and put the saved ones back afterwards, as with schedule-free optimizers. ``step()`` inside the
        block is refused (it would step from :math:`\bar w`, and the exit would undo it). Before the
        first step the parameters keep their values (the average starts there).

        Raises RuntimeError with ``average=None``: there is no average to put in.
        """
        if self.average is None:
            raise RuntimeError(f"{type(self).__name__}.averaged() needs average=p (e.g. average=3.0) at "
                               "construction: with average=None no average of the iterates is kept")
        with averaging.swapped(self._all_params(), self.state):
            depth = self.__dict__.get("_averaged_depth", 0)
            self.__dict__["_averaged_depth"] = depth + 1
            try:
                yield
            finally:
                self.__dict__["_averaged_depth"] = depth

    def _at_average(self, params: List[Tensor]) -> Any:
        """With ``average``: the parameters hold the averaged weights inside (for the validation closure)."""
        if self.average is None:
            return contextlib.nullcontext()
        # the Hessian-vector products' weight copy lends its memory (never in use while a validation
        # closure runs): no extra memory held between steps where the step perturbs the weights
        return averaging.swapped(params, self.state, self._storage("weights"))

    def _loss_hyper_step(self, flat: List[Tuple[int, str, Tensor]], loss: Any) -> None:
        """The host meta-update of the param groups' values and the loss hyperparameters together, all or
        nothing (:func:`ohotorch.meta.meta_update_` over the groups plus one stand-in group per element)."""
        losses = self._losses()
        n_groups = len(self.param_groups)
        proxies, bounds, meta_lrs, loss_states = losses.meta_entries(n_groups)
        loss_grads = torch.cat([item.grad.reshape(-1) for item in losses.items])
        loss_sum = torch.as_tensor(loss).detach().double().sum().cpu()
        values = torch.stack([h.detach().double().cpu() for _, _, h in flat]).tolist() if flat else []
        loss_value = float(loss_sum)
        keys = [key for _, key in losses.keys()]
        hypergradients = [(index, name, value) for (index, name, _), value in zip(flat, values)]
        everything = hypergradients + [(n_groups + k, key, float(h)) for k, (key, h) in enumerate(zip(keys, loss_grads))]
        config = self._meta_config()
        config = dataclasses.replace(config, meta_lr={**config.meta_lr, **meta_lrs},
                                     bounds={**config.bounds, **bounds})  # the rest as the optimizer's
        meta_state = {**self._bookkeeping.meta_state, **loss_states}
        groups = list(self.param_groups) + proxies
        outcome = meta.meta_update_(groups, everything, loss_value, meta_state, config)
        if outcome == meta.COMMITTED:
            losses.commit_meta(proxies, meta_state, n_groups)
            self._bookkeeping.meta_state = {key: state for key, state in meta_state.items()
                                            if int(key.split("/", 1)[0]) < n_groups}
            self._publish_hyperparameters()
        self._report_hyper_step(outcome, hypergradients, loss_value)
        if outcome == meta.COMMITTED:
            self._diag()["hypergradient"].update({key: float(h) for key, h in zip(keys, loss_grads)})
            self._diag()["loss_hyperparameters"] = {item.name: item.current.tolist() for item in losses.items}

    def _publish_hyperparameters(self) -> None:
        """After new values reach ``param_groups``: copy shared values into every member of their hyper
        group and refresh the effective lr."""
        hyper_groups.broadcast_shared_(self.param_groups)
        self._diag()["effective_lr"] = hyper_groups.refresh_effective_lr_(self.param_groups)

    def _report_hyper_step(self, outcome: str, hypergradients: Sequence[Tuple[int, str, float]],
                           loss_value: float) -> None:
        if outcome == meta.NONFINITE_HYPERGRADIENT:
            self._bookkeeping.nonfinite_hypergradients += 1
            self._diag()["nonfinite_hypergradients"] = self._bookkeeping.nonfinite_hypergradients
            warnings.warn("OHO: non-finite validation loss or hypergradient; hyperparameters unchanged")
            return
        if outcome == meta.NONFINITE_RESULT:
            self._bookkeeping.nonfinite_hypergradients += 1
            warnings.warn("OHO: the meta-update produced a non-finite value; hyperparameters unchanged")
            return
        self._bookkeeping.hyper_steps += 1
        self._diag()["val_loss"] = loss_value
        self._diag()["hypergradient"] = {
            hyper_groups.variable_name(self.param_groups, index, name): value for index, name, value in hypergradients
        }


    def _meta_config(self) -> meta.MetaConfig:
        return meta.MetaConfig(meta_lr=self.meta_lr, optimizer=self.meta_optimizer, betas=self.meta_betas,
                               eps=self.meta_eps, space=self.space, bounds=self.bounds,
                               fast_start=self.fast_start, fast_start_growth=self.fast_start_growth,
                               lr_down=self.lr_down)

    # ------------------------------------------------------------------ state
    def _is_state_initialisation(self) -> bool:
        """The distributed-checkpoint idiom: step() with zero grads and lr = 0 to create the state."""
        if any(effective_lr(group) != 0 for group in self.param_groups):
            return False
        grads = [p.grad for p in self._all_params() if p.grad is not None]
        return all(not bool(grad.any()) for grad in grads)

    def _initialise_state(self) -> None:
        n_keys = len(self._keys())
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._rule.init_state(group, p, self._state_for(p, group, n_keys))
                if self.average is not None:
                    averaging.init_state_(self.state[p], p)

    @property
    def counters(self) -> Dict[str, int]:
        """Steps, hyper-steps, and how often a non-finite value was refused."""
        sync_free.report(self)
        book = self._bookkeeping
        return {"steps": book.steps, "hyper_steps": book.hyper_steps,
                "nonfinite_hypergradients": book.nonfinite_hypergradients,
                "nonfinite_influence": book.nonfinite_influence}

    @property
    def _oho(self) -> Dict[str, Any]:
        """The bookkeeping as saved under ``state_dict()["oho"]`` (a copy; read-only view for tools)."""
        sync_free.settle(self)
        return self._bookkeeping.to_state()

    def state_dict(self) -> Dict[str, Any]:
        sync_free.settle(self)  # every deferred result reaches param_groups and the meta state first
        state_dict = super().state_dict()
        state_dict["oho"] = {**self._bookkeeping.to_state(), "optimizer": type(self).__name__}
        if self._losses():
            state_dict["oho"]["loss_hyperparameters"] = self._losses().to_state()
        return state_dict

    def _refuse_other_family(self, state_dict: Mapping[str, Any],
                             saved_bookkeeping: Optional[Mapping[str, Any]]) -> None:
        """Refuse a state_dict of the other inner rule (SGD vs Adam) before anything is changed."""
        adam_like = "betas" in self.defaults
        saved_groups = state_dict.get("param_groups", [])
        saved_adam_like = any("betas" in group for group in saved_groups)
        if not saved_groups or saved_adam_like == adam_like:
            return
        source = (saved_bookkeeping or {}).get("optimizer") or (
            "an Adam-family optimizer" if saved_adam_like else "an SGD-family optimizer")
        raise ValueError(
            f"{type(self).__name__}.load_state_dict: this state_dict was saved by {source}, whose state "
            f"(momentum buffer vs Adam moments) and param group keys {type(self).__name__} cannot use. Load "
            f"it into a {source} instead."
        )

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch.optim's load_state_dict, plus OHO's bookkeeping (``state_dict["oho"]``).

        A state_dict of plain torch.optim.SGD (into :class:`OHO`) or torch.optim.Adam / AdamW (into
        :class:`ohotorch.OHOAdam` / :class:`ohotorch.OHOAdamW`) loads: the keys it lacks (``tune``,
        ``lr_scale``, ...) keep this optimizer's values. One of the other inner rule (SGD into Adam or back)
        is refused with a ValueError before anything changes.
        """
        state_dict = dict(state_dict)
        saved_bookkeeping = state_dict.pop("oho", None)
        self._refuse_other_family(state_dict, saved_bookkeeping)
        saved_losses = (saved_bookkeeping or {}).get("loss_hyperparameters")
        self._losses().check_state(saved_losses, (saved_bookkeeping or {}).get("keys"))
        sync_free.forget(self)
        if saved_bookkeeping is not None:
            saved_bookkeeping = {k: v for k, v in saved_bookkeeping.items()
                                 if k not in ("optimizer", "loss_hyperparameters")}
        # Keys a foreign (torch.optim) state_dict lacks keep this optimizer's values, not the legacy defaults.
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) == len(self.param_groups):
            state_dict["param_groups"] = [{**{k: v for k, v in group.items() if k != "params"}, **saved}
                                          for group, saved in zip(self.param_groups, saved_groups)]
        # torch casts floating state to the parameter's dtype; tangents keep the precision they were saved in.
        tangent_dtypes = {idx: {key: t.dtype for key, t in s.items()
                                if key.startswith("tangent_") or key in averaging.KEEP_DTYPE}
                          for idx, s in state_dict.get("state", {}).items()}
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        for idx, p in zip(saved_ids, self._all_params()):
            for state_key, dtype in tangent_dtypes.get(idx, {}).items():
                if p in self.state and state_key in self.state[p]:
                    self.state[p][state_key] = self.state[p][state_key].to(dtype)
        for group in self.param_groups:
            group["tune"] = self._canonical_tune(group.get("tune", ()))
        hyper_groups.refresh_effective_lr_(self.param_groups)
        if saved_bookkeeping is not None:
            self._bookkeeping = Bookkeeping.from_state(saved_bookkeeping)
        self._losses().load_state(saved_losses)
        self._fixed_tune = (None if self._bookkeeping.keys is None
                            else [tuple(group["tune"]) for group in self.param_groups])


def _option_property(name: str) -> property:
    def get(self: OHO) -> Any:
        return getattr(self.options, name)

    def set(self: OHO, value: Any) -> None:
        setattr(self.options, name, value)

    return property(get, set, doc=f"The ``{name}`` option (see :class:`ohotorch.options.Options`).")


# The options read as attributes (opt.discount, opt.meta_lr, ...), stored once in opt.options.
for _name in Options.names():
    setattr(OHO, _name, _option_property(_name))
del _name
