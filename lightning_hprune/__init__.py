"""lightning_hprune: hierarchical structured pruning as a PyTorch Lightning callback."""

from lightning_hprune.callbacks import HierarchicalPruning, PruningCallback
from lightning_hprune.checkpoint import load_pruned, restore_structure
from lightning_hprune.core.graph import PruningError
from lightning_hprune.core.importance import Importance, MagnitudeImportance, RandomImportance
from lightning_hprune.core.levels import GlobalLevel, Level, UniformLevel

__version__ = "0.1.0.dev0"

__all__ = [
    "GlobalLevel",
    "HierarchicalPruning",
    "Importance",
    "Level",
    "MagnitudeImportance",
    "PruningCallback",
    "PruningError",
    "RandomImportance",
    "UniformLevel",
    "__version__",
    "load_pruned",
    "restore_structure",
]
