"""The ONNX backend suite on the tvm-llvm target: kiln's TVM lowering built by TVM for the CPU,
the same lowering tvm-cuda uses, so CI tests it without a GPU. expected_failures_tvm-llvm.txt
lists what does not pass yet, each with its reason."""

from __future__ import annotations

import pytest
from suite import backend_suite, stale_expectations

from kiln.runtime.onnx_backend import KilnBackend


class KilnBackendTVMLLVM(KilnBackend):
    default_target = "tvm-llvm"


cases, EXPECTED_FAILURES, SUITE = backend_suite(KilnBackendTVMLLVM, __name__, "tvm-llvm")
pytestmark = pytest.mark.conformance
globals().update(cases)


def test_tvm_llvm_expectations_name_real_cases():
    assert not stale_expectations(SUITE, EXPECTED_FAILURES)
