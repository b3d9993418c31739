"""Differential test of the passes: the -O2 pipeline with each pass switched off in turn keeps
every conformance model's outputs (node, simple and pytorch suites at their own tolerances) and
the nine light nets' outputs (against kiln eager -O0 on seeded inputs) as the full pipeline does.

A pass that hides another's bug (a fold that removes a miscompiled pattern) shows up here.
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from expectations import load_expectations
from suite import case_data, case_model

import kiln
from kiln.models import builtin_models
from kiln.passes.pipelines import pipeline
from kiln.runtime.onnx_backend import KilnRep

O2 = pipeline("O2")
EXPECTED = load_expectations("eager")


def _cases() -> list[tuple[str, onnx.ModelProto, list, float, float]]:
    from onnx.backend.test.loader import load_model_tests

    cases = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind in ("node", "simple", "pytorch-converted", "pytorch-operator"):
            for case in load_model_tests(kind=kind):
                if case.name in EXPECTED:
                    continue
                cases.append((case.name, case_model(case), case_data(case), case.rtol, case.atol))
    return cases


@pytest.fixture(scope="module")
def suite_cases():
    return _cases()


def _failures(passes: list[str], cases) -> list[str]:
    failures = []
    for name, model, data, rtol, atol in cases:
        rep = KilnRep(model, "eager", pipeline="O0", passes=passes)
        for inputs, outputs in data:
            try:
                got = rep.run(list(inputs))
                for g, w in zip(got, outputs):
                    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=rtol, atol=atol)
            except Exception as err:  # noqa: BLE001  (collected: one report for the whole suite)
                failures.append(f"{name}: {str(err).strip().splitlines()[0][:200]}")
                break
    return failures


@pytest.mark.conformance
@pytest.mark.parametrize("dropped", sorted(set(O2)))
def test_o2_without_one_pass_keeps_every_suite_output(dropped, suite_cases):
    failures = _failures([p for p in O2 if p != dropped], suite_cases)
    assert not failures, f"-O2 without {dropped}: {len(failures)} cases differ:\n" + "\n".join(failures[:20])


@pytest.mark.conformance
@pytest.mark.parametrize("name", sorted(builtin_models()))
def test_light_nets_with_each_pass_switched_off(name):
    path = builtin_models()[name]
    reference = kiln.compile(path, "eager")
    rng = np.random.default_rng(0)
    feeds = {n: rng.uniform(0, 1, t.shape).astype(t.dtype.numpy) for n, t in reference.input_types.items()}
    want = reference.run(feeds)
    for dropped in sorted(set(O2)):
        got = kiln.compile(path, "eager", pipeline="O0", passes=[p for p in O2 if p != dropped]).run(feeds)
        for key in want:
            np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=1e-5, err_msg=f"{name}, -O2 without {dropped}")
