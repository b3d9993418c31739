"""The ONNX backend suite on the tvm-cuda target (marked ``gpu``; skipped where no CUDA device is
visible). expected_failures_tvm-cuda.txt lists what does not pass on the GPU, with reasons."""

from __future__ import annotations

import pytest

from kiln.backends.tvm import cuda_available
from kiln.runtime.onnx_backend import KilnBackend

if not cuda_available():
    pytest.skip("no CUDA device visible: the GPU conformance run needs one", allow_module_level=True)

from suite import backend_suite, stale_expectations  # noqa: E402


class KilnBackendTVMCUDA(KilnBackend):
    default_target = "tvm-cuda"


cases, EXPECTED_FAILURES, SUITE = backend_suite(KilnBackendTVMCUDA, __name__, "tvm-cuda")
pytestmark = [pytest.mark.conformance, pytest.mark.gpu]
globals().update(cases)


def test_tvm_cuda_expectations_name_real_cases():
    assert not stale_expectations(SUITE, EXPECTED_FAILURES)
