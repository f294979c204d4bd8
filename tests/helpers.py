"""Small real models and data for tests: fast on 2 CPU cores."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


def random_images(n: int = 128, size: int = 8, classes: int = 4, seed: int = 0) -> TensorDataset:
    """A learnable synthetic image task: the class sets which quadrant is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, 3, size, size, generator=g) * 0.3
    h = size // 2
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c % 4, 2)
        x[i, :, r * h : (r + 1) * h, col * h : (col + 1) * h] += 1.0
    return TensorDataset(x, y)


class TinyCNN(pl.LightningModule):
    """Conv-BN-ReLU x3 + 2 linear layers; optimizer and LR scheduler configurable."""

    def __init__(
        self,
        widths: tuple[int, int, int] = (16, 32, 32),
        classes: int = 4,
        size: int = 8,
        optimizer: str = "sgd",
        lr: float = 0.05,
        scheduler: str | None = None,
        set_example_input: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        a, b, c = widths
        self.features = nn.Sequential(
            nn.Conv2d(3, a, 3, padding=1),
            nn.BatchNorm2d(a),
            nn.ReLU(),
            nn.Conv2d(a, b, 3, padding=1),
            nn.BatchNorm2d(b),
            nn.ReLU(),
            nn.Conv2d(b, c, 3, padding=1),
            nn.BatchNorm2d(c),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * size * size, 32), nn.ReLU(), nn.Linear(32, classes)
        )
        if set_example_input:
            self.example_input_array = torch.zeros(1, 3, size, size)
        self.val_acc = MulticlassAccuracy(num_classes=classes, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc)
        self.log("val_loss", F.cross_entropy(logits, y))

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        if hp["optimizer"] == "adam":
            opt: torch.optim.Optimizer = torch.optim.Adam(self.parameters(), lr=hp["lr"])
        elif hp["optimizer"] == "adamw":
            opt = torch.optim.AdamW(self.parameters(), lr=hp["lr"], weight_decay=0.01)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=hp["lr"], momentum=0.9)
        if hp["scheduler"] == "step":
            return {
                "optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
            }
        if hp["scheduler"] == "cosine":
            return {
                "optimizer": opt,
                "lr_scheduler": torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10),
            }
        return opt


def loaders(
    n: int = 128, batch_size: int = 32, size: int = 8, classes: int = 4
) -> tuple[DataLoader, DataLoader]:
    train = random_images(n, size, classes, seed=0)
    val = random_images(max(n // 4, 32), size, classes, seed=1)
    return DataLoader(train, batch_size=batch_size, shuffle=True), DataLoader(val, batch_size=64)


def trainer(tmp_path: Any, callbacks: list, max_epochs: int = 4, **kwargs: Any) -> pl.Trainer:
    """A quiet CPU Trainer writing CSV logs under ``tmp_path``."""
    kwargs.setdefault("logger", pl.loggers.CSVLogger(str(tmp_path), name="logs"))
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=kwargs.pop("enable_checkpointing", False),
        default_root_dir=str(tmp_path),
        **kwargs,
    )
