"""The Python DSL: tensors, indexing, modules and state, eager vs traced, errors at the user's line."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
import kiln.nn as nn
from kiln.frontend.dsl import functional as F
from kiln.frontend.dsl.tensor import DSLError

RNG = np.random.default_rng(0)


def arr(*shape):
    return RNG.normal(size=shape).astype(np.float32)


def test_operators_broadcast_like_numpy():
    a, b = arr(3, 1, 4), arr(5, 1)
    ta, tb = kiln.Tensor(a), kiln.Tensor(b)
    np.testing.assert_allclose((ta + tb).numpy(), a + b)
    np.testing.assert_allclose((ta * 2 - 1).numpy(), a * 2 - 1)
    np.testing.assert_allclose((1 / (tb + 10)).numpy(), 1 / (b + 10), rtol=1e-6)
    np.testing.assert_allclose((kiln.Tensor(arr(2, 3)) @ kiln.Tensor(np.eye(3, dtype=np.float32))).shape, (2, 3))
    assert (ta > 0).dtype.name == "bool"
    assert (kiln.Tensor(np.arange(4)) + 1).dtype.name == "int64"  # a scalar takes the tensor's dtype


@pytest.mark.parametrize(
    "index",
    [1, -1, (slice(None), 2), (Ellipsis, -1), (None, 1), slice(1, None, 2), slice(None, None, -1),
     (slice(3, 0, -2), slice(None), 0), [0, 2], (slice(None), [2, 0, 1])],
    ids=str,
)
def test_indexing_matches_numpy(index):
    x = arr(4, 3, 5)
    got = kiln.Tensor(x)[index]
    np.testing.assert_array_equal(got.numpy(), x[index])
    traced = kiln.trace(lambda t: t[index], [x])
    out = kiln.compile(traced).run({"t": x})["output"]
    np.testing.assert_array_equal(out, x[index])


def test_shape_errors_name_the_users_line():
    x = kiln.Tensor(arr(2, 3))
    with pytest.raises(DSLError, match=r"test_dsl\.py:\d+ in test_shape_errors_name_the_users_line: .*MatMul"):
        x @ x  # noqa: B018


def test_tracing_errors_name_the_line_in_forward():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) + x  # (2, 3) + (2, 4) does not broadcast

    with pytest.raises(DSLError, match=r"test_dsl\.py:\d+ in forward: node 'Add' \(Add\): shapes \(2, 3\) and \(2, 4\) do not broadcast"):
        kiln.trace(Bad(), [arr(2, 4)])


def test_reading_values_while_tracing_is_an_error():
    with pytest.raises(DSLError, match="while tracing"):
        kiln.trace(lambda x: x if bool(x.sum() > 0) else -x, [arr(3)])


def test_trace_names_params_after_the_state_dict_and_nodes_after_modules():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    graph = kiln.trace(model, [arr(1, 4)])
    assert {v.name for v in graph.params} == set(model.state_dict())
    assert [n.name for n in graph.nodes] == ["0/Gemm", "1/Relu", "2/Gemm"]
    assert [v.name for v in graph.inputs] == ["x"] and [v.name for v in graph.outputs] == ["output"]


def test_state_dict_round_trips_through_npz(tmp_path):
    a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    a.save(tmp_path / "w.npz")
    b.load(tmp_path / "w.npz")
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[key], value)
    assert set(a.state_dict()) == {"0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var"}


def test_load_state_dict_names_what_is_wrong(tmp_path):
    model = nn.Linear(3, 2)
    with pytest.raises(kiln.KilnError, match=r"missing keys \['bias'\]"):
        model.load_state_dict({"weight": np.zeros((2, 3), np.float32)})
    with pytest.raises(kiln.KilnError, match=r"'weight'.*cannot assign float32\[3, 3\] to a parameter of type f32\[2,3\]"):
        model.load_state_dict({"weight": np.zeros((3, 3), np.float32), "bias": np.zeros(2, np.float32)})
    bad = tmp_path / "pickled.npz"
    np.savez(bad, weight=np.array([object()], dtype=object), bias=np.zeros(2, np.float32))
    with pytest.raises(kiln.KilnError, match="cannot read"):
        model.load(bad)


def test_batchnorm_training_updates_running_stats_with_pytorch_momentum():
    bn = nn.BatchNorm2d(3, momentum=0.1)
    x = arr(4, 3, 5, 5) * 2 + 1
    y = bn(kiln.Tensor(x)).numpy()
    mean = x.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.1 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(y.mean(axis=(0, 2, 3)), 0, atol=1e-5)
    bn.eval()
    before = bn.running_mean.numpy().copy()
    bn(kiln.Tensor(x))
    np.testing.assert_array_equal(bn.running_mean.numpy(), before)


def test_dropout_is_identity_in_eval_and_seeded_in_training():
    nn.init.seed(5)
    drop = nn.Dropout(0.5)
    x = np.ones((1000,), np.float32)
    first = drop(kiln.Tensor(x)).numpy()
    assert set(np.unique(first)) == {0.0, 2.0} and 400 < (first == 0).sum() < 600
    assert not np.array_equal(first, drop(kiln.Tensor(x)).numpy())  # a new mask per call
    nn.init.seed(5)
    np.testing.assert_array_equal(nn.Dropout(0.5)(kiln.Tensor(x)).numpy(), first)  # reproducible
    np.testing.assert_array_equal(drop.eval()(kiln.Tensor(x)).numpy(), x)


@pytest.mark.parametrize("name", ["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal"])
def test_initializers_have_their_documented_variance(name):
    nn.init.seed(0)
    shape = (256, 128, 3, 3)
    w = getattr(nn.init, name)(shape)
    fan_in, fan_out = 128 * 9, 256 * 9
    want = {
        "xavier_uniform": 2.0 / (fan_in + fan_out),
        "xavier_normal": 2.0 / (fan_in + fan_out),
        "kaiming_uniform": 2.0 / fan_in,
        "kaiming_normal": 2.0 / fan_out,
    }[name]
    assert w.dtype == np.float32 and abs(w.var() / want - 1) < 0.02


def test_orthogonal_init_is_orthogonal():
    w = nn.init.orthogonal((6, 10))
    np.testing.assert_allclose(w @ w.T, np.eye(6), atol=1e-5)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("batch_first,bidirectional", [(True, False), (False, True)])
def test_recurrent_layers_shapes_and_tracing(cell, batch_first, bidirectional):
    layer = cell(5, 7, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    x = arr(2, 3, 5) if batch_first else arr(3, 2, 5)
    out, state = layer(kiln.Tensor(x))
    dirs = 2 if bidirectional else 1
    assert out.shape == ((2, 3, 7 * dirs) if batch_first else (3, 2, 7 * dirs))
    h = state[0] if isinstance(state, tuple) else state
    assert h.shape == (2 * dirs, 2, 7)
    graph = kiln.trace(lambda t: layer(t)[0], [x])
    got = kiln.compile(graph, target="llvm").run({"t": x})["output"]
    np.testing.assert_allclose(got, out.numpy(), rtol=1e-4, atol=1e-5)


def test_upsample_modes():
    x = arr(1, 2, 3, 4)
    near = nn.Upsample(scale_factor=2)(kiln.Tensor(x)).numpy()
    np.testing.assert_array_equal(near, x.repeat(2, axis=2).repeat(2, axis=3))
    corners = nn.Upsample(size=(5, 7), mode="bilinear", align_corners=True)(kiln.Tensor(x)).numpy()
    np.testing.assert_allclose(corners[..., 0, 0], x[..., 0, 0], rtol=1e-6)
    np.testing.assert_allclose(corners[..., -1, -1], x[..., -1, -1], rtol=1e-6)
    half = nn.Upsample(scale_factor=2, mode="bilinear")(kiln.Tensor(x)).numpy()
    np.testing.assert_allclose(half.mean(), x.mean(), atol=0.05)


def test_adaptive_avg_pool_needs_a_divisor():
    x = kiln.Tensor(arr(1, 2, 6, 6))
    np.testing.assert_allclose(F.adaptive_avg_pool2d(x, 3).numpy(), x.numpy().reshape(1, 2, 3, 2, 3, 2).mean(axis=(3, 5)), rtol=1e-6, atol=1e-7)  # float32 sums of 4 in another order
    with pytest.raises(DSLError, match="does not divide"):
        F.adaptive_avg_pool2d(x, 4)


def test_embedding_looks_up_rows():
    emb = nn.Embedding(10, 4)
    idx = np.array([[1, 3], [9, 0]])
    np.testing.assert_array_equal(emb(kiln.Tensor(idx)).numpy(), emb.weight.numpy()[idx])


def test_jit_compiles_once_per_input_signature():
    calls = []

    @kiln.jit(target="llvm")
    def f(x, y):
        calls.append(1)
        return F.relu(x @ y) + 1

    a, b = arr(2, 3), arr(3, 4)
    np.testing.assert_allclose(f(a, b).numpy(), np.maximum(a @ b, 0) + 1, rtol=1e-5)
    f(arr(2, 3), arr(3, 4))
    assert len(calls) == 1  # traced once, then the compiled module runs
    assert f(arr(5, 3), b).shape == (5, 4) and len(calls) == 2  # a new shape traces again


def test_compile_takes_a_module_with_input_shapes():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh())
    x = arr(2, 4)
    out = kiln.compile(model, target="llvm", shapes={"x": (2, 4)}).run({"x": x})["output"]
    np.testing.assert_allclose(out, model(kiln.Tensor(x)).numpy(), rtol=1e-5, atol=1e-6)
