"""torch.optim's keyword arguments that OHO accepts at their default values only.

Training code written for torch.optim (Hugging Face's Trainer, nanoGPT's ``configure_optimizers``)
passes ``fused``, ``foreach``, ``maximize``, ``capturable``, ``differentiable`` (and, for Adam,
``amsgrad`` and ``decoupled_weight_decay``) explicitly. :class:`ohotorch.OHO`, :class:`ohotorch.OHOAdam`
and :class:`ohotorch.OHOAdamW` take them with torch's names and positions, accept the values that mean
torch's default behaviour, and refuse the others with a message that says what to do instead.
``foreach`` is a real option of every OHO optimizer (:class:`ohotorch.options.Options`).
"""
from __future__ import annotations

from typing import Any, Dict

__all__ = ["UNSUPPORTED", "check_torch_arguments"]

# The accepted value(s) of each argument, and what to do instead of the refused ones.
UNSUPPORTED: Dict[str, str] = {
    "fused": "{cls} has no fused kernel: it updates the weights and the influence with torch._foreach_* "
             "kernels (foreach=True, the default on CUDA). Remove fused=True (or pass fused=None)",
    "amsgrad": "{cls} does not implement AMSGrad (the running maximum of v has no tangent OHO carries). Pass "
               "amsgrad=False, or keep torch.optim's optimizer with a fixed lr for AMSGrad",
    "maximize": "{cls} minimises. Return the negated objective from the closures (loss = -objective) and pass "
                "maximize=False",
    "capturable": "{cls}'s step cannot be captured in a CUDA graph (its finite-difference Hessian-vector "
                  "products and hypergradients read scalars on the host). Pass capturable=False",
    "differentiable": "{cls} computes hypergradients itself by forward mode; its step is not differentiable by "
                      "autograd. Pass differentiable=False",
    "decoupled_weight_decay": "{cls} uses L2 weight decay through the gradient (torch.optim.Adam). For decoupled "
                              "weight decay use ohotorch.OHOAdamW instead of decoupled_weight_decay=True",
}


def check_torch_arguments(cls: str, **arguments: Any) -> None:
    """Refuse any of torch.optim's arguments that asks for behaviour other than the default.

    Every argument of :data:`UNSUPPORTED` accepts ``False`` (``fused`` also ``None``, its torch default):
    a true value raises ValueError naming the class ``cls`` and saying what to do.
    """
    for name, value in arguments.items():
        if name not in UNSUPPORTED:
            raise TypeError(f"{cls} got an unexpected keyword argument {name!r}")
        if value is None and name == "fused":
            continue
        if not isinstance(value, (bool, int)):
            raise TypeError(f"{cls}: {name} must be a bool, got {value!r}")
        if value:
            raise ValueError(f"{cls} does not support {name}={value!r}. " + UNSUPPORTED[name].format(cls=cls))
