"""A small Llama-architecture language model trained from scratch on text every machine has: Python's own source.

Data: the ``.py`` files of the standard library (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` and the
``test`` suite left out), as UTF-8 bytes; a file goes to validation when the first byte of the SHA-1 of its
relative path is below ``val_fraction * 256`` (a fixed split by file). Tokens are bytes (256 values) plus
``<pad>``, ``<bos>`` and ``<eos>``: nothing to download, no tokenizer to train. Training windows are drawn at
random (seeded) from the training bytes each epoch; validation uses fixed windows.

Model: ``transformers.LlamaForCausalLM`` from a config (random init): grouped-query attention, SwiGLU FFN,
RMSNorm, rotary positions. ``val_ppl`` is the validation perplexity per byte (``exp`` of the mean loss).
"""

from __future__ import annotations

import hashlib
import math
import os
import sysconfig
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

PAD, BOS, EOS = 256, 257, 258
VOCAB = 259


def stdlib_source(val_fraction: float = 0.1, root: str | None = None) -> tuple[bytes, bytes]:
    """``(train bytes, validation bytes)`` of the standard library's Python files (fixed split by file)."""
    root = root or sysconfig.get_paths()["stdlib"]
    train, val = bytearray(), bytearray()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in ("site-packages", "test", "idlelib", "lib2to3") or "__pycache__" in rel:
            dirs[:] = []
            continue
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(dirpath, name)
            key = os.path.relpath(path, root)
            with open(path, "rb") as f:
                data = f.read()
            to_val = hashlib.sha1(key.encode(), usedforsecurity=False).digest()[0] < val_fraction * 256
            (val if to_val else train).extend(data + b"\n")
    return bytes(train), bytes(val)


class Windows(Dataset):
    """``count`` windows of ``length + 1`` bytes: random (reseeded per epoch) or evenly spaced (fixed)."""

    def __init__(self, data: torch.Tensor, length: int, count: int, seed: int | None) -> None:
        self.data, self.length, self.count, self.seed = data, length, count, seed
        self.epoch = 0
        span = len(data) - length - 1
        if span <= 0:
            raise ValueError(f"Expected more than {length + 1} bytes of text, but got {len(data)}.")
        self._fixed = torch.linspace(0, span, count).long()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.seed is None:
            start = int(self._fixed[i])
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 10_007 + i)
            start = int(torch.randint(0, len(self.data) - self.length - 1, (1,), generator=g))
        return self.data[start : start + self.length + 1].long()


class StdlibBytes(pl.LightningDataModule):
    """Byte windows of the standard library's source (see the module docstring).

    Args:
        length: tokens per window.
        batch_size: windows per batch.
        train_windows: training windows per epoch.
        val_windows: validation windows (fixed).
        val_fraction: share of the files in validation.
        limit_bytes: keep at most this many training bytes (``None``: all).
        seed: the training windows' seed.

    """

    def __init__(
        self,
        length: int = 128,
        batch_size: int = 32,
        train_windows: int = 2048,
        val_windows: int = 256,
        val_fraction: float = 0.1,
        limit_bytes: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Windows | None = None
        self.val_set: Windows | None = None

    def setup(self, stage: str | None = None) -> None:
        """Read and split the source (once)."""
        if self.train_set is not None:
            return
        hp = self.hparams
        train, val = stdlib_source(hp["val_fraction"])
        if hp["limit_bytes"] is not None:
            train = train[: hp["limit_bytes"]]
        t = torch.frombuffer(bytearray(train), dtype=torch.uint8)
        v = torch.frombuffer(bytearray(val), dtype=torch.uint8)
        self.train_set = Windows(t, hp["length"], hp["train_windows"], seed=hp["seed"])
        self.val_set = Windows(v, hp["length"], hp["val_windows"], seed=None)

    def train_dataloader(self) -> DataLoader:
        """Random windows, new ones every epoch."""
        assert self.train_set is not None
        self.train_set.epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return DataLoader(self.train_set, batch_size=self.hparams["batch_size"], shuffle=False)

    def val_dataloader(self) -> DataLoader:
        """Fixed validation windows."""
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=64)


class ByteLlama(pl.LightningModule):
    """``LlamaForCausalLM`` over bytes, trained from scratch.

    Args:
        hidden_size: width of the residual stream.
        layers: decoder layers.
        heads: query heads.
        kv_heads: key/value heads (grouped-query attention).
        head_dim: size of a head.
        ffn: SwiGLU FFN width.
        lr: AdamW learning rate (cosine decay to 10 % over ``max_steps`` when given).
        weight_decay: AdamW weight decay.
        length: the sequence length of ``example_input_array``.

    """

    def __init__(
        self,
        hidden_size: int = 256,
        layers: int = 6,
        heads: int = 8,
        kv_heads: int = 2,
        head_dim: int = 32,
        ffn: int = 688,
        lr: float = 2e-3,
        weight_decay: float = 0.05,
        length: int = 128,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden_size,
            intermediate_size=ffn,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            max_position_embeddings=max(512, length),
            pad_token_id=PAD,
            bos_token_id=BOS,
            eos_token_id=EOS,
            tie_word_embeddings=False,
        )
        self.net = LlamaForCausalLM(config)
        self.example_input_array = {"input_ids": torch.full((1, length), ord("a"), dtype=torch.long)}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Next-byte logits."""
        return self.net(input_ids=input_ids).logits

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self(batch[:, :-1])
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)
        )

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        """Next-byte cross-entropy."""
        loss = self._loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """Log ``val_loss`` and ``val_ppl`` (per byte)."""
        loss = self._loss(batch)
        self.log("val_loss", loss)
        self.log("val_ppl", torch.exp(loss), prog_bar=True)

    def configure_optimizers(self) -> Any:
        """AdamW, cosine decay to 10 % of the learning rate over the run."""
        hp = self.hparams
        opt = torch.optim.AdamW(
            self.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"], betas=(0.9, 0.95)
        )
        total = self.trainer.estimated_stepping_batches if self.trainer is not None else 1000
        total = max(1, int(total)) if math.isfinite(total) else 1000
        schedule = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda step: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
