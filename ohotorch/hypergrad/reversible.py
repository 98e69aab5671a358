r"""Exactly reversible SGD with momentum (Maclaurin, Duvenaud & Adams 2015) and its reverse hypergradient.

Reverse mode needs w_t and b_t at every step of the backward pass. Storing them costs O(T n) memory.
SGD with momentum can instead be run backwards::

    forward   b_{t+1} = mu_t b_t + d_t(w_t),         w_{t+1} = w_t - eta_t b_{t+1}
    backward  w_t = w_{t+1} + eta_t b_{t+1},          b_t = (b_{t+1} - d_t(w_t)) / mu_t

(torch.optim.SGD's convention, d_t = grad L_train(w_t, h, t) + lambda_t w_t), but in floating point the
division by mu_t does not undo the multiplication. Here w and b are fixed-point integers (int64, value =
integer * 2**-radix_bits) so that additions are exact and the rounding of d_t and eta_t b_{t+1} to the
grid is a deterministic function of quantities the backward pass has already recovered. Multiplying by
mu = n / D (D = 2**momentum_bits, n = round(mu D)) is made exact by an information buffer i, one
arbitrary-precision integer per weight (Maclaurin et al.'s Algorithm 3)::

    multiply c by n/D:   i <- i D + (c mod D);  c <- (c // D) n;  c <- c + (i mod n);  i <- i // n
    divide c by n/D:     i <- i n + (c mod n);  c <- (c // n) D;  c <- c + (i mod D);  i <- i // D

so each step stores about log2(D / n) = log2(1 / mu) bits per weight, the information the momentum decay
destroys (0.15 bits at mu = 0.9), instead of 2 x 64 bits for (w_t, b_t) in float64. The buffers are
NumPy object arrays of Python integers (vectorised over the elements of each tensor).

The hypergradient runs the adjoint recursion of :func:`ohotorch.hypergrad.reverse_hypergradient` on the
recovered states: each backward step reverses one update (one gradient of L_train), then takes the
vector-Jacobian product of the floating-point step at (w_t, b_t) (one more gradient and one HVP).

Cost: time O(T (3 gradients + 1 HVP)) against O(T (2 gradients + 1 HVP)) with a stored trajectory;
memory O(n (64 + T log2(1/mu))) bits against O(2 T n 64) bits - both independent of the number of
hyperparameters. Momentum is rounded to a multiple of 2**-momentum_bits (and must be > 0); the
hypergradient is the derivative at the rounded values, which are returned in ``info["momentum_used"]``.
Nesterov momentum and Adam are not reversible this way and are refused.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from .inner import SGD, InnerOptimizer, replace, value_at
from .unrolled import Hypergradient, Init, TrainLoss, ValLoss, _detach, _make_step, _nbytes, _prepare

__all__ = ["FixedPoint", "ReversibleSGDRun", "exact_multiply_", "exact_divide_", "reversible_sgd_forward",
           "reversible_sgd_backward_", "exact_reverse_hypergradient"]


@dataclass(frozen=True)
class FixedPoint:
    """Signed fixed-point numbers in int64: value = integer * 2**-radix_bits."""

    radix_bits: int = 40

    def __post_init__(self) -> None:
        if not 1 <= self.radix_bits <= 60:
            raise ValueError(f"Invalid radix_bits: {self.radix_bits} (must be in [1, 60])")

    def to_fixed(self, x: Tensor) -> Tensor:
        """Round a float tensor to the grid (round half to even); refuses values out of the int64 range."""
        scaled = torch.round(x.double() * 2.0 ** self.radix_bits)
        if not torch.isfinite(scaled).all() or scaled.abs().max() >= 2.0 ** 62:
            raise OverflowError(f"value out of the fixed-point range |x| < 2**{62 - self.radix_bits} "
                                f"(or not finite): lower radix_bits or the learning rate")
        return scaled.to(torch.int64)

    def to_float(self, q: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
        return (q.double() * 2.0 ** -self.radix_bits).to(dtype)


def _digits(array: np.ndarray) -> np.ndarray:
    """int64 array -> array of Python ints (arbitrary precision)."""
    return array.astype(object)


def _from_digits(c: np.ndarray, like: Tensor) -> Tensor:
    """Python-int array -> int64 tensor shaped and placed like ``like`` (OverflowError if out of range)."""
    return torch.from_numpy(np.asarray(c, dtype=np.int64).reshape(tuple(like.shape))).to(like.device)


def exact_multiply_(c: np.ndarray, buffer: np.ndarray, numerator: int, denominator: int) -> np.ndarray:
    """Exactly reversible c <- c * numerator / denominator (integer arrays, Python-int objects); writes the
    lost digits into ``buffer`` in place and returns the new c. Inverse: :func:`exact_divide_`."""
    buffer *= denominator
    buffer += c % denominator
    c = (c // denominator) * numerator
    c = c + buffer % numerator
    buffer //= numerator
    return c


def exact_divide_(c: np.ndarray, buffer: np.ndarray, numerator: int, denominator: int) -> np.ndarray:
    """The inverse of :func:`exact_multiply_`: c <- c * denominator / numerator, reading the buffer."""
    buffer *= numerator
    buffer += c % numerator
    c = (c // numerator) * denominator
    c = c + buffer % denominator
    buffer //= denominator
    return c


@dataclass
class ReversibleSGDRun:
    """The end of a reversible run: final fixed-point weights and velocities and the information buffers."""

    w: List[Tensor]
    b: List[Tensor]
    buffers: List[np.ndarray]
    w0: List[Tensor]
    numerators: List[List[int]]  # [t][param]
    denominator: int
    fixed: FixedPoint

    def buffer_bits(self) -> int:
        """Total bits held by the information buffers (sum of the integers' bit lengths)."""
        return int(sum(sum(int(x).bit_length() for x in buf.ravel()) for buf in self.buffers))

    def memory_bytes(self) -> int:
        """Bytes needed to run backwards: the buffers' bits plus the final w and b (int64)."""
        return math.ceil(self.buffer_bits() / 8) + _nbytes(self.w) + _nbytes(self.b)


def _momentum_numerators(opt: SGD, hypers: Mapping[str, Tensor], steps: int, groups: List[int], num_groups: int,
                         denominator: int) -> Tuple[List[List[int]], Any]:
    """Per step and parameter, n = round(mu * D); and the rounded momentum in the form the optimiser reads."""
    if isinstance(opt.momentum, str):
        mu = torch.broadcast_to(hypers[opt.momentum], (steps, num_groups)).double()
    else:
        mu = torch.full((steps, num_groups), float(opt.momentum), dtype=torch.float64)
    n = torch.round(mu * denominator)
    if (n < 1).any() or (n > denominator).any():
        raise ValueError(f"exact reversal needs 0 < momentum <= 1 (at least 2**-{int(math.log2(denominator))}); "
                         f"got values in [{mu.min().item()}, {mu.max().item()}]")
    table = n.to(torch.int64).tolist()
    numerators = [[table[t][g] for g in groups] for t in range(steps)]
    if isinstance(opt.momentum, str):
        source = hypers[opt.momentum]
        rounded = (torch.round(source.double() * denominator) / denominator).to(source.dtype)
    else:
        rounded = float(n[0, 0].item()) / denominator
    return numerators, rounded


def _check_reversible(opt: InnerOptimizer) -> None:
    if not isinstance(opt, SGD):
        raise ValueError("exact reversal supports SGD with momentum only (Adam's update is not invertible this way)")
    if opt.nesterov:
        raise ValueError("exact reversal does not support Nesterov momentum")
    if not opt.has_momentum:
        raise ValueError("exact reversal needs momentum > 0 (momentum 0 destroys b_t: nothing to reverse)")


def _directions(train_loss: TrainLoss, opt: SGD, w: List[Tensor], hypers: Mapping[str, Tensor], t: int,
                steps: int, groups: List[int], num_groups: int, fixed: FixedPoint) -> List[Tensor]:
    """d_t = grad L_train(w_t) + lambda_t w_t on the fixed-point grid (a deterministic function of w_t)."""
    grads = torch.func.grad(lambda p: train_loss(p, hypers, t))(w)
    wd = value_at(opt.weight_decay, hypers, t, steps, num_groups)
    out = []
    for p, g, k in zip(w, grads, groups):
        decay = wd[k] if isinstance(wd, Tensor) else wd
        out.append(fixed.to_fixed(g.detach() if (not isinstance(decay, Tensor) and decay == 0)
                                  else (g + decay * p).detach()))
    return out


def _lr_steps(opt: SGD, b: List[Tensor], hypers: Mapping[str, Tensor], t: int, steps: int, groups: List[int],
              num_groups: int, fixed: FixedPoint) -> List[Tensor]:
    """eta_t b_{t+1} on the fixed-point grid."""
    lr = value_at(opt.lr, hypers, t, steps, num_groups)
    return [fixed.to_fixed((lr[k] if isinstance(lr, Tensor) else lr) * fixed.to_float(bq)) for bq, k in zip(b, groups)]


def reversible_sgd_forward(train_loss: TrainLoss, w0: Sequence[Tensor], hypers: Mapping[str, Tensor], optimizer: SGD,
                           steps: int, *, groups: Sequence[int], num_groups: int, radix_bits: int = 40,
                           momentum_bits: int = 16) -> ReversibleSGDRun:
    """T steps of SGD with momentum in fixed point, keeping only the information buffers.

    ``hypers`` must already hold the rounded momentum (see :func:`exact_reverse_hypergradient`).
    Time O(T gradient), memory O(n (64 + T log2(1/mu))) bits.
    """
    _check_reversible(optimizer)
    fixed = FixedPoint(radix_bits)
    denominator = 2 ** momentum_bits
    groups = list(groups)
    numerators, _ = _momentum_numerators(optimizer, hypers, steps, groups, num_groups, denominator)
    w = [fixed.to_fixed(p) for p in w0]
    b = [torch.zeros_like(q) for q in w]
    buffers = [np.zeros(tuple(q.shape), dtype=object) for q in w]
    dtype = w0[0].dtype
    start = [q.clone() for q in w]
    for t in range(steps):
        d = _directions(train_loss, optimizer, [fixed.to_float(q, dtype) for q in w], hypers, t, steps, groups,
                        num_groups, fixed)
        for j in range(len(w)):
            c = exact_multiply_(_digits(b[j].cpu().numpy()), buffers[j], numerators[t][j], denominator)
            b[j] = _from_digits(c, b[j]) + d[j]
        moves = _lr_steps(optimizer, b, hypers, t, steps, groups, num_groups, fixed)
        w = [q - m for q, m in zip(w, moves)]
    return ReversibleSGDRun(w=w, b=b, buffers=buffers, w0=start, numerators=numerators, denominator=denominator,
                            fixed=fixed)


def reversible_sgd_backward_(run: ReversibleSGDRun, train_loss: TrainLoss, hypers: Mapping[str, Tensor],
                            optimizer: SGD, steps: int, *, groups: Sequence[int], num_groups: int, dtype: torch.dtype):
    """Undo the run one step at a time: yields (t, w_t, b_t) as fixed-point tensors for t = T-1 ... 0.

    Consumes ``run`` (its w, b and buffers end at the initial state, the buffers at zero)."""
    fixed, groups = run.fixed, list(groups)
    w, b = run.w, run.b
    for t in range(steps - 1, -1, -1):
        moves = _lr_steps(optimizer, b, hypers, t, steps, groups, num_groups, fixed)
        w = [q + m for q, m in zip(w, moves)]
        d = _directions(train_loss, optimizer, [fixed.to_float(q, dtype) for q in w], hypers, t, steps, groups,
                        num_groups, fixed)
        for j in range(len(w)):
            c = exact_divide_(_digits((b[j] - d[j]).cpu().numpy()), run.buffers[j], run.numerators[t][j],
                              run.denominator)
            b[j] = _from_digits(c, b[j])
        run.w, run.b = w, b
        yield t, w, b


def exact_reverse_hypergradient(train_loss: TrainLoss, val_loss: ValLoss, init: Init, hypers: Mapping[str, Tensor],
                                optimizer: SGD, steps: int, *, groups: Optional[Sequence[int]] = None,
                                radix_bits: int = 40, momentum_bits: int = 16) -> Hypergradient:
    """df/dh for every tensor in ``hypers`` by reverse mode through the exact reversal of SGD with momentum.

    Same contract as :func:`ohotorch.hypergrad.reverse_hypergradient` (full horizon), with no stored
    trajectory. The weights are rounded to the grid 2**-radix_bits, momentum to 2**-momentum_bits.
    ``info`` reports ``buffer_bits``, ``trajectory_bytes`` (what storing (w_t, b_t) would cost),
    ``recovered_initial`` (True when the reversal ended exactly at the initial fixed-point weights with
    zero velocity and empty buffers), ``initial_max_rounding`` and ``momentum_used``.
    """
    _check_reversible(optimizer)
    if not 1 <= momentum_bits <= 30:
        raise ValueError(f"Invalid momentum_bits: {momentum_bits} (must be in [1, 30])")
    hypers, w0, groups, num_groups = _prepare(train_loss, init, hypers, optimizer, steps, groups)
    dtype = w0[0].dtype
    _, rounded = _momentum_numerators(optimizer, hypers, steps, groups, num_groups, 2 ** momentum_bits)
    if isinstance(optimizer.momentum, str):
        hypers = dict(hypers)
        hypers[optimizer.momentum] = rounded
        opt = optimizer
    else:
        opt = replace(optimizer, momentum=rounded)
    t0 = time.perf_counter()
    run = reversible_sgd_forward(train_loss, w0, hypers, opt, steps, groups=groups, num_groups=num_groups,
                                 radix_bits=radix_bits, momentum_bits=momentum_bits)
    fixed = run.fixed
    bits, memory = run.buffer_bits(), run.memory_bytes()
    t1 = time.perf_counter()
    w_T = [fixed.to_float(q, dtype) for q in run.w]
    b_T = [fixed.to_float(q, dtype) for q in run.b]
    loss, val_vjp = torch.func.vjp(lambda w, h: val_loss(w, h), w_T, hypers)
    grad_w, hyper_grads = val_vjp(torch.ones_like(loss))
    hyper_grads = {k: v.detach() for k, v in hyper_grads.items()}
    adjoint = {"w": list(grad_w), "b": [torch.zeros_like(x) for x in b_T]}
    step = _make_step(train_loss, opt, steps, groups, num_groups)
    for t, wq, bq in reversible_sgd_backward_(run, train_loss, hypers, opt, steps, groups=groups,
                                             num_groups=num_groups, dtype=dtype):
        s_t = {"w": [fixed.to_float(q, dtype) for q in wq], "b": [fixed.to_float(q, dtype) for q in bq]}
        _, step_vjp = torch.func.vjp(lambda s, h: step(s, h, t), s_t, hypers)
        adjoint, g_h = step_vjp(adjoint)
        adjoint = _detach(adjoint)
        for k in hyper_grads:
            hyper_grads[k] = hyper_grads[k] + g_h[k].detach()
    if callable(init):
        _, init_vjp = torch.func.vjp(lambda h: list(init(h)), hypers)
        (g_h,) = init_vjp(adjoint["w"])
        for k in hyper_grads:
            hyper_grads[k] = hyper_grads[k] + g_h[k].detach()
    t2 = time.perf_counter()
    recovered = (all(torch.equal(a, c) for a, c in zip(run.w, run.w0))
                 and all(not bool(q.any()) for q in run.b)
                 and all(not any(buf.ravel()) for buf in run.buffers))
    rounding = max(float((fixed.to_float(q, dtype) - p).abs().max()) for q, p in zip(run.w0, w0))
    n = sum(p.numel() for p in w0)
    return Hypergradient(
        val_loss=loss.detach(), grads=hyper_grads, params=w_T, mode="exact_reverse", steps=steps,
        steps_differentiated=steps, memory_bytes=memory,
        info={"buffer_bits": bits, "bits_per_weight_per_step": bits / (n * steps),
              "trajectory_bytes": steps * 2 * n * torch.tensor([], dtype=dtype).element_size(),
              "recovered_initial": recovered, "recovered_w0": [fixed.to_float(q, dtype) for q in run.w],
              "initial_max_rounding": rounding, "momentum_used": rounded, "radix_bits": radix_bits,
              "momentum_bits": momentum_bits, "forward_seconds": t1 - t0, "backward_seconds": t2 - t1,
              "grad_init": adjoint["w"]})
