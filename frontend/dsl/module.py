"""``kiln.nn.Module``: layers with named parameters, buffers and submodules.

Assigning a ``Parameter`` or a ``Module`` to an attribute registers it under that name;
``register_buffer`` adds non-trained state (BatchNorm's running statistics). Names nest with
dots (``layer1.0.conv1.weight``): they are the keys of ``state_dict()``, the parameter names
of a traced graph, and the initializer names of an ONNX export.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Mapping

import numpy as np

from kiln.errors import KilnError
from kiln.fileio import npz_bytes, write_atomic
from kiln.frontend.dsl.tensor import Tensor, scope


class Parameter(Tensor):
    """A trainable tensor owned by a Module (always eager; its array may be replaced)."""

    __slots__ = ()

    def assign(self, array: np.ndarray) -> None:
        """Replace the values (same shape and dtype)."""
        array = np.asarray(array)
        if array.shape != self.shape or array.dtype != self.dtype.numpy:
            raise KilnError(f"cannot assign {array.dtype}{list(array.shape)} to a parameter of type {self.type}")
        self._data = array


class Module:
    """Base class of every layer and model: subclass it and write ``forward``."""

    training: bool

    def __init__(self) -> None:
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_modules", {})
        object.__setattr__(self, "_name", "")
        object.__setattr__(self, "training", True)

    def __setattr__(self, name: str, value: Any) -> None:
        if "_parameters" not in self.__dict__:
            raise KilnError(f"{type(self).__name__}: call super().__init__() before assigning attributes")
        for table in (self._parameters, self._buffers, self._modules):
            table.pop(name, None)
        if isinstance(value, Parameter):
            self._parameters[name] = value
        elif isinstance(value, Module):
            self._modules[name] = value
        object.__setattr__(self, name, value)

    def register_buffer(self, name: str, array: np.ndarray) -> None:
        """Add state that is saved and loaded but not trained (a running mean)."""
        tensor = Tensor(np.asarray(array))
        self._buffers[name] = tensor
        object.__setattr__(self, name, tensor)

    def set_buffer(self, name: str, tensor: Tensor) -> None:
        """Replace buffer ``name`` with a new value of the same type (eager updates)."""
        old = self._buffers[name]
        if old.type != tensor.type:
            raise KilnError(f"buffer {name!r}: {tensor.type} does not match {old.type}")
        self._buffers[name] = tensor
        object.__setattr__(self, name, tensor)

    # -- calling -------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with scope(self._name):
            return self.forward(*args, **kwargs)

    # -- walking the tree --------------------------------------------------------------------------
    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, "Module"]]:
        yield prefix, self
        for name, child in self._modules.items():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def children(self) -> Iterator["Module"]:
        yield from self._modules.values()

    def modules(self) -> Iterator["Module"]:
        for _, module in self.named_modules():
            yield module

    def named_parameters(self) -> Iterator[tuple[str, Parameter]]:
        for prefix, module in self.named_modules():
            for name, p in module._parameters.items():
                yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self) -> Iterator[tuple[str, Tensor]]:
        for prefix, module in self.named_modules():
            for name, b in module._buffers.items():
                yield (f"{prefix}.{name}" if prefix else name), b

    @property
    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    def name_submodules(self) -> None:
        """Give every submodule its dotted path (used to name traced nodes)."""
        for path, module in self.named_modules():
            object.__setattr__(module, "_name", path)

    # -- modes -------------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "Module":
        for module in self.modules():
            object.__setattr__(module, "training", mode)
        return self

    def eval(self) -> "Module":
        return self.train(False)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters and buffers by dotted name (copies)."""
        state = {name: p.numpy().copy() for name, p in self.named_parameters()}
        state.update({name: b.numpy().copy() for name, b in self.named_buffers()})
        return state

    def load_state_dict(self, state: Mapping[str, np.ndarray], strict: bool = True) -> None:
        """Set parameters and buffers from ``state``; names, shapes and dtypes must match."""
        own = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        if strict:
            missing = sorted((set(own) | set(buffers)) - set(state))
            extra = sorted(set(state) - set(own) - set(buffers))
            if missing or extra:
                raise KilnError(f"load_state_dict: missing keys {missing}, unexpected keys {extra}")
        for name, array in state.items():
            array = np.asarray(array)
            if name in own:
                try:
                    own[name].assign(array)
                except KilnError as err:
                    raise KilnError(f"load_state_dict: {name!r}: {err}") from None
            elif name in buffers:
                if array.shape != buffers[name].shape or array.dtype != buffers[name].dtype.numpy:
                    raise KilnError(f"load_state_dict: buffer {name!r} is {buffers[name].type}, got {array.dtype}{list(array.shape)}")
                owner, _, leaf = name.rpartition(".")
                module = dict(self.named_modules())[owner]
                module.set_buffer(leaf, Tensor(array.copy()))

    def save(self, path: str | os.PathLike) -> None:
        """Write ``state_dict()`` to an .npz file (atomically; no pickle)."""
        write_atomic(path, npz_bytes(self.state_dict()))

    def load(self, path: str | os.PathLike) -> None:
        """Read an .npz written by ``save`` (arrays only: pickled objects are refused)."""
        try:
            with np.load(path, allow_pickle=False) as data:
                state = {k: data[k] for k in data.files}
        except (OSError, ValueError) as err:
            raise KilnError(f"{path}: cannot read a state dict: {err}") from None
        self.load_state_dict(state)

    def extra_repr(self) -> str:
        return ""

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}({self.extra_repr()}"]
        for name, child in self._modules.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        return "\n".join(lines) + ("\n)" if self._modules else ")")


class ModuleList(Module):
    """A list of modules, registered as ``0``, ``1``, ... (called by the owner's forward)."""

    def __init__(self, modules: list[Module] | tuple[Module, ...] = ()):
        super().__init__()
        for module in modules:
            self.append(module)

    def append(self, module: Module) -> None:
        setattr(self, str(len(self._modules)), module)

    def __iter__(self) -> Iterator[Module]:
        return iter(self._modules.values())

    def __len__(self) -> int:
        return len(self._modules)

    def __getitem__(self, index: int) -> Module:
        return list(self._modules.values())[index]


class Sequential(ModuleList):
    """Modules applied in order; children are named ``0``, ``1``, ..."""

    def __init__(self, *modules: Module):
        super().__init__(modules)

    def forward(self, x: Any) -> Any:
        for module in self._modules.values():
            x = module(x)
        return x
