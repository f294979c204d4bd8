"""Known model layouts, pruned by their structure instead of a traced dependency graph.

torch-pruning's grouping does not finish on Llama-style decoders and breaks on GPT-2's fused ``Conv1D``; and
a traced graph knows nothing of a model's config, so a pruned Hugging Face model no longer matches its own
description. A family knows the layout: it builds the coupled groups directly (in milliseconds), prunes them
by slicing parameters, removes layers from the layer list, and keeps the config true after every change
(:class:`TransformerFamily` for the declarative layouts, :class:`SwinFamily` for Hugging Face Swin).
:func:`detect` returns the family of a model, or ``None`` for models the dependency graph handles.
"""

from __future__ import annotations

import torch.nn as nn

from lightning_hprune.core.families.base import Family, FamilyGroup, Slot
from lightning_hprune.core.families.swin import SwinFamily
from lightning_hprune.core.families.transformer import LAYOUTS, Layout, TransformerFamily

#: The family classes :func:`detect` tries, in order.
FAMILIES: tuple[type[Family], ...] = (TransformerFamily, SwinFamily)


def detect(model: nn.Module) -> Family | None:
    """The family of ``model`` (or of the Hugging Face model inside it), or ``None``."""
    for cls in FAMILIES:
        found = cls.detect(model)
        if found is not None:
            return found
    return None


__all__ = [
    "FAMILIES",
    "LAYOUTS",
    "Family",
    "FamilyGroup",
    "Layout",
    "Slot",
    "SwinFamily",
    "TransformerFamily",
    "detect",
]
