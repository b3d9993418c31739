"""Shared test setup: the IR verifier runs after every pass in every test (KILN_VERIFY)."""

from __future__ import annotations

import pytest

from kiln import config


@pytest.fixture(autouse=True)
def _verify_every_pass():
    with config.override(verify=True):
        yield
