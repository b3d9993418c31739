"""Every gradient rule against float64 central differences (eps 1e-6, atol 1e-5, rtol 1e-3):
each case is one op (or a small graph) whose outputs are dotted with fixed random cotangents
into a scalar loss; the autodiff graph's gradients must match the numerical ones."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kiln.errors import KilnError
from kiln.ir import parse_graph
from kiln.ir.dtypes import DType
from kiln.ir.evaluate import evaluate
from kiln.ir.graph import Graph
from kiln.ir.types import TensorType
from kiln.passes.autodiff import add_gradients

EPS, ATOL, RTOL = 1e-6, 1e-5, 1e-3

# name -> (graph text, fixed inputs {name: array} that are not differentiated)
CASES = {
    "add_broadcast": ("%y: f64[2,3] = Add(%a, %b)", {}, "%a: f64[2,3], %b: f64[3]"),
    "sub_broadcast": ("%y: f64[2,3,4] = Sub(%a, %b)", {}, "%a: f64[2,1,4], %b: f64[3,4]"),
    "mul_broadcast": ("%y: f64[2,3,4] = Mul(%a, %b)", {}, "%a: f64[2,1,4], %b: f64[3,1]"),
    "div": ("%y: f64[2,3] = Div(%a, %b)", {}, "%a: f64[2,3], %b: f64[2,3]"),
    "neg_reciprocal": ("%n: f64[4] = Neg(%a)\n%y: f64[4] = Reciprocal(%n)", {}, "%a: f64[4]"),
    "relu": ("%y: f64[3,4] = Relu(%a)", {}, "%a: f64[3,4]"),
    "leaky_relu": ("%y: f64[3,4] = LeakyRelu(%a) {alpha=0.1}", {}, "%a: f64[3,4]"),
    "sigmoid_tanh": ("%s: f64[3,4] = Sigmoid(%a)\n%y: f64[3,4] = Tanh(%s)", {}, "%a: f64[3,4]"),
    "exp_log_sqrt": ("%e: f64[5] = Exp(%a)\n%l: f64[5] = Log(%e)\n%q: f64[5] = Sqrt(%e)\n%y: f64[5] = Add(%l, %q)", {}, "%a: f64[5]"),
    "abs_softplus": ("%b: f64[5] = Abs(%a)\n%y: f64[5] = Softplus(%b)", {}, "%a: f64[5]"),
    "pow": ("%e: f64[4] = Exp(%a)\n%y: f64[4] = Pow(%e, %b)", {}, "%a: f64[4], %b: f64[4]"),
    "max_min": ("%m: f64[3,4] = Max(%a, %b)\n%y: f64[3,4] = Min(%m, %b2)", {}, "%a: f64[3,4], %b: f64[4], %b2: f64[3,4]"),
    "clip": ("%y: f64[6] = Clip(%a, %lo, %hi)", {"lo": np.array(-0.3), "hi": np.array(0.4)}, "%a: f64[6], %lo: f64[], %hi: f64[]"),
    "where": ("%y: f64[2,3] = Where(%c, %a, %b)", {"c": np.array([[True, False, True], [False, True, False]])}, "%c: bool[2,3], %a: f64[2,3], %b: f64[3]"),
    "matmul": ("%y: f64[3,5] = MatMul(%a, %b)", {}, "%a: f64[3,4], %b: f64[4,5]"),
    "matmul_batched": ("%y: f64[2,3,5] = MatMul(%a, %b)", {}, "%a: f64[2,3,4], %b: f64[4,5]"),
    "gemm": ("%y: f64[3,5] = Gemm(%a, %b, %c) {alpha=0.5, beta=2.0, transA=0, transB=0}", {}, "%a: f64[3,4], %b: f64[4,5], %c: f64[5]"),
    "gemm_transposed": ("%y: f64[3,5] = Gemm(%a, %b, %c) {alpha=1.5, beta=1.0, transA=1, transB=1}", {}, "%a: f64[4,3], %b: f64[5,4], %c: f64[3,5]"),
    "reshape_transpose": ("%r: f64[3,8] = Reshape(%a) {shape=[3, 8]}\n%y: f64[8,3] = Transpose(%r) {perm=[1, 0]}", {}, "%a: f64[2,3,4]"),
    "concat_split": (
        "%c: f64[2,7] = Concat(%a, %b) {axis=1}\n%s1: f64[2,2], %s2: f64[2,5] = Split(%c) {axis=1, split=[2, 5]}\n%y: f64[2,5] = Mul(%s2, %s2)",
        {}, "%a: f64[2,3], %b: f64[2,4]",
    ),  # fmt: skip
    "slice_pad": ("%s: f64[2,2] = Slice(%a) {starts=[1, 1], ends=[3, 3], axes=null, steps=null}\n%y: f64[4,5] = Pad(%s) {pads=[1, 2, 1, 1], mode=\"constant\"}", {}, "%a: f64[4,4]"),
    "expand": ("%y: f64[2,3,4] = Expand(%a) {shape=[2, 3, 4]}", {}, "%a: f64[3,1]"),
    "gather_rows": ("%y: f64[2,2,3] = Gather(%a, %i) {axis=0}", {"i": np.array([[0, 2], [-1, 0]])}, "%a: f64[4,3], %i: i64[2,2]"),
    "gather_axis1": ("%y: f64[4,3] = Gather(%a, %i) {axis=1}", {"i": np.array([1, 1, 0])}, "%a: f64[4,2], %i: i64[3]"),
    "reduce_sum_mean": ("%s: f64[2,1,4] = ReduceSum(%a) {axes=[1], keepdims=1}\n%y: f64[4] = ReduceMean(%s) {axes=[0, 1], keepdims=0}", {}, "%a: f64[2,3,4]"),
    "reduce_max_square": ("%m: f64[3] = ReduceMax(%a) {axes=[1], keepdims=0}\n%q: f64[] = ReduceSumSquare(%a) {axes=null, keepdims=0}\n%y: f64[3] = Add(%m, %q)", {}, "%a: f64[3,4]"),
    "softmax": ("%y: f64[3,5] = Softmax(%a) {axis=1}", {}, "%a: f64[3,5]"),
    "log_softmax": ("%y: f64[3,5] = LogSoftmax(%a) {axis=-1}", {}, "%a: f64[3,5]"),
    "global_average_pool": ("%y: f64[2,3,1,1] = GlobalAveragePool(%a)", {}, "%a: f64[2,3,4,5]"),
    "conv": ("%y: f64[2,4,5,5] = Conv(%x, %w, %b) {dilations=null, group=1, pads=[1, 1, 1, 1], strides=null}", {}, "%x: f64[2,3,5,5], %w: f64[4,3,3,3], %b: f64[4]"),
    "conv_stride_dilation": ("%y: f64[1,2,3,2] = Conv(%x, %w) {dilations=[2, 1], group=1, pads=[1, 0, 1, 1], strides=[2, 3]}", {}, "%x: f64[1,3,7,6], %w: f64[2,3,3,2]"),
    "conv_grouped": ("%y: f64[1,4,4,4] = Conv(%x, %w) {dilations=null, group=2, pads=null, strides=null}", {}, "%x: f64[1,4,5,5], %w: f64[4,2,2,2]"),
    "conv_depthwise": ("%y: f64[2,3,3,3] = Conv(%x, %w) {dilations=null, group=3, pads=[1, 1, 1, 1], strides=[2, 2]}", {}, "%x: f64[2,3,5,5], %w: f64[3,1,3,3]"),
    "conv1d": ("%y: f64[2,2,4] = Conv(%x, %w) {dilations=null, group=1, pads=[1, 0], strides=[2]}", {}, "%x: f64[2,3,8], %w: f64[2,3,2]"),
    # weights larger than both maps: the weight gradient correlates the flipped maps the other way round
    "conv_wide_weight": ("%y: f64[2,8,2,2] = Conv(%x, %w) {dilations=null, group=1, pads=[1, 1, 1, 1], strides=null}", {}, "%x: f64[2,8,2,2], %w: f64[8,8,3,3]"),
    "conv_wide_weight_dilated": ("%y: f64[1,6,3,5] = Conv(%x, %w) {dilations=[2, 1], group=1, pads=[2, 0, 1, 1], strides=null}", {}, "%x: f64[1,6,4,5], %w: f64[6,6,3,2]"),
    "conv_transpose_wide_weight": ("%y: f64[1,8,2,2] = ConvTranspose(%x, %w) {dilations=null, group=1, pads=[1, 1, 1, 1], strides=null}", {}, "%x: f64[1,8,2,2], %w: f64[8,8,3,3]"),
    "conv_transpose": ("%y: f64[1,2,8,8] = ConvTranspose(%x, %w, %b) {dilations=null, group=1, output_padding=[1, 1], pads=[1, 1, 1, 1], strides=[2, 2]}", {}, "%x: f64[1,3,4,4], %w: f64[3,2,3,3], %b: f64[2]"),
    "max_pool": ("%y: f64[2,2,3,3] = MaxPool(%x) {ceil_mode=0, dilations=null, kernel_shape=[3, 3], pads=[1, 1, 1, 1], strides=[2, 2]}", {}, "%x: f64[2,2,6,6]"),
    "max_pool_ceil_dilated": ("%y: f64[1,2,3,2] = MaxPool(%x) {ceil_mode=1, dilations=[1, 2], kernel_shape=[2, 2], pads=null, strides=[2, 2]}", {}, "%x: f64[1,2,6,5]"),
    "max_pool_ties": ("%r: f64[1,1,4,4] = Relu(%x)\n%y: f64[1,1,2,2] = MaxPool(%r) {ceil_mode=0, dilations=null, kernel_shape=[2, 2], pads=null, strides=[2, 2]}", {}, "%x: f64[1,1,4,4]"),
    "average_pool": ("%y: f64[1,2,3,3] = AveragePool(%x) {ceil_mode=0, count_include_pad=1, dilations=null, kernel_shape=[2, 2], pads=[1, 1, 1, 1], strides=[2, 2]}", {}, "%x: f64[1,2,5,5]"),
    "batch_norm_inference": ("%y: f64[2,3,2,2] = BatchNormalization(%x, %s, %b, %m, %v) {epsilon=1e-05, momentum=0.9, training_mode=0}", {"m": np.array([0.1, -0.2, 0.3]), "v": np.array([0.5, 1.5, 1.0])}, "%x: f64[2,3,2,2], %s: f64[3], %b: f64[3], %m: f64[3], %v: f64[3]"),
    "batch_norm_training": ("%y: f64[4,3,2,2], %rm: f64[3], %rv: f64[3] = BatchNormalization(%x, %s, %b, %m, %v) {epsilon=1e-05, momentum=0.9, training_mode=1}", {"m": np.zeros(3), "v": np.ones(3)}, "%x: f64[4,3,2,2], %s: f64[3], %b: f64[3], %m: f64[3], %v: f64[3]"),
    "resize_linear": ("%y: f64[1,2,5,7] = Resize(%x) {mode=\"linear\", scales=[1.0, 1.0, 1.6667, 1.75], sizes=[1, 2, 5, 7]}", {}, "%x: f64[1,2,3,4]"),
    "resize_nearest_align": ("%y: f64[1,1,6,6] = Resize(%x) {mode=\"nearest\", scales=[1.0, 1.0, 2.0, 2.0], sizes=[1, 1, 6, 6]}", {}, "%x: f64[1,1,3,3]"),
    "resize_cubic": ("%y: f64[1,1,4,4] = Resize(%x) {coordinate_transformation_mode=\"align_corners\", mode=\"cubic\", scales=[1.0, 1.0, 0.8, 0.8], sizes=[1, 1, 4, 4]}", {}, "%x: f64[1,1,5,5]"),
    "group_norm": ("%y: f64[2,4,2,3] = GroupNormalization(%x, %s, %b) {epsilon=1e-05, num_groups=2}", {}, "%x: f64[2,4,2,3], %s: f64[4], %b: f64[4]"),
    "instance_norm": ("%y: f64[2,3,4] = InstanceNormalization(%x, %s, %b) {epsilon=1e-05}", {}, "%x: f64[2,3,4], %s: f64[3], %b: f64[3]"),
    "layer_norm": ("%y: f64[2,3,4] = LayerNormalization(%x, %s, %b) {axis=-2, epsilon=1e-05}", {}, "%x: f64[2,3,4], %s: f64[3,4], %b: f64[4]"),
    "softmax_cross_entropy": ("%y: f64[] = SoftmaxCrossEntropyLoss(%x, %t) {ignore_index=null, reduction=\"mean\"}", {"t": np.array([1, 0, 3, 3])}, "%x: f64[4,5], %t: i64[4]"),
    "softmax_cross_entropy_weighted": (
        "%y: f64[] = SoftmaxCrossEntropyLoss(%x, %t, %w) {ignore_index=2, reduction=\"mean\"}",
        {"t": np.array([[1, 2], [0, 1]]), "w": np.array([0.5, 2.0, 1.0])}, "%x: f64[2,3,2], %t: i64[2,2], %w: f64[3]",
    ),  # fmt: skip
    "erf": ("%y: f64[6] = Erf(%a)", {}, "%a: f64[6]"),
    "gelu": ("%y: f64[6] = Gelu(%a)", {}, "%a: f64[6]"),
    "gelu_tanh": ("%y: f64[6] = Gelu(%a) {approximate=\"tanh\"}", {}, "%a: f64[6]"),
    "slice_strided": ("%y: f64[3,2] = Slice(%a) {starts=[0, 3], ends=[5, 0], axes=null, steps=[2, -2]}", {}, "%a: f64[5,4]"),
    "slice_strided_and_unit": ("%y: f64[2,2,3] = Slice(%a) {starts=[1, 0, 1], ends=[3, 4, 4], axes=null, steps=[1, 3, 1]}", {}, "%a: f64[3,4,5]"),
    "pad_reflect": ("%y: f64[6,7] = Pad(%a) {pads=[1, 2, 2, 1], mode=\"reflect\"}", {}, "%a: f64[3,4]"),
    "pad_edge": ("%y: f64[2,4,8] = Pad(%a) {pads=[0, 1, 3, 0, 0, 2], mode=\"edge\"}", {}, "%a: f64[2,3,3]"),
    "pad_wrap": ("%y: f64[5,6] = Pad(%a) {pads=[1, 2, 1, 0], mode=\"wrap\"}", {}, "%a: f64[3,4]"),
    "dropout_training": ("%y: f64[4,5] = Dropout(%a) {ratio=0.4, seed=3, training_mode=1}", {}, "%a: f64[4,5]"),
    "attention_causal_gqa": ("%y: f64[1,4,3,2] = Attention(%q, %k, %v) {is_causal=1}", {}, "%q: f64[1,4,3,2], %k: f64[1,2,5,2], %v: f64[1,2,5,2]"),
    "lp_pool": ("%y: f64[1,2,2,2] = LpPool(%x) {kernel_shape=[2, 2], strides=[2, 2], p=2}", {}, "%x: f64[1,2,4,5]"),
    "reduce_log_sum_exp": ("%y: f64[3] = ReduceLogSumExp(%a) {axes=[1], keepdims=0}", {}, "%a: f64[3,4]"),
    "top_k": ("%v: f64[3,2], %i: i64[3,2] = TopK(%a) {k=2, axis=1, largest=1, sorted=1}", {}, "%a: f64[3,5]"),
    "cumsum": ("%y: f64[3,4] = CumSum(%a) {axis=1, exclusive=0, reverse=0}", {}, "%a: f64[3,4]"),
    "cumsum_exclusive_reverse": ("%y: f64[3,4] = CumSum(%a) {axis=0, exclusive=1, reverse=1}", {}, "%a: f64[3,4]"),
    "gather_elements": ("%y: f64[3,2] = GatherElements(%a, %i) {axis=1}", {"i": np.array([[0, 2], [1, 1], [-1, 0]])}, "%a: f64[3,4], %i: i64[3,2]"),
    "scatter_elements": ("%y: f64[3,4] = ScatterElements(%a, %i, %u) {axis=1, reduction=\"none\"}", {"i": np.array([[0, 2], [3, 1], [-1, 0]])}, "%a: f64[3,4], %i: i64[3,2], %u: f64[3,2]"),
    "scatter_elements_add": ("%y: f64[3,4] = ScatterElements(%a, %i, %u) {axis=0, reduction=\"add\"}", {"i": np.array([[0, 2, 2, 1], [0, 0, 1, 1]])}, "%a: f64[3,4], %i: i64[2,4], %u: f64[2,4]"),
    "gather_nd": ("%y: f64[2,3] = GatherND(%a, %i) {batch_dims=0}", {"i": np.array([[0, 1], [3, 0]])}, "%a: f64[4,2,3], %i: i64[2,2]"),
    "scatter_nd": ("%y: f64[4,3] = ScatterND(%a, %i, %u) {reduction=\"none\"}", {"i": np.array([[1], [3]])}, "%a: f64[4,3], %i: i64[2,1], %u: f64[2,3]"),
    "reverse_sequence": ("%y: f64[4,3,2] = ReverseSequence(%a, %l) {batch_axis=1, time_axis=0}", {"l": np.array([4, 1, 2])}, "%a: f64[4,3,2], %l: i64[3]"),
    "einsum_batch_matmul": ("%y: f64[2,3,5] = Einsum(%a, %b) {equation=\"bij,bjk->bik\"}", {}, "%a: f64[2,3,4], %b: f64[2,4,5]"),
    "einsum_ellipsis": ("%y: f64[2,3] = Einsum(%a, %b) {equation=\"...ij,j->...i\"}", {}, "%a: f64[2,3,4], %b: f64[4]"),
    "einsum_broadcast_label": ("%y: f64[3,2] = Einsum(%a, %b) {equation=\"ij,ik->jk\"}", {}, "%a: f64[1,3], %b: f64[4,2]"),
    "einsum_single_operand": ("%y: f64[4] = Einsum(%a) {equation=\"ij->j\"}", {}, "%a: f64[3,4]"),
    "nll_sum": ("%l: f64[3,4] = LogSoftmax(%x) {axis=1}\n%y: f64[] = NegativeLogLikelihoodLoss(%l, %t) {ignore_index=null, reduction=\"sum\"}", {"t": np.array([3, 0, 2])}, "%x: f64[3,4], %t: i64[3]"),
}


def _graph(case: str) -> Graph:
    body, _, signature = CASES[case]
    outputs = [name for line in body.splitlines() for name in re.findall(r"(%\w+):", line.split("=")[0])]
    text = f"graph g({signature}) {{\n{body}\n return {', '.join(outputs)}\n}}"
    return parse_graph(text)


def _with_loss(graph: Graph, cotangents: list[np.ndarray]):
    """``graph`` with one scalar output: the sum of each output times its cotangent."""
    total = None
    for value, cot in zip(graph.outputs, cotangents):
        if not value.type.dtype.is_float:  # TopK's indices: nothing to differentiate
            continue
        c = graph.add_param(graph.fresh_name("cot"), cot)
        dotted = graph.add_node("Mul", [value, c]).outputs[0]
        term = graph.add_node("ReduceSum", [dotted], {"axes": None, "keepdims": 0}).outputs[0]
        total = term if total is None else graph.add_node("Add", [total, term]).outputs[0]
    graph.outputs = [total]
    return total


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_matches_central_differences(case):
    _, fixed, _ = CASES[case]
    graph = _graph(case)
    rng = np.random.default_rng(sorted(CASES).index(case))
    feeds = {v.name: np.asarray(fixed[v.name], dtype=v.type.dtype.numpy) if v.name in fixed else rng.standard_normal(v.type.shape) for v in graph.inputs}
    check_against_differences(graph, feeds, set(fixed), rng, case)


def check_against_differences(graph: Graph, feeds: dict, fixed: set, rng, label: str) -> None:
    """The gradients add_gradients builds for ``graph``'s inputs (but ``fixed``) of its outputs
    dotted with random cotangents, against central differences of the untouched graph."""
    cotangents = [rng.standard_normal(v.type.shape) for v in graph.outputs]
    loss = _with_loss(graph, cotangents)
    reference = graph.copy()  # add_gradients may decompose forward nodes: differences use the op itself
    wrt = [v for v in graph.inputs if v.name not in fixed]
    grads = add_gradients(graph, loss, wrt)
    graph.outputs = [loss, *grads]
    order = [v.name for v in graph.inputs]
    results = evaluate(graph, [feeds[n] for n in order])

    def f(name, array):
        args = [array if n == name else feeds[n] for n in order]
        return float(evaluate(reference, args)[0])

    for value, got in zip(wrt, results[1:]):
        x = feeds[value.name]
        numeric = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            up, down = x.copy(), x.copy()
            up[index] += EPS
            down[index] -= EPS
            numeric[index] = (f(value.name, up) - f(value.name, down)) / (2 * EPS)
        np.testing.assert_allclose(got, numeric, atol=ATOL, rtol=RTOL, err_msg=f"{label}: d loss / d {value.name}")


DERIVED_DOMAINS = {"Acosh": (1.2, 3.0), "Asin": (-0.9, 0.9), "Acos": (-0.9, 0.9), "Atanh": (-0.9, 0.9), "Tan": (-1.2, 1.2)}


def _derived_float_ops() -> list[str]:
    from kiln.ir.opdef import all_ops
    from kiln.passes.autodiff import _load_rules
    from kiln.passes.autodiff.rules_derived import derived_vjp

    _load_rules()
    floats = []
    for name, op in sorted(all_ops().items()):
        if op.vjp is derived_vjp:
            try:
                node = Graph().add_node(name, [Graph().add_input("x", TensorType((3, 4), DType.float64))] * (2 if name in TWO_INPUTS else 1))
            except KilnError:
                continue  # integer or boolean only: nothing to differentiate
            if node.outputs[0].type.dtype.is_float:
                floats.append(name)
    return floats


TWO_INPUTS = {"PRelu", "Mean", "Mod"}


@pytest.mark.parametrize("op", _derived_float_ops())
def test_derived_gradients_match_central_differences(op):
    """Elementwise ops without a hand-written rule differentiate their compute rule (forward
    mode over graph nodes): checked like the hand-written ones, away from kinks and jumps."""
    rng = np.random.default_rng(len(op))
    low, high = DERIVED_DOMAINS.get(op, (-2.0, 2.0))
    graph = Graph()
    inputs = [graph.add_input("x", TensorType((3, 4), DType.float64))]
    feeds = {"x": rng.uniform(low, high, (3, 4))}
    if op in TWO_INPUTS:  # PRelu's slope per column; Mean's second operand; Mod's divisor (fixed)
        inputs.append(graph.add_input("y", TensorType((4,), DType.float64)))
        feeds["y"] = rng.uniform(0.5, 2.0, 4)
    graph.outputs = list(graph.add_node(op, inputs).outputs)
    check_against_differences(graph, feeds, {"y"} if op == "Mod" else set(), rng, op)


@pytest.mark.parametrize("case", sorted(CASES))
def test_gradient_graph_on_llvm_matches_eager(case):
    """The same gradient graphs (checked above against central differences) compiled by llvm
    at -O2, in float64: equal to the eager evaluation to rounding."""
    import kiln

    _, fixed, _ = CASES[case]
    graph = _graph(case)
    rng = np.random.default_rng(5)
    feeds = {v.name: np.asarray(fixed[v.name], dtype=v.type.dtype.numpy) if v.name in fixed else rng.standard_normal(v.type.shape) for v in graph.inputs}
    loss = _with_loss(graph, [rng.standard_normal(v.type.shape) for v in graph.outputs])
    graph.outputs = [loss, *add_gradients(graph, loss, [v for v in graph.inputs if v.name not in fixed])]
    want = kiln.compile(graph).run(feeds)
    got = kiln.compile(graph, target="llvm").run(feeds)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-9, atol=1e-12, err_msg=f"{case}: {key}")


@pytest.mark.parametrize("case, flipped", [("conv_wide_weight", True), ("conv_wide_weight_dilated", True), ("conv_transpose_wide_weight", True), ("conv", False), ("conv_stride_dilation", False)])
def test_weight_gradients_larger_than_the_maps_are_not_transposed(case, flipped):
    """Where the weight outweighs both maps, its gradient comes out of the conv in (M, C, *K)
    order (the maps flipped instead); else the conv's (C, M, *K) result is transposed."""
    graph = _graph(case)
    loss = _with_loss(graph, [np.ones(v.type.shape) for v in graph.outputs])
    (gw,) = add_gradients(graph, loss, [graph.inputs[1]])
    assert (gw.producer.op.name == "Conv") is flipped
    assert gw.type.shape == graph.inputs[1].type.shape


def test_gradients_are_pruned_to_what_the_loss_needs():
    graph = parse_graph(
        """graph g(%a: f64[3], %b: f64[3]) {
          %u: f64[3] = Exp(%a)
          %v: f64[3] = Sin(%b)
          %l: f64[] = ReduceSum(%u) {axes=null, keepdims=0}
          return %l, %v
        }"""
    )
    before = len(graph.nodes)
    (ga,) = add_gradients(graph, graph.outputs[0], [graph.inputs[0]])
    added = graph.nodes[before:]
    assert {n.op.name for n in added} <= {"ConstantOfShape", "Reshape", "Expand", "Mul"}  # no Sin gradient
    assert ga.type == TensorType((3,), graph.inputs[0].type.dtype)


def test_ops_without_a_rule_are_named():
    graph = parse_graph(
        """graph g(%a: f64[3]) {
          %u: f64[3] = Hardmax(%a) {axis=-1}
          %l: f64[] = ReduceSum(%u) {axes=null, keepdims=0}
          return %l
        }"""
    )
    with pytest.raises(KilnError, match="node 'Hardmax' .*no gradient rule yet"):
        add_gradients(graph, graph.outputs[0], graph.inputs)
