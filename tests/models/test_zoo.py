"""Every zoo model, at a small size, agrees four ways: the eager DSL, the traced graph compiled
for each target, its ONNX export run by onnxruntime, and the export imported back (equal graph)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import kiln
from kiln.backends.tvm import cuda_available
from kiln.frontend.onnx import import_onnx
from kiln.frontend.onnx.export import graph_to_onnx
from kiln.ir.graph import graphs_equal
from kiln.models.zoo import ZOO, build

RTOL, ATOL = 1e-3, 1e-4


def _realistic_norms(model) -> None:
    """BatchNorm statistics and affine terms away from the identity, so BN folding is tested."""
    rng = np.random.default_rng(7)
    state = model.state_dict()
    for name, array in state.items():
        if name.endswith("running_var"):
            state[name] = rng.uniform(0.5, 1.5, array.shape).astype(array.dtype)
        elif name.endswith("running_mean"):
            state[name] = rng.normal(0, 0.1, array.shape).astype(array.dtype)
    model.load_state_dict(state)


@pytest.fixture(scope="module", params=sorted(ZOO))
def zoo_case(request):
    entry = ZOO[request.param]
    model = build(entry.name, **entry.small_kwargs)
    _realistic_norms(model)
    x = np.random.default_rng(1).normal(size=entry.small_shape).astype(np.float32)
    want = model(kiln.Tensor(x)).numpy()
    graph = kiln.trace(model, [x], input_names=["input"])
    return entry.name, model, x, want, graph


def test_output_is_not_trivial(zoo_case):
    name, _, _, want, _ = zoo_case
    assert np.isfinite(want).all() and want.std() > 1e-3, f"{name}: outputs too small to compare meaningfully"


GPU = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="no CUDA device visible")]


@pytest.mark.parametrize("target", ["eager", "llvm", "tvm-llvm", pytest.param("tvm-cuda", marks=GPU)])
def test_traced_and_compiled_matches_eager_dsl(zoo_case, target):
    name, _, x, want, graph = zoo_case
    got = kiln.compile(graph, target=target, pipeline="O2").run({"input": x})["output"]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=f"{name} on {target}")


def test_builds_for_cuda_on_any_machine(zoo_case):
    """TVM schedules and generates the GPU code without a GPU: the tvm-cuda build of every zoo
    model is checked here, where the run above needs a device."""
    name, _, _, _, graph = zoo_case
    module = kiln.compile(graph, target="tvm-cuda", pipeline="O2")
    assert module.executable.library[:4] == b"\x7fELF", name


def test_onnx_export_runs_in_onnxruntime(zoo_case):
    name, _, x, want, graph = zoo_case
    proto = graph_to_onnx(graph)
    onnx.checker.check_model(proto, full_check=True)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], want, rtol=RTOL, atol=ATOL, err_msg=name)


def test_export_imports_back_to_an_equal_graph(zoo_case):
    name, _, _, _, graph = zoo_case
    assert graphs_equal(import_onnx(graph_to_onnx(graph)), graph), name


def test_zoo_names_work_wherever_a_model_file_does(tmp_path):
    module = kiln.compile("lenet5", shapes={"input": (3, 1, 32, 32)})
    assert module.input_types["input"].shape == (3, 1, 32, 32)
    out = module.run({"input": np.ones((3, 1, 32, 32), np.float32)})["output"]
    want = build("lenet5")(kiln.Tensor(np.ones((3, 1, 32, 32), np.float32))).numpy()
    np.testing.assert_allclose(out, want, rtol=RTOL, atol=ATOL)


def test_standard_sizes_match_the_published_parameter_counts():
    # torchvision's counts for the same architectures
    assert build("resnet18").num_parameters == 11_689_512
    assert build("resnet34").num_parameters == 21_797_672
    assert build("resnet50").num_parameters == 25_557_032
    assert build("mobilenet_v2").num_parameters == 3_504_872


def test_builders_are_configurable_and_seeded():
    a, b = kiln.models.resnet18(num_classes=10, width=8), kiln.models.resnet18(num_classes=10, width=8)
    assert a.fc.weight.shape == (10, 64)
    assert not np.array_equal(a.fc.weight.numpy(), b.fc.weight.numpy())  # one generator, drawn in turn
    c, d = build("mlp", seed=3), build("mlp", seed=3)
    assert all(np.array_equal(c.state_dict()[k], d.state_dict()[k]) for k in c.state_dict())
