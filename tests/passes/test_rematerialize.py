"""rematerialize: a cheap value read again far later is rebuilt there, which frees its bytes in
between; results stay the same."""

from __future__ import annotations

import numpy as np

import kiln
from kiln.ir import parse_graph
from kiln.ir.evaluate import evaluate
from kiln.models import zoo
from kiln.optim import SGD
from kiln.passes import get_pass
from kiln.passes.plan_memory import plan_memory


def _long_gap_graph(steps: int = 20):
    chain = "\n".join(f"  %a{i + 1}: f32[64,64] = MatMul(%a{i}, %w)" for i in range(1, steps))
    return parse_graph(
        f"""graph g(%x: f32[64,64], %w: f32[64,64]) {{
          %r: f32[64,64] = Relu(%x)
          %a1: f32[64,64] = MatMul(%r, %w)
        {chain}
          %y: f32[64,64] = Mul(%a{steps}, %r)
          return %y
        }}"""
    )


def test_a_value_read_far_apart_is_rebuilt_and_its_bytes_freed():
    graph = _long_gap_graph()
    before = plan_memory(graph).arena_bytes
    rng = np.random.default_rng(0)
    feeds = [rng.standard_normal((64, 64)).astype(np.float32), (rng.standard_normal((64, 64)) * 0.1).astype(np.float32)]
    want = evaluate(graph, feeds)
    after_graph = get_pass("rematerialize")(graph)
    relus = [n for n in after_graph.nodes if n.op.name == "Relu"]
    assert len(relus) == 2 and after_graph.nodes.index(relus[1]) == len(after_graph.nodes) - 2
    assert plan_memory(after_graph).arena_bytes < before
    np.testing.assert_array_equal(evaluate(after_graph, feeds)[0], want[0])


def test_a_short_gap_or_a_dead_input_leaves_the_graph_alone():
    graph = _long_gap_graph(steps=4)  # read again 4 nodes later: not worth a copy
    assert len(get_pass("rematerialize")(graph).nodes) == len(graph.nodes)
    # the Relu's input made by a MatMul nobody reads later: rebuilding would keep it alive instead
    text = str(_long_gap_graph()).replace("%r: f32[64,64] = Relu(%x)", "%t: f32[64,64] = MatMul(%x, %w)\n  %r: f32[64,64] = Relu(%t)")
    graph = parse_graph(text)
    assert len(get_pass("rematerialize")(graph).nodes) == len(graph.nodes)


def test_recomputing_training_steps_use_less_memory_for_the_same_parameters():
    shape = (8, 3, 32, 32)
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    y = np.arange(8) % 5
    results = {}
    for recompute in (False, True):
        trainer = kiln.train.Trainer(zoo.build("resnet18", width=4, layers=(1, 1, 1, 1), num_classes=5), loss="ce", optimizer=SGD(lr=0.05, momentum=0.9), target="llvm", recompute=recompute)
        for _ in range(3):
            trainer.step(x, y)
        module = trainer._step_module(x)[1]
        results[recompute] = (trainer.values, module.executable.layout["arena_bytes"])
    (keep, keep_bytes), (remat, remat_bytes) = results[False], results[True]
    assert remat_bytes < keep_bytes
    for key, want in keep.items():
        np.testing.assert_allclose(remat[key], want, rtol=1e-5, atol=1e-6, err_msg=key)
