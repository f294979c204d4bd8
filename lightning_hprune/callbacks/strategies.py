"""Lightning glue for sharded strategies: prune FSDP2 models (``ModelParallelStrategy``) in place.

With ``ModelParallelStrategy``, the LightningModule's ``configure_model`` applies ``fully_shard`` and the
strategy wraps nothing: the module itself holds sharded ``DTensor`` parameters, and the optimizers are
created from them. A pruning callback then differs from the single-device path in four places, all here:

* an event runs on the *full* model: every rank gathers it (:func:`~lightning_hprune.core.sharding.unshard`),
  the session plans and prunes it as usual (scores reduced across ranks, rank 0's plan broadcast), then
  the recorded ``fully_shard`` units are applied again and the optimizer state is carried over;
* a failed event is undone by the session's by-reference snapshot of the *sharded* model plus
  :meth:`~lightning_hprune.core.sharding.Unsharded.undo`;
* reading the model without changing it (tracing at fit start, the end-of-fit report) gathers it and
  puts the sharded model back exactly;
* resuming: the strategy loads weights and optimizer state inside ``strategy.load_checkpoint`` (after
  ``configure_model`` and the optimizers exist), so the structure is rebuilt there, from the history in
  the checkpoint's metadata (``meta.pt`` of a sharded checkpoint, or the full checkpoint file), before the
  weights load.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_warn

from lightning_hprune.core.importance import MagnitudeImportance
from lightning_hprune.core.optim_state import ParameterSurgery, record_parameter_surgery, remap_optimizer
from lightning_hprune.core.session import PruningSession, history_of
from lightning_hprune.core.sharding import Unsharded, no_saved_tensors, releasing, reshard_all, unshard
from lightning_hprune.core.undo import Snapshot

#: Strategy classes whose models are pruned through :class:`ShardedPruning`.
SHARDED_STRATEGIES = ("ModelParallelStrategy",)


def is_sharded_strategy(strategy: Any) -> bool:
    """Whether ``strategy`` shards the model's parameters in a way :class:`ShardedPruning` handles."""
    return any(c.__name__ in SHARDED_STRATEGIES for c in type(strategy).__mro__)


class _Event:
    """What the callback hands over during a sharded event: the surgery to carry the optimizers with."""

    def __init__(self) -> None:
        self.surgery = ParameterSurgery()


class ShardedPruning:
    """What a pruning callback does differently when ``fully_shard`` (FSDP2) shards the model.

    Args:
        strategy: the Trainer's strategy (a ``ModelParallelStrategy``).
        session: the leading callback's session.
        owner: the callback's class name, for messages.

    """

    def __init__(self, strategy: Any, session: PruningSession, owner: str) -> None:
        self.strategy = strategy
        self.session = session
        self.owner = owner
        self._current: Unsharded | None = None
        self._event: _Event | None = None
        self._original_load: Callable[..., Any] | None = None

    # ------------------------------------------------------------------ set-up
    def check(self) -> None:
        """Refuse, in ``setup``, what sharded pruning does not support (before any training step)."""
        strategy, session, cls = self.strategy, self.session, self.owner
        tp = getattr(strategy, "_tensor_parallel_size", 1)
        if tp not in (1, "auto") and int(tp) > 1:
            raise RuntimeError(
                f"{cls} prunes FSDP2 (`fully_shard`) models under ModelParallelStrategy, but expected "
                f"`tensor_parallel_size=1`, got {tp}: tensor-parallel layers are split along the very "
                "dimensions pruning removes. Use ModelParallelStrategy(data_parallel_size=<devices>, "
                "tensor_parallel_size=1) while pruning."
            )
        if session.loop is not None:
            raise RuntimeError(
                f"{cls}(closed_loop=...) is not supported with {type(strategy).__name__}: a rollback point is "
                "a copy of the model, which would have to be taken and restored across the shards. Use "
                "`closed_loop=None` with sharded models, or prune under strategy='ddp'."
            )
        if session.importance.needs_training_statistics and session.default_importance:
            # the default criterion reads every step's gradients, which are sharded here: use weight magnitude
            session.importance = MagnitudeImportance(p=2)
        if session.importance.needs_training_statistics:
            raise RuntimeError(
                f"{cls}(importance={session.importance!r}) is not supported with {type(strategy).__name__}: its "
                "gradient statistics would be gathered from sharded gradients at every step. Use a criterion "
                "without training statistics ('l1', 'l2', 'activation', 'apoz', 'bn_scale', 'random')."
            )

    # ------------------------------------------------------------------ events
    def settle(self, model: nn.Module) -> None:
        """Register the sharded parameters everywhere (call before taking the event's snapshot)."""
        reshard_all(model)

    @contextmanager
    def full_model(self, model: nn.Module, optimizers: list[torch.optim.Optimizer]) -> Iterator[_Event]:
        """The model gathered and out of FSDP while the block runs; sharded again when it succeeds.

        On success, the recorded units are applied again and every optimizer is pointed at the new sharded
        parameters with its state carried over (``event.surgery``, set by the callback's re-binding). On
        failure nothing is re-sharded: the caller restores its snapshot, then :meth:`undo`.
        """
        event = self._event = _Event()
        current = self._current = unshard(model)
        self.session.forget_graph()  # traced again on the gathered model
        try:
            with releasing(model, current.gathered.values()), no_saved_tensors():
                yield event
            after = current.reshard()
            live = list(model.parameters())
            for opt in optimizers:
                for problem in remap_optimizer(
                    opt, event.surgery, live, before=current.gathered, after=after
                ):
                    rank_zero_warn(f"{self.owner}: {problem}.")
        finally:
            self._event = None
        # The replaced FSDP states hold the old shards in reference cycles: free them now, not at some later
        # collection (the graph traced on the gathered model goes too: it would be retraced anyway).
        self._current = None
        self.session.forget_graph()
        gc.collect()

    def keep(self, surgery: ParameterSurgery) -> None:
        """Keep the event's parameter surgery, to carry the optimizers once the model is sharded again."""
        assert self._event is not None, "keep() is only called inside full_model()"
        self._event.surgery = surgery

    def undo(self) -> None:
        """After the event's snapshot was restored: put FSDP back on the modules, forget the graph."""
        if self._current is not None:
            self._current.undo()
            self._current = None
        self.session.forget_graph()

    @contextmanager
    def view(self, model: nn.Module) -> Iterator[None]:
        """The gathered model while the block runs (read only); the sharded model exactly as it was after."""
        self.settle(model)
        snapshot = Snapshot(model)
        current = unshard(model)
        self.session.forget_graph()
        try:
            with no_saved_tensors():
                yield
        finally:
            snapshot.restore()
            current.undo()
            self.session.forget_graph()

    # ------------------------------------------------------------------ resuming
    def install_restore(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        find_state: Callable[[Mapping[str, Any]], dict[str, Any] | None],
    ) -> None:
        """Rebuild the pruned structure inside ``strategy.load_checkpoint``, before it loads the weights."""
        strategy = self.strategy
        if self._original_load is not None:
            return
        original = strategy.load_checkpoint
        self._original_load = original

        def load_checkpoint(checkpoint_path: Any, weights_only: bool | None = None) -> Any:
            path = Path(strategy.broadcast(checkpoint_path))
            metadata = read_metadata(path, weights_only=weights_only is not False)
            state = find_state(metadata) if metadata is not None else None
            if state and history_of(state):
                self.rebuild(pl_module, list(trainer.optimizers), state)
            return original(checkpoint_path, weights_only=weights_only)

        strategy.load_checkpoint = load_checkpoint

    def uninstall(self) -> None:
        """Undo :meth:`install_restore`."""
        if self._original_load is not None:
            self.strategy.__dict__.pop("load_checkpoint", None)
            self._original_load = None

    def rebuild(
        self, model: nn.Module, optimizers: list[torch.optim.Optimizer], state: Mapping[str, Any]
    ) -> None:
        """Replay the checkpoint's history on the (unpruned, sharded) model and shard it again.

        The optimizers (created by the strategy from the unpruned parameters, still without state) are
        pointed at the new ones. All or nothing: a failure leaves the sharded model as it was.
        """
        self.settle(model)
        snapshot = Snapshot(model, optimizers)
        try:
            with self.full_model(model, optimizers) as event, record_parameter_surgery() as surgery:
                self.session.rebuild_structure(model, state)
                event.surgery = surgery
        except BaseException:
            snapshot.restore()
            self.undo()
            raise
        self.session.forget_graph()


def read_metadata(path: Path, weights_only: bool = True) -> dict[str, Any] | None:
    """The non-tensor part of a checkpoint written by ``ModelParallelStrategy`` (or ``None`` if none).

    A sharded checkpoint is a directory whose ``meta.pt`` holds everything but the weights and optimizer
    states; a full checkpoint is one file (memory-mapped here, so reading it costs no copy).
    ``weights_only=False`` only when the fit was asked to load the checkpoint that way.
    """
    from lightning.fabric.utilities.load import _METADATA_FILENAME

    if path.is_dir():
        meta = path / _METADATA_FILENAME
        return torch.load(meta, map_location="cpu", weights_only=weights_only) if meta.is_file() else None
    if path.is_file():
        return torch.load(path, map_location="cpu", mmap=True, weights_only=weights_only)
    return None


def sharding_for(trainer: pl.Trainer, session: PruningSession, owner: str) -> ShardedPruning | None:
    """The sharded-model glue for ``trainer``'s strategy, or ``None`` when it does not shard."""
    strategy = trainer.strategy
    return ShardedPruning(strategy, session, owner) if is_sharded_strategy(strategy) else None


def maybe(cm: AbstractContextManager[Any] | None) -> AbstractContextManager[Any]:
    """``cm``, or a context that does nothing."""
    return cm if cm is not None else nullcontext()
