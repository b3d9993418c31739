"""``kiln.Tensor``: one value of the Python DSL, eager (a numpy array) or traced (a graph Value).

Every DSL operation goes through ``apply(op, inputs, attrs)``, which either runs the op's
numpy reference at once (eager mode) or adds a node to the graph being traced. Both paths
run the op's shape rule first, so a shape error is the same error in both modes, and it
names the line of user code that made the call (``model.py:12 in forward: ...``).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from kiln.errors import KilnError
from kiln.ir.dtypes import DType
from kiln.ir.graph import Graph, Value, infer_types
from kiln.ir.opdef import OpDef, get_op
from kiln.ir.types import TensorType


class DSLError(KilnError):
    """An error in DSL code; the message starts with the user's file and line."""


class Tensor:
    """An n-dimensional array in the DSL: numpy-like operators and broadcasting.

    ``Tensor(data)`` makes an eager tensor from anything ``numpy.asarray`` accepts (Python
    floats become float32, ints int64). Inside ``kiln.trace`` tensors are symbolic: they have
    a shape and dtype but no values, and reading them (``.numpy()``) is an error.
    """

    __slots__ = ("_data", "_value", "type")
    __array_priority__ = 100  # numpy defers to Tensor's reflected operators

    def __init__(self, data: Any = None, *, _value: Value | None = None):
        if _value is not None:
            self._data, self._value, self.type = None, _value, _value.type
            return
        array = _as_array(data)
        self._data, self._value, self.type = array, None, TensorType.of(array)

    # -- what it is ---------------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        return self.type.shape

    @property
    def dtype(self) -> DType:
        return self.type.dtype

    @property
    def ndim(self) -> int:
        return self.type.rank

    @property
    def size(self) -> int:
        return self.type.numel

    @property
    def is_traced(self) -> bool:
        return self._value is not None

    def numpy(self) -> np.ndarray:
        """The values (eager tensors only)."""
        if self._data is None:
            raise _error(f"cannot read the values of traced tensor %{self._value.name}: {self.type} while tracing")
        return self._data

    def __array__(self, dtype=None, copy=None):
        array = self.numpy()
        return array if dtype is None else array.astype(dtype)

    def item(self) -> Any:
        return self.numpy().item()

    def __len__(self) -> int:
        if not self.shape:
            raise _error("len() of a 0-d tensor")
        return self.shape[0]

    def __bool__(self) -> bool:
        if self._data is None:
            raise _error("the truth value of a traced tensor is not known while tracing (no data-dependent Python control flow)")
        return bool(self._data)

    def __repr__(self) -> str:
        if self._data is None:
            return f"Tensor(traced %{self._value.name}: {self.type})"
        return f"Tensor({np.array2string(self._data, threshold=20, precision=4)}, {self.type})"

    __hash__ = object.__hash__

    # -- operators (numpy broadcasting) ---------------------------------------------------------
    def __add__(self, other): return _binary("Add", self, other)
    def __radd__(self, other): return _binary("Add", other, self)
    def __sub__(self, other): return _binary("Sub", self, other)
    def __rsub__(self, other): return _binary("Sub", other, self)
    def __mul__(self, other): return _binary("Mul", self, other)
    def __rmul__(self, other): return _binary("Mul", other, self)
    def __truediv__(self, other): return _binary("Div", self, other)
    def __rtruediv__(self, other): return _binary("Div", other, self)
    def __pow__(self, other): return _binary("Pow", self, other)
    def __rpow__(self, other): return _binary("Pow", other, self)
    def __matmul__(self, other): return _binary("MatMul", self, other)
    def __rmatmul__(self, other): return _binary("MatMul", other, self)
    def __mod__(self, other): return _binary("Mod", self, other)
    def __lt__(self, other): return _binary("Less", self, other)
    def __le__(self, other): return _binary("LessOrEqual", self, other)
    def __gt__(self, other): return _binary("Greater", self, other)
    def __ge__(self, other): return _binary("GreaterOrEqual", self, other)
    def __eq__(self, other): return _binary("Equal", self, other)  # type: ignore[override]
    def __ne__(self, other): return apply("Not", [_binary("Equal", self, other)])  # type: ignore[override]
    def __and__(self, other): return _binary("And", self, other)
    def __or__(self, other): return _binary("Or", self, other)
    def __xor__(self, other): return _binary("Xor", self, other)
    def __invert__(self): return apply("Not", [self])
    def __neg__(self): return apply("Neg", [self])
    def __pos__(self): return self
    def __abs__(self): return apply("Abs", [self])

    def __getitem__(self, index):
        from kiln.frontend.dsl.indexing import getitem

        return getitem(self, index)

    # -- methods (the functions of kiln.nn.functional that take a tensor first) -----------------
    def __getattr__(self, name: str):
        from kiln.frontend.dsl import functional

        fn = functional.TENSOR_METHODS.get(name)
        if fn is None:
            raise AttributeError(f"'Tensor' object has no attribute {name!r}")
        return lambda *args, **kwargs: fn(self, *args, **kwargs)

    @property
    def T(self) -> "Tensor":
        return apply("Transpose", [self], {"perm": list(range(self.ndim))[::-1]})


def _as_array(data: Any) -> np.ndarray:
    if isinstance(data, Tensor):
        return data.numpy()
    array = np.asarray(data)
    if array.dtype == np.float64 and not isinstance(data, np.ndarray):
        array = array.astype(np.float32)  # Python floats: float32, like every DL framework
    try:
        DType.from_numpy(array.dtype)
    except ValueError:
        raise _error(f"numpy dtype {array.dtype} has no kiln dtype") from None
    return array


def _binary(op: str, a: Any, b: Any) -> Tensor:
    return apply(op, [a, b])


# -- tracing state -------------------------------------------------------------------------------
class Tracer:
    """The graph being built by ``kiln.trace``, and what it knows about the Python objects."""

    def __init__(self, name: str = "main"):
        self.graph = Graph(name)
        self.bound: dict[int, Value] = {}  # id(eager tensor) -> its parameter in the graph
        self.keep: list[Tensor] = []  # bound tensors stay alive, so their ids stay unique
        self.scopes: list[str] = []
        self.counts: dict[str, int] = {}
        self.updates: dict[Value, Value] = {}  # state parameter -> its new value (BatchNorm statistics)

    def bind(self, tensor: Tensor, name: str) -> Value:
        """Make the eager ``tensor`` the graph parameter ``name`` (for module parameters)."""
        value = self.graph.add_param(self.graph.fresh_name(name), tensor.numpy())
        self.bound[id(tensor)] = value
        self.keep.append(tensor)
        return value

    def value_of(self, tensor: Tensor) -> Value:
        if tensor._value is not None:
            return tensor._value
        value = self.bound.get(id(tensor))
        if value is None:
            value = self.bind(tensor, "_const")
        return value

    def record_update(self, state: Tensor, new: Tensor) -> None:
        """Note that the step being traced replaces ``state`` (a module buffer) with ``new``."""
        self.updates[self.value_of(state)] = self.value_of(new)

    def node_name(self, op: str) -> str:
        scope = self.scopes[-1] if self.scopes else ""  # a full dotted module path
        base = f"{scope}/{op}" if scope else op
        n = self.counts.get(base, 0)
        self.counts[base] = n + 1
        return base if n == 0 else f"{base}_{n}"


_TRACER: contextvars.ContextVar[Tracer | None] = contextvars.ContextVar("kiln_tracer", default=None)


def current_tracer() -> Tracer | None:
    return _TRACER.get()


@contextlib.contextmanager
def tracing(tracer: Tracer) -> Iterator[Tracer]:
    token = _TRACER.set(tracer)
    try:
        yield tracer
    finally:
        _TRACER.reset(token)


@contextlib.contextmanager
def scope(name: str) -> Iterator[None]:
    """Name the nodes traced inside after ``name`` (a module path such as ``layer1.0.conv1``)."""
    tracer = _TRACER.get()
    if tracer is None or not name:
        yield
        return
    tracer.scopes.append(name)
    try:
        yield
    finally:
        tracer.scopes.pop()


# -- the one entry point of every DSL op ----------------------------------------------------------
def apply(op: str | OpDef, inputs: Sequence[Any], attrs: Mapping[str, Any] | None = None, num_outputs: int | None = None) -> Any:
    """Run (eager) or record (tracing) ``op`` on ``inputs``; one Tensor, or a tuple for several outputs.

    Inputs may be Tensors, arrays or Python scalars (``None`` for an absent optional input);
    a scalar takes the dtype of the first tensor input, as ``x + 1`` expects. While tracing, an
    op whose inputs are all constants is evaluated at once (as the ONNX importer folds them).
    """
    opdef = get_op(op) if isinstance(op, str) else op
    tensors = _as_tensors(inputs)
    while tensors and tensors[-1] is None:
        tensors.pop()  # absent trailing optional inputs are left off, as the importer does
    tracer = _TRACER.get()
    try:
        attrs = {k: _float32_attr(v) for k, v in opdef.complete_attrs(attrs or {}).items()}
        if tracer is not None and (any(t is not None and t.is_traced for t in tensors) or not opdef.deterministic):
            values = [tracer.value_of(t) if t is not None else None for t in tensors]
            node = tracer.graph.add_node(opdef, values, attrs, name=tracer.node_name(opdef.name), num_outputs=num_outputs)
            outs = [Tensor(_value=v) for v in node.outputs]
        else:
            outs = _run_eager(opdef, attrs, tensors, num_outputs)
    except DSLError:
        raise
    except KilnError as err:
        raise _error(str(err)) from None
    return outs[0] if len(outs) == 1 else tuple(outs)


def _float32_attr(value: Any) -> Any:
    """Float attributes at float32 precision, as ONNX stores them (so exports import back equal)."""
    if isinstance(value, float):
        return float(np.float32(value))
    if isinstance(value, list) and any(isinstance(v, float) for v in value):
        return [float(np.float32(v)) if isinstance(v, float) else v for v in value]
    return value


def _run_eager(opdef: OpDef, attrs: dict, tensors: list[Tensor | None], num_outputs: int | None) -> list[Tensor]:
    probes = [Value(f"in{i}", t.type) if t is not None else None for i, t in enumerate(tensors)]
    types = infer_types(opdef, attrs, probes, opdef.name)
    with np.errstate(all="ignore"):
        try:
            arrays = opdef.run_eager(attrs, [t.numpy() if t is not None else None for t in tensors])
        except (ValueError, IndexError, TypeError) as err:
            raise KilnError(f"{opdef.name} failed: {err}") from None
    count = num_outputs if num_outputs is not None else len(types)
    outs = []
    for array, t in zip(arrays[:count], types):
        outs.append(Tensor(np.asarray(array, dtype=t.dtype.numpy).reshape(t.shape)))
    return outs


def _as_tensors(inputs: Sequence[Any]) -> list[Tensor | None]:
    like = next((x for x in inputs if isinstance(x, Tensor)), None)
    out: list[Tensor | None] = []
    for x in inputs:
        if x is None or isinstance(x, Tensor):
            out.append(x)
        elif isinstance(x, (bool, int, float)) and like is not None:
            out.append(Tensor(np.asarray(x, dtype=like.dtype.numpy)))
        else:
            out.append(Tensor(x))
    return out


# -- errors that point at user code ----------------------------------------------------------------
_INTERNAL = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (__file__, sys.modules[Graph.__module__].__file__)
)


def user_frame() -> str:
    """``file:line in function`` of the innermost caller outside kiln's DSL and IR code."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if not path.startswith(_INTERNAL):
            return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return "<unknown>"


def _error(message: str) -> DSLError:
    return DSLError(f"{user_frame()}: {message}")
