"""Passes, their registry, and the PassManager that runs a pipeline of them.

A pass maps a Graph to a Graph (it may edit its argument in place and return it). Its
docstring states what it needs and what it guarantees. Register it under a name to use it
from ``kiln.compile(..., passes=[...])``, ``kiln compile --passes`` or a pipeline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from kiln import config
from kiln.errors import GraphError, KilnError
from kiln.ir.graph import Graph
from kiln.ir.text import print_graph
from kiln.ir.verify import verify


class Pass:
    """Base class of graph passes. Subclasses set ``name`` and implement ``run``."""

    name: str = ""

    def run(self, graph: Graph) -> Graph:
        raise NotImplementedError

    def __call__(self, graph: Graph) -> Graph:
        return self.run(graph)

    def __repr__(self) -> str:
        return f"<pass {self.name}>"


class FunctionPass(Pass):
    """A pass made from a plain function ``graph -> graph`` (see ``@graph_pass``)."""

    def __init__(self, name: str, fn: Callable[[Graph], Graph | None], doc: str = ""):
        self.name = name
        self.fn = fn
        self.__doc__ = doc or fn.__doc__

    def run(self, graph: Graph) -> Graph:
        result = self.fn(graph)
        return graph if result is None else result


_PASSES: dict[str, Pass] = {}


def register_pass(p: Pass | type[Pass]) -> Pass | type[Pass]:
    """Register a Pass (instance or class with a no-argument constructor) under its ``name``."""
    instance = p() if isinstance(p, type) else p
    if not instance.name:
        raise ValueError(f"{p!r} has no name")
    if instance.name in _PASSES and type(_PASSES[instance.name]) is not type(instance):
        raise ValueError(f"a pass named {instance.name!r} is already registered")
    _PASSES[instance.name] = instance
    return p


def graph_pass(name: str) -> Callable[[Callable[[Graph], Graph | None]], Pass]:
    """Decorator: register a function ``graph -> graph`` (or ``-> None`` for in-place) as a pass."""

    def wrap(fn: Callable[[Graph], Graph | None]) -> Pass:
        p = FunctionPass(name, fn)
        register_pass(p)
        return p

    return wrap


def get_pass(name: str) -> Pass:
    _load_builtin_passes()
    try:
        return _PASSES[name]
    except KeyError:
        raise KilnError(f"unknown pass {name!r}; registered: {', '.join(sorted(_PASSES))}") from None


def all_passes() -> dict[str, Pass]:
    _load_builtin_passes()
    return dict(sorted(_PASSES.items()))


def _load_builtin_passes() -> None:
    from kiln.passes import plugins

    plugins.load_builtin_and_entry_point_passes()


@dataclass
class PassRecord:
    """What one pass did: its time and the node counts before and after."""

    index: int
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int


@dataclass
class PassManager:
    """Runs passes in order: verifies after each (KILN_VERIFY, always in tests), times them,
    and writes the IR before and after each into ``dump_dir`` (``003_fuse.before.txt``)."""

    passes: Sequence[Pass | str]
    dump_dir: Path | None = None
    records: list[PassRecord] = field(default_factory=list)

    def run(self, graph: Graph) -> Graph:
        check = config.flags().verify
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
        for index, item in enumerate(self.passes, 1):
            p = get_pass(item) if isinstance(item, str) else item
            before = len(graph.nodes)
            stem = f"{index:03d}_{p.name}"
            if self.dump_dir is not None:
                (self.dump_dir / f"{stem}.before.txt").write_text(print_graph(graph))
            start = time.perf_counter()
            graph = p.run(graph)
            seconds = time.perf_counter() - start
            if self.dump_dir is not None:
                (self.dump_dir / f"{stem}.after.txt").write_text(print_graph(graph))
            if check:
                try:
                    verify(graph)
                except GraphError as err:
                    raise GraphError(f"after pass {p.name!r}: {err}") from None
            self.records.append(PassRecord(index, p.name, seconds, before, len(graph.nodes)))
        return graph


def run_passes(graph: Graph, passes: Iterable[Pass | str], dump_dir: Path | None = None) -> Graph:
    return PassManager(list(passes), dump_dir).run(graph)
