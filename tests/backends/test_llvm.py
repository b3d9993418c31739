"""The llvm target against the eager oracle: kernels, fused groups, artifacts, bad input."""

from __future__ import annotations

import json
import math
import re
import zipfile

import numpy as np
import pytest

import kiln
from kiln.backends.llvm.target import CPU, check_runs_here, host_cpu
from kiln.errors import KilnError
from kiln.ir import parse_graph
from sample_graphs import GRAPHS, build

@pytest.mark.parametrize("name", GRAPHS)
def test_llvm_matches_eager(name):
    graph = build(GRAPHS[name])
    rng = np.random.default_rng(1)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    want = kiln.compile(graph).run(feeds)
    got = kiln.compile(graph, target="llvm").run(feeds)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5)


def test_fused_groups_compile_and_match(light_model):
    module = kiln.compile(light_model("light_squeezenet"), target="llvm")
    assert "Fused" in module.graph.op_histogram()
    (name, t), = module.input_types.items()
    x = np.random.default_rng(0).standard_normal(t.shape).astype(np.float32)
    want = kiln.compile(light_model("light_squeezenet")).run({name: x})
    got = module.run({name: x})
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-6)


def test_artifacts_carry_object_code_and_load_without_compiling(tmp_path, monkeypatch):
    graph = build(GRAPHS["mlp"])
    module = kiln.compile(graph, target="llvm")
    path = tmp_path / "mlp.kiln"
    module.save(path)
    with zipfile.ZipFile(path) as zf:
        assert "code/llvm.o" in zf.namelist()
        layout = json.loads(zf.read("code/llvm.json"))
    assert layout["cpu"]["name"] == host_cpu().name

    import kiln.backends.llvm as llvm_backend

    def no_compiling(*args, **kwargs):
        raise AssertionError("kiln.load compiled again")

    monkeypatch.setattr(llvm_backend, "compile_object", no_compiling)
    loaded = kiln.load(path)
    x = np.random.default_rng(2).standard_normal((5, 16)).astype(np.float32)
    np.testing.assert_array_equal(loaded.run({"x": x})["p"], module.run({"x": x})["p"])


@pytest.mark.parametrize("build_kind", ["plain", "profile", "check_bounds"])
def test_large_modules_compile_in_parts_that_link_into_one_program(tmp_path, monkeypatch, build_kind):
    """Above SPLIT_CHARS of IR, kernels are compiled in a child process while this one compiles
    kiln_main and the rest; the objects link in one engine, save and load as one artifact, and
    profiled and bounds-checked builds keep their counters and guards."""
    import kiln.backends.llvm.split as split
    from kiln import config
    from kiln.models.zoo import build as build_zoo

    monkeypatch.setattr(split, "SPLIT_CHARS", 0)
    model = build_zoo("resnet18", width=8, layers=(1, 1, 1, 1), num_classes=5)
    x = np.random.default_rng(4).standard_normal((2, 3, 32, 32)).astype(np.float32)
    graph = kiln.trace(model, [x], input_names=["input"])
    with config.override(cache_dir="off", num_threads=2, profile=build_kind == "profile", check_bounds=build_kind == "check_bounds"):
        module = kiln.compile(graph, target="llvm")
        got = module.run({"input": x})["output"]
    assert len(module.executable.layout["object_sizes"]) == 2
    np.testing.assert_allclose(got, model(kiln.Tensor(x)).numpy(), rtol=1e-4, atol=1e-5)
    if build_kind == "profile":
        assert sum(t.ms for t in module.executable.profile()) > 0
    module.save(tmp_path / "r.kiln")
    np.testing.assert_array_equal(kiln.load(tmp_path / "r.kiln").run({"input": x})["output"], got)


def test_code_for_missing_cpu_features_is_refused():
    here = host_cpu()
    alien = CPU(here.triple, "future-cpu", here.features + ",+avx1024")
    with pytest.raises(KilnError, match="lacks avx1024: recompile it here"):
        check_runs_here(alien)


def test_ops_without_kernels_are_listed_before_any_codegen(monkeypatch):
    """A user's op with a numpy reference only (no kernel, no decomposition) is named."""
    from kiln.ir import opdef
    from kiln.ir.opdef import OpDef, OpKind, register

    monkeypatch.setattr(opdef, "_REGISTRY", opdef.all_ops())  # a copy: the user's ops leave with this test
    for name in ("UserScale", "UserShift"):
        register(OpDef(name, OpKind.OPAQUE, lambda attrs, types: [types[0]], lambda attrs, x: x * 2))
    graph = parse_graph(
        """
        graph g(%x: f32[3,2,2]) {
          %a: f32[3,2,2] = UserShift(%x)
          %b: f32[3,2,2] = UserScale(%a)
          return %b
        }"""
    )
    with pytest.raises(KilnError, match="no kernels yet for: UserScale, UserShift"):
        kiln.compile(graph, target="llvm")


def test_global_lp_pool_runs_through_its_decomposition():
    graph = parse_graph("graph g(%x: f32[2,3,4,5]) {\n  %y: f32[2,3,1,1] = GlobalLpPool(%x) {p=3}\n  return %y\n}")
    x = np.random.default_rng(0).standard_normal((2, 3, 4, 5)).astype(np.float32)
    np.testing.assert_allclose(kiln.compile(graph, target="llvm").run({"x": x})["y"], kiln.compile(graph).run({"x": x})["y"], rtol=1e-5)


def test_the_compile_cache_hits_and_rebuilds_tampered_entries(tmp_path, monkeypatch):
    import kiln.backends.llvm as llvm_backend
    from kiln import config

    graph = build(GRAPHS["mlp"])
    calls = []
    real = llvm_backend.compile_object

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(llvm_backend, "compile_object", counting)
    with config.override(cache_dir=str(tmp_path / "cache")):
        first = kiln.compile(graph, target="llvm")
        second = kiln.compile(graph, target="llvm")
        assert len(calls) == 1
        folder = tmp_path / "cache"
        assert oct(folder.stat().st_mode & 0o777) == "0o700"
        (obj,) = folder.glob("*.o")
        obj.write_bytes(obj.read_bytes()[:100])  # truncated: must be rebuilt, never run
        with pytest.warns(UserWarning, match="corrupted or foreign"):
            third = kiln.compile(graph, target="llvm")
        assert len(calls) == 2
        x = np.random.default_rng(3).standard_normal((5, 16)).astype(np.float32)
        for module in (second, third):
            np.testing.assert_array_equal(module.run({"x": x})["p"], first.run({"x": x})["p"])
    with config.override(cache_dir="off"):
        kiln.compile(graph, target="llvm")
    assert len(calls) == 3


def _gemm_graph(m: int, k: int, n: int):
    return build(f"""
        graph g(%a: f32[{m},{k}]) {{
          param %b: f32[{k},{n}] = dense
          %c: f32[{m},{n}] = Gemm(%a, %b) {{alpha=1.0, beta=1.0, transA=0, transB=0}}
          return %c
        }}""")


# rows split (many rows; an RNN step's few rows by weights each core keeps), columns split (few
# rows by weights past that), ragged blocks and remainders
@pytest.mark.parametrize("shape", [(96, 200, 160), (61, 64, 300), (14, 1024, 256), (16, 256, 1024), (16, 784, 512), (8, 300, 200)])
def test_threaded_gemm_matches_one_thread(shape):
    from kiln import config
    from kiln.backends.llvm.kernels_nn import PARALLEL_MACS

    m, k, n = shape
    assert m * n * k >= PARALLEL_MACS  # large enough to be split
    rng = np.random.default_rng(5)
    graph = _gemm_graph(m, k, n)
    a = rng.standard_normal((m, k)).astype(np.float32)
    results = {}
    for threads in (1, 2, 3):
        with config.override(num_threads=threads, cache_dir="off"):
            results[threads] = kiln.compile(graph, target="llvm").run({"a": a})["c"]
    np.testing.assert_allclose(results[1], a @ graph.params[graph.param("b")], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(results[2], results[1])  # each row block computes the same sums
    np.testing.assert_array_equal(results[3], results[1])


@pytest.mark.parametrize(
    "m, k, n, packed, split",
    [
        (96, 200, 160, True, "rows"),  # many rows
        (16, 256, 1024, True, "rows"),  # an LSTM step's product by its 1 MB recurrent weights
        (16, 256, 1024, False, "columns"),  # ... by a matrix computed at run time
        (16, 784, 512, True, "columns"),  # weights past what each core keeps (1.6 MB)
        (196, 1024, 512, True, "rows"),  # four micro-tiles a thread, and 2 MB of weights each streams whole
        (197, 768, 3072, True, "columns"),  # ... but not 9.4 MB (ViT's MLP)
        (8, 300, 200, True, "columns"),  # too few rows for a micro-tile per thread
        (4, 16, 16, True, "serial"),
    ],
)
def test_a_gemm_splits_its_rows_where_each_core_keeps_the_weights(m, k, n, packed, split):
    from kiln import config
    from kiln.backends.llvm.kernels_nn import gemm_split, micro_rows
    from kiln.ir.dtypes import DType

    with config.override(num_threads=2):
        assert gemm_split(m, k, n, DType.float32, packed, micro_rows(m)) == split


def test_the_worker_pool_serves_two_python_threads_and_a_fork_child():
    """Kernels hand blocks to one worker pool per process. Two models run from two Python
    threads at once (the GIL is released during a run): one gets the pool, the other runs its
    blocks itself; both are right. A forked child, which has none of the parent's worker
    threads, starts its own."""
    import os
    import threading

    from kiln import config

    with config.override(num_threads=2, cache_dir="off"):
        modules = [kiln.compile(_gemm_graph(16, 256, 1024), target="llvm"), kiln.compile(_gemm_graph(96, 200, 160), target="llvm")]
    rng = np.random.default_rng(7)
    feeds = [rng.standard_normal((16, 256)).astype(np.float32), rng.standard_normal((96, 200)).astype(np.float32)]
    want = [m.run({"a": a})["c"] for m, a in zip(modules, feeds)]
    failures = []

    def hammer(module, a, expected):
        for _ in range(200):
            if not np.array_equal(module.run({"a": a})["c"], expected):
                failures.append(module)
                return

    threads = [threading.Thread(target=hammer, args=args) for args in zip(modules, feeds, want)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads) and not failures
    np.testing.assert_allclose(want[0], feeds[0] @ modules[0].graph.params[modules[0].graph.param("b")], rtol=1e-4, atol=1e-4)

    pid = os.fork()
    if pid == 0:  # the child: exit status 0 only if the threaded GEMM finishes and is right
        ok = np.array_equal(modules[0].run({"a": feeds[0]})["c"], want[0])
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def test_blocks_no_worker_has_claimed_are_run_by_the_caller():
    """Each block is claimed once, by a worker or by the thread that submitted it once its own
    block is done (a worker asleep, or not scheduled: four threads on fewer cores, pauses
    between runs that let the workers sleep). Every run gives the same bits, none hangs, and a
    run wakes the workers first."""
    import time

    from kiln import config
    from kiln.backends.llvm.codegen import generate
    from kiln.backends.llvm.pool import WAKE

    with config.override(num_threads=4, cache_dir="off"):
        module = kiln.compile(_gemm_graph(96, 200, 160), target="llvm")
        assert f'call void @"{WAKE}"()' in str(generate(module.graph)[0])
    a = np.random.default_rng(8).standard_normal((96, 200)).astype(np.float32)
    want = module.run({"a": a})["c"]
    for k in range(300):
        assert np.array_equal(module.run({"a": a})["c"], want), k
        if k % 3 == 0:
            time.sleep(0.002)  # long enough for the workers to go to sleep
    np.testing.assert_allclose(want, a @ module.graph.params[module.graph.param("b")], rtol=1e-4, atol=1e-4)


def test_the_thread_count_is_part_of_the_cache_key():
    from kiln import config
    from kiln.backends.llvm import llvm_cache_key as cache_key

    graph = build(GRAPHS["mlp"])
    with config.override(num_threads=1):
        one = cache_key(graph, host_cpu())
    with config.override(num_threads=2):
        two = cache_key(graph, host_cpu())
    assert one != two
    with config.override(num_threads=-1), pytest.raises(ValueError, match="KILN_NUM_THREADS"):
        config.num_threads()


def test_bounds_checked_build_names_the_kernel_that_overflows(monkeypatch):
    """KILN_CHECK_BOUNDS=1: guard bytes after every output and scratch are checked after each
    kernel; a kernel that writes one element too many is reported by name, not left to corrupt."""
    import llvmlite.ir as ir

    import kiln.backends.llvm.codegen as codegen
    from kiln import config
    from kiln.backends.llvm.emit import const_i64

    graph = build(GRAPHS["mlp"])
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    with config.override(check_bounds=True, cache_dir="off"):
        clean = kiln.compile(graph, target="llvm").run({"x": x})["p"]  # correct kernels pass the check
    np.testing.assert_allclose(clean, kiln.compile(graph).run({"x": x})["p"], rtol=1e-5, atol=1e-6)

    real = codegen.kernel_rule

    class Overflowing:
        """The real kernel, then one more float written just past the output's end."""

        def __init__(self, rule):
            self.rule, self.scratch, self.panels = rule, rule.scratch, rule.panels

        def emit(self, ctx):
            self.rule.emit(ctx)
            out = ctx.outputs[0]
            ctx.b.store(ir.Constant(ir.FloatType(), 1.0), ctx.b.gep(out.ptr, [const_i64(int(np.prod(out.shape)))], source_etype=ir.FloatType()))

    monkeypatch.setattr(codegen, "kernel_rule", lambda node: Overflowing(real(node)) if node.op.name == "Relu" else real(node))
    with config.override(check_bounds=True, cache_dir="off"):
        module = kiln.compile(graph, target="llvm", pipeline="O0")
        with pytest.raises(KilnError, match=r"node 'Relu' \(Relu\) wrote past the end .*KILN_CHECK_BOUNDS"):
            module.run({"x": x})


def _unary(op: str, n: int) -> "kiln.ir.Graph":
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    graph = Graph("unary")
    x = graph.add_input("x", TensorType((n,), DType.float32))
    graph.outputs = [graph.add_node(op, [x], {}).outputs[0]]
    return graph


def _elu(x):
    return np.where(x >= 0, x, np.expm1(x))


@pytest.mark.parametrize(
    "op, reference, max_ulp",
    [("Exp", np.exp, 1), ("Tanh", np.tanh, 4), ("Log", np.log, 1), ("Elu", _elu, 2), ("Softplus", lambda x: np.logaddexp(0, x), 2), ("Erf", np.vectorize(math.erf), 1)],
)
def test_inline_float32_functions_are_within_a_few_ulp_of_the_exact_result(op, reference, max_ulp):
    """float32 exp, tanh, log, expm1 (Elu), log1p (Softplus) and erf are emitted as arithmetic (so
    loops vectorize), not libm calls: checked against the float64 result rounded to float32 over
    the whole range (subnormals to the largest floats, both signs), at the edges of overflow,
    and on NaN/inf; built keeping denormals (KILN_FLUSH_DENORMALS=0), as IEEE arithmetic."""
    from kiln import config

    special = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-5, 3e-4, 5e-4, 0.99999, 1.0, 1.00001, 7.9, 88.7, 88.73, -87.5, -103.9, -110.0]
    magnitudes = np.geomspace(1e-45, 3.4e38, 20001)
    x = np.concatenate([np.linspace(-120, 100, 40001), np.linspace(-1.5, 1.5, 30001), magnitudes, -magnitudes, special]).astype(np.float32)
    with config.override(flush_denormals=False):
        module = kiln.compile(_unary(op, x.size), "llvm")
    (got,) = module.run({"x": x}).values()
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        want = reference(x.astype(np.float64)).astype(np.float32)
    assert np.array_equal(np.isnan(got), np.isnan(want))
    finite = np.isfinite(want)
    assert np.array_equal(got[~finite & ~np.isnan(want)], want[~finite & ~np.isnan(want)])
    spacing = np.spacing(np.abs(want[finite])).astype(np.float64)
    ulp = np.abs(got[finite].astype(np.float64) - want[finite]) / spacing
    assert ulp.max() <= max_ulp, x[finite][ulp.argmax()]
    from kiln.backends.llvm.codegen import generate

    ir_text = str(generate(module.graph)[0])
    called = set(re.findall(r'@"?([\w.]+)"?\(', ir_text))
    assert not called & {"expf", "tanhf", "logf", "log1pf", "expm1f", "erff", "llvm.exp.f32", "llvm.log.f32"}


@pytest.mark.parametrize("flush", [True, False])
def test_denormal_floats_flush_to_zero_on_every_thread_unless_told_not_to(flush):
    """By default compiled code runs with denormal floats flushed to zero (a multiply-add on
    one takes a ~100-cycle assist), in kiln_main and in the pool's workers, and puts the
    caller's floating-point mode back; KILN_FLUSH_DENORMALS=0 keeps IEEE denormals."""
    from kiln import config
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    n = 1 << 20  # split over the pool
    graph = Graph("tiny")
    x, y = (graph.add_input(name, TensorType((n,), DType.float32)) for name in ("x", "y"))
    graph.outputs = [graph.add_node("Mul", [x, y]).outputs[0]]
    feed = {"x": np.full(n, 1e-20, np.float32), "y": np.full(n, 1e-20, np.float32)}  # 1e-40: denormal
    feed["x"][: n // 2], feed["y"][: n // 2] = 1e-41, 1e4  # a denormal input, read as zero too, by a normal product
    with config.override(num_threads=2, cache_dir="off", flush_denormals=flush):
        (got,) = kiln.compile(graph, target="llvm").run(feed).values()
    if flush:
        assert not got.any()
    else:
        np.testing.assert_array_equal(got, feed["x"] * feed["y"])
        assert got.all()
    assert np.float32(1e-20) * np.float32(1e-20) != 0  # this thread's mode is the caller's again


def test_profiled_build_times_every_node(monkeypatch):
    """KILN_PROFILE=1: kiln_main reads the cycle counter around each kernel; profile() gives
    every node's mean milliseconds per run and its share, in node order."""
    from kiln import config

    graph = build(GRAPHS["mlp"])
    x = np.random.default_rng(1).standard_normal((5, 16)).astype(np.float32)
    plain = kiln.compile(graph, target="llvm")
    with pytest.raises(KilnError, match="KILN_PROFILE=1"):
        plain.executable.profile()
    with config.override(profile=True):
        module = kiln.compile(graph, target="llvm")
    np.testing.assert_array_equal(module.run({"x": x})["p"], plain.run({"x": x})["p"])
    for _ in range(4):
        module.run({"x": x})
    times = module.executable.profile()
    assert [t.node for t in times] == [n.name or n.op.name for n in module.graph.nodes]
    assert all(t.ms > 0 for t in times) and abs(sum(t.share for t in times) - 1) < 1e-9
    module.executable.reset_profile()
    assert all(t.ms == 0 for t in module.executable.profile())


@pytest.mark.parametrize("attrs", [
    {"pads": [0, 0, 0, 0]},
    {"pads": [2, 1, 2, 3], "dilations": [1, 2]},
    {"pads": [1, 1, 1, 1], "strides": [2, 1]},
    {"pads": [1, 1, 1, 1], "strides": [1, 2]},  # the per-element im2col (width stride 2)
])
def test_nchw_conv_split_over_images_matches_eager(attrs):
    """A small per-image GEMM (LeNet's 6x25x784) on a batch: images split over the threads,
    each with its own im2col scratch; the row-copy im2col handles padding and dilation."""
    from kiln import config
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(3)
    graph = Graph("conv")
    x = graph.add_input("x", TensorType((16, 1, 30, 30), DType.float32))
    w = graph.add_param("w", rng.standard_normal((6, 1, 5, 5)).astype(np.float32))
    bias = graph.add_param("b", rng.standard_normal(6).astype(np.float32))
    graph.outputs = [graph.add_node("Conv", [x, w, bias], dict(attrs)).outputs[0]]
    feed = {"x": rng.standard_normal((16, 1, 30, 30)).astype(np.float32)}
    (want,) = kiln.compile(graph).run(feed).values()
    from kiln.backends.llvm.kernels_nn import _image_threads

    with config.override(num_threads=2):
        assert _image_threads(graph.nodes[0]) == 2
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            (got,) = kiln.compile(graph, target="llvm", layout="nchw").run(feed).values()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_the_cache_key_follows_kilns_sources(monkeypatch):
    """An edited kiln (same version number) must not load code an older kiln generated."""
    from kiln.backends import cache
    from kiln.backends.llvm import llvm_cache_key

    graph = build(GRAPHS["mlp"])
    before = llvm_cache_key(graph, host_cpu())
    assert len(cache.source_digest()) == 64
    monkeypatch.setattr(cache, "source_digest", lambda: "0" * 64)
    assert llvm_cache_key(graph, host_cpu()) != before


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("op, attrs, shape", [
    ("MaxPool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, (8, 6, 40, 40)),
    ("MaxPool", {"kernel_shape": [3, 2], "dilations": [2, 1], "ceil_mode": 1, "strides": [2, 2]}, (2, 20, 17, 15)),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [1, 2], "pads": [1, 0, 1, 2], "count_include_pad": 1}, (8, 6, 40, 40)),
    ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1}, (2, 20, 17, 15)),
    ("AveragePool", {"kernel_shape": [2, 2], "strides": [2, 2]}, (8, 6, 40, 40)),
    ("MaxPool", {"kernel_shape": [2, 3, 2], "strides": [1, 2, 2], "pads": [0, 1, 1, 1, 1, 0]}, (2, 24, 6, 9, 8)),
    ("MaxPool", {"kernel_shape": [3], "dilations": [3], "pads": [2, 2]}, (2, 4, 20)),
    ("AveragePool", {"kernel_shape": [5], "strides": [3], "pads": [2, 4], "ceil_mode": 1, "count_include_pad": 1}, (3, 5, 23)),
])
def test_pools_on_a_batch_match_eager(op, attrs, shape, layout):
    """Padded, strided, dilated, ceil-mode and count_include_pad pools on a batch, 1-D to 3-D,
    channels first or last (a channel row per tap), one and two threads, bounds-checked."""
    from kiln import config
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    graph = Graph("pool")
    x = graph.add_input("x", TensorType(shape, DType.float32))
    graph.outputs = [graph.add_node(op, [x], dict(attrs), num_outputs=1).outputs[0]]
    feed = {"x": np.random.default_rng(4).standard_normal(shape).astype(np.float32)}
    (want,) = kiln.compile(graph).run(feed).values()
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            module = kiln.compile(graph, target="llvm", layout=layout)
            assert next(n for n in module.graph.nodes if n.op.name == op).attrs["layout"] == layout.upper()
            (got,) = module.run(feed).values()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_max_pool_propagates_nan_wherever_it_sits_in_the_window(layout):
    """A NaN first, last or alone in a window (or beside infinities) gives NaN, as numpy's max."""
    graph = parse_graph(
        """graph g(%x: f32[2,3,8,9]) {
  %y: f32[2,3,4,5] = MaxPool(%x) {kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]}
  return %y
}"""
    )
    x = np.random.default_rng(5).standard_normal((2, 3, 8, 9)).astype(np.float32)
    x[0, 0, 0, 0] = x[0, 1, 3, 4] = x[1, 2, 7, 8] = np.nan
    x[1, 0, 2, :] = np.inf
    x[1, 0, 3, :] = -np.inf
    want = kiln.compile(graph).run({"x": x})["y"]
    got = kiln.compile(graph, target="llvm", layout=layout).run({"x": x})["y"]
    assert np.isnan(want).sum() >= 3
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("op", ["Max", "Min", "Relu", "Clip"])
def test_float_max_and_min_match_numpy_on_nan_and_signed_zero(op):
    """NaN on either side wins, and a tie (-0 against +0) gives the second operand, as
    numpy.maximum and numpy.minimum: bit for bit against eager, the sign of zero included.
    The second operand is a tensor here and a broadcast scalar in Clip and Relu."""
    specials = np.array([np.nan, -0.0, 0.0, 1.0, -1.0, np.inf, -np.inf, 0.5], np.float32)
    x = np.repeat(specials, len(specials))  # every pair of specials, plus a long random run
    y = np.tile(specials, len(specials))
    rng = np.random.default_rng(3)
    x = np.concatenate([x, rng.standard_normal(200).astype(np.float32)])
    y = np.concatenate([y, rng.standard_normal(200).astype(np.float32)])
    n = len(x)
    body = {
        "Max": f"%z: f32[{n}] = Max(%x, %y)",
        "Min": f"%z: f32[{n}] = Min(%x, %y)",
        "Relu": f"%z: f32[{n}] = Relu(%x)",
        "Clip": f"%z: f32[{n}] = Clip(%x, %lo, %hi)",
    }[op]
    graph = parse_graph(f"""graph g(%x: f32[{n}], %y: f32[{n}], %lo: f32[], %hi: f32[]) {{
  {body}
  return %z
}}""")
    for lo, hi in [(0.0, 0.5), (-0.0, np.nan), (np.nan, 1.0)]:
        feeds = {"x": x, "y": y, "lo": np.float32(lo), "hi": np.float32(hi)}
        want = kiln.compile(graph).run(feeds)["z"]
        got = kiln.compile(graph, target="llvm").run(feeds)["z"]
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gemm_with_long_k_and_leftover_columns_matches_eager(dtype):
    """K longer than one block (KC) and columns past the two-vector tiles: masked tiles for
    float32; for half, dot products summed in float32 and rounded once, as eager (numpy) does."""
    from kiln.backends.llvm.kernels_nn import KC
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    m, k, n = 7, 2 * KC + 44, 45
    rng = np.random.default_rng(6)
    graph = Graph("gemm")
    a = graph.add_input("a", TensorType((m, k), DType[dtype]))
    w = graph.add_param("w", (rng.standard_normal((k, n)) / 8).astype(dtype))
    graph.outputs = [graph.add_node("Gemm", [a, w], {}).outputs[0]]
    feed = {"a": (rng.standard_normal((m, k)) / 8).astype(dtype)}
    (want,) = kiln.compile(graph).run(feed).values()
    (got,) = kiln.compile(graph, target="llvm").run(feed).values()
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), rtol=1e-3 if dtype == "float16" else 1e-5, atol=1e-3 if dtype == "float16" else 1e-5)


@pytest.mark.parametrize("shape, other", [((300001,), (300001,)), ((3, 70001), (70001,)), ((5, 40000), (5, 1))], ids=["1d-odd", "row-broadcast", "column-broadcast"])
def test_large_elementwise_loops_split_over_threads(shape, other):
    """A fused elementwise group of >= PARALLEL_WORK elements splits its outer rows over
    the pool: every block's inputs (broadcast ones included) and both outputs line up with
    what one thread computes and with eager."""
    from kiln import config
    from kiln.backends.llvm.kernels_elementwise import PARALLEL_WORK

    assert np.prod(shape) >= 2 * PARALLEL_WORK
    t, u = (f"f32[{','.join(map(str, dims))}]" for dims in (shape, other))
    graph = parse_graph(
        f"""graph g(%x: {t}, %y: {u}) {{
          %s: {t} = Add(%x, %y)
          %e: {t} = Exp(%s)
          %h: {t} = Tanh(%e)
          return %e, %h
        }}"""
    )
    rng = np.random.default_rng(3)
    feeds = {"x": rng.standard_normal(shape).astype(np.float32), "y": rng.standard_normal(other).astype(np.float32)}
    want = kiln.compile(graph).run(feeds)
    results = {}
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off"):
            module = kiln.compile(graph, target="llvm")
            assert [n.op.name for n in module.graph.nodes] == ["Fused"]
            results[threads] = module.run(feeds)
    for name in want:
        np.testing.assert_array_equal(results[2][name], results[1][name])
        np.testing.assert_allclose(results[2][name], want[name], rtol=1e-5)


def test_the_pool_takes_a_small_loop_when_each_element_is_costly():
    """The split decision weighs elements by what each costs: an LSTM cell's gates over 16x256
    (sigmoids, tanhs) are split over two threads, the same number of Adds is not, and libm
    calls count far more than inline math."""
    from kiln import config
    from kiln.backends.llvm.codegen import generate
    from kiln.backends.llvm.kernels_elementwise import element_work
    from kiln.backends.llvm.pool import SUBMIT

    def group(text: str) -> "kiln.ir.Graph":
        return parse_graph(f"""graph g(%x: f32[16,256], %y: f32[16,256]) {{
          {text}
        }}""")

    cell = group("""%i: f32[16,256] = Sigmoid(%x)
          %g: f32[16,256] = Tanh(%y)
          %c: f32[16,256] = Mul(%i, %g)
          %o: f32[16,256] = Sigmoid(%y)
          %t: f32[16,256] = Tanh(%c)
          %h: f32[16,256] = Mul(%o, %t)
          return %h""")
    plain = group("""%s: f32[16,256] = Add(%x, %y)
          return %s""")
    feeds = {k: np.random.default_rng(4).standard_normal((16, 256)).astype(np.float32) for k in "xy"}
    with config.override(num_threads=2, cache_dir="off"):
        split = {}
        for name, graph in (("cell", cell), ("plain", plain)):
            module = kiln.compile(graph, target="llvm")
            split[name] = SUBMIT in str(generate(module.graph)[0])
            (got,), (want,) = module.run(feeds).values(), kiln.compile(graph).run(feeds).values()
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert split == {"cell": True, "plain": False}
    costs = {op: element_work([plain.add_node(op, [plain.inputs[0]])], [plain.inputs[0]]) for op in ("Relu", "Exp", "Sin")}
    assert costs["Relu"] == 1 and 1 < costs["Exp"] < costs["Sin"]


@pytest.mark.parametrize("op, axes", [("ReduceMean", [0, 1]), ("ReduceL2", [1]), ("ReduceMax", [0])])
def test_reductions_over_leading_axes_accumulate_along_rows(op, axes):
    """Reduced axes followed by kept ones: whole output rows are updated per input row (the
    vectorized form), combining each element's inputs in the same order as one accumulator."""
    shape = (37, 65, 19)
    kept = [d for i, d in enumerate(shape) if i not in axes]
    graph = parse_graph(
        f"""graph g(%x: f32[{','.join(map(str, shape))}]) {{
          %y: f32[{','.join(map(str, kept))}] = {op}(%x) {{axes={axes}, keepdims=0}}
          return %y
        }}"""
    )
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    got = kiln.compile(graph, target="llvm").run({"x": x})["y"]
    np.testing.assert_allclose(got, kiln.compile(graph).run({"x": x})["y"], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("x_shape, w_shape, attrs, bias", [
    ((64, 1, 32, 32), (6, 1, 5, 5), {}, True),  # LeNet-5's first conv: two vectors of a 28-wide row
    ((8, 6, 14, 14), (16, 6, 5, 5), {}, True),  # its second: a 10-wide row in one masked vector
    ((3, 4, 11, 45), (30, 4, 3, 3), {"strides": [2, 1], "dilations": [2, 2]}, False),  # column chunks, row stride, dilation, channel blocks
    ((2, 3, 40), (5, 3, 4), {}, True),  # 1-D
    ((2, 2, 5, 6, 20), (4, 2, 2, 3, 3), {}, True),  # 3-D
])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_small_nchw_convs_run_by_rows_in_place(x_shape, w_shape, attrs, bias, dtype):
    """Small channels-first convs skip im2col: each output row is computed in vectors from the
    input rows under it (_row_conv), one and two threads, bounds checked, as eager."""
    from kiln import config
    from kiln.backends.llvm.kernels_nn import _row_shaped
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(8)
    graph = Graph("conv")
    x = graph.add_input("x", TensorType(x_shape, DType[dtype]))
    inputs = [x, graph.add_param("w", rng.standard_normal(w_shape).astype(dtype))]
    if bias:
        inputs.append(graph.add_param("b", rng.standard_normal(w_shape[0]).astype(dtype)))
    graph.outputs = [graph.add_node("Conv", inputs, dict(attrs)).outputs[0]]
    feed = {"x": rng.standard_normal(x_shape).astype(dtype)}
    (want,) = kiln.compile(graph).run(feed).values()
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            module = kiln.compile(graph, target="llvm", layout="nchw")
            assert _row_shaped(next(n for n in module.graph.nodes if n.op.name == "Conv"))
            (got,) = module.run(feed).values()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_shape, kernel, attrs, bias, dtype", [
    ((2, 24, 14, 14), 3, {"pads": [1, 1, 1, 1]}, True, "float32"),  # a row in one masked vector
    ((1, 16, 37, 37), 3, {"pads": [1, 1, 1, 1], "strides": [2, 2]}, True, "float32"),  # stride 2: even lanes of two loads
    ((1, 8, 70, 70), 3, {"pads": [1, 1, 1, 1], "strides": [2, 2]}, False, "float32"),  # stride 2: a masked left chunk, an unmasked middle one, a short last one
    ((1, 8, 40, 35), 5, {"pads": [2, 1, 0, 2], "strides": [2, 2]}, False, "float32"),  # 5x5, uneven pads, a 16-wide row plus 2
    ((1, 12, 20, 50), 3, {}, True, "float32"),  # no pads: read in place, the last vector masked
    ((2, 6, 19, 23), 3, {"pads": [2, 2, 2, 2], "dilations": [2, 2]}, True, "float64"),  # dilated, float64
], ids=["3x3", "stride-2", "stride-2-wide", "5x5-uneven-pads", "in-place", "dilated-f64"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_depthwise_convs_match_eager(x_shape, kernel, attrs, bias, dtype, layout):
    """group = channels, no im2col. NCHW: each plane's output rows in vectors from the rows
    under them (no padded copy: border rows leave out kernel rows, border vectors load under
    masks), planes over threads. NHWC: vectors along the channels, rows outside the image read
    zeros, border positions leave out taps, (image, row) items over threads. Bounds checked;
    eager's result."""
    from kiln import config
    from kiln.backends.llvm import kernels_depthwise
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(8)
    c = x_shape[1]
    graph = Graph("depthwise")
    x = graph.add_input("x", TensorType(x_shape, DType[dtype]))
    inputs = [x, graph.add_param("w", rng.standard_normal((c, 1, kernel, kernel)).astype(dtype))]
    if bias:
        inputs.append(graph.add_param("b", rng.standard_normal(c).astype(dtype)))
    graph.outputs = [graph.add_node("Conv", inputs, {**attrs, "group": c}).outputs[0]]
    assert kernels_depthwise.applies(graph.nodes[0])
    feed = {"x": rng.standard_normal(x_shape).astype(dtype)}
    (want,) = kiln.compile(graph).run(feed).values()
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            module = kiln.compile(graph, target="llvm", layout=layout)
            conv = next(n for n in module.graph.nodes if n.op.name == "Conv")
            assert (kernels_depthwise.applies_nhwc if layout == "nhwc" else kernels_depthwise.applies)(conv)
            (got,) = module.run(feed).values()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout, kernel_name", [("nchw", "emit"), ("nhwc", "emit_nhwc")])
def test_a_depthwise_conv_applies_its_pointwise_tail_in_cache(monkeypatch, layout, kernel_name):
    """Depthwise conv + per-channel scale + residual Add + Relu6 (Clip) in one Fused group: the
    tail runs on each output plane (NCHW) or row (NHWC) while it is in cache, its operands read
    there, with eager's result on one thread and two."""
    from kiln import config
    from kiln.backends.llvm import kernels_depthwise

    tails = []
    emit = getattr(kernels_depthwise, kernel_name)
    monkeypatch.setattr(kernels_depthwise, kernel_name, lambda ctx, epilogue=None: (tails.append(len(epilogue.operands)), emit(ctx, epilogue)))
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(9)
    shape = (2, 32, 30, 30)
    graph = Graph("block")
    x = graph.add_input("x", TensorType(shape, DType.float32))
    skip = graph.add_input("skip", TensorType(shape, DType.float32))
    w = graph.add_param("w", rng.standard_normal((32, 1, 3, 3)).astype(np.float32))
    scale = graph.add_param("s", rng.uniform(0.5, 2, (1, 32, 1, 1)).astype(np.float32))
    y = graph.add_node("Conv", [x, w], {"pads": [1, 1, 1, 1], "group": 32}).outputs[0]
    y = graph.add_node("Mul", [y, scale]).outputs[0]
    y = graph.add_node("Add", [y, skip]).outputs[0]
    low, high = graph.add_param("low", np.array(0.0, np.float32)), graph.add_param("high", np.array(6.0, np.float32))
    graph.outputs = [graph.add_node("Clip", [y, low, high]).outputs[0]]
    feed = {"x": rng.standard_normal(shape).astype(np.float32), "skip": rng.standard_normal(shape).astype(np.float32) * 3}
    (want,) = kiln.compile(graph).run(feed).values()
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            module = kiln.compile(graph, target="llvm", layout=layout)
            groups = [[b.op.name for b in n.attrs["body"].nodes] for n in module.graph.nodes if n.op.name == "Fused"]
            # channels-last: the skip input arrives channels-first, so the Add and Clip form a group of their own
            assert groups == ([["Conv", "Mul", "Add", "Clip"]] if layout == "nchw" else [["Conv", "Mul"], ["Add", "Clip"]])
            (got,) = module.run(feed).values()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the scale, the skip input and Clip's bounds (NHWC: the scale) read by the kernel's tail
    assert tails == ([4, 4] if layout == "nchw" else [1, 1])


@pytest.mark.parametrize("x_shape, w_shape, attrs", [
    ((2, 3, 90, 90), (24, 3, 7, 7), {"pads": [3, 3, 3, 3], "strides": [2, 2]}),  # a ResNet stem: 21-element window rows
    ((2, 16, 30, 30), (70, 16, 3, 3), {"pads": [1, 1, 1, 1]}),  # a partial last column block
    ((1, 8, 20, 23), (40, 8, 3, 3), {"pads": [0, 2, 1, 0], "dilations": [2, 3]}),  # width dilation: tap by tap
    ((1, 256, 9, 9), (128, 256, 3, 3), {"pads": [1, 1, 1, 1]}),  # 1.2 MB of weights: column blocks over threads
    ((1, 32, 14, 14), (64, 32, 1, 1), {"strides": [2, 2]}),  # a strided 1x1 downsample
    ((2, 16, 40), (32, 16, 5), {"pads": [2, 2], "strides": [2]}),  # 1-D
    ((1, 8, 6, 7, 8), (32, 8, 3, 3, 3), {"pads": [1, 0, 1, 1, 2, 1]}),  # 3-D
    ((1, 64, 12, 24), (48, 64, 3, 3), {"pads": [1, 1, 1, 1]}),  # 12-wide tiles: all 576 of K at once over packed weights, in parts over run-time ones
    ((1, 64, 61, 70), (32, 64, 3, 3), {"pads": [2, 1, 0, 1], "strides": [2, 1]}),  # 18 KB padded rows: bands of 6 output rows padded at a time
    ((1, 160, 7, 9), (24, 160, 3, 3), {"pads": [6, 6, 6, 6], "dilations": [6, 6]}),  # taps over the border only are skipped: parts of one tap, the first one skipped in most tiles
    ((2, 8, 13, 10), (20, 8, 3, 3), {"pads": [4, 0, 3, 6], "dilations": [4, 3], "strides": [2, 1]}),  # skipped taps under strides and uneven pads
    ((1, 64, 14, 14), (64, 4, 3, 3), {"pads": [1, 1, 1, 1], "group": 16}),  # ResNeXt's 4 channels a group: fewer than a vector, unpacked
    ((2, 64, 9, 9), (128, 16, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2], "group": 4}),  # 32 outputs a group: two-vector panels
    ((1, 64, 10, 10), (64, 16, 3, 3), {"pads": [1, 1, 1, 1], "group": 4}),  # 16 a group: one-vector panels (AVX-512)
    ((1, 32, 8, 8), (48, 8, 3, 3), {"pads": [1, 1, 1, 1], "group": 4}),  # 12 a group: no panel width fits
    ((1, 64, 7, 7), (64, 16, 1, 1), {"group": 4}),  # a grouped 1x1 (ShuffleNet)
    ((1, 16, 11, 11), (8, 8, 3, 3), {"pads": [2, 2, 2, 2], "dilations": [2, 2], "group": 2}),  # grouped and dilated
], ids=["stem", "partial-block", "dilated", "large-weights", "downsample", "1d", "3d", "whole-k", "padded-bands", "dead-taps", "dead-taps-strided",
        "grouped-4", "grouped-32", "grouped-16", "grouped-12", "grouped-1x1", "grouped-dilated"])
@pytest.mark.parametrize("weights, dtype", [("constant", "float32"), ("input", "float32"), ("constant", "float64")])
def test_direct_nhwc_conv_matches_eager(x_shape, w_shape, attrs, weights, dtype):
    """The direct convolution (no im2col): window rows read in place from a zero-padded copy of
    each image, packed or run-time weights, both thread splits, grouped or not, bounds
    checked; one thread and two give the same bits."""
    from kiln import config
    from kiln.backends.llvm import kernels_conv
    from kiln.backends.llvm.kernels_nn import vector_width
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(4)
    graph = Graph("conv")
    x = graph.add_input("x", TensorType(x_shape, DType[dtype]))
    w_value = (rng.standard_normal(w_shape) / np.sqrt(np.prod(w_shape[1:]))).astype(dtype)
    w = graph.add_param("w", w_value) if weights == "constant" else graph.add_input("w", TensorType(w_shape, DType[dtype]))
    bias = graph.add_param("b", rng.standard_normal(w_shape[0]).astype(dtype))
    graph.outputs = [graph.add_node("Conv", [x, w, bias], dict(attrs)).outputs[0]]
    feed = {"x": rng.standard_normal(x_shape).astype(dtype), **({"w": w_value} if weights == "input" else {})}
    (want,) = kiln.compile(graph).run(feed).values()
    results = []
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            module = kiln.compile(graph, target="llvm", layout="nhwc")
            conv = next(n for n in module.graph.nodes if n.op.name == "Conv")
            assert conv.attrs["layout"] == "NHWC" and kernels_conv.applies(conv)
            (got,) = module.run(feed).values()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        results.append(got)
    np.testing.assert_array_equal(results[0], results[1])
    # constant weights in panels two vectors wide (the last zero-padded); a group's panels lie
    # within it, one vector wide where that is what its outputs divide into, none where neither
    width, per_group = vector_width(DType[dtype]), w_shape[0] // attrs.get("group", 1)
    if attrs.get("group", 1) == 1 or per_group % (2 * width) == 0:
        nr = [2 * width]
    else:
        nr = [width] if per_group % width == 0 else []
    assert [panel["nr"] for panel in module.executable.layout["panels"]] == (nr if weights == "constant" else [])


@pytest.mark.parametrize("x_shape, w_shape, attrs", [
    ((1, 6, 20, 21), (6, 12, 16, 16), {"strides": [8, 8], "pads": [4, 4, 4, 4]}),  # FCN-8s's upsampling: 4 taps land on each output; 5 MB of columns, made a channel at a time
    ((2, 4, 5, 6), (4, 3, 2, 3), {"strides": [3, 4], "pads": [1, 0, 0, 2], "output_padding": [2, 1]}),  # taps that land nowhere, gaps, the bias alone in the padding
    ((1, 6, 4, 5), (6, 2, 3, 3), {"group": 3, "dilations": [2, 3], "strides": [2, 1]}),  # groups, dilation
], ids=["fcn-upsampling", "gaps-and-padding", "grouped-dilated"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_conv_transpose_sums_each_output_row_from_its_taps(x_shape, w_shape, attrs, layout):
    """A 2-D ConvTranspose: each output row starts from the bias and adds the column rows of the
    taps that land on it, channels (NCHW) or output rows (NHWC) split over the pool; FCN-8s's
    16x16 taps make their columns a channel at a time. One thread and two agree. (A grouped one
    stays NCHW.)"""
    from kiln import config
    from kiln.backends.llvm import kernels_conv_transpose
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(8)
    graph = Graph("convT")
    x = graph.add_input("x", TensorType(x_shape, DType.float32))
    w = graph.add_param("w", rng.standard_normal(w_shape).astype(np.float32))
    bias = graph.add_param("b", rng.standard_normal(w_shape[1] * attrs.get("group", 1)).astype(np.float32))
    upsampled = graph.add_node("ConvTranspose", [x, w, bias], dict(attrs)).outputs[0]
    graph.outputs = [graph.add_node("Relu", [upsampled]).outputs[0]]  # (an upsampling straight to the output goes back to NCHW)
    feed = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    (want,) = kiln.compile(graph).run(feed).values()
    results = []
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            module = kiln.compile(graph, target="llvm", layout=layout)
            nodes = [n for n in module.graph.nodes for n in (n.attrs["body"].nodes if n.op.name == "Fused" else [n])]
            (node,) = (n for n in nodes if n.op.name == "ConvTranspose")
            assert kernels_conv_transpose._columns_per_channel(node) == (layout == "nchw" and w_shape[-1] == 16)
            assert node.attrs["layout"] == ("NHWC" if layout == "nhwc" and "group" not in attrs else "NCHW")
            (got,) = module.run(feed).values()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        results.append(got)
    np.testing.assert_array_equal(results[0], results[1])


@pytest.mark.parametrize("shape, perm", [((70, 45), [1, 0]), ((3, 40, 50), [0, 2, 1]), ((2, 33, 5, 64), [0, 3, 1, 2]), ((64, 3, 33), [2, 1, 0])])
def test_transposes_in_tiles_match_numpy(shape, perm):
    """Axes that swap contiguity are copied in tiles (edges of partial tiles included)."""
    dims = ",".join(map(str, shape))
    out = ",".join(str(shape[p]) for p in perm)
    graph = parse_graph(f"graph g(%x: f32[{dims}]) {{\n  %y: f32[{out}] = Transpose(%x) {{perm={perm}}}\n  return %y\n}}")
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    np.testing.assert_array_equal(kiln.compile(graph, target="llvm").run({"x": x})["y"], x.transpose(perm))


@pytest.mark.parametrize("channels, size, kernel", [
    (24, 60, 3),  # the direct conv: the tail on each (column block, output row) block
    (24, 60, 1),  # a 1x1 conv, positions over threads: each thread's chunks of rows (the last overlapping)
    (256, 7, 1),  # a 1x1 conv with few positions: columns over threads
], ids=["direct", "1x1-rows", "1x1-columns"])
def test_a_conv_and_its_pointwise_tail_run_as_one_kernel(channels, size, kernel):
    """Conv + per-channel scale + residual Add + Relu in one Fused group: the tail is applied
    to each block of conv output while it is in cache (fused_conv), with eager's result."""
    from kiln import config
    from kiln.backends.llvm.kernels_conv import fused_conv  # noqa: F401 - the path under test
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(6)
    graph = Graph("block")
    x = graph.add_input("x", TensorType((2, 16, size, size), DType.float32))
    w0 = graph.add_param("w0", rng.standard_normal((channels, 16, 3, 3)).astype(np.float32))
    skip = graph.add_node("Conv", [x, w0], {"pads": [1, 1, 1, 1]}).outputs[0]  # channels-last inside the graph
    w = graph.add_param("w", rng.standard_normal((channels, 16, kernel, kernel)).astype(np.float32))
    bias = graph.add_param("b", rng.standard_normal(channels).astype(np.float32))
    scale = graph.add_param("s", rng.uniform(0.5, 2, (1, channels, 1, 1)).astype(np.float32))
    y = graph.add_node("Conv", [x, w, bias], {"pads": [kernel // 2] * 4}).outputs[0]
    y = graph.add_node("Mul", [y, scale]).outputs[0]
    y = graph.add_node("Add", [y, skip]).outputs[0]
    graph.outputs = [graph.add_node("Relu", [y]).outputs[0]]
    feed = {"x": rng.standard_normal((2, 16, size, size)).astype(np.float32)}
    (want,) = kiln.compile(graph).run(feed).values()
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            module = kiln.compile(graph, target="llvm", layout="nhwc")
            groups = [[b.op.name for b in n.attrs["body"].nodes] for n in module.graph.nodes if n.op.name == "Fused"]
            assert ["Conv", "Mul", "Add", "Relu"] in groups
            (got,) = module.run(feed).values()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_shape, m, split", [
    ((1, 64, 14, 14), 100, "rows"),  # 196 positions: 98 a thread, in tiles of their own height
    ((2, 48, 5, 5), 40, "serial"),
    ((1, 1024, 7, 7), 512, "columns"),  # 49 positions by 2 MB of weights
], ids=["rows", "serial", "columns"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_an_unfused_1x1_conv_is_one_gemm_over_the_positions(x_shape, m, split, dtype):
    """A channels-last 1x1 conv with no tail splits as a GEMM of its sizes would
    (``gemm_split``), with eager's result, and the same bits on 1, 2 and 3 threads."""
    from kiln import config
    from kiln.backends.llvm.kernels_nn import gemm_split, micro_rows
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    n, c, h, w_ = x_shape
    with config.override(num_threads=2):
        assert gemm_split(n * h * w_, c, m, DType[dtype], True, micro_rows(n * h * w_)) == split
    rng = np.random.default_rng(9)
    graph = Graph("pointwise")
    x = graph.add_input("x", TensorType(x_shape, DType[dtype]))
    w = graph.add_param("w", (rng.standard_normal((m, c, 1, 1)) / np.sqrt(c)).astype(dtype))
    bias = graph.add_param("b", rng.standard_normal(m).astype(dtype))
    graph.outputs = [graph.add_node("Conv", [x, w, bias], {}).outputs[0]]
    feed = {"x": rng.standard_normal(x_shape).astype(dtype)}
    (want,) = kiln.compile(graph).run(feed).values()
    results = []
    for threads in (1, 2, 3):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            module = kiln.compile(graph, target="llvm", layout="nhwc")
            assert [n.op.name for n in module.graph.nodes if n.op.name != "Transpose"] == ["Conv"]
            (got,) = module.run(feed).values()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        results.append(got)
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_array_equal(results[2], results[0])


@pytest.mark.parametrize("layout, group", [("nhwc", 1), ("nhwc", 16), ("nchw", 1), ("nchw", 16)], ids=["nhwc", "nhwc-depthwise", "nchw", "nchw-depthwise"])
def test_a_conv_and_its_silu_run_as_one_kernel(layout, group):
    """x * sigmoid(x) after a conv (EfficientNet's activation) is one Fused group, whichever
    kernel takes it: fused_conv's tail per block, or the conv then one pass in place."""
    from kiln import config
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(8)
    graph = Graph("silu")
    x = graph.add_input("x", TensorType((2, 16, 10, 10), DType.float32))
    w = graph.add_param("w", rng.standard_normal((16, 16 // group, 3, 3)).astype(np.float32))
    c = graph.add_node("Conv", [x, w], {"pads": [1, 1, 1, 1], "group": group}).outputs[0]
    graph.outputs = [graph.add_node("Mul", [c, graph.add_node("Sigmoid", [c]).outputs[0]]).outputs[0]]
    feed = {"x": rng.standard_normal((2, 16, 10, 10)).astype(np.float32)}
    (want,) = kiln.compile(graph).run(feed).values()
    for threads in (1, 2):
        with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
            module = kiln.compile(graph, target="llvm", layout=layout)
            groups = [[b.op.name for b in n.attrs["body"].nodes] for n in module.graph.nodes if n.op.name == "Fused"]
            assert groups == [["Conv", "Sigmoid", "Mul"]]
            (got,) = module.run(feed).values()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_gemm_and_its_gelu_run_as_the_gemm_then_one_pass_in_place(monkeypatch):
    """MatMul + bias + GELU: the GEMM writes the group's output and one loop applies the
    whole tail to it in place, each buffer handed to the loop's blocks once (the same buffer
    twice defeats the vectorizer's overlap check at run time: 9x slower)."""
    from kiln import config
    from kiln.backends.llvm import kernels_elementwise
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(9)
    graph = Graph("gelu")
    x = graph.add_input("x", TensorType((3, 40, 64), DType.float32))
    m = graph.add_node("MatMul", [x, graph.add_param("w", rng.standard_normal((64, 256)).astype(np.float32))]).outputs[0]
    a = graph.add_node("Add", [m, graph.add_param("b", rng.standard_normal(256).astype(np.float32))]).outputs[0]
    d = graph.add_node("Div", [a, graph.add_param("r2", np.array(math.sqrt(2), np.float32))]).outputs[0]
    e = graph.add_node("Erf", [d]).outputs[0]
    p = graph.add_node("Add", [e, graph.add_param("one", np.array(1, np.float32))]).outputs[0]
    graph.outputs = [graph.add_node("Mul", [a, p]).outputs[0]]
    feed = {"x": rng.standard_normal((3, 40, 64)).astype(np.float32)}
    (want,) = kiln.compile(graph).run(feed).values()
    handed = []
    split = kernels_elementwise.parallel_rows
    monkeypatch.setattr(kernels_elementwise, "parallel_rows", lambda ctx, rows, threads, pointers, *rest: handed.append(pointers) or split(ctx, rows, threads, pointers, *rest))
    with config.override(num_threads=2, cache_dir="off", check_bounds=True):
        module = kiln.compile(graph, target="llvm")
        (got,) = module.run(feed).values()
    groups = [[b.op.name for b in n.attrs["body"].nodes] for n in module.graph.nodes if n.op.name == "Fused"]
    assert groups == [["MatMul", "Add", "Div", "Erf", "Add", "Mul"]]
    assert handed and all(len(set(map(id, pointers))) == len(pointers) for pointers in handed)
    assert any(len(pointers) == 4 for pointers in handed)  # the tail: its output (read and written), b, r2, one
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_an_elementwise_op_the_plan_puts_in_place_writes_through_its_inputs_pointer():
    """Where the plan writes an output over a dying input, the kernel stores through the
    input's own pointer (its output argument unused): through two pointers equal only at run
    time, LLVM's vectorized loop finds them overlapping and runs its scalar loop instead."""
    from kiln import config
    from kiln.backends.llvm.codegen import generate
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    graph = Graph("in_place")
    x = graph.add_input("x", TensorType((64, 256), DType.float32))
    s = graph.add_input("s", TensorType((1, 256), DType.float32))
    t = graph.add_node("Exp", [x]).outputs[0]
    graph.outputs = [graph.add_node("Softmax", [graph.add_node("Mul", [t, s]).outputs[0]]).outputs[0]]
    rng = np.random.default_rng(10)
    feed = {"x": rng.standard_normal((64, 256)).astype(np.float32), "s": rng.standard_normal((1, 256)).astype(np.float32)}
    with config.override(cache_dir="off", check_bounds=True):
        module = kiln.compile(graph, target="llvm", pipeline="O0")  # unfused: Exp, Mul, Softmax
        (got,) = module.run(feed).values()
    (mul,) = [f for f in generate(module.graph)[0].functions if f.name.endswith("_Mul")]
    uses = [str(mul).count(f'%"{a.name}"') for a in mul.args]  # the signature's mention included
    assert uses[2] == 1 and uses[0] > 2  # t written in place; out unread and unwritten
    (want,) = kiln.compile(graph).run(feed).values()
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_repeated_fused_groups_share_one_kernel_function():
    """Three Conv+Relu blocks of one shape with different weights: one kernel function serves
    them (the weights are arguments), and each block still gets its own weights."""
    from kiln.backends.llvm.codegen import generate
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(7)
    graph = Graph("repeated")
    y = graph.add_input("x", TensorType((1, 8, 12, 12), DType.float32))
    for i in range(3):
        w = graph.add_param(f"w{i}", rng.standard_normal((8, 8, 3, 3)).astype(np.float32))
        y = graph.add_node("Conv", [y, w], {"pads": [1, 1, 1, 1]}).outputs[0]
        y = graph.add_node("Relu", [y]).outputs[0]
    graph.outputs = [y]
    feed = {"x": rng.standard_normal((1, 8, 12, 12)).astype(np.float32)}
    module = kiln.compile(graph, target="llvm")
    assert module.graph.op_histogram().get("Fused") == 3
    llvm_module = generate(module.graph)[0]
    kernels = [f.name for f in llvm_module.functions if f.name.startswith("kernel_") and "Fused" in f.name]
    assert len(kernels) == 1, kernels
    (got,), (want,) = module.run(feed).values(), kiln.compile(graph).run(feed).values()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "op, x_shape, w_shape, attrs, bias",
    [
        ("Gemm", (300, 64), (10, 64), {"transB": 1}, True),  # transposed B, one padded panel, rows over threads
        ("Gemm", (8, 64), (64, 520), {}, False),  # fewer rows than columns: columns over threads
        ("MatMul", (3, 40, 24), (24, 72), {}, False),  # batched, one constant matrix
        ("MatMul", (37, 1, 24), (24, 72), {}, False),  # sequence-first tokens: one GEMM of 37 rows
        ("Gemm", (29, 1024), (1024, 520), {}, True),  # 2.1 MB of weights: each column block's first tile prefetches the next panel
        ("Gemm", (1301, 300), (300, 72), {}, True),  # a tall A over a long K: row blocks kept in L2, and one left over
    ],
)
def test_constant_gemm_operands_are_packed_into_panels(op, x_shape, w_shape, attrs, bias, threads):
    """A constant B is packed once, at load, into panels of two vectors' width; the packed
    kernels give eager's results, and the layout records which parameter went how."""
    from kiln import config
    from kiln.ir.dtypes import DType
    from kiln.ir.graph import Graph
    from kiln.ir.types import TensorType

    rng = np.random.default_rng(12)
    graph = Graph("g")
    x = graph.add_input("x", TensorType(x_shape, DType.float32))
    inputs = [x, graph.add_param("w", rng.standard_normal(w_shape).astype(np.float32))]
    k, n = (w_shape[1], w_shape[0]) if attrs.get("transB") else w_shape
    if bias:
        inputs.append(graph.add_param("c", rng.standard_normal(n).astype(np.float32)))
    graph.outputs = [graph.add_node(op, inputs, attrs).outputs[0]]
    feed = {"x": rng.standard_normal(x_shape).astype(np.float32)}
    (want,) = kiln.compile(graph).run(feed).values()
    with config.override(num_threads=threads, cache_dir="off", check_bounds=True):
        module = kiln.compile(graph, target="llvm")
        (got,) = module.run(feed).values()
    (panel,) = module.executable.layout["panels"]
    assert (panel["k"], panel["n"]) == (k, n)  # a transposed constant B is made row-major first
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_matmul_by_one_matrix_takes_its_batches_rows_as_one_gemm():
    """(..., m, k) @ (k, n) is one GEMM of prod(...) * m rows wherever A's rows step through
    memory evenly (a dense tensor); only a view that breaks the step keeps
    the loop of per-batch products."""
    from kiln.backends.llvm.emit import View
    from kiln.backends.llvm.kernels_nn import _row_stride
    from kiln.ir.dtypes import DType

    def view(shape, strides):
        return View(None, DType.float32, shape, strides)

    assert _row_stride(view((197, 1, 768), (768, 768, 1))) == 768
    assert _row_stride(view((2, 3, 8), (72, 24, 1))) == 24  # a part of wider rows
    assert _row_stride(view((1, 1, 8), (8, 8, 1))) == 8
    assert _row_stride(view((4, 3, 8), (8, 32, 1))) is None  # a transposed view's rows


def test_panels_hold_each_column_block_contiguously():
    from kiln.backends.llvm.codegen import PanelSpec, pack_panels

    w = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    panels = pack_panels(w, PanelSpec(5, 7, 4))
    assert panels.shape == (2, 5, 4)
    np.testing.assert_array_equal(panels[1, :, :3], w[:, 4:])
    assert not panels[1, :, 3].any()  # the last panel's padding
    np.testing.assert_array_equal(pack_panels(w.T.copy(), PanelSpec(5, 7, 4, transpose=True)), panels)


def test_outputs_are_written_into_fresh_arrays_each_run():
    """Computed outputs are written by their kernels straight into arrays the runtime hands
    over (no copy out of the arena): a new array every run, aligned, even when a later node
    reads the output or a Reshape of it; an output listed twice is copied out as before."""
    graph = parse_graph(
        """
        graph g(%x: f32[8,6]) {
          %a: f32[8,6] = Relu(%x)
          %r: f32[48] = Reshape(%a) {shape=[48]}
          %b: f32[8,6] = Mul(%a, %x)
          return %a, %r, %b, %b
        }"""
    )
    module = kiln.compile(graph, target="llvm", pipeline="O0")
    kinds = [o["kind"] for o in module.executable.layout["outputs"]]
    assert kinds == ["written", "written", "arena", "arena"]
    x = np.random.default_rng(3).standard_normal((8, 6)).astype(np.float32)
    first = module.executable.run([x])
    second = module.executable.run([x + 1])
    want = [np.maximum(x, 0), np.maximum(x, 0).reshape(48), np.maximum(x, 0) * x]
    for got, expected in zip(first, want):
        np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert first[0].ctypes.data % 64 == 0 and first[0].flags.writeable
    assert not np.shares_memory(first[0], second[0]) and not np.shares_memory(first[2], first[3])
    np.testing.assert_allclose(second[0], np.maximum(x + 1, 0), rtol=1e-6)


def test_donated_outputs_are_computed_over_their_inputs_where_that_is_safe():
    """donate={output: input}: an elementwise update is written over its input's array and
    run() returns that array; an output whose input is read after it is produced is not
    donated (the later reader needs the old value); unknown names are refused."""
    graph = parse_graph(
        """
        graph g(%p: f32[64,32], %m: f32[64,32], %g: f32[64,32]) {
          %m2: f32[64,32] = Add(%m, %g)
          %p2: f32[64,32] = Sub(%p, %m2)
          %late: f32[64,32] = Mul(%m, %p2)
          return %p2, %m2, %late
        }"""
    )
    rng = np.random.default_rng(14)
    feeds = {n: rng.standard_normal((64, 32)).astype(np.float32) for n in ("p", "m", "g")}
    want = kiln.compile(graph).run({k: v.copy() for k, v in feeds.items()})
    module = kiln.compile(graph, target="llvm", pipeline="O0", donate={"p2": "p", "m2": "m"})  # unfused: three kernels
    kinds = [o["kind"] for o in module.executable.layout["outputs"]]
    assert kinds == ["donated", "written", "written"]  # m is read by %late after %m2: not donated
    arrays = {k: v.copy() for k, v in feeds.items()}
    got = module.run(arrays)
    assert got["p2"] is arrays["p"]
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-6)
    frozen = feeds["p"].copy()
    frozen.setflags(write=False)  # a read-only input is copied before it is written over
    again = module.run({**{k: v.copy() for k, v in feeds.items()}, "p": frozen})
    np.testing.assert_array_equal(frozen, feeds["p"])
    np.testing.assert_allclose(again["p2"], want["p2"], rtol=1e-6)
    with pytest.raises(KilnError, match="donate: no such output -> input pair"):
        kiln.compile(graph, target="llvm", donate={"p2": "nope"})


@pytest.mark.parametrize("n", [64, 40])  # whole panels; a padded last panel
def test_a_run_time_matrix_read_by_several_gemms_is_packed_once(n):
    """A matrix fed at run time (a training step's recurrent weights) that several Gemms read as
    B is packed into panels at its first reader, in its own arena region; results as eager."""
    from kiln.backends.llvm.codegen import runtime_panels

    graph = parse_graph(
        f"""
        graph g(%w: f32[48,{n}], %x0: f32[16,48], %x1: f32[16,48], %x2: f32[16,48]) {{
          %y0: f32[16,{n}] = Gemm(%x0, %w) {{}}
          %y1: f32[16,{n}] = Gemm(%x1, %w) {{}}
          %s: f32[16,{n}] = Sub(%y0, %y1)
          %y2: f32[16,{n}] = Gemm(%x2, %w) {{}}
          %t: f32[16,{n}] = Mul(%s, %y2)
          return %t
        }}"""
    )
    rng = np.random.default_rng(15)
    feeds = {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}
    want = kiln.compile(graph).run(feeds)["t"]
    module = kiln.compile(graph, target="llvm")
    assert [v.name for v, _ in runtime_panels(module.graph)] == ["w"]
    np.testing.assert_allclose(module.run(feeds)["t"], want, rtol=1e-4, atol=1e-4)
