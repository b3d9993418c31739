"""Errors kiln raises on bad input. Each says where: the file, the node, the input."""

from __future__ import annotations


class KilnError(Exception):
    """Base of every error kiln raises on purpose; the CLI prints these as one line."""


class ModelLoadError(KilnError):
    """A model file that cannot be read: missing, truncated, not ONNX, unsafe external data."""


class UnsupportedOpsError(KilnError):
    """An import found ops kiln does not implement; lists every one of them at once."""

    def __init__(self, missing: list[tuple[str, str, int, str]], source: str = "model"):
        self.missing = missing
        names = ", ".join(sorted({op for op, *_ in missing}))
        lines = [f"{source}: unsupported op(s): {names}"]
        for op, domain, opset, node in missing:
            lines.append(f"  {domain or 'ai.onnx'}::{op} (opset {opset}) at node {node!r}")
        super().__init__("\n".join(lines))


class GraphError(KilnError):
    """A graph that breaks an IR invariant: cycle, undefined value, bad types."""


class TypeInferenceError(GraphError):
    """An op rejected its input types or attributes."""


class NeedsStaticValue(KilnError):
    """A shape-determining operand is not a compile-time constant.

    ``inputs`` names the graph inputs it depends on: bind them (``constants=``) and
    compile again, as the ONNX backend adapter does per distinct value.
    """

    def __init__(self, message: str, inputs: list[str]):
        self.inputs = inputs
        super().__init__(message)


class ElementCapError(KilnError):
    """A tensor would exceed the element cap (KILN_MAX_ELEMENTS)."""


class InputError(KilnError):
    """Inputs given to ``Module.run`` that do not match its signature."""


class ArtifactError(KilnError):
    """A .kiln artifact that is corrupted, foreign or from an incompatible version."""
