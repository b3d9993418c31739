"""``tensor[index]``: basic numpy indexing as Slice/Reshape, a tensor index as Gather."""

from __future__ import annotations

from typing import Any

from kiln.frontend.dsl.tensor import Tensor, _error, apply


def getitem(x: Tensor, index: Any) -> Tensor:
    """Integers, slices (with steps), ``None``, ``...`` and one integer tensor or list per axis."""
    items = list(index) if isinstance(index, tuple) else [index]
    if sum(1 for i in items if i is Ellipsis) > 1:
        raise _error("an index can have only one ellipsis ('...')")
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    if consumed > x.ndim:
        raise _error(f"too many indices for a tensor of rank {x.ndim}: {index!r}")
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (x.ndim - consumed)
    else:
        items += [slice(None)] * (x.ndim - consumed)

    starts, ends, axes, steps = [], [], [], []
    gathers: list[tuple[int, Any]] = []
    out_shape: list[int] = []  # shape after slicing, with None for new axes and dropped ints
    axis = 0
    for item in items:
        if item is None:
            out_shape.append(1)
            continue
        dim = x.shape[axis]
        if isinstance(item, bool) or not isinstance(item, (int, slice, Tensor, list)):
            raise _error(f"unsupported index {item!r} at axis {axis}")
        if isinstance(item, int):
            if not -dim <= item < dim:
                raise _error(f"index {item} is out of range for axis {axis} of size {dim}")
            i = item % dim
            starts.append(i), ends.append(i + 1), axes.append(axis), steps.append(1)
        elif isinstance(item, slice):
            start, stop, step = item.indices(dim)
            if step < 0 and stop < 0:
                stop = -dim - 1  # "before the first element", as Python slicing reads it
            if (start, stop, step) != (0, dim, 1):
                starts.append(start), ends.append(stop), axes.append(axis), steps.append(step)
            out_shape.append(len(range(dim)[item]))
        else:
            gathers.append((len(out_shape), item))
            out_shape.append(-1)
        axis += 1
    if len(gathers) > 1:
        raise _error("only one tensor (advanced) index per indexing expression is supported")
    y = x
    if starts:
        y = apply("Slice", [y], {"starts": starts, "ends": ends, "axes": axes, "steps": steps})
    shape = [y.shape[_source_axis(items, i)] if d == -1 else d for i, d in enumerate(out_shape)]
    if list(y.shape) != shape:
        y = apply("Reshape", [y], {"shape": shape})
    if gathers:
        at, indices = gathers[0]
        indices = indices if isinstance(indices, Tensor) else Tensor(indices)
        y = apply("Gather", [y, indices], {"axis": at})
    return y


def _source_axis(items: list, position: int) -> int:
    """The input axis behind output position ``position`` (skipping ``None`` entries)."""
    axis = -1
    out = -1
    for item in items:
        if item is None:
            out += 1
            continue
        axis += 1
        if not isinstance(item, int):
            out += 1
        if out == position:
            return axis
    raise AssertionError(position)
