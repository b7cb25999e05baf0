"""Why a node cannot start: each error says, in one line, what is wrong and how to fix it.

The CLI turns every one of them into its last line and an exit code (``cli.py``); nothing else in the
package exits the process.
"""

from __future__ import annotations

__all__ = ["ConfigError", "HandlerLoadError", "SetupError", "StartupError"]


class ConfigError(ValueError):
    """The environment does not describe a runnable node; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class HandlerLoadError(RuntimeError):
    """The handler file cannot be turned into a runnable node."""


class StartupError(RuntimeError):
    """The process cannot start (NATS unreachable, the port taken, ``init`` failed); one line says why."""

    def __init__(self, message: str) -> None:
        # One line: the CLI prints it as the pod's last log line.
        super().__init__(" ".join(str(message).split()))


class SetupError(RuntimeError):
    """The stream or consumer this node needs is missing or incompatible."""
