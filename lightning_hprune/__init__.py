"""lightning_hprune: hierarchical structured pruning as PyTorch Lightning callbacks.

The names here are what a script or a LightningCLI YAML file writes; everything else stays importable from
its module (criteria from :mod:`lightning_hprune.core.importance`, the Lightning-free
:class:`~lightning_hprune.core.session.PruningSession`, the level base classes in
:mod:`lightning_hprune.core.levels`, export helpers in :mod:`lightning_hprune.export`, ...).
"""

from lightning_hprune.callbacks.hierarchical import HierarchicalPruning
from lightning_hprune.callbacks.levels import (
    BlockPruning,
    GlobalPruning,
    LayerPruning,
    UnitPruning,
    WindowPruning,
)
from lightning_hprune.checkpoint import load_pruned, restore_structure
from lightning_hprune.core.blocks import BlockLevel
from lightning_hprune.core.closed_loop import ClosedLoop
from lightning_hprune.core.distill import Distillation, HiddenStates
from lightning_hprune.core.graph import PruningError
from lightning_hprune.core.importance import IntegratedImportance
from lightning_hprune.core.levels import GlobalLevel, LayerLevel, UnitLevel, WindowLevel
from lightning_hprune.core.measure import LatencyMeasurement
from lightning_hprune.core.sensitivity import SensitivityAnalysis
from lightning_hprune.export import export_pruned

__version__ = "0.2.0.dev0"

__all__ = [
    "BlockLevel",
    "BlockPruning",
    "ClosedLoop",
    "Distillation",
    "GlobalLevel",
    "GlobalPruning",
    "HiddenStates",
    "HierarchicalPruning",
    "IntegratedImportance",
    "LatencyMeasurement",
    "LayerLevel",
    "LayerPruning",
    "PruningError",
    "SensitivityAnalysis",
    "UnitLevel",
    "UnitPruning",
    "WindowLevel",
    "WindowPruning",
    "__version__",
    "export_pruned",
    "load_pruned",
    "restore_structure",
]
