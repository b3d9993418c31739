"""merge_gemm_sums: sums of Gemm products (gradients through time) become one Gemm."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.ir import parse_graph
from kiln.ir.evaluate import evaluate
from kiln.passes import get_pass

SUM = """
graph g(%a0: f32[4,6], %a1: f32[3,6], %a2: f32[5,6], %b0: f32[4,2], %b1: f32[3,2], %b2: f32[5,2], %c: f32[6,2]) {
  %p0: f32[6,2] = Gemm(%a0, %b0) {transA=1}
  %p1: f32[6,2] = Gemm(%a1, %b1) {transA=1}
  %s0: f32[6,2] = Add(%p0, %p1)
  %s1: f32[6,2] = Add(%s0, %c)
  %p2: f32[6,2] = Gemm(%a2, %b2) {transA=1}
  %s2: f32[6,2] = Add(%p2, %s1)
  return %s2
}"""


def _feeds(graph):
    rng = np.random.default_rng(0)
    return [rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs]


def test_a_sum_of_products_is_one_gemm_over_the_joined_rows():
    graph = parse_graph(SUM)
    feeds = _feeds(graph)
    want = evaluate(graph, feeds)
    merged = get_pass("merge_gemm_sums")(graph.copy())
    assert merged.op_histogram() == {"Concat": 2, "Gemm": 1, "Add": 1}  # the other leaf, %c, is added once
    gemm = next(n for n in merged.nodes if n.op.name == "Gemm")
    assert gemm.inputs[0].type.shape == (12, 6) and gemm.attrs["transA"] == 1
    assert merged.outputs[0].name == "s2"
    np.testing.assert_allclose(evaluate(merged, feeds)[0], want[0], rtol=1e-5, atol=1e-5)
    got = kiln.compile(graph, target="llvm").run({v.name: x for v, x in zip(graph.inputs, feeds)})["s2"]
    np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change",
    [
        ("%s0: f32[6,2] = Add(%p0, %p1)", "%s0: f32[6,2] = Add(%p0, %p1)\n  %keep: f32[6,2] = Relu(%p0)"),  # a product read twice
        ("%p1: f32[6,2] = Gemm(%a1, %b1) {transA=1}", "%p1: f32[6,2] = Gemm(%a1, %b1) {transA=1, alpha=2.0}"),  # scaled
    ],
)
def test_products_read_elsewhere_or_scaled_stay(change):
    graph = parse_graph(SUM.replace(*change).replace("return %s2", "return %s2, %keep" if "keep" in change[1] else "return %s2"))
    merged = get_pass("merge_gemm_sums")(graph.copy())
    gemms = [n for n in merged.nodes if n.op.name == "Gemm"]
    assert len(gemms) == 2  # two of the three merged; the odd one left alone
    feeds = _feeds(graph)
    np.testing.assert_allclose(evaluate(merged, feeds)[0], evaluate(graph, feeds)[0], rtol=1e-5, atol=1e-5)
