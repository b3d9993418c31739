"""Layout passes: convert convolutions and pools to channels-last (NHWC) and sink the
transposes that creates until they cancel.

``to_nhwc`` rewrites each Conv (grouped ones when depthwise or float32/64), ConvTranspose
(group 1), MaxPool (without Indices) and
AveragePool of rank >= 3 as ``Transpose(op_nhwc(Transpose(x)))``; constant weights are
transposed now, at compile time (Conv to (*kernel, C, M), ConvTranspose to (C, *kernel, M)). ``sink_transposes`` then moves every Transpose below the ops that do not care
about layout (elementwise ops, with constant operands transposed at compile time; Concat;
Resize; Pad; Slice; Softmax and keepdims reductions; global pools become spatial reductions),
and turns transposes that only move size-1 axes into reshapes; a transpose left below an
upsampling Resize or ConvTranspose (none after it to cancel it) goes back above it, onto
the smaller map. The canonicalize passes that
follow fold Transpose(Transpose) chains into the identity and remove them, so a converted
model keeps transposes only at its boundary and where an op must see NCHW (a BatchNormalization
left in a training graph, a grouped ConvTranspose, a float16 grouped Conv, a Reshape of a
spatial map).

Preconditions: none. Postconditions: outputs unchanged (names and values).
"""

from __future__ import annotations

import numpy as np

from kiln.ir.dtypes import DType
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.opdef import OpKind
from kiln.ir.ops.nn import inverse_perm, is_depthwise, to_channels_first, to_channels_last, transposed_weight_to_first, transposed_weight_to_last, weight_to_spatial_first
from kiln.passes.base import graph_pass
from kiln.passes.canonicalize import compose_transposes
from kiln.passes.rewrite import substitute

LAYOUTS = ("nchw", "nhwc", "auto")
LAYOUT_PASSES = {"nchw": [], "nhwc": ["to_nhwc", "sink_transposes"], "auto": ["to_nhwc_if_wide", "sink_transposes"]}
WIDE_CHANNELS = 16  # output channels from which a channels-last GEMM row fills two AVX2 vectors
WIDE_SHARE = 0.9


def _insert(graph: Graph, at: Node, op: str, inputs, attrs, name: str) -> Value:
    """Add ``op`` right before ``at`` (so it is defined before ``at``'s readers)."""
    return graph.add_node(op, inputs, attrs, name=name, index=graph.nodes.index(at)).outputs[0]


def _transposed_param(graph: Graph, value: Value, perm: list[int], hint: str) -> Value:
    array = np.ascontiguousarray(np.transpose(graph.params[value], perm))
    return graph.add_param(graph.fresh_name(hint), array)


def _convertible(node: Node) -> bool:
    op = node.op.name
    if op not in ("Conv", "ConvTranspose", "MaxPool", "AveragePool") or node.attrs["layout"] != "NCHW":
        return False
    x = node.inputs[0]
    if x.type.rank < 3 or len(node.outputs) != 1:
        return False
    if op not in ("Conv", "ConvTranspose") or node.attrs["group"] == 1:
        return True
    # grouped: a 2-D depthwise conv (a channel per group), and a float32/64 Conv: the llvm
    # backend has channels-last kernels for them
    return is_depthwise(node) or (op == "Conv" and x.type.dtype in (DType.float32, DType.float64))


@graph_pass("to_nhwc")
def to_nhwc(graph: Graph) -> Graph:
    """Conv (grouped ones when 2-D depthwise or float32/64), ConvTranspose (group 1), MaxPool
    and AveragePool to channels-last, between transposes."""
    for node in [n for n in graph.nodes if _convertible(n)]:
        x = node.inputs[0]
        rank = x.type.rank
        where = node.name or node.op.name
        inputs = [_insert(graph, node, "Transpose", [x], {"perm": to_channels_last(rank)}, f"{where}/to_nhwc")]
        if node.op.name in ("Conv", "ConvTranspose"):
            w = node.inputs[1]
            perm = weight_to_spatial_first(rank) if node.op.name == "Conv" else transposed_weight_to_last(rank)
            if w in graph.params:
                inputs.append(_transposed_param(graph, w, perm, f"{w.name}.nhwc"))
            elif _filled(w):  # a constant fill: the same fill in the new shape
                shape = [w.type.shape[p] for p in perm]
                inputs.append(_insert(graph, node, "ConstantOfShape", [], {**w.producer.attrs, "shape": shape}, f"{where}/weight_nhwc"))
            else:
                inputs.append(_insert(graph, node, "Transpose", [w], {"perm": perm}, f"{where}/weight_to_nhwc"))
            inputs += node.inputs[2:]
        twin = graph.add_node(node.op, inputs, {**node.attrs, "layout": "NHWC"}, name=node.name, num_outputs=1, index=graph.nodes.index(node))
        back = _insert(graph, node, "Transpose", [twin.outputs[0]], {"perm": to_channels_first(rank)}, f"{where}/to_nchw")
        if substitute(graph, node.outputs[0], back):
            graph.remove_nodes([node])
    graph.remove_unread_params()
    return graph


def _filled(value: Value) -> bool:
    return value.producer is not None and value.producer.op.name == "ConstantOfShape"


def mostly_wide(graph: Graph) -> bool:
    """Whether convolutions ``to_nhwc`` converts with >= WIDE_CHANNELS output channels, and those
    already channels-last, do >= 90% of the conv work.

    Channels-last puts the output channels on the GEMM's vectorized side: ResNet-18 runs 1.7x
    faster in NHWC on llvm, LeNet-5 (6 and 16 channels) 4x slower, so ``auto`` converts only
    graphs whose convolution work is in wide layers. Work in convs that stay channels-first
    (ShuffleNet's grouped 1x1s) counts against: each would sit between transposes
    (light_shufflenet: 3.9 ms converted, 2.6 not)."""
    from kiln.ir.cost import node_macs

    total = wide = 0
    for node in graph.nodes:
        if node.op.name in ("Conv", "ConvTranspose", "ConvInteger"):
            macs = node_macs(node)
            total += macs
            if node.attrs["layout"] == "NHWC":  # already channels-last (integer_products makes them so)
                wide += macs
            elif _convertible(node) and node.outputs[0].type.shape[1] >= WIDE_CHANNELS:
                wide += macs
    return total > 0 and wide >= WIDE_SHARE * total


@graph_pass("to_nhwc_if_wide")
def to_nhwc_if_wide(graph: Graph) -> Graph:
    """``to_nhwc`` when the convolution work is mostly in wide layers (``mostly_wide``), else nothing."""
    return to_nhwc.run(graph) if mostly_wide(graph) else graph


def _transpose_of(value: Value | None) -> list[int] | None:
    if value is None or value.producer is None or value.producer.op.name != "Transpose":
        return None
    return list(value.producer.attrs["perm"])


def _moves_only_unit_axes(node: Node) -> bool:
    """A Transpose that keeps the order of the non-1 axes only relabels: it is a Reshape."""
    shape = node.inputs[0].type.shape
    kept = [p for p in node.attrs["perm"] if shape[p] != 1]
    return kept == sorted(kept)


def _reshape_groups(shape, out) -> list[tuple[list[int], list[int]]] | None:
    """The axes of ``shape`` and of ``out`` (a reshape of it) in matching groups: consecutive
    axes of each with the same number of elements, each group as small as it can be.
    ``shape``'s size-1 axes are in none; ``out``'s join the group before them (the first, when
    before every group). None where no axis is larger than 1."""
    xs = [i for i, n in enumerate(shape) if n != 1]
    rs = [j for j, n in enumerate(out) if n != 1]
    if not xs or not rs:
        return None
    groups, i, j = [], 0, 0
    while i < len(xs):
        gx, gr = [xs[i]], [rs[j]]
        px, pr = shape[xs[i]], out[rs[j]]
        i, j = i + 1, j + 1
        while px != pr:
            if px < pr:
                gx.append(xs[i])
                px, i = px * shape[xs[i]], i + 1
            else:
                gr.append(rs[j])
                pr, j = pr * out[rs[j]], j + 1
        groups.append((gx, gr))
    for j, n in enumerate(out):  # out's 1s: into the group before them
        if n == 1:
            k = max((k for k, (_, gr) in enumerate(groups) if gr[0] < j), default=0)
            groups[k][1].append(j)
            groups[k][1].sort()
    return groups


def _resize_axes(attrs: dict, order: list[int]) -> dict:
    """A Resize's attributes for its input's axes taken in ``order`` (axis j is old axis order[j])."""
    rank = len(order)
    attrs = dict(attrs, sizes=[attrs["sizes"][a] for a in order], scales=[attrs["scales"][a] for a in order])
    if attrs["roi"] is not None:
        roi = attrs["roi"]
        attrs["roi"] = [roi[a] for a in order] + [roi[rank + a] for a in order]
    return attrs


def _hoist_above_upsampling(graph: Graph) -> None:
    """A transpose that sinking left below an upsampling op (a Resize, or a channels-last
    ConvTranspose with constant weights, which goes back to channels-first), and that no
    transpose after it cancels, goes back above it: it then moves the small map, not the large
    one (DeepLab's last upsampling, to the graph output: 14x14 -> 224x224 by 21 channels, 1.2 ms
    of transpose; FCN-8s's last ConvTranspose, 28x28 -> 224x224, 1.1 ms)."""
    users = graph.users()
    for node in list(graph.nodes):
        grower = node.inputs[0].producer if node.op.name == "Transpose" else None
        if grower is None or len(users.get(grower.outputs[0], [])) != 1 or grower.outputs[0] in graph.outputs:
            continue
        if grower.outputs[0].type.numel <= grower.inputs[0].type.numel or any(r.op.name == "Transpose" for r in users.get(node.outputs[0], [])):
            continue
        perm = list(node.attrs["perm"])
        where = grower.name or grower.op.name
        if grower.op.name == "Resize":
            attrs, rest = _resize_axes(grower.attrs, perm), []
        elif grower.op.name == "ConvTranspose" and grower.attrs["layout"] == "NHWC" and grower.inputs[1] in graph.params and perm == to_channels_first(len(perm)):
            weight = _transposed_param(graph, grower.inputs[1], transposed_weight_to_first(len(perm)), f"{grower.inputs[1].name}.nchw")
            attrs, rest = {**grower.attrs, "layout": "NCHW"}, [weight, *grower.inputs[2:]]
        else:
            continue
        moved = _insert(graph, grower, "Transpose", [grower.inputs[0]], {"perm": perm}, f"{where}/hoisted")
        grown = graph.add_node(grower.op, [moved, *rest], attrs, name=grower.name, num_outputs=1, index=graph.nodes.index(node))
        if substitute(graph, node.outputs[0], grown.outputs[0]):
            graph.remove_nodes([node, grower])
    graph.remove_unread_params()


class _Sinker:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.inserted: set[int] = set()  # ids of the inverse transposes added to match operands

    def operand(self, value: Value | None, perm: list[int], rank: int, node: Node, insert: bool) -> Value | None | bool:
        """``value`` expressed before the transpose ``perm``: the transpose's input, a constant
        transposed now, or (with ``insert``) the inverse transpose added; False otherwise."""
        if value is None:
            return None
        if _transpose_of(value) == perm:
            return value.producer.inputs[0]
        if value.type.numel == 1 and value.type.rank <= rank:
            return value  # one element broadcasts the same in any layout (a run-time scale too)
        if insert and value not in self.graph.params and value.type.rank == rank:
            where = f"{node.name or node.op.name}/to_match"
            matched = _insert(self.graph, node, "Transpose", [value], {"perm": inverse_perm(perm)}, where)
            self.inserted.add(id(matched.producer))  # never sunk itself: that would undo this
            return matched
        if value in self.graph.params:
            array = self.graph.params[value]
            full = array.reshape((1,) * (rank - array.ndim) + array.shape)
            new = np.ascontiguousarray(np.transpose(full, inverse_perm(perm)))
            return self.graph.add_param(self.graph.fresh_name(f"{value.name}.t"), new)
        return False

    def _read_only_by(self, value: Value, node: Node) -> bool:
        return value not in self.graph.outputs and all(n is node for n in self.graph.nodes if any(v is value for v in n.inputs))

    def replace(self, node: Node, op, inputs, attrs, perm: list[int]) -> None:
        """``node`` becomes ``Transpose(op(inputs, attrs), perm)`` (its first output: any others,
        as DynamicQuantizeLinear's scale and zero point, are the new node's as they are)."""
        g = self.graph
        where = node.name or node.op.name
        inner = g.add_node(op, inputs, attrs, name=node.name, num_outputs=len(node.outputs), index=g.nodes.index(node))
        back = _insert(g, node, "Transpose", [inner.outputs[0]], {"perm": perm}, f"{where}/sunk")
        if all([substitute(g, old, new) for old, new in zip(node.outputs, [back, *inner.outputs[1:]])]):
            g.remove_nodes([node])

    def sink(self, node: Node) -> bool:
        op = node.op.name
        if op == "DynamicQuantizeLinear":
            return self.sink_dynamic_quantize(node)
        if len(node.outputs) != 1:
            return False
        sources = [v for v in node.inputs if v is not None and v.producer is not None and id(v.producer) not in self.inserted]
        perm = next((p for p in map(_transpose_of, sources) if p is not None), None)
        if perm is None:
            return False
        rank = len(perm)
        attrs = dict(node.attrs)
        if node.op.kind is OpKind.ELEMENTWISE and node.op.deterministic:
            if node.outputs[0].type.rank != rank:
                return False
        elif op == "Concat":
            attrs["axis"] = perm[attrs["axis"] % rank]
        elif op in ("Softmax", "LogSoftmax"):
            attrs["axis"] = perm[attrs["axis"] % rank]
        elif op == "Resize":
            attrs = _resize_axes(attrs, inverse_perm(perm))
        elif op == "Pad":
            inv = inverse_perm(perm)
            pads = attrs["pads"]
            attrs["pads"] = [pads[inv[j]] for j in range(rank)] + [pads[rank + inv[j]] for j in range(rank)]
        elif op == "Slice":
            axes = attrs["axes"] if attrs["axes"] is not None else list(range(len(attrs["starts"])))
            attrs["axes"] = [perm[a % rank] for a in axes]
        elif node.op.kind is OpKind.REDUCTION and "axes" in attrs and attrs.get("keepdims") == 1:
            if attrs["axes"] is not None:
                attrs["axes"] = sorted(perm[a % rank] for a in attrs["axes"])
        elif op == "BatchNormalization" and perm == to_channels_first(rank):
            return self.batchnorm_as_affine(node, perm)
        elif op == "Reshape":
            return (perm == to_channels_first(rank) and self.flatten_into_weights(node)) or self.through_reshape(node, perm)
        elif op == "Transpose":  # one transpose of the first one's input, which may sink on
            compose_transposes(node)  # (an identity becomes a Reshape below, then goes)
            return True
        elif op in ("GlobalAveragePool", "GlobalMaxPool") and perm == to_channels_first(rank):
            reduce = "ReduceMean" if op == "GlobalAveragePool" else "ReduceMax"
            self.replace(node, reduce, [node.inputs[0].producer.inputs[0]], {"axes": list(range(1, rank - 1)), "keepdims": 1}, perm)
            return True
        else:
            return False
        # a lone untransposed operand gets the inverse transpose when that removes at least as
        # many transposes as it adds (a skip connection meeting a ConvTranspose output): the
        # transposes it reads must then go, read by nothing else (a transformer's residual
        # stream, read by its LayerNorm too, would keep its transpose and gain two at every Add)
        variable = [v for v in node.inputs if v is not None and v not in self.graph.params]
        moved = [v for v in variable if _transpose_of(v) == perm]
        insert = len(moved) >= len(variable) - len(moved) and all(self._read_only_by(v, node) for v in moved)
        if any(self.operand(v, perm, rank, node, insert=False) is False for v in node.inputs) and not insert:
            return False
        inputs = [self.operand(v, perm, rank, node, insert) for v in node.inputs]
        if any(v is False for v in inputs):
            return False
        self.replace(node, node.op, inputs, attrs, perm)
        return True


    def through_reshape(self, node: Node, perm: list[int]) -> bool:
        """``Reshape(Transpose(x, perm))`` as ``Transpose(Reshape(x'))`` where the reshape's
        groups of axes (each group of the transposed input's axes merged or split into a group
        of the output's, ``_reshape_groups``) lie contiguous in x: ViT's channels-last patch
        embedding flattens (14, 14) with its channels last, and ShuffleNet's channel shuffle
        splits the channels, transposes the two parts and merges them again. A group whose axes
        lie in x in another order (the shuffle's merge) is put in order first, by a transpose
        within the group (x' = that transpose of x), when what sinks on is then not nothing."""
        g = self.graph
        x = node.inputs[0].producer.inputs[0]
        source, shape, out = x.type.shape, node.inputs[0].type.shape, node.outputs[0].type.shape
        groups = _reshape_groups(shape, out)
        if groups is None:
            return False
        nonunit = [a for a in range(len(source)) if source[a] != 1]
        places = {a: k for k, a in enumerate(nonunit)}
        axes = [[perm[i] for i in xs if shape[i] != 1] for xs, _ in groups]  # each group's axes of x
        spans = [sorted(places[a] for a in group) for group in axes]
        if any(span != list(range(span[0], span[0] + len(span))) for span in spans if span):
            return False  # a group's axes are not together in x
        # groups in x's order (a group of 1s stays after the group before it)
        key, last = [], -1.0
        for span in spans:
            last = span[0] if span else last + 0.5
            key.append(last)
        order = sorted(range(len(groups)), key=lambda k: key[k])
        inner = [a for k in order for a in axes[k]]  # x's axes, each group's in the reshape's order
        shape_x = [out[j] for k in order for j in groups[k][1]]
        first, at = {}, 0  # where each group's axes start in the reshaped x
        for k in order:
            first[k], at = at, at + len(groups[k][1])
        outer = [first[k] + n for k, (_, rs) in enumerate(groups) for n in range(len(rs))]
        if inner != nonunit and outer == sorted(outer):
            return False  # the transpose within groups is the whole transpose: nothing gained
        where = node.name or "Reshape"
        if inner != nonunit:
            units = [a for a in range(len(source)) if source[a] == 1]
            x = _insert(g, node, "Transpose", [x], {"perm": units + inner}, f"{where}/within")
            self.inserted.add(id(x.producer))
        self.replace(node, "Reshape", [x], {**node.attrs, "shape": shape_x}, outer)
        return True

    def sink_dynamic_quantize(self, node: Node) -> bool:
        """DynamicQuantizeLinear's range is over every element, so it quantizes the transpose's
        input as it would its output: the bytes come out transposed, the scale and zero point
        as they are."""
        perm = _transpose_of(node.inputs[0])
        if perm is None or id(node.inputs[0].producer) in self.inserted:
            return False
        self.replace(node, node.op, [node.inputs[0].producer.inputs[0]], node.attrs, perm)
        return True

    def batchnorm_as_affine(self, node: Node, perm: list[int]) -> bool:
        """Inference BatchNormalization with constant statistics on channels-last data:
        ``x * s + t`` with per-channel constants on the last axis (then the transpose)."""
        g = self.graph
        x, *stats = node.inputs
        if node.attrs["training_mode"] or len(node.outputs) != 1 or any(v not in g.params for v in stats):
            return False
        scale, shift, mean, var = (g.params[v].astype(np.float64) for v in stats)
        s = scale / np.sqrt(var + node.attrs["epsilon"])
        t = shift - mean * s
        dtype = x.type.dtype.numpy
        where = node.name or "BatchNormalization"
        s_v = g.add_param(g.fresh_name(f"{where}.scale"), s.astype(dtype))
        t_v = g.add_param(g.fresh_name(f"{where}.shift"), t.astype(dtype))
        source = x.producer.inputs[0]
        scaled = _insert(g, node, "Mul", [source, s_v], {}, f"{where}/scale")
        self.replace(node, "Add", [scaled, t_v], {}, perm)
        return True

    def flatten_into_weights(self, node: Node) -> bool:
        """``Gemm(Reshape(T(x), [N, C*H*W]), W)`` with constant W becomes ``Gemm(Reshape(x, [N,
        H*W*C]), W')``: the flatten order changes, so W's rows are permuted to match, now."""
        g = self.graph
        x = node.inputs[0].producer.inputs[0]  # (N, *spatial, C)
        n, *spatial, c = x.type.shape
        if list(node.outputs[0].type.shape) != [n, c * int(np.prod(spatial))]:
            return False
        readers = g.users().get(node.outputs[0], [])
        if not readers or node.outputs[0] in g.outputs:
            return False
        for reader in readers:
            w = reader.inputs[1] if len(reader.inputs) > 1 else None
            plain = reader.op.name == "MatMul" or (reader.op.name == "Gemm" and not reader.attrs["transA"])
            if not plain or reader.inputs[0] is not node.outputs[0] or not (w in g.params or _filled(w)):
                return False
        flat = _insert(g, node, "Reshape", [x], {"shape": [n, x.type.numel // n]}, node.name or "Reshape")
        for reader in readers:
            w = reader.inputs[1]
            if _filled(w):  # every permutation of a constant fill is itself
                reader.inputs = [flat, *reader.inputs[1:]]
                continue
            array = g.params[w]
            rows_last = reader.op.name == "Gemm" and reader.attrs["transB"]
            feature_major = array.T if rows_last else array  # (C*H*W, out)
            permuted = feature_major.reshape(c, *spatial, -1).transpose(*range(1, len(spatial) + 1), 0, len(spatial) + 1)
            permuted = permuted.reshape(feature_major.shape)
            new = g.add_param(g.fresh_name(f"{w.name}.nhwc"), np.ascontiguousarray(permuted.T if rows_last else permuted))
            reader.inputs = [flat, new, *reader.inputs[2:]]
        g.remove_nodes([node])
        return True


@graph_pass("sink_transposes")
def sink_transposes(graph: Graph) -> Graph:
    """Move transposes below layout-agnostic ops until they meet (see the module docstring),
    and make transposes of size-1 axes reshapes."""
    changed = True
    sinker = _Sinker(graph)
    while changed:
        changed = False
        for node in list(graph.nodes):
            if node not in graph.nodes:
                continue
            if node.op.name == "Transpose" and _moves_only_unit_axes(node):
                shape = list(node.outputs[0].type.shape)
                reshaped = _insert(graph, node, "Reshape", [node.inputs[0]], {"shape": shape}, node.name or "Transpose")
                if substitute(graph, node.outputs[0], reshaped):
                    graph.remove_nodes([node])
                    changed = True
            elif sinker.sink(node):
                changed = True
        _drop_unread(graph)
    _hoist_above_upsampling(graph)
    return graph


def _drop_unread(graph: Graph) -> None:
    """Remove the transposes and parameters that sinking left without readers."""
    while True:
        read = {v for n in graph.nodes for v in n.inputs} | set(graph.outputs)
        dead = [n for n in graph.nodes if n.op.name == "Transpose" and n.outputs[0] not in read]
        if not dead:
            break
        graph.remove_nodes(dead)
    graph.remove_unread_params()
