"""The Sparkplug B payload schema, built at import time with protobuf dynamic descriptors
(no protoc, no generated module, no network).

The messages are those of ``sparkplug_b/sparkplug_b.proto`` in Eclipse Tahu (the schema
the Sparkplug 3.0.0 specification, chapter 6 "Payloads", defines): package
``org.eclipse.tahu.protobuf``, proto2, every message, field number, type, label, oneof and
extension range as in that file, so ``Payload().SerializeToString()`` gives the bytes a
Sparkplug B edge node built on the official schema sends.

    from bench.sparkplug_b import Payload, DOUBLE, BOOLEAN
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "org.eclipse.tahu.protobuf"

# Sparkplug B data types (the comment block at the top of the official Payload message)
INT8, INT16, INT32, INT64 = 1, 2, 3, 4
UINT8, UINT16, UINT32, UINT64 = 5, 6, 7, 8
FLOAT, DOUBLE, BOOLEAN, STRING, DATETIME, TEXT = 9, 10, 11, 12, 13, 14

_F = descriptor_pb2.FieldDescriptorProto
_T = {
    "double": _F.TYPE_DOUBLE,
    "float": _F.TYPE_FLOAT,
    "uint64": _F.TYPE_UINT64,
    "uint32": _F.TYPE_UINT32,
    "bool": _F.TYPE_BOOL,
    "string": _F.TYPE_STRING,
    "bytes": _F.TYPE_BYTES,
}
_MAX = 536_870_912  # "to max": field numbers end at 2**29 - 1 (ranges are end-exclusive)

# (name, number, type, repeated, oneof) ; a type not in _T names a message (relative to
# Payload, as the .proto writes it)
_Field = tuple[str, int, str, bool, str | None]


def _value(prefix: int, names: tuple[str, ...], ext: str) -> list[_Field]:
    """A oneof `value` of the scalar kinds in `names`, numbered from `prefix`."""
    types = {
        "int_value": "uint32",
        "long_value": "uint64",
        "float_value": "float",
        "double_value": "double",
        "boolean_value": "bool",
        "string_value": "string",
        "bytes_value": "bytes",
    }
    out: list[_Field] = [(n, prefix + i, types[n], False, "value") for i, n in enumerate(names)]
    out.append(("extension_value", prefix + len(names), ext, False, "value"))
    return out


_SCALARS = ("int_value", "long_value", "float_value", "double_value", "boolean_value")

# message path -> (fields, first extension number or None); nested messages by dotted path
_SCHEMA: dict[str, tuple[list[_Field], int | None]] = {
    "Template": (
        [
            ("version", 1, "string", False, None),
            ("metrics", 2, "Metric", True, None),
            ("parameters", 3, "Template.Parameter", True, None),
            ("template_ref", 4, "string", False, None),
            ("is_definition", 5, "bool", False, None),
        ],
        6,
    ),
    "Template.Parameter": (
        [
            ("name", 1, "string", False, None),
            ("type", 2, "uint32", False, None),
            *_value(3, (*_SCALARS, "string_value"), "Template.Parameter.ParameterValueExtension"),
        ],
        None,
    ),
    "Template.Parameter.ParameterValueExtension": ([], 1),
    "DataSet": (
        [
            ("num_of_columns", 1, "uint64", False, None),
            ("columns", 2, "string", True, None),
            ("types", 3, "uint32", True, None),
            ("rows", 4, "DataSet.Row", True, None),
        ],
        5,
    ),
    "DataSet.DataSetValue": (
        _value(1, (*_SCALARS, "string_value"), "DataSet.DataSetValue.DataSetValueExtension"),
        None,
    ),
    "DataSet.DataSetValue.DataSetValueExtension": ([], 1),
    "DataSet.Row": ([("elements", 1, "DataSet.DataSetValue", True, None)], 2),
    "PropertyValue": (
        [("type", 1, "uint32", False, None), ("is_null", 2, "bool", False, None)]
        + [
            (n, 3 + i, t, False, "value")
            for i, (n, t) in enumerate(
                (
                    ("int_value", "uint32"),
                    ("long_value", "uint64"),
                    ("float_value", "float"),
                    ("double_value", "double"),
                    ("boolean_value", "bool"),
                    ("string_value", "string"),
                    ("propertyset_value", "PropertySet"),
                    ("propertysets_value", "PropertySetList"),
                    ("extension_value", "PropertyValue.PropertyValueExtension"),
                )
            )
        ],
        None,
    ),
    "PropertyValue.PropertyValueExtension": ([], 1),
    "PropertySet": (
        [("keys", 1, "string", True, None), ("values", 2, "PropertyValue", True, None)],
        3,
    ),
    "PropertySetList": ([("propertyset", 1, "PropertySet", True, None)], 2),
    "MetaData": (
        [
            ("is_multi_part", 1, "bool", False, None),
            ("content_type", 2, "string", False, None),
            ("size", 3, "uint64", False, None),
            ("seq", 4, "uint64", False, None),
            ("file_name", 5, "string", False, None),
            ("file_type", 6, "string", False, None),
            ("md5", 7, "string", False, None),
            ("description", 8, "string", False, None),
        ],
        9,
    ),
    "Metric": (
        [
            ("name", 1, "string", False, None),
            ("alias", 2, "uint64", False, None),
            ("timestamp", 3, "uint64", False, None),
            ("datatype", 4, "uint32", False, None),
            ("is_historical", 5, "bool", False, None),
            ("is_transient", 6, "bool", False, None),
            ("is_null", 7, "bool", False, None),
            ("metadata", 8, "MetaData", False, None),
            ("properties", 9, "PropertySet", False, None),
            *_value(10, (*_SCALARS, "string_value", "bytes_value"), "-")[:-1],
            ("dataset_value", 17, "DataSet", False, "value"),
            ("template_value", 18, "Template", False, "value"),
            ("extension_value", 19, "Metric.MetricValueExtension", False, "value"),
        ],
        None,
    ),
    "Metric.MetricValueExtension": ([], 1),
    "": (
        [
            ("timestamp", 1, "uint64", False, None),
            ("metrics", 2, "Metric", True, None),
            ("seq", 3, "uint64", False, None),
            ("uuid", 4, "string", False, None),
            ("body", 5, "bytes", False, None),
        ],
        6,
    ),
}


def _message(path: str) -> descriptor_pb2.DescriptorProto:
    fields, ext_from = _SCHEMA[path]
    msg = descriptor_pb2.DescriptorProto(name=path.rsplit(".", 1)[-1] if path else "Payload")
    oneofs: list[str] = []
    for name, number, typ, repeated, oneof in fields:
        f = msg.field.add(name=name, number=number)
        f.label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
        if typ in _T:
            f.type = _T[typ]
        else:
            f.type = _F.TYPE_MESSAGE
            f.type_name = f".{PACKAGE}.Payload.{typ}"
        if oneof is not None:
            if oneof not in oneofs:
                oneofs.append(oneof)
                msg.oneof_decl.add(name=oneof)
            f.oneof_index = oneofs.index(oneof)
    if ext_from is not None:
        msg.extension_range.add(start=ext_from, end=_MAX)
    for child in _SCHEMA:  # the messages nested directly in this one
        if child and child.rpartition(".")[0] == path:
            msg.nested_type.append(_message(child))
    return msg


def _payload_class() -> Any:
    file = descriptor_pb2.FileDescriptorProto(
        name="sparkplug_b.proto", package=PACKAGE, syntax="proto2"
    )
    file.message_type.append(_message(""))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Payload"))


#: ``org.eclipse.tahu.protobuf.Payload``
Payload: Any = _payload_class()

__all__ = ["BOOLEAN", "DOUBLE", "FLOAT", "UINT64", "Payload"]
