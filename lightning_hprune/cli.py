"""``hprune``: a LightningCLI whose model, data, trainer and pruning callbacks all come from YAML.

Example::

    hprune fit --config examples/digits_cnn.yaml
    hprune fit --trainer.callbacks.help HierarchicalPruning   # every option of the callback
    hprune fit --config examples/digits_cnn.yaml --print_config
    hprune report logs/digits_cnn/csv/version_0               # rebuild a finished run's report

Model and data are given by ``class_path`` (any importable LightningModule / LightningDataModule; the
current directory is importable, as with ``python -m``). Pruning callbacks go under ``trainer.callbacks``.
``hprune report`` sits beside LightningCLI's subcommands (``fit``, ``validate``, ``test``, ``predict``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI

REPORT_HELP = "rebuild the figures and pruning_report.html of a finished run from its hprune_report.json"


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
        parser_kwargs={"epilog": f"Also: `hprune report LOG_DIR` to {REPORT_HELP}."},
    )


def report(args: Sequence[str]) -> int:
    """``hprune report LOG_DIR [--out DIR]``: rebuild a finished run's report; prints the HTML's path."""
    from lightning_hprune.report import rebuild_report

    parser = argparse.ArgumentParser(
        prog="hprune report", description=REPORT_HELP[0].upper() + REPORT_HELP[1:] + "."
    )
    parser.add_argument("log_dir", help="the run's log directory (or its hprune_report.json)")
    parser.add_argument("--out", default=None, help="where to write (default: the run's directory)")
    ns = parser.parse_args(list(args))
    try:
        files = rebuild_report(ns.log_dir, ns.out)
    except (FileNotFoundError, ValueError) as err:
        parser.exit(2, f"hprune report: error: {err}\n")
    print(files.html)
    for name, paths in files.figures.items():
        print(f"{name}: {', '.join(paths.values())}")
    return 0


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``hprune`` console command."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "report":
        report(argv[1:])
        return
    build_cli(args)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":  # pragma: no cover
    main()
