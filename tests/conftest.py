"""Suite-wide pytest settings."""

from __future__ import annotations

import pytest


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """An environment whose tests were all deselected is not a failure of the run; say so
    loudly instead of failing with pytest's exit code 5."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        print("\nno tests collected in this environment (exit code 5 mapped to 0)")
        session.exitstatus = pytest.ExitCode.OK
