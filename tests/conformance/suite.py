"""Builds the ONNX backend test suite for one kiln backend configuration."""

from __future__ import annotations

import os
import tempfile

import onnx.backend.test

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


def stale_expectations(suite: onnx.backend.test.BackendTest, expected: dict[str, str]) -> list[str]:
    known = {name[: -len("_cpu")] for case in suite.test_cases.values() for name in dir(case) if name.endswith("_cpu")}
    return sorted(set(expected) - known)
