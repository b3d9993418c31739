"""The same suite with the -O2 pipeline before the eager backend: every pass must keep every
model's outputs within the suite's tolerances (the differential test of the passes against
ONNX's own reference outputs). Expected failures are those of plain eager."""

from __future__ import annotations

import pytest
from suite import backend_suite

from kiln.runtime.onnx_backend import KilnBackend


class KilnBackendO2(KilnBackend):
    default_pipeline = "O2"


cases, EXPECTED_FAILURES, SUITE = backend_suite(KilnBackendO2, __name__, "eager")
pytestmark = pytest.mark.conformance
globals().update(cases)
