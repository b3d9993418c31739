"""Shared test setup: the IR verifier runs after every pass in every test (KILN_VERIFY), and
fixtures for the models kiln ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from kiln import config
from kiln.models import builtin_models


@pytest.fixture(autouse=True)
def _verify_every_pass():
    with config.override(verify=True):
        yield


@pytest.fixture(autouse=True, scope="session")
def _private_compile_cache(tmp_path_factory):
    """Tests compile into a cache of their own, never the user's."""
    import os

    os.environ["KILN_CACHE_DIR"] = str(tmp_path_factory.mktemp("kiln-cache"))
    yield


@pytest.fixture
def light_model():
    """Path of one of the light_* nets shipped in the onnx wheel."""

    def find(name: str) -> Path:
        return builtin_models()[name]

    return find
