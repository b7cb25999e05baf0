"""kre-runner: turn ``handler(ctx, data)`` into a KRE workflow node on NATS JetStream."""

from typing import TYPE_CHECKING, Any

from .config import Settings
from .errors import ConfigError

if TYPE_CHECKING:
    from .context import Context, Retry, ServiceNotConfigured
    from .handler import batch_handler
    from .services.mongo import DatabaseError

__all__ = ["ConfigError", "Context", "DatabaseError", "Retry", "ServiceNotConfigured", "Settings", "__version__",
           "batch_handler"]
__version__ = "0.1.0"

# Imported on first use: the pytest plugin (kre_runner.testing) loads this package in every pytest
# run, which must not pay for nats-py, motor and protobuf.
_LAZY = {"Context": ".context", "Retry": ".context", "ServiceNotConfigured": ".context",
         "DatabaseError": ".services.mongo", "batch_handler": ".handler"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
