"""Hyper groups built from a model, and a validation-loader helper.

A hyper group is simply a torch param group: every param group of :class:`ohotorch.OHO` carries its own
lr / weight decay / momentum and its own ``tune`` set. The paper's three granularities:

* global: ``OHO(model.parameters(), ...)`` - one group, one set of hyperparameters;
* layerwise: ``OHO(ohotorch.layerwise(model), ...)`` - one group per module that owns parameters
  (a layer's weight and bias share one set);
* ``OHO(ohotorch.grouped(model, k), ...)`` - k contiguous runs of layers, in module order, as even as
  possible (k = 1 is global, k = number of layers is layerwise).
"""
from __future__ import annotations

from collections import abc
from typing import Any, Dict, Iterable, Iterator, List, TypeVar

from torch import nn

__all__ = ["layerwise", "grouped", "cycle"]

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
