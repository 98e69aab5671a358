r"""Offline hypergradients of unrolled training runs, for many hyperparameters at once.

Where :class:`ohotorch.OHO` tunes a handful of scalars online (forward mode, cost growing with their
number K), this package differentiates a validation loss after T training steps back through the whole
run (reverse mode, cost independent of K): learning-rate schedules per layer and per step, per-example
loss weights, initialisation scales, regularisation matrices, synthetic training data.

* :mod:`~ohotorch.hypergrad.inner`: the inner optimisers (:class:`SGD`, :class:`Adam`) as pure functions,
  hyperparameters as named tensors broadcast to (steps, groups).
* :mod:`~ohotorch.hypergrad.unrolled`: :func:`reverse_hypergradient` (stored or truncated trajectory),
  :func:`forward_hypergradient` (one tangent per scalar, for comparison), :func:`unroll`.
* :mod:`~ohotorch.hypergrad.reversible`: :func:`exact_reverse_hypergradient`, the exact reversal of SGD
  with momentum in fixed point with an information buffer (Maclaurin, Duvenaud & Adams 2015).
* :mod:`~ohotorch.hypergrad.projections`: projections onto boxes, the simplex, L1 balls and box-with-budget
  sets, and projected outer steps (Franceschi et al. 2017).

Example (a per-step, per-layer learning-rate schedule)::

    names = [n for n, _ in model.named_parameters()]
    def train_loss(w, h, t):
        x, y = batches[t]
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, w)), x), y)
    def val_loss(w, h):
        return F.cross_entropy(torch.func.functional_call(model, dict(zip(names, w)), xv), yv)
    hypers = {"lr": torch.full((T, n_layers), 0.1)}
    res = reverse_hypergradient(train_loss, val_loss, w0, hypers, SGD(lr="lr", momentum=0.9), T,
                                groups=layer_of_each_param)
    res.grads["lr"]  # shape (T, n_layers): dL_val / d lr[t, layer]
"""
from __future__ import annotations

from .inner import SGD, Adam
from .projections import (ProjectedAdam, project_box, project_box_budget, project_l1_ball, project_simplex,
                          projected_sgd_step)
from .reversible import exact_reverse_hypergradient
from .unrolled import Hypergradient, forward_hypergradient, reverse_hypergradient, unroll

__all__ = ["SGD", "Adam", "Hypergradient", "unroll", "reverse_hypergradient", "forward_hypergradient",
           "exact_reverse_hypergradient", "project_box", "project_simplex", "project_l1_ball",
           "project_box_budget", "projected_sgd_step", "ProjectedAdam"]
