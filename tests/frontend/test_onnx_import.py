"""ONNX import: opsets, symbolic dims, static-value specialization and every kind of bad input."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.driver import to_graph
from kiln.errors import ElementCapError, GraphError, KilnError, ModelLoadError, NeedsStaticValue, UnsupportedOpsError
from kiln.frontend.onnx import import_onnx, load_model
from kiln.ir import verify


def make_model(nodes, inputs, outputs, initializers=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def tensor_info(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def test_every_unsupported_op_is_reported_at_once():
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="ok"),
        helper.make_node("NonZero", ["a"], ["b"], name="nz"),
        helper.make_node("Frob", ["b"], ["c"], name="frob", domain="com.example"),
        helper.make_node("StringNormalizer", ["c"], ["y"], name="sn"),
    ]
    model = make_model(nodes, [tensor_info("x", [2])], [tensor_info("y", [2])])
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    with pytest.raises(UnsupportedOpsError) as info:
        import_onnx(model)
    message = str(info.value)
    for op, node in (("NonZero", "nz"), ("com.example::Frob", "frob"), ("StringNormalizer", "sn")):
        assert op in message and repr(node) in message
    assert [m[0] for m in info.value.missing] == ["NonZero", "Frob", "StringNormalizer"]


def test_symbolic_dims_need_binding_and_bind_to_static_shapes():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", ["N", 3])], [tensor_info("y", ["N", 3])])
    with pytest.raises(KilnError, match=r"graph input 'x' has symbolic dims \['N'\].*--shape x=Nx3"):
        import_onnx(model)
    graph = import_onnx(model, shapes={"x": (5, 3)})
    assert graph.inputs[0].type.shape == (5, 3)
    with pytest.raises(KilnError, match="conflicts with the declared shape"):
        import_onnx(model, shapes={"x": (5, 4)})
    with pytest.raises(KilnError, match="no graph input named 'z'"):
        import_onnx(model, shapes={"z": (1,)})


def test_shape_arithmetic_folds_into_static_attributes():
    """Shape -> Gather -> Concat -> Reshape (a PyTorch flatten) becomes one Reshape."""
    nodes = [
        helper.make_node("Shape", ["x"], ["s"]),
        helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
        helper.make_node("Unsqueeze", ["n", "zero1"], ["n1"]),
        helper.make_node("Concat", ["n1", "minus1"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array([0], np.int64), "zero1"),
        numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
    ]
    model = make_model(nodes, [tensor_info("x", [2, 3, 4])], [tensor_info("y", None)], inits)
    graph = import_onnx(model)
    assert [n.op.name for n in graph.nodes] == ["Reshape"]
    assert graph.nodes[0].attrs["shape"] == [2, 12]


def test_a_shape_from_a_graph_input_names_that_input():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], name="rs")]
    model = make_model(nodes, [tensor_info("x", [2, 3]), tensor_info("shape", [2], TensorProto.INT64)], [tensor_info("y", None)])
    with pytest.raises(NeedsStaticValue, match="node 'rs'.*depends on graph input") as info:
        import_onnx(model)
    assert info.value.inputs == ["shape"]
    graph = import_onnx(model, constants={"shape": np.array([3, 2], np.int64)})
    assert graph.outputs[0].type.shape == (3, 2)
    assert [v.name for v in graph.inputs] == ["x"]


def test_the_onnx_backend_specializes_on_shape_inputs_and_recompiles_when_they_change():
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"])]
    model = make_model(nodes, [tensor_info("x", [2, 3]), tensor_info("shape", [2], TensorProto.INT64)], [tensor_info("y", ["a", "b"])])
    rep = kiln.onnx_backend.prepare(model)
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    (a,) = rep.run([x, np.array([3, 2], np.int64)])
    (b,) = rep.run([x, np.array([6, 1], np.int64)])
    (c,) = rep.run([x, np.array([3, 2], np.int64)])
    assert a.shape == (3, 2) and b.shape == (6, 1) and c.shape == (3, 2)
    assert rep.static_inputs == {"shape"} and len(rep._modules) == 2


def test_cycles_and_undefined_values_are_named():
    nodes = [
        helper.make_node("Relu", ["x"], ["c"], name="entry"),
        helper.make_node("Add", ["c", "b"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
    ]
    model = make_model(nodes, [tensor_info("x", [2])], [tensor_info("b", [2])])
    with pytest.raises(GraphError, match="cycle: 'first' -> 'second' -> 'first'"):
        import_onnx(model)
    missing = make_model([helper.make_node("Add", ["x", "nowhere"], ["y"], name="add")], [tensor_info("x", [2])], [tensor_info("y", [2])])
    with pytest.raises(GraphError, match="node 'add' \\(Add\\) reads 'nowhere'"):
        import_onnx(missing)


def test_unsorted_nodes_are_sorted():
    nodes = [helper.make_node("Exp", ["a"], ["y"], name="second"), helper.make_node("Relu", ["x"], ["a"], name="first")]
    model = make_model(nodes, [tensor_info("x", [2])], [tensor_info("y", [2])])
    graph = import_onnx(model)
    assert [n.name for n in graph.nodes] == ["first", "second"]


def test_a_huge_declared_input_is_refused_before_allocation():
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", [100000, 100000, 100])], [tensor_info("y", None)])
    with pytest.raises(ElementCapError, match="input 'x'.*over the cap"):
        import_onnx(model)


def test_type_errors_name_the_node():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="proj")]
    model = make_model(nodes, [tensor_info("x", [2, 3]), tensor_info("w", [4, 5])], [tensor_info("y", None)])
    with pytest.raises(GraphError, match="node 'proj' \\(MatMul\\).*inner dimensions differ"):
        import_onnx(model)


def test_the_element_cap_stops_a_huge_constant_before_allocating():
    nodes = [helper.make_node("ConstantOfShape", ["shape"], ["y"], name="fill")]
    inits = [numpy_helper.from_array(np.array([100000, 100000, 100], np.int64), "shape")]
    model = make_model(nodes, [], [tensor_info("y", None)], inits)
    with pytest.raises(ElementCapError, match="node 'fill'.*over the cap"):
        import_onnx(model)


def test_truncated_and_non_onnx_files(tmp_path, light_model):
    data = light_model("light_squeezenet").read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="truncated.onnx"):
        load_model(truncated)
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n" * 10)
    with pytest.raises(ModelLoadError, match="notes.onnx"):
        load_model(text)
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "absent.onnx")


def _external_model(folder, location):
    weight = numpy_helper.from_array(np.arange(4, dtype=np.float32), "w")
    model = make_model([helper.make_node("Add", ["x", "w"], ["y"])], [tensor_info("x", [4])], [tensor_info("y", [4])], [weight])
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_external_data_inside_the_model_folder_loads(tmp_path):
    (tmp_path / "weights.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    module = kiln.compile(_external_model(tmp_path, "weights.bin"))
    np.testing.assert_array_equal(module.run({"x": np.ones(4, np.float32)})["y"], [1, 2, 3, 4])


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    folder = tmp_path / "model"
    folder.mkdir()
    (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(_external_model(folder, location))


def test_opsets_old_and_new_import(light_model):
    """opset 6 (old PyTorch exports) through the newest onnx defines."""
    old = make_model(
        [helper.make_node("Add", ["x", "b"], ["y"], broadcast=1, axis=1)],
        [tensor_info("x", [2, 3, 4]), tensor_info("b", [3])],
        [tensor_info("y", [2, 3, 4])],
        opset=6,
    )
    x, b = np.ones((2, 3, 4), np.float32), np.array([1, 2, 3], np.float32)
    y = kiln.compile(old).run({"x": x, "b": b})["y"]
    np.testing.assert_array_equal(y, x + b[:, None])
    newest = onnx.defs.onnx_opset_version()
    model = make_model([helper.make_node("Relu", ["x"], ["y"])], [tensor_info("x", [2])], [tensor_info("y", [2])], opset=newest)
    verify(to_graph(model))


def test_model_local_functions_are_inlined_with_their_attributes():
    """A PyTorch-style local function with an attribute reference and a default."""
    scale_attr = helper.make_attribute("alpha", 0.0)
    scale_attr.ref_attr_name = "slope"
    body = [
        helper.make_node("LeakyRelu", ["x"], ["a"], **{}),
        helper.make_node("Mul", ["a", "x"], ["y"]),
    ]
    body[0].attribute.append(scale_attr)
    fn = helper.make_function("custom", "LeakySquare", ["x"], ["y"], body, [helper.make_opsetid("", 17)], attributes=["slope"])
    call = helper.make_node("LeakySquare", ["in"], ["out"], domain="custom", name="call", slope=0.5)
    graph = helper.make_graph([call], "g", [tensor_info("in", [3])], [tensor_info("out", [3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("custom", 1)], functions=[fn])
    x = np.array([-2.0, 0.0, 3.0], np.float32)
    y = kiln.compile(model).run({"in": x})["out"]
    np.testing.assert_allclose(y, np.where(x >= 0, x, 0.5 * x) * x)


def test_ops_without_converters_expand_through_their_onnx_function_body():
    """AffineGrid has no kiln converter: its schema's function body is inlined."""
    theta = np.array([[[1.0, 0.2, 0.0], [0.1, 0.9, 0.3]], [[0.5, 0.0, 0.1], [0.0, 2.0, 0.0]]], np.float32)
    nodes = [helper.make_node("AffineGrid", ["theta", "size"], ["grid"], align_corners=1, name="grid")]
    inits = [numpy_helper.from_array(np.array([2, 3, 2, 3], np.int64), "size")]
    model = make_model(nodes, [tensor_info("theta", [2, 2, 3])], [tensor_info("grid", None)], inits, opset=20)
    graph = to_graph(model)
    assert "AffineGrid" not in graph.op_histogram()
    got = kiln.compile(graph).run({"theta": theta})["grid"]
    xs, ys = np.meshgrid(np.linspace(-1, 1, 3), np.linspace(-1, 1, 2))
    base = np.stack([xs, ys, np.ones_like(xs)], axis=-1)
    for n in range(2):
        np.testing.assert_allclose(got[n], base @ theta[n].T, rtol=1e-5, atol=1e-6)
