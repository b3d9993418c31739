"""fuse: group ops into Fused nodes that backends compile as one kernel each (TVM FuseOps style).

Rules, over the node order:
- a heavy op (Conv, ConvTranspose, Gemm, MatMul) starts an ``epilogue`` group: the elementwise
  ops after it (bias, activation, residual Add, clip...) join it;
- a reduction joins the group of its elementwise producers (``reduction``), and elementwise ops
  after it join too;
- a training-mode BatchNormalization starts a ``normalize`` group: the activation and other
  elementwise ops after it join (its running statistics leave the group as extra outputs);
- elementwise ops join the group of an input's producer, else start an ``elementwise`` group;
- an elementwise op made after a heavy op's group starts, from values made before it, whose
  one reader joins that group, joins with its reader (``_pulled``: a quantized conv's
  correction, the outer product of per-position sums and per-channel shifts, in the tail);
- never two heavy ops or two reductions in a group; every other op stays alone.

An op joins a group only through a value nobody else reads (so nothing is computed twice and no
intermediate leaves the group), except that elementwise groups may fan out (a value read outside
leaves as an extra output: an optimizer's update is one group), and only if its other inputs are
defined before the group starts (so the group stays convex: no path leaves it and comes back).
Groups of one node stay plain.
Parameters a group reads become inputs of its Fused node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kiln.ir.graph import Graph, Node, Value
from kiln.ir.opdef import OpKind, get_op
from kiln.passes.base import graph_pass

EPILOGUE_ANCHORS = frozenset({"Conv", "ConvInteger", "ConvTranspose", "Gemm", "MatMul", "MatMulInteger"})


@dataclass
class Group:
    nodes: list[Node] = field(default_factory=list)
    start: int = 0  # index of the first node in the schedule
    anchor: Node | None = None

    @property
    def kind(self) -> str:
        if self.anchor is None:
            return "elementwise"
        if is_training_batchnorm(self.anchor):
            return "normalize"
        return "epilogue" if self.anchor.op.kind is OpKind.HEAVY else "reduction"


def is_training_batchnorm(node: Node) -> bool:
    return node.op.name == "BatchNormalization" and bool(node.attrs["training_mode"])


def _can_join(node: Node, group: Group, via: Value, index: dict[int, int], users: dict, outputs: set[int], group_of: dict) -> list[Node] | None:
    """Whether ``node`` may join ``group`` through its input ``via``: None where it may not,
    else the nodes that join with it (``_pulled``)."""
    fans_out = len(users.get(via, [])) != 1 or id(via) in outputs
    closing: list[Node] = []
    # an elementwise group may fan out (a value read outside leaves it as an extra output);
    # a heavy op's, only into a branch that closes again inside it (x * sigmoid(x))
    if fans_out and not (group.anchor is None and node.op.kind is OpKind.ELEMENTWISE and _one_shape(group, node)):
        closing = _closing_branch(node, group, via, index, users, outputs)
        if not closing:
            return None
    # values leaving the group are defined where its Fused node goes, at its new end: every
    # outside reader must come after that (whatever joins later, reduction or not)
    members = {id(n) for n in group.nodes}
    for member in group.nodes:
        for v in member.outputs:
            if any(id(u) not in members and u is not node and index[id(u)] < index[id(node)] for u in users.get(v, [])):
                return None
    if group.anchor is not None and is_training_batchnorm(group.anchor):
        # the statistics leave the group where its last node stands: no reader may come earlier
        stats = group.anchor.outputs[1:]
        if any(index[id(user)] < index[id(node)] for v in stats for user in users.get(v, [])):
            return None
    kind = node.op.kind
    if kind is OpKind.REDUCTION and group.anchor is not None:
        return None
    pulled = []
    for v in node.inputs:
        if v is None or v is via or v.producer is None or any(v.producer is n for n in group.nodes):
            continue
        if index[id(v.producer)] >= group.start:  # defined after the group starts: fusing could make a cycle
            if not _pulled(v, node, group, index, users, outputs, group_of):
                return None
            pulled.append(v.producer)
    return pulled + closing


MAX_BRANCH = 16  # nodes of a closing branch (GELU's is 4, SiLU's 1)


def _closing_branch(node: Node, group: Group, via: Value, index: dict[int, int], users: dict, outputs: set[int]) -> list[Node]:
    """The later nodes that join a heavy op's group with ``node`` where ``node`` reads the
    group's value ``via`` beside one other reader, the closer, and everything ``node`` starts
    flows only into the closer: SiLU's ``Mul(x, Sigmoid(x))``, GELU's ``x * (1 + erf(x /
    sqrt 2)) / 2``. The branch and the closer are elementwise, of ``via``'s shape, on values
    of the group or made before it starts; they join together, and the group keeps one end.
    Empty where ``via`` does not fan out so."""
    if group.anchor is None or group.anchor.op.kind is not OpKind.HEAVY or id(via) in outputs:
        return []
    members = {id(n) for n in group.nodes}
    others = list({id(u): u for u in users.get(via, []) if u is not node and id(u) not in members}.values())
    if len(others) != 1:
        return []
    closer, shape = others[0], via.type.shape
    branch, seen, todo = [], {id(node)}, [node]
    while todo:
        n = todo.pop()
        if not _pointwise_like(n, shape) or id(n.outputs[0]) in outputs or not users.get(n.outputs[0]):
            return []
        for u in users[n.outputs[0]]:
            if u is not closer and id(u) not in seen:
                if len(seen) == MAX_BRANCH:
                    return []
                seen.add(id(u))
                branch.append(u)
                todo.append(u)
    if not _pointwise_like(closer, shape):
        return []
    inside = members | seen | {id(closer)}
    for n in [*branch, closer]:
        for v in n.inputs:
            if v is not None and v.producer is not None and id(v.producer) not in inside and index[id(v.producer)] >= group.start:
                return []  # made after the group starts, outside it: joining could make a cycle
    return sorted([*branch, closer], key=lambda n: index[id(n)])


def _pointwise_like(node: Node, shape) -> bool:
    return node.op.kind is OpKind.ELEMENTWISE and node.op.deterministic and len(node.outputs) == 1 and node.outputs[0].type.shape == shape


def _pulled(v: Value, node: Node, group: Group, index: dict[int, int], users: dict, outputs: set[int], group_of: dict) -> bool:
    """Whether the producer of ``v``, made after ``group`` starts, joins a heavy op's group
    with ``node``, its one reader: an elementwise op alone in its group, of ``node``'s shape,
    on values all made before the group starts (a quantized conv's weight-shift correction,
    the outer product of each window's sum and a shift per channel, computed in the tail)."""
    p = v.producer
    if group.anchor is None or group.anchor.op.kind is not OpKind.HEAVY or p.op.kind is not OpKind.ELEMENTWISE or not p.op.deterministic:
        return False
    alone = group_of.get(id(p))
    if alone is None or alone.nodes != [p] or len(users.get(v, [])) != 1 or id(v) in outputs or v.type.shape != node.outputs[0].type.shape:
        return False
    return all(w is None or w.producer is None or index[id(w.producer)] < group.start for w in p.inputs)


def find_groups(graph: Graph) -> list[Group]:
    """The fusion groups of ``graph`` (including single-node ones), in schedule order."""
    index = {id(n): i for i, n in enumerate(graph.nodes)}
    users = graph.users()
    outputs = {id(v) for v in graph.outputs}
    group_of: dict[int, Group] = {}
    groups: list[Group] = []
    claimed: dict[int, Group] = {}
    for i, node in enumerate(graph.nodes):
        if claimed.pop(id(node), None) is not None:
            continue
        kind = node.op.kind
        joined = None
        if kind in (OpKind.ELEMENTWISE, OpKind.REDUCTION) and node.op.deterministic:
            for v in node.inputs:
                if v is None or v.producer is None or id(v.producer) not in group_of:
                    continue
                group = group_of[id(v.producer)]
                if group.anchor is not None and group.anchor.op.kind is OpKind.HEAVY and kind is OpKind.REDUCTION:
                    continue
                pulled = _can_join(node, group, v, index, users, outputs, group_of)
                if pulled is not None:
                    joined = group
                    for p in pulled:  # out of their own (one-node) groups, into this one, in order
                        if id(p) in group_of:
                            groups.remove(group_of[id(p)])
                        else:  # a closing branch's later nodes: placed when the loop reaches them
                            claimed[id(p)] = group
                        group_of[id(p)] = group
                    group.nodes = sorted([*group.nodes, *pulled], key=lambda n: index[id(n)])
                    break
        if joined is None:
            joined = Group(start=i)
            groups.append(joined)
            fusable = kind in (OpKind.ELEMENTWISE, OpKind.REDUCTION) or node.op.name in EPILOGUE_ANCHORS
            if not fusable or not node.op.deterministic:
                joined.anchor = node  # a lone op: nothing will join (see below)
        anchor = kind is OpKind.REDUCTION or node.op.name in EPILOGUE_ANCHORS or is_training_batchnorm(node)
        if anchor:
            joined.anchor = node
        joined.nodes.append(node)
        if claimed:  # a closing branch's later nodes are in already
            joined.nodes.sort(key=lambda n: index[id(n)])
        if (kind in (OpKind.ELEMENTWISE, OpKind.REDUCTION) and node.op.deterministic) or anchor:
            group_of[id(node)] = joined
        if kind is OpKind.ELEMENTWISE and node.op.deterministic and joined.anchor is None:
            _merge_siblings(node, joined, group_of, groups, index, users)
    return groups


def _one_shape(group: Group, node: Node) -> bool:
    """Whether every value of ``group`` has ``node``'s output shape (one loop nest computes all)."""
    shape = node.outputs[0].type.shape
    return all(v.type.shape == shape for n in group.nodes for v in n.outputs)


def _merge_siblings(node: Node, joined: Group, group_of: dict, groups: list, index: dict, users: dict) -> None:
    """Fold into ``joined`` the other elementwise groups ``node`` reads (``a * x + b * y``
    starts two groups, joined at the Add), when every value they make that is read outside is
    read after ``node``: the merged group then sits at ``node``'s place, convex and in order."""
    for v in node.inputs:
        other = group_of.get(id(v.producer)) if v is not None and v.producer is not None else None
        if other is None or other is joined or other.anchor is not None or other not in groups or not _one_shape(other, node):
            continue
        members = {id(n) for n in [*joined.nodes, *other.nodes]}
        late = all(
            id(u) in members or index[id(u)] > index[id(node)]
            for member in [*joined.nodes, *other.nodes]
            for out in member.outputs
            for u in users.get(out, [])
        )
        if not late:
            continue
        joined.nodes = sorted([*joined.nodes, *other.nodes], key=lambda n: index[id(n)])
        joined.start = min(joined.start, other.start)
        for member in other.nodes:
            group_of[id(member)] = joined
        groups.remove(other)


def _outline(graph: Graph, group: Group, number: int) -> Node:
    """Replace ``group``'s nodes by one Fused node whose body holds them."""
    members = {id(n) for n in group.nodes}
    body = Graph(f"fused_{number}")
    inner: dict[int, Value] = {}
    outer_inputs: list[Value] = []
    for node in group.nodes:
        for v in node.inputs:
            if v is None or id(v) in inner:
                continue
            if v.producer is None or id(v.producer) not in members:
                inner[id(v)] = body.add_input(f"in{len(outer_inputs)}", v.type)
                outer_inputs.append(v)
    for node in group.nodes:
        twin = body.add_node(node.op, [inner[id(v)] if v is not None else None for v in node.inputs], node.attrs, name=node.name, num_outputs=len(node.outputs))
        for old, new in zip(node.outputs, twin.outputs):
            inner[id(old)] = new
    last = group.nodes[-1]
    # the last node's outputs, then any other member's outputs read outside (BN statistics)
    read_outside = {id(v) for n in graph.nodes if id(n) not in members for v in n.inputs if v is not None}
    read_outside |= {id(v) for v in graph.outputs}
    escaping = list(last.outputs) + [v for n in group.nodes[:-1] for v in n.outputs if id(v) in read_outside]
    body.outputs = [inner[id(v)] for v in escaping]
    position = graph.nodes.index(last)
    names = [v.name for v in escaping]
    graph.remove_nodes(group.nodes)
    fused = graph.add_node(
        get_op("Fused"),
        outer_inputs,
        {"kind": group.kind, "body": body},
        name=group.anchor.name if group.anchor is not None else last.name,
        num_outputs=len(escaping),
        output_names=names,
        index=position - len(group.nodes) + 1,
    )
    for old, new in zip(escaping, fused.outputs):
        graph.replace_uses(old, new)
    return fused


@graph_pass("fuse")
def fuse(graph: Graph) -> Graph:
    """Form fusion groups (see the module docstring) and outline each group of two or more
    nodes into a Fused node. Outputs, names and values are unchanged."""
    groups = [g for g in find_groups(graph) if len(g.nodes) > 1]
    for number, group in enumerate(groups):
        _outline(graph, group, number)
    return graph
