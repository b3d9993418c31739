"""The ONNX backend test suite (node, simple, pytorch-converted, pytorch-operator and the
light model-zoo nets) on kiln's eager target, at the suite's own tolerances.

Cases in expected_failures_eager.txt are expected to fail; one that passes fails the run
(unittest's unexpected success), so the list only shrinks.
"""

from __future__ import annotations

import os
import tempfile

import onnx.backend.test
import pytest

from kiln.runtime.onnx_backend import KilnBackend

from expectations import load_expectations  # noqa: E402  (tests/conformance is on sys.path via conftest)

# the light-model cases write their generated inputs under ONNX_HOME: keep them out of ~
os.environ.setdefault("ONNX_HOME", tempfile.mkdtemp(prefix="kiln-onnx-home-"))

EXPECTED_FAILURES = load_expectations("eager")

backend_test = onnx.backend.test.BackendTest(KilnBackend, __name__)
backend_test.exclude(r"_cuda$")  # CUDA variants: the GPU issue runs them
for case in EXPECTED_FAILURES:
    backend_test.xfail(f"^{case}_cpu$")

pytestmark = pytest.mark.conformance
globals().update(backend_test.test_cases)


def test_expectations_name_real_cases():
    """A stale name in the expectations file (renamed or removed case) is an error, not noise."""
    known = {name[: -len("_cpu")] for case in backend_test.test_cases.values() for name in dir(case) if name.endswith("_cpu")}
    stale = sorted(set(EXPECTED_FAILURES) - known)
    assert not stale, f"expected_failures_eager.txt names cases that do not exist: {stale}"
