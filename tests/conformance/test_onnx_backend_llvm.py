"""The ONNX backend suite on the llvm target (compiled CPU code, -O2), at the suite's own
tolerances. expected_failures_llvm.txt lists what does not pass yet: mostly ops without an
LLVM kernel so far; each entry that starts passing fails the run until its line is deleted."""

from __future__ import annotations

import pytest
from suite import backend_suite, stale_expectations

from kiln.runtime.onnx_backend import KilnBackend


class KilnBackendLLVM(KilnBackend):
    default_target = "llvm"


cases, EXPECTED_FAILURES, SUITE = backend_suite(KilnBackendLLVM, __name__, "llvm")
pytestmark = pytest.mark.conformance
globals().update(cases)


def test_llvm_expectations_name_real_cases():
    assert not stale_expectations(SUITE, EXPECTED_FAILURES)
