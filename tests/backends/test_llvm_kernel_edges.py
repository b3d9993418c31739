"""llvm kernels against eager on the cases the conformance suite leaves out: top-k with NaN,
ties and unsigned keys; scatters with repeated and negative indices; MaxPool's indices in
both layouts and integer types; integer reductions; convs with few positions per image."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.ir import parse_graph


def _both(text: str, feeds: dict) -> tuple[dict, dict]:
    graph = parse_graph(text)
    return kiln.compile(graph).run(feeds), kiln.compile(graph, target="llvm").run(feeds)


@pytest.mark.parametrize("largest", [0, 1])
@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_sorts_ties_stably_and_nan_last(largest, k):
    rng = np.random.default_rng(k)
    x = rng.integers(0, 6, (7, 40, 3)).astype(np.float32)  # many ties
    x[0, 3, 0] = x[2, 0, 1] = x[5, 39, 2] = np.nan
    text = f"""graph g(%x: f32[7,40,3]) {{
  %v: f32[7,{k},3], %i: i64[7,{k},3] = TopK(%x) {{k={k}, axis=1, largest={largest}}}
  return %v, %i
}}"""
    want, got = _both(text, {"x": x})
    np.testing.assert_array_equal(got["i"], want["i"])
    np.testing.assert_array_equal(got["v"], want["v"])  # NaN in the same places


def test_top_k_of_unsigned_keys_compares_without_sign():
    x = np.array([[1, 2**63 + 5, 7, 2**64 - 1, 0]], dtype=np.uint64)
    text = "graph g(%x: u64[1,5]) {\n  %v: u64[1,3], %i: i64[1,3] = TopK(%x) {k=3}\n  return %v, %i\n}"
    want, got = _both(text, {"x": x})
    np.testing.assert_array_equal(got["v"], [[2**64 - 1, 2**63 + 5, 7]])
    np.testing.assert_array_equal(got["i"], want["i"])


@pytest.mark.parametrize("reduction", ["none", "add", "mul", "max", "min"])
def test_scatter_elements_folds_duplicates_in_order(reduction):
    rng = np.random.default_rng(3)
    data = rng.standard_normal((4, 6)).astype(np.float32)
    idx = rng.integers(-6, 6, (4, 9)).astype(np.int64)  # negative and repeated along axis 1
    upd = rng.standard_normal((4, 9)).astype(np.float32)
    text = f"""graph g(%d: f32[4,6], %i: i64[4,9], %u: f32[4,9]) {{
  %y: f32[4,6] = ScatterElements(%d, %i, %u) {{axis=1, reduction="{reduction}"}}
  return %y
}}"""
    want, got = _both(text, {"d": data, "i": idx, "u": upd})
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-6)


def test_gather_nd_with_batch_dims_reads_per_batch_row():
    rng = np.random.default_rng(4)
    data = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    idx = np.stack([rng.integers(-5, 5, (2, 6)), rng.integers(0, 4, (2, 6))], axis=-1).astype(np.int64)
    text = """graph g(%d: f32[2,5,4,3], %i: i64[2,6,2]) {
  %y: f32[2,6,3] = GatherND(%d, %i) {batch_dims=1}
  return %y
}"""
    want, got = _both(text, {"d": data, "i": idx})
    np.testing.assert_array_equal(got["y"], want["y"])


@pytest.mark.parametrize("batch_axis, time_axis, shape", [(0, 1, (3, 5, 2)), (1, 0, (5, 3, 2)), (2, 0, (5, 2, 3))])
def test_reverse_sequence_reverses_each_rows_prefix(batch_axis, time_axis, shape):
    x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    lens = np.array([5, 0, 3], dtype=np.int64)  # whole, none, part
    dims = ",".join(map(str, shape))
    text = f"""graph g(%x: f32[{dims}], %l: i64[3]) {{
  %y: f32[{dims}] = ReverseSequence(%x, %l) {{batch_axis={batch_axis}, time_axis={time_axis}}}
  return %y
}}"""
    want, got = _both(text, {"x": x, "l": lens})
    np.testing.assert_array_equal(got["y"], want["y"])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("storage_order", [0, 1])
@pytest.mark.parametrize("dtype", ["f32", "u8", "i8"])
def test_max_pool_indices_point_at_the_first_max_in_channels_first_order(layout, storage_order, dtype):
    """Ties (small integers) must pick the first max; NHWC graphs still report NCHW indices."""
    rng = np.random.default_rng(5)
    numpy_dtype = {"f32": np.float32, "u8": np.uint8, "i8": np.int8}[dtype]
    x = rng.integers(0, 4, (2, 16, 9, 7)).astype(numpy_dtype)
    text = f"""graph g(%x: {dtype}[2,16,9,7]) {{
  %y: {dtype}[2,16,5,4], %i: i64[2,16,5,4] = MaxPool(%x) {{kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], storage_order={storage_order}}}
  return %y, %i
}}"""
    graph = parse_graph(text)
    want = kiln.compile(graph).run({"x": x})
    got = kiln.compile(graph, target="llvm", layout=layout).run({"x": x})
    np.testing.assert_array_equal(got["y"], want["y"])
    np.testing.assert_array_equal(got["i"], want["i"])


@pytest.mark.parametrize("op", ["ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd"])
@pytest.mark.parametrize("dtype", ["i32", "u8", "i64"])
def test_integer_reductions_start_from_the_types_limits(op, dtype):
    numpy_dtype = {"i32": np.int32, "u8": np.uint8, "i64": np.int64}[dtype]
    x = np.random.default_rng(6).integers(0, 5, (3, 4, 6)).astype(numpy_dtype)
    for axes, out in (([1], "3,1,6"), ([2], "3,4,1")):  # the row-accumulator path and the plain one
        text = f"graph g(%x: {dtype}[3,4,6]) {{\n  %y: {dtype}[{out}] = {op}(%x) {{axes={axes}}}\n  return %y\n}}"
        want, got = _both(text, {"x": x})
        np.testing.assert_array_equal(got["y"], want["y"])


@pytest.mark.parametrize(
    "equation, shapes",
    [
        ("...ij,...jk->...ik", [(2, 1, 3, 4), (5, 4, 2)]),  # broadcast batch dims
        ("ii->i", [(4, 4)]),
        ("bii,bj->bij", [(3, 4, 4), (3, 2)]),
        ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 5)]),
        ("i,i->", [(7,), (7,)]),
    ],
)
def test_einsum_sums_over_the_labels_left_out(equation, shapes):
    rng = np.random.default_rng(7)
    feeds = {f"x{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    out = np.einsum(equation, *feeds.values()).shape
    args = ", ".join(f"%x{i}: f32[{','.join(map(str, s))}]" for i, s in enumerate(shapes))
    text = f"""graph g({args}) {{
  %y: f32[{','.join(map(str, out))}] = Einsum({', '.join(f'%x{i}' for i in range(len(shapes)))}) {{equation="{equation}"}}
  return %y
}}"""
    want, got = _both(text, feeds)
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-5)


def test_det_pivots_and_gives_zero_for_singular_matrices():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((4, 5, 5))
    x[1, :, 2] = 0  # a zero column: singular
    x[2, 0, 0] = 0  # a zero first pivot: a row swap is needed
    x[3, 4] = x[3, 1] * 2  # dependent rows
    text = "graph g(%x: f64[4,5,5]) {\n  %y: f64[4] = Det(%x)\n  return %y\n}"
    want, got = _both(text, {"x": x})
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-9, atol=1e-9)
    assert got["y"][1] == 0


def test_col2im_adds_overlapping_blocks():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((2, 2 * 3 * 2, 20)).astype(np.float32)  # C=2, block 3x2, 5x4 blocks
    text = """graph g(%x: f32[2,12,20]) {
  %y: f32[2,2,6,5] = Col2Im(%x) {image_shape=[6, 5], block_shape=[3, 2], strides=[1, 1], dilations=[1, 2], pads=[0, 1, 1, 0]}
  return %y
}"""
    want, got = _both(text, {"x": x})
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-6)


def test_max_unpool_pads_a_larger_output_and_drops_bad_indices():
    rng = np.random.default_rng(10)
    x = rng.standard_normal((1, 2, 2, 2)).astype(np.float32)
    idx = np.array([[[[0, 3], [10, 15]], [[16, 21], [26, 99]]]], dtype=np.int64)  # 99: outside
    text = """graph g(%x: f32[1,2,2,2], %i: i64[1,2,2,2]) {
  %y: f32[1,2,5,6] = MaxUnpool(%x, %i) {output_shape=[1, 2, 5, 6], unpooled_shape=[4, 4]}
  return %y
}"""
    want, got = _both(text, {"x": x, "i": np.minimum(idx, 31)})
    np.testing.assert_array_equal(got["y"], want["y"])
    graph = parse_graph(text)
    dropped = kiln.compile(graph, target="llvm").run({"x": x, "i": idx})["y"]
    assert np.count_nonzero(dropped) == 7


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_reads_inside_and_far_outside_the_image(mode, padding, align):
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    grid = rng.uniform(-2.5, 2.5, (2, 6, 7, 2)).astype(np.float32)  # well past the borders
    text = f"""graph g(%x: f32[2,3,5,4], %g: f32[2,6,7,2]) {{
  %y: f32[2,3,6,7] = GridSample(%x, %g) {{mode="{mode}", padding_mode="{padding}", align_corners={align}}}
  return %y
}}"""
    want, got = _both(text, {"x": x, "g": grid})
    np.testing.assert_allclose(got["y"], want["y"], rtol=1e-5, atol=1e-5)


def _nchw_llvm_matches_eager(graph, threads: int, seed: int, atol: float | None = None) -> None:
    """The graph on llvm (NCHW, ``threads`` threads, bounds checked) against eager."""
    from kiln import config

    rng = np.random.default_rng(seed)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(v.type.dtype.numpy) for v in graph.inputs}
    want = kiln.compile(graph).run(feeds)["y"]
    with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
        got = kiln.compile(graph, target="llvm", layout="nchw").run(feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=atol if atol is not None else 1e-4 * np.abs(want).max())


def _takes_path(path: str, node) -> bool:
    """Whether the llvm target's NCHW conv (or ConvTranspose) ``node`` takes kernel path ``path``."""
    from kiln.backends.llvm import kernels_conv_batched, kernels_conv_taps, kernels_conv_transpose, kernels_nn

    if path == "dot":  # few outputs, each a long sum: dot products read in place
        return kernels_nn._dot_shaped(node)
    if path == "batched":  # few positions per image: a chunk of images' columns in one GEMM
        if node.op.name == "ConvTranspose":
            return kernels_conv_transpose._batched(node)
        return kernels_conv_batched.applies(node) and not kernels_conv_taps.applies(node) and not kernels_nn._dot_shaped(node)
    if path == "taps":  # a padded weight gradient: dot products per tap
        return kernels_conv_taps.applies(node)
    if path == "banded":  # large columns: a band of output rows at a time
        return kernels_nn._banded(node) and kernels_nn._band_rows(node) < node.outputs[0].type.shape[2]
    if path == "groups":  # (image, group) items over the threads, each group's GEMM on one
        return kernels_nn._group_items(node) and not kernels_nn._banded(node) and not kernels_conv_batched.applies(node)
    raise ValueError(path)


NCHW_PATHS = [
    # LeNet-5's first weight gradient: 6 x 25 outputs, each over 64 * 28 * 28 products
    ("dot", "graph g(%x: f32[1,64,32,32], %w: f32[6,64,28,28]) {\n %y: f32[1,6,5,5] = Conv(%x, %w) {}\n return %y\n}"),
    # strides, a dilated leading axis, a bias, window rows of 10 (a masked tail)
    ("dot", "graph g(%x: f32[2,40,19,18], %w: f32[5,40,9,10], %b: f32[5]) {\n %y: f32[2,5,1,3] = Conv(%x, %w, %b) {strides=[3, 4], dilations=[2, 1]}\n return %y\n}"),
    ("dot", "graph g(%x: f64[3,70,12], %w: f64[7,70,9]) {\n %y: f64[3,7,4] = Conv(%x, %w) {}\n return %y\n}"),
    # a ResNet's last stage at 64 pixels: 2x2 positions per image, 9.4 MB of weights
    ("batched", "graph g(%x: f32[8,512,2,2], %w: f32[512,512,3,3]) {\n %y: f32[8,512,2,2] = Conv(%x, %w) {pads=[1, 1, 1, 1]}\n return %y\n}"),
    # an unpadded weight gradient of short sums: 64 channel "images" of 3x3 "positions"
    # (chunks of 14, a tail of 8)
    ("batched", "graph g(%x: f32[64,2,18,18], %w: f32[64,2,16,16]) {\n %y: f32[64,64,3,3] = Conv(%x, %w) {}\n return %y\n}"),
    # strides and a bias; a 1x1 conv; 1-D with dilation; 3-D
    ("batched", "graph g(%x: f32[9,16,7,7], %w: f32[24,16,3,3], %b: f32[24]) {\n %y: f32[9,24,4,4] = Conv(%x, %w, %b) {strides=[2, 2], pads=[1, 1, 1, 1]}\n return %y\n}"),
    ("batched", "graph g(%x: f32[100,16,2,2], %w: f32[8,16,1,1], %b: f32[8]) {\n %y: f32[100,8,2,2] = Conv(%x, %w, %b) {}\n return %y\n}"),
    ("batched", "graph g(%x: f32[5,3,6], %w: f32[7,3,3]) {\n %y: f32[5,7,4] = Conv(%x, %w) {pads=[1, 1], dilations=[2]}\n return %y\n}"),
    ("batched", "graph g(%x: f32[3,4,3,4,5], %w: f32[6,4,2,2,2]) {\n %y: f32[3,6,2,4,5] = Conv(%x, %w) {pads=[0, 0, 0, 0, 1, 1]}\n return %y\n}"),
    # windows wider than the output rows, copied a row per position: 10 taps (a masked
    # vector) over pads, a row stride and a dilated leading axis
    ("batched", "graph g(%x: f32[20,3,11,13], %w: f32[5,3,4,10], %b: f32[5]) {\n %y: f32[20,5,4,8] = Conv(%x, %w, %b) {strides=[2, 1], pads=[1, 2, 1, 2], dilations=[2, 1]}\n return %y\n}"),
    # a ResNet's last-stage input gradients at 64 pixels, stride 1 and 2 (output padding)
    ("batched", "graph g(%x: f32[8,512,2,2], %w: f32[512,512,3,3]) {\n %y: f32[8,512,2,2] = ConvTranspose(%x, %w) {pads=[1, 1, 1, 1]}\n return %y\n}"),
    ("batched", "graph g(%x: f32[8,512,2,2], %w: f32[512,256,3,3], %b: f32[256]) {\n %y: f32[8,256,4,4] = ConvTranspose(%x, %w, %b) {strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1]}\n return %y\n}"),
    # uneven strides, pads and taps; a chunk and a tail of images
    ("batched", "graph g(%x: f32[37,6,3,5], %w: f32[6,4,3,2], %b: f32[4]) {\n %y: f32[37,4,7,5] = ConvTranspose(%x, %w, %b) {strides=[2, 1], pads=[0, 1, 1, 0], output_padding=[1, 0]}\n return %y\n}"),
    # a ResNet's layer-1 weight gradient at 64 pixels, batch 8: 64 images, 64 kernels
    ("taps", "graph g(%x: f32[64,8,16,16], %w: f32[64,8,16,16]) {\n %y: f32[64,64,3,3] = Conv(%x, %w) {pads=[1, 1, 1, 1]}\n return %y\n}"),
    # a U-Net's weight gradient at 64 pixels: 32 channel "images", 16 kernels, 3x3 taps
    ("taps", "graph g(%x: f32[32,4,64,64], %w: f32[16,4,64,64]) {\n %y: f32[32,16,3,3] = Conv(%x, %w) {pads=[1, 1, 1, 1]}\n return %y\n}"),
    # tiles left over (6 images, 7 kernels), a bias, uneven pads, a row stride and dilation,
    # kernel rows of 20 (a masked tail vector)
    ("taps", "graph g(%x: f32[6,6,30,20], %w: f32[7,6,11,20], %b: f32[7]) {\n %y: f32[6,7,6,4] = Conv(%x, %w, %b) {strides=[2, 1], dilations=[2, 1], pads=[2, 3, 0, 0]}\n return %y\n}"),
    # a column stride; float64
    ("taps", "graph g(%x: f64[8,2,24,40], %w: f64[4,2,22,16]) {\n %y: f64[8,4,3,4] = Conv(%x, %w) {strides=[1, 8], pads=[0, 1, 0, 0]}\n return %y\n}"),
    # windows wholly in the padding (the first and last three taps): the bias alone
    ("taps", "graph g(%x: f32[4,32,4,16], %w: f32[4,32,2,16], %b: f32[4]) {\n %y: f32[4,4,9,1] = Conv(%x, %w, %b) {pads=[3, 0, 3, 0]}\n return %y\n}"),
    # a U-Net's decoder conv at 64 pixels: an output row a band
    ("banded", "graph g(%x: f32[4,32,64,64], %w: f32[16,32,3,3]) {\n %y: f32[4,16,64,64] = Conv(%x, %w) {pads=[1, 1, 1, 1]}\n return %y\n}"),
    # two groups, a bias, a row stride, a dilated width, 23 output rows in bands of 2
    ("banded", "graph g(%x: f32[3,32,45,40], %w: f32[6,16,3,3], %b: f32[6]) {\n %y: f32[3,6,23,40] = Conv(%x, %w, %b) {group=2, strides=[2, 1], dilations=[1, 2], pads=[1, 2, 1, 2]}\n return %y\n}"),
    # ResNeXt-50's layer-2 grouped conv: 32 groups of 8 channels, a bias
    ("groups", "graph g(%x: f32[1,256,28,28], %w: f32[256,8,3,3], %b: f32[256]) {\n %y: f32[1,256,28,28] = Conv(%x, %w, %b) {group=32, pads=[1, 1, 1, 1]}\n return %y\n}"),
    # two images, 8 groups of 8 inputs to 6 outputs, a stride
    ("groups", "graph g(%x: f32[2,64,15,15], %w: f32[48,8,3,3]) {\n %y: f32[2,48,8,8] = Conv(%x, %w) {group=8, strides=[2, 2], pads=[1, 1, 1, 1]}\n return %y\n}"),
    # one image: its bands over the threads
    ("banded", "graph g(%x: f32[1,16,40,40], %w: f32[8,16,3,3]) {\n %y: f32[1,8,40,40] = Conv(%x, %w) {pads=[1, 1, 1, 1]}\n return %y\n}"),
]


@pytest.mark.parametrize("path, text", NCHW_PATHS)
@pytest.mark.parametrize("threads", [1, 2])
def test_nchw_conv_paths_match_eager(path, text, threads):
    """Each NCHW conv path of the llvm target on its cases, one thread and two, bounds checked
    (the long dot products' sums regroup: a looser tolerance)."""
    graph = parse_graph(text)
    assert _takes_path(path, graph.nodes[0])
    _nchw_llvm_matches_eager(graph, threads, 5, atol=1e-3 if path in ("dot", "taps") else None)


@pytest.mark.parametrize("images", [3, 4, 8])
def test_nchw_convs_split_their_images_over_threads_when_they_share_out_evenly(images):
    """8 or 4 images over 2 threads: each thread makes its own columns and runs its own GEMMs;
    3 would leave one thread idle a third of the time, so each image's GEMM splits instead."""
    from kiln import config
    from kiln.backends.llvm.kernels_nn import _image_threads

    graph = parse_graph(f"graph g(%x: f32[{images},16,12,12], %w: f32[24,16,3,3]) {{\n %y: f32[{images},24,12,12] = Conv(%x, %w) {{pads=[1, 1, 1, 1]}}\n return %y\n}}")
    rng = np.random.default_rng(images)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    want = kiln.compile(graph).run(feeds)["y"]
    with config.override(num_threads=2, cache_dir="off", check_bounds=True):
        assert _image_threads(graph.nodes[0]) == (1 if images == 3 else 2)
        got = kiln.compile(graph, target="llvm", layout="nchw").run(feeds)["y"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
def test_elementwise_groups_ending_in_a_sum_are_summed_as_computed(threads):
    """BatchNorm's training statistics: (x - mean)^2 averaged per channel while x - mean is
    written out for a later reader; a lone per-channel ReduceSum and a last-axis ReduceMean."""
    from kiln import config
    from kiln.backends.llvm import kernels_reduce_fused

    graph = parse_graph(
        """graph g(%x: f32[4,16,12,20], %m: f32[1,16,1,1], %d: f32[4,16,12,20]) {
  %c: f32[4,16,12,20] = Sub(%x, %m)
  %s: f32[4,16,12,20] = Mul(%c, %c)
  %v: f32[1,16,1,1] = ReduceMean(%s) {axes=[0, 2, 3], keepdims=1}
  %k: f32[4,16,12,20] = Mul(%c, %d)
  %t: f32[16] = ReduceSum(%d) {axes=[0, 2, 3], keepdims=0}
  %r: f32[4,16,12] = ReduceMean(%x) {axes=[3], keepdims=0}
  return %v, %k, %t, %r
}"""
    )
    rng = np.random.default_rng(3)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    want = kiln.compile(graph).run(feeds)
    with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
        module = kiln.compile(graph, target="llvm")
        got = module.run(feeds)
    fused = [n for n in module.graph.nodes if n.op.name == "Fused" and kernels_reduce_fused.applies(n.attrs["body"])]
    assert fused and len(fused[0].outputs) == 2  # the mean and x - mean, or its product
    assert sum(kernels_reduce_fused.reduces_along_rows(n) for n in module.graph.nodes) == 2
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_float16_sums_round_once_as_numpy_does():
    """numpy sums float16 in float32 and rounds once (matmul's dot products, a row's sum);
    a float16 accumulator would be off by tens of ulps over 600 terms."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 600)).astype(np.float16)
    w = rng.standard_normal((600, 16)).astype(np.float16)
    text = """graph g(%a: f16[8,600], %w: f16[600,16]) {
  %m: f16[8,16] = MatMul(%a, %w)
  %s: f16[8,600] = Softmax(%a) {axis=1}
  %r: f16[8] = ReduceSum(%a) {axes=[1], keepdims=0}
  %q: f16[8] = ReduceSumSquare(%a) {axes=[1], keepdims=0}
  return %m, %s, %r, %q
}"""
    want, got = _both(text, {"a": a, "w": w})
    e = np.exp(a - a.max(axis=1, keepdims=True))  # the ONNX reference's float16 steps
    numpy_float16 = {"m": a @ w, "s": e / e.sum(axis=1, keepdims=True), "r": a.sum(axis=1), "q": np.square(a).sum(axis=1)}
    for name, expected in numpy_float16.items():
        assert got[name].dtype == np.float16
        ulp = np.spacing(np.abs(expected)).astype(np.float32)
        assert np.all(np.abs(got[name].astype(np.float32) - expected.astype(np.float32)) <= ulp), name
        np.testing.assert_allclose(got[name].astype(np.float32), want[name].astype(np.float32), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_softmax_rows_match_eager_with_nan_infinities_and_short_tails(op, dtype):
    """Softmax over contiguous rows (vector max, rows over threads): a NaN anywhere in a row
    makes the row NaN, -inf entries give 0, a row of -inf gives NaN, as numpy; a row length
    that is no multiple of the vector width (the last vector masked); one and two threads."""
    from kiln import config

    graph = parse_graph(
        f"""graph g(%x: {dtype}[300,37]) {{
  %y: {dtype}[300,37] = {op}(%x) {{axis=-1}}
  return %y
}}"""
    )
    x = np.random.default_rng(7).standard_normal((300, 37)).astype(np.float32 if dtype == "f32" else np.float64) * 20
    x[3, 36] = x[4, 0] = np.nan
    x[5, 10:] = -np.inf
    x[6, :] = -np.inf
    x[7, 2] = np.inf
    want = kiln.compile(graph).run({"x": x})["y"]
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            got = kiln.compile(graph, target="llvm").run({"x": x})["y"]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 if dtype == "f32" else 1e-12)  # sums in another order
        assert np.isnan(got[3]).all() and np.isnan(got[4]).all() and np.isnan(got[6]).all()


@pytest.mark.parametrize("stride", [1, 2])
def test_a_one_channel_conv_channels_last_reads_its_weight_unpacked(stride):
    """One channel in and out: depthwise as much as ungrouped, so the depthwise kernel runs,
    and its weight must not be packed into GEMM panels (it was: every output read zeros)."""
    rng = np.random.default_rng(stride)
    text = f"""graph g(%x: f32[2,1,9,9]) {{
  param %w: f32[1,1,3,3] = {rng.standard_normal(9).round(3).tolist()}
  %y: f32[2,1,{(9 + 2 - 3) // stride + 1},{(9 + 2 - 3) // stride + 1}] = Conv(%x, %w) {{strides=[{stride}, {stride}], pads=[1, 1, 1, 1], dilations=[1, 1], group=1}}
  return %y
}}"""
    graph = parse_graph(text)
    x = rng.standard_normal((2, 1, 9, 9)).astype(np.float32)
    want = kiln.compile(graph).run({"x": x})["y"]
    got = kiln.compile(graph, target="llvm", layout="nhwc").run({"x": x})["y"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL2", "ReduceSumSquare", "ReduceProd"])
@pytest.mark.parametrize(
    "shape, axes, threads, chunks",
    [
        ((1, 48, 48, 40), [1, 2], 2, 2),  # a channels-last pool of one image: the threads split the positions
        ((1, 48, 48, 40), [1, 2], 1, 1),
        ((3, 64, 24, 37), [1, 2], 2, 1),  # more images than threads: (image, column block) items, ragged
        ((1, 3000, 20), [1], 2, 2),  # one vector and a ragged part of a second per row
    ],
)
def test_float_reductions_over_middle_axes_split_rows_or_columns(op, shape, axes, threads, chunks):
    """A float reduction over middle axes keeps vectors of columns in registers down the rows;
    with one image the threads take parts of the rows and this thread merges them in order."""
    from kiln import config
    from kiln.backends.llvm.kernels_nn import _column_geometry

    rng = np.random.default_rng(len(shape) + threads)
    x = rng.uniform(0.9, 1.1, shape).astype(np.float32) if op == "ReduceProd" else rng.standard_normal(shape).astype(np.float32)
    dims = ",".join(map(str, shape))
    kept = ",".join(str(1 if i in axes else d) for i, d in enumerate(shape))
    text = f"graph g(%x: f32[{dims}]) {{\n  %y: f32[{kept}] = {op}(%x) {{axes={axes}, keepdims=1}}\n  return %y\n}}"
    graph = parse_graph(text)
    (want,) = kiln.compile(graph).run({"x": x}).values()
    with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
        assert _column_geometry(graph.nodes[0])[3] == chunks
        (got,) = kiln.compile(graph, target="llvm").run({"x": x}).values()
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-5)
