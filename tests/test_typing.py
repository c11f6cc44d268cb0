"""The public API type-checks as users write it: tests/typing/public_api.py passes
`mypy --strict`, and each line marked as an error (a typo'd endpoint literal) is one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(300)

TYPING = Path(__file__).parent / "typing" / "public_api.py"


def test_public_api_passes_mypy_strict() -> None:
    """mypy --strict --warn-unused-ignores on the usage file reports nothing."""
    done = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--warn-unused-ignores",
            "--python-version", "3.11", "--no-incremental", str(TYPING),
        ],
        capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_endpoint_literals_are_the_enum_values() -> None:
    """EndpointPath (for type checkers) names exactly BatchEndpoint's values."""
    from typing import get_args

    from together_async import BatchEndpoint, EndpointPath

    assert set(get_args(EndpointPath)) == {endpoint.value for endpoint in BatchEndpoint}
