r"""Prototype: tune the hyperparameters for the validation loss of an *averaged* iterate.

The greedy and long horizons both tune for the validation loss of the current weights :math:`w_t`.
Where a large lr pays off only after annealing (a data-rich task whose cosine schedule starts 10x above
the best constant lr), both drive the lr down, because at every moment the noise a large lr adds hurts
the current weights. An average of the recent iterates removes most of that noise, as annealing does,
without knowing when training ends. This prototype keeps a polynomial-decay average of the weights,

.. math::
    \bar w_{t+1} = (1 - a_t)\,\bar w_t + a_t\,w_{t+1},\qquad a_t = \frac{1 + p}{t + 1 + p}

(the weight of iterate :math:`s` in :math:`\bar w_t` grows like :math:`s^p`, so it averages over about the
last :math:`1/(1+p)` of the run), and its influence by the same recursion,
:math:`\dot{\bar w}_{t+1} = (1 - a_t)\dot{\bar w}_t + a_t \dot w_{t+1}` (exact: the average is linear in the
iterates). The hypergradient becomes :math:`\nabla L_{val}(\bar w_t)^\top \dot{\bar w}_t`: one validation
gradient at :math:`\bar w_t`, as before, and a second copy of the weights and of the tangents :math:`\dot w`.
The model a user keeps is :math:`\bar w` (``swap()``), as with schedule-free optimizers.

Benchmark-side prototype for the development suite (host path of ``ohotorch.OHO``: CPU, or CUDA with
``opt._sync_free = False``); it reads the optimizer's per-parameter ``tangent_w`` state.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List

import torch
from torch import Tensor


class AveragedTarget:
    """Average the iterates of ``opt`` and tune its hyperparameters for the average's validation loss."""

    def __init__(self, opt: torch.optim.Optimizer, power: float = 3.0, min_weight: float = 0.0) -> None:
        self.opt = opt
        self.power = float(power)
        self.min_weight = float(min_weight)  # a_t >= min_weight: the window never exceeds ~1/min_weight steps
        self.params: List[Tensor] = [p for g in opt.param_groups for p in g["params"]]
        self.avg: List[Tensor] = [p.detach().clone() for p in self.params]
        self.avg_tangent: Dict[int, Tensor] = {}
        self.t = 0

    @torch.no_grad()
    def after_step(self) -> None:
        """Fold the new iterate and its tangents into the averages (call after every ``opt.step``)."""
        self.t += 1
        a = (1.0 + self.power) / (self.t + self.power)
        a = min(1.0, max(a, self.min_weight))
        for p, m in zip(self.params, self.avg):
            m.lerp_(p.detach(), a)
            tangent = self.opt.state.get(p, {}).get("tangent_w")
            if tangent is None:
                continue
            bar = self.avg_tangent.get(id(p))
            if bar is None or bar.shape != tangent.shape:
                self.avg_tangent[id(p)] = bar = torch.zeros_like(tangent)
            bar.lerp_(tangent, a)

    @contextlib.contextmanager
    def swap(self, tangents: bool = False) -> Iterator[None]:
        """The averaged weights (and, with ``tangents``, their influence) in place of the current ones."""
        saved = [p.detach().clone() for p in self.params]
        saved_tangents = {}
        with torch.no_grad():
            for p, m in zip(self.params, self.avg):
                p.copy_(m)
            if tangents:
                for p in self.params:
                    state = self.opt.state.get(p, {})
                    if "tangent_w" in state and id(p) in self.avg_tangent:
                        saved_tangents[id(p)] = state["tangent_w"]
                        state["tangent_w"] = self.avg_tangent[id(p)]
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)
                for p in self.params:
                    if id(p) in saved_tangents:
                        self.opt.state[p]["tangent_w"] = saved_tangents[id(p)]

    def hyper_step(self, val_closure: Callable[[], Tensor]):
        """``opt.hyper_step`` with the validation loss taken at the average and contracted with its
        influence."""
        with self.swap(tangents=True):
            return self.opt.hyper_step(val_closure)
