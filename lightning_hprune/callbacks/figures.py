"""Where a run's report goes: its own log directory, and the images into every logger that takes them.

* :func:`run_directory`: one directory per run. The first TensorBoard or CSV logger's ``log_dir``
  (``.../version_N``); with other loggers only (MLflow, W&B, ...), ``<default_root_dir>/hprune/<name>/<version>``;
  with no logger, ``<default_root_dir>/hprune_logs/version_N`` (the next free N). Never the current
  directory itself.
* :func:`send_figures`: TensorBoard (``add_figure``), MLflow (``log_figure``), Weights & Biases
  (``log_image``, a ``wandb.Image`` per figure); any logger: the PNG and SVG files in the run directory.
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


def send_figures(trainer: pl.Trainer, figures: Mapping[str, Any], png_paths: Mapping[str, str]) -> list[str]:
    """Log every figure to every logger that takes images; returns the loggers' class names that took them.

    Args:
        trainer: the Trainer (its loggers and global step).
        figures: name -> matplotlib figure.
        png_paths: name -> the figure's PNG file (for W&B, which logs images from files or arrays).

    """
    took = []
    step = trainer.global_step
    for logger in trainer.loggers:
        try:
            if isinstance(logger, TensorBoardLogger):
                for name, fig in figures.items():
                    logger.experiment.add_figure(f"hprune/{name}", fig, global_step=step, close=False)
                logger.experiment.flush()
            elif isinstance(logger, MLFlowLogger):
                for name, fig in figures.items():
                    logger.experiment.log_figure(logger.run_id, fig, f"hprune/{name}.png")
            elif isinstance(logger, WandbLogger):
                for name in figures:
                    logger.log_image(key=f"hprune/{name}", images=[png_paths[name]], step=step)
            else:
                continue
        except Exception as err:  # a logger that fails must not lose the run's other results
            rank_zero_warn(f"[hprune] could not log the figures to {type(logger).__name__}: {err}")
            continue
        took.append(type(logger).__name__)
    return took


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
