"""Safety around a pruning event: say where a forward failed, run compiled code eagerly, keep it valid after."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn


def weight_averaging_types() -> tuple[type, ...]:
    """Lightning callbacks that keep a copy of every parameter (``WeightAveraging`` is new in Lightning 2.5)."""
    from lightning.pytorch import callbacks

    names = ("StochasticWeightAveraging", "WeightAveraging")
    return tuple(getattr(callbacks, n) for n in names if hasattr(callbacks, n))


@contextmanager
def forward_failures(model: nn.Module) -> Iterator[dict[int, tuple[str, BaseException]]]:
    """Record, for every exception raised inside a module's forward, the innermost module that raised it.

    Yields ``id(exception) -> (module name, exception)``; ``""`` names ``model`` itself (code of its own
    forward, outside any submodule).
    """
    failures: dict[int, tuple[str, BaseException]] = {}

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            err = sys.exc_info()[1]
            if output is None and err is not None and id(err) not in failures:
                failures[id(err)] = (name, err)  # the innermost module's hook runs first

        return hook

    handles = [m.register_forward_hook(hook_for(n), always_call=True) for n, m in model.named_modules()]
    try:
        yield failures
    finally:
        for h in handles:
            h.remove()


def failing_module(err: BaseException, failures: dict[int, tuple[str, BaseException]]) -> str | None:
    """The module recorded by :func:`forward_failures` for ``err`` or an exception it was raised from."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if id(e) in failures and failures[id(e)][1] is e:
            return failures[id(e)][0]
        stack += [e.__cause__, e.__context__]
    return None


def describe_failure(model: nn.Module, name: str | None, tracing: bool = False) -> str:
    """A sentence naming the module whose forward failed, with what to do about it (``""`` if unknown)."""
    if name is None:
        return ""
    if name == "":
        where = f"the forward of {type(model).__name__} itself (its own code, outside any submodule)"
    else:
        try:
            where = f"module {name!r} ({type(model.get_submodule(name)).__name__})"
        except AttributeError:
            where = f"module {name!r}"
    if tracing:
        return f" The forward raised inside {where}."
    return (
        f" The model's forward raised inside {where}: torch-pruning could not follow the channels through it "
        "(a hard-coded shape, a raw parameter used outside a standard layer, or an op it does not know). "
        "Keep the widths it depends on fixed by adding the layers that produce its input to `ignored_layers`, "
        "or use standard layers (nn.Conv2d, nn.Linear, ...) for its parameters."
    )


def eager() -> Any:
    """Run compiled code eagerly (``torch.compiler.set_stance``, torch >= 2.6) while pruning traces and measures."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else nullcontext()


def compiled_codes(pl_module: nn.Module) -> list[Any]:
    """Code objects that ``torch.compile`` caches for this module: Lightning's compiled steps and compiled children.

    A compiled child's cache lives on a function that every ``torch.compile``d module of the process shares:
    dropping it makes those recompile once too.
    """
    codes = []
    ctx = getattr(pl_module, "_compiler_ctx", None) or {}
    fns = [v for k, v in ctx.items() if k.startswith("original_")]
    fns += [
        getattr(m.forward, "_torchdynamo_orig_callable", None)
        for m in pl_module.modules()
        if hasattr(m, "_orig_mod") and hasattr(m, "dynamo_ctx")
    ]
    for fn in fns:
        code = getattr(getattr(fn, "__func__", fn), "__code__", None)
        if code is not None:
            codes.append(code)
    return codes


def recompile(pl_module: nn.Module) -> None:
    """Drop what ``torch.compile`` cached for the old shapes, so that the pruned model compiles afresh.

    Without this, every event adds entries until dynamo's recompile limit makes it fall back to eager.
    """
    reset_code = getattr(torch._dynamo, "reset_code", None)
    if reset_code is None:
        return
    for code in compiled_codes(pl_module):
        reset_code(code)
