"""Shared test material: real digits data, small models, and the autograd oracle.

The oracle unrolls torch.optim.SGD's update with the hyperparameters as float64 tensors that require
grad, keeps the graph, and differentiates the validation loss after T steps: the ground truth the
forward-mode hypergradients must match.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import ohotorch


def digits(dtype=torch.float64) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled 8x8 digits (1797 real images): (x_train, y_train, x_val, y_val)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=dtype)
    y = torch.tensor(y, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def mlp(sizes: Sequence[int] = (64, 16, 16, 10), act=nn.Tanh, dtype=torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def batches(x, y, size: int, steps: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (size,), generator=g)
        out.append((x[idx], y[idx]))
    return out


def closures(opt, model, batch):
    x, y = batch

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def run_oho(model, opt, train_batches) -> None:
    for b in train_batches:
        opt.step(closures(opt, model, b))


def oracle_hypergradients(
    model: nn.Module,
    groups: List[List[int]],
    hypers: List[Dict[str, float]],
    train_batches,
    val_batch,
    *,
    dampening: float = 0.0,
    nesterov: bool = False,
    use_buffer: bool = False,
    rule: str = "sgd",
    betas: Tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    scheduled_lr: Optional[Sequence[float]] = None,
    tied: Sequence[Sequence[Tuple[int, str]]] = (),
    average: Optional[float] = None,
    greedy: bool = False,
    first_order: bool = False,
) -> List[Dict[str, float]]:
    """dL_val(w_T)/d theta by reverse-mode autograd through T unrolled SGD steps.

    ``groups[k]`` lists parameter indices (in ``model.parameters()`` order) of hyper group k and
    ``hypers[k]`` its {"lr", "weight_decay", "momentum"} values. ``rule`` is "sgd" (torch.optim.SGD),
    "adam" (torch.optim.Adam, L2 decay) or "adamw" (decoupled decay). ``scheduled_lr[t]`` (if given)
    replaces every group's lr at step t + 1 (a scheduler's values); a group's "lr_scale" multiplies it.
    Each entry of ``tied`` lists ``(group, name)`` pairs that are one scalar (a shared hyper group): every
    one reports the derivative by that scalar.

    ``average`` (a power p): differentiate L_val at the polynomial-decay average of the iterates,
    w_bar_t = w_bar_{t-1} + a_t (w_t - w_bar_{t-1}), a_t = min(1, (1 + p) / (t + p)), instead of at w_T.
    ``greedy``: detach the weights and the optimizer's buffers before every step, so that each iterate
    depends on the hyperparameters through its last step only (the greedy horizon's one-step tangents).
    ``first_order``: the training gradient at detached weights (a constant of the hyperparameters: the
    loss Hessian dropped from the tangent recursion, ``hvp="none"``), everything else differentiated.
    """
    names = [n for n, _ in model.named_parameters()]
    w0 = [p.detach().clone() for p in model.parameters()]
    theta = [{k: torch.tensor(float(v), dtype=torch.float64, requires_grad=True) for k, v in h.items()}
             for h in hypers]
    for (first, first_name), *rest in tied:
        for k, name in rest:
            theta[k][name] = theta[first][first_name]
    owner = {i: k for k, idx in enumerate(groups) for i in idx}

    def loss_at(w, batch):
        x, y = batch
        params = {n: t for n, t in zip(names, w)}
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    w = [t.clone().requires_grad_(True) for t in w0]
    bufs = [None] * len(w)
    moments = [(torch.zeros_like(t), torch.zeros_like(t)) for t in w0]
    w_bar = None
    for step, batch in enumerate(train_batches, start=1):
        if greedy:
            w = [t.detach().requires_grad_(True) for t in w]
            bufs = [None if b is None else b.detach() for b in bufs]
            moments = [(m.detach(), v.detach()) for m, v in moments]
        if first_order:
            detached = [t.detach().requires_grad_(True) for t in w]
            grads = torch.autograd.grad(loss_at(detached, batch), detached)
        else:
            grads = torch.autograd.grad(loss_at(w, batch), w, create_graph=True)
        new_w = []
        for i, (wi, gi) in enumerate(zip(w, grads)):
            h = theta[owner[i]]
            lr = h["lr"] if scheduled_lr is None else scheduled_lr[step - 1]
            if "lr_scale" in h:
                lr = lr * h["lr_scale"]
            if rule in ("adam", "adamw"):
                d = gi + h["weight_decay"] * wi if rule == "adam" else gi
                m = betas[0] * moments[i][0] + (1 - betas[0]) * d
                v = betas[1] * moments[i][1] + (1 - betas[1]) * d * d
                moments[i] = (m, v)
                # sqrt with a zero derivative where v = 0 (always-zero pixels of digits): torch's
                # sqrt'(0) = inf would turn 0 * inf into NaN in the graph.
                root = torch.where(v > 0, v, torch.ones_like(v)).sqrt() * (v > 0)
                denom = root / (1 - betas[1] ** step) ** 0.5 + eps
                kept = (1 - lr * h["weight_decay"]) * wi if rule == "adamw" else wi
                new_w.append(kept - lr / (1 - betas[0] ** step) * m / denom)
                continue
            d = gi + h["weight_decay"] * wi
            if use_buffer:
                b = d if bufs[i] is None else h["momentum"] * bufs[i] + (1 - dampening) * d
                bufs[i] = b
                u = d + h["momentum"] * b if nesterov else b
            else:
                u = d
            new_w.append(wi - lr * u)
        w = new_w
        if average is not None:
            a = min(1.0, (1.0 + average) / (step + average))
            w_bar = w if w_bar is None else [b + a * (x - b) for b, x in zip(w_bar, w)]
    val = loss_at(w if w_bar is None else w_bar, val_batch)
    flat = [(k, n, t) for k, h in enumerate(theta) for n, t in h.items()]
    grads = torch.autograd.grad(val, [t for _, _, t in flat], allow_unused=True, materialize_grads=True)
    out: List[Dict[str, float]] = [{} for _ in theta]
    for (k, n, _), g in zip(flat, grads):
        out[k][n] = float(g)
    return out


def param_index_groups(model: nn.Module, param_groups) -> List[List[int]]:
    index = {id(p): i for i, p in enumerate(model.parameters())}
    return [[index[id(p)] for p in g["params"]] for g in param_groups]


def relative_error(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


__all__ = ["digits", "mlp", "batches", "closures", "run_oho", "oracle_hypergradients",
           "param_index_groups", "relative_error", "ohotorch"]
