r"""``OHO``: torch.optim.SGD whose lr, weight decay and momentum tune themselves online.

The shell around :mod:`ohotorch.sgd_tangents` (the update and tangent math),
:mod:`ohotorch.finite_differences` (Hessian-vector products from the closure) and :mod:`ohotorch.meta`
(the meta-update). It validates arguments, owns the state, and orders the work of one step.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from . import meta
from .finite_differences import BufferSnapshot, RNGSnapshot, clone_all, perturbation_scale, relative_step
from .sgd_tangents import sgd_apply_, sgd_direction_, sgd_tangent_update_

__all__ = ["OHO"]

Closure = Callable[[], Any]


def _canonical_tune(tune: Any, allowed: Tuple[str, ...] = meta.HYPERPARAMETERS) -> Tuple[str, ...]:
    if isinstance(tune, str):
        tune = (tune,)
    try:
        names = tuple(tune)
    except TypeError:
        raise TypeError(f"tune must be a collection of hyperparameter names, got {tune!r}") from None
    for name in names:
        if not isinstance(name, str) or name not in allowed:
            raise ValueError(f"Unknown hyperparameter in tune: {name!r}; tunable ones are {allowed}")
    return tuple(n for n in allowed if n in names)


def _is_sharded(p: Tensor) -> bool:
    """A parameter that FSDP shards: a DTensor (FSDP2, tensor parallel) or FSDP1's FlatParameter."""
    return type(p).__name__ in ("DTensor", "FlatParameter") or type(getattr(p, "data", None)).__name__ == "DTensor"


def _real(value: Any, what: str) -> float:
    if isinstance(value, Tensor):
        raise TypeError(f"{what} must be a Python number, got a Tensor (tensor {what} is not supported)")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number, got {value!r}")
    return float(value)


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
    run, a copy of the weights, a backup of the training gradient and one gradient.

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
        params: parameters or param groups (each group is a hyper group; see :func:`ohotorch.layerwise`
            and :func:`ohotorch.grouped`). Groups may override lr, momentum, dampening, nesterov,
            weight_decay and tune.
        lr, momentum, dampening, nesterov, weight_decay: as torch.optim.SGD (initial values).
        tune: names tuned online, any subset of ``("lr", "lr_scale", "weight_decay", "momentum")``;
            ``()`` turns OHO into plain SGD. ``"lr_scale"`` is for runs with a
            ``torch.optim.lr_scheduler``: the scheduler owns ``group["lr"]`` exactly as with
            torch.optim, OHO tunes the multiplier ``group["lr_scale"]`` (start 1), and each step uses
            ``lr * lr_scale``, so warmup and decay still shape the lr. Tuning ``"lr"`` while a scheduler
            drives the group is refused (each would overwrite the other).
        meta_lr: meta learning rate, a float or ``{name: float}``. ``None`` takes the scale-free
            default of ``meta_optimizer="adam", space="log"`` (0.02: each hyper-step moves a
            hyperparameter by at most about 2% of its value); ``0`` computes hypergradients but never
            changes a hyperparameter.
        meta_optimizer: ``"adam"`` (default) or ``"sgd"`` (the paper's; needs an explicit meta_lr).
        meta_betas, meta_eps: Adam's constants for the meta-update.
        space: ``"log"`` (relative steps, default) or ``"raw"`` (the paper's absolute steps).
        bounds: ``{name: (low, high)}`` projection bounds; defaults lr >= 0, weight_decay >= 0,
            0 <= momentum <= 0.999.
        influence: ``"exact"`` (default) or ``"blockwise"`` (one tangent per name summed over groups,
            read out per group: cost independent of the number of groups, exact for one group). With
            the greedy horizon the two coincide and both use the blockwise layout.
        hvp: ``"forward"`` (default, 1 gradient per HVP) or ``"central"`` (2, second-order accurate).
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
        module: the model. When given, its buffers (BatchNorm running statistics) are restored so that
            they end every step exactly as one ordinary training step leaves them, and the validation
            closure leaves them untouched. Without it, each extra closure evaluation updates them again.
        foreach: use the ``torch._foreach_*`` path (default: when every parameter is on CUDA).

    A hyperparameter changed from outside (by the user, a scheduler) between hyper-steps is taken as
    the new starting point and its meta-optimizer state restarts (with a warning for lr). Diagnostics
    after each step and hyper-step are in :attr:`diagnostics`; refusal counts in :attr:`counters`.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        *,
        tune: Iterable[str] = ("lr", "weight_decay"),
        meta_lr: Union[None, float, Mapping[str, float]] = None,
        meta_optimizer: str = "adam",
        meta_betas: Tuple[float, float] = (0.9, 0.999),
        meta_eps: float = 1e-15,
        space: str = "log",
        bounds: Optional[Mapping[str, Tuple[float, float]]] = None,
        influence: str = "exact",
        hvp: str = "forward",
        fd_rel: Optional[float] = None,
        compute_dtype: Optional[torch.dtype] = None,
        reset_every: Optional[int] = None,
        discount: float = 0.0,
        module: Optional[nn.Module] = None,
        foreach: Optional[bool] = None,
    ) -> None:
        defaults = dict(
            lr=lr, lr_scale=1.0, momentum=momentum, dampening=dampening, nesterov=nesterov,
            weight_decay=weight_decay, tune=self._canonical_tune(tune),
        )
        self._configure(meta_lr=meta_lr, meta_optimizer=meta_optimizer, meta_betas=meta_betas,
                        meta_eps=meta_eps, space=space, bounds=bounds, influence=influence, hvp=hvp,
                        fd_rel=fd_rel, compute_dtype=compute_dtype, reset_every=reset_every,
                        discount=discount, module=module, foreach=foreach)
        Optimizer.__init__(self, params, defaults)

    def _configure(self, *, meta_lr, meta_optimizer, meta_betas, meta_eps, space, bounds, influence, hvp,
                   fd_rel, compute_dtype, reset_every, discount, module, foreach) -> None:
        """Validate and store the options shared by every inner optimizer (meta-update, influence)."""
        if meta_optimizer not in ("adam", "sgd"):
            raise ValueError(f"Invalid meta_optimizer: {meta_optimizer!r} (use 'adam' or 'sgd')")
        if space not in ("log", "raw"):
            raise ValueError(f"Invalid space: {space!r} (use 'log' or 'raw')")
        if influence not in ("exact", "blockwise"):
            raise ValueError(f"Invalid influence: {influence!r} (use 'exact' or 'blockwise')")
        if hvp not in ("forward", "central"):
            raise ValueError(f"Invalid hvp: {hvp!r} (use 'forward' or 'central')")
        b1, b2 = meta_betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Invalid meta_betas: {meta_betas!r} (each in [0, 1))")
        if not (meta_eps >= 0.0 and math.isfinite(meta_eps)):
            raise ValueError(f"Invalid meta_eps: {meta_eps!r}")
        if fd_rel is not None and not (math.isfinite(fd_rel) and fd_rel > 0.0):
            raise ValueError(f"Invalid fd_rel: {fd_rel!r} (a positive number)")
        if compute_dtype is not None and not (isinstance(compute_dtype, torch.dtype)
                                              and compute_dtype.is_floating_point):
            raise TypeError(f"compute_dtype must be a floating torch.dtype (e.g. torch.bfloat16), got {compute_dtype!r}")
        if reset_every is not None and (
            isinstance(reset_every, bool) or not isinstance(reset_every, int) or reset_every < 1
        ):
            raise ValueError(f"Invalid reset_every: {reset_every!r} (a positive integer or None)")
        if not (0.0 <= _real(discount, "discount") <= 1.0):
            raise ValueError(f"Invalid discount: {discount!r} (gamma in [0, 1])")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")

        self.meta_optimizer = meta_optimizer
        self.space = space
        self.meta_lr = self._check_meta_lr(meta_lr, meta_optimizer, space)
        self.meta_betas = (float(b1), float(b2))
        self.meta_eps = float(meta_eps)
        self.bounds = self._check_bounds(bounds)
        self.influence = influence
        self.hvp = hvp
        self.fd_rel = fd_rel
        self.compute_dtype = compute_dtype
        self.reset_every = reset_every
        self.discount = float(discount)
        self.module = module
        self.foreach = foreach
        self.diagnostics: Dict[str, Any] = {}
        # Counters and meta-optimizer state shared by all parameters (saved by state_dict under "oho").
        self._oho: Dict[str, Any] = {
            "steps": 0, "hyper_steps": 0, "keys": None, "meta_state": {},
            "nonfinite_hypergradients": 0, "nonfinite_influence": 0,
        }

    # ------------------------------------------------------------------ validation
    @staticmethod
    def _check_meta_lr(meta_lr: Any, meta_optimizer: str, space: str) -> Dict[str, float]:
        if meta_lr is None:
            default = meta.DEFAULT_META_LR.get((meta_optimizer, space))
            if default is None:
                raise ValueError(
                    f"meta_lr is required with meta_optimizer={meta_optimizer!r}, space={space!r}: "
                    "its scale depends on the problem (the OHO paper used 1e-5 for CIFAR10, 1e-4 for MNIST)"
                )
            return {name: default for name in meta.HYPERPARAMETERS}
        if isinstance(meta_lr, Mapping):
            unknown = set(meta_lr) - set(meta.HYPERPARAMETERS)
            if unknown:
                raise ValueError(f"Unknown hyperparameter in meta_lr: {sorted(unknown)}")
            base = OHO._check_meta_lr(None, "adam", "log")
            values = {**base, **{k: _real(v, f"meta_lr[{k!r}]") for k, v in meta_lr.items()}}
        else:
            values = {name: _real(meta_lr, "meta_lr") for name in meta.HYPERPARAMETERS}
        for name, value in values.items():
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"Invalid meta_lr for {name}: {value}")
        return values

    @staticmethod
    def _check_bounds(bounds: Optional[Mapping[str, Tuple[float, float]]]) -> Dict[str, Tuple[float, float]]:
        result = dict(meta.DEFAULT_BOUNDS)
        for name, pair in (bounds or {}).items():
            if name not in meta.HYPERPARAMETERS:
                raise ValueError(f"Unknown hyperparameter in bounds: {name!r}")
            low, high = (_real(v, f"bounds[{name!r}]") for v in pair)
            default_low, default_high = meta.DEFAULT_BOUNDS[name]
            if math.isnan(low) or math.isnan(high) or low > high or low < default_low or high > default_high:
                raise ValueError(
                    f"Invalid bounds for {name}: ({low}, {high}); they must satisfy "
                    f"{default_low} <= low <= high <= {default_high}"
                )
            result[name] = (low, high)
        return result

    TUNABLE: Tuple[str, ...] = meta.HYPERPARAMETERS
    # GradScaler then hands step() its scale instead of silently unscaling around it: step() refuses it.
    _step_supports_amp_scaling = True

    @classmethod
    def _canonical_tune(cls, tune: Any) -> Tuple[str, ...]:
        return _canonical_tune(tune, cls.TUNABLE)

    @staticmethod
    def _check_lr_and_weight_decay(group: Dict[str, Any]) -> None:
        """The checks every inner optimizer shares (torch.optim's messages)."""
        lr = _real(group["lr"], "lr")
        if not (math.isfinite(lr) and lr >= 0.0):
            raise ValueError(f"Invalid learning rate: {group['lr']}")
        group.setdefault("lr_scale", 1.0)
        scale = _real(group["lr_scale"], "lr_scale")
        if not (math.isfinite(scale) and scale >= 0.0):
            raise ValueError(f"Invalid lr_scale: {group['lr_scale']} (a finite multiplier >= 0)")
        tune = group.get("tune", ())
        if "lr" in tune and "lr_scale" in tune:
            raise ValueError("tune 'lr' or 'lr_scale', not both: the effective lr is lr * lr_scale, so the two "
                             "hypergradients are the same direction")
        wd = _real(group["weight_decay"], "weight_decay")
        if not (math.isfinite(wd) and wd >= 0.0):
            raise ValueError(f"Invalid weight_decay value: {group['weight_decay']}")

    def _check_group(self, group: Dict[str, Any]) -> None:
        self._check_lr_and_weight_decay(group)
        mu = _real(group["momentum"], "momentum")
        if not (0.0 <= mu < 1.0):
            raise ValueError(f"Invalid momentum value: {group['momentum']} (must be in [0, 1))")
        damp = _real(group["dampening"], "dampening")
        if not math.isfinite(damp):
            raise ValueError(f"Invalid dampening value: {group['dampening']}")
        if group["nesterov"] and (mu <= 0.0 or damp != 0.0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        group["tune"] = self._canonical_tune(group["tune"])
        if "momentum" in group["tune"] and mu == 0.0 and damp != 0.0:
            raise ValueError(
                "Cannot tune momentum from 0 with dampening != 0: torch.optim.SGD's update jumps at "
                "momentum = 0 (no buffer) when dampening is set; start from momentum > 0 or dampening = 0"
            )

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if self._oho["keys"] is not None:
            raise ValueError("OHO.add_param_group after the first step is not supported: the influence "
                             "tensors are laid out for the groups present at the first step")
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])
        for p in self.param_groups[-1]["params"]:
            if _is_sharded(p):
                raise TypeError(
                    f"{type(self).__name__} does not support FSDP (or any sharded {type(p).__name__} "
                    "parameter): the finite-difference step and the hypergradients are norms and dot products "
                    "over whole parameters, which a shard does not hold. Use DistributedDataParallel, "
                    "which OHO supports with no change to the training loop."
                )

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:  # keep checkpoints of earlier versions loadable
            group.setdefault("lr_scale", 1.0)
            group.setdefault("nesterov", False)
            group.setdefault("dampening", 0.0)
            group.setdefault("tune", ("lr", "weight_decay"))

    def _snapshot(self, slot: str) -> Optional[BufferSnapshot]:
        """The module's buffers now, in memory kept per ``slot`` (none allocated after the first step)."""
        if self.module is None:
            return None
        storage = self.__dict__.setdefault("_buffer_storage", {}).setdefault(slot, [])
        return BufferSnapshot(self.module.buffers(), storage)

    def _check_no_scheduler_on_tuned_lr(self) -> None:
        # torch.optim.lr_scheduler.LRScheduler marks the groups it drives with "initial_lr".
        for g, group in enumerate(self.param_groups):
            if "initial_lr" in group and "lr" in group["tune"]:
                raise RuntimeError(
                    f"An lr scheduler drives param group {g} while OHO tunes its 'lr': each would overwrite "
                    "the other. Tune the multiplier instead, tune=('lr_scale', ...): the scheduler sets "
                    "group['lr'], OHO tunes group['lr_scale'], and the step uses lr * lr_scale."
                )

    # ------------------------------------------------------------------ layout helpers
    def _tuning(self) -> bool:
        return any(group["tune"] for group in self.param_groups)

    def _keys(self) -> List[Tuple[Optional[int], str]]:
        """The tangents: (group index, name) in exact mode, (None, name) in blockwise mode.

        With the greedy horizon (discount 0) no HVP couples the groups and the two modes give the same
        hypergradients, so exact mode takes blockwise's layout (K = tuned names, not groups x names).
        """
        if self._oho["keys"] is None:
            if self.influence == "exact" and self.discount > 0.0:
                keys = [(g, n) for g, group in enumerate(self.param_groups) for n in group["tune"]]
            else:
                names = {n for group in self.param_groups for n in group["tune"]}
                keys = [(None, n) for n in meta.HYPERPARAMETERS if n in names]
            self._oho["keys"] = keys
        return self._oho["keys"]

    def _direct(self, key: Tuple[Optional[int], str], g: int) -> bool:
        """[theta = x] for tangent ``key`` on the parameters of group ``g``."""
        owner, name = key
        return owner == g if owner is not None else name in self.param_groups[g]["tune"]

    @staticmethod
    def _lr(group: Dict[str, Any]) -> float:
        """The lr a step uses: the group's (scheduled) lr times OHO's multiplier (1 unless tuned)."""
        return group["lr"] * group["lr_scale"]

    @staticmethod
    def _lr_derivative(group: Dict[str, Any], key: Tuple[Optional[int], str]) -> float:
        """d(effective lr)/d(theta) for the lr-like tangent ``key``."""
        return group["lr"] if key[1] == "lr_scale" else group["lr_scale"]

    @staticmethod
    def _uses_buffer(group: Dict[str, Any]) -> bool:
        return group["momentum"] != 0 or "momentum" in group["tune"]

    def _tangent_buffers(self, group: Dict[str, Any]) -> Tuple[str, ...]:
        """Per-tangent companions of w' that the inner optimizer's state needs (b' for momentum)."""
        return ("tangent_b",) if self._uses_buffer(group) else ()

    def _use_foreach(self, params: Sequence[Tensor]) -> bool:
        if self.foreach is not None:
            return bool(self.foreach)
        return bool(params) and all(p.is_cuda for p in params)

    def _state_for(self, p: Tensor, group: Dict[str, Any], n_keys: int) -> Dict[str, Any]:
        state = self.state[p]
        if n_keys and "tangent_w" not in state:
            dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
            state["tangent_w"] = torch.zeros((n_keys, *p.shape), dtype=dtype, device=p.device)
        # The greedy horizon never reads b' (or m', v') after the step that wrote them: not kept.
        for name in self._tangent_buffers(group) if n_keys and self.discount > 0.0 else ():
            if name not in state:
                state[name] = torch.zeros_like(state["tangent_w"])
        return state

    # ------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure: Optional[Closure] = None) -> Optional[Tensor]:  # type: ignore[override]
        """One SGD step and, when tuning, one influence update (re-running ``closure`` for the HVPs).

        ``closure`` follows torch's LBFGS convention: clear grads, compute the training loss on one
        batch, backward, return the loss. It is required while anything is tuned. Returns the loss of
        the first evaluation. Afterwards ``p.grad`` holds that evaluation's gradient, the RNG and the
        module's buffers are as one ordinary evaluation leaves them.
        """
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            self.__dict__.pop("grad_scale", None)  # GradScaler deletes them only when step returns
            self.__dict__.pop("found_inf", None)
            raise RuntimeError(
                "OHO cannot run under torch.amp.GradScaler (fp16 loss scaling): every OHO step re-evaluates "
                "the closure, which GradScaler can neither scale nor check for infs (it refuses closures). "
                "Train in bf16 instead: torch.autocast(device_type, dtype=torch.bfloat16) inside the closures "
                "needs no loss scaling; pass compute_dtype=torch.bfloat16 to OHO."
            )
        tuning = self._tuning()
        if tuning:
            self._check_no_scheduler_on_tuned_lr()
        if closure is None and tuning:
            if self._is_state_initialisation():
                self._initialise_state()
                return None
            raise TypeError(
                "OHO.step() needs a closure while hyperparameters are tuned: the Hessian-vector products "
                "re-evaluate the training loss on the same batch (or pass tune=() for plain SGD)"
            )
        keys = self._keys() if tuning else []
        n_keys = len(keys)

        norms: List[float] = [0.0] * n_keys
        weight_norm = 0.0
        fresh = False  # every tangent is zero before this step's update (greedy horizon or a reset)
        if tuning:
            reset = self.reset_every is not None and self._oho["steps"] % self.reset_every == 0
            fresh = reset or self.discount == 0.0
            if not fresh:
                if self.discount < 1.0:
                    self._scale_influence(self.discount)
                norms, weight_norm = self._influence_norms(keys)
        live = [j for j, n in enumerate(norms) if n > 0.0]

        rng_before = RNGSnapshot().capture() if live else None
        buffers_before = self._snapshot("before") if live else None
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
            if tuning:
                self._check_loss(loss, "closure")

        # Per group: the parameters with a gradient (torch skips the others) and the SGD direction.
        work = []
        for g, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                work.append(None)
                continue
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("OHO does not support sparse gradients")
            states = [self._state_for(p, group, n_keys) for p in params]
            work.append(self._prepare(group, params, states))

        if tuning and loss is not None:
            finite_loss = bool(torch.isfinite(torch.as_tensor(loss)).all())
            if not finite_loss:
                self._oho["nonfinite_influence"] += 1
                warnings.warn("OHO: non-finite training loss; the influence was left unchanged this step")
                if fresh:
                    self._zero_influence()  # what the horizon left of it: nothing
            else:
                self._advance_influence(closure, keys, norms, weight_norm, live, work, rng_before,
                                        buffers_before, fresh)

        for g, group in enumerate(self.param_groups):
            if work[g] is not None:
                self._apply(group, work[g])
        self._oho["steps"] += 1
        return loss

    def _advance_influence(self, closure, keys, norms, weight_norm, live, work, rng_before,
                           buffers_before, fresh) -> None:
        active = [p for w in work if w is not None for p in w["params"]]
        if fresh and len(active) != len(self.state):  # every active param has state: equal counts, same set
            # The fresh update overwrites the tangents of the parameters that step; those of the
            # others (no gradient this step) must read zero too. zero_, not mul_(0): NaN must not survive.
            ids = {id(p) for p in active}
            idle = [t for p, s in self.state.items() if id(p) not in ids
                    for k, t in s.items() if k.startswith("tangent_")]
            if idle:
                torch._foreach_zero_(idle)
        train_grads = [p.grad for p in active]

        def update(j: int, hv: Optional[List[Tensor]]) -> None:
            """Advance tangent j in every group; ``hv`` spans all active params (None: fresh update)."""
            offset = 0
            for g, group in enumerate(self.param_groups):
                w = work[g]
                if w is None:
                    continue
                n = len(w["params"])
                if hv is not None:
                    part: Optional[List[Tensor]] = hv[offset:offset + n]
                elif fresh:
                    part = None  # zero tangents: the fresh update overwrites them, no HVP needed
                else:  # a zero w' whose companions (b', m', v') may not be zero (lr = 0)
                    part = [torch.zeros_like(s["tangent_w"][j]) for s in w["states"]]
                self._update_tangent(group, w, j, keys[j], g, part)
                offset += n

        for j in range(len(keys)):
            if j not in live:
                update(j, None)
        if not live:
            return
        all_params = [p for group in self.param_groups for p in group["params"]]
        stashed = [p.grad for p in all_params]
        rng_after = RNGSnapshot().capture()
        buffers_after = self._snapshot("after")
        saved = clone_all(active)
        # A backup of the training gradient only where gradient memory is a view into a larger buffer
        # (DDP's gradient_as_bucket_view, flat-buffer hooks): such memory is rewritten by every backward.
        # Fresh gradients from autograd are not views, so the backup (1x the parameters) is skipped.
        kept = clone_all(train_grads) if any(g._base is not None for g in train_grads) else None
        rel = self.fd_rel if self.fd_rel is not None else relative_step(
            self.compute_dtype or active[0].dtype, self.hvp)
        try:
            for j in live:
                eps = perturbation_scale(weight_norm, norms[j], rel)
                tangent = [self.state[p]["tangent_w"][j].to(p.dtype) for p in active]
                hv = self._fd_hvp(closure, active, all_params, tangent, eps, train_grads, kept, saved,
                                  rng_before, buffers_before)
                del tangent
                if not bool(torch.isfinite(torch.stack(torch._foreach_norm(hv)).sum())):  # one sync
                    self._oho["nonfinite_influence"] += 1
                    warnings.warn(f"OHO: non-finite Hessian-vector product for {keys[j]}; that tangent was "
                                  "left unchanged this step")
                    continue
                # Tangent j is updated at once (no other HVP reads it): one HVP alive at a time.
                update(j, hv)
                del hv
        finally:
            for p, grad in zip(all_params, stashed):
                p.grad = grad
            rng_after.restore()
            if buffers_after is not None:
                buffers_after.restore()

    def _fd_hvp(self, closure, active, all_params, tangent, eps, train_grads, kept, saved, rng,
                buffers) -> List[Tensor]:
        """H v for the training loss at the saved weights, by finite differences of ``closure``.

        Returns tensors of its own: when an evaluation wrote into the training gradient's memory (DDP
        bucket views), the result is copied out and the training gradient restored from ``kept``.
        """
        foreach = self._use_foreach(active)
        train_ptrs = {g.data_ptr() for g in train_grads}

        def gradient_at(shift: float) -> List[Tensor]:
            if foreach:
                torch._foreach_copy_(active, saved)
                torch._foreach_add_(active, tangent, alpha=shift)
            else:
                for p, s, v in zip(active, saved, tangent):
                    p.copy_(s).add_(v, alpha=shift)
            rng.restore()  # same dropout masks as the training evaluation
            if buffers is not None:
                buffers.restore()  # same buffers as it saw
            for p in all_params:
                p.grad = None  # the closure's backward allocates fresh gradients
            with torch.enable_grad():
                self._check_loss(closure(), "closure")
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in active]
            if any(g.data_ptr() in train_ptrs for g in grads):
                if kept is None:  # never silently: the training gradient is gone
                    raise RuntimeError(
                        "OHO: the closure wrote its gradient into the memory of the training gradient, "
                        "which is not a view OHO could have foreseen; please report this setup")
                grads = [g.clone() for g in grads]
                for g, k in zip(train_grads, kept):
                    g.copy_(k)
            return grads

        plus = gradient_at(eps)
        if self.hvp == "central":
            minus = gradient_at(-eps)
            scale = 2.0 * eps
        else:
            minus = train_grads
            scale = eps
        # Exact restore: the perturbation is never undone arithmetically.
        if foreach:
            torch._foreach_copy_(active, saved)
        else:
            for p, s in zip(active, saved):
                p.copy_(s)
        if foreach:
            torch._foreach_sub_(plus, minus)
            torch._foreach_div_(plus, scale)
        else:
            for a, b in zip(plus, minus):
                a.sub_(b).div_(scale)
        return plus

    # ------------------------------------------------------------------ the inner optimizer (SGD)
    def _prepare(self, group: Dict[str, Any], params: List[Tensor], states: List[Dict[str, Any]]) -> Dict[str, Any]:
        """Advance the inner optimizer's state and compute its direction, without moving the weights."""
        bufs = [s.get("momentum_buffer") for s in states]
        first = [b is None for b in bufs]
        foreach = self._use_foreach(params)
        uses_buffer = self._uses_buffer(group)
        direction, previous = sgd_direction_(
            params, [p.grad for p in params], bufs,
            weight_decay=group["weight_decay"], momentum=group["momentum"],
            dampening=group["dampening"], nesterov=group["nesterov"], use_buffer=uses_buffer,
            keep_previous_buffer="momentum" in group["tune"], foreach=foreach,
        )
        if uses_buffer:
            for s, b in zip(states, bufs):
                s["momentum_buffer"] = b
        return dict(params=params, states=states, bufs=bufs, first=first, direction=direction,
                    previous=previous, foreach=foreach)

    def _apply(self, group: Dict[str, Any], w: Dict[str, Any]) -> None:
        """Move the weights (after the influence update, which needs w_t)."""
        sgd_apply_(w["params"], w["direction"], lr=self._lr(group), foreach=w["foreach"])

    def _initialise_inner_state(self, group: Dict[str, Any], p: Tensor, state: Dict[str, Any]) -> None:
        if self._uses_buffer(group) and state.get("momentum_buffer") is None:
            state["momentum_buffer"] = torch.zeros_like(p)

    def _update_tangent(self, group, w, j, key, g, hv) -> None:
        uses_buffer = self._uses_buffer(group)
        # Parameters whose momentum buffer was created this step follow b'_1 = d'_1.
        for first_step in (True, False):
            idx = [i for i, f in enumerate(w["first"]) if f == first_step]
            if not idx:
                continue
            keep_b = uses_buffer and "tangent_b" in w["states"][idx[0]]
            sgd_tangent_update_(
                [w["states"][i]["tangent_w"][j] for i in idx],
                [w["states"][i]["tangent_b"][j] for i in idx] if keep_b else None,
                None if hv is None else [hv[i].to(w["states"][i]["tangent_w"].dtype) for i in idx],
                [w["params"][i] for i in idx],
                [w["bufs"][i] for i in idx] if uses_buffer else None,
                [w["previous"][i] for i in idx],
                [w["direction"][i] for i in idx],
                lr=self._lr(group), weight_decay=group["weight_decay"], momentum=group["momentum"],
                dampening=group["dampening"], nesterov=group["nesterov"], first_step=first_step,
                direct_lr=key[1] in ("lr", "lr_scale") and self._direct(key, g),
                lr_derivative=self._lr_derivative(group, key),
                direct_weight_decay=key[1] == "weight_decay" and self._direct(key, g),
                direct_momentum=key[1] == "momentum" and self._direct(key, g),
                foreach=w["foreach"], use_buffer=uses_buffer,
            )

    # ------------------------------------------------------------------ influence bookkeeping
    def _tangent_tensors(self) -> List[Tensor]:
        return [t for s in self.state.values() for k, t in s.items() if k.startswith("tangent_")]

    def _zero_influence(self) -> None:
        for t in self._tangent_tensors():
            t.zero_()

    def _scale_influence(self, gamma: float) -> None:
        for t in self._tangent_tensors():
            t.mul_(gamma)

    def _influence_norms(self, keys: Sequence[Any]) -> Tuple[List[float], float]:
        """(||w'_j|| for every tangent, ||w||) in one host sync; a non-finite tangent is reset to zero.

        Norms are taken in the tangents' own dtype (no float64 copy of K x parameters); a float32 norm
        that overflows (||w'|| > ~1e19) counts as non-finite.
        """
        pairs = [(p, s["tangent_w"]) for p, s in self.state.items() if "tangent_w" in s]
        if not keys or not pairs:
            return [0.0] * len(keys), 0.0
        # One multi-tensor norm per tangent (and one for the weights), squared and summed in float64.
        lists = [[t[j] for _, t in pairs] for j in range(len(keys))] + [[p.detach() for p, _ in pairs]]
        squares = [torch.stack(torch._foreach_norm(ts)).double().pow(2).sum() for ts in lists]
        *norms, weight_norm = torch.stack(squares).sqrt().tolist()
        for j, n in enumerate(norms):
            if not math.isfinite(n):
                self._oho["nonfinite_influence"] += 1
                warnings.warn(f"OHO: the influence for {keys[j]} became non-finite and was reset to zero")
                for t in self._tangent_tensors():
                    t[j].zero_()
                norms[j] = 0.0
        self.diagnostics["influence_norm"] = {self._key_name(k): n for k, n in zip(keys, norms)}
        return norms, weight_norm

    def _key_name(self, key: Tuple[Optional[int], str]) -> str:
        owner, name = key
        if owner is None:
            return name
        return f"{self.param_groups[owner].get('name', owner)}/{name}"

    # ------------------------------------------------------------------ hypergradients
    def hypergradient(self, val_closure: Closure) -> List[Dict[str, Tensor]]:
        """dL_val(w_t)/dtheta for every tuned hyperparameter, changing nothing.

        ``val_closure`` clears grads, computes the validation loss, calls backward and returns the loss.
        Returns one dict per param group (in ``param_groups`` order) mapping each tuned name to a 0-d
        tensor. Grads, RNG state and module buffers are as they were before the call.
        """
        hyper, _ = self._hypergradient(val_closure)
        return hyper

    @torch.no_grad()
    def _hypergradient(self, val_closure: Closure) -> Tuple[List[Dict[str, Tensor]], Any]:
        if val_closure is None or not callable(val_closure):
            raise TypeError("hypergradient/hyper_step need a validation closure")
        if self._oho["steps"] == 0:
            raise ValueError("hyper_step/hypergradient called before any step(): there is no influence yet")
        keys = self._keys() if self._tuning() else []
        if not keys:
            return [{} for _ in self.param_groups], None

        all_params = [p for group in self.param_groups for p in group["params"]]
        stashed = [p.grad for p in all_params]
        present = [g for g in stashed if g is not None]
        # Backups only of gradient memory that a backward may rewrite in place (views: see _fd_hvp).
        copies = iter(clone_all([g for g in present if g._base is not None]))
        kept = [next(copies) if g is not None and g._base is not None else None for g in stashed]
        stashed_ptrs = {g.data_ptr() for g in stashed if g is not None}
        rng = RNGSnapshot().capture()
        buffers = self._snapshot("hyper")
        try:
            for p in all_params:
                p.grad = None
            with torch.enable_grad():
                loss = val_closure()
            self._check_loss(loss, "val_closure")
            val_grads = [p.grad for p in all_params]
            if any(v is not None and v.data_ptr() in stashed_ptrs for v in val_grads):
                val_grads = [v.clone() if v is not None else None for v in val_grads]
        finally:
            for p, grad, backup in zip(all_params, stashed, kept):
                if grad is not None and p.grad is not None and grad.data_ptr() == p.grad.data_ptr():
                    if backup is None:
                        raise RuntimeError(
                            "OHO: the validation closure wrote its gradient into the memory of the training "
                            "gradient, which is not a view OHO could have foreseen; please report this setup")
                    grad.copy_(backup)  # the closure wrote into the kept gradient's memory
                p.grad = grad
            rng.restore()
            if buffers is not None:
                buffers.restore()

        # per_group[g, j] = < grad L_val restricted to group g, tangent j restricted to group g >
        n_groups, n_keys = len(self.param_groups), len(keys)
        contributions: List[List[Tensor]] = [[] for _ in range(n_groups)]
        grads_by_param = {id(p): gv for p, gv in zip(all_params, val_grads)}
        for g, group in enumerate(self.param_groups):
            for p in group["params"]:
                gv = grads_by_param[id(p)]
                state = self.state.get(p, {})
                if gv is None or "tangent_w" not in state:
                    continue
                t = state["tangent_w"]
                contributions[g].append(t.reshape(n_keys, -1) @ gv.reshape(-1).to(t.dtype))
        ref = next((c[0] for c in contributions if c), None)
        if ref is None:
            zero = torch.zeros(n_keys)
            per_group = [zero for _ in range(n_groups)]
        else:
            per_group = [torch.stack(c).sum(0) if c else torch.zeros_like(ref) for c in contributions]

        hyper: List[Dict[str, Tensor]] = [{} for _ in range(n_groups)]
        for j, (owner, name) in enumerate(keys):
            if owner is not None:  # exact: the tangent spans every parameter
                hyper[owner][name] = torch.stack([pg[j] for pg in per_group]).sum()
            else:  # blockwise: each group reads its own block
                for g, group in enumerate(self.param_groups):
                    if name in group["tune"]:
                        hyper[g][name] = per_group[g][j]
        return hyper, loss

    @torch.no_grad()
    def hyper_step(self, val_closure: Closure) -> List[Dict[str, Tensor]]:
        r"""Compute the hypergradients (see :meth:`hypergradient`) and apply the meta-update.

        Each tuned :math:`\theta` moves to :math:`P(f(\phi - \alpha\,\mathrm{step}(h\,d\theta/d\phi)))`
        (:mod:`ohotorch.meta`). A non-finite validation loss or hypergradient changes nothing, is counted
        in ``diagnostics["nonfinite_hypergradients"]`` and warned about. Returns the hypergradients.
        """
        hyper, loss = self._hypergradient(val_closure)
        flat = [(g, name, h) for g, d in enumerate(hyper) for name, h in d.items()]
        if not flat:
            return hyper
        device = flat[0][2].device
        loss_sum = torch.as_tensor(loss).detach().double().sum().to(device)
        *values, loss_value = torch.stack([h.detach().double() for _, _, h in flat] + [loss_sum]).tolist()
        if not (math.isfinite(loss_value) and all(math.isfinite(v) for v in values)):
            self._oho["nonfinite_hypergradients"] += 1
            self.diagnostics["nonfinite_hypergradients"] = self._oho["nonfinite_hypergradients"]
            warnings.warn("OHO: non-finite validation loss or hypergradient; hyperparameters unchanged")
            return hyper
        proposals = []
        for (g, name, _), h in zip(flat, values):
            group = self.param_groups[g]
            theta = float(group[name])
            phi = meta.to_meta(name, theta, self.space)
            grad = h * meta.meta_derivative(name, theta, self.space)
            lr = self.meta_lr[name]
            state = self._oho["meta_state"].setdefault(f"{g}/{name}", {})
            previous = state.get("written", theta)
            if previous != theta:
                # Someone else (the user, a scheduler, a checkpoint edit) set this value: the moments
                # measured at the old scale would freeze or fling it, so the meta-optimizer restarts.
                state.clear()
                if name == "lr":
                    warnings.warn(
                        f"OHO: the lr of param group {g} was changed from outside since the last hyper_step "
                        f"({previous} -> {theta}); OHO continues from the new value. If a "
                        "scheduler (e.g. ReduceLROnPlateau) sets it, tune 'lr_scale' instead of 'lr' so the "
                        "two do not overwrite each other."
                    )
            if self.meta_optimizer == "adam":
                new_phi = meta.meta_adam_step(phi, grad, state, lr=lr, betas=self.meta_betas, eps=self.meta_eps)
            else:
                new_phi = meta.meta_sgd_step(phi, grad, lr=lr)
            new_theta = meta.project(meta.from_meta(name, new_phi, self.space), self.bounds[name])
            if lr == 0.0:
                new_theta = theta  # meta_lr = 0: hypergradients only, bit-identical hyperparameters
            proposals.append((group, name, new_theta, state))
        if not all(math.isfinite(t) for _, _, t, _ in proposals):
            self._oho["nonfinite_hypergradients"] += 1
            warnings.warn("OHO: the meta-update produced a non-finite value; hyperparameters unchanged")
            return hyper
        for group, name, theta, state in proposals:
            group[name] = theta
            state["written"] = theta
        self._oho["hyper_steps"] += 1
        self.diagnostics["val_loss"] = loss_value
        self.diagnostics["hypergradient"] = {
            f"{self.param_groups[g].get('name', g)}/{name}": v for (g, name, _), v in zip(flat, values)
        }
        return hyper

    # ------------------------------------------------------------------ misc
    @staticmethod
    def _check_loss(loss: Any, what: str) -> None:
        if loss is None:
            raise TypeError(f"{what} returned no loss: it must compute the loss, call backward and return it")
        if not isinstance(loss, (Tensor, float, int)):
            raise TypeError(f"{what} must return the loss (a Tensor or number), got {type(loss).__name__}")

    def _is_state_initialisation(self) -> bool:
        """The distributed-checkpoint idiom: step() with zero grads and lr = 0 to create the state."""
        if any(self._lr(group) != 0 for group in self.param_groups):
            return False
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        return all(not bool(g.any()) for g in grads)

    def _initialise_state(self) -> None:
        n_keys = len(self._keys())
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._initialise_inner_state(group, p, self._state_for(p, group, n_keys))

    @property
    def counters(self) -> Dict[str, int]:
        """Steps, hyper-steps, and how often a non-finite value was refused."""
        return {k: self._oho[k] for k in ("steps", "hyper_steps", "nonfinite_hypergradients",
                                          "nonfinite_influence")}

    def state_dict(self) -> Dict[str, Any]:
        sd = super().state_dict()
        oho = dict(self._oho)
        oho["meta_state"] = {k: dict(v) for k, v in self._oho["meta_state"].items()}
        oho["keys"] = None if self._oho["keys"] is None else [list(k) for k in self._oho["keys"]]
        sd["oho"] = oho
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        oho = state_dict.pop("oho", None)
        # torch casts floating state to the parameter's dtype; tangents keep the precision they were saved in.
        saved_dtypes = {idx: {k: v.dtype for k, v in s.items() if k.startswith("tangent_")}
                        for idx, s in state_dict.get("state", {}).items()}
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        for idx, p in zip(saved_ids, params):
            for k, dtype in saved_dtypes.get(idx, {}).items():
                if p in self.state and k in self.state[p]:
                    self.state[p][k] = self.state[p][k].to(dtype)
        for group in self.param_groups:
            group["tune"] = self._canonical_tune(group.get("tune", ()))
        if oho is not None:
            restored = dict(oho)
            restored["meta_state"] = {k: dict(v) for k, v in oho["meta_state"].items()}
            restored["keys"] = None if oho["keys"] is None else [(k[0], k[1]) for k in oho["keys"]]
            self._oho = restored
