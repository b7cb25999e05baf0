"""JSON ↔ the user's protobuf messages, for ``call``, ``run-once`` and the testing plugin.

A message type is named the way a user thinks of it: ``Request`` (found among the ``*_pb2``
modules of the handler directories, or any already imported), a full protobuf name
(``my.pkg.Request``) or ``module.Message`` (``greeter_pb2.Request``). Output uses protobuf's own
JSON mapping (``json_format``) with the field names of the ``.proto`` and every field shown.
"""

from __future__ import annotations

import importlib
import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from google.protobuf.any_pb2 import Any as AnyProto
from google.protobuf.message import Message

__all__ = ["MessageTypeError", "find_message_type", "from_json", "parse_json_inputs", "to_dict", "to_json"]


class MessageTypeError(ValueError):
    """A ``--type`` that names no message, or a JSON value that does not fit it; the message says what to fix."""


def _import_pb2_modules(directories: Iterable[Path]) -> list[str]:
    """Import every ``*_pb2.py`` of ``directories`` (each put on ``sys.path``, as the runner does)."""
    failures = []
    for directory in directories:
        directory = Path(directory).resolve()
        if not directory.is_dir():
            continue
        if str(directory) not in sys.path:
            sys.path.insert(0, str(directory))
        for file in sorted(directory.glob("*_pb2.py")):
            try:
                importlib.import_module(file.stem)
            except Exception as exc:  # a broken or conflicting generated file: reported if the type is not found
                failures.append(f"{file}: {type(exc).__name__}: {exc}")
    return failures


def _loaded_messages() -> dict[str, list[tuple[str, type[Message]]]]:
    """Short name → [(full name, class)] for every message of every imported ``*_pb2`` module."""
    found: dict[str, list[tuple[str, type[Message]]]] = {}
    for module_name, module in list(sys.modules.items()):
        if not module_name.endswith("_pb2") or module_name.startswith(("google.", "kre_runner.")):
            continue
        descriptor = getattr(module, "DESCRIPTOR", None)
        for short in getattr(descriptor, "message_types_by_name", {}):
            cls = getattr(module, short, None)
            if isinstance(cls, type) and issubclass(cls, Message):
                entry = (cls.DESCRIPTOR.full_name, cls)
                if entry not in found.setdefault(short, []):
                    found[short].append(entry)
    return found


def find_message_type(name: str, directories: Iterable[Path] = ()) -> type[Message]:
    """The message class ``name`` refers to (``Request``, ``pkg.Request`` or ``module_pb2.Request``)."""
    directories = list(dict.fromkeys(Path(d).resolve() for d in directories))
    failures = _import_pb2_modules(directories)
    if "." in name:
        module_name, _, attr = name.rpartition(".")
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        cls = getattr(module, attr, None) if module is not None else None
        if isinstance(cls, type) and issubclass(cls, Message):
            return cls
    loaded = _loaded_messages()
    matches = [entry for entries in loaded.values() for entry in entries if entry[0] == name] or loaded.get(name, [])
    if len(matches) == 1:
        return matches[0][1]
    if len(matches) > 1:
        options = ", ".join(f"{cls.__module__}.{cls.__name__}" for _, cls in matches)
        raise MessageTypeError(f"--type {name} is ambiguous: use one of {options}")
    known = sorted(loaded)
    where = ", ".join(str(d) for d in directories) or "the imported modules"
    hint = f"known: {', '.join(known)}" if known else "no *_pb2.py module was found (compile your .proto first)"
    extra = f"; could not import {'; '.join(failures)}" if failures else ""
    raise MessageTypeError(f"--type {name}: no such message in the *_pb2 modules of {where} ({hint}){extra}")


def parse_json_inputs(text: str, source: str) -> list[Any]:
    """One JSON value, or JSON lines (one value per non-empty line)."""
    try:
        return [json.loads(text)]
    except json.JSONDecodeError as whole:
        lines = [line for line in text.splitlines() if line.strip()]
        if len(lines) <= 1:
            raise MessageTypeError(f"{source} is not valid JSON: {whole.msg} at line {whole.lineno} "
                                   f"column {whole.colno}") from None
    values = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            values.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise MessageTypeError(f"{source} line {number} is not valid JSON (nor is the whole): {exc.msg} "
                                   f"at column {exc.colno}") from None
    return values


def from_json(value: Any, cls: type[Message]) -> Message:
    """``value`` (a decoded JSON object) as a ``cls`` message; unknown fields are an error naming them."""
    message = cls()
    try:
        json_format.ParseDict(value, message)
    except json_format.ParseError as exc:
        reason = " ".join(str(exc).split())  # protobuf's message spans lines: one line, as every error here
        raise MessageTypeError(f"the JSON does not fit {cls.DESCRIPTOR.full_name}: {reason}") from None
    return message


def _unpacked(message: Message) -> Message | None:
    """The message inside an ``Any`` when its type is known here, else None."""
    from google.protobuf import descriptor_pool, message_factory

    type_name = message.type_url.rpartition("/")[2]  # type: ignore[attr-defined]
    try:
        descriptor = descriptor_pool.Default().FindMessageTypeByName(type_name)
    except KeyError:
        return None
    inner = message_factory.GetMessageClass(descriptor)()
    message.Unpack(inner)  # type: ignore[attr-defined]
    return inner


def to_dict(message: Message | None) -> Any:
    """JSON-ready value of ``message``; an ``Any`` is unpacked when its type is known."""
    if message is None:
        return None
    if isinstance(message, AnyProto):
        inner = _unpacked(message)
        if inner is None:
            import base64

            return {"@type": message.type_url, "value": base64.b64encode(message.value).decode()}
        message = inner
    return json_format.MessageToDict(message, preserving_proto_field_name=True,
                                     always_print_fields_with_no_presence=True)


def to_json(message: Message | None) -> str:
    """One line of JSON for ``message`` (``null`` for None)."""
    return json.dumps(to_dict(message), ensure_ascii=False)
