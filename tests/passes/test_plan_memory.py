"""plan_memory: in-place chains, reuse of freed space, the overlap checker, and the plan of
every ONNX conformance model and light net checked for overlaps."""

from __future__ import annotations

import warnings

import pytest

import kiln
from kiln.errors import GraphError, KilnError
from kiln.ir import parse_graph
from kiln.passes.plan_memory import check_plan, plan_memory

CHAIN = """
graph g(%x: f32[256]) {
  %a: f32[256] = Exp(%x)
  %b: f32[256] = Relu(%a)
  %c: f32[256] = Neg(%b)
  %d: f32[256] = Add(%c, %x)
  return %d
}"""


def test_an_elementwise_chain_runs_in_one_buffer():
    graph = parse_graph(CHAIN)
    plan = plan_memory(graph)
    check_plan(graph, plan)
    assert len(plan.buffers) == 1 and [v.name for v in plan.buffers[0].values] == ["a", "b", "c", "d"]
    assert plan.summary() == {"naive_bytes": 4 * 1024, "planned_bytes": 1024, "lower_bound_bytes": 1024}
    assert plan_memory(graph, in_place=False).arena_bytes == 2 * 1024


def test_freed_space_is_reused_and_live_values_never_share():
    graph = parse_graph(
        """
        graph g(%x: f32[64,64]) {
          %a: f32[64,64] = MatMul(%x, %x)
          %b: f32[64,64] = MatMul(%a, %x)
          %c: f32[64,64] = MatMul(%b, %x)
          %d: f32[64,64] = MatMul(%c, %a)
          return %d
        }"""
    )
    plan = plan_memory(graph)
    check_plan(graph, plan)
    size = 64 * 64 * 4
    # a lives to the end: a, b, c need three slots at the third MatMul; d reuses b's
    assert plan.arena_bytes == plan.lower_bound_bytes == 3 * size
    assert plan.offset(graph.nodes[3].outputs[0]) == plan.offset(graph.nodes[1].outputs[0])


def test_the_checker_catches_overlapping_live_buffers():
    graph = parse_graph(CHAIN)
    plan = plan_memory(graph, in_place=False)
    plan.buffers[1].offset = plan.buffers[0].offset
    with pytest.raises(GraphError, match="overlap while both are live"):
        check_plan(graph, plan)


def test_light_resnet50_plan_is_tight(light_model):
    graph = kiln.optimize(light_model("light_resnet50"), "O2")
    plan = plan_memory(graph)
    check_plan(graph, plan)
    assert plan.arena_bytes <= 1.15 * plan.lower_bound_bytes
    assert plan.arena_bytes <= 0.5 * plan.naive_bytes


def _conformance_graphs():
    from onnx.backend.test.loader import load_model_tests

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for c in load_model_tests(kind="node") if c.model is not None]
    for case in cases:
        try:
            yield case.name, kiln.driver.to_graph(case.model)
        except KilnError:
            continue  # unsupported or needs input values: the conformance suite covers those


def test_every_conformance_model_gets_a_plan_without_overlaps():
    checked = 0
    for name, graph in _conformance_graphs():
        for g in (graph, kiln.optimize(graph, "O2")):
            plan = plan_memory(g)
            check_plan(g, plan)
            assert plan.lower_bound_bytes <= plan.arena_bytes or not plan.buffers, name
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("name", ["light_squeezenet", "light_densenet121", "light_inception_v1", "light_shufflenet"])
def test_light_nets_get_plans_without_overlaps(name, light_model):
    graph = kiln.optimize(light_model(name), "O2")
    plan = plan_memory(graph)
    check_plan(graph, plan)
    assert plan.lower_bound_bytes <= plan.arena_bytes < plan.naive_bytes


VIEWS = """
graph g(%x: f32[4,6]) {
  %a: f32[4,6] = Exp(%x)
  %r: f32[1,24] = Reshape(%a) {shape=[1, 24]}
  %s1: f32[1,10], %s2: f32[1,14] = Split(%r) {axis=1, split=[10, 14]}
  %t: f32[2,2,6] = Reshape(%a) {shape=[2, 2, 6]}
  %u: f32[2,2,6] = Neg(%t)
  %b: f32[1,10] = Relu(%s1)
  %c: f32[1,14] = Sigmoid(%s2)
  %d: f32[4,6] = Exp(%a)
  return %b, %c, %u, %d
}"""


def test_reshapes_and_contiguous_splits_are_views_of_their_input():
    """A Reshape and a Split whose leading dims are 1 take no bytes of their own: they sit in
    their input's buffer at their offset, which lives until the last of them is read; the
    llvm program calls no kernel for them, and computes what eager does."""
    import numpy as np

    from kiln.backends.llvm.codegen import generate

    graph = parse_graph(VIEWS)
    plan = plan_memory(graph)
    check_plan(graph, plan)
    by_name = {v.name: v for n in graph.nodes for v in n.outputs}
    assert {name for name in by_name if plan.is_view(by_name[name])} == {"r", "s1", "s2", "t"}
    base = plan.offset(by_name["a"])
    assert [plan.offset(by_name[n]) - base for n in ("r", "s1", "s2", "t")] == [0, 0, 40, 0]
    host = next(b for b in plan.buffers if by_name["a"] in b.values)
    assert host.end >= 6  # read by Sigmoid (node 6) through s2, though %a's own last reader is earlier
    # the views' reads keep the buffer: Neg and Relu may not write over it in place
    assert not any(by_name[n] in host.values for n in ("u", "b", "c"))
    ir_text = str(generate(graph)[0])
    assert "_Split" not in ir_text and "_Reshape" not in ir_text
    x = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    want = kiln.compile(graph).run({"x": x})
    got = kiln.compile(graph, target="llvm").run({"x": x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)


def test_a_split_of_strided_parts_is_a_view_only_for_readers_of_any_strides():
    """Split along an inner axis: its parts are not contiguous, so by default they are copied;
    where the backend says every reader takes any strides (llvm's pointwise kernels), each
    part is a view at its offset with the input's strides, and llvm runs no Split kernel."""
    import numpy as np

    from kiln.backends.llvm.codegen import generate
    from kiln.backends.llvm.kernels_elementwise import is_pointwise

    text = """
        graph g(%x: f32[4,6]) {
          %a: f32[4,6] = Exp(%x)
          %s1: f32[4,2], %s2: f32[4,4] = Split(%a) {axis=1, split=[2, 4]}
          %b: f32[4,2] = Relu(%s1)
          %c: f32[4,4] = Relu(%s2)
          return %b, %c
        }"""
    graph = parse_graph(text)
    assert not plan_memory(graph).views
    plan = plan_memory(graph, strided_readers=is_pointwise)
    check_plan(graph, plan)
    by_name = {v.name: v for n in graph.nodes for v in n.outputs}
    assert [plan.offset(by_name[n]) - plan.offset(by_name["a"]) for n in ("s1", "s2")] == [0, 8]
    assert plan.strides[id(by_name["s1"])] == plan.strides[id(by_name["s2"])] == (6, 1)
    assert "_Split" not in str(generate(graph)[0])
    x = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    want = kiln.compile(graph).run({"x": x})
    got = kiln.compile(graph, target="llvm", pipeline="O0").run({"x": x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
    # a reader that needs dense rows (a MatMul) keeps the copy
    dense = parse_graph(text.replace("%c: f32[4,4] = Relu(%s2)", "%c: f32[4,4] = MatMul(%s2, %s2)"))
    assert not plan_memory(dense, strided_readers=is_pointwise).views


SLICES = """
graph g(%x: f32[3,5,1,8]) {
  %a: f32[3,5,1,8] = Exp(%x)
  %q: f32[1,5,1,8] = Slice(%a) {starts=[1], ends=[2], axes=[0], steps=null}
  %k: f32[1,2,1,8] = Slice(%a) {starts=[2, 1], ends=[3, 3], axes=[0, 1], steps=null}
  %v: f32[3,5,1,4] = Slice(%a) {starts=[4], ends=[8], axes=[3], steps=null}
  %e: f32[1,3,1,8] = Slice(%a) {starts=[0, 0], ends=[1, 5], axes=[0, 1], steps=[1, 2]}
  %y: f32[1,5,1,8] = Neg(%q)
  %z: f32[1,2,1,8] = Relu(%k)
  %u: f32[3,5,1,4] = Sigmoid(%v)
  %w: f32[1,3,1,8] = Abs(%e)
  return %y, %z, %u, %w
}"""


def test_a_slice_that_keeps_one_contiguous_run_is_a_view():
    """A Slice whose part is one run of its input's bytes (size-1 dims before the axis that
    keeps several elements, whole dims after it) sits in the input's buffer at its offset;
    a part of every row, or one with a step, is copied."""
    import numpy as np

    from kiln.backends.llvm.codegen import generate

    graph = parse_graph(SLICES)
    plan = plan_memory(graph)
    check_plan(graph, plan)
    by_name = {v.name: v for n in graph.nodes for v in n.outputs}
    assert {name for name in ("q", "k", "v", "e") if plan.is_view(by_name[name])} == {"q", "k"}
    base = plan.offset(by_name["a"])
    assert [plan.offset(by_name[n]) - base for n in ("q", "k")] == [40 * 4, (80 + 8) * 4]
    assert len([f for f in generate(graph)[0].functions if f.name.endswith("_Slice")]) == 2  # %v's and %e's
    x = np.random.default_rng(0).standard_normal((3, 5, 1, 8)).astype(np.float32)
    want, got = kiln.compile(graph).run({"x": x}), kiln.compile(graph, target="llvm").run({"x": x})
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
