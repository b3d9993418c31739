"""ONNX ModelProto -> kiln Graph.

The importer first scans the whole model for ops it has no converter for and reports them all
at once; then it binds input shapes, turns initializers into parameters and converts each node
with its op's converter (``frontend/onnx/convert_*.py``). Values that depend only on constants
are folded on the way (bounded by KILN_FOLD_ELEMENTS), which is how ``Shape -> Gather ->
Concat -> Reshape`` chains become static shape attributes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kiln import config
from kiln.errors import GraphError, KilnError, ModelLoadError, NeedsStaticValue, UnsupportedOpsError
from kiln.frontend.onnx.order import topological_nodes
from kiln.frontend.onnx.functions import function_opset, has_schema_function, instantiate, schema_defaults, schema_function
from kiln.ir.dtypes import DType
from kiln.ir.graph import Graph, Value
from kiln.ir.opdef import OpDef, get_op
from kiln.ir.types import TensorType

ONNX_DOMAINS = ("", "ai.onnx")
MIN_OPSET = 1  # opsets 1-6 where converters handle their legacy attributes (old PyTorch exports)

_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: DType.float32,
    onnx.TensorProto.DOUBLE: DType.float64,
    onnx.TensorProto.FLOAT16: DType.float16,
    onnx.TensorProto.INT8: DType.int8,
    onnx.TensorProto.INT16: DType.int16,
    onnx.TensorProto.INT32: DType.int32,
    onnx.TensorProto.INT64: DType.int64,
    onnx.TensorProto.UINT8: DType.uint8,
    onnx.TensorProto.UINT16: DType.uint16,
    onnx.TensorProto.UINT32: DType.uint32,
    onnx.TensorProto.UINT64: DType.uint64,
    onnx.TensorProto.BOOL: DType.bool,
}


def onnx_type(t: TensorType) -> onnx.TypeProto:
    """The ONNX TypeProto of a kiln tensor type."""
    elem = next(code for code, d in _ONNX_DTYPES.items() if d == t.dtype)
    return helper.make_tensor_type_proto(elem, list(t.shape))


def dtype_from_onnx(elem_type: int, where: str) -> DType:
    try:
        return _ONNX_DTYPES[elem_type]
    except KeyError:
        name = onnx.TensorProto.DataType.Name(elem_type) if elem_type in onnx.TensorProto.DataType.values() else elem_type
        raise KilnError(f"{where}: element type {name} is not supported by kiln") from None


Converter = Callable[["NodeContext"], Sequence["Value | None"]]
CONVERTERS: dict[str, Converter] = {}
MICROSOFT = "com.microsoft"  # onnxruntime's contrib domain: its quantized ops (QOperator models)
CONTRIB_CONVERTERS: dict[str, Converter] = {}


def converter(*op_types: str, domain: str = "") -> Callable[[Converter], Converter]:
    """Register the decorated function as the converter of ONNX ``op_types`` (the default
    domain, or ``domain="com.microsoft"`` for onnxruntime's contrib ops)."""
    table = CONTRIB_CONVERTERS if domain == MICROSOFT else CONVERTERS
    if domain not in (*ONNX_DOMAINS, MICROSOFT):
        raise ValueError(f"converters are for the ONNX and {MICROSOFT} domains, not {domain!r}")

    def wrap(fn: Converter) -> Converter:
        for op in op_types:
            if op in table:
                raise ValueError(f"two converters for ONNX op {op}")
            table[op] = fn
        return fn

    return wrap


def converter_of(domain: str, op_type: str) -> Converter | None:
    if domain in ONNX_DOMAINS:
        return CONVERTERS.get(op_type)
    return CONTRIB_CONVERTERS.get(op_type) if domain == MICROSOFT else None


def _load_converters() -> None:
    from kiln.frontend.onnx import convert_contrib, convert_control, convert_elementwise, convert_nn, convert_shape, convert_signal  # noqa: F401


def supported_ops() -> list[str]:
    _load_converters()
    return sorted(CONVERTERS)


@dataclass
class NodeContext:
    """What a converter sees of one ONNX node: its inputs as kiln Values, its attributes, opset."""

    importer: "Importer"
    node: onnx.NodeProto
    opset: int
    name: str

    # -- inputs -------------------------------------------------------------------------
    @property
    def num_inputs(self) -> int:
        return len(self.node.input)

    def has_input(self, i: int) -> bool:
        return i < len(self.node.input) and self.node.input[i] != ""

    def input(self, i: int) -> Value | None:
        if not self.has_input(i):
            return None
        return self.importer.env[self.node.input[i]]

    def inputs(self) -> list[Value | None]:
        return [self.input(i) for i in range(len(self.node.input))]

    def type(self, i: int) -> TensorType:
        value = self.input(i)
        if value is None:
            raise self.error(f"input {i} is required")
        return value.type

    def const(self, i: int, what: str = "") -> np.ndarray | None:
        """The compile-time value of input ``i`` (None if absent); NeedsStaticValue if dynamic."""
        value = self.input(i)
        if value is None:
            return None
        return self.importer.static_value(value, f"node {self.name!r} ({self.node.op_type}): {what or f'input {i}'}")

    def const_ints(self, i: int, what: str = "") -> list[int] | None:
        value = self.const(i, what)
        return None if value is None else [int(v) for v in value.reshape(-1)]

    # -- attributes -----------------------------------------------------------------------
    def attr(self, name: str, default: Any = None) -> Any:
        for a in self.node.attribute:
            if a.name == name:
                value = helper.get_attribute_value(a)
                if isinstance(value, bytes):
                    return value.decode("utf-8")
                if isinstance(value, list) and value and isinstance(value[0], bytes):
                    return [v.decode("utf-8") for v in value]
                if isinstance(value, onnx.TensorProto):
                    return self.importer.tensor(value, f"attribute {name} of node {self.name!r}")
                return value
        return default

    def attrs(self) -> dict[str, Any]:
        return {a.name: self.attr(a.name) for a in self.node.attribute}

    # -- building -------------------------------------------------------------------------
    def error(self, message: str) -> KilnError:
        return GraphError(f"node {self.name!r} ({self.node.op_type}): {message}")

    def emit(self, op: str | OpDef, inputs: Sequence[Value | None], attrs: Mapping[str, Any] | None = None, num_outputs: int | None = None) -> list[Value]:
        """Add ``op`` to the graph (or fold it to constants when every input is one)."""
        return self.importer.emit(op, inputs, attrs or {}, self.name, num_outputs)

    def constant(self, array: np.ndarray | Sequence | float | int, dtype: Any = None) -> Value:
        return self.importer.constant(np.asarray(array, dtype=dtype))

    def reshape(self, value: Value, shape: Sequence[int]) -> Value:
        if tuple(shape) == value.type.shape:
            return value
        return self.emit("Reshape", [value], {"shape": [int(d) for d in shape]})[0]


class Importer:
    """Converts one ModelProto; use ``import_onnx`` rather than this class directly."""

    def __init__(self, model: onnx.ModelProto, source: str):
        self.model = model
        self.source = source
        self.graph = Graph(model.graph.name or "main")
        self.env: dict[str, Value] = {}
        self.opsets = {imp.domain or "": imp.version for imp in model.opset_import}
        self.local_functions = {(f.domain, f.name): f for f in model.functions}
        self._new_values: list[Value] = []

    # -- the whole-model scan ---------------------------------------------------------------
    def check_supported(self) -> None:
        _load_converters()
        missing: list[tuple[str, str, int, str]] = []
        seen: set[tuple[str, str]] = set()

        def walk(graph: onnx.GraphProto) -> None:
            for i, node in enumerate(graph.node):
                domain = node.domain or ""
                known = (
                    converter_of(domain, node.op_type) is not None
                    or (domain, node.op_type) in self.local_functions
                    or has_schema_function(node.op_type, domain, self.opsets.get(domain, 1))
                )
                if not known and (node.op_type, domain) not in seen:
                    seen.add((node.op_type, domain))
                    missing.append((node.op_type, domain, self.opsets.get(domain, 0), node.name or f"#{i}"))
                for attr in node.attribute:
                    if attr.HasField("g"):
                        walk(attr.g)
                    for sub in attr.graphs:
                        walk(sub)

        walk(self.model.graph)
        for fn in self.local_functions.values():
            walk(helper.make_graph(fn.node, fn.name, [], []))
        if missing:
            raise UnsupportedOpsError(missing, self.source)
        opset = self.opsets.get("", self.opsets.get("ai.onnx", 0))
        if opset < MIN_OPSET:
            raise ModelLoadError(f"{self.source}: the model imports no ONNX opset (opset_import is empty)")

    # -- values --------------------------------------------------------------------------
    def tensor(self, proto: onnx.TensorProto, where: str) -> np.ndarray:
        dtype_from_onnx(proto.data_type, where)
        try:
            return numpy_helper.to_array(proto)
        except (ValueError, TypeError) as err:
            raise KilnError(f"{self.source}: {where}: cannot decode tensor: {err}") from None

    def constant(self, array: np.ndarray) -> Value:
        value = self.graph.add_param(self.graph.fresh_name("_const"), array)
        self._new_values.append(value)
        return value

    def static_value(self, value: Value, what: str) -> np.ndarray:
        """The compile-time value of ``value``; NeedsStaticValue naming the graph inputs it needs."""
        if value in self.graph.params:
            return self.graph.params[value]
        deps = self.graph_inputs_behind(value)
        raise NeedsStaticValue(
            f"{what} ({value.name}) decides an output shape and must be known at compile time; "
            f"it depends on graph input(s) {deps}",
            deps,
        )

    def graph_inputs_behind(self, value: Value) -> list[str]:
        """Names of the graph inputs ``value`` is computed from."""
        found: list[str] = []
        stack, seen = [value], set()
        inputs = set(self.graph.inputs)
        while stack:
            v = stack.pop()
            if id(v) in seen:
                continue
            seen.add(id(v))
            if v in inputs:
                found.append(v.name)
            elif v.producer is not None:
                stack.extend(x for x in v.producer.inputs if x is not None)
        return sorted(found)

    def emit(self, op: str | OpDef, inputs: Sequence[Value | None], attrs: Mapping[str, Any], name: str, num_outputs: int | None) -> list[Value]:
        opdef = get_op(op) if isinstance(op, str) else op
        node = self.graph.add_node(opdef, inputs, attrs, name=name, num_outputs=num_outputs)
        params = self.graph.params
        cap = config.flags().fold_elements
        # a DequantizeLinear of a weight (``folds_any_size``) stays a node: the integer_products
        # pass reads the 8-bit weight under it, and canonicalize folds what is left
        foldable = (
            opdef.deterministic
            and not opdef.folds_any_size
            and all(v is None or v in params for v in inputs)
            and all(v.type.numel <= cap for v in node.outputs)
        )
        if not foldable:
            self._new_values.extend(node.outputs)
            return node.outputs
        # every input is a constant: evaluate now and keep the results as parameters
        self.graph.nodes.pop()
        arrays = opdef.run_eager(node.attrs, [params[v] if v is not None else None for v in inputs])
        out = []
        for value, array in zip(node.outputs, arrays):
            self.graph.forget_name(value.name)
            out.append(self.constant(np.asarray(array, dtype=value.type.dtype.numpy).reshape(value.type.shape)))
        return out

    # -- the import ------------------------------------------------------------------------
    def bind_inputs(self, shapes: Mapping[str, Sequence[int]], constants: Mapping[str, np.ndarray]) -> None:
        g = self.model.graph
        initializers = {t.name for t in g.initializer}
        declared = {i.name for i in g.input}
        for key in list(shapes) + list(constants):
            if key not in declared:
                raise KilnError(f"{self.source}: no graph input named {key!r} (inputs: {sorted(declared - initializers)})")
        for init in g.initializer:
            if init.name in constants:
                continue
            self.env[init.name] = self.graph.add_param(init.name, self.tensor(init, f"initializer {init.name!r}"))
        for inp in g.input:
            if inp.name in initializers and inp.name not in constants:
                continue
            where = f"{self.source}: graph input {inp.name!r}"
            if inp.name in constants:
                self.env[inp.name] = self.graph.add_param(inp.name, np.asarray(constants[inp.name]))
                continue
            if not inp.type.HasField("tensor_type"):
                raise KilnError(f"{where} is not a tensor (kiln reads tensor inputs only)")
            tt = inp.type.tensor_type
            dtype = dtype_from_onnx(tt.elem_type, where)
            self.env[inp.name] = self.graph.add_input(inp.name, TensorType(self._input_shape(inp, shapes, where), dtype))

    def _input_shape(self, inp: onnx.ValueInfoProto, shapes: Mapping[str, Sequence[int]], where: str) -> tuple[int, ...]:
        tt = inp.type.tensor_type
        declared = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
        if inp.name in shapes:
            given = tuple(int(d) for d in shapes[inp.name])
            if tt.HasField("shape"):
                if len(given) != len(declared):
                    raise KilnError(f"{where}: --shape gives rank {len(given)}, the model declares {declared}")
                for d, g_ in zip(declared, given):
                    if isinstance(d, int) and d != g_:
                        raise KilnError(f"{where}: --shape {list(given)} conflicts with the declared shape {declared}")
            if any(d < 0 for d in given):
                raise KilnError(f"{where}: negative dimension in {list(given)}")
            return given
        if not tt.HasField("shape"):
            raise KilnError(f"{where} has no declared shape; bind it with shapes={{{inp.name!r}: (...)}} or --shape")
        symbolic = [d for d in declared if not isinstance(d, int)]
        if symbolic:
            raise KilnError(
                f"{where} has symbolic dims {symbolic} in {declared}; bind them with "
                f"shapes={{{inp.name!r}: (...)}} or --shape {inp.name}=" + "x".join("N" if not isinstance(d, int) else str(d) for d in declared)
            )
        return tuple(declared)

    def convert_nodes(self, nodes: Sequence[onnx.NodeProto] | None = None, prefix: str = "", opset: int | None = None) -> None:
        opset = opset or self.opsets.get("", self.opsets.get("ai.onnx", 0))
        for index, node in enumerate(self.model.graph.node if nodes is None else nodes):
            name = prefix + (node.name or f"{node.op_type}_{index}")
            for inp in node.input:
                if inp and inp not in self.env:
                    raise GraphError(
                        f"{self.source}: node {name!r} ({node.op_type}) reads {inp!r}, which no earlier node, "
                        "input or initializer defines (a cycle, a missing input or unsorted nodes)"
                    )
            ctx = NodeContext(self, node, opset, name)
            self._new_values = []
            outputs = self.convert_node(ctx)
            wanted = [o for o in node.output]
            for i, out_name in enumerate(wanted):
                if not out_name:
                    continue
                if i >= len(outputs) or outputs[i] is None:
                    raise ctx.error(f"output {i} ({out_name!r}) is not produced by kiln's conversion")
                value = outputs[i]
                if any(value is v for v in self._new_values) and not self.graph.has_name(out_name):
                    self.graph.rename(value, out_name)
                self.env[out_name] = value

    def convert_node(self, ctx: NodeContext) -> list[Value | None]:
        """Dispatch one node: its converter, else a model-local function, else its ONNX function body."""
        node = ctx.node
        domain = node.domain or ""
        convert = converter_of(domain, node.op_type)
        if convert is not None:
            return list(convert(ctx))
        local = self.local_functions.get((domain, node.op_type))
        if local is not None:
            body, names = instantiate(local, node)
            opset = function_opset(local, ctx.opset)
        else:
            opset_here = self.opsets.get(domain, ctx.opset) if domain not in ONNX_DOMAINS else ctx.opset
            types = [onnx_type(v.type) if v is not None else onnx.TypeProto() for v in ctx.inputs()]
            fn = schema_function(node, opset_here, types)
            if fn is None:
                raise UnsupportedOpsError([(node.op_type, domain, opset_here, ctx.name)], self.source)
            body, names = instantiate(fn, node, schema_defaults(node, opset_here))
            opset = function_opset(fn, ctx.opset)
        bindings = {inner: self.env[outer] for inner, outer in names.items()}
        return self.inline(body, bindings, ctx.name, opset)

    def inline(self, body: onnx.GraphProto, bindings: Mapping[str, Value], where: str, opset: int | None = None) -> list[Value]:
        """Convert a subgraph (an If branch, a Loop body) into the graph being built.

        Its inputs are bound to ``bindings``; values of the enclosing scopes stay visible, and
        what the subgraph defines does not leak out. Returns its outputs.
        """
        saved_env, saved_new = self.env, self._new_values
        self.env = {**saved_env, **bindings}
        try:
            for init in body.initializer:
                self.env[init.name] = self.constant(self.tensor(init, f"initializer {init.name!r} of {where}"))
            self.convert_nodes(body.node, prefix=where + "/", opset=opset)
            missing = [o.name for o in body.output if o.name not in self.env]
            if missing:
                raise GraphError(f"{self.source}: {where}: subgraph outputs {missing} are never computed")
            return [self.env[o.name] for o in body.output]
        finally:
            self.env, self._new_values = saved_env, saved_new

    def bind_outputs(self) -> None:
        for out in self.model.graph.output:
            if out.name not in self.env:
                raise GraphError(f"{self.source}: graph output {out.name!r} is not computed by any node")
            value = self.env[out.name]
            if value.name != out.name or value in self.graph.outputs:
                # outputs are named as in the model, even when one is an input, a constant or a repeat
                if self.graph.has_name(out.name):
                    raise GraphError(f"{self.source}: graph output {out.name!r} clashes with another value's name")
                node = self.graph.add_node("Identity", [value], name=out.name, output_names=[out.name])
                value = node.outputs[0]
            self.graph.outputs.append(value)


def import_onnx(
    model: onnx.ModelProto,
    shapes: Mapping[str, Sequence[int]] | None = None,
    constants: Mapping[str, np.ndarray] | None = None,
    source: str = "model",
) -> Graph:
    """Convert ``model`` to a kiln Graph.

    ``shapes`` binds the shape of inputs with symbolic or missing dims; ``constants`` binds
    inputs to fixed values (they become parameters). Raises UnsupportedOpsError listing every
    unsupported op, and errors naming the node for anything else.
    """
    importer = Importer(model, source)
    importer.check_supported()
    importer.bind_inputs(shapes or {}, constants or {})
    g = model.graph
    importer.convert_nodes(topological_nodes(g, [*importer.env, *(i.name for i in g.input)], source))
    importer.bind_outputs()
    importer.graph.remove_unread_params()  # initializers that became attributes (a Reshape's shape)
    return importer.graph
