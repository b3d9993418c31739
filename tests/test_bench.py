"""kiln bench: rows for every runtime, outputs checked against eager, JSON for scripts."""

from __future__ import annotations

import json

from kiln.bench import bench
from kiln.cli import main


def test_bench_rows_check_outputs_and_ratios():
    rows = bench("light_squeezenet", "llvm", ("eager", "onnxruntime"), warmup=1, repeat=3)
    names = [r.runtime for r in rows]
    assert names == ["kiln llvm", "kiln eager", "onnxruntime"]
    assert all(r.matches_eager for r in rows)
    eager = rows[1]
    assert eager.speedup_vs_eager == 1.0 and eager.max_abs_err == 0.0
    assert rows[0].arena_bytes and rows[0].arena_bytes > 0
    assert all(r.p90_ms >= r.median_ms > 0 for r in rows)


def test_cli_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "light_squeezenet", "--vs", "eager", "--warmup", "0", "--repeat", "2", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["runtime"] for r in data["rows"]] == ["kiln llvm", "kiln eager"]
    assert "median ms" in capsys.readouterr().out
    assert main(["bench", "light_squeezenet", "--vs", "mxnet", "--repeat", "1"]) == 1


def test_tvm_peer_builds_with_tvms_own_importer_and_matches():
    rows = bench("lenet5", "llvm", ("tvm",), shapes={"input": (2, 1, 32, 32)}, warmup=0, repeat=2)
    assert [r.runtime for r in rows] == ["kiln llvm", "tvm", "kiln eager"]
    assert all(r.matches_eager for r in rows) and rows[1].setup_s > 0


def test_cli_bench_profile_lists_the_costliest_nodes_and_ops(capsys):
    assert main(["bench", "light_squeezenet", "--vs", "eager", "--warmup", "0", "--repeat", "2", "--profile", "3"]) == 0
    printed = capsys.readouterr().out
    assert "the costliest nodes" in printed and "time per op" in printed and "Fused(" in printed
    rows = bench("light_squeezenet", "llvm", ("eager",), warmup=0, repeat=2, profile=True)
    times = rows[0].profile
    assert times and rows[1].profile is None
    assert abs(sum(t.share for t in times) - 1) < 1e-9
