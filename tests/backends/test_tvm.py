"""The TVM targets against the eager oracle: the same lowering on ``tvm-llvm`` (CI) and on
``tvm-cuda`` (marked ``gpu``: skipped where no CUDA device is visible), artifacts, the cache,
device-resident runs and bad input."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest
from sample_graphs import GRAPHS, build

import kiln
from kiln.backends.tvm import cuda_available
from kiln.errors import KilnError
from kiln.ir import parse_graph


gpu = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="no CUDA device visible")]
TARGETS = ["tvm-llvm", pytest.param("tvm-cuda", marks=gpu)]


def _feeds(graph, seed=1):
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(v.type.shape).astype(np.float32) for v in graph.inputs}


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("name", GRAPHS)
def test_tvm_matches_eager(name, target):
    graph = build(GRAPHS[name])
    feeds = _feeds(graph)
    want = kiln.compile(graph).run(feeds)
    got = kiln.compile(graph, target=target).run(feeds)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_fused_groups_are_one_primfunc_each(light_model, target):
    """One call_tir per node (a fused group is one node); identical PrimFuncs are shared."""
    from kiln.backends.tvm.lower import to_relax

    module = kiln.compile(light_model("light_squeezenet"), target=target)
    fused = module.graph.op_histogram().get("Fused", 0)
    assert fused
    relax_module = to_relax(module.graph)
    primfuncs = [gv for gv in relax_module.functions if gv.name_hint != "main"]
    bindings = relax_module["main"].body.blocks[0].bindings
    calls = [b for b in bindings if getattr(b.value, "op", None) is not None and b.value.op.name == "relax.call_tir"]
    lowered = [n for n in module.graph.nodes if n.op.name != "Reshape"]  # reshapes are Relax views
    assert len(calls) == len(lowered)
    assert 0 < len(primfuncs) <= len(lowered)
    (name, t), = module.input_types.items()
    x = np.random.default_rng(0).standard_normal(t.shape).astype(np.float32)
    want = kiln.compile(light_model("light_squeezenet")).run({name: x})
    for key, value in module.run({name: x}).items():
        np.testing.assert_allclose(value, want[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("target", TARGETS)
def test_artifacts_carry_the_library_and_load_without_compiling(tmp_path, monkeypatch, target):
    graph = build(GRAPHS["mlp"])
    module = kiln.compile(graph, target=target)
    path = tmp_path / "mlp.kiln"
    module.save(path)
    with zipfile.ZipFile(path) as zf:
        assert "code/tvm.so" in zf.namelist()
        meta = json.loads(zf.read("code/tvm.json"))
    assert meta["kind"] == target.split("-")[1]

    import kiln.backends.tvm as tvm_backend

    def no_compiling(*args, **kwargs):
        raise AssertionError("kiln.load compiled again")

    monkeypatch.setattr(tvm_backend, "compile_library", no_compiling)
    loaded = kiln.load(path)
    feeds = _feeds(graph, 2)
    np.testing.assert_array_equal(loaded.run(feeds)["p"], module.run(feeds)["p"])


def test_cuda_code_is_built_without_a_gpu():
    """``kiln compile -t tvm-cuda`` works on a machine without a GPU: TVM generates the CUDA
    code (dlight schedules every PrimFunc) and the library is exported for the GPU machine."""
    from kiln.backends.tvm import TVMBackend, TVMTarget

    graph = kiln.optimize(build(GRAPHS["conv_pool"]), "O2")
    library = TVMBackend("cuda", "sm_80").compile(graph, TVMTarget("cuda", "sm_80"))
    assert library[:4] == b"\x7fELF"


def test_the_compile_cache_hits_and_rebuilds_tampered_entries(tmp_path, monkeypatch):
    import kiln.backends.tvm as tvm_backend
    from kiln import config

    graph = build(GRAPHS["broadcast_chain"])
    calls = []
    real = tvm_backend.compile_library

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tvm_backend, "compile_library", counting)
    with config.override(cache_dir=str(tmp_path / "cache")):
        first = kiln.compile(graph, target="tvm-llvm")
        kiln.compile(graph, target="tvm-llvm")
        assert len(calls) == 1
        (library,) = (tmp_path / "cache").glob("*.so")
        library.write_bytes(library.read_bytes()[:100])
        with pytest.warns(UserWarning, match="corrupted or foreign"):
            third = kiln.compile(graph, target="tvm-llvm")
        assert len(calls) == 2
    feeds = _feeds(graph)
    np.testing.assert_array_equal(third.run(feeds)["c"], first.run(feeds)["c"])


def test_device_tensors_in_and_out_through_dlpack():
    graph = build(GRAPHS["mlp"])
    module = kiln.compile(graph, target="tvm-llvm")
    feeds = _feeds(graph)
    on_device = module.executable.to_device(feeds["x"])
    (out,) = module.executable.run_device([on_device])
    np.testing.assert_allclose(np.from_dlpack(out), module.run(feeds)["p"], rtol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
def test_small_determinants_lower_as_leibniz_sums(target):
    """Det up to 4x4 (a batch of each order from 1) against eager's float64 LU."""
    for n in range(1, 5):
        graph = parse_graph(f"graph g(%x: f32[3,{n},{n}]) {{\n  %d: f32[3] = Det(%x)\n  return %d\n}}")
        feeds = _feeds(graph, seed=n)
        want = kiln.compile(graph).run(feeds)["d"]
        np.testing.assert_allclose(kiln.compile(graph, target=target).run(feeds)["d"], want, rtol=1e-5, atol=1e-6, err_msg=f"{n}x{n}")


def test_unlowered_ops_are_named_and_arch_is_checked():
    graph = parse_graph(
        """
        graph g(%x: f32[3,5,5]) {
          %a: f32[3] = Det(%x)
          return %a
        }"""
    )
    with pytest.raises(KilnError, match="tvm-llvm: no TVM lowering yet for Det"):
        kiln.compile(graph, target="tvm-llvm")
    with pytest.raises(KilnError, match="--arch applies to target tvm-cuda"):
        kiln.compile(build(GRAPHS["mlp"]), target="llvm", arch="sm_90")


@pytest.mark.skipif(cuda_available(), reason="checks what happens where no GPU is visible")
def test_cuda_modules_compile_and_save_without_a_gpu_and_say_so_when_run(tmp_path):
    """The artifact of a GPU-less compile holds the CUDA library; running it here (compiled or
    loaded) names the missing device."""
    module = kiln.compile(build(GRAPHS["mlp"]), target="tvm-cuda", arch="sm_90")
    module.save(tmp_path / "mlp.kiln")
    loaded = kiln.load(tmp_path / "mlp.kiln")
    assert loaded.executable.library == module.executable.library
    feeds = _feeds(module.graph, 2)
    for runnable in (module, loaded):
        with pytest.raises(KilnError, match="no CUDA device is visible"):
            runnable.run(feeds)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", ["f32", "i8"])
@pytest.mark.parametrize("storage_order", [0, 1])
def test_max_pool_indices_name_the_first_maximum_in_window_order(storage_order, dtype, target):
    """Ties everywhere (small integers): the index is the first maximum in row-major window
    order, flat into the channels-first input, spatial axes column-major for storage_order 1."""
    graph = parse_graph(
        f"""graph g(%x: {dtype}[2,16,9,7]) {{
  %y: {dtype}[2,16,5,4], %i: i64[2,16,5,4] = MaxPool(%x) {{kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], storage_order={storage_order}}}
  return %y, %i
}}"""
    )
    x = np.random.default_rng(0).integers(-5, 5, (2, 16, 9, 7)).astype(np.float32 if dtype == "f32" else np.int8)
    want = kiln.compile(graph).run({"x": x})
    got = kiln.compile(graph, target=target).run({"x": x})
    np.testing.assert_array_equal(got["y"], want["y"])
    np.testing.assert_array_equal(got["i"], want["i"])
