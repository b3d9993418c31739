"""The op registry is complete: every op has its rules, every converter targets real ops."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.frontend.onnx import supported_ops
from kiln.ir import REQUIRED, OpKind, all_ops, get_op, register
from kiln.ir.opdef import OpDef


@pytest.mark.parametrize("op", sorted(all_ops().values(), key=lambda o: o.name), ids=lambda o: o.name)
def test_every_op_has_a_shape_rule_a_reference_and_a_kind(op):
    assert callable(op.infer) and callable(op.eager)
    assert isinstance(op.kind, OpKind)
    lo, hi = op.num_inputs
    assert lo >= 0 and (hi is None or hi >= lo)
    assert all(isinstance(k, str) for k in op.attrs)


def test_registering_an_op_twice_is_refused():
    relu = get_op("Relu")
    with pytest.raises(ValueError, match="registered twice"):
        register(OpDef("Relu", OpKind.ELEMENTWISE, relu.infer, relu.eager))


def test_required_attributes_have_no_default():
    assert get_op("Transpose").attrs["perm"] is REQUIRED
    assert get_op("Conv").complete_attrs({})["group"] == 1


def test_the_importer_covers_the_foundation_op_set():
    """The ONNX ops the foundation issue lists all have converters."""
    wanted = """
    Abs Neg Exp Log Sqrt Reciprocal Floor Ceil Round Sign Sin Cos Tan Tanh Erf Sigmoid Relu LeakyRelu Elu
    Selu Celu HardSigmoid HardSwish Softplus Softsign Gelu PRelu Add Sub Mul Div Pow Mod Min Max Sum Mean
    Equal Less Greater LessOrEqual GreaterOrEqual And Or Xor Not Clip
    Conv ConvTranspose MaxPool AveragePool GlobalAveragePool GlobalMaxPool LpPool BatchNormalization
    InstanceNormalization GroupNormalization LayerNormalization LRN Dropout Gemm MatMul Einsum Softmax
    LogSoftmax Hardmax ReduceSum ReduceMean ReduceMax ReduceMin ReduceProd ReduceL1 ReduceL2 ReduceLogSum
    ReduceLogSumExp ReduceSumSquare ArgMax ArgMin CumSum TopK Reshape Flatten Transpose Concat Split Slice
    Squeeze Unsqueeze Expand Tile Pad Gather GatherElements GatherND ScatterElements ScatterND Shape Size
    Constant ConstantOfShape Cast CastLike Identity Where Range OneHot Resize Upsample DepthToSpace
    SpaceToDepth Trilu LSTM GRU RNN SoftmaxCrossEntropyLoss NegativeLogLikelihoodLoss
    """.split()
    missing = sorted(set(wanted) - set(supported_ops()))
    assert not missing


def test_a_reference_that_disagrees_with_its_shape_rule_is_caught():
    """The eager backend refuses results whose type differs from the inferred one."""
    import kiln
    from kiln.errors import KilnError
    from kiln.ir import DType, Graph, TensorType

    bad = OpDef("_BadShape", OpKind.ELEMENTWISE, lambda a, t: [t[0]], lambda a, x: np.zeros(3, x.dtype))
    g = Graph()
    x = g.add_input("x", TensorType((2,), DType.float32))
    g.outputs.append(g.add_node(bad, [x], name="bad").outputs[0])
    with pytest.raises(KilnError, match="reference returned float32\\[3\\], its type says f32\\[2\\]"):
        kiln.Module(g, "eager").run({"x": np.zeros(2, np.float32)})
