"""A CNN on scikit-learn's bundled digits (no download): the project's main example.

``DigitsCNN`` has 5 convolution layers and 2 fully connected layers (about 1.6 M parameters) and reaches
about 98-99 % validation accuracy within a few CPU minutes. ``DigitsDataModule`` upsamples the 8x8 images
to 16x16 and uses a fixed 80/20 train/validation split.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy


def load_digits_tensors(size: int = 16, seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Digits as ``(N, 1, size, size)`` float tensors in [0, 1], split 80/20 with a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_val = len(y) // 5
    val, train = perm[:n_val], perm[n_val:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class DigitsDataModule(pl.LightningDataModule):
    """scikit-learn's digits, upsampled, fixed split.

    Args:
        batch_size: training and validation batch size.
        size: image side after upsampling.
        limit: keep only the first ``limit`` training samples (for quick tests).

    """

    def __init__(self, batch_size: int = 64, size: int = 16, limit: int | None = None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.size = size
        self.limit = limit

    def setup(self, stage: str) -> None:
        """Build the datasets (the digits ship with scikit-learn)."""
        self.train_set, self.val_set = load_digits_tensors(self.size)
        if self.limit is not None:
            self.train_set = TensorDataset(*(t[: self.limit] for t in self.train_set.tensors))
            self.val_set = TensorDataset(*(t[: max(self.limit // 4, 32)] for t in self.val_set.tensors))

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches (seeded by Lightning's ``seed_everything``)."""
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return DataLoader(self.val_set, batch_size=256)


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    """3x3 convolution, batch norm, ReLU."""
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class DigitsCNN(pl.LightningModule):
    """5 convolution + 2 fully connected layers for 10-class digits.

    Args:
        widths: output channels of the five convolutions.
        hidden: width of the first fully connected layer.
        size: input image side (16 by default).
        lr: AdamW learning rate (cosine-annealed over ``max_epochs``).
        weight_decay: AdamW weight decay.
        optimizer: ``"adamw"`` or ``"sgd"`` (momentum 0.9).

    """

    def __init__(
        self,
        widths: tuple[int, int, int, int, int] = (32, 64, 128, 128, 256),
        hidden: int = 256,
        size: int = 16,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        w = list(widths)
        self.features = nn.Sequential(
            conv_bn(1, w[0]),
            conv_bn(w[0], w[1]),
            nn.MaxPool2d(2),
            conv_bn(w[1], w[2]),
            conv_bn(w[2], w[3]),
            nn.MaxPool2d(2),
            conv_bn(w[3], w[4]),
        )
        side = size // 4
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(w[4] * side * side, hidden),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(hidden, 10),
        )
        self.example_input_array = torch.zeros(1, 1, size, size)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.classifier(self.features(x))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy on a training batch."""
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Validation loss and accuracy (``val_acc``)."""
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> Any:
        """AdamW (or SGD) with a cosine schedule over the run."""
        if self.hparams["optimizer"] == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(),
                lr=self.hparams["lr"],
                momentum=0.9,
                weight_decay=self.hparams["weight_decay"],
            )
        else:
            opt = torch.optim.AdamW(
                self.parameters(), lr=self.hparams["lr"], weight_decay=self.hparams["weight_decay"]
            )
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 10
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class DigitsResNet(DigitsCNN):
    """A ResNet-20-like network for 16x16 digits: a 3x3 stem, three stages of ``BasicBlock``, a linear head.

    Reuses :class:`~lightning_hprune.examples.digits.DigitsCNN`'s training, validation and optimizer.

    Args:
        widths: channels of the three stages (the 2nd and 3rd halve the resolution).
        blocks: ``BasicBlock`` s per stage.
        size: input image side.
        lr: AdamW learning rate (cosine-annealed over ``max_epochs``).
        weight_decay: AdamW weight decay.
        optimizer: ``"adamw"`` or ``"sgd"``.

    """

    def __init__(
        self,
        widths: tuple[int, int, int] = (32, 64, 128),
        blocks: tuple[int, int, int] = (3, 3, 3),
        size: int = 16,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
    ) -> None:
        from torchvision.models.resnet import BasicBlock  # optional dependency (the `examples` extra)

        pl.LightningModule.__init__(self)
        self.save_hyperparameters(
            {
                "widths": tuple(widths),
                "blocks": tuple(blocks),
                "size": size,
                "lr": lr,
                "weight_decay": weight_decay,
                "optimizer": optimizer,
            }
        )
        w = list(widths)
        layers: list[nn.Module] = [
            nn.Sequential(nn.Conv2d(1, w[0], 3, padding=1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
        ]
        c_in = w[0]
        for stage, (c_out, n) in enumerate(zip(w, blocks, strict=True)):
            stride = 1 if stage == 0 else 2
            down = None
            if stride != 1 or c_in != c_out:
                down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
            layers.append(
                nn.Sequential(
                    BasicBlock(c_in, c_out, stride, down), *[BasicBlock(c_out, c_out) for _ in range(n - 1)]
                )
            )
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, 10))
        self.example_input_array = torch.zeros(1, 1, size, size)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")


class DigitsViT(DigitsCNN):
    """A small Vision Transformer (timm's ``VisionTransformer``, random init) for 16x16 digits.

    Pruning it exercises the transformer path: whole encoder blocks, attention heads (timm's fused
    ``qkv``), MLP widths and the residual stream. Reuses :class:`DigitsCNN`'s training, validation and
    optimizer. Needs ``timm`` (the ``dev`` extra).

    Args:
        embed_dim: width of the residual stream.
        depth: encoder blocks.
        num_heads: attention heads per block (``head_dim = embed_dim // num_heads``).
        mlp_ratio: MLP hidden width as a multiple of ``embed_dim``.
        patch_size: side of a patch (16 / patch_size tokens per side).
        size: input image side.
        lr: AdamW learning rate (cosine-annealed over ``max_epochs``).
        weight_decay: AdamW weight decay.
        optimizer: ``"adamw"`` or ``"sgd"``.

    """

    def __init__(
        self,
        embed_dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: float = 2.0,
        patch_size: int = 4,
        size: int = 16,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        optimizer: str = "adamw",
    ) -> None:
        from timm.models.vision_transformer import VisionTransformer  # optional dependency

        pl.LightningModule.__init__(self)
        self.save_hyperparameters(
            {
                "embed_dim": embed_dim,
                "depth": depth,
                "num_heads": num_heads,
                "mlp_ratio": mlp_ratio,
                "patch_size": patch_size,
                "size": size,
                "lr": lr,
                "weight_decay": weight_decay,
                "optimizer": optimizer,
            }
        )
        self.vit = VisionTransformer(
            img_size=size,
            patch_size=patch_size,
            in_chans=1,
            num_classes=10,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
        )
        self.example_input_array = torch.zeros(1, 1, size, size)
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.vit(x)
