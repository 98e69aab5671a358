"""Offline hypergradients of unrolled training runs (reverse and forward mode, exact reversal) and
projected outer steps."""
from __future__ import annotations

from .inner import SGD, Adam
from .unrolled import Hypergradient, forward_hypergradient, reverse_hypergradient, unroll

__all__ = ["SGD", "Adam", "Hypergradient", "unroll", "reverse_hypergradient", "forward_hypergradient"]
