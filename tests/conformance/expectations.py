"""The expectations file: every conformance case that does not pass, each with its reason."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def load_expectations(target: str) -> dict[str, str]:
    """``{case name: reason}`` from ``expected_failures_<target>.txt`` (``name: reason`` lines)."""
    path = HERE / f"expected_failures_{target}.txt"
    cases: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, reason = line.partition(":")
        if not sep or not reason.strip():
            raise ValueError(f"{path}:{lineno}: expected 'case_name: reason', got {line!r}")
        if name.strip() in cases:
            raise ValueError(f"{path}:{lineno}: {name.strip()} is listed twice")
        cases[name.strip()] = reason.strip()
    return cases
