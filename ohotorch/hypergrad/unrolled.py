r"""Hypergradients of an unrolled training run: reverse mode (stored or truncated trajectory) and forward mode.

The problem. Training runs T steps of an inner optimiser (:mod:`ohotorch.hypergrad.inner`) from initial
weights ``w_0 = init(h)`` (a list of tensors, or a function of the hyperparameters), on a training loss
that may itself read the hyperparameters (loss weights, per-example weights, regularisers, synthetic
data)::

    s_0 = (w_0, buffers = 0),   s_{t+1} = Phi_t(s_t, h) = step(s_t, grad_w L_train(w_t, h, t), h_t)
    f(h) = L_val(w_T, h)

and we want df/dh for every hyperparameter tensor h (any shapes: learning-rate schedules per step and
group, a relation matrix, one weight per training example, ...).

Reverse mode (Maclaurin et al. 2015; Franceschi et al. 2017's REVERSE-HO). With the adjoint
``a_t = df/ds_t``::

    a_T = (grad_w L_val(w_T, h), 0),    df/dh = dL_val/dh (direct)
    for t = T-1 ... 0:   df/dh += a_{t+1}^T dPhi_t/dh,   a_t = a_{t+1}^T dPhi_t/ds_t
    df/dh += a_0^T dw_0/dh                              (when init reads h)

Each backward step is one vector-Jacobian product of the optimiser step, i.e. one gradient of L_train
and one Hessian-vector product (double backward). Time O(T (gradient + HVP)), independent of the number
K of hyperparameter scalars; memory O(T n) for n optimiser-state scalars (the stored trajectory s_0 ..
s_{T-1}). ``truncate=k`` keeps and differentiates only the last k steps (memory O(k n), a biased
hypergradient that ignores the influence of h on w_{T-k}). :func:`ohotorch.hypergrad.exact_reverse_hypergradient`
replaces the stored trajectory by an exact reversal of SGD with momentum.

Forward mode (real-time recurrent; Franceschi et al.'s FORWARD-HO, the recursion OHO runs online). One
tangent ``Z_t^k = ds_t/dh_k`` per hyperparameter scalar k::

    Z_0^k = dw_0/dh_k,   Z_{t+1}^k = dPhi_t/ds_t Z_t^k + dPhi_t/dh_k,   df/dh_k = <grad L_val, Z_T^k> + dL_val/dh_k

Time O(T K (gradient + HVP)), memory O(K n): it suits a handful of hyperparameters and is here for
comparison. Both modes differentiate the same step function with torch.func, so they agree with each
other and with autograd through the unrolled updates to rounding error (tested in float64).

Losses must be written for torch.func: ``train_loss(params, hypers, t)`` and ``val_loss(params, hypers)``
take the list of weight tensors and the hyperparameter dict and return a scalar (use
``torch.func.functional_call(model, dict(zip(names, params)), x)`` for an nn.Module). Models with
BatchNorm buffers or dropout are not supported (the step must be a deterministic function of w and h).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from .inner import InnerOptimizer, check_hypers, inner_init, inner_step, resolve_groups

__all__ = ["Hypergradient", "unroll", "reverse_hypergradient", "forward_hypergradient"]

TrainLoss = Callable[[List[Tensor], Mapping[str, Tensor], int], Tensor]
ValLoss = Callable[[List[Tensor], Mapping[str, Tensor]], Tensor]
Init = Union[Sequence[Tensor], Callable[[Mapping[str, Tensor]], Sequence[Tensor]]]


@dataclass
class Hypergradient:
    """The result of a hypergradient computation.

    ``grads[name]`` has the shape of ``hypers[name]``. ``memory_bytes`` is what the method held for its
    backward (reverse) or tangent (forward) pass: the stored trajectory, the information buffer plus the
    final state, or the tangents. ``info`` holds method-specific facts (timings, bits, recovery checks).
    """

    val_loss: Tensor
    grads: Dict[str, Tensor]
    params: List[Tensor]
    mode: str
    steps: int
    steps_differentiated: int
    memory_bytes: int
    info: Dict[str, Any] = field(default_factory=dict)


def _nbytes(tensors: Any) -> int:
    if isinstance(tensors, Tensor):
        return tensors.numel() * tensors.element_size()
    if isinstance(tensors, Mapping):
        return sum(_nbytes(v) for v in tensors.values())
    if isinstance(tensors, (list, tuple)):
        return sum(_nbytes(v) for v in tensors)
    return 0


def _detach(tree: Any) -> Any:
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, Mapping):
        return {k: _detach(v) for k, v in tree.items()}
    return [_detach(v) for v in tree]


def _prepare(train_loss: TrainLoss, init: Init, hypers: Mapping[str, Tensor], optimizer: InnerOptimizer, steps: int,
             groups: Optional[Sequence[int]]):
    if not callable(train_loss):
        raise TypeError("train_loss must be callable: train_loss(params, hypers, t) -> scalar tensor")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r} (must be an int >= 1)")
    for name, value in hypers.items():
        if not isinstance(value, Tensor) or not value.is_floating_point():
            raise TypeError(f"hyperparameter {name!r} must be a floating-point tensor, got {type(value).__name__}")
    hypers = {k: v.detach() for k, v in hypers.items()}
    w0 = list(init(hypers)) if callable(init) else list(init)
    if not w0 or not all(isinstance(p, Tensor) and p.is_floating_point() for p in w0):
        raise TypeError("init must give a non-empty list of floating-point tensors")
    w0 = [p.detach() for p in w0]
    groups, num_groups = resolve_groups(groups, len(w0))
    check_hypers(optimizer, hypers, steps, num_groups)
    return hypers, w0, groups, num_groups


def _make_step(train_loss: TrainLoss, optimizer: InnerOptimizer, steps: int, groups: List[int], num_groups: int):
    def step(state: Dict[str, List[Tensor]], hypers: Dict[str, Tensor], t: int) -> Dict[str, List[Tensor]]:
        grads = torch.func.grad(lambda w: train_loss(w, hypers, t))(state["w"])
        return inner_step(optimizer, state, grads, hypers, t, steps, groups, num_groups)
    return step


def unroll(train_loss: TrainLoss, init: Init, hypers: Mapping[str, Tensor], optimizer: InnerOptimizer, steps: int,
           *, groups: Optional[Sequence[int]] = None,
           callback: Optional[Callable[[int, Dict[str, List[Tensor]]], None]] = None) -> List[Tensor]:
    """Run the T inner steps without differentiating them; return the final weights.

    ``callback(t, state)`` (optional) sees the state after each step t (0-based). Time O(T gradient),
    memory O(n).
    """
    hypers, w0, groups, num_groups = _prepare(train_loss, init, hypers, optimizer, steps, groups)
    step = _make_step(train_loss, optimizer, steps, groups, num_groups)
    state = inner_init(optimizer, w0, num_groups)
    for t in range(steps):
        state = _detach(step(state, hypers, t))
        if callback is not None:
            callback(t, state)
    return state["w"]


def reverse_hypergradient(train_loss: TrainLoss, val_loss: ValLoss, init: Init, hypers: Mapping[str, Tensor],
                          optimizer: InnerOptimizer, steps: int, *, groups: Optional[Sequence[int]] = None,
                          truncate: Optional[int] = None) -> Hypergradient:
    """df/dh for every tensor in ``hypers`` by reverse mode through the stored trajectory.

    ``truncate=k`` (1 <= k <= steps) differentiates only the last k steps and stores only their states.
    Time: T gradients forward, then k (gradient + HVP) backward. Memory: k optimiser states (reported in
    ``memory_bytes``), independent of the number of hyperparameters. With the full horizon,
    ``info["grad_init"]`` is dL_val/dw_0 (the adjoint of the initial weights).
    """
    hypers, w0, groups, num_groups = _prepare(train_loss, init, hypers, optimizer, steps, groups)
    if truncate is None:
        truncate = steps
    if isinstance(truncate, bool) or not isinstance(truncate, int) or not 1 <= truncate <= steps:
        raise ValueError(f"Invalid truncate: {truncate!r} (must be an int in [1, steps])")
    step = _make_step(train_loss, optimizer, steps, groups, num_groups)
    start = steps - truncate
    t0 = time.perf_counter()
    state = inner_init(optimizer, w0, num_groups)
    trajectory: List[Dict[str, List[Tensor]]] = []
    for t in range(steps):
        if t >= start:
            trajectory.append(state)
        state = _detach(step(state, hypers, t))
    memory = _nbytes(trajectory)
    t1 = time.perf_counter()

    loss, val_vjp = torch.func.vjp(lambda w, h: val_loss(w, h), state["w"], hypers)
    grad_w, hyper_grads = val_vjp(torch.ones_like(loss))
    hyper_grads = dict(hyper_grads)
    adjoint = {k: [torch.zeros_like(x) for x in v] for k, v in state.items()}
    adjoint["w"] = list(grad_w)
    for t in range(steps - 1, start - 1, -1):
        s_t = trajectory.pop()
        _, step_vjp = torch.func.vjp(lambda s, h: step(s, h, t), s_t, hypers)
        adjoint, g_h = step_vjp(adjoint)
        adjoint = _detach(adjoint)
        for k in hyper_grads:
            hyper_grads[k] = hyper_grads[k] + g_h[k].detach()
    if start == 0 and callable(init):
        _, init_vjp = torch.func.vjp(lambda h: list(init(h)), hypers)
        (g_h,) = init_vjp(adjoint["w"])
        for k in hyper_grads:
            hyper_grads[k] = hyper_grads[k] + g_h[k].detach()
    t2 = time.perf_counter()
    return Hypergradient(val_loss=loss.detach(), grads=hyper_grads, params=state["w"], mode="reverse", steps=steps,
                         steps_differentiated=truncate, memory_bytes=memory,
                         info={"forward_seconds": t1 - t0, "backward_seconds": t2 - t1,
                               "grad_init": adjoint["w"] if start == 0 else None})


def forward_hypergradient(train_loss: TrainLoss, val_loss: ValLoss, init: Init, hypers: Mapping[str, Tensor],
                          optimizer: InnerOptimizer, steps: int, *, groups: Optional[Sequence[int]] = None
                          ) -> Hypergradient:
    """df/dh for every tensor in ``hypers`` by forward mode: one tangent per hyperparameter scalar.

    Time: T K (gradient + Jacobian-vector product of the step) for K hyperparameter scalars in total;
    memory: K tangents of the optimiser state (reported in ``memory_bytes``). For comparison with reverse
    mode; use it only for a handful of scalars.
    """
    hypers, w0, groups, num_groups = _prepare(train_loss, init, hypers, optimizer, steps, groups)
    step = _make_step(train_loss, optimizer, steps, groups, num_groups)
    basis = [(name, i) for name, value in hypers.items() for i in range(value.numel())]

    def unit(name: str, i: int) -> Dict[str, Tensor]:
        out = {k: torch.zeros_like(v) for k, v in hypers.items()}
        out[name] = out[name].reshape(-1).index_fill(0, torch.tensor([i], device=out[name].device), 1.0).reshape(hypers[name].shape)
        return out

    t0 = time.perf_counter()
    state = inner_init(optimizer, w0, num_groups)
    tangents = []
    for name, i in basis:
        if callable(init):
            _, w_dot = torch.func.jvp(lambda h: list(init(h)), (hypers,), (unit(name, i),))
            w_dot = [x.detach() for x in w_dot]
        else:
            w_dot = [torch.zeros_like(p) for p in w0]
        tangent = {k: [torch.zeros_like(x) for x in v] for k, v in state.items()}
        tangent["w"] = w_dot
        tangents.append(tangent)
    memory = _nbytes(tangents)
    for t in range(steps):
        new_state = None
        for j, (name, i) in enumerate(basis):
            out, tangents[j] = torch.func.jvp(lambda s, h: step(s, h, t), (state, hypers), (tangents[j], unit(name, i)))
            tangents[j] = _detach(tangents[j])
            new_state = out
        state = _detach(new_state) if new_state is not None else _detach(step(state, hypers, t))

    loss, val_vjp = torch.func.vjp(lambda w, h: val_loss(w, h), state["w"], hypers)
    grad_w, direct = val_vjp(torch.ones_like(loss))
    grads = {k: v.detach().clone() for k, v in direct.items()}
    for j, (name, i) in enumerate(basis):
        contribution = sum((gw * z).sum() for gw, z in zip(grad_w, tangents[j]["w"]))
        flat = grads[name].view(-1)
        flat[i] = flat[i] + contribution
    t1 = time.perf_counter()
    return Hypergradient(val_loss=loss.detach(), grads=grads, params=state["w"], mode="forward", steps=steps,
                         steps_differentiated=steps, memory_bytes=memory,
                         info={"seconds": t1 - t0, "num_tangents": len(basis)})
