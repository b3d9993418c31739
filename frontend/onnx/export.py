"""ONNX export: a kiln Graph (or a DSL module, traced) as an ONNX model.

IR ops are ONNX ops whose shape-determining inputs became attributes (the importer's
doing); export moves them back into int64 initializers at their ONNX input positions, so
importing the export gives back an equal graph. Fused nodes are exported as their bodies.
The opset is 21, or the lowest newer one that has every op the graph uses.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from kiln.errors import KilnError
from kiln.fileio import write_atomic
from kiln.frontend.onnx.importer import MICROSOFT
from kiln.ir.dtypes import DType
from kiln.ir.graph import Graph, Node, Value

BASE_OPSET = 21

# op -> [(IR attribute, ONNX input position, numpy dtype)]: attributes that ONNX takes as inputs
ATTR_INPUTS: dict[str, list[tuple[str, int, Any]]] = {
    "Reshape": [("shape", 1, np.int64)],
    "Expand": [("shape", 1, np.int64)],
    "Tile": [("repeats", 1, np.int64)],
    "Slice": [("starts", 1, np.int64), ("ends", 2, np.int64), ("axes", 3, np.int64), ("steps", 4, np.int64)],
    "Split": [("split", 1, np.int64)],
    "Pad": [("pads", 1, np.int64)],
    "OneHot": [("depth", 1, np.int64)],
    "Resize": [("roi", 1, np.float32), ("scales", 2, np.float32), ("sizes", 3, np.int64)],
    "TopK": [("k", 1, np.int64)],
    "CumSum": [("axis", 1, np.int64)],
    "CumProd": [("axis", 1, np.int64)],
    "Trilu": [("k", 1, np.int64)],
    "ConstantOfShape": [("shape", 0, np.int64)],
    "Dropout": [("ratio", 1, np.float32), ("training_mode", 2, np.bool_)],
    "Col2Im": [("image_shape", 1, np.int64), ("block_shape", 2, np.int64)],
    "DFT": [("length", 1, np.int64), ("axis", 2, np.int64)],
    **{
        name: [("axes", 1, np.int64)]
        for name in ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
                     "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare")
    },
}
SCALAR_INPUTS = {("CumSum", "axis"), ("CumProd", "axis"), ("Trilu", "k"), ("Dropout", "ratio"), ("Dropout", "training_mode"), ("DFT", "length"), ("DFT", "axis")}
DTYPE_ATTRS = {"Cast": "to", "BitCast": "to", "QuantizeLinear": "output_dtype", "DequantizeLinear": "output_dtype"}
CONTRIB_OPS = {"DynamicQuantizeLSTM"}  # onnxruntime's ops that kiln keeps as nodes: written in its domain
NOT_EXPORTABLE = {"MaxUnpool": "kiln's MaxUnpool keeps the unpooled shape, not ONNX's kernel attributes"}


def onnx_elem_type(dtype: DType) -> int:
    return helper.np_dtype_to_tensor_dtype(dtype.numpy)


def value_info(value: Value, name: str | None = None) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name or value.name, onnx_elem_type(value.type.dtype), list(value.type.shape))


class _Exporter:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.used_names = {v.name for v in graph.values()}
        self.ops: set[str] = set()

    def fresh(self, hint: str) -> str:
        name, n = hint, 0
        while name in self.used_names:
            n += 1
            name = f"{hint}_{n}"
        self.used_names.add(name)
        return name

    def constant(self, hint: str, array: np.ndarray) -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def export_nodes(self, graph: Graph, names: dict[Value, str], prefix: str = "") -> None:
        for node in graph.nodes:
            if node.op.name == "Fused":
                body: Graph = node.attrs["body"]
                inner = dict(names)
                inner.update({b: names[v] for b, v in zip(body.inputs, node.inputs)})
                for value, array in body.params.items():
                    inner[value] = self.constant(f"{node.name or 'fused'}.{value.name}", array)
                for v in (out for n in body.nodes for out in n.outputs):
                    inner[v] = self.fresh(v.name)
                for b, outer in zip(body.outputs, node.outputs):
                    inner[b] = names[outer]  # the body's results carry the fused node's names
                self.export_nodes(body, inner, prefix=(node.name or "fused") + "/")
                continue
            self.nodes.append(self.export_node(node, names, prefix))

    def export_node(self, node: Node, names: dict[Value, str], prefix: str) -> onnx.NodeProto:
        op = node.op.name
        if op in NOT_EXPORTABLE:
            raise KilnError(f"node {node.name!r} ({op}) has no ONNX export: {NOT_EXPORTABLE[op]}")
        self.ops.add(op)
        label = prefix + (node.name or op)
        inputs = [names[v] if v is not None else "" for v in node.inputs]
        attrs = dict(node.attrs)
        self.fix_attrs(node, attrs)
        for attr, position, dtype in ATTR_INPUTS.get(op, []):
            given = attrs.pop(attr)
            if given is None:
                name = ""
            else:
                array = np.asarray(given, dtype=dtype)
                name = self.constant(f"{label}.{attr}", array if (op, attr) in SCALAR_INPUTS else array.reshape(-1))
            while len(inputs) < position:
                inputs.append("")
            inputs.insert(position, name)
        while inputs and inputs[-1] == "":
            inputs.pop()
        attrs = {k: v for k, v in attrs.items() if v is not None}
        domain = MICROSOFT if op in CONTRIB_OPS else None
        return helper.make_node(op, inputs, [names[v] for v in node.outputs], name=label, domain=domain, **attrs)

    def fix_attrs(self, node: Node, attrs: dict) -> None:
        """The attributes whose ONNX spelling differs from kiln's."""
        op = node.op.name
        if "layout" in attrs and op in ("Conv", "ConvInteger", "ConvTranspose", "MaxPool", "AveragePool"):
            if attrs.pop("layout") != "NCHW":
                raise KilnError(f"node {node.name!r} ({op}) is channels-last, which ONNX cannot express; export the graph before the layout pass")
        if op in DTYPE_ATTRS and attrs.get(DTYPE_ATTRS[op]) is not None:
            key = DTYPE_ATTRS[op]
            attrs[key] = onnx_elem_type(DType.parse(attrs[key]))
        if op == "Reshape" and 0 in node.attrs["shape"]:
            attrs["allowzero"] = 1  # kiln's shapes are explicit: a 0 is an empty dim, never "copy"
        if op == "ConstantOfShape":
            dtype = DType.parse(attrs.pop("dtype")).numpy
            attrs["value"] = numpy_helper.from_array(np.asarray([attrs["value"]], dtype=dtype), "value")
        if op == "Resize":
            # ONNX takes scales or sizes, not both: sizes when they agree with the scales exactly
            x = node.inputs[0].type.shape
            scales = node.attrs["scales"]
            if all(s * n == o for s, n, o in zip(scales, x, node.attrs["sizes"])):
                attrs["scales"] = None
            else:
                attrs["sizes"] = None


def required_opset(ops: set[str]) -> int:
    """The lowest opset >= BASE_OPSET at which every op in ``ops`` exists."""
    opset = BASE_OPSET
    for op in ops - CONTRIB_OPS:
        try:
            onnx.defs.get_schema(op, BASE_OPSET)
        except onnx.defs.SchemaError:
            opset = max(opset, onnx.defs.get_schema(op).since_version)
    return opset


def graph_to_onnx(graph: Graph, producer: str = "kiln") -> onnx.ModelProto:
    """``graph`` as an ONNX model (checked with the ONNX checker, full check)."""
    exporter = _Exporter(graph)
    names = {v: v.name for v in graph.values()}
    exporter.export_nodes(graph, names)
    initializers = [numpy_helper.from_array(np.require(a, requirements="C"), v.name) for v, a in graph.params.items()]
    outputs, extra = [], []
    seen: set[str] = set()
    for i, value in enumerate(graph.outputs):
        name = value.name
        if name in seen or value in graph.inputs or value in graph.params:
            # ONNX outputs need a node to produce them and distinct names
            name = exporter.fresh(f"output{i}")
            extra.append(helper.make_node("Identity", [value.name], [name], name=name))
        seen.add(name)
        outputs.append(value_info(value, name))
    onnx_graph = helper.make_graph(
        exporter.nodes + extra,
        graph.name,
        [value_info(v) for v in graph.inputs],
        outputs,
        initializers + exporter.initializers,
    )
    from kiln import __version__

    model = helper.make_model(
        onnx_graph,
        opset_imports=[helper.make_opsetid("", required_opset(exporter.ops))] + [helper.make_opsetid(MICROSOFT, 1)] * bool(exporter.ops & CONTRIB_OPS),
        producer_name=producer,
        producer_version=__version__,
    )
    model.ir_version = min(model.ir_version, 10)  # what current onnxruntime reads
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as err:
        raise KilnError(f"the ONNX export of graph {graph.name!r} fails the ONNX checker (a kiln bug): {err}") from None
    return model


def export_onnx(
    model: "Graph | Callable",
    path: str | os.PathLike | None,
    example_inputs: Any = None,
    input_names: list[str] | None = None,
) -> onnx.ModelProto:
    """Write ``model`` (a Graph, a DSL Module or a traceable function) to ``path`` as ONNX.

    Modules and functions are traced on ``example_inputs`` first (call ``model.eval()`` for an
    inference export). Returns the ModelProto; ``path=None`` only returns it. The file is
    written atomically.
    """
    if isinstance(model, Graph):
        graph = model
    else:
        if example_inputs is None:
            raise KilnError("export_onnx: a module or function needs example_inputs to be traced")
        from kiln.frontend.dsl.trace import trace

        graph = trace(model, example_inputs, input_names)
    proto = graph_to_onnx(graph)
    if path is not None:
        write_atomic(path, proto.SerializeToString())
    return proto
