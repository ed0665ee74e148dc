"""Finds the external programs a test needs: skipped when missing, but failed under CI so no install passes silently."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tools(*names: str, hint: str) -> tuple[str, ...]:
    """Paths of the programs ``names`` on PATH. When one is missing the test is skipped with ``hint`` (how to
    install it), except under CI (``CI=true``), where it fails instead."""
    paths = tuple(shutil.which(name) for name in names)
    if all(paths):
        return paths
    message = f"{' / '.join(names)} not on PATH ({hint})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)
