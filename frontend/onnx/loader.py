"""Reading ONNX files safely: clear errors for bad files, external data only from the model's folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import onnx
from google.protobuf.message import DecodeError

from kiln.errors import ModelLoadError


def _all_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _check_external_locations(model: onnx.ModelProto, base: Path, source: str) -> None:
    """Refuse external-data locations that leave the model's folder, before anything is read."""
    root = base.resolve()
    for tensor in _all_tensors(model.graph):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (root / location).resolve()
        if os.path.isabs(location) or root not in target.parents:
            raise ModelLoadError(
                f"{source}: initializer {tensor.name!r} points its external data at {location!r}, "
                "outside the model's folder; refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(f"{source}: initializer {tensor.name!r}: external data file {location!r} is missing")


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX model file and its external data (through onnx's checked loader)."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise ModelLoadError(f"{source}: no such file")
    if path.is_dir():
        raise ModelLoadError(f"{source}: is a directory, not an ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, UnicodeDecodeError) as err:
        raise ModelLoadError(f"{source}: not a readable ONNX model (truncated or not ONNX?): {err}") from None
    except OSError as err:
        raise ModelLoadError(f"{source}: cannot read: {err.strerror or err}") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{source}: not an ONNX model (no graph found)")
    _check_external_locations(model, path.parent, source)
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as err:
        raise ModelLoadError(f"{source}: cannot load external data: {err}") from None
    return model
