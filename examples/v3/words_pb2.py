# -*- coding: utf-8 -*-
# Generated from words.proto (the serialized descriptor, as protoc writes it).  DO NOT EDIT!
# source: words.proto
"""Generated protocol buffer code."""
from google.protobuf import descriptor_pool as _descriptor_pool
from google.protobuf import symbol_database as _symbol_database
from google.protobuf.internal import builder as _builder
# @@protoc_insertion_point(imports)

_sym_db = _symbol_database.Default()


DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(b'\n\x0bwords.proto"\x1a\n\x04Text\x12\x12\n\x04text\x18\x01 \x01(\tR\x04text"J\n\x06Result\x12\x12\n\x04text\x18\x01 \x01(\tR\x04text\x12\x14\n\x05words\x18\x02 \x01(\x05R\x05words\x12\x16\n\x06source\x18\x03 \x01(\tR\x06sourceb\x06proto3')

_globals = globals()
_builder.BuildMessageAndEnumDescriptors(DESCRIPTOR, _globals)
_builder.BuildTopDescriptorsAndMessages(DESCRIPTOR, 'words_pb2', _globals)
# @@protoc_insertion_point(module_scope)
