"""Every conformance case that passes on tvm-llvm also builds for tvm-cuda, on any machine.

TVM schedules the kernels (dlight's GPU rules) and generates their CUDA code without a GPU, so
this finds a kernel that does not build for the GPU before the GPU run does. Running the code
needs the GPU: test_onnx_backend_tvm_cuda.py does that where one is visible."""

from __future__ import annotations

import pytest
from onnx.backend.test.loader import load_model_tests
from suite import case_data, case_model

from expectations import load_expectations
from kiln.runtime.onnx_backend import KilnRep

FAILING_ON_TVM_LLVM = load_expectations("tvm-llvm")
CASES = {
    case.name: case
    for kind in ("node", "simple", "pytorch-converted", "pytorch-operator")
    for case in load_model_tests(kind=kind)
    if case.name not in FAILING_ON_TVM_LLVM
}
pytestmark = pytest.mark.conformance


@pytest.mark.parametrize("name", sorted(CASES))
def test_builds_for_cuda(name):
    case = CASES[name]
    inputs, _ = case_data(case)[0]
    module = KilnRep(case_model(case), "tvm-cuda").module(inputs)
    assert module.target == "tvm-cuda" and module.executable.library[:4] == b"\x7fELF"
