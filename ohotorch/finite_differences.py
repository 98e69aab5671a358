r"""Hessian-vector products from finite differences of the user's closure, and what keeps them honest.

.. math::
    \text{forward:}\quad H v \approx \frac{\nabla L(w + \epsilon v) - \nabla L(w)}{\epsilon}
    \qquad
    \text{central:}\quad H v \approx \frac{\nabla L(w + \epsilon v) - \nabla L(w - \epsilon v)}{2\epsilon}

Forward differences reuse the training gradient and cost one extra gradient evaluation; central ones
cost two and are second-order accurate. The perturbation has norm
:math:`\epsilon \lVert v \rVert = r\,(1 + \lVert w \rVert)` with :math:`r = \sqrt{u}` (forward) or
:math:`u^{1/3}` (central), ``u`` the dtype's unit roundoff: the classical balance of truncation against
rounding error, so float32 perturbs ~2e4 times more than float64. Closures computing in bf16 (autocast)
take a measured step, :data:`LOW_PRECISION_STEP`.

Every evaluation inside one optimizer step must see the same function: the same minibatch (the closure
closes over it), the same dropout masks (:class:`RNGSnapshot`), and the same buffers such as BatchNorm's
running statistics (:class:`BufferSnapshot`), which must end as one ordinary training step leaves them.
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional

import torch
from torch import Tensor

__all__ = ["RNGSnapshot", "BufferSnapshot", "clone_all", "relative_step", "perturbation_scale",
           "LOW_PRECISION_STEP"]


# The relative step for closures that compute in a 16-bit format (bf16 autocast), measured rather than
# derived: sqrt(u_bf16) = 0.088 assumes gradient noise of a full bf16 unit, but autocast accumulates in
# float32, and on an H100 (benchmarks/bf16_accuracy.py, results/bf16/bf16_cuda_h100.json) r = 0.01 cut the
# one-step hypergradient error of a GELU MLP from 6.4e-3 (r = 0.088) to 2.8e-4, the ReLU MLP's from 8.1e-3
# to 1.0e-3. Central differences only shrink the truncation part, so they take the same step.
LOW_PRECISION_STEP = 0.01


def relative_step(dtype: torch.dtype, scheme: str) -> float:
    """The relative perturbation ``r`` for ``scheme`` in {"forward", "central"} when gradients are
    computed in ``dtype``: sqrt(u) (forward) or u^(1/3) (central) for float32/float64, the classical
    balance of truncation against rounding; :data:`LOW_PRECISION_STEP` for 16-bit formats.
    """
    info = torch.finfo(dtype)
    if info.bits <= 16:
        return LOW_PRECISION_STEP
    u = info.eps
    return math.sqrt(u) if scheme == "forward" else u ** (1.0 / 3.0)


def perturbation_scale(weight_norm: float, tangent_norm: float, rel: float) -> float:
    r"""The multiplier :math:`\epsilon` with :math:`\epsilon \lVert v\rVert = r (1 + \lVert w\rVert)`."""
    return rel * (1.0 + weight_norm) / tangent_norm


class RNGSnapshot:
    """The CPU generator's state and that of every initialised CUDA device, to replay dropout masks.

    ``capture()`` then ``restore()`` makes the next closure call draw the same random numbers again.
    """

    def __init__(self) -> None:
        self.cpu: Optional[Tensor] = None
        self.cuda: Optional[List[Tensor]] = None

    def capture(self) -> "RNGSnapshot":
        self.cpu = torch.get_rng_state()
        # Only touch CUDA if the program already did: querying it would otherwise initialise a context.
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return self

    def restore(self) -> None:
        if self.cpu is not None:
            torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)


class BufferSnapshot:
    """Copies of a module's buffers (BatchNorm running statistics, counters), restorable in place.

    Restoring writes into the existing buffer tensors, so references held elsewhere stay valid. Capture
    and restore are one multi-tensor copy each (a ResNet18 has ~180 buffers: per-tensor copies would
    cost that many kernel launches, several times a step). ``storage``, a list the caller keeps between
    steps, lends the copies' memory: later snapshots of the same buffers then allocate nothing.
    """

    def __init__(self, buffers: Iterable[Tensor], storage: Optional[List[Tensor]] = None) -> None:
        self.targets = [b for b in buffers]
        reusable = storage is not None and len(storage) == len(self.targets) and all(
            s.shape == b.shape and s.dtype == b.dtype and s.device == b.device
            for s, b in zip(storage, self.targets))
        if reusable:
            self.values = storage
            if self.targets:
                with torch.no_grad():
                    torch._foreach_copy_(self.values, [b.detach() for b in self.targets])
        else:
            self.values = clone_all(self.targets)
            if storage is not None:
                storage[:] = self.values

    def restore(self) -> None:
        if self.targets:
            with torch.no_grad():
                torch._foreach_copy_(self.targets, self.values)


def clone_all(tensors: List[Tensor]) -> List[Tensor]:
    """Detached copies of ``tensors`` in one multi-tensor copy (``torch._foreach_copy_``)."""
    copies = [torch.empty_like(t) for t in tensors]
    if copies:
        with torch.no_grad():
            torch._foreach_copy_(copies, [t.detach() for t in tensors])
    return copies
