"""fuse: epilogues, elementwise chains, reductions with their producers, and what never fuses."""

from __future__ import annotations

import pytest

import kiln
from kiln.ir import parse_graph
from kiln.passes import run_passes
from kiln.passes.fuse import find_groups

CONV = '{dilations=[1, 1], group=1, pads=[1, 1, 1, 1], strides=[1, 1]}'


def test_conv_bias_relu_and_residual_add_form_one_epilogue(rewrites):
    rewrites(
        ["fuse"],
        f"""
        graph g(%x: f32[1,2,4,4], %skip: f32[1,3,4,4]) {{
          param %w: f32[3,2,3,3] = dense<sha256:{'0' * 64}>
          %c: f32[1,3,4,4] = Conv(%x, %w) {CONV}
          %s: f32[1,3,4,4] = Add(%c, %skip)
          %y: f32[1,3,4,4] = Relu(%s)
          return %y
        }}""".replace(f"dense<sha256:{'0' * 64}>", "[" + ", ".join(["0.5"] * 54) + "]"),
        f"""
        graph g(%x: f32[1,2,4,4], %skip: f32[1,3,4,4]) {{
          param %w: f32[3,2,3,3] = [{", ".join(["0.5"] * 54)}]
          %y: f32[1,3,4,4] = Fused(%x, %w, %skip) {{kind="epilogue", body=<graph>}}
              graph fused_0(%in0: f32[1,2,4,4], %in1: f32[3,2,3,3], %in2: f32[1,3,4,4]) {{
                %0: f32[1,3,4,4] = Conv(%in0, %in1) {CONV}
                %1: f32[1,3,4,4] = Add(%0, %in2)
                %2: f32[1,3,4,4] = Relu(%1)
                return %2
              }}
          return %y
        }}""",
    )


def test_softmax_like_chain_is_one_reduction_group(rewrites):
    rewrites(
        ["fuse"],
        """
        graph g(%x: f32[2,8]) {
          %e: f32[2,8] = Exp(%x)
          %s: f32[2,1] = ReduceSum(%e) {axes=[1], keepdims=1}
          %l: f32[2,1] = Log(%s)
          return %l
        }""",
        """
        graph g(%x: f32[2,8]) {
          %l: f32[2,1] = Fused(%x) {kind="reduction", body=<graph>}
              graph fused_0(%in0: f32[2,8]) {
                %0: f32[2,8] = Exp(%in0)
                %1: f32[2,1] = ReduceSum(%0) {axes=[1], keepdims=1}
                %2: f32[2,1] = Log(%1)
                return %2
              }
          return %l
        }""",
    )


def test_shared_values_heavy_pairs_and_cycles_are_not_fused():
    graph = parse_graph(
        """
        graph g(%x: f32[4,4]) {
          %a: f32[4,4] = MatMul(%x, %x)
          %b: f32[4,4] = MatMul(%a, %x)
          %c: f32[4,4] = Relu(%b)
          %d: f32[4,4] = Exp(%b)
          %e: f32[4,4] = Tanh(%x)
          %f: f32[4,4] = MatMul(%e, %x)
          %g: f32[4,4] = Add(%e, %f)
          return %c, %d, %g
        }"""
    )
    groups = [[n.op.name for n in grp.nodes] for grp in find_groups(graph)]
    # %b feeds two readers: neither Relu nor Exp joins its MatMul; MatMuls never share a group;
    # %e feeds two readers too, so Add joins the second MatMul's epilogue, not Tanh's group
    assert groups == [["MatMul"], ["MatMul"], ["Relu"], ["Exp"], ["Tanh"], ["MatMul", "Add"]]
    fused = run_passes(graph, ["fuse"])
    assert fused.op_histogram() == {"MatMul": 2, "Exp": 1, "Fused": 1, "Relu": 1, "Tanh": 1}


def test_an_op_whose_other_input_comes_after_the_group_start_stays_out():
    graph = parse_graph(
        """
        graph g(%x: f32[4,4]) {
          %a: f32[4,4] = Exp(%x)
          %m: f32[4,4] = MatMul(%x, %x)
          %b: f32[4,4] = Add(%a, %m)
          return %b
        }"""
    )
    # Add could join Exp's group through %a, but %m is defined after that group starts
    assert [[n.op.name for n in g.nodes] for g in find_groups(graph)] == [["Exp"], ["MatMul", "Add"]]


def test_light_resnet50_O2_leaves_no_relu_outside_an_epilogue(light_model):
    graph = kiln.optimize(light_model("light_resnet50"), "O2")
    hist = graph.op_histogram()
    assert "Relu" not in hist and "BatchNormalization" not in hist
    anchors = {node.attrs["body"].nodes[0].op.name for node in graph.nodes if node.op.name == "Fused"}
    assert anchors == {"Conv"}
    relus = sum(n.op.name == "Relu" for f in graph.nodes if f.op.name == "Fused" for n in f.attrs["body"].nodes)
    assert relus == 49


TRAINING_BN = """
        graph g(%x: f32[2,3,4,4]) {
          param %s: f32[3] = [1.0, 2.0, 0.5]
          param %b: f32[3] = [0.0, 0.1, -0.1]
          param %m: f32[3] = [0.0, 0.0, 0.0]
          param %v: f32[3] = [1.0, 1.0, 1.0]
          %y: f32[2,3,4,4], %rm: f32[3], %rv: f32[3] = BatchNormalization(%x, %s, %b, %m, %v) {epsilon=1e-05, momentum=0.9, training_mode=1}
          %r: f32[2,3,4,4] = Relu(%y)
          return %r, %rm, %rv
        }"""


def test_training_batchnorm_and_its_activation_are_one_normalize_group(rewrites):
    rewrites(
        ["fuse"],
        TRAINING_BN,
        """
        graph g(%x: f32[2,3,4,4]) {
          param %s: f32[3] = [1.0, 2.0, 0.5]
          param %b: f32[3] = [0.0, 0.1, -0.1]
          param %m: f32[3] = [0.0, 0.0, 0.0]
          param %v: f32[3] = [1.0, 1.0, 1.0]
          %r: f32[2,3,4,4], %rm: f32[3], %rv: f32[3] = Fused(%x, %s, %b, %m, %v) {kind="normalize", body=<graph>}
              graph fused_0(%in0: f32[2,3,4,4], %in1: f32[3], %in2: f32[3], %in3: f32[3], %in4: f32[3]) {
                %0: f32[2,3,4,4], %1: f32[3], %2: f32[3] = BatchNormalization(%in0, %in1, %in2, %in3, %in4) {epsilon=1e-05, momentum=0.9, training_mode=1}
                %3: f32[2,3,4,4] = Relu(%0)
                return %3, %1, %2
              }
          return %r, %rm, %rv
        }""",
    )


def test_normalize_group_computes_what_the_nodes_did():
    import numpy as np

    from kiln.ir.evaluate import evaluate

    graph = parse_graph(TRAINING_BN)
    x = np.random.default_rng(0).normal(size=(2, 3, 4, 4)).astype(np.float32)
    want = evaluate(graph, [x])
    fused = run_passes(graph.copy(), ["fuse"])
    assert fused.op_histogram() == {"Fused": 1}
    for got, expected in zip(evaluate(fused, [x]), want):
        np.testing.assert_array_equal(got, expected)


def test_an_elementwise_update_that_fans_out_is_one_group(rewrites):
    """Momentum SGD: ``v' = m * v + g`` is an output and feeds ``p' = p - lr * v'``; the two
    scaled operands start groups of their own that the Add merges. One Fused node, two outputs."""
    rewrites(
        ["fuse"],
        """
        graph g(%p: f32[8], %v: f32[8], %g: f32[8], %m: f32[], %lr: f32[]) {
          %a: f32[8] = Mul(%v, %m)
          %b: f32[8] = Mul(%g, %lr)
          %n: f32[8] = Add(%a, %g)
          %s: f32[8] = Mul(%n, %lr)
          %q: f32[8] = Sub(%p, %s)
          %r: f32[8] = Add(%q, %b)
          return %r, %n
        }""",
        """
        graph g(%p: f32[8], %v: f32[8], %g: f32[8], %m: f32[], %lr: f32[]) {
          %r: f32[8], %n: f32[8] = Fused(%v, %m, %g, %lr, %p) {kind="elementwise", body=<graph>}
              graph fused_0(%in0: f32[8], %in1: f32[], %in2: f32[8], %in3: f32[], %in4: f32[8]) {
                %0: f32[8] = Mul(%in0, %in1)
                %1: f32[8] = Mul(%in2, %in3)
                %2: f32[8] = Add(%0, %in2)
                %3: f32[8] = Mul(%2, %in3)
                %4: f32[8] = Sub(%in4, %3)
                %5: f32[8] = Add(%4, %1)
                return %5, %2
              }
          return %r, %n
        }""",
    )


def test_a_fanned_out_value_read_before_the_group_ends_keeps_groups_apart():
    """``n`` is read by the Exp before the chain goes on: merging would define it too late."""
    graph = parse_graph(
        """
        graph g(%x: f32[4]) {
          %n: f32[4] = Neg(%x)
          %e: f32[4,4] = Expand(%n) {shape=[4, 4]}
          %a: f32[4] = Abs(%n)
          return %a, %e
        }"""
    )
    groups = [[n.op.name for n in g.nodes] for g in find_groups(graph)]
    assert ["Neg", "Abs"] not in groups
    run_passes(graph, ["fuse"])  # and the outlined graph verifies


def test_a_branch_that_closes_again_joins_the_heavy_ops_group():
    """SiLU (x * sigmoid(x)) and GELU (x * (1 + erf(x / sqrt 2)) / 2) read the heavy op's
    output twice; the branch and the op that closes it join its group together, and more
    pointwise ops may follow."""
    graph = parse_graph(
        f"""
        graph g(%x: f32[1,2,4,4], %y: f32[4,4]) {{
          param %w: f32[3,2,3,3] = [{", ".join(["0.5"] * 54)}]
          param %r2: f32[] = 1.4142135
          param %one: f32[] = 1.0
          param %half: f32[] = 0.5
          %c: f32[1,3,4,4] = Conv(%x, %w) {CONV}
          %s: f32[1,3,4,4] = Sigmoid(%c)
          %silu: f32[1,3,4,4] = Mul(%c, %s)
          %m: f32[4,4] = MatMul(%y, %y)
          %d: f32[4,4] = Div(%m, %r2)
          %e: f32[4,4] = Erf(%d)
          %p: f32[4,4] = Add(%e, %one)
          %q: f32[4,4] = Mul(%m, %p)
          %gelu: f32[4,4] = Mul(%q, %half)
          %out: f32[4,4] = Relu(%gelu)
          return %silu, %out
        }}"""
    )
    groups = [[n.op.name for n in grp.nodes] for grp in find_groups(graph)]
    assert groups == [["Conv", "Sigmoid", "Mul"], ["MatMul", "Div", "Erf", "Add", "Mul", "Mul", "Relu"]]


@pytest.mark.parametrize(
    "tail",
    [
        "%t: f32[1,3,4,4] = Tanh(%c)\n          %z: f32[1,3,4,4] = Add(%silu, %t)",  # %c has a third reader
        "%z: f32[1,3,4,4] = Exp(%s)",  # the branch's value is read outside it
        "%z: f32[1,3,4,4] = Mul(%silu, %silu)",  # (control: this one closes)
    ],
)
def test_a_branch_that_does_not_close_keeps_the_heavy_ops_group_apart(tail):
    graph = parse_graph(
        f"""
        graph g(%x: f32[1,2,4,4]) {{
          param %w: f32[3,2,3,3] = [{", ".join(["0.5"] * 54)}]
          %c: f32[1,3,4,4] = Conv(%x, %w) {CONV}
          %s: f32[1,3,4,4] = Sigmoid(%c)
          %silu: f32[1,3,4,4] = Mul(%c, %s)
          {tail}
          return %silu, %z
        }}"""
    )
    conv = next(grp for grp in find_groups(graph) if grp.nodes[0].op.name == "Conv")
    closes = "Exp" not in tail and "Tanh" not in tail
    assert [n.op.name for n in conv.nodes] == (["Conv", "Sigmoid", "Mul"] if closes else ["Conv"])
