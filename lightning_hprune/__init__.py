"""lightning_hprune: hierarchical structured pruning as a PyTorch Lightning callback."""

from lightning_hprune.callbacks import HierarchicalPruning, PruningCallback
from lightning_hprune.callbacks.levels import (
    BlockPruning,
    GlobalPruning,
    LayerPruning,
    UnitPruning,
    WindowPruning,
)
from lightning_hprune.checkpoint import load_pruned, restore_structure
from lightning_hprune.core.blocks import BlockLevel
from lightning_hprune.core.graph import PruningError
from lightning_hprune.core.importance import (
    ActivationImportance,
    BNScaleImportance,
    Importance,
    IntegratedImportance,
    MagnitudeImportance,
    RandomImportance,
    TaylorImportance,
)
from lightning_hprune.core.levels import (
    GlobalLevel,
    LayerLevel,
    Level,
    ModuleLevel,
    UniformLevel,
    UnitLevel,
    WindowLevel,
)
from lightning_hprune.core.sensitivity import SensitivityAnalysis, measure_sensitivity, sensitivity_ratios
from lightning_hprune.export import ExportMismatchError, export_pruned, load_exported

__version__ = "0.1.0.dev0"

__all__ = [
    "ActivationImportance",
    "BNScaleImportance",
    "BlockLevel",
    "BlockPruning",
    "ExportMismatchError",
    "GlobalLevel",
    "GlobalPruning",
    "HierarchicalPruning",
    "Importance",
    "IntegratedImportance",
    "LayerLevel",
    "LayerPruning",
    "Level",
    "MagnitudeImportance",
    "ModuleLevel",
    "PruningCallback",
    "PruningError",
    "RandomImportance",
    "SensitivityAnalysis",
    "TaylorImportance",
    "UniformLevel",
    "UnitLevel",
    "UnitPruning",
    "WindowLevel",
    "WindowPruning",
    "__version__",
    "export_pruned",
    "load_exported",
    "load_pruned",
    "measure_sensitivity",
    "restore_structure",
    "sensitivity_ratios",
]
