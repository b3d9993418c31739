"""Builds the ONNX backend test suite for one kiln backend configuration."""

from __future__ import annotations

import os
import tempfile

import glob

import numpy as np
import onnx
import onnx.backend.test
from onnx import numpy_helper

from expectations import load_expectations

# the light-model cases write their generated inputs under ONNX_HOME: keep them out of ~
os.environ.setdefault("ONNX_HOME", tempfile.mkdtemp(prefix="kiln-onnx-home-"))


def backend_suite(backend, module_name: str, expectations: str) -> tuple[dict, dict[str, str], onnx.backend.test.BackendTest]:
    """(test case classes for the module's globals, expected failures, the BackendTest)."""
    expected = load_expectations(expectations)
    suite = onnx.backend.test.BackendTest(backend, module_name)
    suite.exclude(r"_cuda$")  # CUDA variants: the GPU issue runs them
    for case in expected:
        suite.xfail(f"^{case}_cpu$")
    return suite.test_cases, expected, suite


def _array(item) -> np.ndarray:
    return numpy_helper.to_array(item) if isinstance(item, onnx.TensorProto) else np.asarray(item)


def _read_tensors(folder: str, kind: str) -> list[np.ndarray]:
    out = []
    for path in sorted(glob.glob(os.path.join(folder, f"{kind}_*.pb")), key=lambda p: int(p.rsplit("_", 1)[1][:-3])):
        tensor = onnx.TensorProto()
        with open(path, "rb") as f:
            tensor.ParseFromString(f.read())
        out.append(numpy_helper.to_array(tensor))
    return out


def case_model(case) -> onnx.ModelProto:
    """A loader TestCase's model (node cases hold it; the others keep it in their folder)."""
    return case.model if case.model is not None else onnx.load(os.path.join(case.model_dir, "model.onnx"))


def case_data(case) -> list[tuple[list[np.ndarray], list[np.ndarray]]]:
    """A loader TestCase's (inputs, outputs) data sets as arrays: node cases hold them (special
    element types as TensorProtos), the others keep .pb files in test_data_set_* folders."""
    if case.data_sets is not None:
        return [([_array(a) for a in ins], [_array(a) for a in outs]) for ins, outs in case.data_sets]
    folders = sorted(glob.glob(os.path.join(case.model_dir, "test_data_set_*")))
    return [(_read_tensors(d, "input"), _read_tensors(d, "output")) for d in folders]


def stale_expectations(suite: onnx.backend.test.BackendTest, expected: dict[str, str]) -> list[str]:
    known = {name[: -len("_cpu")] for case in suite.test_cases.values() for name in dir(case) if name.endswith("_cpu")}
    return sorted(set(expected) - known)
