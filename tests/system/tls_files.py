"""Self-signed certificates for the TLS tests, made by the openssl command line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.required import REQUIRE_ALL


def make_cert(directory: Path, name: str = "relay", cn: str = "localhost") -> tuple[Path, Path]:
    """``(cert.pem, key.pem)`` for ``cn``, valid for localhost and 127.0.0.1 / ::1."""
    if shutil.which("openssl") is None:
        if REQUIRE_ALL:
            pytest.fail("openssl is not installed")
        pytest.skip("openssl is not installed")
    cert, key = directory / f"{name}-cert.pem", directory / f"{name}-key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(cert),
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key
