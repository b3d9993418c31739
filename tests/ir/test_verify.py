"""verify() catches every broken invariant a pass could leave behind."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import ElementCapError, GraphError, TypeInferenceError
from kiln import config
from kiln.ir import DType, Graph, TensorType, Value, verify


def small_graph() -> Graph:
    g = Graph()
    x = g.add_input("x", TensorType((2, 3), DType.float32))
    a = g.add_node("Relu", [x], name="relu").outputs[0]
    b = g.add_node("Exp", [a], name="exp").outputs[0]
    g.outputs.append(b)
    return g


def test_a_well_formed_graph_passes():
    verify(small_graph())


def test_out_of_order_nodes_are_a_cycle_or_bad_order():
    g = small_graph()
    g.nodes.reverse()
    with pytest.raises(GraphError, match="node 'exp'.*not defined before this node"):
        verify(g)


def test_a_value_defined_twice():
    g = small_graph()
    g.nodes.append(g.nodes[0])
    with pytest.raises(GraphError, match="defined twice"):
        verify(g)


def test_a_stale_type_after_an_edit():
    g = small_graph()
    g.nodes[0].outputs[0].type = TensorType((3, 2), DType.float32)
    with pytest.raises(GraphError, match="relu.*infers f32\\[2,3\\]"):
        verify(g)


def test_an_undefined_output_and_no_outputs():
    g = small_graph()
    g.outputs = [Value("ghost", TensorType((1,), DType.float32))]
    with pytest.raises(GraphError, match="graph output %ghost is not defined"):
        verify(g)
    g.outputs = []
    with pytest.raises(GraphError, match="no outputs"):
        verify(g)


def test_missing_attribute_and_wrong_arity_name_the_node():
    g = Graph()
    x = g.add_input("x", TensorType((2, 3), DType.float32))
    with pytest.raises(TypeInferenceError, match="node 'tp'.*needs attribute 'perm'"):
        g.add_node("Transpose", [x], name="tp")
    with pytest.raises(TypeInferenceError, match="node 'add'.*takes 2 inputs, got 1"):
        g.add_node("Add", [x], name="add")
    with pytest.raises(TypeInferenceError, match="node 'mm'.*inner dimensions differ"):
        g.add_node("MatMul", [x, x], name="mm")


def test_the_element_cap_stops_huge_tensors_before_allocation():
    g = Graph()
    x = g.add_input("x", TensorType((1,), DType.float32))
    with config.override(max_elements=1000):
        with pytest.raises(ElementCapError, match="node 'big'.*over the cap of 1000"):
            g.add_node("Expand", [x], {"shape": [10, 10, 11]}, name="big")
    # 2**31 elements by default: a 1e12-element Expand is refused, nothing is allocated
    with pytest.raises(ElementCapError, match="KILN_MAX_ELEMENTS"):
        g.add_node("Expand", [x], {"shape": [10**6, 10**6]}, name="huge")


def test_parameters_must_match_their_types():
    g = small_graph()
    p = g.add_param("p", np.zeros((2, 2), np.float32))
    g.params[p] = np.zeros((3,), np.float32)
    with pytest.raises(GraphError, match="parameter %p"):
        verify(g)
