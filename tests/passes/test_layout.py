"""Layout passes: to_nhwc converts convolutions and pools between transposes, sink_transposes
moves the transposes through layout-agnostic ops until only the graph boundary keeps any."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.errors import KilnError
from kiln.ir import parse_graph
from kiln.ir.text import array_digest
from kiln.models.zoo import ZOO, build
from kiln.passes import run_passes
from kiln.passes.pipelines import pipeline

BEFORE = """
    graph g(%x: f32[1,2,3,3]) {
      param %w: f32[2,2,1,1] = [1.0, -1.0, 0.5, 2.0]
      param %b: f32[2,1,1] = [0.5, -0.5]
      %c: f32[1,2,3,3] = Conv(%x, %w) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1}
      %a: f32[1,2,3,3] = Add(%c, %b)
      %y: f32[1,2,3,3] = Relu(%a)
      return %y
    }"""

CONV_NHWC = '{strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1, layout="NHWC"}'


def test_to_nhwc_puts_the_conv_between_transposes_and_transposes_its_weight(rewrites):
    rewrites(
        ["to_nhwc"],
        BEFORE,
        f"""
        graph g(%x: f32[1,2,3,3]) {{
          param %b: f32[2,1,1] = [0.5, -0.5]
          param %wt: f32[1,1,2,2] = [1.0, 0.5, -1.0, 2.0]
          %t: f32[1,3,3,2] = Transpose(%x) {{perm=[0, 2, 3, 1]}}
          %c: f32[1,3,3,2] = Conv(%t, %wt) {CONV_NHWC}
          %back: f32[1,2,3,3] = Transpose(%c) {{perm=[0, 3, 1, 2]}}
          %a: f32[1,2,3,3] = Add(%back, %b)
          %y: f32[1,2,3,3] = Relu(%a)
          return %y
        }}""",
    )


def test_sink_transposes_moves_the_transpose_to_the_output(rewrites):
    rewrites(
        ["to_nhwc", "sink_transposes"],
        BEFORE,
        f"""
        graph g(%x: f32[1,2,3,3]) {{
          param %wt: f32[1,1,2,2] = [1.0, 0.5, -1.0, 2.0]
          param %bt: f32[1,1,1,2] = [0.5, -0.5]
          %t: f32[1,3,3,2] = Transpose(%x) {{perm=[0, 2, 3, 1]}}
          %c: f32[1,3,3,2] = Conv(%t, %wt) {CONV_NHWC}
          %a: f32[1,3,3,2] = Add(%c, %bt)
          %r: f32[1,3,3,2] = Relu(%a)
          %y: f32[1,2,3,3] = Transpose(%r) {{perm=[0, 3, 1, 2]}}
          return %y
        }}""",
    )


def test_a_transpose_another_node_reads_too_does_not_sink_through_an_add_by_matching_it(rewrites):
    """A transformer's residual stream after a channels-last patch conv: the transpose feeds
    the LayerNorm and the Add. Sinking it through the Add would keep it (the LayerNorm reads
    it), transpose the other operand to match and the sum back: two more, at every block."""
    graph = """
        graph g(%x: f32[1,6,4]) {
          param %s: f32[6] = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
          %t: f32[1,4,6] = Transpose(%x) {perm=[0, 2, 1]}
          %l: f32[1,4,6] = LayerNormalization(%t, %s) {axis=-1, epsilon=1e-05}
          %a: f32[1,4,6] = Add(%t, %l)
          return %a
        }"""
    rewrites(["sink_transposes"], graph, graph)


def test_transposes_of_unit_axes_become_reshapes(rewrites):
    rewrites(
        ["sink_transposes"],
        """
        graph g(%x: f32[2,1,1,5]) {
          %y: f32[2,5,1,1] = Transpose(%x) {perm=[0, 3, 1, 2]}
          return %y
        }""",
        """
        graph g(%x: f32[2,1,1,5]) {
          %y: f32[2,5,1,1] = Reshape(%x) {shape=[2, 5, 1, 1]}
          return %y
        }""",
    )


def test_a_transpose_left_below_an_upsampling_resize_goes_back_above_it(random_feeds):
    """At the graph output a channels-last upsampling would leave its transpose on the large map
    (DeepLab's 14x14 -> 224x224): the transpose moves the small one instead, the Resize runs NCHW."""
    graph = parse_graph("""
        graph g(%x: f32[1,2,3,3]) {
          param %w: f32[2,2,1,1] = [1.0, -1.0, 0.5, 2.0]
          %c: f32[1,2,3,3] = Conv(%x, %w) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1}
          %y: f32[1,2,12,9] = Resize(%c) {sizes=[1, 2, 12, 9], scales=[1.0, 1.0, 4.0, 3.0], mode="linear", coordinate_transformation_mode="half_pixel"}
          return %y
        }""")
    converted = run_passes(graph.copy(), ["to_nhwc", "sink_transposes"])
    *_, conv, back, resize = converted.nodes
    assert (conv.op.name, conv.attrs["layout"], back.op.name, resize.op.name) == ("Conv", "NHWC", "Transpose", "Resize")
    assert resize.inputs[0] is back.outputs[0] and resize.attrs["sizes"] == [1, 2, 12, 9] and resize.attrs["scales"] == [1.0, 1.0, 4.0, 3.0]
    downsampled = run_passes(parse_graph(str(graph).replace("12,9", "2,2").replace("12, 9", "2, 2").replace("4.0, 3.0", "0.75, 0.75")), ["to_nhwc", "sink_transposes"])
    assert downsampled.nodes[-1].op.name == "Transpose"  # a shrinking Resize keeps the transpose after it
    feeds = random_feeds(graph)
    want = kiln.compile(graph).run(feeds)["y"]
    np.testing.assert_allclose(kiln.compile(graph, target="llvm", layout="nhwc").run(feeds)["y"], want, rtol=1e-5, atol=1e-6)


def _nhwc(graph):
    return kiln.optimize(graph, "O2", layout="nhwc")


def _all_nodes(graph) -> list:
    """The graph's nodes and those inside its Fused groups."""
    return list(graph.nodes) + [b for n in graph.nodes if n.op.name == "Fused" for b in n.attrs["body"].nodes]


def _transposes(graph) -> int:
    return sum(n.op.name == "Transpose" for n in _all_nodes(graph))


def _with_params(text: str, **arrays):
    """``text`` parsed, each ``dense<NAME>`` the array given as NAME."""
    for name, array in arrays.items():
        text = text.replace(f"dense<{name}>", f"dense<sha256:{array_digest(array)}>")
    return parse_graph(text, params=arrays)


@pytest.mark.parametrize(
    "name,transposes",
    # the input's transpose (none for LeNet's one channel: a reshape), the output's for the
    # segmentation nets, and deeplab's image-pooling branch meeting the concat
    [("resnet18", 1), ("resnet50", 1), ("lenet5", 0), ("fcn", 2), ("unet", 2), ("deeplabv3", 3)],
)
def test_converted_zoo_models_keep_transposes_only_at_the_boundary(name, transposes):
    entry = ZOO[name]
    model = build(name, **entry.small_kwargs)
    x = np.random.default_rng(0).normal(size=entry.small_shape).astype(np.float32)
    graph = kiln.trace(model, [x], input_names=["input"])
    converted = _nhwc(graph)
    assert _transposes(converted) == transposes, converted
    convs = [n for n in converted.nodes if n.op.name == "Conv"] + [
        b for n in converted.nodes if n.op.name == "Fused" for b in n.attrs["body"].nodes if b.op.name == "Conv"
    ]
    assert convs and all(c.attrs["layout"] == "NHWC" for c in convs)
    want = model(kiln.Tensor(x)).numpy()
    for target in ("eager", "llvm"):
        got = kiln.compile(graph, target=target, pipeline="O2", layout="nhwc").run({"input": x})["output"]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{name} on {target}")


SINKS = {
    "concat_resize_pad": """
        graph g(%x: f32[1,2,4,4], %s: f32[1,2,4,4]) {
          param %w: f32[2,2,1,1] = [1.0, -1.0, 0.5, 2.0]
          %c: f32[1,2,4,4] = Conv(%x, %w) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1}
          %k: f32[1,4,4,4] = Concat(%c, %s) {axis=1}
          %r: f32[1,4,8,6] = Resize(%k) {sizes=[1, 4, 8, 6], scales=[1.0, 1.0, 2.0, 1.5], mode="linear", coordinate_transformation_mode="half_pixel"}
          %p: f32[1,4,9,8] = Pad(%r) {pads=[0, 0, 1, 1, 0, 0, 0, 1]}
          %l: f32[1,4,5,8] = Slice(%p) {starts=[1], ends=[6], axes=[2]}
          %m: f32[1,4,5,8] = Softmax(%l) {axis=1}
          %y: f32[1,2,5,8] = Conv(%m, %w2) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1}
          return %y
        }""",
    "global_pool_and_reduce": """
        graph g(%x: f32[2,3,4,4]) {
          param %w: f32[3,3,3,3] = dense<sha256:0>
          %c: f32[2,3,2,2] = Conv(%x, %w) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1}
          %m: f32[2,3,1,1] = ReduceMax(%c) {axes=[2, 3], keepdims=1}
          %g: f32[2,3,1,1] = GlobalAveragePool(%c)
          %y: f32[2,3,1,1] = Sub(%g, %m)
          return %y
        }""",
    "pools": """
        graph g(%x: f32[1,3,7,7]) {
          %a: f32[1,3,4,4] = MaxPool(%x) {kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], ceil_mode=0}
          %b: f32[1,3,4,4] = AveragePool(%a) {kernel_shape=[2, 2], strides=[1, 1], pads=[1, 1, 0, 0], count_include_pad=1}
          return %b
        }""",
}


@pytest.mark.parametrize("name", sorted(SINKS))
def test_sinking_keeps_outputs(name, random_feeds):
    text = SINKS[name]
    rng = np.random.default_rng(4)
    if "%w2" in text:
        text = text.replace("{\n", "{\n          param %w2: f32[2,4,1,1] = [" + ", ".join(str(v) for v in rng.normal(size=8).round(3)) + "]\n", 1)
    if "dense<sha256:0>" in text:
        text = text.replace("dense<sha256:0>", "[" + ", ".join(str(v) for v in rng.normal(size=81).round(3)) + "]")
    graph = parse_graph(text)
    converted = run_passes(graph.copy(), pipeline("O2", layout="nhwc"))
    for node in converted.nodes:  # what transposes remain sit at the graph's boundary
        if node.op.name == "Transpose":
            assert node.inputs[0] in converted.inputs or node.outputs[0] in converted.outputs, converted
    feeds = random_feeds(graph)
    want = kiln.compile(graph).run(feeds)
    for target in ("eager", "llvm"):
        got = kiln.compile(converted, target=target, pipeline="O0").run(feeds)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=f"{name} on {target}")


def test_layout_choices_are_checked():
    assert "to_nhwc" in pipeline("O2", layout="nhwc") and "to_nhwc" not in pipeline("O2")
    with pytest.raises(KilnError, match="part of -O2"):
        pipeline("O1", layout="nhwc")
    with pytest.raises(KilnError, match="unknown layout"):
        pipeline("O2", layout="nchwc")


def test_a_channels_last_graph_cannot_be_exported():
    from kiln.frontend.onnx.export import graph_to_onnx

    with pytest.raises(KilnError, match="channels-last"):
        graph_to_onnx(run_passes(parse_graph(BEFORE), ["to_nhwc"]))


@pytest.mark.parametrize("name", ["light_vgg19", "light_densenet121", "light_squeezenet"])
def test_light_nets_keep_only_the_input_transpose(name, light_model):
    # vgg19: the flatten before its classifier is folded into the FC weights; densenet121: the
    # BatchNorms after its concats become channels-last affine ops
    converted = kiln.optimize(str(light_model(name)), "O2", layout="nhwc")
    transposes = [n for n in converted.nodes if n.op.name == "Transpose"]
    assert len(transposes) == 1 and transposes[0].inputs[0] in converted.inputs


def test_auto_converts_only_graphs_whose_conv_work_is_wide():
    lenet = kiln.trace(build("lenet5"), [np.zeros((1, 1, 32, 32), np.float32)])  # 6 and 16 channels
    resnet = kiln.trace(build("resnet18", width=16, num_classes=10), [np.zeros((1, 3, 32, 32), np.float32)])
    assert all(n.attrs.get("layout") != "NHWC" for n in kiln.optimize(lenet, "O2", layout="auto").nodes)
    converted = kiln.optimize(resnet, "O2", layout="auto")
    assert any(b.attrs.get("layout") == "NHWC" for n in converted.nodes if n.op.name == "Fused" for b in n.attrs["body"].nodes)
    # compile's auto is the target's choice: llvm uses the rule, eager keeps NCHW
    assert kiln.compile(resnet, target="llvm").graph.op_histogram().get("Transpose") == 1
    assert "Transpose" not in kiln.compile(resnet, target="eager", pipeline="O2").graph.op_histogram()


def test_auto_keeps_channels_first_where_convs_that_stay_so_do_the_work():
    """A float16 grouped conv has no channels-last kernel: converting the rest would put it
    between transposes, so auto leaves a graph whose work it does NCHW. MobileNetV2's depthwise
    convs convert, so its graph goes channels-last whole."""
    rng = np.random.default_rng(2)
    grouped = _with_params(
        """
        graph g(%x: f16[1,32,16,16]) {
          param %w: f16[32,8,3,3] = dense<w>
          param %v: f16[32,32,1,1] = dense<v>
          %c: f16[1,32,16,16] = Conv(%x, %w) {strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=4}
          %y: f16[1,32,16,16] = Conv(%c, %v) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1}
          return %y
        }""",
        w=rng.normal(size=(32, 8, 3, 3)).astype(np.float16),
        v=rng.normal(size=(32, 32, 1, 1)).astype(np.float16),
    )
    kept = kiln.optimize(grouped, "O2", layout="auto")
    assert all(n.attrs.get("layout", "NCHW") == "NCHW" for n in _all_nodes(kept))
    mobilenet = kiln.trace(build("mobilenet_v2", width=0.5), [np.zeros((1, 3, 64, 64), np.float32)])
    converted = kiln.optimize(mobilenet, "O2", layout="auto")
    convs = [n for n in _all_nodes(converted) if n.op.name == "Conv"]
    assert convs and all(c.attrs["layout"] == "NHWC" for c in convs)
    assert [n.op.name for n in converted.nodes].count("Transpose") == 1


def test_shufflenet_goes_channels_last_with_its_shuffles_as_transposes_within_each_pixel(light_model):
    """ShuffleNet's grouped 1x1 convs (4 groups) convert, and the layout transposes sink
    through its channel shuffles (Reshape, Transpose, Reshape): each shuffle keeps one
    transpose, of the (groups, channels a group) axes within each pixel."""
    shufflenet = kiln.optimize(str(light_model("light_shufflenet")), "O2", layout="auto")
    convs = [n for n in _all_nodes(shufflenet) if n.op.name == "Conv"]
    assert convs and all(c.attrs["layout"] == "NHWC" for c in convs) and any(c.attrs["group"] == 4 for c in convs)
    transposes = [n for n in shufflenet.nodes if n.op.name == "Transpose"]
    inside = [n for n in transposes if n.inputs[0] not in shufflenet.inputs]
    assert len(transposes) - len(inside) == 1 and len(inside) == 16
    for node in inside:  # (1, H, W, 4, C/4) -> (1, H, W, C/4, 4)
        shape = node.inputs[0].type.shape
        assert [shape[a] for a in node.attrs["perm"]][-2:] == [shape[-1], 4]


def test_transposes_sink_through_a_channel_shuffle_and_a_patch_flatten(random_feeds):
    """A shuffle (split the channels, swap the parts, merge) keeps a transpose within each
    pixel; a flatten of the positions followed by the transpose to (positions, channels), as
    ViT's patch embedding, keeps none."""
    rng = np.random.default_rng(5)
    graph = _with_params(
        """
        graph g(%x: f32[1,8,4,4]) {
          param %w: f32[8,8,1,1] = dense<w>
          param %v: f32[8,4,3,3] = dense<v>
          %c: f32[1,8,4,4] = Conv(%x, %w) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1}
          %s: f32[1,2,4,4,4] = Reshape(%c) {shape=[1, 2, 4, 4, 4]}
          %t: f32[1,4,2,4,4] = Transpose(%s) {perm=[0, 2, 1, 3, 4]}
          %m: f32[1,8,4,4] = Reshape(%t) {shape=[1, 8, 4, 4]}
          %d: f32[1,8,4,4] = Conv(%m, %v) {strides=[1, 1], pads=[1, 1, 1, 1], dilations=[1, 1], group=2}
          %f: f32[1,8,16] = Reshape(%d) {shape=[1, 8, 16]}
          %y: f32[1,16,8] = Transpose(%f) {perm=[0, 2, 1]}
          return %y
        }""",
        w=rng.normal(size=(8, 8, 1, 1)).astype(np.float32),
        v=rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
    )
    converted = run_passes(graph.copy(), pipeline("O2", layout="nhwc"))
    transposes = [n for n in converted.nodes if n.op.name == "Transpose"]
    assert len(transposes) == 2 and transposes[0].inputs[0] in converted.inputs, converted
    shape = transposes[1].inputs[0].type.shape
    assert [shape[a] for a in transposes[1].attrs["perm"]][-2:] == [4, 2]  # the shuffle, within each pixel
    feeds = random_feeds(graph)
    want = kiln.compile(graph).run(feeds)["y"]
    for target in ("eager", "llvm"):
        got = kiln.compile(converted, target=target, pipeline="O0").run(feeds)["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=target)


def test_channels_last_integer_convs_count_as_wide_work():
    """integer_products leaves a QDQ model's convs channels-last already: to_nhwc_if_wide must still
    convert the pools between them (a MaxPool left NCHW costs two transposes)."""
    from kiln.passes.layout import mostly_wide

    graph = parse_graph(
        """
        graph g(%x: u8[1,8,8,32]) {
          param %w: i8[1,1,32,32] = dense<sha256:fdafb67e020cf2c5607f6498ce4960cfb06c16aaca33d4b8c37a3d2e0a21fb97>
          %y: i32[1,8,8,32] = ConvInteger(%x, %w) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1, layout="NHWC"}
          %t: i32[1,32,8,8] = Transpose(%y) {perm=[0, 3, 1, 2]}
          %f: f32[1,32,8,8] = Cast(%t) {to="f32"}
          %p: f32[1,32,4,4] = MaxPool(%f) {kernel_shape=[2, 2], strides=[2, 2]}
          return %p
        }""",
        params={"w": np.ones((1, 1, 32, 32), np.int8)},
    )
    assert mostly_wide(graph)
    converted = run_passes(graph, ["to_nhwc_if_wide", "sink_transposes", "fold_transpose_chains", "remove_noops", "eliminate_dead_code"])
    assert [n.op.name for n in converted.nodes] == ["ConvInteger", "Cast", "MaxPool", "Transpose"]


def test_transposes_sink_through_a_run_time_scale_and_dynamic_quantization(rewrites):
    """What onnxruntime's quantize_dynamic writes after a conv: a Mul by the product of two
    scales, one of them computed at run time, then the next DynamicQuantizeLinear (whose range
    is over every element, so it quantizes the channels-last data the same)."""
    rewrites(
        ["to_nhwc", "sink_transposes"],
        """
        graph g(%x: f32[1,2,3,3], %s: f32[]) {
          param %w: f32[2,2,1,1] = [1.0, -1.0, 0.5, 2.0]
          %c: f32[1,2,3,3] = Conv(%x, %w) {strides=[1, 1], pads=[0, 0, 0, 0], dilations=[1, 1], group=1}
          %m: f32[1,2,3,3] = Mul(%c, %s)
          %q: u8[1,2,3,3], %qs: f32[], %qz: u8[] = DynamicQuantizeLinear(%m)
          return %q, %qs, %qz
        }""",
        f"""
        graph g(%x: f32[1,2,3,3], %s: f32[]) {{
          param %wt: f32[1,1,2,2] = [1.0, 0.5, -1.0, 2.0]
          %t: f32[1,3,3,2] = Transpose(%x) {{perm=[0, 2, 3, 1]}}
          %c: f32[1,3,3,2] = Conv(%t, %wt) {CONV_NHWC}
          %m: f32[1,3,3,2] = Mul(%c, %s)
          %bytes: u8[1,3,3,2], %qs: f32[], %qz: u8[] = DynamicQuantizeLinear(%m)
          %q: u8[1,2,3,3] = Transpose(%bytes) {{perm=[0, 3, 1, 2]}}
          return %q, %qs, %qz
        }}""",
    )
