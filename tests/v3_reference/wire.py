"""The 3.x envelope, built from the reference's proto text in a pool of its own.

The message is declared here field by field (no generated module, no protoc): ``KreNatsMessage`` with
``request_id = 1``, ``payload = 2`` (``google.protobuf.Any``), ``error = 3``, ``from_node = 4``,
``message_type = 5`` (enum ``MessageType``). A private pool keeps it apart from the v2 message of the
same name that other modules register in the default pool.
"""

from __future__ import annotations

import gzip

from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory

OK, ERROR, EARLY_REPLY, EARLY_EXIT = 1, 2, 3, 4
_GZIP_MAGIC = b"\x1f\x8b"


def _build() -> type:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(any_pb2.DESCRIPTOR.serialized_pb)
    file = descriptor_pb2.FileDescriptorProto(name="kre_v3_reference.proto", syntax="proto3",
                                              dependency=["google/protobuf/any.proto"])
    enum = file.enum_type.add(name="MessageType")
    for number, name in enumerate(("UNDEFINED", "OK", "ERROR", "EARLY_REPLY", "EARLY_EXIT")):
        enum.value.add(name=name, number=number)
    message = file.message_type.add(name="KreNatsMessage")
    F = descriptor_pb2.FieldDescriptorProto
    for name, number, kind, type_name in (
        ("request_id", 1, F.TYPE_STRING, ""),
        ("payload", 2, F.TYPE_MESSAGE, ".google.protobuf.Any"),
        ("error", 3, F.TYPE_STRING, ""),
        ("from_node", 4, F.TYPE_STRING, ""),
        ("message_type", 5, F.TYPE_ENUM, ".MessageType"),
    ):
        field = message.field.add(name=name, number=number, type=kind, label=F.LABEL_OPTIONAL)
        if type_name:
            field.type_name = type_name
    pool.Add(file)  # type: ignore[attr-defined]
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("KreNatsMessage"))


KreNatsMessage = _build()


def decode(data: bytes):
    """An envelope from the wire; gzip-compressed ones are recognised by their magic bytes."""
    if data[:2] == _GZIP_MAGIC:
        data = gzip.decompress(data)
    message = KreNatsMessage()
    message.ParseFromString(data)
    return message


def encode(message, limit: int) -> bytes:
    """The serialized envelope, gzip-compressed when larger than ``limit``."""
    data = message.SerializeToString()
    return gzip.compress(data) if len(data) > limit else data


def payload_of(message) -> any_pb2.Any:
    """The payload as the standard ``Any`` a handler unpacks."""
    return any_pb2.Any(type_url=message.payload.type_url, value=message.payload.value)
