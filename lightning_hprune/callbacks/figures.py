"""Where a run's report goes: its own log directory, and the images into every logger that takes them.

* :func:`run_directory`: one directory per run. The first TensorBoard or CSV logger's ``log_dir``
  (``.../version_N``); with other loggers only (MLflow, W&B, ...), ``<default_root_dir>/hprune/<name>/<version>``;
  with no logger, ``<default_root_dir>/hprune_logs/version_N`` (the next free N). Never the current
  directory itself.
* :func:`send_figures`: the figures' PNG files to TensorBoard (``add_image``), MLflow (``log_image``) and
  Weights & Biases (``log_image``, a ``wandb.Image`` per figure); any logger: the SVG (and PNG) files in the
  run directory.
* :func:`send_files`: the report's files as MLflow artifacts and W&B run files.

Rank zero only: nothing here is a collective.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn


def _next_version(root: str) -> str:
    versions = []
    if os.path.isdir(root):
        for name in os.listdir(root):
            m = re.fullmatch(r"version_(\d+)", name)
            if m:
                versions.append(int(m.group(1)))
    return os.path.join(root, f"version_{max(versions, default=-1) + 1}")


def run_directory(trainer: pl.Trainer) -> str:
    """The run's own log directory (see the module docstring); call it once per fit, on rank zero."""
    loggers: Sequence[Logger] = trainer.loggers
    for logger in loggers:
        if isinstance(logger, (TensorBoardLogger, CSVLogger)):
            return str(logger.log_dir)
    root = str(trainer.default_root_dir)
    if loggers:
        logger = loggers[0]
        name = str(logger.name or type(logger).__name__)
        return os.path.join(root, "hprune", name, str(logger.version))
    return _next_version(os.path.join(root, "hprune_logs"))


def takes_images(logger: Logger) -> bool:
    """Whether ``logger`` has an image API the figures go to (TensorBoard, MLflow, Weights & Biases)."""
    return isinstance(logger, (TensorBoardLogger, MLFlowLogger, WandbLogger))


def send_figures(trainer: pl.Trainer, png_paths: Mapping[str, str]) -> list[str]:
    """Log every figure to every logger that takes images; returns the loggers' class names that took them.

    Each figure is sent as the PNG already written (no figure is rendered again per logger).

    Args:
        trainer: the Trainer (its loggers and global step).
        png_paths: name -> the figure's PNG file.

    """
    took = []
    step = trainer.global_step
    for logger in trainer.loggers:
        if not takes_images(logger) or not png_paths:
            continue
        try:
            if isinstance(logger, TensorBoardLogger):
                for name, path in png_paths.items():
                    logger.experiment.add_image(
                        f"hprune/{name}", _rgb(path), global_step=step, dataformats="HWC"
                    )
                logger.experiment.flush()
            elif isinstance(logger, MLFlowLogger):
                for name, path in png_paths.items():
                    logger.experiment.log_image(logger.run_id, _rgb(path), f"hprune/{name}.png")
            elif isinstance(logger, WandbLogger):
                for name, path in png_paths.items():
                    logger.log_image(key=f"hprune/{name}", images=[path], step=step)
        except Exception as err:  # a logger that fails must not lose the run's other results
            rank_zero_warn(f"[hprune] could not log the figures to {type(logger).__name__}: {err}")
            continue
        took.append(type(logger).__name__)
    return took


def _rgb(path: str) -> Any:
    """A PNG file as an ``(H, W, 3)`` uint8 array (Pillow ships with matplotlib, which wrote the file)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def send_files(trainer: pl.Trainer, paths: Sequence[str]) -> None:
    """Attach the report's files to the run: MLflow artifacts (``hprune/``), W&B run files."""
    for logger in trainer.loggers:
        try:
            if isinstance(logger, MLFlowLogger):
                for path in paths:
                    logger.experiment.log_artifact(logger.run_id, path, artifact_path="hprune")
            elif isinstance(logger, WandbLogger):
                for path in paths:
                    logger.experiment.save(path, base_path=os.path.dirname(path), policy="now")
        except Exception as err:
            rank_zero_warn(f"[hprune] could not attach the report to {type(logger).__name__}: {err}")
