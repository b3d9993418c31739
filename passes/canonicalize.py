"""Canonicalization: the clean-ups every pipeline starts with (``-O1``).

Each pass keeps the graph's outputs, their names and types, and the values they compute.
"""

from __future__ import annotations

import json

import numpy as np

from kiln import config
from kiln.ir.graph import Graph, Node
from kiln.ir.opdef import get_op
from kiln.ir.ops.nn import _spatial_attrs
from kiln.ir.text import print_graph
from kiln.passes.base import graph_pass
from kiln.passes.rewrite import live_nodes, substitute


@graph_pass("fold_constants")
def fold_constants(graph: Graph) -> Graph:
    """Evaluate deterministic nodes whose inputs are all parameters; their outputs become
    parameters (each at most KILN_FOLD_ELEMENTS elements, so folding never bloats the model,
    unless the op ``folds_any_size``: a DequantizeLinear of a weight)."""
    cap = config.flags().fold_elements
    for node in list(graph.nodes):
        if not node.op.deterministic or any(v is not None and v not in graph.params for v in node.inputs):
            continue
        if not node.op.folds_any_size and any(v.type.numel > cap for v in node.outputs):
            continue
        fold_node(graph, node)
    return graph


@graph_pass("fold_dequantized_weights")
def fold_dequantized_weights(graph: Graph) -> Graph:
    """Fold each node that folds whatever its size (a weight's DequantizeLinear) whose inputs
    are all parameters: what the importer leaves for integer_products, folded for targets that
    run the graph as imported (eager would otherwise dequantize every weight every run)."""
    for node in [n for n in graph.nodes if folds_at_any_size(graph, n)]:
        fold_node(graph, node)
    return graph


def folds_at_any_size(graph: Graph, node: Node) -> bool:
    """A node of an op that folds whatever its size (a weight's DequantizeLinear) whose inputs
    are all parameters."""
    return node.op.folds_any_size and all(v is None or v in graph.params for v in node.inputs)


def fold_node(graph: Graph, node: Node) -> None:
    """Replace ``node``, whose inputs are all parameters, by parameters holding its outputs."""
    arrays = node.op.run_eager(node.attrs, [graph.params[v] if v is not None else None for v in node.inputs])
    graph.remove_nodes([node])
    for value, array in zip(node.outputs, arrays):
        param = graph.add_param(value.name, np.asarray(array, dtype=value.type.dtype.numpy).reshape(value.type.shape))
        graph.replace_uses(value, param)


@graph_pass("eliminate_dead_code")
def eliminate_dead_code(graph: Graph) -> Graph:
    """Drop nodes that no output depends on, and parameters nothing reads."""
    live = {id(n) for n in live_nodes(graph)}
    graph.remove_nodes([n for n in graph.nodes if id(n) not in live])
    used = {id(v) for n in graph.nodes for v in n.inputs if v is not None} | {id(v) for v in graph.outputs}
    for value in [v for v in graph.params if id(v) not in used]:
        graph.remove_param(value)
    return graph


@graph_pass("eliminate_common_subexpressions")
def eliminate_common_subexpressions(graph: Graph) -> Graph:
    """Merge nodes that apply the same op with the same attributes to the same inputs, and
    small parameters with identical contents."""
    cap = config.flags().fold_elements
    seen_params: dict[tuple, object] = {}
    for value, array in list(graph.params.items()):
        if array.size > cap:
            continue
        key = (array.dtype.str, array.shape, array.tobytes())
        if key in seen_params:
            if substitute(graph, value, seen_params[key]):
                graph.remove_param(value)
        else:
            seen_params[key] = value
    seen: dict[tuple, object] = {}
    doomed = []
    for node in graph.nodes:
        if not node.op.deterministic:
            continue
        key = (node.op.name, tuple(id(v) for v in node.inputs), attrs_key(node.attrs), len(node.outputs))
        twin = seen.get(key)
        if twin is None:
            seen[key] = node
            continue
        if all(substitute(graph, mine, theirs) for mine, theirs in zip(node.outputs, twin.outputs)):
            doomed.append(node)
    graph.remove_nodes(doomed)
    return graph


def attrs_key(attrs: dict) -> str:
    """A hashable spelling of attributes (graph-valued ones by their text form)."""
    return json.dumps({k: print_graph(v, canonical=True) if isinstance(v, Graph) else v for k, v in attrs.items()}, sort_keys=True)


def _is_noop(node) -> bool:
    op, attrs = node.op.name, node.attrs
    x = node.inputs[0] if node.inputs else None
    if op == "Identity":
        return True
    if op == "Dropout":
        return not attrs["training_mode"] and len(node.outputs) == 1
    if op in ("Reshape", "Expand") and x is not None:
        return node.outputs[0].type.shape == x.type.shape
    if op == "Transpose":
        return list(attrs["perm"]) == sorted(attrs["perm"])
    if op == "Cast" and x is not None:
        return node.outputs[0].type.dtype == x.type.dtype
    if op == "Slice" and x is not None:  # keeps every element in order (a weight gradient's
        # window crop when the windows fit exactly: 9.4 MB copied per ResNet layer-4 conv)
        return node.outputs[0].type.shape == x.type.shape and all(s == 1 for s in attrs.get("steps") or [1])
    return False


@graph_pass("remove_noops")
def remove_noops(graph: Graph) -> Graph:
    """Remove Identity, inference-mode Dropout, and Reshape/Expand/Transpose/Cast/Slice that change
    nothing. A graph output that would alias an input or parameter keeps a node, as Identity."""
    doomed = []
    for node in graph.nodes:
        if not _is_noop(node):
            continue
        if substitute(graph, node.outputs[0], node.inputs[0]):
            doomed.append(node)
        else:
            # an output that must keep its name over an input or parameter: the canonical Identity
            node.op, node.inputs, node.attrs = get_op("Identity"), node.inputs[:1], {}
    graph.remove_nodes(doomed)
    return graph


@graph_pass("fold_reshape_chains")
def fold_reshape_chains(graph: Graph) -> Graph:
    """Reshape(Reshape(x)) -> Reshape(x); the inner one goes if nothing else reads it."""
    for node in graph.nodes:
        x = node.inputs[0] if node.inputs else None
        if node.op.name == "Reshape" and x is not None and x.producer is not None and x.producer.op.name == "Reshape":
            node.inputs[0] = x.producer.inputs[0]
    return eliminate_dead_code(graph)


def compose_transposes(node: Node) -> None:
    """``node``, a Transpose(Transpose(x, p), q), becomes Transpose(x, p∘q) in place (the
    inner one stays for its other readers; an identity is removed later)."""
    inner = node.inputs[0].producer
    node.attrs["perm"] = [inner.attrs["perm"][i] for i in node.attrs["perm"]]
    node.inputs[0] = inner.inputs[0]


@graph_pass("fold_transpose_chains")
def fold_transpose_chains(graph: Graph) -> Graph:
    """Transpose(Transpose(x, p), q) -> Transpose(x, p∘q) (removed later if the identity)."""
    for node in graph.nodes:
        x = node.inputs[0] if node.inputs else None
        if node.op.name == "Transpose" and x is not None and x.producer is not None and x.producer.op.name == "Transpose":
            compose_transposes(node)
    return eliminate_dead_code(graph)


@graph_pass("fold_fills")
def fold_fills(graph: Graph) -> Graph:
    """A Reshape, Transpose, Expand or Cast of a ConstantOfShape is a ConstantOfShape of the
    result's shape and dtype: no run-time pass over a tensor of one repeated value (fills too
    large to fold into parameters stay fills)."""
    for node in graph.nodes:
        x = node.inputs[0] if node.inputs else None
        if node.op.name not in ("Reshape", "Transpose", "Expand", "Cast") or x is None or x.producer is None:
            continue
        fill = x.producer
        if fill.op.name != "ConstantOfShape":
            continue
        out = node.outputs[0].type
        value = np.asarray(fill.attrs["value"], dtype=x.type.dtype.numpy).astype(out.dtype.numpy).item()
        node.op, node.inputs = get_op("ConstantOfShape"), []
        node.attrs = {"shape": list(out.shape), "value": value, "dtype": out.dtype.short}
    return eliminate_dead_code(graph)


@graph_pass("expand_small_powers")
def expand_small_powers(graph: Graph) -> Graph:
    """Pow(x, c) with c a float constant of one value, 1, 2, 3 or -1, and x's shape: x,
    x * x, x * x * x, 1 / x. A Pow is a libm call per element (~55 times a Relu's cost on the
    llvm target); these are one or two multiplies, the same values (x * x * x within an ulp).
    LayerNorm and variance written out (opset < 17) and MSE losses square this way."""
    for node in list(graph.nodes):
        if node.op.name != "Pow" or node.inputs[1] not in graph.params or not node.inputs[0].type.dtype.is_float:
            continue
        x, exponent = node.inputs[0], np.unique(graph.params[node.inputs[1]])
        if exponent.size != 1 or float(exponent[0]) not in (1.0, 2.0, 3.0, -1.0) or node.outputs[0].type != x.type:
            continue
        c = float(exponent[0])
        if c == 3.0:  # the square first, as its own node
            square = graph.add_node("Mul", [x, x], index=graph.nodes.index(node)).outputs[0]
            node.op, node.inputs = get_op("Mul"), [square, x]
        elif c == 2.0:
            node.op, node.inputs = get_op("Mul"), [x, x]
        else:
            node.op, node.inputs = get_op("Reciprocal" if c == -1.0 else "Identity"), [x]
        node.attrs = node.op.complete_attrs({})
    return eliminate_dead_code(graph)


@graph_pass("gather_one_as_slice")
def gather_one_as_slice(graph: Graph) -> Graph:
    """Gather of one constant index: a Slice of that index (and a Reshape where the index is a
    scalar, which drops the axis). Where the part is a contiguous run of the data (size-1 dims
    before the axis: torch's q, k and v out of one (3, 197, 1, 768) projection) the memory
    plan makes the Slice a view, so no kernel copies it."""
    for node in list(graph.nodes):
        indices = graph.params.get(node.inputs[1]) if node.op.name == "Gather" else None
        if indices is None or indices.size != 1:
            continue
        x, out = node.inputs[0], node.outputs[0]
        axis = node.attrs["axis"] % x.type.rank
        index, dim = int(indices.reshape(())), x.type.shape[axis]
        if not -dim <= index < dim:  # out of range: the Gather's own error, at run time
            continue
        index %= dim
        attrs = {"starts": [index], "ends": [index + 1], "axes": [axis], "steps": None}
        if indices.ndim:  # indices of shape (1,): the axis stays
            node.op, node.inputs, node.attrs = get_op("Slice"), [x], attrs
            continue
        part = graph.add_node("Slice", [x], attrs, name=f"{node.name}/slice", index=graph.nodes.index(node)).outputs[0]
        node.op, node.inputs, node.attrs = get_op("Reshape"), [part], {"shape": list(out.type.shape)}
    return eliminate_dead_code(graph)


def _live_taps(size: int, out: int, k: int, stride: int, dilation: int, before: int) -> tuple[int, int]:
    """The first and last tap along an axis that reads the image (not only the zero border)
    for some output position: tap ``t`` reads ``o * stride + t * dilation - before`` for o in
    [0, out), so it reads the image iff that range meets [0, size). The first is kept no later
    than where its trimmed leading pad would go negative."""
    reads = [t for t in range(k) if t * dilation - before + (out - 1) * stride >= 0 and t * dilation - before <= size - 1]
    if not reads:
        return 0, k - 1
    return min(reads[0], before // dilation), reads[-1]


@graph_pass("trim_border_taps")
def trim_border_taps(graph: Graph) -> Graph:
    """A Conv (constant weights, channels-first) whose outer taps along an axis read only the
    zero border, for every output position, drops them: a smaller kernel, sliced from the
    weights now, and pads smaller by what they covered, so the output is unchanged. A dilated
    conv over a small map is the case (DeepLab's rate-18 ASPP branch at 14x14 is a 1x1 conv;
    its zero-padded image was 50x50)."""
    for node in graph.nodes:
        if node.op.name != "Conv" or node.attrs["layout"] != "NCHW" or node.inputs[1] not in graph.params:
            continue
        x, w, y = node.inputs[0].type, graph.params[node.inputs[1]], node.outputs[0].type
        nd = x.rank - 2
        strides, dilations, pads = _spatial_attrs(node.attrs, nd)
        pads = list(pads)
        spans = [_live_taps(x.shape[2 + a], y.shape[2 + a], w.shape[2 + a], strides[a], dilations[a], pads[a]) for a in range(nd)]
        if all(lo == 0 and hi == w.shape[2 + a] - 1 for a, (lo, hi) in enumerate(spans)):
            continue
        for a, (lo, hi) in enumerate(spans):
            pads[a] -= lo * dilations[a]
            # the end pad: just what the last window of the trimmed kernel needs
            pads[nd + a] = max(0, (y.shape[2 + a] - 1) * strides[a] + (hi - lo) * dilations[a] + 1 - x.shape[2 + a] - pads[a])
        trimmed = w[(slice(None), slice(None), *(slice(lo, hi + 1) for lo, hi in spans))]
        attrs = {**node.attrs, "pads": pads}
        if get_op("Conv").infer(attrs, [x, node.inputs[1].type.with_shape(trimmed.shape), *(v.type for v in node.inputs[2:])])[0] != y:
            continue
        node.inputs = [node.inputs[0], graph.add_param(graph.fresh_name(f"{node.inputs[1].name}.trimmed"), np.ascontiguousarray(trimmed)), *node.inputs[2:]]
        node.attrs = attrs
    return eliminate_dead_code(graph)


CANONICALIZE = [
    "fold_constants",
    "fold_fills",
    "gather_one_as_slice",
    "expand_small_powers",
    "trim_border_taps",
    "remove_noops",
    "fold_reshape_chains",
    "fold_transpose_chains",
    "remove_noops",
    "eliminate_common_subexpressions",
    "eliminate_dead_code",
]
