"""Ops kiln has no converter for, expanded through their ONNX function bodies.

Many ONNX ops are defined as functions of simpler ops (the schema's function body, or a
context-dependent one built from the input types), and models may carry local functions
(``ModelProto.functions``, as the PyTorch exporter writes). The importer inlines these bodies
into the graph, ONNX-FunctionBody style, so only primitive ops need converters.
"""

from __future__ import annotations

import onnx
from onnx import helper


def _best_version(versions, opset: int) -> int | None:
    usable = [v for v in versions if v <= opset]
    return max(usable) if usable else None


def schema_function(node: onnx.NodeProto, opset: int, input_types: list[onnx.TypeProto] | None) -> onnx.FunctionProto | None:
    """The standard op's function body at ``opset`` (None if it has none, or needs types we lack)."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    except onnx.defs.SchemaError:
        return None
    fn = onnx.FunctionProto()
    if schema.has_function:
        version = _best_version(schema.function_opset_versions, opset)
        if version is not None:
            fn.ParseFromString(schema.get_function_with_opset_version(version))
            return fn
    if schema.has_context_dependent_function and input_types is not None:
        version = _best_version(schema.context_dependent_function_opset_versions, opset)
        if version is not None:
            raw = schema.get_context_dependent_function_with_opset_version(
                version, node.SerializeToString(), [t.SerializeToString() for t in input_types]
            )
            if raw:
                fn.ParseFromString(raw)
                return fn
    return None


def has_schema_function(op_type: str, domain: str, opset: int) -> bool:
    try:
        schema = onnx.defs.get_schema(op_type, opset, domain)
    except onnx.defs.SchemaError:
        return False
    return schema.has_function or schema.has_context_dependent_function


def function_opset(fn: onnx.FunctionProto, default: int) -> int:
    for imp in fn.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return default


def schema_defaults(node: onnx.NodeProto, opset: int) -> dict[str, onnx.AttributeProto]:
    """The default attribute values of ``node``'s standard op at ``opset``."""
    schema = onnx.defs.get_schema(node.op_type, opset, node.domain or "")
    return {name: a.default_value for name, a in schema.attributes.items() if a.default_value.ListFields()}


def instantiate(
    fn: onnx.FunctionProto, node: onnx.NodeProto, defaults: dict[str, onnx.AttributeProto] | None = None
) -> tuple[onnx.GraphProto, dict[str, str]]:
    """``fn``'s body specialized to the call ``node``: attribute references resolved (from the
    call, else ``defaults``, else the function's own defaults), absent optional inputs blanked.
    Returns the body as a graph and {body input name: caller value name}."""
    given = {a.name: a for a in node.attribute}
    defaults = {**{a.name: a for a in fn.attribute_proto}, **(defaults or {})}
    absent = {name for i, name in enumerate(fn.input) if i >= len(node.input) or not node.input[i]}

    def resolve(n: onnx.NodeProto) -> onnx.NodeProto:
        out = onnx.NodeProto()
        out.CopyFrom(n)
        del out.attribute[:]
        for attr in n.attribute:
            if attr.ref_attr_name:
                source = given.get(attr.ref_attr_name) or defaults.get(attr.ref_attr_name)
                if source is None or not source.ListFields():
                    continue  # unset, no default: the body node uses its own default
                resolved = onnx.AttributeProto()
                resolved.CopyFrom(source)
                resolved.name = attr.name
                out.attribute.append(resolved)
            else:
                out.attribute.append(attr)
        for i, name in enumerate(out.input):
            if name in absent:
                out.input[i] = ""
        return out

    body = helper.make_graph(
        [resolve(n) for n in fn.node],
        fn.name,
        [],
        [helper.make_empty_tensor_value_info(o) for o in fn.output],
    )
    bindings = {name: node.input[i] for i, name in enumerate(fn.input) if name not in absent}
    return body, bindings
