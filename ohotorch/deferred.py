r"""Values computed on the device and read on the host later, without making the host wait.

A training step on a GPU runs ahead of the device: Python queues kernels, the device executes them.
Reading a device value (``.item()``, ``.tolist()``, ``bool(tensor)``) makes the host wait until the
queue has drained, after which the device idles while Python queues the next kernels. The optimizer
therefore keeps its decisions on the device (``torch.where``) and brings what Python must know
(counters, warnings, diagnostics, the hyperparameters torch.optim keeps in ``param_groups``) back with
a :class:`Readback`: a copy into pinned host memory queued behind the work that produced it, with an
event that says when it has landed. :class:`Deferred` keeps them in order until they are read.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional

import torch
from torch import Tensor

__all__ = ["Readback", "Record", "Deferred"]


class Readback:
    """A copy of ``tensor`` on the host, queued without blocking (pinned memory and an event on CUDA)."""

    def __init__(self, tensor: Tensor) -> None:
        tensor = tensor.detach()
        self.event: Optional[torch.cuda.Event] = None
        if tensor.is_cuda:
            self.host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self.host.copy_(tensor, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = tensor.clone()

    def ready(self) -> bool:
        """Whether the copy has landed (never blocks)."""
        return self.event is None or self.event.query()

    def wait(self) -> bool:
        """Block until the copy has landed; returns whether that took a wait (the copy had not landed)."""
        if self.ready():
            return False
        assert self.event is not None
        self.event.synchronize()
        return True

    def tolist(self) -> List[Any]:
        self.wait()
        return self.host.tolist()


class Record:
    """One deferred result: ``consume(values)`` reports it (counters, warnings, diagnostics), once;
    ``apply(values)`` writes what it decided into the optimizer, once, after ``consume``.

    ``created`` is the optimizer's step count when it was made.
    """

    def __init__(self, created: int, readback: Readback, consume: Callable[[List[Any]], None],
                 apply: Optional[Callable[[List[Any]], None]] = None) -> None:
        self.created = created
        self.readback = readback
        self._consume = consume
        self._apply = apply
        self.values: Optional[List[Any]] = None

    def consume(self, deferred: "Deferred") -> List[Any]:
        if self.values is None:
            deferred.waits += int(self.readback.wait())
            self.values = self.readback.host.tolist()
            self._consume(self.values)
        return self.values

    def apply(self, deferred: "Deferred") -> None:
        values = self.consume(deferred)
        if self._apply is not None:
            self._apply(values)


class Deferred:
    """The records not yet applied, in the order they were made, and how often reading one had to wait.

    A copy (deepcopy, pickle) is empty: the optimizer settles every record before it is copied.
    """

    def __init__(self) -> None:
        self.records: List[Record] = []
        self.waits = 0

    def add(self, record: Record) -> None:
        self.records.append(record)

    def consume_all(self) -> None:
        """Report every record (blocking where its copy has not landed); apply none."""
        for record in self.records:
            record.consume(self)

    def apply(self, before: Optional[int] = None) -> None:
        """Apply, in order, every record made before step count ``before`` (all when None)."""
        keep: List[Record] = []
        for index, record in enumerate(self.records):
            if before is None or record.created < before:
                record.apply(self)
            else:
                keep = self.records[index:]
                break
        self.records = keep

    def discard(self) -> None:
        self.records = []

    def __reduce__(self) -> Any:
        return (Deferred, ())
