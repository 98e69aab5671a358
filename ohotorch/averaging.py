r"""The averaged target (``average=p``): tune the hyperparameters for the validation loss of an average
of the iterates, and keep that average as the model.

Both horizons tune for the validation loss of the current weights :math:`w_t`. Where a large lr pays off
only after annealing (data-rich tasks), the noise a large lr adds hurts :math:`w_t` at every moment, so
the hypergradients drive the lr down. An average of the recent iterates removes most of that noise, as
annealing does, without knowing when training ends. With ``average=p`` the optimizer keeps a
polynomial-decay average of the weights and of their influence,

.. math::
    \bar w_{t} = (1 - a_t)\,\bar w_{t-1} + a_t\,w_{t},\qquad
    \dot{\bar w}_{t} = (1 - a_t)\,\dot{\bar w}_{t-1} + a_t\,\dot w_{t},\qquad
    a_t = \min\Bigl(1, \frac{1 + p}{t + p}\Bigr),

with :math:`t` the number of steps taken (:math:`a_1 = 1`, so :math:`\bar w_1 = w_1` whatever
:math:`\bar w_0`; ``p = 0`` is the uniform average of all iterates; iterate :math:`s` weighs about
:math:`s^p` in :math:`\bar w_t`, so the average spans roughly the last :math:`1/(1+p)` of the run). The
hypergradient becomes

.. math::
    \frac{\partial L_{val}(\bar w_t)}{\partial\theta} = \langle \nabla L_{val}(\bar w_t), \dot{\bar w}_t\rangle ,

one validation gradient, evaluated at :math:`\bar w_t` (the parameters hold :math:`\bar w_t` while the
validation closure runs and are restored bit for bit afterwards). Exact: the average is linear in the
iterates, so its derivative is the average of theirs, whatever horizon defines :math:`\dot w` (with the
greedy horizon, :math:`\dot w_t` is the one-step direct term and :math:`\dot{\bar w}_t` the average of
those).

The model to evaluate and keep is :math:`\bar w` (as with schedule-free optimizers): ``opt.averaged()``
puts it into the parameters. BatchNorm running statistics belong to :math:`w`; recompute them for
:math:`\bar w` before evaluating (see :meth:`ohotorch.OHO.averaged`).

**State** (per parameter, in ``optimizer.state[p]``, saved by ``state_dict``): ``"average_w"``
(:math:`\bar w`, in the parameter's dtype, float32 for 16-bit parameters) and, while tuning,
``"average_tangent_w"`` (:math:`\dot{\bar w}`, the shape and dtype of ``"tangent_w"``). Both are created
at the first step from the iterate it makes (:math:`a_1 = 1`); a run that turns averaging on later, or
loads a checkpoint without averages, starts them at the iterate of its next step and that iterate's
influence (until then, ``averaged()`` and the hypergradient use the current weights and influence). A parameter
whose tangent appears after the first step (its first gradient) starts its averaged tangent at zero,
the value its tangent had until then. When a tangent is reset for being non-finite, its average is
reset to zero with it.

**Cost.** Memory: one more copy of the weights and of the K weight tangents. Time: one lerp over the
weights and the K tangents per step (``torch._foreach_lerp_`` with a Python float weight on the foreach
path: :math:`a_t` depends only on the host's step counter, so no synchronisation), and per hyper-step one
copy of the weights aside, one of the average in and one back (the copy aside lives in the memory the
Hessian-vector products use for theirs; with the greedy horizon it is one more copy of the weights).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Dict, Iterator, List, Mapping, MutableMapping, Optional, Sequence

import torch
from torch import Tensor

from .finite_differences import BufferSnapshot
from .influence import slices_at

__all__ = ["check_power", "weight", "lerp_", "update_", "init_state_", "zero_tangent_", "tangent_view",
           "swapped", "refuse_inside_averaged"]

AVERAGE = "average_w"
AVERAGE_TANGENT = "average_tangent_w"
# State keys whose dtype load_state_dict keeps (torch.optim would cast them to the parameter's).
KEEP_DTYPE = (AVERAGE, AVERAGE_TANGENT)

_AVERAGE_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


def check_power(power: Any) -> Optional[float]:
    """``average`` validated: ``None`` (off) or a finite float ``p >= 0``."""
    if power is None:
        return None
    if isinstance(power, Tensor):
        raise TypeError("average must be None or a Python number p >= 0, got a Tensor")
    if isinstance(power, bool) or not isinstance(power, (int, float)):
        raise TypeError(f"average must be None or a number p >= 0 (the power of the averaging weights), got {power!r}")
    value = float(power)
    if not (math.isfinite(value) and value >= 0.0):
        raise ValueError(f"Invalid average: {power!r} (the power p of a_t = (1 + p) / (t + p): a finite number "
                         ">= 0, or None for no averaging)")
    return value


def weight(step: int, power: float) -> float:
    r""":math:`a_t = \min(1, (1 + p) / (t + p))` for the ``step``-th step (``step >= 1``)."""
    return min(1.0, (1.0 + power) / (step + power))


def lerp_(averages: Sequence[Tensor], iterates: Sequence[Tensor], a: float, *, foreach: bool) -> None:
    """``average += a * (iterate - average)`` for each pair (``torch.lerp``; iterates cast to the averages'
    dtypes). ``foreach``: one ``torch._foreach_lerp_``, the same numbers as the per-tensor loop."""
    if not averages:
        return
    iterates = [x if x.dtype == m.dtype else x.to(m.dtype) for m, x in zip(averages, iterates)]
    if foreach:
        torch._foreach_lerp_(list(averages), iterates, a)
    else:
        for m, x in zip(averages, iterates):
            m.lerp_(x, a)


def _average_dtype(p: Tensor) -> torch.dtype:
    return p.dtype if p.dtype in _AVERAGE_DTYPES else torch.float32


def init_state_(state: MutableMapping[str, Any], p: Tensor) -> None:
    """Start the averages of ``p`` at its current value and influence, where missing."""
    if AVERAGE not in state:
        state[AVERAGE] = p.detach().to(_average_dtype(p), copy=True)
        if "tangent_w" in state:
            state[AVERAGE_TANGENT] = state["tangent_w"].clone()
    elif "tangent_w" in state and AVERAGE_TANGENT not in state:
        state[AVERAGE_TANGENT] = torch.zeros_like(state["tangent_w"])  # the tangent was zero until now


@torch.no_grad()
def update_(params: Sequence[Tensor], state: Mapping[Tensor, MutableMapping[str, Any]], step: int,
            power: float, *, foreach: bool) -> None:
    """Fold the iterate of step ``step`` (the parameters now) and its tangents into the averages.

    Missing averages are created first (:func:`init_state_`), so at ``step == 1`` (``a_1 = 1``) the
    averages become the iterate exactly.
    """
    a = weight(step, power)
    averages: List[Tensor] = []
    iterates: List[Tensor] = []
    tangent_averages: List[Tensor] = []
    tangents: List[Tensor] = []
    for p in params:
        s = state[p]
        init_state_(s, p)
        averages.append(s[AVERAGE])
        iterates.append(p.detach())
        if "tangent_w" in s:
            tangent_averages.append(s[AVERAGE_TANGENT])
            tangents.append(s["tangent_w"])
    lerp_(averages, iterates, a, foreach=foreach)
    lerp_(tangent_averages, tangents, a, foreach=foreach)


def zero_tangent_(states: Sequence[Mapping[str, Any]], index: int) -> None:
    """Zero the averaged tangent ``index`` (with the tangent's reset for a non-finite value)."""
    slices = slices_at([s[AVERAGE_TANGENT] for s in states if AVERAGE_TANGENT in s], index)
    if slices:
        torch._foreach_zero_(slices)


def tangent_view(state: Mapping[Tensor, Mapping[str, Any]]) -> Dict[Tensor, Dict[str, Tensor]]:
    r"""``{p: {"tangent_w": ...}}`` holding :math:`\dot{\bar w}` (``tangent_w`` where no average exists yet),
    for the hypergradient contraction."""
    view: Dict[Tensor, Dict[str, Tensor]] = {}
    for p, s in state.items():
        tangent = s.get(AVERAGE_TANGENT) if AVERAGE in s else s.get("tangent_w")
        if tangent is not None:
            view[p] = {"tangent_w": tangent}
    return view


@contextlib.contextmanager
def swapped(params: Sequence[Tensor], state: Mapping[Tensor, Mapping[str, Any]],
            storage: Optional[List[Tensor]] = None) -> Iterator[None]:
    r"""The parameters hold :math:`\bar w` inside, and their own values, bit for bit, afterwards (also on
    an exception). A parameter without an average yet keeps its value (the average starts there).

    ``storage``: a list the caller keeps that lends the copy of the weights its memory (see
    :class:`ohotorch.finite_differences.BufferSnapshot`)."""
    params = [p for p in params if AVERAGE in state.get(p, {})]
    with torch.no_grad():
        saved = BufferSnapshot(params, storage)
        try:
            for p in params:
                p.copy_(state[p][AVERAGE])
        except BaseException:
            saved.restore()
            raise
    try:
        yield
    finally:
        with torch.no_grad():
            saved.restore()


def refuse_inside_averaged(opt: Any) -> None:
    """Refuse ``step()`` inside ``opt.averaged()`` (before anything changes)."""
    if opt.__dict__.get("_averaged_depth", 0):
        raise RuntimeError(f"{type(opt).__name__}.step() inside averaged(): the parameters hold the averaged "
                           "weights there, the step would start from them and the exit would undo it. Step "
                           "outside the with block.")
