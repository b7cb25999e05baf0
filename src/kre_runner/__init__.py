"""kre-runner: turn ``handler(ctx, data)`` into a KRE workflow node on NATS JetStream."""

from .config import ConfigError, Settings
from .context import Context, ServiceNotConfigured
from .sinks.mongo import DatabaseError

__all__ = ["ConfigError", "Context", "DatabaseError", "ServiceNotConfigured", "Settings", "__version__"]
__version__ = "0.1.0"
