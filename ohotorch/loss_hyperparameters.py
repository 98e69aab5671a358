r"""Hyperparameters inside the training loss: auxiliary-task weights, per-layer L2 strengths, ...

A **loss hyperparameter** :math:`\rho` is a scalar (or small tensor, each element its own scalar) that
the training closure reads, e.g. :math:`J(w, \rho) = L_{main}(w) + \rho\,L_{aux}(w)`. It is declared on
the optimizer and read with ``.value`` inside the closure::

    rho = opt.hyperparameter("aux_weight", 0.1, bounds=(0.0, 10.0))

    def closure():
        opt.zero_grad()
        loss = main_loss(model, x, y) + rho.value * aux_loss(model, x, z)
        loss.backward()
        return loss

and is tuned online with the same influence, horizon, meta-update and state_dict as lr and weight decay.

**Tangent.** :math:`\rho` enters the update only through the gradient :math:`g_t = \nabla_w J(w_t, \rho)`,
so its tangent :math:`\dot w = dw/d\rho` follows the inner rule's recursion (:mod:`ohotorch.sgd_tangents`,
:mod:`ohotorch.adam_tangents`) with no direct term of its own in the rule and

.. math:: \dot g_t = H_t \dot w_t + \partial g_t/\partial\rho .

**Finite differences, one evaluation.** The directional derivative of :math:`g(w, \rho)` along
:math:`(\dot w, 1)` is exactly that sum:

.. math::
    \frac{g(w + \epsilon \dot w,\ \rho + \epsilon) - g(w, \rho)}{\epsilon}
    = H \dot w + \partial g/\partial \rho + O(\epsilon)

(central differences, :math:`(g(w + \epsilon\dot w, \rho + \epsilon) - g(w - \epsilon\dot w, \rho - \epsilon))
/ 2\epsilon`, are :math:`O(\epsilon^2)`). So the re-evaluation that gives the Hessian-vector product of
the tangent gives the direct term too, at no extra cost: the closure only has to see :math:`\rho+\epsilon`
while the weights are perturbed. The step is
:math:`\epsilon = \min(r (1 + \lVert w\rVert)/\lVert\dot w\rVert,\ r (1 + |\rho|))`, so that neither the
weights nor :math:`\rho` move by more than the relative step ``r`` of the optimizer (``fd_rel``), rounded so
that :math:`\rho + \epsilon` is exact in the gradients' dtype.

**Cost.** One gradient evaluation per loss hyperparameter element per step (two with ``hvp="central"``),
*whatever the horizon*: with the greedy default (``discount=0``, tangents zero before each update) lr and
weight decay need no evaluation at all, but :math:`\partial g/\partial\rho` still does (at
:math:`(w, \rho + \epsilon)`). With a longer horizon it is the tangent's own HVP evaluation, shared. Memory:
one tangent (plus its companions :math:`\dot b` or :math:`\dot m, \dot v`, kept for every tangent once a
loss hyperparameter is declared, even with the greedy horizon) per element, as for any tuned scalar.

**The validation loss** must not read a loss hyperparameter: its hypergradient is
:math:`\langle\nabla L_{val}(w_{t+1}), \dot w_{t+1}\rangle`, which assumes :math:`L_{val}` depends on
:math:`\rho` only through the weights. A validation objective that read :math:`\rho` directly (an L2
penalty, say) would be minimised by driving :math:`\rho` itself down, not by better weights. Reading
``.value`` inside ``val_closure`` raises a ``RuntimeError``; so does reading it outside any closure (use
:attr:`LossHyperparameter.current` to log it).

**Meta-update.** Each element is one hyper variable of :func:`ohotorch.meta.meta_update_` (the
optimizer's ``meta_optimizer``, ``space``, Adam constants; its own ``bounds`` and ``meta_lr``), updated
together with the param groups' values, all or nothing. In ``space="log"`` the map is
:math:`\rho = e^\phi - c` (relative steps), which needs ``bounds[0] >= 0``.

**State.** ``state_dict()["oho"]["loss_hyperparameters"]`` holds every value and its meta-optimizer state;
a checkpoint without it (an older one) loads and keeps the declared values.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import meta
from .influence import TangentKey, as_dtype

__all__ = ["LossHyperparameter", "LossHyperparameters", "PREFIX"]

# Tangent keys of loss hyperparameters are (None, PREFIX + name[index]): never a param group's name.
PREFIX = "loss:"


class LossHyperparameter:
    """One declared loss hyperparameter (see the module docstring). Made by ``opt.hyperparameter``.

    ``value``: the value to use inside the training closure (a float64 tensor of the declared shape;
    during a finite-difference evaluation, the perturbed value). ``current``: the committed value, readable
    anywhere. ``grad``: the last hypergradient dL_val/d(value) (``None`` before the first hyper-step).
    """

    def __init__(self, name: str, value: Tensor, bounds: Tuple[float, float], meta_lr: float) -> None:
        self.name = name
        self._value = value
        self.bounds = bounds
        self.meta_lr = meta_lr
        self.grad: Optional[Tensor] = None
        self._phase: Optional[str] = None  # None: outside any closure; "train"; "val"
        self._shift: Optional[Tuple[int, Union[float, Tensor]]] = None  # (flat element, amount)

    @property
    def shape(self) -> torch.Size:
        return self._value.shape

    def numel(self) -> int:
        return self._value.numel()

    @property
    def current(self) -> Tensor:
        """The committed value (a copy), readable anywhere (for logging)."""
        return self._value.clone()

    def item(self) -> float:
        """The committed value of a scalar hyperparameter as a float."""
        return self._value.item()

    @property
    def value(self) -> Tensor:
        """The value the training closure must use (perturbed during a finite-difference evaluation)."""
        if self._phase is None:
            raise RuntimeError(
                f"loss hyperparameter {self.name!r}: .value was read outside the training closure. Read it only "
                "inside the closure passed to step() (the optimizer perturbs it there for the finite "
                f"differences); to log it, use {self.name}.current or .item()")
        if self._phase == "val":
            raise RuntimeError(
                f"loss hyperparameter {self.name!r}: .value was read inside val_closure. The validation loss "
                "must not depend on a tuned loss hyperparameter (its hypergradient would miss that direct "
                "term, and tuning would drive the hyperparameter to shrink the validation loss itself); compute "
                "the validation loss without it")
        if self._shift is None:
            return self._value.clone()
        element, amount = self._shift
        value = self._value.clone()
        flat = value.view(-1)
        flat[element] = flat[element] + amount
        return value

    def keys(self) -> List[str]:
        """The names of its elements' tangents: ``loss:name`` (scalar) or ``loss:name[i]``."""
        if self._value.dim() == 0:
            return [PREFIX + self.name]
        return [f"{PREFIX}{self.name}[{i}]" for i in range(self.numel())]

    def __repr__(self) -> str:
        return f"LossHyperparameter({self.name!r}, {self._value.tolist()!r}, bounds={self.bounds})"


def _check_value(name: str, value: Any) -> Tensor:
    if isinstance(value, bool):
        raise TypeError(f"loss hyperparameter {name!r}: the value must be a number or a float tensor, got a bool")
    if isinstance(value, (int, float)):
        tensor = torch.tensor(float(value), dtype=torch.float64)
    elif isinstance(value, Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"loss hyperparameter {name!r}: a real tensor is needed, got {value.dtype}")
        if value.requires_grad:
            raise ValueError(f"loss hyperparameter {name!r}: the initial value must not require grad "
                             "(the optimizer owns it); pass value.detach()")
        tensor = value.detach().to(device="cpu", dtype=torch.float64).clone()
    else:
        raise TypeError(f"loss hyperparameter {name!r}: the value must be a number or a tensor, got "
                        f"{type(value).__name__}")
    if tensor.numel() == 0:
        raise ValueError(f"loss hyperparameter {name!r}: an empty tensor has nothing to tune")
    if tensor.numel() > 1024:
        raise ValueError(f"loss hyperparameter {name!r}: {tensor.numel()} elements; each element costs one "
                         "gradient evaluation and one tangent of the parameters' size a step, so at most 1024")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"loss hyperparameter {name!r}: non-finite initial value {tensor.tolist()}")
    return tensor


class LossHyperparameters:
    """The declared loss hyperparameters of one optimizer, their tangent keys and their meta state."""

    def __init__(self) -> None:
        self.items: List[LossHyperparameter] = []
        # "loss:name[i]" -> the meta-optimizer state of that element (Adam's m, v, t, "written")
        self.meta_state: Dict[str, Dict[str, float]] = {}

    def __bool__(self) -> bool:
        return bool(self.items)

    # ------------------------------------------------------------------ declaration
    def declare(self, name: Any, value: Any, *, bounds: Any, meta_lr: Optional[float],
                options: Any, reserved: Sequence[str]) -> LossHyperparameter:
        """Validate and add one loss hyperparameter (``options``: the optimizer's Options)."""
        if not isinstance(name, str) or not name or not name.replace("_", "a").replace(".", "a").isalnum():
            raise ValueError(f"Invalid loss hyperparameter name {name!r}: a non-empty identifier (letters, digits, "
                             "'_', '.')")
        if name in reserved:
            raise ValueError(f"Invalid loss hyperparameter name {name!r}: it names an optimizer hyperparameter "
                             f"({', '.join(reserved)})")
        if any(item.name == name for item in self.items):
            raise ValueError(f"A loss hyperparameter named {name!r} is already declared on this optimizer")
        tensor = _check_value(name, value)
        try:
            low, high = (float(b) for b in bounds)
        except (TypeError, ValueError):
            raise TypeError(f"loss hyperparameter {name!r}: bounds must be a pair (low, high), got {bounds!r}") from None
        if math.isnan(low) or math.isnan(high) or low > high:
            raise ValueError(f"loss hyperparameter {name!r}: invalid bounds ({low}, {high})")
        if options.space == "log" and low < 0.0:
            raise ValueError(f"loss hyperparameter {name!r}: bounds ({low}, {high}) reach below 0, which the "
                             "log-space meta-update (space='log') cannot represent; use bounds with low >= 0 or "
                             "an optimizer with space='raw'")
        if bool((tensor < low).any()) or bool((tensor > high).any()):
            raise ValueError(f"The initial value {tensor.tolist()} of loss hyperparameter {name!r} lies outside "
                             f"its bounds [{low}, {high}]")
        if meta_lr is None:
            meta_lr = default_meta_lr(options)
            if meta_lr is None:
                raise ValueError(f"loss hyperparameter {name!r} needs a meta_lr: with meta_optimizer="
                                 f"{options.meta_optimizer!r}, space={options.space!r} there is no default")
        if isinstance(meta_lr, bool) or not isinstance(meta_lr, (int, float)) or not (
                math.isfinite(meta_lr) and meta_lr >= 0.0):
            raise ValueError(f"loss hyperparameter {name!r}: invalid meta_lr {meta_lr!r} (a finite number >= 0)")
        item = LossHyperparameter(name, tensor, (low, high), float(meta_lr))
        self.items.append(item)
        return item

    # ------------------------------------------------------------------ tangents
    def keys(self) -> List[TangentKey]:
        """The tangent keys, one per element, appended after the param groups' keys."""
        return [(None, key) for item in self.items for key in item.keys()]

    def elements(self) -> List[Tuple[LossHyperparameter, int]]:
        """(hyperparameter, flat element) per key, in the order of :meth:`keys`."""
        return [(item, i) for item in self.items for i in range(item.numel())]

    @contextlib.contextmanager
    def reading(self, phase: str) -> Iterator[None]:
        """Let the closure read ``.value`` (``phase="train"``) or refuse it (``"val"``)."""
        previous = [item._phase for item in self.items]
        for item in self.items:
            item._phase = phase
        try:
            yield
        finally:
            for item, phase_before in zip(self.items, previous):
                item._phase = phase_before

    def wrap(self, closure: Callable[[], Any], phase: str = "train") -> Callable[[], Any]:
        """``closure`` run with ``.value`` readable (``"train"``) or refused (``"val"``)."""
        def wrapped() -> Any:
            with self.reading(phase):
                return closure()
        return wrapped

    def shift(self, element_index: int) -> Callable[[Union[float, Tensor]], Any]:
        """The finite-difference hook of element ``element_index``: ``shift(amount)`` is a context in which
        that element reads ``value + amount``."""
        item, element = self.elements()[element_index]

        @contextlib.contextmanager
        def shifted(amount: Union[float, Tensor]) -> Iterator[None]:
            item._shift = (element, amount)
            try:
                yield
            finally:
                item._shift = None

        return shifted

    def step_size(self, element_index: int, rel: float, weights_eps: Optional[float],
                  dtype: torch.dtype) -> float:
        r""":math:`\epsilon = \min(\epsilon_w, r(1 + |\rho|))`, rounded so that :math:`\rho + \epsilon` is exact
        in ``dtype`` (the gradients' precision): the difference the closure sees is the one divided by."""
        item, element = self.elements()[element_index]
        rho = float(item._value.view(-1)[element])
        eps = rel * (1.0 + abs(rho))
        if weights_eps is not None:
            eps = min(eps, weights_eps)
        if dtype.is_floating_point and torch.finfo(dtype).bits < 64:
            base = torch.tensor(rho, dtype=dtype)
            eps = float(torch.tensor(float(base) + eps, dtype=dtype).double() - base.double())
        return eps

    def contract(self, state: Mapping[Tensor, Mapping[str, Any]], params: Sequence[Tensor], first: int,
                 val_grads: Mapping[int, Optional[Tensor]]) -> Optional[Tensor]:
        r""":math:`\langle \nabla L_{val}, \dot w_k\rangle` summed over every parameter, for the keys
        ``first, first + 1, ...`` (the loss hyperparameters' rows of ``tangent_w``); ``None`` without any."""
        n = len(self.keys())
        total: Optional[Tensor] = None
        for p in params:
            grad = val_grads.get(id(p))
            tangents = state.get(p, {}).get("tangent_w")
            if grad is None or tangents is None:
                continue
            rows = tangents[first:first + n]  # a view: the rows are contiguous along the first axis
            if rows.is_complex():
                rows, grad = torch.view_as_real(rows), torch.view_as_real(as_dtype(grad, tangents.dtype))
            value = torch.mv(rows.reshape(n, -1), as_dtype(grad, rows.dtype).reshape(-1)).double()
            total = value if total is None else total + value.to(total.device)
        return total

    def set_hypergradients(self, values: Tensor) -> None:
        """Store each hyperparameter's hypergradient in its ``grad`` (shape of the value)."""
        offset = 0
        for item in self.items:
            n = item.numel()
            item.grad = values[offset:offset + n].detach().cpu().reshape(item.shape).clone()
            offset += n

    # ------------------------------------------------------------------ meta-update
    def meta_entries(self, n_groups: int) -> Tuple[List[Dict[str, float]], Dict[str, Tuple[float, float]],
                                                   Dict[str, float], Dict[str, Dict[str, float]]]:
        """The elements as extra "param groups" for :func:`ohotorch.meta.meta_update_` (group index
        ``n_groups + k`` holds element k under its key name), with their bounds, meta learning rates and
        meta states (keyed as meta_update_ keys them)."""
        proxies, bounds, meta_lrs, states = [], {}, {}, {}
        for k, ((item, element), (_, key)) in enumerate(zip(self.elements(), self.keys())):
            proxies.append({key: float(item._value.view(-1)[element])})
            bounds[key] = item.bounds
            meta_lrs[key] = item.meta_lr
            if key in self.meta_state:
                states[f"{n_groups + k}/{key}"] = dict(self.meta_state[key])
        return proxies, bounds, meta_lrs, states

    def commit_meta(self, proxies: Sequence[Mapping[str, float]], states: Mapping[str, Dict[str, float]],
                    n_groups: int) -> None:
        """Write the values and meta states :func:`ohotorch.meta.meta_update_` committed."""
        for k, ((item, element), (_, key)) in enumerate(zip(self.elements(), self.keys())):
            item._value.view(-1)[element] = proxies[k][key]
            saved = states.get(f"{n_groups + k}/{key}")
            if saved is not None:
                self.meta_state[key] = dict(saved)

    # ------------------------------------------------------------------ state
    def to_state(self) -> Dict[str, Any]:
        return {"values": {item.name: item._value.tolist() for item in self.items},
                "meta_state": {key: dict(state) for key, state in self.meta_state.items()}}

    def check_state(self, saved: Optional[Mapping[str, Any]], saved_keys: Optional[Sequence[Sequence[Any]]]) -> None:
        """Refuse, before anything changes, a checkpoint whose loss hyperparameters do not match these."""
        names = [item.name for item in self.items]
        values = (saved or {}).get("values", {})
        unknown = [name for name in values if name not in names]
        if unknown:
            raise ValueError(f"load_state_dict: the checkpoint has loss hyperparameters {unknown} that are not "
                             "declared on this optimizer; declare them (opt.hyperparameter) before loading")
        for item in self.items:
            if item.name in values and torch.tensor(values[item.name]).shape != item.shape:
                raise ValueError(f"load_state_dict: loss hyperparameter {item.name!r} has shape "
                                 f"{tuple(torch.tensor(values[item.name]).shape)} in the checkpoint, "
                                 f"{tuple(item.shape)} here")
        if saved_keys is not None:
            saved_loss = [key[1] for key in saved_keys if isinstance(key[1], str) and key[1].startswith(PREFIX)]
            if saved_loss != [key for _, key in self.keys()]:
                raise ValueError(f"load_state_dict: the checkpoint's influence holds tangents for the loss "
                                 f"hyperparameters {saved_loss}, this optimizer declares {[k for _, k in self.keys()]}; "
                                 "declare the same ones (same order) before loading")

    def load_state(self, saved: Optional[Mapping[str, Any]]) -> None:
        if saved is None:
            return  # an older checkpoint: the declared values stand
        for item in self.items:
            if item.name in saved.get("values", {}):
                item._value.copy_(torch.tensor(saved["values"][item.name], dtype=torch.float64))
        self.meta_state = {key: dict(state) for key, state in saved.get("meta_state", {}).items()}


def default_meta_lr(options: Any) -> Optional[float]:
    """The meta learning rate of a loss hyperparameter declared without one: the optimizer's, when it gives
    every hyperparameter the same (a float, or the default), else the (meta_optimizer, space) default."""
    values = set(options.meta_lr.values())
    if len(values) == 1 and len(options.meta_lr) == len(meta.HYPERPARAMETERS):
        return values.pop()
    return meta.DEFAULT_META_LR.get((options.meta_optimizer, options.space))
