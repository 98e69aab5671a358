"""ohotorch: online hyperparameter optimisation as a drop-in torch.optim.Optimizer.

``ohotorch.OHO`` trains like torch.optim.SGD (``OHOAdam`` / ``OHOAdamW`` like torch.optim.Adam / AdamW)
and tunes lr / weight decay (/ momentum) while it trains, from forward-mode (real-time recurrent)
hypergradients of a validation loss.
"""
from __future__ import annotations

from .adam import OHOAdam, OHOAdamW
from . import hypergrad
from .groups import cycle, grouped, layerwise, share, split_decay
from .hypergrad import exact_reverse_hypergradient, forward_hypergradient, reverse_hypergradient
from .optimizer import OHO

__all__ = ["OHO", "OHOAdam", "OHOAdamW", "layerwise", "grouped", "share", "split_decay", "cycle", "hypergrad",
           "reverse_hypergradient", "forward_hypergradient", "exact_reverse_hypergradient", "__version__"]
__version__ = "0.1.0"
