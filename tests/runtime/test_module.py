"""Module.run checks its inputs; artifacts save, load and refuse to be tampered with."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest

import kiln
from kiln.errors import ArtifactError, InputError


@pytest.fixture(scope="module")
def squeezenet():
    from kiln.models import builtin_models

    return kiln.compile(builtin_models()["light_squeezenet"])


def image(module, seed=0):
    (name, t), = module.input_types.items()
    return {name: np.random.default_rng(seed).standard_normal(t.shape).astype(np.float32)}


def test_run_returns_named_outputs(squeezenet):
    out = squeezenet.run(image(squeezenet))
    assert list(out) == ["softmaxout_1"]
    assert out["softmaxout_1"].shape == (1, 1000, 1, 1)
    np.testing.assert_allclose(out["softmaxout_1"].sum(), 1.0, rtol=1e-5)


@pytest.mark.parametrize(
    "feeds, message",
    [
        ({}, r"missing input\(s\) \['data_0'\]"),
        ({"data_0": np.zeros((1, 3, 224, 224), np.float32), "extra": np.zeros(1)}, r"unknown input\(s\) \['extra'\]"),
        ({"data_0": np.zeros((1, 3, 224, 224), np.float64)}, r"input 'data_0': expected dtype float32.*got float64.*astype"),
        ({"data_0": np.zeros((1, 3, 32, 32), np.float32)}, r"input 'data_0': expected shape \[1, 3, 224, 224\].*got \[1, 3, 32, 32\]"),
    ],
)
def test_bad_inputs_are_named_before_any_work(squeezenet, feeds, message):
    with pytest.raises(InputError, match=message):
        squeezenet.run(feeds)


def test_save_and_load_give_the_same_outputs(squeezenet, tmp_path):
    path = tmp_path / "sq.kiln"
    squeezenet.save(path)
    loaded = kiln.load(path)
    feeds = image(squeezenet, 1)
    np.testing.assert_array_equal(loaded.run(feeds)["softmaxout_1"], squeezenet.run(feeds)["softmaxout_1"])
    manifest = json.loads(zipfile.ZipFile(path).read("manifest.json"))
    assert manifest["format"] == "kiln-artifact" and manifest["target"] == "eager"
    assert manifest["kiln_version"] == kiln.__version__
    assert manifest["signature"]["inputs"] == [{"name": "data_0", "dtype": "f32", "shape": [1, 3, 224, 224]}]
    assert len(manifest["content_sha256"]) == 64
    assert [p.name for p in tmp_path.iterdir()] == ["sq.kiln"]  # no temp file left behind


def _rewrite(path, change):
    with zipfile.ZipFile(path) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    change(members)
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def test_tampered_artifacts_are_refused(squeezenet, tmp_path):
    path = tmp_path / "sq.kiln"
    squeezenet.save(path)

    def flip_graph(members):
        members["graph.txt"] = members["graph.txt"].replace(b"Relu", b"Sigmoid", 1)

    _rewrite(path, flip_graph)
    with pytest.raises(ArtifactError, match="sq.kiln: corrupted: content does not match"):
        kiln.load(path)


def test_pickled_parameters_are_never_loaded(squeezenet, tmp_path):
    """Even with a matching hash, an npz holding an object array is refused (allow_pickle=False)."""
    from kiln.runtime.artifact import _content_hash

    path = tmp_path / "sq.kiln"
    squeezenet.save(path)

    def pickle_params(members):
        buffer = io.BytesIO()
        np.savez(buffer, p0=np.array([{"evil": 1}], dtype=object))
        members["params.npz"] = buffer.getvalue()
        manifest = json.loads(members["manifest.json"])
        manifest["content_sha256"] = _content_hash({k: v for k, v in members.items() if k != "manifest.json"})
        members["manifest.json"] = json.dumps(manifest).encode()

    _rewrite(path, pickle_params)
    with pytest.raises(ArtifactError, match="corrupted or incompatible graph.*pickle"):
        kiln.load(path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a kiln artifact"),
        (b"PK\x03\x04 truncated zip", "not a kiln artifact"),
        (b"\x89PNG\r\n", "not a kiln artifact"),
    ],
)
def test_non_artifacts_are_refused(tmp_path, content, message):
    path = tmp_path / "bad.kiln"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match=f"bad.kiln: {message}"):
        kiln.load(path)


def test_artifacts_from_a_newer_kiln_are_refused_with_advice(squeezenet, tmp_path):
    path = tmp_path / "sq.kiln"
    squeezenet.save(path)

    def bump(members):
        manifest = json.loads(members["manifest.json"])
        manifest["format_version"] = 99
        members["manifest.json"] = json.dumps(manifest).encode()

    _rewrite(path, bump)
    with pytest.raises(ArtifactError, match="format 99 is newer.*upgrade kiln or recompile"):
        kiln.load(path)


def test_format_1_artifacts_still_load(squeezenet, tmp_path):
    """Format 2 added the int8 panels' column sums; a format 1 artifact has none to pack and
    loads as it is."""
    path = tmp_path / "sq.kiln"
    squeezenet.save(path)

    def back(members):
        manifest = json.loads(members["manifest.json"])
        assert manifest["format_version"] == 2
        manifest["format_version"] = 1
        members["manifest.json"] = json.dumps(manifest).encode()

    _rewrite(path, back)
    feed = {name: np.zeros(t.shape, t.dtype.numpy) for name, t in squeezenet.input_types.items()}
    got, want = kiln.load(path).run(feed), squeezenet.run(feed)
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_a_failed_save_leaves_nothing_behind(squeezenet, tmp_path, monkeypatch):
    import kiln.runtime.artifact as artifact

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifact.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        squeezenet.save(tmp_path / "sq.kiln")
    assert list(tmp_path.iterdir()) == []


def test_compile_accepts_a_path_a_modelproto_and_a_graph(light_model):
    import onnx

    path = light_model("light_bvlc_alexnet")
    by_path = kiln.compile(path)
    by_proto = kiln.compile(onnx.load(path))
    by_graph = kiln.compile(by_proto.graph)
    feeds = image(by_path)
    ref = by_path.run(feeds)
    for module in (by_proto, by_graph):
        for name, value in module.run(feeds).items():
            np.testing.assert_array_equal(value, ref[name])
    with pytest.raises(kiln.KilnError, match="cannot compile a int"):
        kiln.compile(3)
    with pytest.raises(kiln.KilnError, match="unknown target 'fpga'"):
        kiln.compile(path, target="fpga")
