"""kre-runner: turn ``handler(ctx, data)`` into a KRE workflow node on NATS JetStream."""

from .config import ConfigError, Settings
from .context import Context, ServiceNotConfigured
from .handler import batch_handler
from .sinks.mongo import DatabaseError

__all__ = ["ConfigError", "Context", "DatabaseError", "ServiceNotConfigured", "Settings", "__version__",
           "batch_handler"]
__version__ = "0.1.0"
