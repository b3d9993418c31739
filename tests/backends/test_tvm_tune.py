"""``--tune``: MetaSchedule tunes the TVM targets' kernels, keeps the records in kiln's cache and
a later compile reuses them; tuned code still matches eager. Run on tvm-llvm (CI has no GPU)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sample_graphs import GRAPHS, build

import kiln
from kiln import config
from kiln.backends.tvm import TVMTarget, legalize
from kiln.backends.tvm.lower import to_relax
from kiln.cli import main
from kiln.errors import KilnError

TRIALS = 6


def _records(folder):
    return [json.loads(line) for line in (folder / "database_tuning_record.json").read_text().splitlines()]


def _tasks(graph):
    from tvm.s_tir import meta_schedule as ms

    target = TVMTarget("llvm").tvm_target()
    return [t.dispatched[0] for t in ms.relax_integration.extract_tasks(legalize(to_relax(graph), target), target)]


def test_tuned_kernels_match_eager_and_a_second_compile_reuses_the_records(tmp_path, monkeypatch):
    from tvm.s_tir import meta_schedule as ms

    graph = build(GRAPHS["mlp"])
    rng = np.random.default_rng(0)
    feeds = {"x": rng.standard_normal((5, 16)).astype(np.float32)}
    want = kiln.compile(graph).run(feeds)["p"]
    with config.override(cache_dir=str(tmp_path)):
        tuned = kiln.compile(graph, target="tvm-llvm", tune=TRIALS)
        np.testing.assert_allclose(tuned.run(feeds)["p"], want, rtol=1e-5, atol=1e-6)
        folder = tmp_path / "tune" / "tvm-llvm"
        records = _records(folder)
        assert 0 < len(records) <= TRIALS
        db = ms.database.JSONDatabase(work_dir=str(folder))
        kernels = _tasks(tuned.graph)
        assert kernels and all(db.has_workload(k) and db.get_top_k(db.commit_workload(k), 1) for k in kernels)

        def no_tuning(**kwargs):
            raise AssertionError("tuned again")

        monkeypatch.setattr(ms.tune, "tune_tasks", no_tuning)
        for library in tmp_path.glob("*.so"):  # not the compile cache: the tuning records are reused
            library.unlink()
        again = kiln.compile(graph, target="tvm-llvm", tune=TRIALS)
        np.testing.assert_allclose(again.run(feeds)["p"], want, rtol=1e-5, atol=1e-6)
        assert len(_records(folder)) == len(records)


def test_tuning_is_for_the_tvm_targets_and_names_what_is_missing(monkeypatch):
    graph = build(GRAPHS["mlp"])
    with pytest.raises(KilnError, match="--tune applies to targets tvm-llvm and tvm-cuda, not 'llvm'"):
        kiln.compile(graph, target="llvm", tune=8)
    with pytest.raises(KilnError, match="number of trials >= 1"):
        kiln.compile(graph, target="tvm-llvm", tune=0)

    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "xgboost" else real(name, *a))
    with config.override(cache_dir="off"), pytest.raises(KilnError, match=r"--tune needs xgboost-cpu: pip install 'kiln\[tune\]'"):
        kiln.compile(graph, target="tvm-llvm", tune=8)


def test_the_command_line_takes_tune_for_onnx_models_only(tmp_path, capsys):
    assert main(["compile", "mlp", "-t", "llvm", "--tune", "4", "-o", str(tmp_path / "m.kiln")]) == 1
    assert "--tune applies to targets tvm-llvm and tvm-cuda" in capsys.readouterr().err
    assert main(["compile", "mlp", "-t", "tvm-llvm", "--tune", "0"]) == 2
    assert "Invalid value for '--tune'" in capsys.readouterr().err
    assert main(["compile", "mlp", "-o", str(tmp_path / "m.kiln")]) == 0
    assert main(["run", str(tmp_path / "m.kiln"), "--tune", "4"]) == 2
    assert "an artifact is already compiled" in capsys.readouterr().err
