"""``hprune``: a LightningCLI whose model, data, trainer and pruning callbacks all come from YAML.

Example::

    hprune fit --config examples/digits_cnn.yaml

Model and data are given by ``class_path`` (any importable LightningModule / LightningDataModule; the
current directory is importable, as with ``python -m``). Pruning callbacks go under ``trainer.callbacks``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the ``hprune`` LightningCLI; ``args`` defaults to ``sys.argv[1:]``."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    return LightningCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=list(args) if args is not None else None,
        run=run,
        save_config_kwargs={"overwrite": True},
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``hprune`` console command."""
    build_cli(args)


if __name__ == "__main__":  # pragma: no cover
    main()
