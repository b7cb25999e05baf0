"""``ctx``: what a handler sees of the runner (paths, shared values, logger, data services, configuration)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from google.protobuf.message import Message

__all__ = ["Context", "ContextV3", "Retry", "ServiceNotConfigured"]


class ServiceNotConfigured(RuntimeError):
    """A handler used a service whose settings were left out."""


class Retry(Exception):
    """Raise from a handler for a transient failure (a database or GPU briefly unavailable).

    The input is not answered with an error: it is handed back and handled again after ``delay``
    seconds. After ``KRT_MAX_DELIVER`` deliveries in all it is dead-lettered instead, and the
    entrypoint gets an error envelope.
    """

    def __init__(self, reason: str = "", *, delay: float = 1.0) -> None:
        if not delay >= 0:
            raise ValueError(f"Retry(delay=...) must be ≥ 0 seconds, got {delay!r}")
        super().__init__(reason)
        self.delay = float(delay)


class _Unconfigured:
    """Stands in for a service that is not configured and says which variable enables it."""

    def __init__(self, name: str, hint: str) -> None:
        self._name = name
        self._hint = hint

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("_") or attr.isupper():
            raise AttributeError(attr)
        raise ServiceNotConfigured(f"ctx.{self._name}.{attr} is not available: {self._hint}")

    def __bool__(self) -> bool:
        # `if ctx.object_store:` is false, as the original's None was, when the service is not configured.
        return False


class _Base:
    """What both generations' ctx share: files next to the handler, and values shared by init and handlers."""

    base_path: Path
    _values: dict[str, Any]

    def _services(self, db: Any, measurement: Any, prediction: Any, configuration: Any, object_store: Any) -> None:
        """ctx's data services; one not configured is a falsy stand-in whose calls name its variables."""
        self.db = db or _Unconfigured("db", "set KRT_MONGO_URI (and optionally KRT_NATS_MONGO_WRITER)")
        self.measurement = measurement or _Unconfigured("measurement", "set KRT_INFLUX_URI")
        self.prediction = prediction or _Unconfigured("prediction", "set KRT_MONGO_URI or KRT_NATS_MONGO_WRITER")
        # Live configuration and the object store: kre-py 3.x services, given to v2 handlers as an extension.
        self.configuration = configuration or _Unconfigured(
            "configuration", "set KRT_NATS_KEY_VALUE_STORE_PROJECT, KRT_NATS_KEY_VALUE_STORE_WORKFLOW and "
                             "KRT_NATS_KEY_VALUE_STORE_NODE to its key-value buckets")
        self.object_store = object_store or _Unconfigured("object_store", "set KRT_NATS_OBJECT_STORE to its bucket")

    def path(self, relative: str) -> str:
        """``KRT_BASE_PATH`` joined with ``relative`` (where model files live)."""
        return str(self.base_path / relative)

    def get(self, key: str, default: Any = None) -> Any:
        """A value ``set`` by ``init`` or an earlier call (kre-py 3.0–3.2 had these too; 3.3 dropped them)."""
        return self._values.get(key, default)

    def set(self, key: str, value: Any) -> None:
        self._values[key] = value


class Context(_Base):
    """One per node, shared by ``init`` and every handler call.

    Values stored with :meth:`set` (a model loaded in ``init``, say) are seen by every later call.
    ``early_reply`` and ``early_exit`` act on the message whose handler is running, in whichever
    task or thread.
    """

    def __init__(
        self,
        *,
        base_path: Path,
        logger: logging.Logger,
        db: Any = None,
        measurement: Any = None,
        prediction: Any = None,
        configuration: Any = None,
        object_store: Any = None,
        early_reply: Callable[[Message], Awaitable[None]] | None = None,
        early_exit: Callable[[], None] | None = None,
        batch_tracking_ids: Callable[[], list[str]] | None = None,
    ) -> None:
        self.base_path = base_path
        self.logger = logger
        self._services(db, measurement, prediction, configuration, object_store)
        self._early_reply = early_reply
        self._early_exit = early_exit
        self._batch_tracking_ids = batch_tracking_ids
        self._values: dict[str, Any] = {}

    def early_reply(self, response: Message) -> Awaitable[None]:
        """Answer the entrypoint now; the workflow goes on with ``replied`` set.

        Call it from the handler of the message being answered. Awaiting the result is optional:
        the input is acked only once the reply is stored either way.
        """
        if self._early_reply is None:
            raise RuntimeError("early_reply is only available while a message is being handled")
        return self._early_reply(response)

    def early_exit(self) -> None:
        """End the workflow here for this request: the handler's output goes to the entrypoint.

        The output envelope carries ``early_exit = true`` and is published to
        ``KRT_NATS_ENTRYPOINT_SUBJECT`` instead of ``KRT_NATS_OUTPUT``, so later nodes never see it.
        """
        if self._early_exit is None:
            raise RuntimeError("early_exit is only available while a message is being handled")
        self._early_exit()

    def batch_tracking_ids(self) -> list[str]:
        """In a batch handler: the ``tracking_id`` of each input of the running batch, in order."""
        if self._batch_tracking_ids is None:
            raise RuntimeError("batch_tracking_ids is only available while a batch is being handled")
        return self._batch_tracking_ids()


class ContextV3(_Base):
    """The ctx of a KRE 3.x node (kre-py 3.4.1's API): one per node, shared by ``init`` and every handler call.

    ``send_*``, ``get_request_id`` and ``is_message_*`` act on the input whose handler runs now; called
    outside it (after the handler returned, from a thread it started) they raise ``RuntimeError``.
    ``configuration`` and ``object_store`` are set by the data services when their variables are set.
    """

    def __init__(
        self,
        *,
        base_path: Path,
        logger: logging.Logger,
        send: Callable[..., Awaitable[None]],
        current_input: Callable[[str], Any],
        db: Any = None,
        measurement: Any = None,
        prediction: Any = None,
        configuration: Any = None,
        object_store: Any = None,
    ) -> None:
        self.base_path = base_path
        self.logger = logger
        self._services(db, measurement, prediction, configuration, object_store)
        self._send = send  # (what, message_type, message, channel, forward) -> awaitable
        self._input = current_input  # (what) -> the running input's envelope
        self._values: dict[str, Any] = {}

    def send_output(self, response: Message, channel: str = "") -> Awaitable[None]:
        """Publish ``response`` (packed in the envelope's ``Any``) to ``KRT_NATS_OUTPUT`` or ``{output}.{channel}``.

        Zero or more per input; the input is acked only once every send is stored. Awaiting is
        optional (a sync handler may leave the result alone).
        """
        return self._send("send_output", _OK, response, channel, False)

    def send_any(self, response: Message, channel: str = "") -> Awaitable[None]:
        """As :meth:`send_output`, with a ``google.protobuf.Any`` forwarded unchanged."""
        return self._send("send_any", _OK, response, channel, True)

    def send_early_reply(self, response: Message, channel: str = "") -> Awaitable[None]:
        """As :meth:`send_output`, with ``message_type = EARLY_REPLY``."""
        return self._send("send_early_reply", _EARLY_REPLY, response, channel, False)

    def send_early_exit(self, response: Message, channel: str = "") -> Awaitable[None]:
        """As :meth:`send_output`, with ``message_type = EARLY_EXIT``."""
        return self._send("send_early_exit", _EARLY_EXIT, response, channel, False)

    def get_request_id(self) -> str:
        """The running input's ``request_id`` (set by the entrypoint, copied by every node)."""
        return str(self._input("get_request_id()").request_id)

    def is_message_ok(self) -> bool:
        return bool(self._input("is_message_ok()").message_type == _OK)

    def is_message_error(self) -> bool:
        """The input is an upstream node's error envelope (empty payload, ``error`` set)."""
        return bool(self._input("is_message_error()").message_type == _ERROR)

    def is_message_early_reply(self) -> bool:
        return bool(self._input("is_message_early_reply()").message_type == _EARLY_REPLY)

    def is_message_early_exit(self) -> bool:
        return bool(self._input("is_message_early_exit()").message_type == _EARLY_EXIT)


# The 3.x envelope's MessageType values (kre_nats_msg_v3.proto), without importing the node's modules here.
_OK, _ERROR, _EARLY_REPLY, _EARLY_EXIT = 1, 2, 3, 4
