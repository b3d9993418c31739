"""The PassManager, the registry, custom passes and plugins, and the CLI's pass options."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest

import kiln
from kiln.cli import main
from kiln.errors import GraphError, KilnError
from kiln.ir import Graph, parse_graph
from kiln.passes import Pass, PassManager, get_pass, graph_pass, register_pass

TEXT = """
graph g(%x: f32[4]) {
  %a: f32[4] = Identity(%x)
  %y: f32[4] = Exp(%a)
  return %y
}"""


class ExpToSigmoid(Pass):
    """Replace every Exp by a Sigmoid (a deliberately wrong pass, for testing)."""

    name = "test_exp_to_sigmoid"

    def run(self, graph: Graph) -> Graph:
        from kiln.ir import get_op

        for node in graph.nodes:
            if node.op.name == "Exp":
                node.op = get_op("Sigmoid")
        return graph


register_pass(ExpToSigmoid)


@graph_pass("test_break_types")
def break_types(graph: Graph) -> None:
    """Leave a stale type behind (the verifier must catch it)."""
    graph.nodes[-1].outputs[0].type = graph.nodes[-1].outputs[0].type.with_shape((5,))


def test_records_dumps_and_registry(tmp_path):
    manager = PassManager(["remove_noops", ExpToSigmoid()], tmp_path)
    graph = manager.run(parse_graph(TEXT))
    assert [n.op.name for n in graph.nodes] == ["Sigmoid"]
    assert [(r.name, r.nodes_before, r.nodes_after) for r in manager.records] == [
        ("remove_noops", 2, 1),
        ("test_exp_to_sigmoid", 1, 1),
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "001_remove_noops.after.txt",
        "001_remove_noops.before.txt",
        "002_test_exp_to_sigmoid.after.txt",
        "002_test_exp_to_sigmoid.before.txt",
    ]
    assert "Identity" in (tmp_path / "001_remove_noops.before.txt").read_text()
    assert get_pass("test_exp_to_sigmoid").name == "test_exp_to_sigmoid"


def test_the_verifier_names_the_pass_that_broke_the_graph():
    with pytest.raises(GraphError, match="after pass 'test_break_types'"):
        PassManager(["test_break_types"]).run(parse_graph(TEXT))


def test_unknown_passes_and_pipelines_are_named():
    with pytest.raises(KilnError, match="unknown pass 'nope'"):
        get_pass("nope")
    with pytest.raises(KilnError, match="unknown pipeline 'O9'"):
        kiln.optimize(parse_graph(TEXT), "O9")


def test_compile_runs_custom_passes_and_never_edits_the_callers_graph():
    graph = parse_graph(TEXT)
    module = kiln.compile(graph, passes=["test_exp_to_sigmoid"])
    x = np.array([0.0, 1.0, -1.0, 2.0], np.float32)
    np.testing.assert_allclose(module.run({"x": x})["y"], 1 / (1 + np.exp(-x)), rtol=1e-6)
    assert [n.op.name for n in graph.nodes] == ["Identity", "Exp"]


def test_a_plugin_module_registers_passes_for_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_kiln_plugin.py").write_text(
        textwrap.dedent(
            '''
            from kiln.passes import graph_pass

            @graph_pass("plugin_drop_relu")
            def drop_relu(graph):
                """Remove every Relu (a test plugin)."""
                from kiln.passes.rewrite import substitute
                for node in list(graph.nodes):
                    if node.op.name == "Relu" and substitute(graph, node.outputs[0], node.inputs[0]):
                        graph.remove_nodes([node])
            '''
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["inspect", "light_squeezenet", "--pass-plugin", "my_kiln_plugin", "--passes", "plugin_drop_relu", "--time-passes"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "plugin_drop_relu" in captured.err and "Relu" not in captured.out.split("op histogram")[1]
    assert main(["inspect", "light_squeezenet", "--pass-plugin", "no_such_plugin_module"]) == 1
    assert "no_such_plugin_module" in capsys.readouterr().err
    sys.modules.pop("my_kiln_plugin", None)


def test_cli_O2_and_dump_ir(tmp_path, capsys):
    assert main(["inspect", "light_resnet50", "-O2", "--no-ir", "--dump-ir", str(tmp_path / "ir")]) == 0
    out = capsys.readouterr().out
    assert "BatchNormalization" not in out
    assert len(list((tmp_path / "ir").glob("0[0-9][0-9]_fold_batchnorm_conv.after.txt"))) == 1


def test_cli_memory_report_as_json(capsys):
    import json

    assert main(["inspect", "light_squeezenet", "-O2", "--memory", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out)
    assert set(figures) == {"naive_bytes", "planned_bytes", "lower_bound_bytes"}
    assert figures["lower_bound_bytes"] <= figures["planned_bytes"] <= figures["naive_bytes"]
    assert main(["inspect", "light_squeezenet", "--json"]) == 2
