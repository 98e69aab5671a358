r"""How the optimizer is being called: the misuse warnings, each given once per optimizer.

* ``hyper_step`` twice without a ``step`` between (the same hypergradient direction applied twice);
* :data:`STEPS_WITHOUT_HYPER_STEP` steps with tuning on and no ``hyper_step`` (nothing is being tuned);
* without ``module=``, buffers (BatchNorm running statistics) that change in OHO's own extra closure
  evaluations, watched in the first :data:`BUFFER_WATCHES` steps and hyper-steps through global module
  hooks and buffer version counters (nothing is copied);
* an lr written from outside, once per param group.

Cost: a few Python operations per step; the buffer watch only in its first steps.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, Set

import torch
from torch import nn

if TYPE_CHECKING:
    from .optimizer import OHO

__all__ = ["Usage", "STEPS_WITHOUT_HYPER_STEP", "BUFFER_WATCHES", "watch_unseen_buffers", "note_step"]


@dataclass
class Usage:
    """How the optimizer is being called, for the misuse warnings (each given once per optimizer).

    Not part of the state_dict (a resumed run starts afresh); copied with the optimizer.
    """

    steps_without_hyper_step: int = 0  # consecutive steps since the last hyper_step / hypergradient
    hyper_stepped: bool = False  # a hyper_step since the last step
    buffer_watches: int = 0  # steps / hyper-steps whose extra evaluations were watched for module buffers
    warned: Set[str] = field(default_factory=set)  # kinds of warning given ("lr/<group>", ...)

    def warn_once(self, kind: str, message: str) -> None:
        if kind not in self.warned:
            self.warned.add(kind)
            warnings.warn(message, stacklevel=_caller_stacklevel())


def _caller_stacklevel() -> int:
    """The stacklevel of the first frame outside ohotorch, torch and contextlib: the user's call."""
    internal = (os.path.dirname(__file__), os.path.dirname(torch.__file__), contextlib.__file__)
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(internal):
        frame, level = frame.f_back, level + 1
    return level


# Steps with tuning on and no hyper_step after which OHO warns that nothing is being tuned.
STEPS_WITHOUT_HYPER_STEP = 50
# Steps / hyper-steps whose extra closure evaluations are watched for buffers OHO cannot see (no module=).
BUFFER_WATCHES = 3


@contextlib.contextmanager
def watch_unseen_buffers(opt: "OHO") -> Iterator[None]:
    """Without ``module``, watch OHO's own closure evaluations (of the first few steps and hyper-steps)
    for modules whose buffers, or their submodules', change (BatchNorm's running statistics in training
    mode; the version counters tell, nothing is copied), and warn once: those evaluations update them
    again, which ``module=`` would prevent. Global module hooks see torch.compile'd models too (as one
    module) and cause no recompilation."""
    usage = opt._usage
    if opt.module is not None or "buffers" in usage.warned or usage.buffer_watches >= BUFFER_WATCHES:
        yield
        return
    usage.buffer_watches += 1
    versions: Dict[int, List[int]] = {}
    changed: List[str] = []

    def before(module: nn.Module, args: Any) -> None:
        versions[id(module)] = [b._version for b in module.buffers()]

    def after(module: nn.Module, args: Any, output: Any) -> None:
        seen = versions.pop(id(module), None)
        if seen is not None and seen != [b._version for b in module.buffers()]:
            changed.append(type(getattr(module, "_orig_mod", module)).__name__)  # torch.compile's wrapper

    handles = [nn.modules.module.register_module_forward_pre_hook(before),
               nn.modules.module.register_module_forward_hook(after)]
    try:
        with warnings.catch_warnings():  # torch.compile'd modules warn that global hooks exist
            warnings.filterwarnings("ignore", message=r"Using `torch.compile\(module\)` when there are global")
            yield
    finally:
        for handle in handles:
            handle.remove()
    if changed:
        usage.warn_once("buffers", (
            f"OHO: the closure updates module buffers ({changed[0]}, e.g. BatchNorm running statistics) "
            "in OHO's extra evaluations, so they absorb every Hessian-vector product and validation "
            f"evaluation. Pass module=model to {type(opt).__name__} to have them restored."))


def note_step(opt: "OHO", tuning: bool) -> None:
    usage = opt._usage
    usage.hyper_stepped = False
    usage.steps_without_hyper_step += 1
    if tuning and usage.steps_without_hyper_step >= STEPS_WITHOUT_HYPER_STEP:
        usage.warn_once("no hyper_step", (
            f"OHO: {usage.steps_without_hyper_step} steps with tuning on and no hyper_step: the "
            "hyperparameters move only in hyper_step(val_closure) (call it after each step, or every k "
            "steps). Pass tune=() for plain SGD / Adam."))
