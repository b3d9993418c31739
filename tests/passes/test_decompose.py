"""decompose: each rule's nodes compute what the op's reference computes, on eager and llvm."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.ir.evaluate import evaluate
from kiln.ir.graph import Graph
from kiln.ir.types import TensorType
from kiln.passes import get_pass

RNG = np.random.default_rng(7)


def one_op(op: str, arrays: dict, attrs: dict, params: dict | None = None, outputs: int = 1) -> tuple[Graph, list[np.ndarray]]:
    """A graph of one ``op`` node over inputs ``arrays`` (and ``params``; None for an absent
    input), and the feeds for its inputs."""
    g = Graph()
    inputs, feeds = [], []
    for name, array in arrays.items():
        if array is None:
            inputs.append(None)
        elif params and name in params:
            inputs.append(g.add_param(name, array))
        else:
            inputs.append(g.add_input(name, TensorType.of(array)))
            feeds.append(array)
    node = g.add_node(op, inputs, attrs, name="subject", num_outputs=outputs)
    g.outputs = list(node.outputs)
    return g, feeds


def check_decomposed(g: Graph, feeds: list[np.ndarray], rtol=1e-5, atol=1e-6) -> None:
    op = g.nodes[0].op.name
    want = evaluate(g, feeds)
    names = [v.name for v in g.outputs]
    decomposed = get_pass("decompose")(g.copy())
    assert op not in decomposed.op_histogram()
    assert [v.name for v in decomposed.outputs] == names
    compiled = kiln.compile(g, target="llvm").run({v.name: x for v, x in zip(g.inputs, feeds)})
    for got in (evaluate(decomposed, feeds), [compiled[n] for n in names]):
        for w, x in zip(want, got):
            assert x.dtype == w.dtype and x.shape == w.shape
            np.testing.assert_allclose(x, w, rtol=rtol, atol=atol)


def floats(*shape) -> np.ndarray:
    return RNG.normal(size=shape).astype(np.float32)


LOSS_CASES = [
    dict(reduction="mean"),
    dict(reduction="sum", ignore_index=1),
    dict(reduction="none", ignore_index=-1),
    dict(reduction="mean", ignore_index=2, weighted=True),
    dict(reduction="mean", weighted=True, spatial=True),
]


@pytest.mark.parametrize("case", LOSS_CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("op", ["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"])
def test_losses(op, case):
    case = dict(case)
    weighted, spatial = case.pop("weighted", False), case.pop("spatial", False)
    shape = (4, 5, 3, 2) if spatial else (6, 5)
    target = RNG.integers(-1 if case.get("ignore_index") == -1 else 0, 5, (shape[0], *shape[2:])).astype(np.int64)
    weight = RNG.uniform(0.5, 2, 5).astype(np.float32) if weighted else None
    g, feeds = one_op(op, {"x": floats(*shape), "t": target, "w": weight}, case, outputs=2 if op.startswith("Softmax") else 1)
    check_decomposed(g, feeds)


@pytest.mark.parametrize(
    "op, attrs",
    [
        ("InstanceNormalization", {"epsilon": 1e-3}),
        ("GroupNormalization", {"num_groups": 2}),
        ("BatchNormalization", {"training_mode": 1, "momentum": 0.8}),
    ],
)
def test_normalizations(op, attrs):
    x = floats(3, 4, 5, 2) * 3 + 1
    inputs = {"x": x, "scale": floats(4), "bias": floats(4)}
    if op == "BatchNormalization":
        inputs.update(mean=floats(4), var=RNG.uniform(0.5, 2, 4).astype(np.float32))
    g, feeds = one_op(op, inputs, attrs, outputs=3 if op == "BatchNormalization" else 1)
    check_decomposed(g, feeds, rtol=1e-4, atol=1e-5)


def test_mean_variance_normalization():
    g, feeds = one_op("MeanVarianceNormalization", {"x": floats(2, 3, 4, 4)}, {"axes": [0, 2, 3]})
    check_decomposed(g, feeds, rtol=1e-4, atol=1e-5)


def test_inference_batchnorm_is_left_to_the_kernel():
    g, _ = one_op("BatchNormalization", {"x": floats(2, 3, 4), "s": floats(3), "b": floats(3), "m": floats(3), "v": np.ones(3, np.float32)}, {})
    assert get_pass("decompose")(g).op_histogram() == {"BatchNormalization": 1}


@pytest.mark.parametrize("op", ["ReduceLogSum", "ReduceLogSumExp"])
@pytest.mark.parametrize("axes, keepdims", [([1], 1), ([0, 2], 0), (None, 0)])
def test_log_reductions(op, axes, keepdims):
    x = RNG.uniform(0.1, 3, (3, 4, 5)).astype(np.float32)
    if op == "ReduceLogSumExp":
        x = x * 40  # exp overflows float32 without the shift by the maximum
    g, feeds = one_op(op, {"x": x}, {"axes": axes, "keepdims": keepdims})
    check_decomposed(g, feeds)


@pytest.mark.parametrize(
    "attrs",
    [
        {"kernel_shape": [3, 3], "p": 2},
        {"kernel_shape": [2, 3], "strides": [2, 2], "pads": [1, 0, 1, 1], "p": 3},
        {"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1, "p": 1},
        {"kernel_shape": [2], "dilations": [2], "p": 2},
    ],
)
def test_lp_pool(attrs):
    shape = (2, 3, 7) if len(attrs["kernel_shape"]) == 1 else (2, 3, 8, 7)
    g, feeds = one_op("LpPool", {"x": floats(*shape)}, attrs)
    check_decomposed(g, feeds, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("attrs", [{"training_mode": 1, "ratio": 0.3, "seed": 5}, {"training_mode": 0}, {"training_mode": 1, "ratio": 0.0}])
def test_dropout(attrs):
    g, feeds = one_op("Dropout", {"x": floats(4, 6)}, attrs, outputs=2)
    check_decomposed(g, feeds)


ATTENTION_CASES = {
    "4d": dict(),
    "3d-heads": dict(three_d=True),
    "gqa-causal": dict(kv_heads=2, is_causal=1),
    "bool-mask": dict(mask="bool"),
    "additive-mask-short": dict(mask="float", mask_len=5),
    "past-window": dict(past=3, left_window_size=2, qk_matmul_output_mode=3),
    "softcap-scale": dict(softcap=2.0, scale=0.3, qk_matmul_output_mode=2),
    "nonpad-causal": dict(nonpad=True, is_causal=1, kv_heads=2, q_len=1, kv_len=6),
    "fully-masked-row": dict(mask="dead-row", qk_matmul_output_mode=1),
}


@pytest.mark.parametrize("case", ATTENTION_CASES.values(), ids=ATTENTION_CASES.keys())
def test_attention(case):
    case = dict(case)
    three_d, kv_heads, q_len = case.pop("three_d", False), case.pop("kv_heads", 4), case.pop("q_len", 3)
    kv_len, mask_kind, mask_len = case.pop("kv_len", 6), case.pop("mask", None), case.pop("mask_len", None)
    past, nonpad = case.pop("past", 0), case.pop("nonpad", False)
    batch, heads, d = 2, 4, 8
    total = kv_len + past
    q, k, v = floats(batch, heads, q_len, d), floats(batch, kv_heads, kv_len, d), floats(batch, kv_heads, kv_len, d)
    attrs = dict(case)
    if three_d:
        q, k, v = (x.transpose(0, 2, 1, 3).reshape(batch, x.shape[2], -1) for x in (q, k, v))
        attrs.update(q_num_heads=heads, kv_num_heads=kv_heads)
    mask = None
    if mask_kind == "bool":
        mask = RNG.uniform(size=(q_len, total)) > 0.3
    elif mask_kind == "float":
        mask = floats(batch, 1, q_len, mask_len or total)
    elif mask_kind == "dead-row":
        mask = np.ones((q_len, total), dtype=bool)
        mask[1] = False
    inputs = {"q": q, "k": k, "v": v, "mask": mask}
    if past:
        inputs.update(past_key=floats(batch, kv_heads, past, d), past_value=floats(batch, kv_heads, past, d))
    if nonpad:
        inputs.update(past_key=None, past_value=None, nonpad=np.array([4, 6], dtype=np.int64))
    g, feeds = one_op("Attention", inputs, attrs, outputs=4 if not nonpad else 1)
    check_decomposed(g, feeds)


def test_layer_norm_with_a_broadcast_scale():
    """The llvm kernel reads scale and bias whole per row; a broadcast one is decomposed."""
    g, feeds = one_op("LayerNormalization", {"x": floats(3, 4, 5), "scale": floats(4, 1), "bias": floats(5)}, {"axis": 1}, outputs=3)
    check_decomposed(g, feeds, rtol=1e-4, atol=1e-5)


QUANT_CASES = {
    "per-tensor-u8": dict(out=np.uint8, param_shape=()),
    "per-axis-i8": dict(out=np.int8, param_shape=(4,), axis=1),
    "blocked-i16": dict(out=np.int16, param_shape=(3, 2, 5), axis=1, block_size=3),
    "no-zero-point": dict(out=None, param_shape=()),
}


@pytest.mark.parametrize("case", QUANT_CASES.values(), ids=QUANT_CASES.keys())
def test_linear_quantization(case):
    """Quantize then dequantize: ties round half to even, values past the range saturate."""
    shape, out = (3, 4, 5), case["out"]
    attrs = {k: case[k] for k in ("axis", "block_size") if k in case}
    x = (RNG.normal(size=shape) * 300).astype(np.float32)
    x.flat[:4] = [0.5, 1.5, 2.5, -0.5]  # exact ties at scale 1
    scale = RNG.uniform(0.5, 3, case["param_shape"]).astype(np.float32)
    scale.flat[0] = 1.0
    zero = RNG.integers(0 if out == np.uint8 else -3, 5, case["param_shape"]).astype(out) if out is not None else None
    g, feeds = one_op("QuantizeLinear", {"x": x, "scale": scale, "zero": zero}, attrs)
    check_decomposed(g, feeds, rtol=0, atol=0)
    q = evaluate(g, feeds)[0]
    g, feeds = one_op("DequantizeLinear", {"q": q, "scale": scale, "zero": zero}, attrs)
    check_decomposed(g, feeds, rtol=0, atol=0)


@pytest.mark.parametrize("x_dtype, out", [(np.float32, np.uint8), (np.float32, np.int8), (np.float16, np.int8), (np.float32, np.int16)])
def test_quantizing_every_tie_and_past_the_range(x_dtype, out):
    """x / scale at every half integer from -700.5 to 699.5 (ties, both signs, far past an
    8-bit range) and beyond float16's exact integers: the decomposition, which keeps the sum
    and clamp in x's float type where that is exact, gives the reference's integers, and
    dequantizing them (in float32) its floats."""
    halves = np.arange(-700, 700) + 0.5
    x = np.concatenate([halves * 0.25, [3000.0, -5000.0, 65504.0 / 4, 1e-3]]).astype(x_dtype)
    scale, zero = np.array(0.25, x_dtype), np.array(3 if out == np.uint8 else -2, out)
    g, feeds = one_op("QuantizeLinear", {"x": x, "scale": scale, "zero": zero}, {})
    check_decomposed(g, feeds, rtol=0, atol=0)
    q = evaluate(g, feeds)[0]
    g, feeds = one_op("DequantizeLinear", {"q": q, "scale": np.array(0.1, np.float32), "zero": zero}, {})
    check_decomposed(g, feeds, rtol=0, atol=0)


@pytest.mark.parametrize(
    "equation, shapes",
    [
        ("bhqd,bhkd->bhqk", [(2, 3, 5, 4), (2, 3, 6, 4)]),  # attention scores
        ("bhqk,bhkd->bhqd", [(2, 3, 5, 6), (2, 3, 6, 4)]),
        ("ij,jk->ki", [(3, 4), (4, 5)]),
        ("...ij,jk->...ik", [(2, 1, 3, 4), (4, 5)]),
        ("bij,bjk->bik", [(1, 3, 4), (6, 4, 2)]),  # a broadcast batch label
        ("ijk,jl->li", [(3, 4, 2), (4, 5)]),  # k only in A: summed first
        ("i,j->ij", [(3,), (4,)]),  # an outer product: nothing contracted
        ("ij->ji", [(3, 4)]),
        ("ijk->", [(2, 3, 4)]),
    ],
)
def test_einsum_contractions_become_one_matmul(equation, shapes):
    arrays = {f"x{i}": floats(*s) for i, s in enumerate(shapes)}
    g, feeds = one_op("Einsum", arrays, {"equation": equation})
    check_decomposed(g, feeds, rtol=1e-4, atol=1e-5)
    assert get_pass("decompose")(g.copy()).op_histogram().get("MatMul", 0) == (len(shapes) == 2)


def test_an_einsum_diagonal_keeps_its_kernel():
    g, feeds = one_op("Einsum", {"x": floats(3, 3)}, {"equation": "ii->i"})
    assert get_pass("decompose")(g.copy()).op_histogram() == {"Einsum": 1}
    np.testing.assert_allclose(kiln.compile(g, target="llvm").run({"x": feeds[0]})[g.outputs[0].name], np.diag(feeds[0]))
