r"""The sync-free path: what ``step`` and ``hyper_step`` do on CUDA without making the host wait.

When every parameter is on CUDA (``OHO._use_sync_free``), the shell calls these functions instead of
reading values on the host:

* :func:`tangent_scales`: the finite-difference steps :math:`\epsilon_k` and :math:`1/\epsilon_k` as 0-d
  device tensors from the tangent norms (0 for a zero or non-finite tangent, whose HVP then reads 0);
* :func:`hyper_step`: the meta-update on the device (:class:`ohotorch.meta.DeviceMeta`, all or nothing by
  ``torch.where``);
* what Python must know comes back later through :mod:`ohotorch.deferred` (pinned memory and an event):
  :func:`report` (counters, warnings, diagnostics: waits for pending results) and :func:`settle` (tuned
  values into ``param_groups``, resets of non-finite tangents) at the start of the second step after the
  hyper-step that computed them; :func:`restart_outside_writes` lets a value written from outside win.

Cost: a handful of small kernels per step and hyper-step, no host synchronisation in steady state.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import averaging, influence, meta
from .deferred import Deferred, Readback, Record
from .influence import TangentKey

if TYPE_CHECKING:
    from .optimizer import OHO

__all__ = ["deferred", "settle", "report", "forget", "restart_outside_writes", "device_meta_for",
           "tangent_scales", "hyper_step"]


def deferred(opt: "OHO") -> Deferred:
    deferred = opt.__dict__.get("_deferred_results")
    if deferred is None:
        deferred = opt.__dict__["_deferred_results"] = Deferred()
    return deferred


def settle(opt: "OHO", before: Optional[int] = None) -> None:
    """Apply the deferred results made before step count ``before`` (all of them when None):
    hyperparameters into ``param_groups``, resets of non-finite tangents; see :meth:`hyper_step`."""
    deferred = opt.__dict__.get("_deferred_results")
    if deferred is not None and deferred.records:
        restart_outside_writes(opt)
        deferred.apply(before)


def report(opt: "OHO") -> None:
    """Counters, warnings and diagnostics of every deferred result (waits for them; applies nothing)."""
    deferred = opt.__dict__.get("_deferred_results")
    if deferred is not None:
        deferred.consume_all()


def forget(opt: "OHO") -> None:
    """Forget the device copies of the tuned values (after load_state_dict: they are stale)."""
    opt.__dict__.pop("_device_meta", None)
    deferred = opt.__dict__.get("_deferred_results")
    if deferred is not None:
        deferred.discard()


def restart_outside_writes(opt: "OHO") -> None:
    """Values changed in ``param_groups`` since OHO last wrote them restart their device meta state."""
    device_meta: Optional[meta.DeviceMeta] = opt.__dict__.get("_device_meta")
    if device_meta is None:
        return
    for i, (index, name) in enumerate(device_meta.entries):
        value = float(opt.param_groups[index][name])
        previous = device_meta.written[i]
        if value != previous:
            device_meta.restart(i, value)
            old = opt._bookkeeping.meta_state.pop(f"{index}/{name}", {})
            if device_meta.config.fast(name) and old:  # fast start's phase outlives an outside write
                opt._bookkeeping.meta_state[f"{index}/{name}"] = meta._fast_phase_state(old)
            if name == "lr":
                opt._usage.warn_once(
                    f"lr/{index}",
                    f"OHO: the lr of param group {index} was changed from outside since the last hyper_step "
                    f"({previous} -> {value}); OHO continues from the new value. If a "
                    "scheduler (e.g. ReduceLROnPlateau) sets it, tune 'lr_scale' instead of 'lr' so the "
                    "two do not overwrite each other."
                )


def device_meta_for(opt: "OHO", entries: List[Tuple[int, str]], device: torch.device) -> meta.DeviceMeta:
    device_meta: Optional[meta.DeviceMeta] = opt.__dict__.get("_device_meta")
    if device_meta is not None and device_meta.entries == entries:
        return device_meta
    settle(opt)
    values, states = [], []
    for index, name in entries:
        value = float(opt.param_groups[index][name])
        state = opt._bookkeeping.meta_state.get(f"{index}/{name}", {})
        if state.get("written", value) != value:  # set from outside since the last hyper-step
            state = meta._fast_phase_state(state)  # only fast start's phase (DeviceMeta ignores it when off)
        values.append(value)
        states.append(state)
    device_meta = meta.DeviceMeta(entries, values, states, opt._meta_config(), device)
    opt.__dict__["_device_meta"] = device_meta
    return device_meta


def tangent_scales(opt: "OHO", keys: Sequence[TangentKey]) -> Optional[Tuple[Tensor, Tensor]]:
    """The perturbation scales (eps_k, 1/eps_k) on the device, with no host sync.

    A zero or non-finite tangent gets eps = 1/eps = 0: its HVP perturbs nothing and reads zero. The
    norms come back to the host later (:mod:`ohotorch.deferred`): the diagnostics, and the reset of a
    non-finite tangent to zero, with its warning and count, at the start of the next step.
    """
    pairs = [(p, s["tangent_w"]) for p, s in opt.state.items() if "tangent_w" in s]
    if not keys or not pairs:  # no tangent yet: nothing to perturb
        return None
    all_norms = influence.tangent_norms_tensor(pairs, len(keys))
    norms, weight_norm = all_norms[:-1], all_norms[-1]
    if opt.discount != 1.0:
        norms = norms * opt.discount  # of gamma w': see _tangent_norms
    rel = opt._fd_rel([p for p, _ in pairs])
    usable = (norms > 0) & (norms < math.inf)  # finite and non-zero (a nan fails both)
    safe = torch.where(usable, norms, 1.0)
    reach = rel * (1.0 + weight_norm)  # eps * ||w'|| (the perturbation's norm)
    eps = torch.where(usable, reach / safe, 0.0)
    inverse = torch.where(usable, safe / reach, 0.0)
    names = [influence.key_name(opt.param_groups, key) for key in keys]

    def consume(values: List[float]) -> None:
        for name, norm in zip(names, values):
            if not math.isfinite(norm):
                opt._bookkeeping.nonfinite_influence += 1
                warnings.warn(f"OHO: the influence for {name} became non-finite and was reset to zero")
        opt._diag()["influence_norm"] = {name: (norm if math.isfinite(norm) else 0.0)
                                          for name, norm in zip(names, values)}

    def apply(values: List[float]) -> None:
        for index, norm in enumerate(values[:len(names)]):
            if not math.isfinite(norm):
                influence.zero_tangent_(list(opt.state.values()), index)
                averaging.zero_tangent_(list(opt.state.values()), index)

    deferred(opt).add(Record(opt._bookkeeping.steps, Readback(all_norms), consume, apply))
    return eps, inverse


def hyper_step(opt: "OHO", flat: List[Tuple[int, str, Tensor]], loss_sum: Tensor) -> None:
    """The meta-update on the device (:class:`ohotorch.meta.DeviceMeta`); its result reaches
    ``param_groups`` at the start of the second step after this one (see :meth:`hyper_step`)."""
    entries = [(index, name) for index, name, _ in flat]
    device_meta = device_meta_for(opt, entries, loss_sum.device)
    restart_outside_writes(opt)
    generations = list(device_meta.generation)
    hs = [h.detach() for _, _, h in flat]
    if all(h.dtype == hs[0].dtype for h in hs):  # one conversion of the stack (exact either way)
        stacked = torch.stack(hs).double()
    else:
        stacked = torch.stack([h.double() for h in hs])
    packed = device_meta.update(stacked, loss_sum)
    n = len(entries)
    rows = len(meta.DeviceMeta.ROWS)
    config = device_meta.config

    def consume(values: List[float]) -> None:
        finite_input, committed = values[-2] == 1.0, values[-1] == 1.0
        outcome = (meta.COMMITTED if committed else
                   meta.NONFINITE_RESULT if finite_input else meta.NONFINITE_HYPERGRADIENT)
        hypergradients = [(index, name, h) for (index, name), h in zip(entries, values[rows * n:(rows + 1) * n])]
        opt._report_hyper_step(outcome, hypergradients, values[(rows + 1) * n])

    def apply(values: List[float]) -> None:
        if values[-1] != 1.0:
            return
        for i, (index, name) in enumerate(entries):
            key = f"{index}/{name}"
            theta, m, v, t, *phase_values = (values[row * n + i] for row in range(rows))
            phase = dict(zip(meta.FAST_START_PHASE_KEYS, phase_values))
            if opt.__dict__.get("_device_meta") is not device_meta:
                continue
            if device_meta.generation[i] != generations[i]:
                # set from outside after this hyper-step: the outside value stands, fast start's phase
                # (kept by the device across the restart) follows the device, also when this is the
                # value's first result (no meta state yet), so that a checkpoint taken now keeps it
                if config.fast(name):
                    opt._bookkeeping.meta_state.setdefault(key, {}).update(phase)
                continue
            opt.param_groups[index][name] = theta
            device_meta.written[i] = theta
            state = {"m": m, "v": v, "t": t, "written": theta}
            if config.fast(name):
                state.update(phase)
            opt._bookkeeping.meta_state[key] = state
        opt._publish_hyperparameters()

    deferred(opt).add(Record(opt._bookkeeping.steps, Readback(packed), consume, apply))
