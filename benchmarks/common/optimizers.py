"""The one optimizer factory of the benchmarks, and the method names it understands.

Every script builds its optimizers through :func:`build_optimizer`, so a method name means the same
algorithm in every script. Names:

* baselines (torch.optim): ``sgd`` (fixed lr), ``adam``, ``adamw``, and SGD with a per-epoch schedule:
  ``step`` (StepLR), ``exp`` (ExponentialLR), ``cosine`` (CosineAnnealingLR);
* OHO: ``oho[_adam|_adamw][_global|_layer|_grouped][_blockwise|_exact][_greedy|_full|_discount<g>][_h<N>]``,
  the parts in that order, each optional:

  - inner update: SGD (``ohotorch.OHO``, the default), ``adam`` (``OHOAdam``), ``adamw`` (``OHOAdamW``);
  - hyperparameter groups: ``global`` (one, the default), ``layer`` (``ohotorch.layerwise``), ``grouped``
    (``ohotorch.grouped`` into ``n_groups``);
  - influence, for layer/grouped: ``exact`` (the default) or ``blockwise``;
  - horizon: ``greedy`` (``discount=0``, the default), ``full`` (``discount=1``, the paper's exact RTRL),
    ``discount<g>`` (``discount=g``, e.g. ``discount0.9``);
  - ``h<N>``: one ``hyper_step`` every N steps (else the script's ``hyper_every``).

  So ``oho_global`` = ``oho_greedy`` = ``oho_global_exact_greedy``, ``oho_layer_blockwise_full`` is the
  paper's layerwise OHO, ``oho_adamw_full_h10`` is OHOAdamW with the full horizon and a hyper-step every
  10 steps. The horizon comes only from the name: ``discount`` in ``oho_options`` is refused.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .results import _round
from .runtime import import_ohotorch

# The paper's comparison: its five baselines, then OHO (the comparisons' default methods); further names.
BASELINES: Tuple[str, ...] = ("sgd", "adam", "step", "exp", "cosine")
OHO_METHODS: Tuple[str, ...] = ("oho_global", "oho_layer_blockwise", "oho_layer_exact")
EXTRA_METHODS: Tuple[str, ...] = ("oho_grouped_blockwise", "oho_grouped_exact")
ALL_METHODS: Tuple[str, ...] = BASELINES + OHO_METHODS + EXTRA_METHODS
HYPER_NAMES: Tuple[str, ...] = ("lr", "weight_decay", "momentum")


def parse_options(items: Sequence[str]) -> Dict[str, Any]:
    """``("discount=0.99", "reset_every=100")`` -> ``{"discount": 0.99, "reset_every": 100}``."""
    import ast

    options: Dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq:
            raise ValueError(f"Expected key=value, got {item!r}")
        try:
            options[key.strip()] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError):
            options[key.strip()] = text.strip()
    return options




def has_buffers(model: nn.Module) -> bool:
    """Whether the model carries buffers (BatchNorm statistics) that OHO must restore exactly."""
    return any(True for _ in model.buffers())


@dataclass(frozen=True)
class Method:
    """What a method name says (see the module docstring for the grammar)."""

    name: str
    inner: str  # sgd, adam or adamw: the update rule
    schedule: Optional[str] = None  # step, exp or cosine (baselines only)
    oho: bool = False
    groups: str = "global"  # global, layer, grouped
    influence: str = "exact"  # exact, blockwise
    discount: float = 0.0  # 0: greedy, 1: full horizon
    hyper_every: Optional[int] = None  # None: the script's setting


_PLAIN = {"sgd": ("sgd", None), "adam": ("adam", None), "adamw": ("adamw", None), "step": ("sgd", "step"),
          "exp": ("sgd", "exp"), "cosine": ("sgd", "cosine")}
_OHO = re.compile(r"^oho(?:_(?P<inner>adamw|adam))?(?:_(?P<groups>global|layer|grouped))?"
                  r"(?:_(?P<influence>blockwise|exact))?"
                  r"(?:_(?:(?P<horizon>greedy|full)|discount_?(?P<discount>\d+(?:\.\d*)?|\.\d+)))?"
                  r"(?:_h(?P<every>[1-9]\d*))?$")


def parse_method(name: str) -> Method:
    """The :class:`Method` a name stands for; ValueError for a name that is not one."""
    if name in _PLAIN:
        inner, schedule = _PLAIN[name]
        return Method(name, inner, schedule)
    match = _OHO.match(name)
    if match is None:
        raise ValueError(f"Unknown method {name!r}: a baseline {tuple(_PLAIN)} or "
                         "oho[_adam|_adamw][_global|_layer|_grouped][_blockwise|_exact]"
                         "[_greedy|_full|_discount<g>][_h<N>]")
    parts = match.groupdict()
    groups = parts["groups"] or "global"
    if groups == "global" and parts["influence"] == "blockwise":
        raise ValueError(f"Unknown method {name!r}: one global group has no blockwise influence")
    discount = {"greedy": 0.0, "full": 1.0, None: 0.0}[parts["horizon"]]
    if parts["discount"] is not None:
        discount = float(parts["discount"])
        if not 0.0 <= discount <= 1.0:
            raise ValueError(f"Unknown method {name!r}: the discount must lie in [0, 1]")
    return Method(name, parts["inner"] or "sgd", None, True, groups, parts["influence"] or "exact", discount,
                  int(parts["every"]) if parts["every"] else None)


def is_method(name: str) -> bool:
    try:
        parse_method(name)
    except ValueError:
        return False
    return True


@dataclass
class OptimizerSettings:
    """The values :func:`build_optimizer` starts every method from; None leaves the optimizer class's
    default. :meth:`of` reads them from any config with fields of the same names (``TrainConfig``)."""

    lr: float = 0.1  # SGD family, OHO's initial lr
    adam_lr: float = 1e-3  # Adam, AdamW, OHOAdam, OHOAdamW
    weight_decay: Optional[float] = None
    momentum: Optional[float] = None
    nesterov: Optional[bool] = None
    epochs: int = 1  # the schedules' length in epochs
    step_size: int = 0  # StepLR period in epochs; 0: epochs // 3
    step_gamma: float = 0.1
    exp_gamma: float = 0.0  # ExponentialLR factor per epoch; 0: reach exp_final_ratio at the end
    exp_final_ratio: float = 0.01
    tune: Optional[Tuple[str, ...]] = ("lr", "weight_decay")  # explicit: weight decay tuned even from 0
    meta_lr: Optional[float] = None
    meta_optimizer: Optional[str] = None
    space: Optional[str] = None
    hvp: Optional[str] = None
    n_groups: int = 4  # for the grouped methods
    oho_options: Tuple[str, ...] = ()  # further OHO keyword arguments, key=value (Python literals)
    compute_dtype: Optional[torch.dtype] = None  # OHO's finite-difference precision (bf16 closures)

    @classmethod
    def of(cls, cfg: Any, **overrides: Any) -> "OptimizerSettings":
        values = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls) if hasattr(cfg, f.name)}
        values.update(overrides)
        return cls(**values)


def _given(**values: Any) -> Dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def build_oho(method: str, model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """The ohotorch optimizer of an ``oho_*`` method (see :func:`build_optimizer`)."""
    spec = parse_method(method)
    if not spec.oho:
        raise ValueError(f"Not an OHO method: {method!r}")
    s = cfg if isinstance(cfg, OptimizerSettings) else OptimizerSettings.of(cfg)
    ohotorch = import_ohotorch()
    if spec.groups == "global":
        params: Any = model.parameters()
    elif spec.groups == "layer":
        params = ohotorch.layerwise(model)
    else:
        params = ohotorch.grouped(model, s.n_groups)
    options = parse_options(s.oho_options)
    if "discount" in options:
        raise ValueError(f"{method}: give the horizon in the method name (_greedy, _full, _discount<g>), "
                         "not as discount in oho_options")
    shared = dict(discount=spec.discount, influence=spec.influence,
                  module=model if has_buffers(model) else None,
                  **_given(tune=s.tune, meta_lr=s.meta_lr, meta_optimizer=s.meta_optimizer, space=s.space,
                           hvp=s.hvp, compute_dtype=s.compute_dtype), **options)
    if spec.inner == "sgd":
        return ohotorch.OHO(params, lr=s.lr, **_given(momentum=s.momentum, nesterov=s.nesterov,
                                                      weight_decay=s.weight_decay), **shared)
    cls = ohotorch.OHOAdam if spec.inner == "adam" else ohotorch.OHOAdamW
    return cls(params, lr=s.adam_lr, **_given(weight_decay=s.weight_decay), **shared)


def build_optimizer(method: str, model: nn.Module, cfg: Any) -> Tuple[torch.optim.Optimizer, Any]:
    """The optimizer and (for the decay baselines) the per-epoch lr scheduler of ``method``.

    ``cfg``: :class:`OptimizerSettings`, or a config it can read them from (``TrainConfig``).
    """
    spec = parse_method(method)
    s = cfg if isinstance(cfg, OptimizerSettings) else OptimizerSettings.of(cfg)
    if spec.oho:
        return build_oho(method, model, s), None
    if spec.inner in ("adam", "adamw"):
        cls = torch.optim.Adam if spec.inner == "adam" else torch.optim.AdamW
        return cls(model.parameters(), lr=s.adam_lr, **_given(weight_decay=s.weight_decay)), None
    sgd = torch.optim.SGD(model.parameters(), lr=s.lr, **_given(momentum=s.momentum, nesterov=s.nesterov,
                                                                 weight_decay=s.weight_decay))
    sched = torch.optim.lr_scheduler
    if spec.schedule == "step":
        return sgd, sched.StepLR(sgd, step_size=s.step_size or max(1, s.epochs // 3), gamma=s.step_gamma)
    if spec.schedule == "exp":
        return sgd, sched.ExponentialLR(sgd, gamma=s.exp_gamma or s.exp_final_ratio ** (1.0 / s.epochs))
    if spec.schedule == "cosine":
        return sgd, sched.CosineAnnealingLR(sgd, T_max=s.epochs)
    return sgd, None


def group_names(opt: torch.optim.Optimizer, model: nn.Module) -> List[str]:
    """A readable name per param group: its ``name`` key, else the module owning its first parameter."""
    owner = {id(p): name.rpartition(".")[0] or name for name, p in model.named_parameters()}
    names = []
    for i, group in enumerate(opt.param_groups):
        if "name" in group:
            names.append(str(group["name"]))
        elif len(opt.param_groups) == 1:
            names.append("all")
        else:
            names.append(owner.get(id(group["params"][0]), str(i)))
    return names


def hyperparameters(opt: torch.optim.Optimizer) -> Dict[str, List[float]]:
    """The current lr / weight decay / momentum of every param group (the tuned state is public)."""
    values: Dict[str, List[float]] = {}
    for name in HYPER_NAMES:
        if all(name in g for g in opt.param_groups):
            values[name] = [_round(float(g[name])) for g in opt.param_groups]
    return values
