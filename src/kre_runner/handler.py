"""Loading the user's ``handler(ctx, data)`` (or ``handler_batch(ctx, batch)``) and optional ``init(ctx)``."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from .errors import HandlerLoadError

__all__ = ["HandlerLoadError", "UserCode", "batch_handler", "load_user_code"]

F = TypeVar("F", bound=Callable[..., Any])
_BATCH_NAME = "handler_batch"  # a function of this name is a batch handler without the decorator
_BATCH_MARK = "__kre_batch_handler__"


def batch_handler(func: F) -> F:
    """Mark ``func(ctx, batch)`` as a batch handler (for ``KRT_HANDLER_PATH=file.py:func``).

    It receives a list of payloads and returns a list of results of the same length.
    """
    setattr(func, _BATCH_MARK, True)
    return func


@dataclass(frozen=True)
class UserCode:
    path: Path
    handler: Callable[..., Any]
    handler_is_async: bool
    init: Callable[..., Any] | None
    init_is_async: bool
    batch: bool = False  # ``handler`` takes a list of payloads and returns a list (batching.py)


def load_user_code(base_path: Path, handler_path: str) -> UserCode:
    """Load ``handler_path`` (``file.py`` or ``file.py:function``), relative to ``base_path``.

    The file gets a module name derived from its absolute path, so a user file called ``os.py`` or
    ``main.py`` never shadows (or is shadowed by) another module; its directory is put on
    ``sys.path`` so it can import its own ``*_pb2`` modules.
    """
    file_part, _, func_name = handler_path.rpartition(":")
    if not file_part or "/" in func_name or func_name.endswith(".py"):
        file_part, func_name = handler_path, ""
    path = (base_path / file_part).resolve()
    if not path.is_file():
        raise HandlerLoadError(
            f"handler file {path} does not exist: check KRT_BASE_PATH={str(base_path)!r} "
            f"and KRT_HANDLER_PATH={handler_path!r}"
        )

    directory = str(path.parent)
    if directory not in sys.path:
        sys.path.insert(0, directory)
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_name = f"_kre_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise HandlerLoadError(f"cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[module_name]
        raise HandlerLoadError(f"syntax error in {exc.filename}:{exc.lineno}: {exc.msg}") from exc
    except Exception as exc:
        del sys.modules[module_name]
        raise HandlerLoadError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc

    if not func_name:  # no function named: handler_batch when the file has one, else handler
        func_name = _BATCH_NAME if callable(getattr(module, _BATCH_NAME, None)) else "handler"
    handler = getattr(module, func_name, None)
    if not callable(handler):
        raise HandlerLoadError(f"{path} defines no function {func_name}(ctx, data)"
                               + (f" nor {_BATCH_NAME}(ctx, batch)" if func_name == "handler" else ""))
    init = getattr(module, "init", None)
    if init is not None and not callable(init):
        raise HandlerLoadError(f"{path}: init is not a function")
    return UserCode(
        path=path,
        handler=handler,
        handler_is_async=inspect.iscoroutinefunction(handler),
        init=init,
        init_is_async=init is not None and inspect.iscoroutinefunction(init),
        batch=func_name == _BATCH_NAME or bool(getattr(handler, _BATCH_MARK, False)),
    )
