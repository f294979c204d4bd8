"""Thin Lightning callbacks over :mod:`lightning_hprune.core`."""

from lightning_hprune.callbacks.base import PruningCallback
from lightning_hprune.callbacks.hierarchical import HierarchicalPruning

__all__ = ["HierarchicalPruning", "PruningCallback"]
