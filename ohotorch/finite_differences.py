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
:class:`ClosureIsolation` is the one place that evaluates a closure on the optimizer's behalf, for the
Hessian-vector products (:func:`fd_hvp`) and the validation gradient alike, and leaves the gradients,
the RNG, the module's buffers and the weights as it found them, on success or on any exception.
:class:`StepRollback`, taken when a step starts, puts back what the training evaluation changed too
(gradients, RNG, buffers) when any evaluation of the step fails.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, ContextManager, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["RNGSnapshot", "BufferSnapshot", "module_buffers", "GradSnapshot", "StepRollback", "ClosureIsolation",
           "fd_hvp", "check_loss", "clone_all", "relative_step", "perturbation_scale", "LOW_PRECISION_STEP"]


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
    return u ** (1.0 / 3.0) if scheme == "central" else math.sqrt(u)  # "none" evaluates nothing itself


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
    and restore are one multi-tensor copy per (device, dtype) each: a ResNet18 has 60 buffers, 20 of them
    int64 counters, and a multi-tensor op over a list of mixed dtypes falls back to one kernel per tensor
    on CUDA, several times a step. ``storage``, a list the caller keeps between steps, lends the copies'
    memory: later snapshots of the same buffers then allocate nothing.
    """

    def __init__(self, buffers: Iterable[Tensor], storage: Optional[List[Tensor]] = None) -> None:
        self.targets = [b for b in buffers]
        reusable = storage is not None and len(storage) == len(self.targets) and all(
            s.shape == b.shape and s.dtype == b.dtype and s.device == b.device
            for s, b in zip(storage, self.targets))
        if reusable:
            self.values = storage
            self.groups = _same_kind_groups(self.targets)
            with torch.no_grad():
                _copy_grouped_(self.values, self.targets, self.groups)
        else:
            self.values = clone_all(self.targets)
            self.groups = _same_kind_groups(self.targets)
            if storage is not None:
                storage[:] = self.values

    def restore(self) -> None:
        with torch.no_grad():
            _copy_grouped_(self.targets, self.values, self.groups)


def _same_kind_groups(tensors: Sequence[Tensor]) -> Optional[List[List[int]]]:
    """The positions of ``tensors`` grouped by (device, dtype), in order of first appearance; ``None``
    when they are all of one kind (the common case: one multi-tensor op over the whole list)."""
    if not tensors:
        return []
    first = tensors[0]
    dtype, device = first.dtype, first.device
    if all(t.dtype is dtype for t in tensors) and all(t.device == device for t in tensors):
        return None
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def _copy_grouped_(dst: List[Tensor], src: List[Tensor], groups: Optional[List[List[int]]]) -> None:
    """``dst[i].copy_(src[i])`` for every i, one ``torch._foreach_copy_`` per group of
    :func:`_same_kind_groups` (one kernel per group on CUDA, instead of one per tensor)."""
    if groups is None:
        torch._foreach_copy_(dst, src)
        return
    for group in groups:
        torch._foreach_copy_([dst[i] for i in group], [src[i] for i in group])


def module_buffers(module: torch.nn.Module) -> List[Tensor]:
    """``list(module.buffers())``: the same tensors in the same order, by a direct walk of the module tree.

    ``Module.buffers()`` goes through generator chains (``named_modules``, ``_named_members``) that cost
    several microseconds per submodule, and the optimizer lists the buffers up to three times a step.
    A module class that overrides how its members are listed gets ``module.buffers()`` itself.
    """
    root = type(module)
    if (root.buffers is not _MODULE_BUFFERS or root.named_buffers is not _MODULE_NAMED_BUFFERS
            or root._named_members is not _MODULE_NAMED_MEMBERS):
        return list(module.buffers())
    modules: set = set()
    seen: set = set()
    found: List[Tensor] = []

    def walk(m: torch.nn.Module) -> bool:  # named_modules' pre-order, each module once
        if type(m).named_modules is not _MODULE_NAMED_MODULES:
            return False
        modules.add(id(m))
        for b in m._buffers.values():
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                found.append(b)
        for child in m._modules.values():
            if child is not None and id(child) not in modules and not walk(child):
                return False
        return True

    return found if walk(module) else list(module.buffers())


_MODULE_BUFFERS = torch.nn.Module.buffers
_MODULE_NAMED_BUFFERS = torch.nn.Module.named_buffers
_MODULE_NAMED_MEMBERS = torch.nn.Module._named_members
_MODULE_NAMED_MODULES = torch.nn.Module.named_modules


class GradSnapshot:
    """The parameters' ``.grad`` tensors (the objects) and, when ``values`` is true, copies of their values.

    :meth:`restore` puts the same tensor objects back on the parameters; with ``values`` it first copies
    the saved values into them, so that a closure that zeroed them in place (``zero_grad(set_to_none=False)``),
    accumulated into them, or a DDP bucket view that a backward rewrote, read bit for bit as on capture.
    Without ``values`` it is free, and exact whenever the closure replaced the gradients (``zero_grad()``'s
    default ``set_to_none=True``) instead of writing into them. ``storage`` lends the copies memory kept
    between steps, as :class:`BufferSnapshot`'s (no allocation per step; the copies are never handed out).
    """

    def __init__(self, params: Sequence[Tensor], *, values: bool, storage: Optional[List[Tensor]] = None) -> None:
        self.params = list(params)
        self.grads = [p.grad for p in self.params]
        present = [g for g in self.grads if g is not None]
        copies = iter(BufferSnapshot(present, storage).values if values else [])
        self.values: Optional[List[Optional[Tensor]]] = (
            [next(copies) if g is not None else None for g in self.grads] if values else None)

    def starts(self) -> List[Optional[Tensor]]:
        """What a re-evaluation of a closure that just ran must start from, per parameter: the saved value
        where the closure kept the gradient tensor (it zeroed it in place, or added to it: gradient
        accumulation), ``None`` where it replaced it (``zero_grad()``'s default) or there was none, as
        then the closure's result does not depend on it."""
        assert self.values is not None, "GradSnapshot(values=False) keeps no values"
        return [value if grad is not None and p.grad is grad else None
                for p, grad, value in zip(self.params, self.grads, self.values)]

    def restore(self) -> None:
        if self.values is not None:
            with torch.no_grad():
                for grad, value in zip(self.grads, self.values):
                    if grad is not None and value is not None:
                        grad.copy_(value)
        for p, grad in zip(self.params, self.grads):
            p.grad = grad


class StepRollback:
    """What an optimizer step must put back if any closure evaluation of it fails.

    Taken on entry to ``step()``, before the training evaluation: the gradients (:class:`GradSnapshot`,
    with values when later evaluations follow), the RNG state and the module's buffers (a
    :class:`BufferSnapshot`, or ``None`` without a module). :meth:`restore` puts all three back; the
    weights and the optimizer state are the caller's (no change to them before the last evaluation).
    The RNG and buffers double as the ``replay`` of :class:`ClosureIsolation`.
    """

    def __init__(self, params: Sequence[Tensor], *, grad_values: bool, buffers: Optional[BufferSnapshot],
                 grad_storage: Optional[List[Tensor]] = None) -> None:
        self.grads = GradSnapshot(params, values=grad_values, storage=grad_storage)
        self.rng = RNGSnapshot().capture()
        self.buffers = buffers

    def restore(self) -> None:
        self.grads.restore()
        self.rng.restore()
        if self.buffers is not None:
            self.buffers.restore()


def clone_all(tensors: List[Tensor]) -> List[Tensor]:
    """Detached copies of ``tensors``, one multi-tensor copy (``torch._foreach_copy_``) per (device, dtype)."""
    copies = [torch.empty_like(t) for t in tensors]
    if copies:
        with torch.no_grad():
            _copy_grouped_(copies, list(tensors), _same_kind_groups(tensors))
    return copies


def check_loss(loss: Any, what: str) -> None:
    """Refuse a closure result that is not a loss (``None`` or not a Tensor / number)."""
    if loss is None:
        raise TypeError(f"{what} returned no loss: it must compute the loss, call backward and return it")
    if not isinstance(loss, (Tensor, float, int)):
        raise TypeError(f"{what} must return the loss (a Tensor or number), got {type(loss).__name__}")


class ClosureIsolation:
    """Evaluate closures for the optimizer and leave everything the user had as it was.

    On entry it keeps the parameters' gradients (the tensors themselves, plus a copy of those that are
    views into a larger buffer: DDP's ``gradient_as_bucket_view`` and flat-buffer hooks rewrite that
    memory in every backward, fresh autograd gradients are never views), the RNG state, the module's
    buffers (when ``buffers`` is given) and a copy of ``weights`` (the parameters :meth:`perturb_`
    moves). On exit, normal or by any exception (``KeyboardInterrupt`` included), it puts all of them
    back: ``p.grad`` is the same tensor with the same values, RNG and buffers are as on entry, and the
    weights are restored by copy, never by undoing arithmetic.

    Args:
        params: every parameter whose ``.grad`` the closures may write.
        weights: the parameters to snapshot for :meth:`perturb_` (default: none).
        buffers: a :class:`BufferSnapshot` factory's result taken now, or ``None`` (no module).
        replay: ``(rng, buffers)`` to restore before every evaluation, so that each one sees the
            dropout masks and buffers of an earlier evaluation (``buffers`` may be ``None``).
        start: the gradients every evaluation starts from, one per parameter (``None``: cleared); each
            evaluation gets fresh copies, the tensors given are never written. ``None`` (the default)
            clears every gradient. A closure that does not clear gradients (gradient accumulation) then
            adds to the same starting point in every evaluation, and finite differences of its results
            cancel it. :meth:`GradSnapshot.starts` gives the starts of a training evaluation.
        foreach: move the weights with ``torch._foreach_*`` ops (decided once by the caller).
        weight_storage: a list the caller keeps between steps that lends the weight copies its memory
            (as :class:`BufferSnapshot`'s ``storage``): no allocation per step.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        *,
        weights: Sequence[Tensor] = (),
        buffers: Optional[BufferSnapshot] = None,
        replay: Optional[Tuple[RNGSnapshot, Optional[BufferSnapshot]]] = None,
        start: Optional[Sequence[Optional[Tensor]]] = None,
        foreach: bool = False,
        weight_storage: Optional[List[Tensor]] = None,
    ) -> None:
        self.params = list(params)
        self.weight_storage = weight_storage
        self.weights = list(weights)
        self.buffers = buffers
        self.replay = replay
        self.start = None if start is None or all(g is None for g in start) else list(start)
        self.foreach = foreach
        if self.start is not None and len(self.start) != len(self.params):
            raise ValueError("ClosureIsolation: start needs one entry per parameter")

    def __enter__(self) -> "ClosureIsolation":
        self.kept_grads = [p.grad for p in self.params]
        views = [g for g in self.kept_grads if g is not None and g._base is not None]
        copies = iter(clone_all(views))
        self.grad_backups = [next(copies) if g is not None and g._base is not None else None
                             for g in self.kept_grads]
        # Zero-size tensors share data_ptr 0 and hold nothing that could be overwritten.
        self.kept_pointers = {g.data_ptr() for g in self.kept_grads if g is not None and g.numel() > 0}
        self.rng = RNGSnapshot().capture()
        self.weight_copies = BufferSnapshot(self.weights, self.weight_storage).values
        # Whether the weights may differ from their copies: set before anything can write them
        # (perturb_, a closure evaluation), cleared by restore_weights. While clean, the weights hold
        # their entry values bit for bit, so copying them back would write the same bits: skipped.
        self.weights_moved = False
        return self

    def perturb_(self, direction: Sequence[Tensor], scale: Union[float, Tensor]) -> None:
        """Set ``weights`` to their entry values plus ``scale * direction`` (``scale`` a float, or a 0-d
        tensor on the weights' device: then nothing is read on the host)."""
        restore = self.weights_moved  # clean: the weights are their entry values already
        self.weights_moved = True
        if isinstance(scale, Tensor):
            if self.foreach:
                if restore:
                    torch._foreach_copy_(self.weights, self.weight_copies)
                torch._foreach_add_(self.weights, torch._foreach_mul(list(direction), scale))
            else:
                for w, copy, v in zip(self.weights, self.weight_copies, direction):
                    (w.copy_(copy) if restore else w).add_(v * scale)
            return
        if self.foreach:
            if restore:
                torch._foreach_copy_(self.weights, self.weight_copies)
            torch._foreach_add_(self.weights, list(direction), alpha=scale)
        else:
            for w, copy, v in zip(self.weights, self.weight_copies, direction):
                (w.copy_(copy) if restore else w).add_(v, alpha=scale)

    def restore_weights(self) -> None:
        """Copy the entry values back into ``weights`` (nothing to do while they have not moved)."""
        if not self.weights_moved:
            return
        if self.foreach and self.weights:
            torch._foreach_copy_(self.weights, self.weight_copies)
        else:
            for w, copy in zip(self.weights, self.weight_copies):
                w.copy_(copy)
        self.weights_moved = False

    def evaluate(self, closure: Callable[[], Any], what: str) -> Tuple[Any, List[Optional[Tensor]]]:
        """Run ``closure`` from cleared gradients (or copies of ``start``); returns its loss and the
        gradients of ``params``.

        The returned gradients are tensors of their own: when the closure wrote into the memory of a kept
        gradient (a view), they are copied out and the kept gradient is restored from its backup.
        """
        if self.replay is not None:
            rng, buffers = self.replay
            rng.restore()  # the same dropout masks as the evaluation replayed
            if buffers is not None:
                buffers.restore()  # the same buffers as it saw
        if self.start is None:
            for p in self.params:
                p.grad = None  # the closure's backward allocates fresh gradients
        else:
            present = [g for g in self.start if g is not None]
            copies = iter(clone_all(present))
            for p, g in zip(self.params, self.start):
                p.grad = next(copies) if g is not None else None
        if self.weights:
            self.weights_moved = True  # a closure may write them (an in-place constraint, say)
        with torch.enable_grad():
            loss = closure()
        check_loss(loss, what)
        grads = [p.grad for p in self.params]
        aliased = [i for i, g in enumerate(grads)
                   if g is not None and g.numel() > 0 and g.data_ptr() in self.kept_pointers]
        if aliased:
            if any(self.grad_backups[i] is None for i in aliased):  # never silently: the gradient is gone
                raise RuntimeError(
                    f"OHO: the {what} wrote its gradient into the memory of the training gradient, which is "
                    "not a view OHO could have foreseen; please report this setup")
            grads = [g.clone() if g is not None else None for g in grads]
            for kept, backup in zip(self.kept_grads, self.grad_backups):
                if backup is not None:
                    kept.copy_(backup)
        return loss, grads

    def __exit__(self, *exc_info: Any) -> None:
        # Each restoration runs even if an earlier one fails; the first failure is raised afterwards.
        errors: List[BaseException] = []
        for restore in (self.restore_weights, self._restore_grads, self.rng.restore,
                        self.buffers.restore if self.buffers is not None else None):
            if restore is None:
                continue
            try:
                restore()
            except BaseException as error:  # re-raised below
                errors.append(error)
        if errors and exc_info[0] is None:
            raise errors[0]

    def _restore_grads(self) -> None:
        for p, grad in zip(self.params, self.kept_grads):
            p.grad = grad


def fd_hvp(
    isolation: ClosureIsolation,
    closure: Callable[[], Any],
    tangent: Sequence[Tensor],
    train_grads: Sequence[Tensor],
    *,
    eps: Union[float, Tensor],
    scheme: str,
    inverse: Optional[Tensor] = None,
    along: Optional[Callable[[Union[float, Tensor]], ContextManager[Any]]] = None,
) -> List[Tensor]:
    """H v at the isolation's weights by finite differences of ``closure`` (``scheme``: forward or central).

    ``along`` (optional) perturbs something else the closure reads together with the weights: each
    evaluation at ``w + shift * v`` runs inside ``along(shift)``. With a loss hyperparameter rho that reads
    ``rho + shift`` there, the result is H v + dg/drho (see :mod:`ohotorch.loss_hyperparameters`).

    ``tangent`` is v, one tensor per entry of ``isolation.weights``; ``train_grads`` the gradient at the
    unperturbed weights (forward differences reuse it). Returns tensors of its own; the weights end at
    their saved values (by copy). foreach is the isolation's, decided once by its caller.

    ``eps`` may be a 0-d tensor on the weights' device, with ``inverse`` = 1/eps (0 where eps is 0: a
    tangent with nothing to perturb reads H v = 0): then nothing is read on the host.
    """
    index = {id(p): i for i, p in enumerate(isolation.params)}
    positions = [index[id(w)] for w in isolation.weights]

    def gradient_at(shift: float) -> List[Tensor]:
        isolation.perturb_(tangent, shift)
        with contextlib.nullcontext() if along is None else along(shift):
            _, grads = isolation.evaluate(closure, "closure")
        return [grads[i] if grads[i] is not None else torch.zeros_like(w)
                for i, w in zip(positions, isolation.weights)]

    plus = gradient_at(eps)
    if scheme == "central":
        minus: Sequence[Tensor] = gradient_at(-eps)
        scale = 2.0 * eps
    else:
        minus, scale = train_grads, eps
    isolation.restore_weights()  # exact: the perturbation is never undone arithmetically
    if isinstance(scale, Tensor):
        if inverse is None:
            raise ValueError("fd_hvp: a tensor eps needs its inverse")
        factor = inverse / 2.0 if scheme == "central" else inverse
        if isolation.foreach:
            torch._foreach_sub_(plus, list(minus))
            torch._foreach_mul_(plus, factor)
        else:
            for a, b in zip(plus, minus):
                a.sub_(b).mul_(factor)
        return plus
    if isolation.foreach:
        torch._foreach_sub_(plus, list(minus))
        torch._foreach_div_(plus, scale)
    else:
        for a, b in zip(plus, minus):
            a.sub_(b).div_(scale)
    return plus
