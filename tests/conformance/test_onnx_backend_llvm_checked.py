"""The llvm conformance run again, built with KILN_CHECK_BOUNDS: guard bytes after every
kernel's outputs and scratch are checked after each call, so a kernel that writes past its
buffer fails its case by name instead of corrupting a neighbour silently. Same expectations as
the plain llvm run."""

from __future__ import annotations

import pytest
from suite import backend_suite

from kiln import config
from kiln.runtime.onnx_backend import KilnBackend


class KilnBackendLLVMChecked(KilnBackend):
    default_target = "llvm"


@pytest.fixture(autouse=True)
def bounds_checked():
    with config.override(check_bounds=True):
        yield


cases, EXPECTED_FAILURES, SUITE = backend_suite(KilnBackendLLVMChecked, __name__, "llvm")
pytestmark = pytest.mark.conformance
globals().update(cases)
