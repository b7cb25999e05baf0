"""kre-runner: turn ``handler(ctx, data)`` into a KRE workflow node on NATS JetStream."""

from .config import ConfigError, Settings
from .context import Context

__all__ = ["ConfigError", "Context", "Settings", "__version__"]
__version__ = "0.1.0"
