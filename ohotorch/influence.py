r"""The influence: layout, norms, scaling and the hypergradient contraction.

Words used throughout the package: a **tangent** is one tensor :math:`\dot w = dw/d\theta` (with its
companions :math:`\dot b` or :math:`\dot m, \dot v`) for one scalar :math:`\theta`; it is stored per
parameter in ``optimizer.state[p]["tangent_w"][k]`` (``"tangent_b"``, ``"tangent_m"``, ``"tangent_v"``).
The **influence** is all of them together: the forward-mode state that says how the weights depend on
every tuned hyperparameter.

**Layout.** Tangent ``k`` is named by a key ``(owner, name)``: ``owner`` the index of the param group
whose ``name`` it differentiates (``influence="exact"``: one tangent per (group, tuned name), each
spanning every parameter; param groups that share a ``"hyper_group"`` label share one per name, owned by
the first, see :mod:`ohotorch.hyper_groups`), or ``None`` (``"blockwise"``: one tangent per tuned name,
each hyper group reading its own block). With the greedy horizon (discount 0) no Hessian-vector product
couples groups, so both modes give the same hypergradients and exact mode takes the cheaper blockwise
layout.

**Hypergradient.** With :math:`v = \nabla L_{val}(w)` split by group, the contraction
:math:`h[g, k] = \langle v_g, \dot w_{k,g}\rangle` gives :math:`\partial L_{val}/\partial\theta =
\sum_g h[g, k]` for an exact key and :math:`h[g, k]` for group ``g`` of a blockwise key (summed over the
param groups of its hyper group where several share one, :func:`ohotorch.hyper_groups.read_out`).
"""
from __future__ import annotations

import weakref
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import hyper_groups, meta

__all__ = ["TangentKey", "tangent_keys", "key_name", "is_direct", "ensure_tangents", "tangent_tensors",
           "zero_tangents_", "scale_tangents_", "tangent_norms", "tangent_norms_tensor", "zero_tangent_", "contract",
           "contract_multi_tensor"]

TangentKey = Tuple[Optional[int], str]

_TANGENT_DTYPES = (torch.float32, torch.float64, torch.complex64, torch.complex128)


class _PerTensorCache:
    """Values derived from a tensor, keyed by the tensor's identity, dropped when the tensor dies.

    A plain dict by ``id`` with a weak reference to check the key: a lookup is one dict access and one
    call (``torch.utils.weak.WeakIdKeyDictionary`` builds a reference object per lookup, several hundred
    times a step).
    """

    def __init__(self) -> None:
        self._entries: Dict[int, Tuple[Any, Any, Any]] = {}  # id -> (weak reference, value, extra)

    def get(self, t: Tensor) -> Any:
        entry = self._entries.get(id(t))
        if entry is not None and entry[0]() is t:
            return entry[1]
        return None

    def put(self, t: Tensor, value: Any, extra: Any = None) -> None:
        key, entries = id(t), self._entries

        def forget(ref: Any) -> None:  # the tensor died: drop its entry unless the id was reused since
            entry = entries.get(key)
            if entry is not None and entry[0] is ref:
                del entries[key]

        entries[key] = (weakref.ref(t, forget), value, extra)

    def __len__(self) -> int:
        return len(self._entries)


# tangent tensor -> its K slices, made once: indexing t[k] is one dispatched op per parameter and
# tangent, several times a step (norms, perturbations, updates). The slices alias the tensor's storage
# without holding the tensor itself (set_, no autograd view), so an entry dies with its tensor.
_SLICES = _PerTensorCache()


def tangent_slices(t: Tensor) -> Tuple[Tensor, ...]:
    """``(t[0], ..., t[K-1])``, made once per tensor (same values and memory as indexing); made again
    when ``t`` no longer starts where it did (``set_`` onto other memory)."""
    entry = _SLICES._entries.get(id(t))
    if entry is not None and entry[0]() is t and entry[2] == t.data_ptr():
        return entry[1]
    with torch.no_grad():
        stride, offset = t.stride(), t.storage_offset()
        slices = tuple(torch.empty(0, dtype=t.dtype, device=t.device).set_(
            t.untyped_storage(), offset + k * stride[0], t.shape[1:], stride[1:]) for k in range(t.shape[0]))
    _SLICES.put(t, slices, t.data_ptr())  # where the memory they alias starts
    return slices


_FLAT = _PerTensorCache()


def tangent_matrix(t: Tensor) -> Tensor:
    """``t.view(K, -1)`` for a contiguous tangent tensor, made once per tensor (as :func:`tangent_slices`)."""
    flat = _FLAT.get(t)
    if flat is None or flat.data_ptr() != t.data_ptr():
        if not t.is_contiguous():
            return t.reshape(t.shape[0], -1)
        with torch.no_grad():
            flat = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                t.untyped_storage(), t.storage_offset(), (t.shape[0], t[0].numel()), (t[0].numel(), 1))
        _FLAT.put(t, flat)
    return flat


def tangent_slice(t: Tensor, k: int) -> Tensor:
    """``t[k]`` without dispatching an op (see :func:`tangent_slices`)."""
    return tangent_slices(t)[k]


def slices_at(tensors: Sequence[Tensor], k: int) -> List[Tensor]:
    """``[tangent_slice(t, k) for t in tensors]`` in one pass over the cache (the hot loops call this for
    every parameter, several times a step)."""
    entries = _SLICES._entries
    out: List[Tensor] = []
    for t in tensors:
        entry = entries.get(id(t))
        out.append(entry[1][k] if entry is not None and entry[0]() is t and entry[2] == t.data_ptr()
                   else tangent_slices(t)[k])
    return out


def as_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without dispatching an op when it already has that dtype."""
    return t if t.dtype == dtype else t.to(dtype)


def tangent_keys(param_groups: Sequence[Mapping[str, Any]], *, influence: str, discount: float) -> List[TangentKey]:
    """The keys of the tangents, in their order along the first axis of ``state["tangent_w"]``."""
    if influence == "exact" and discount > 0.0:  # one per hyper variable, named by its leader
        owners = hyper_groups.leaders(param_groups)
        return [(index, name) for index, group in enumerate(param_groups) for name in group["tune"]
                if owners[index][name] == index]
    names = {name for group in param_groups for name in group["tune"]}
    return [(None, name) for name in meta.HYPERPARAMETERS if name in names]


def key_name(param_groups: Sequence[Mapping[str, Any]], key: TangentKey) -> str:
    """``"name"`` (blockwise) or ``"group_name/name"`` (exact; ``"label/name"`` for a shared hyper group),
    as diagnostics report it."""
    owner, name = key
    if owner is None:
        return name
    return hyper_groups.variable_name(param_groups, owner, name)


def is_direct(param_groups: Sequence[Mapping[str, Any]], key: TangentKey, group_index: int) -> bool:
    r"""The indicator :math:`[\theta = x]` of tangent ``key`` on the parameters of group ``group_index``."""
    owner, name = key
    if owner is None or owner == group_index:
        return name in param_groups[group_index]["tune"]
    # a member of the hyper variable led by ``owner`` (a shared "hyper_group" label)
    mine = param_groups[group_index].get(hyper_groups.HYPER_GROUP)
    return (mine is not None and mine == param_groups[owner].get(hyper_groups.HYPER_GROUP)
            and name in param_groups[group_index]["tune"])


def ensure_tangents(state: Dict[str, Any], param: Tensor, n_keys: int, companions: Sequence[str]) -> None:
    """Create zero tangents (``tangent_w`` and the ``companions``) for ``param`` where missing.

    Tangents are float32 for 16-bit parameters (the influence keeps a float32 accumulation); a complex
    parameter has complex tangents (the derivatives of its real and imaginary parts).
    """
    if not n_keys:
        return
    if "tangent_w" not in state:
        dtype = param.dtype if param.dtype in _TANGENT_DTYPES else torch.float32
        state["tangent_w"] = torch.zeros((n_keys, *param.shape), dtype=dtype, device=param.device)
    for name in companions:
        if name not in state:
            state[name] = torch.zeros_like(state["tangent_w"])


def tangent_tensors(states: Sequence[Mapping[str, Any]]) -> List[Tensor]:
    """Every tangent tensor (w' and companions, all keys) of the given per-parameter states."""
    return [t for s in states for k, t in s.items() if k.startswith("tangent_")]


def zero_tangents_(states: Sequence[Mapping[str, Any]]) -> None:
    """Zero the influence (``zero_``, not ``mul_(0)``: a NaN must not survive)."""
    tensors = tangent_tensors(states)
    if tensors:
        torch._foreach_zero_(tensors)


def scale_tangents_(states: Sequence[Mapping[str, Any]], gamma: float) -> None:
    """Multiply the influence by the discount ``gamma``."""
    tensors = tangent_tensors(states)
    if tensors:
        torch._foreach_mul_(tensors, gamma)


def zero_tangent_(states: Sequence[Mapping[str, Any]], index: int) -> None:
    """Zero tangent ``index`` (w' and its companions) in every state."""
    slices = slices_at(tangent_tensors(states), index)
    if slices:
        torch._foreach_zero_(slices)


def tangent_norms(pairs: Sequence[Tuple[Tensor, Tensor]], n_keys: int) -> Tuple[List[float], float]:
    """(``||w'_k||`` for every key, ``||w||``) over ``pairs`` of (parameter, its ``tangent_w``), one sync.

    Norms are taken in the tangents' own dtype (no float64 copy of K x parameters), squared and summed
    in float64; a float32 norm that overflows (``||w'|| > ~1e19``) reads as non-finite.
    """
    if not n_keys or not pairs:
        return [0.0] * n_keys, 0.0
    *norms, weight_norm = tangent_norms_tensor(pairs, n_keys).tolist()
    return norms, weight_norm


def tangent_norms_tensor(pairs: Sequence[Tuple[Tensor, Tensor]], n_keys: int) -> Tensor:
    """:func:`tangent_norms` as one float64 tensor ``[||w'_0||, ..., ||w'_{K-1}||, ||w||]`` on the
    parameters' device, read by nobody: no host sync. One ``_foreach_norm`` over all K + 1 lists."""
    tangents = [t for _, t in pairs]
    lists = [slices_at(tangents, k) for k in range(n_keys)] + [[p for p, _ in pairs]]
    flat = torch._foreach_norm([t for ts in lists for t in ts])
    squares = torch.stack(flat).double().pow(2).view(n_keys + 1, len(pairs)).sum(1)
    return squares.sqrt()


# The multi-tensor contraction (CUDA) adds ops per param group that contributes; beyond this many it
# would launch more than the per-parameter form.
MULTI_TENSOR_CONTRACTION_MAX_GROUPS = 4


def contract(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, Mapping[str, Any]],
    keys: Sequence[TangentKey],
    val_grads: Mapping[int, Optional[Tensor]],
    *,
    multi_tensor: Optional[bool] = None,
) -> List[Dict[str, Tensor]]:
    r"""The hypergradients ``[{name: dL_val/dtheta}]`` per group from the validation gradients.

    ``val_grads`` maps ``id(param)`` to its validation gradient (``None``: no contribution). For a
    complex parameter torch's gradient is :math:`\partial L/\partial \Re w + i\,\partial L/\partial \Im w`,
    so the contraction is :math:`\Re\langle \bar v, \dot w\rangle`, the real dot product of the
    (real, imaginary) pairs.

    Two forms: one ``torch.mv`` per parameter (the reference, and the form on the CPU), or
    :func:`contract_multi_tensor`'s few multi-tensor ops for the whole model, taken by default when every
    tensor is on CUDA (where each of the ``torch.mv`` launches costs the host ~10 us), the tangents are
    real and of one dtype, and at most :data:`MULTI_TENSOR_CONTRACTION_MAX_GROUPS` param groups contribute.
    ``multi_tensor`` forces either form.
    """
    n_groups, n_keys = len(param_groups), len(keys)
    pairs: List[List[Tuple[Tensor, Tensor]]] = [[] for _ in range(n_groups)]  # (tangent_w, grad) per group
    for group_index, group in enumerate(param_groups):
        for p in group["params"]:
            grad = val_grads.get(id(p))
            if grad is None:
                continue
            tangents = state.get(p, {}).get("tangent_w")
            if tangents is not None:
                pairs[group_index].append((tangents, grad))
    if multi_tensor is None:
        multi_tensor = _multi_tensor_pays(pairs)
    if multi_tensor and any(pairs):
        per_group = contract_multi_tensor(pairs, n_keys)
    else:
        per_group = _contract_per_parameter(pairs, n_keys)
    return hyper_groups.read_out(param_groups, keys, per_group)


def _multi_tensor_pays(pairs: Sequence[Sequence[Tuple[Tensor, Tensor]]]) -> bool:
    flat = [pair for group in pairs for pair in group]
    if not flat or sum(1 for group in pairs if group) > MULTI_TENSOR_CONTRACTION_MAX_GROUPS:
        return False
    dtype = flat[0][0].dtype
    return all(t.is_cuda and g.is_cuda and t.dtype == dtype and not t.is_complex() for t, g in flat)


def _contract_per_parameter(pairs: Sequence[Sequence[Tuple[Tensor, Tensor]]], n_keys: int) -> List[Tensor]:
    """``[sum_p mv(w'_p, v_p)]`` per group, one ``torch.mv`` per parameter (K x n_p times n_p)."""
    contributions: List[List[Tensor]] = []
    for group in pairs:
        contributions.append([])
        for tangents, grad in group:
            if tangents.is_complex():  # the real dot product of the (re, im) pairs
                tangents, grad = torch.view_as_real(tangents), torch.view_as_real(as_dtype(grad, tangents.dtype))
            flat_grad = as_dtype(grad, tangents.dtype)
            if flat_grad.dim() != 1:  # a vector already needs no view
                flat_grad = flat_grad.view(-1) if flat_grad.is_contiguous() else flat_grad.reshape(-1)
            contributions[-1].append(torch.mv(tangent_matrix(tangents), flat_grad))
    reference = next((c[0] for c in contributions if c), None)
    if reference is None:
        return [torch.zeros(n_keys) for _ in pairs]
    return [torch.stack(c).sum(0) if c else torch.zeros_like(reference) for c in contributions]


def contract_multi_tensor(pairs: Sequence[Sequence[Tuple[Tensor, Tensor]]], n_keys: int) -> List[Tensor]:
    r""":func:`_contract_per_parameter`'s result in ~6 multi-tensor ops per tangent plus 3 per group, whatever
    the number of parameters (real tangents of one dtype, on one device).

    Per tangent k: the products :math:`x = \dot w_k \odot v` (one temporary of the parameters' size), their
    sums of magnitudes :math:`A_p = \sum |x|` and, after ``clamp_min_(0)``, of positive parts :math:`P_p`,
    both accumulated in float64 (``_foreach_norm(ord=1, dtype=float64)``); the dot product is
    :math:`2 P_p - A_p` (positive minus negative parts), summed over each group's parameters in float64 and
    returned in the tangents' dtype. Its rounding differs from ``torch.mv``'s (the same order of magnitude
    for float32 tangents, which it accumulates in float64, and ~1e-16 of :math:`\sum |x|` for float64 ones).
    """
    flat = [pair for group in pairs for pair in group]
    dtype = flat[0][0].dtype
    tangents = [t for t, _ in flat]
    grads = [as_dtype(grad, dtype) for _, grad in flat]
    positive: List[Tensor] = []
    magnitude: List[Tensor] = []
    for k in range(n_keys):
        products = torch._foreach_mul(slices_at(tangents, k), grads)
        magnitude.append(torch.stack(torch._foreach_norm(products, 1, dtype=torch.float64)))
        torch._foreach_clamp_min_(products, 0.0)
        positive.append(torch.stack(torch._foreach_norm(products, 1, dtype=torch.float64)))
        del products
    dots = torch.stack(positive).mul_(2.0).sub_(torch.stack(magnitude))  # (K, parameters), float64
    per_group: List[Tensor] = []
    start = 0
    for group in pairs:
        end = start + len(group)
        per_group.append(dots[:, start:end].sum(1).to(dtype) if end > start
                         else torch.zeros(n_keys, dtype=dtype, device=dots.device))
        start = end
    return per_group
