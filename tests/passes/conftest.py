"""Pass tests write graphs as text: Before, the passes to run, Expected (compared canonically,
so value names do not matter), and the outputs must not change."""

from __future__ import annotations

import numpy as np
import pytest

import kiln
from kiln.ir import parse_graph, print_graph, verify
from kiln.passes import run_passes


def random_feeds(graph, seed=0):
    rng = np.random.default_rng(seed)
    return {v.name: rng.standard_normal(v.type.shape).astype(v.type.dtype.numpy) for v in graph.inputs}


def check_rewrite(passes, before: str, expected: str) -> None:
    original = parse_graph(before)
    rewritten = run_passes(original.copy(), passes)
    verify(rewritten)
    assert print_graph(rewritten, canonical=True) == print_graph(parse_graph(expected), canonical=True)
    feeds = random_feeds(original)
    want = kiln.compile(original).run(feeds)
    got = kiln.compile(rewritten).run(feeds)
    assert list(got) == list(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


@pytest.fixture
def rewrites():
    return check_rewrite


@pytest.fixture(name="random_feeds")
def random_feeds_fixture():
    return random_feeds
