"""OpDef: everything kiln knows about one op, defined once, and the registry of them.

An op family module (``ir/ops/nn.py``...) builds each OpDef with its shape rule (``infer``)
and its numpy reference (``eager``) side by side and registers it. Later stages fill the
remaining hooks on the same record: ``vjp`` (autodiff, a graph-building gradient rule) and
``compute`` (what the LLVM and TVM backends lower). Passes ask ``op.kind``, never op names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:
    from kiln.ir.types import TensorType


class OpKind(Enum):
    """How an op reads its inputs; the fusion rules (TVM FuseOps style) key on this."""

    ELEMENTWISE = "elementwise"  # out[i] = f(in[i]) with numpy broadcasting
    INJECTIVE = "injective"  # each output element reads one input element (reshape, slice)
    REDUCTION = "reduction"  # reduces along axes (sum, softmax, norms)
    HEAVY = "heavy"  # conv, matmul, pooling, RNNs: named kernels, never fused together
    OPAQUE = "opaque"  # anything else (sort, scatter, loss with gathers)


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()

InferFn = Callable[[dict, "list[TensorType | None]"], "list[TensorType]"]
EagerFn = Callable[..., "np.ndarray | Sequence[np.ndarray]"]


@dataclass(eq=False)
class OpDef:
    """One op: attribute schema, arity, shape rule, numpy reference and backend hooks.

    ``infer(attrs, input_types) -> output_types`` raises ``TypeInferenceError`` with a message
    (the caller adds the node's name). ``eager(attrs, *arrays)`` returns one array or a tuple.
    ``num_inputs``/``num_outputs`` are ``(min, max)`` with ``max=None`` for variadic; absent
    optional inputs are ``None``.
    """

    name: str
    kind: OpKind
    infer: InferFn
    eager: EagerFn
    attrs: Mapping[str, Any] = field(default_factory=dict)
    num_inputs: tuple[int, int | None] = (1, 1)
    num_outputs: tuple[int, int | None] = (1, 1)
    doc: str = ""
    deterministic: bool = True  # False for ops that draw random numbers: never folded
    # folded from parameters by canonicalize whatever its size (not only up to
    # KILN_FOLD_ELEMENTS): what it makes is a weight the model would otherwise rebuild every run
    # (a dequantized int8 weight). The importer keeps it a node, for the passes that compute on
    # the integers under it (integer_products).
    folds_any_size: bool = False
    vjp: Callable | None = None  # filled by the autodiff issue
    compute: Any = None  # lowering description, filled by the backends

    def complete_attrs(self, given: Mapping[str, Any]) -> dict[str, Any]:
        """``given`` with defaults filled in; unknown or missing required attributes raise."""
        from kiln.errors import TypeInferenceError

        unknown = set(given) - set(self.attrs)
        if unknown:
            raise TypeInferenceError(f"{self.name} has no attribute(s) {sorted(unknown)}")
        out: dict[str, Any] = {}
        for key, default in self.attrs.items():
            if key in given:
                out[key] = given[key]
            elif default is REQUIRED:
                raise TypeInferenceError(f"{self.name} needs attribute {key!r}")
            else:
                out[key] = default
        return out

    def run_eager(self, attrs: Mapping[str, Any], inputs: Sequence[np.ndarray | None]) -> tuple[np.ndarray, ...]:
        result = self.eager(attrs, *inputs)
        if isinstance(result, np.ndarray) or np.isscalar(result):
            return (np.asarray(result),)
        return tuple(result)

    def __repr__(self) -> str:
        return f"OpDef({self.name})"


_REGISTRY: dict[str, OpDef] = {}


def register(op: OpDef) -> OpDef:
    """Add ``op`` to the registry; a second op of the same name is an error."""
    if op.name in _REGISTRY:
        raise ValueError(f"op {op.name!r} is registered twice")
    _REGISTRY[op.name] = op
    return op


def get_op(name: str) -> OpDef:
    """The registered op called ``name``."""
    _load_ops()
    try:
        return _REGISTRY[name]
    except KeyError:
        from kiln.errors import GraphError

        raise GraphError(f"unknown op {name!r}") from None


def all_ops() -> dict[str, OpDef]:
    _load_ops()
    return dict(_REGISTRY)


def _load_ops() -> None:
    import kiln.ir.ops  # noqa: F401  (registers every family)
