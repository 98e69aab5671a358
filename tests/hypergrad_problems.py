"""Shared problems for the hypergrad tests and the autograd oracle they are checked against.

The oracle is written independently of ohotorch.hypergrad: plain torch.autograd, the updates spelled
out step by step with the hyperparameters as float64 tensors that require grad, create_graph=True, then
torch.autograd.grad of the validation loss. Nothing here imports the module under test.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

DT = torch.float64


class Problem:
    """A 5-6-3 tanh network with two parameter groups (one per layer), 40 training examples in 4
    minibatches, per-example loss weights ``ew`` and an L2 coefficient ``rho`` read by the training loss."""

    def __init__(self, seed: int = 0, steps: int = 5, dtype: torch.dtype = DT) -> None:
        g = torch.Generator().manual_seed(seed)
        self.steps = steps
        self.x = torch.randn(40, 5, generator=g, dtype=DT)
        self.y = torch.randint(0, 3, (40,), generator=g)
        self.xv = torch.randn(30, 5, generator=g, dtype=DT)
        self.yv = torch.randint(0, 3, (30,), generator=g)
        self.w0 = [torch.randn(5, 6, generator=g, dtype=DT) * 0.5, torch.randn(6, 3, generator=g, dtype=DT) * 0.5]
        self.groups = [0, 1]
        self.x, self.xv = self.x.to(dtype), self.xv.to(dtype)
        self.w0 = [p.to(dtype) for p in self.w0]

    def train_loss(self, w: List[torch.Tensor], h: Dict[str, torch.Tensor], t: int) -> torch.Tensor:
        idx = slice((t % 4) * 10, (t % 4) * 10 + 10)
        out = torch.tanh(self.x[idx] @ w[0]) @ w[1]
        losses = F.cross_entropy(out, self.y[idx], reduction="none")
        return (losses * h["ew"][idx]).mean() + h["rho"] * (w[0] ** 2).sum()

    def val_loss(self, w: List[torch.Tensor], h: Dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(torch.tanh(self.xv @ w[0]) @ w[1], self.yv)

    def hypers(self, **extra: torch.Tensor) -> Dict[str, torch.Tensor]:
        T = self.steps
        lr = 0.2 + 0.1 * torch.rand(T, 2, generator=torch.Generator().manual_seed(1), dtype=DT)
        base = {"lr": lr, "ew": torch.linspace(0.5, 1.5, 40, dtype=DT), "rho": torch.tensor(0.01, dtype=DT),
                "wd": torch.tensor([1e-3, 2e-3], dtype=DT), "mu": torch.tensor(0.875, dtype=DT),
                "b1": torch.tensor(0.8, dtype=DT), "b2": torch.tensor(0.99, dtype=DT),
                "eps": torch.tensor(1e-6, dtype=DT), "scale": torch.tensor([1.0, 0.7], dtype=DT)}
        base.update(extra)
        return base


def _at(h: torch.Tensor, t: int, g: int, steps: int) -> torch.Tensor:
    return torch.broadcast_to(h, (steps, 2))[t, g]


def oracle(problem: Problem, hypers: Dict[str, torch.Tensor], kind: str, *, init_scaled: bool = False,
           truncate: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """d L_val(w_T) / d hypers by autograd through the unrolled updates (float64).

    kind: sgd (lr, wd), momentum (lr, mu, wd), nesterov (lr, mu, wd), adam (lr, b1, b2, eps, wd), adamw (same).
    ``init_scaled``: w_0 = scale[layer] * problem.w0[layer]. ``truncate=k``: the state at step T - k is
    detached (the truncated-backpropagation hypergradient).
    """
    h = {k: v.detach().clone().requires_grad_(True) for k, v in hypers.items()}
    T = problem.steps
    w = [h["scale"][i] * p if init_scaled else p.clone() for i, p in enumerate(problem.w0)]
    b = [torch.zeros_like(p) for p in w]
    m = [torch.zeros_like(p) for p in w]
    v = [torch.zeros_like(p) for p in w]
    c1 = [torch.ones((), dtype=DT) for _ in w]
    c2 = [torch.ones((), dtype=DT) for _ in w]
    for t in range(T):
        if truncate is not None and t == T - truncate:
            w, b, m, v = [[x.detach() for x in xs] for xs in (w, b, m, v)]
            c1, c2 = [x.detach() for x in c1], [x.detach() for x in c2]
        if not all(p.requires_grad for p in w):
            w = [p.requires_grad_(True) if not p.requires_grad else p for p in w]
        grads = torch.autograd.grad(problem.train_loss(w, h, t), w, create_graph=True)
        new_w = []
        for i, (p, g) in enumerate(zip(w, grads)):
            lr = _at(h["lr"], t, i, T)
            if kind in ("sgd", "momentum", "nesterov"):
                d = g + _at(h["wd"], t, i, T) * p
                if kind == "sgd":
                    new_w.append(p - lr * d)
                    continue
                mu = _at(h["mu"], t, i, T)
                b[i] = mu * b[i] + d
                u = d + mu * b[i] if kind == "nesterov" else b[i]
                new_w.append(p - lr * u)
            else:
                wd, b1, b2, eps = (_at(h[k], t, i, T) for k in ("wd", "b1", "b2", "eps"))
                if kind == "adamw":
                    p = p * (1 - lr * wd)
                    d = g
                else:
                    d = g + wd * p
                m[i] = b1 * m[i] + (1 - b1) * d
                v[i] = b2 * v[i] + (1 - b2) * d * d
                c1[i], c2[i] = c1[i] * b1, c2[i] * b2
                new_w.append(p - lr / (1 - c1[i]) * m[i] / ((v[i] / (1 - c2[i])).sqrt() + eps))
        w = new_w
    loss = problem.val_loss(w, h)
    names = list(h)
    grads = torch.autograd.grad(loss, [h[k] for k in names], allow_unused=True)
    return {k: (g if g is not None else torch.zeros_like(h[k])) for k, g in zip(names, grads)}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = max(float(b.abs().max()), 1e-12)
    return float((a - b).abs().max()) / scale

