"""Hyper groups built from a model, and a validation-loader helper.

A hyper group is the set of param groups that share one value of each tuned hyperparameter. Every param
group of :class:`ohotorch.OHO` carries its own lr / weight decay / momentum and its own ``tune`` set, and
is its own hyper group unless it carries a ``"hyper_group"`` label: param groups with the same label
share one tuned value per name (:mod:`ohotorch.hyper_groups`). The paper's three granularities:

* global: ``OHO(model.parameters(), ...)`` - one group, one set of hyperparameters; over param groups
  that must stay apart, ``OHO(ohotorch.share(groups), ...)`` (a decay / no-decay split:
  :func:`split_decay`);
* layerwise: ``OHO(ohotorch.layerwise(model), ...)`` - one group per module that owns parameters
  (a layer's weight and bias share one set);
* ``OHO(ohotorch.grouped(model, k), ...)`` - k contiguous runs of layers, in module order, as even as
  possible (k = 1 is global, k = number of layers is layerwise).
"""
from __future__ import annotations

from collections import abc
from typing import Any, Callable, Dict, Hashable, Iterable, Iterator, List, Mapping, TypeVar

from torch import Tensor, nn

from .hyper_groups import HYPER_GROUP

__all__ = ["layerwise", "grouped", "share", "split_decay", "cycle"]

T = TypeVar("T")


def layerwise(model: nn.Module, **group_options: Any) -> List[Dict[str, Any]]:
    """One param group per module that directly owns trainable parameters, in ``model.modules()`` order.

    Each group is ``{"params": [...], "name": module_name, **group_options}``; ``group_options`` (for
    example ``lr=0.1`` or ``tune=("lr",)``) are copied into every group. Parameters shared between
    modules are placed once, with the first module that owns them.
    """
    groups: List[Dict[str, Any]] = []
    seen = set()
    for name, module in model.named_modules():
        params = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        if not params:
            continue
        seen.update(id(p) for p in params)
        groups.append({"params": params, "name": name or type(module).__name__, **group_options})
    if not groups:
        raise ValueError("layerwise: the model has no trainable parameters")
    return groups


def grouped(model: nn.Module, k: int, **group_options: Any) -> List[Dict[str, Any]]:
    """``k`` contiguous groups of layers (the OHO paper's interpolation between global and layerwise).

    The layers of :func:`layerwise` are split into ``k`` runs whose sizes differ by at most one; each
    group is named ``"first_layer..last_layer"``.
    """
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"grouped: k must be a positive integer, got {k!r}")
    layers = layerwise(model)
    if k > len(layers):
        raise ValueError(f"grouped: k={k} exceeds the number of layers with parameters ({len(layers)})")
    size, extra = divmod(len(layers), k)
    groups: List[Dict[str, Any]] = []
    start = 0
    for i in range(k):
        stop = start + size + (1 if i < extra else 0)
        run = layers[start:stop]
        name = run[0]["name"] if len(run) == 1 else f"{run[0]['name']}..{run[-1]['name']}"
        groups.append({"params": [p for g in run for p in g["params"]], "name": name, **group_options})
        start = stop
    return groups


def share(param_groups: Iterable[Mapping[str, Any]], hyper_group: Hashable = "global") -> List[Dict[str, Any]]:
    """Copies of ``param_groups`` in one hyper group: one tuned value of each name over all of them.

    The global preset over param groups that differ in what they do not tune, such as nanoGPT's decay /
    no-decay split (one lr, one weight decay tuned where it is not 0)::

        groups = [dict(params=decay, weight_decay=0.1), dict(params=no_decay, weight_decay=0.0)]
        opt = ohotorch.OHOAdamW(ohotorch.share(groups), lr=6e-4, tune=("lr_scale", "weight_decay"))

    Each group becomes ``{**group, "hyper_group": hyper_group}``. The groups that tune a name must start
    from the same value of it (the optimizer refuses them otherwise). For one hyper group per layer
    over such a split, give each layer's groups the layer's label instead (``hyper_group=name``).
    """
    groups = []
    for group in param_groups:
        if not isinstance(group, Mapping):
            raise TypeError(f"share: expected param groups (dicts with 'params'), got {type(group).__name__}")
        groups.append({**group, HYPER_GROUP: hyper_group})
    if not groups:
        raise ValueError("share: no param groups")
    return groups


def split_decay(param_groups: Iterable[Mapping[str, Any]],
                no_decay: Callable[[Tensor], bool] = lambda p: p.dim() < 2) -> List[Dict[str, Any]]:
    """Split each param group into its decayed parameters and the others (``weight_decay=0``), both in
    the group's hyper group: one tuned lr over the two, a weight decay tuned where it is not 0.

    nanoGPT's split (biases and norm gains, ``p.dim() < 2``, are not decayed) with the two presets::

        OHOAdamW(split_decay([dict(params=model.parameters(), weight_decay=0.1)]), ...)  # global
        OHOAdamW(split_decay(layerwise(model, weight_decay=0.1)), ...)                   # layerwise

    The hyper group of a split group is its ``"hyper_group"`` label, else its ``"name"``, else its
    position; an empty half is left out.
    """
    groups: List[Dict[str, Any]] = []
    for index, group in enumerate(param_groups):
        if not isinstance(group, Mapping) or "params" not in group:
            raise TypeError(f"split_decay: expected param groups (dicts with 'params'), got {group!r:.80}")
        params = [group["params"]] if isinstance(group["params"], Tensor) else list(group["params"])
        label = group.get(HYPER_GROUP, group.get("name", str(index)))
        decayed = [p for p in params if not no_decay(p)]
        kept = [p for p in params if no_decay(p)]
        if decayed:
            groups.append({**group, "params": decayed, HYPER_GROUP: label})
        if kept:
            groups.append({**group, "params": kept, "weight_decay": 0.0, HYPER_GROUP: label})
            if "tune" in group:  # a tune of its own would ask for weight decay from 0
                tune = (group["tune"],) if isinstance(group["tune"], str) else tuple(group["tune"])
                groups[-1]["tune"] = tuple(name for name in tune if name != "weight_decay")
    if not groups:
        raise ValueError("split_decay: no parameters")
    return groups


def cycle(loader: Iterable[T]) -> Iterator[T]:
    """Iterate over ``loader`` forever, starting a fresh pass (a fresh shuffle) each time it ends.

    Unlike ``itertools.cycle`` it keeps no copy of the batches, so a shuffling DataLoader reshuffles.
    ``loader`` must be re-iterable (a DataLoader, a list): a one-pass iterator such as a generator is
    refused at once with a TypeError (it would be exhausted after one pass; wrap it in ``list`` or use
    ``itertools.cycle``, which keeps a copy). Raises ValueError if a pass yields nothing.
    """
    if isinstance(loader, abc.Iterator):
        raise TypeError(
            f"cycle: the loader must be re-iterable (a DataLoader, a list), got a one-pass iterator "
            f"({type(loader).__name__}) that would be exhausted after one pass; pass the DataLoader itself, "
            "or list(...) / itertools.cycle(...) to keep a copy of the batches"
        )
    return _cycle(loader)


def _cycle(loader: Iterable[T]) -> Iterator[T]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("cycle: the loader yielded no batch")
