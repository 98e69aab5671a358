r"""Hyper groups: which param groups share one tuned value, which values a group tunes, what it shows.

**Hyper groups.** A param group is its own hyper group unless it carries a ``"hyper_group"`` label:
param groups with the same label share one value of every hyperparameter they tune. A **hyper
variable** is one tuned scalar :math:`\theta`: a (hyper group, name) pair. Its *members* are the param
groups of the hyper group whose ``tune`` names it, its *leader* the first of them; it has one tangent
(``influence="exact"``: key ``(leader, name)``), one meta-optimizer state (saved under
``"leader/name"``), and one value, written into every member after each hyper-step. Cost: with
``influence="exact"`` K is the number of hyper variables, not of (param group, name) pairs. The meta-
update reads the leader's value: set a shared value from outside on every member (as a scheduler or
nanoGPT's ``for g in opt.param_groups: g["lr"] = lr`` does); a change to another member alone is
overwritten by the next hyper-step. Like ``tune``, the labels are part of the tangent layout fixed at
the first step: set them before it.

Sharing is exact. The members' weights all move with the one :math:`\theta`, so its tangent
:math:`\dot w = dw/d\theta` carries the direct term :math:`[\theta = x]` on the parameters of every
member, and

.. math::
    \frac{\partial L_{val}}{\partial \theta}
    = \sum_{g} \langle \nabla_{w_g} L_{val}, \dot w_g \rangle \quad\text{(every param group } g\text{)},

the whole contraction of that tangent (exact layout). The blockwise layout reads the block of the
hyper group, every param group with its label (the approximation drops the influence on other hyper
groups' parameters: exact when there is one hyper group, and with the greedy horizon).

Param groups differ in everything they do not share: a nanoGPT decay / no-decay split is two param
groups in one hyper group, one tuned lr over both and a weight decay tuned only where it is not 0::

    groups = [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)]
    opt = ohotorch.OHOAdamW(ohotorch.share(groups), lr=6e-4, tune=("lr_scale", "weight_decay"))

**Weight decay from 0.** A group that starts with ``weight_decay = 0`` does not tune it unless asked:
by the group's own ``tune`` naming ``"weight_decay"``, or by the constructor's ``tune`` naming it for the
groups that take the constructor's weight decay. With the default ``tune``, and in a group that sets its
own ``weight_decay=0`` (the no-decay group of a decay split) without its own ``tune``, weight decay stays
at 0 and costs no tangent.

**The effective lr.** A step uses :math:`\eta\,s` (``lr * lr_scale``). Loggers and schedulers read
``group["lr"]``, the scheduled lr; ``group["effective_lr"]`` holds the product: set when the group is
added, refreshed at every ``step()`` (the value that step uses) and after every committed
``hyper_step()`` (the value the next step uses unless a scheduler changes ``lr`` in between).
"""
from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Dict, List, MutableMapping, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["HYPER_GROUP", "EFFECTIVE_LR", "DefaultTune", "DEFAULT_TUNE", "label", "leaders", "members",
           "variable_name", "check_label", "check_shared_values", "asks_zero_weight_decay",
           "drop_zero_weight_decay_", "read_out", "broadcast_shared_", "refresh_effective_lr_"]

HYPER_GROUP = "hyper_group"
EFFECTIVE_LR = "effective_lr"

Group = Mapping[str, Any]


class DefaultTune(tuple):
    """The constructors' default ``tune``, told apart from the same names given explicitly."""

    __slots__ = ()


DEFAULT_TUNE: Tuple[str, ...] = DefaultTune(("lr", "weight_decay"))


# ---------------------------------------------------------------------------- sharing
def label(group: Group, index: int) -> Hashable:
    """The hyper group of param group ``index``: its ``"hyper_group"`` label, or its own."""
    value = group.get(HYPER_GROUP)
    return ("param group", index) if value is None else ("label", value)


def leaders(param_groups: Sequence[Group]) -> List[Dict[str, int]]:
    """``leaders(groups)[g][name]``: the param group holding the value that group ``g`` tunes as ``name``."""
    first: Dict[Tuple[Hashable, str], int] = {}
    return [{name: first.setdefault((label(group, index), name), index) for name in group["tune"]}
            for index, group in enumerate(param_groups)]


def members(param_groups: Sequence[Group]) -> Dict[Tuple[int, str], List[int]]:
    """``{(leader, name): [member, ...]}`` for every hyper variable, leaders in order."""
    result: Dict[Tuple[int, str], List[int]] = {}
    for index, owners in enumerate(leaders(param_groups)):
        for name, leader in owners.items():
            result.setdefault((leader, name), []).append(index)
    return result


def variable_name(param_groups: Sequence[Group], index: int, name: str) -> str:
    """``"label/name"`` for a shared hyper group, else ``"group_name/name"`` (the index without a name)."""
    group = param_groups[index]
    owner = group.get(HYPER_GROUP)
    return f"{group.get('name', index) if owner is None else owner}/{name}"


def _shares(param_groups: Sequence[Group]) -> bool:
    return any(group.get(HYPER_GROUP) is not None for group in param_groups)


def check_label(group: Group) -> None:
    """Refuse a ``"hyper_group"`` label that cannot name a hyper group."""
    value = group.get(HYPER_GROUP)
    if value is not None and (not isinstance(value, Hashable) or isinstance(value, (bool, float, Tensor))):
        raise TypeError(f"hyper_group must be a label such as a string, got {value!r}")


def check_shared_values(param_groups: Sequence[Group]) -> None:
    """Refuse members of a shared hyper variable that start from different values (one value each)."""
    if not _shares(param_groups):
        return
    for (leader, name), group_indices in members(param_groups).items():
        for index in group_indices[1:]:
            first, value = param_groups[leader][name], param_groups[index][name]
            if value != first:
                raise ValueError(
                    f"param groups {leader} and {index} share hyper_group "
                    f"{param_groups[index][HYPER_GROUP]!r} and both tune {name!r}, but start from different "
                    f"values ({first} and {value}): a shared hyper group has one value per tuned name. Give them "
                    f"the same {name}, or different hyper_group labels"
                )


def read_out(param_groups: Sequence[Group], keys: Sequence[Tuple[Any, str]],
             per_group: Sequence[Tensor]) -> List[Dict[str, Tensor]]:
    """The hypergradients ``[{name: dL_val/dtheta}]`` per param group from the contraction ``per_group``.

    ``per_group[g][k]`` is :math:`\\langle v_g, \\dot w_{k,g}\\rangle` (see :mod:`ohotorch.influence`). An exact
    key ``(leader, name)`` reads the sum over every group; a blockwise key ``(None, name)`` reads, for each
    hyper variable of that name, the block of its hyper group (the sum over the param groups with its
    label, or its own group). Every member of a hyper variable reports its value.
    """
    hyper: List[Dict[str, Tensor]] = [{} for _ in param_groups]
    variables = members(param_groups)
    blocks: Dict[Hashable, List[int]] = {}
    for index, group in enumerate(param_groups):
        blocks.setdefault(label(group, index), []).append(index)
    for k, (owner, name) in enumerate(keys):
        if owner is not None:  # exact: the tangent spans every parameter
            total = torch.stack([values[k] for values in per_group]).sum()
            for index in variables[(owner, name)]:
                hyper[index][name] = total
            continue
        for (leader, variable_name_), group_indices in variables.items():  # blockwise
            if variable_name_ != name:
                continue
            block = blocks[label(param_groups[leader], leader)]
            value = (per_group[leader][k] if len(block) == 1
                     else torch.stack([per_group[index][k] for index in block]).sum())
            for index in group_indices:
                hyper[index][name] = value
    return hyper


def broadcast_shared_(param_groups: Sequence[MutableMapping[str, Any]]) -> None:
    """Write each shared hyper variable's value (its leader's) into every member."""
    if not _shares(param_groups):
        return
    for (leader, name), group_indices in members(param_groups).items():
        for index in group_indices[1:]:
            param_groups[index][name] = param_groups[leader][name]


# ---------------------------------------------------------------------------- weight decay from 0
def asks_zero_weight_decay(param_group: Any, default_tune: Any) -> bool:
    """Whether a weight decay of 0 in ``param_group`` (as the user wrote it) is tuned when named.

    Yes where the group has its own ``tune``; no where it sets its own ``weight_decay`` without one;
    otherwise yes unless the constructor's ``tune`` is the default.
    """
    if not isinstance(param_group, Mapping):
        return True  # torch.optim refuses it
    if "tune" in param_group:
        return True
    if "weight_decay" in param_group:
        return False
    return not isinstance(default_tune, DefaultTune)


def drop_zero_weight_decay_(group: MutableMapping[str, Any]) -> None:
    """Stop tuning the group's weight decay where it starts at 0 (call where it was not asked for)."""
    tune, weight_decay = group.get("tune", ()), group.get("weight_decay")
    if isinstance(tune, str) or isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        return  # left to the group checks
    try:
        names = tuple(tune)
    except TypeError:
        return
    if weight_decay == 0 and "weight_decay" in names:
        group["tune"] = tuple(name for name in names if name != "weight_decay")


# ---------------------------------------------------------------------------- the effective lr
def refresh_effective_lr_(param_groups: Sequence[MutableMapping[str, Any]]) -> Dict[str, float]:
    """Set ``group["effective_lr"] = lr * lr_scale`` in every group; returns ``{group name: value}``."""
    shown: Dict[str, float] = {}
    for index, group in enumerate(param_groups):
        value = group["lr"] * group.get("lr_scale", 1.0)
        group[EFFECTIVE_LR] = value
        shown[str(group.get("name", index))] = value
    return shown
