r"""The growth-capped influence (``growth_cap=c``): a full or discounted horizon that cannot explode.

The tangent step of every inner rule is linear in the tangent state :math:`z` (SGD:
:math:`z = (\dot w, \eta \dot b)`; Adam: :math:`(\dot w, \dot m, \dot v)`, each companion measured by
the displacement of :math:`\dot w` it causes, see :func:`ohotorch.adam_tangents.adam_state_sq_norm`):

.. math::
    z_{t+1} = A_t z_t + c_t

with :math:`A_t` the homogeneous map (the Hessian-vector product, weight decay, momentum / moments) and
:math:`c_t` the direct terms :math:`[\theta = x]` (e.g. :math:`-u_t` for the lr). Near the edge of
stability :math:`A_t` is expanding and the exact influence grows exponentially. With the cap, per
tangent :math:`k` and step :math:`t`:

.. math::
    \rho_t = \lVert A_t z_t\rVert / \lVert z_t\rVert,\qquad
    e_k \leftarrow \beta e_k + (1-\beta) \log\rho_t \ (e_k = \log\rho_t \text{ at the first observation}),
    \qquad \gamma_t = \min(1, c / \exp e_k), \\
    z_{t+1} = \gamma_t A_t z_t + c_t ,

with :math:`\beta` = :data:`GROWTH_BETA` (the EMA averages out heavy-ball transients). The influence
is the full horizon wherever the dynamics contract on average and never grows faster than :math:`c`
per step; :math:`c = 1` is the recommended value, :math:`c = 0` is the greedy horizon, a huge
:math:`c` the uncapped horizon (up to the rounding of the split update). A step whose
:math:`\lVert z_t\rVert` is 0 or whose :math:`\lVert A_t z_t\rVert` is not finite leaves :math:`e_k`
unchanged and takes :math:`\gamma_t = 1`.

Cost per tangent and step: no extra Hessian-vector product; two float64 norms of the state (SGD: 2
norm kernels per parameter; Adam: about 8 elementwise passes and 3 norms per parameter), one scaling
of the state and the direct terms added separately (at most 2 passes; Adam's weight-decay tangent
about 9). :math:`e_k` and :math:`\gamma_t` are 0-d device tensors, so nothing is read on the host.
State: one float64 per tangent, saved in ``state_dict()["oho"]["growth_ema"]``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["GROWTH_BETA", "growth_gamma"]

# The EMA factor of the log-growth.
GROWTH_BETA = 0.9
# log() of an after-norm of 0 reads log(1e-300), as a lower bound.
_TINY = 1e-300


def growth_gamma(before: Tensor, after: Tensor, ema: Tensor, *, cap: float,
                 beta: float = GROWTH_BETA) -> Tuple[Tensor, Tensor]:
    r"""``(e_k, gamma)`` after one step, as 0-d float64 tensors, with no host sync.

    ``before`` and ``after`` are the squared norms :math:`\lVert z_t\rVert^2` and
    :math:`\lVert A_t z_t\rVert^2`; ``ema`` is :math:`e_k` before the step (NaN: no observation yet).
    """
    before, after, ema = before.double(), after.double().to(before.device), ema.double().to(before.device)
    one = torch.ones((), dtype=torch.float64, device=before.device)
    valid = torch.isfinite(before) & (before > 0) & torch.isfinite(after)
    log_rho = 0.5 * (torch.log(torch.where(valid, after, one).clamp_min(_TINY))
                     - torch.log(torch.where(valid, before, one)))
    blended = torch.where(torch.isnan(ema), log_rho, beta * ema + (1.0 - beta) * log_rho)
    new_ema = torch.where(valid, blended, ema)
    gamma = torch.where(valid, (cap / torch.exp(new_ema)).clamp(max=1.0), one)
    return new_ema, gamma
