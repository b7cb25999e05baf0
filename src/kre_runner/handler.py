"""Loading the user's ``handler(ctx, data)`` (or ``handler_batch(ctx, batch)``) and optional ``init(ctx)``."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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
    generation: str = "v2"  # "v3": ``handler`` is the module's default_handler, routed with custom_handlers
    # KRE 3.x: the handler of the inputs whose envelope's from_node is the key (else ``handler``).
    custom_handlers: Mapping[str, Callable[..., Any]] = field(default_factory=dict)


def load_user_code(base_path: Path, handler_path: str, generation: str = "v2") -> UserCode:
    """Load ``handler_path`` (``file.py`` or ``file.py:function``), relative to ``base_path``.

    ``generation`` "v3": the kre-py 3.x module shape (``default_handler``, ``custom_handlers``, ``init``).

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

    if generation == "v3":
        return _v3_code(path, module, func_name)
    if not func_name and not callable(getattr(module, "handler", None)) and \
            callable(getattr(module, "default_handler", None)):
        raise HandlerLoadError(f"{path} is a KRE 3.x handler module (default_handler) but this node speaks KRE v2 "
                               f"(KRT_NATS_INPUT is set): a v2 module defines handler(ctx, data) returning the output; "
                               f"run it in a 3.x node (KRT_NATS_INPUTS instead of KRT_NATS_INPUT)")
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


def _v3_code(path: Path, module: Any, func_name: str) -> UserCode:
    """The kre-py 3.x shape: ``default_handler(ctx, data)``, optional ``custom_handlers`` and ``init(ctx)``."""
    name = func_name or "default_handler"
    default = getattr(module, name, None)
    if not callable(default):
        v2_shape = not func_name and (callable(getattr(module, "handler", None))
                                      or callable(getattr(module, _BATCH_NAME, None)))
        raise HandlerLoadError(
            f"{path} defines no function {name}(ctx, data), which a KRE 3.x node (KRT_NATS_INPUTS is set) calls"
            + (": it is a KRE v2 module (handler(ctx, data) returning the output); in 3.x, define "
               "default_handler(ctx, data) and send outputs with await ctx.send_output(msg), or run it in a v2 "
               "node (KRT_NATS_INPUT)" if v2_shape else ""))
    custom = getattr(module, "custom_handlers", None) or {}
    if not isinstance(custom, Mapping) or not all(isinstance(k, str) and callable(v) for k, v in custom.items()):
        raise HandlerLoadError(f"{path}: custom_handlers must be a dict of upstream node name -> handler(ctx, data), "
                               f"e.g. custom_handlers = {{\"nodeA\": handle_a}}")
    init = getattr(module, "init", None)
    if init is not None and not callable(init):
        raise HandlerLoadError(f"{path}: init is not a function")
    handlers = [default, *custom.values()]
    return UserCode(
        path=path,
        handler=default,
        # Any async handler makes every call awaited (a sync one among them is called on the loop there).
        handler_is_async=any(inspect.iscoroutinefunction(h) for h in handlers),
        init=init,
        init_is_async=init is not None and inspect.iscoroutinefunction(init),
        generation="v3",
        custom_handlers=dict(custom),
    )
