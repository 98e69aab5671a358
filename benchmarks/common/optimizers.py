"""Optimizers for every method."""
from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import nn

from .results import _round
from .runtime import import_ohotorch

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


def build_oho(method: str, model: nn.Module, cfg: Any) -> torch.optim.Optimizer:
    """ohotorch.OHO for an ``oho_*`` method: the granularity picks the param groups, the suffix the
    influence mode (global has one group, where blockwise and exact coincide)."""
    ohotorch = import_ohotorch()
    granularity, _, influence = method[len("oho_"):].partition("_")
    if granularity == "global":
        params: Any = model.parameters()
        influence = "exact"
    elif granularity == "layer":
        params = ohotorch.layerwise(model)
    elif granularity == "grouped":
        params = ohotorch.grouped(model, cfg.n_groups)
    else:
        raise ValueError(f"Unknown OHO method: {method}")
    return ohotorch.OHO(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, weight_decay=cfg.weight_decay,
        tune=cfg.tune, meta_lr=cfg.meta_lr, meta_optimizer=cfg.meta_optimizer, space=cfg.space,
        influence=influence, hvp=cfg.hvp, module=model if has_buffers(model) else None,
        **parse_options(cfg.oho_options),
    )


def build_optimizer(method: str, model: nn.Module, cfg: Any) -> Tuple[torch.optim.Optimizer, Any]:
    """The optimizer and (for the decay baselines) the per-epoch lr scheduler of ``method``."""
    if method.startswith("oho_"):
        return build_oho(method, model, cfg), None
    if method == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.adam_lr, weight_decay=cfg.weight_decay), None
    sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler
    if method == "sgd":
        return sgd, None
    if method == "step":
        return sgd, sched.StepLR(sgd, step_size=cfg.step_size or max(1, cfg.epochs // 3), gamma=cfg.step_gamma)
    if method == "exp":
        gamma = cfg.exp_gamma or cfg.exp_final_ratio ** (1.0 / cfg.epochs)
        return sgd, sched.ExponentialLR(sgd, gamma=gamma)
    if method == "cosine":
        return sgd, sched.CosineAnnealingLR(sgd, T_max=cfg.epochs)
    raise ValueError(f"Unknown method: {method}")


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


# ---------------------------------------------------------------------------------------------------
