"""fold_batchnorm_*: inference BatchNormalization folded into Conv, ConvTranspose and Gemm."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.ir import DType, Graph, TensorType
from kiln.passes import run_passes
from kiln.passes.canonicalize import CANONICALIZE
from kiln.passes.fold_batchnorm import FOLD_BATCHNORM

FOLD = [*CANONICALIZE, *FOLD_BATCHNORM, *CANONICALIZE]


def bn_after(op: str, x_shape, w_shape, attrs=None, bias=True, training=False, extra_reader=False) -> Graph:
    rng = np.random.default_rng(1)
    g = Graph()
    x = g.add_input("x", TensorType(x_shape, DType.float32))
    w = g.add_param("w", rng.standard_normal(w_shape).astype(np.float32))
    inputs = [x, w]
    conv_out_channels = {"Conv": w_shape[0], "ConvTranspose": w_shape[1] * (attrs or {}).get("group", 1), "Gemm": None}[op]
    if op == "Gemm":
        conv_out_channels = w_shape[0] if (attrs or {}).get("transB") else w_shape[1]
    if bias:
        inputs.append(g.add_param("b", rng.standard_normal(conv_out_channels).astype(np.float32)))
    y = g.add_node(op, inputs, attrs or {}, name="producer").outputs[0]
    c = conv_out_channels
    stats = [
        g.add_param(name, arr.astype(np.float32))
        for name, arr in (
            ("scale", rng.uniform(0.5, 2, c)),
            ("shift", rng.standard_normal(c)),
            ("mean", rng.standard_normal(c)),
            ("var", rng.uniform(0.5, 2, c)),
        )
    ]
    bn = g.add_node("BatchNormalization", [y, *stats], {"epsilon": 1e-3, "training_mode": int(training)}, name="bn", num_outputs=1)
    g.outputs.append(g.add_node("Relu", bn.outputs).outputs[0])
    if extra_reader:
        g.outputs.append(g.add_node("Exp", [y]).outputs[0])
    return g


CASES = {
    "conv": ("Conv", (2, 4, 6, 6), (8, 4, 3, 3), {"pads": [1, 1, 1, 1]}, True),
    "conv_no_bias_groups": ("Conv", (2, 4, 6, 6), (8, 2, 3, 3), {"group": 2}, False),
    "conv_transpose_groups": ("ConvTranspose", (1, 4, 5, 5), (4, 3, 3, 3), {"group": 2, "strides": [2, 2]}, True),
    "gemm": ("Gemm", (3, 5), (5, 7), {}, True),
    "gemm_transB_no_bias": ("Gemm", (3, 5), (7, 5), {"transB": 1, "alpha": 0.5}, False),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_batchnorm_folds_and_outputs_stay(case, random_feeds):
    op, x_shape, w_shape, attrs, bias = CASES[case]
    graph = bn_after(op, x_shape, w_shape, attrs, bias)
    folded = run_passes(graph.copy(), FOLD)
    assert [n.op.name for n in folded.nodes] == [op, "Relu"]
    assert len(folded.nodes[0].inputs) == 3  # the BN shift lives on in a bias
    feeds = random_feeds(graph)
    want = kiln.compile(graph).run(feeds)
    got = kiln.compile(folded).run(feeds)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-4)


def test_training_mode_and_shared_producers_are_left_alone():
    training = bn_after("Conv", (2, 4, 6, 6), (8, 4, 3, 3), training=True)
    assert "BatchNormalization" in run_passes(training, FOLD).op_histogram()
    shared = bn_after("Conv", (2, 4, 6, 6), (8, 4, 3, 3), extra_reader=True)
    assert "BatchNormalization" in run_passes(shared, FOLD).op_histogram()


def test_light_resnet50_has_no_batchnorm_after_O2(light_model):
    graph = kiln.optimize(light_model("light_resnet50"), "O2")
    assert "BatchNormalization" not in graph.op_histogram()
