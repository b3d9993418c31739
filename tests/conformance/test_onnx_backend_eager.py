"""The ONNX backend test suite (node, simple, pytorch-converted, pytorch-operator and the
light model-zoo nets) on kiln's eager target, at the suite's own tolerances.

Cases in expected_failures_eager.txt are expected to fail; one that passes fails the run
(unittest's unexpected success), so the list only shrinks.
"""

from __future__ import annotations

import pytest
from suite import backend_suite, stale_expectations

from kiln.runtime.onnx_backend import KilnBackend

cases, EXPECTED_FAILURES, SUITE = backend_suite(KilnBackend, __name__, "eager")
pytestmark = pytest.mark.conformance
globals().update(cases)


def test_expectations_name_real_cases():
    """A stale name in the expectations file (renamed or removed case) is an error, not noise."""
    assert not stale_expectations(SUITE, EXPECTED_FAILURES)
