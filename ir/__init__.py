"""kiln's graph IR: typed values, nodes, graphs, the op registry, the text form, the verifier."""

from kiln.ir.dtypes import DType
from kiln.ir.graph import Graph, Node, Value, graphs_equal
from kiln.ir.opdef import REQUIRED, OpDef, OpKind, all_ops, get_op, register
from kiln.ir.text import parse_graph, print_graph
from kiln.ir.types import TensorType
from kiln.ir.verify import verify

__all__ = [
    "DType",
    "Graph",
    "Node",
    "OpDef",
    "OpKind",
    "REQUIRED",
    "TensorType",
    "Value",
    "all_ops",
    "get_op",
    "graphs_equal",
    "parse_graph",
    "print_graph",
    "register",
    "verify",
]
